"""Helpers shared by the Python benchmark scripts (fleet.py, soak.py, bans.py, compression.py)."""
import http.client, http.server, os, re, socket, socketserver, subprocess, sys, tempfile, threading, time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def write_config(path, work, port, admin, origin, memory, extra=""):
    """A one-thread Skua config at `path` in front of `origin` (ip:port), health checks off."""
    with open(path, "w") as f:
        f.write(f"""[server]
listen = ["127.0.0.1:{port}"]
admin = "127.0.0.1:{admin}"
threads = 1
upgrade_sock = "{work}/upgrade.sock"
[[origin]]
name = "bench"
addresses = ["{origin}"]
[origin.health_check]
enabled = false
[cache]
memory_size = {memory}
{extra}
""")


def rules_from(path, origin):
    """The `[[rule]]` tables of the config at `path` (everything from its first `[[rule]]`),
    with an `[[origin]]` pool at `origin` for every pool a rule routes to: a benchmark's
    config plus a real rule set, without the example's own servers."""
    text = open(path).read()
    start = text.find("\n[[rule]]")
    if start < 0:
        sys.exit(f"{path}: no [[rule]]")
    rules = text[start:]
    pools = sorted(set(re.findall(r'^route = "([^"]+)"', rules, re.M)))
    tables = "".join(
        f'\n[[origin]]\nname = "{name}"\naddresses = ["{origin}"]\n'
        f"[origin.health_check]\nenabled = false\n" for name in pools)
    return tables + rules


class PinnedSkua:
    """`binary` serving one pool at `origin` on ephemeral ports, pinned to CPU 0 with one
    worker thread, for a `with` block; `.port`, `.admin` and `.proc` while it runs."""

    def __init__(self, binary, origin, memory, extra=""):
        self.work = tempfile.mkdtemp()
        self.port, self.admin = free_port(), free_port()
        config = os.path.join(self.work, "skua.toml")
        write_config(config, self.work, self.port, self.admin, origin, memory, extra)
        self.proc = subprocess.Popen(["taskset", "-c", "0", binary, "serve", "--config", config],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self):
        wait_port(self.port)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()


class ThreadedServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def start_origin(handler):
    """Serves `handler` on an ephemeral loopback port in a thread; returns "ip:port"."""
    server = ThreadedServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"127.0.0.1:{server.server_address[1]}"


def wait_port(port):
    for _ in range(200):
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {port}")


def wrk_rate(port, path, seconds, headers):
    """`wrk -t1 -c64` pinned to CPU 1 on `path`; req/s, exiting on any error response."""
    args = ["taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{seconds}s"]
    for h in headers:
        args += ["-H", h]
    out = subprocess.run(args + [f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        sys.exit(f"errors under load:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


class OriginHandler(http.server.BaseHTTPRequestHandler):
    """An HTTP/1.1 origin handler that sends each response without waiting: the head and the
    body leave in two writes, and with Nagle's algorithm on, the body would wait for Skua's
    delayed ACK (40 ms per miss)."""

    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *a):
        pass


def fixed_page(body, headers):
    """An origin handler that answers every GET with `body` and `headers` (name, value pairs)."""

    class Origin(OriginHandler):
        def do_GET(self):
            self.send_response(200)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Origin


# Absolute: the scripts run wrk from the harness's Lua directory, where a relative path
# (`SKUA_BENCH_HARNESS=../shared/bench`) would name nothing, and wrk without its script asks
# for `/` (regression: miss_cpu.py measured the origin's 403s).
HARNESS = os.path.abspath(os.environ.get(
    "SKUA_BENCH_HARNESS", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench")))


def start_nginx_origin(port, workdir, docroot, cpu=None):
    """The harness's origin (../shared/bench/origin: nginx serving `docroot`, Cache-Control
    max-age=3600, one access-log line per request in `workdir`/access.log) on `port`, in its
    own process group, on CPU `cpu` if given: stop it with os.killpg(proc.pid, signal.SIGTERM)."""
    os.makedirs(workdir, exist_ok=True)
    env = dict(os.environ, PORT=str(port), WORKDIR=workdir, DOCROOT=docroot,
               PEER_DIR=os.path.join(HARNESS, "origin"), ORIGIN_HOST="127.0.0.1",
               ORIGIN_PORT="0")
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    return subprocess.Popen(pin + ["bash", os.path.join(HARNESS, "origin", "start.sh")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stats(admin):
    """Skua's /stats on its admin port, decoded."""
    import json
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
    conn.request("GET", "/stats")
    return json.loads(conn.getresponse().read())


def wrk_until(args, done, poll=0.5):
    """Runs wrk with `args` until `done()` holds, then stops it (wrk runs for its whole
    duration whatever its threads do). Exits if wrk stops first."""
    load = subprocess.Popen(["wrk"] + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not done():
        time.sleep(poll)
        if load.poll() is not None:
            sys.exit("wrk stopped before its work was done")
    load.terminate()
    load.wait()
