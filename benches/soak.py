#!/usr/bin/env python3
"""Soak: Skua at about 70 % of its measured maximum hit rate for a long time, with a steady
purge stream, watching RSS and errors.

A threaded Python origin serves 4 KiB pages (max-age=3600); Skua (release, one worker thread,
pinned to CPU 0) sits in front; wrk (pinned to CPU 1) first measures the maximum over the page
set for 10 s, then drives about 70 % of it (fixed per-connection pacing) in 60 s segments while
another thread PURGEs a random page 50 times a second. Each segment prints req/s, errors (non-2xx
responses and socket errors from wrk, purge answers other than 204/404) and Skua's RSS.

    python3 benches/soak.py [--minutes 30] [--pages 2000]
"""
import argparse, http.client, http.server, os, random, re, socket, socketserver, subprocess
import sys, tempfile, threading, time

from benchlib import ThreadedServer, fixed_page, free_port, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "skua")
PAGE = b"x" * 4096


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def wrk(port, seconds, conns, lua, env):
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "-s", lua,
         f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, env=env).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return rate, errors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=int, default=30)
    ap.add_argument("--pages", type=int, default=2000)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="skua-soak-")
    oport, port, admin = free_port(), free_port(), free_port()
    page = fixed_page(PAGE, [("Content-Type", "text/html"), ("Cache-Control", "max-age=3600")])
    origin = ThreadedServer(("127.0.0.1", oport), page)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    config = os.path.join(work, "skua.toml")
    write_config(config, work, port, admin, f"127.0.0.1:{oport}", 268435456)
    skua = subprocess.Popen(["taskset", "-c", "0", BIN, "serve", "--config", config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    lua_dir = os.path.join(work, "lua")
    os.makedirs(lua_dir)
    paced = os.path.join(lua_dir, "paced.lua")
    with open(paced, "w") as f:
        f.write("""local n = tonumber(os.getenv("PAGES"))
local pace = tonumber(os.getenv("PACE_MS"))
local reqs, i = {}, 0
function init(args)
  for k = 0, n - 1 do reqs[k] = wrk.format("GET", string.format("/pages/p%05d.html", k)) end
  i = math.random(0, n - 1)
end
function request() local r = reqs[i]; i = (i + 1) % n; return r end
function delay() return pace end
""")
    env = dict(os.environ, PAGES=str(args.pages), PACE_MS="0")
    wrk(port, 5, 16, paced, env)  # warm: every page cached
    top, _ = wrk(port, 10, 32, paced, env)
    target = 0.7 * top
    pace = 2
    # Each connection sends one request, waits for it, then waits `pace` ms.
    conns = max(1, round(target * (pace + 0.2) / 1000))
    env["PACE_MS"] = str(pace)
    # Timer granularity and latency make the formula approximate: calibrate on short runs.
    for _ in range(3):
        got, _ = wrk(port, 5, conns, paced, env)
        if abs(got - target) < 0.05 * target:
            break
        conns = max(1, round(conns * target / max(got, 1)))
    print(f"maximum {top:.0f} req/s; target {target:.0f} req/s with {conns} connections "
          f"paced {pace} ms", flush=True)

    stop = threading.Event()
    purge_stats = {"sent": 0, "errors": 0}

    def purger_checked():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        while not stop.is_set():
            page = random.randrange(args.pages)
            try:
                conn.request("PURGE", f"/pages/p{page:05d}.html")
                resp = conn.getresponse()
                resp.read()
                if resp.status not in (204, 404):
                    purge_stats["errors"] += 1
            except Exception:
                purge_stats["errors"] += 1
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                continue
            purge_stats["sent"] += 1
            time.sleep(0.02)

    threading.Thread(target=purger_checked, daemon=True).start()
    start_rss = rss_mib(skua.pid)
    print(f"RSS at start of soak: {start_rss:.1f} MiB", flush=True)
    print("minute | req/s | wrk errors | purges sent | purge errors | RSS MiB", flush=True)
    total_errors = 0
    rates = []
    for minute in range(1, args.minutes + 1):
        rate, errors = wrk(port, 60, conns, paced, env)
        total_errors += errors
        rates.append(rate)
        print(f"{minute} | {rate:.0f} | {errors} | {purge_stats['sent']} | "
              f"{purge_stats['errors']} | {rss_mib(skua.pid):.1f}", flush=True)
    stop.set()
    end_rss = rss_mib(skua.pid)
    rates.sort()
    print(f"summary: {args.minutes} min, median {rates[len(rates) // 2]:.0f} req/s "
          f"({rates[len(rates) // 2] / top:.0%} of maximum {top:.0f}), wrk errors {total_errors}, "
          f"purges {purge_stats['sent']} with {purge_stats['errors']} errors, "
          f"RSS {start_rss:.1f} -> {end_rss:.1f} MiB", flush=True)
    skua.terminate()
    skua.wait()
    origin.shutdown()


if __name__ == "__main__":
    main()
