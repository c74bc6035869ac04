#!/usr/bin/env python3
"""What an object costs the memory tier beyond its body, at a million objects (issue #23's
per-object point; benches/README.md).

    python3 benches/memory_million.py target/release/skua [--objects 1000000] [--size 1]

1. Starts Skua (one worker thread pinned to CPU 0, a memory tier large enough for every
   object, no disk tier) in front of the harness's origin (../shared/bench/origin: nginx) and
   reads its RSS once it is idle: the empty RSS.
2. Fills the tier through Skua (wrk on CPU 1, one request per object: `/obj/1k.bin?k=N`, so
   every object has the origin's real response header) until /stats counts them all.
3. Reads the RSS again and prints, per object: RSS minus the empty RSS, minus the body; and
   what the tier charges each object against its bound (header, body and a fixed 256 bytes).

Needs nginx with the echo module (libnginx-mod-http-echo) and wrk. Takes about a minute and
a half per million objects of 1 KiB on one core, and about 1.7 GB of memory.
"""
import argparse, os, re, shutil, signal, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import (free_port, start_nginx_origin, stats, wait_port,  # noqa: E402
                      write_config, wrk_until)

FILL_LUA = """
-- Objects 0, 1, 2... below the total, then again from 0 (hits) until wrk is stopped. (wrk
-- calls request() once before it starts: the cycle makes up for that object.)
local n = -1
local total = 0
function init(args)
    total = tonumber(args[1])
end
function request()
    n = (n + 1) % total
    return wrk.format("GET", "/obj/%s?k=" .. n)
end
"""


def status_kib(pid, field):
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=1, help="body size in KiB (default 1)")
    a = ap.parse_args()
    body = a.size * 1024
    work = tempfile.mkdtemp(prefix="skua-memory-million-")
    # The origin's nginx workers run as another user: they must reach the files.
    os.chmod(work, 0o755)
    docroot = os.path.join(work, "docroot", "obj")
    os.makedirs(docroot)
    name = f"{a.size}k.bin"
    with open(os.path.join(docroot, name), "wb") as f:
        f.write(os.urandom(body))
    origin_port = free_port()
    origin = start_nginx_origin(origin_port, os.path.join(work, "origin"),
                                os.path.join(work, "docroot"))
    proc = None
    try:
        wait_port(origin_port)
        port, admin = free_port(), free_port()
        conf = os.path.join(work, "skua.toml")
        # Room for every object: the tier charges about a body, its header and 256 bytes.
        memory = a.objects * (body + 2048) + (64 << 20)
        write_config(conf, work, port, admin, f"127.0.0.1:{origin_port}", memory,
                     "compress = []")
        proc = subprocess.Popen(["taskset", "-c", "0", a.binary, "serve", "--config", conf],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        time.sleep(2)
        empty = status_kib(proc.pid, "VmRSS")
        lua = os.path.join(work, "fill.lua")
        open(lua, "w").write(FILL_LUA.replace("%s", name))
        t0 = time.monotonic()
        memory_tier = lambda: stats(admin)["tiers"]["memory"]
        wrk_until(["-t1", "-c32", "-d3600s", "-s", lua, f"http://127.0.0.1:{port}/", "--",
                   str(a.objects)], lambda: memory_tier()["objects"] >= a.objects, 1)
        fill = time.monotonic() - t0
        time.sleep(2)
        tier = memory_tier()
        held = tier["objects"]
        rss = status_kib(proc.pid, "VmRSS")
        anon = status_kib(proc.pid, "RssAnon")
        beyond = (rss - empty) * 1024 / held - body
        print(f"{a.binary}: {held:,} objects of {a.size} KiB filled in {fill:.0f} s; "
              f"RSS {rss / 1024:.1f} MiB (anonymous {anon / 1024:.1f}), empty "
              f"{empty / 1024:.1f} MiB")
        print(f"  beyond the body, per object: {beyond:.0f} bytes of RSS; the tier charges "
              f"{tier['bytes'] / held - body:.0f} bytes (header, and 256 for the entry)")
    finally:
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        os.killpg(origin.pid, signal.SIGTERM)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
