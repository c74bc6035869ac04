#!/usr/bin/env python3
"""A disk tier of a million objects (1-16 KiB) across restarts: how soon Skua listens, how
soon every object is servable, and what the index costs in memory (benches/README.md, the disk
tier section; issue #20's acceptance).

    python3 benches/disk_million.py target/release/skua [--objects 1000000] [--dir DIR]

1. Fills the tier through Skua (wrk, one request per object, sizes 1, 2, 4, 8 and 16 KiB in
   turn) from the harness's origin (../shared/bench/origin: nginx), then stops Skua with
   SIGTERM (it writes its index checkpoint).
2. Measures an empty Skua's RSS (same config, an empty directory).
3. Starts Skua on the filled directory: the time until it accepts a connection, until
   /stats says the index is loaded, the RSS then (minus the empty one, per object), and that
   a sample of 2,000 objects are disk hits with no origin fetch.
4. The same after 20,000 more objects and `kill -9` (the checkpoint from before them, and a scan
   of what was written since), and with the checkpoint removed (every segment scanned).

Needs nginx with the echo module (libnginx-mod-http-echo) and wrk; about 6.5 GB of disk per
million objects under --dir (default: a temporary directory, removed at the end).
"""
import argparse, http.client, os, random, re, shutil, signal, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import (free_port, start_nginx_origin, stats, wait_port,  # noqa: E402
                      write_config, wrk_until)

SIZES = [1, 2, 4, 8, 16]

FILL_LUA = """
-- Thread i of t asks for objects i, i + t, i + 2t... below the total, then repeats the last
-- (a hit); the script stops wrk once the tier holds them all.
local n = 0
local threads = 0
local total = 0
local created = 0
function setup(thread)
    thread:set("first", created)
    created = created + 1
end
function init(args)
    threads = tonumber(args[1])
    total = tonumber(args[2])
end
function request()
    local k = first + n * threads
    if k < total then
        n = n + 1
    else
        k = first
    end
    local size = ({1, 2, 4, 8, 16})[k % 5 + 1]
    return wrk.format("GET", "/obj/" .. size .. "k.bin?k=" .. k)
end
"""


def rss_kib(pid):
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))


def config(work, port, admin, origin_port, disk):
    path = os.path.join(work, f"skua-{port}.toml")
    write_config(path, work, port, admin, f"127.0.0.1:{origin_port}", 1048576,
                 f"""max_object_size = 512
[cache.disk]
path = "{disk}"
size = 17179869184
max_object_size = 65536
after_restart = "serve"
""")
    return path


def start(binary, conf):
    return subprocess.Popen([binary, "serve", "--config", conf],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure_start(binary, conf, port, admin):
    """Starts Skua; returns (process, ms to listen, ms to index loaded)."""
    t0 = time.monotonic()
    proc = start(binary, conf)
    listen = None
    while listen is None:
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
            listen = (time.monotonic() - t0) * 1000
        except OSError:
            time.sleep(0.001)
    while True:
        try:
            if stats(admin)["tiers"]["disk"]["index_loaded"]:
                break
        except OSError:
            pass
        time.sleep(0.005)
    return proc, listen, (time.monotonic() - t0) * 1000


def sample_hits(port, objects, count=2000, keys=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    hits = 0
    for k in random.Random(7).sample(keys or range(objects), count):
        conn.request("GET", f"/obj/{SIZES[k % 5]}k.bin?k={k}")
        resp = conn.getresponse()
        resp.read()
        hits += resp.getheader("x-cache-status") == "hit-local"
    return hits, count


def write_more(port, start, count):
    """`count` new objects (misses, written to disk) after the first `start`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for k in range(start, start + count):
        conn.request("GET", f"/obj/{SIZES[k % 5]}k.bin?k={k}")
        conn.getresponse().read()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--dir", help="work directory, kept (default: a temporary one, removed)")
    ap.add_argument("--reuse", action="store_true",
                    help="measure the restarts of a --dir filled by an earlier run")
    a = ap.parse_args()
    work = a.dir or tempfile.mkdtemp(prefix="skua-million-")
    os.makedirs(work, exist_ok=True)
    # The origin's nginx workers run as another user: they must reach the files.
    os.chmod(work, 0o755)
    docroot = os.path.join(work, "docroot", "obj")
    os.makedirs(docroot, exist_ok=True)
    for size in SIZES:
        with open(os.path.join(docroot, f"{size}k.bin"), "wb") as f:
            f.write(os.urandom(size * 1024))
    origin_port = free_port()
    origin = start_nginx_origin(origin_port, os.path.join(work, "origin"),
                                os.path.join(work, "docroot"))
    procs = []
    try:
        wait_port(origin_port)
        # The port is part of every cache key: a --reuse run listens where the fill did.
        ports = os.path.join(work, "ports")
        if a.reuse:
            port, admin = map(int, open(ports).read().split())
        else:
            port, admin = free_port(), free_port()
            open(ports, "w").write(f"{port} {admin}")
        disk = os.path.join(work, "disk")
        conf = config(work, port, admin, origin_port, disk)

        if not a.reuse:
            fill(a, work, port, admin, conf, procs)
        measure(a, work, port, admin, conf, procs, origin_port, disk)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        os.killpg(origin.pid, signal.SIGTERM)
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)


def fill(a, work, port, admin, conf, procs):
    disk = os.path.join(work, "disk")
    proc = start(a.binary, conf)
    procs.append(proc)
    wait_port(port)
    lua = os.path.join(work, "fill.lua")
    open(lua, "w").write(FILL_LUA)
    t0 = time.monotonic()
    wrk_until(["-t2", "-c32", "-d3600s", "-s", lua, f"http://127.0.0.1:{port}/", "--", "2",
               str(a.objects)], lambda: stats(admin)["tiers"]["disk"]["objects"] >= a.objects, 1)
    held = stats(admin)["tiers"]["disk"]["objects"]
    fill = time.monotonic() - t0
    print(f"filled {held:,} objects in {fill:.0f} s")
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    ckpt = os.path.getsize(os.path.join(disk, "index.ckpt"))
    segments = os.listdir(os.path.join(disk, "segments"))
    used = sum(os.path.getsize(os.path.join(disk, "segments", s)) for s in segments)
    print(f"on disk: {len(segments)} segments, {used / 2**30:.2f} GiB; "
          f"checkpoint {ckpt / 2**20:.1f} MiB")


def measure(a, work, port, admin, conf, procs, origin_port, disk):
    empty_port, empty_admin = free_port(), free_port()
    empty_conf = config(work, empty_port, empty_admin, origin_port, os.path.join(work, "empty"))
    empty = start(a.binary, empty_conf)
    procs.append(empty)
    wait_port(empty_port)
    time.sleep(2)
    rss_empty = rss_kib(empty.pid)
    empty.terminate()
    empty.wait()

    # (what came before this start, objects to write before stopping it with kill -9, keep
    # the checkpoint)
    cases = [
        ("after SIGTERM (its checkpoint)", 20_000, True),
        ("after kill -9 (the checkpoint before it, and the 20,000 objects written since)", 0,
         True),
        ("with no checkpoint (every segment scanned)", 0, False),
    ]
    written = None
    for how, written_since, keep_checkpoint in cases:
        if not keep_checkpoint and os.path.exists(os.path.join(disk, "index.ckpt")):
            os.remove(os.path.join(disk, "index.ckpt"))
        proc, listen, loaded = measure_start(a.binary, conf, port, admin)
        procs.append(proc)
        time.sleep(1)
        rss = rss_kib(proc.pid)
        objects = stats(admin)["tiers"]["disk"]["objects"]
        hits, count = sample_hits(port, a.objects)
        print(f"{how}: listening in {listen:.0f} ms, index loaded in {loaded:.0f} ms, "
              f"{objects:,} objects; RSS {rss / 1024:.1f} MiB - empty {rss_empty / 1024:.1f} "
              f"MiB = {(rss - rss_empty) * 1024 / max(objects, 1):.1f} bytes per object; "
              f"{hits}/{count} sampled objects were disk hits")
        if written:
            first, n = written
            got = sample_hits(port, a.objects, 500, range(first, first + n))
            print(f"  of the objects written after the checkpoint, {got[0]}/{got[1]} sampled "
                  f"were disk hits")
            written = None
        if written_since:
            written = (a.objects + random.randrange(10**8), written_since)
            write_more(port, *written)
            proc.kill()
        else:
            proc.send_signal(signal.SIGTERM)
        proc.wait()
    # Leave a checkpoint for the next --reuse run.
    proc, _, _ = measure_start(a.binary, conf, port, admin)
    proc.send_signal(signal.SIGTERM)
    proc.wait()


if __name__ == "__main__":
    main()
