#!/usr/bin/env python3
"""Byte hit ratio of the memory and disk tiers together under a Zipf key mix, the disk tier
20 times the memory tier's size, through the real binary (benches/README.md, the disk tier
section; issue #20's acceptance). Each binary gets the same request sequence.

    python3 benches/disk_hit_ratio.py BINARY [BINARY...] [--keys 50000] [--requests 300000]

Objects are 1 to 64 KiB (seven sizes, by key), from the harness's origin
(../shared/bench/origin: nginx); the sequence is Zipf (s = 1.0, as page popularity on a wiki
roughly is), drawn once with a fixed seed. wrk replays it over 16 connections; the byte hit
ratio is one minus the bytes the origin sent (its access log, one line per fetch) over the
bytes requested. Needs nginx with the echo module and wrk.
"""
import argparse, bisect, os, random, shutil, signal, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import (free_port, start_nginx_origin, stats, wait_port,  # noqa: E402
                      write_config, wrk_until)

SIZES = [1, 2, 4, 8, 16, 32, 64]

REPLAY_LUA = """
local paths = {}
local i = 0
function init(args)
    for line in io.lines(args[1]) do
        paths[#paths + 1] = line
    end
end
function request()
    i = i + 1
    if i > #paths then
        wrk.thread:stop()
        i = #paths
    end
    return wrk.format("GET", paths[i])
end
"""


def answered(admin):
    return sum(stats(admin)["requests"].values())


def size_kib(k):
    return SIZES[(k * 2654435761) % len(SIZES)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binaries", nargs="+")
    ap.add_argument("--keys", type=int, default=50_000)
    ap.add_argument("--requests", type=int, default=300_000)
    ap.add_argument("--memory", type=int, default=4 << 20)
    ap.add_argument("--zipf", type=float, default=1.0)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="skua-zipf-")
    # The origin's nginx workers run as another user: they must reach the files.
    os.chmod(work, 0o755)
    docroot = os.path.join(work, "docroot", "obj")
    os.makedirs(docroot)
    for size in SIZES:
        with open(os.path.join(docroot, f"{size}k.bin"), "wb") as f:
            f.write(os.urandom(size * 1024))
    weights = [1 / (k + 1) ** a.zipf for k in range(a.keys)]
    cumulative, total = [], 0.0
    for w in weights:
        total += w
        cumulative.append(total)
    rng = random.Random(7)
    sequence = [bisect.bisect_left(cumulative, rng.random() * total) for _ in range(a.requests)]
    requested = sum(size_kib(k) for k in sequence)
    paths = os.path.join(work, "paths.txt")
    with open(paths, "w") as f:
        for k in sequence:
            f.write(f"/obj/{size_kib(k)}k.bin?k={k}\n")
    lua = os.path.join(work, "replay.lua")
    open(lua, "w").write(REPLAY_LUA)
    print(f"{a.keys:,} keys, {a.requests:,} requests (Zipf s={a.zipf}), {requested / 1024:.0f} MiB "
          f"requested; memory tier {a.memory >> 20} MiB, disk tier {20 * a.memory >> 20} MiB")
    try:
        for binary in a.binaries:
            origin_port, port, admin = free_port(), free_port(), free_port()
            run = tempfile.mkdtemp(dir=work)
            origin_log = os.path.join(run, "origin")
            origin = start_nginx_origin(origin_port, origin_log, os.path.join(work, "docroot"))
            conf = os.path.join(run, "skua.toml")
            write_config(conf, run, port, admin, f"127.0.0.1:{origin_port}", a.memory,
                         f"""max_object_size = 1048576
[cache.disk]
path = "{run}/disk"
size = {20 * a.memory}
""")
            skua = subprocess.Popen([binary, "serve", "--config", conf],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_port(origin_port)
                wait_port(port)
                t0 = time.monotonic()
                # wrk runs for its duration whatever its threads do: it is stopped once Skua
                # has answered the whole sequence (the extra requests repeat the last path).
                wrk_until(["-t1", "-c16", "-d3600s", "-s", lua, f"http://127.0.0.1:{port}/",
                           "--", paths], lambda: answered(admin) >= a.requests)
                took = time.monotonic() - t0
                print(f"  {stats(admin)['requests']}")
            finally:
                skua.terminate()
                skua.wait()
                os.killpg(origin.pid, signal.SIGTERM)
            fetched = 0
            fetches = 0
            for line in open(os.path.join(origin_log, "access.log")):
                uri, status = line.split()[:2]
                if status != "200":
                    sys.exit(f"the origin answered {status} for {uri}")
                if "?k=" in uri:
                    fetches += 1
                    fetched += size_kib(int(uri.split("?k=")[1]))
            print(f"{binary}: byte hit ratio {100 * (1 - fetched / requested):.1f} %, "
                  f"{fetches:,} origin fetches ({100 * (1 - fetches / a.requests):.1f} % of "
                  f"requests hit), {took:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
