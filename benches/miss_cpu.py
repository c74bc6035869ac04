#!/usr/bin/env python3
"""CPU per miss, split into user and system time, for Skua and the harness's peers (issue
#23's per-miss point; benches/README.md).

    python3 benches/miss_cpu.py target/release/skua [--peer nginx --peer ats] [--reps 3]
        [--floor target/release/examples/miss_floor]
    python3 benches/miss_cpu.py --hits target/release/skua --peer limit

With `--hits`, the same for a 1 KiB hit (#23's 1 KiB point) instead: wrk on 16 connections
asks for one cached 1 KiB object (`/obj/1k.bin`), and `--peer limit` is nginx serving that
file itself (../shared/bench/peers/limit), as the harness's limit row.

The harness (../shared/bench) reports one figure per miss: how busy the proxy's core was. On
a shared VM that figure carries the kernel's and the hypervisor's share of every send and
wake, which moves by a third between runs. This script reads, from /proc, how much of it
each proxy's own processes spent in user space and in the kernel, so that the part a proxy's
code decides (user time) can be compared apart from the part every proxy pays alike.

Each target runs pinned to CPU 0 in front of the harness's origin (nginx, `/slow/` answered
after 50 ms) on CPU 1; wrk on CPU 1 sends, on 64 connections, every request for a new URL
(the harness's `miss.lua`). Per repetition it prints the misses served and the user, system
and total CPU time per miss of every process in the target's session, and CPU 0's steal;
then the medians. Needs nginx with the echo module (libnginx-mod-http-echo), wrk, and for a
peer what the harness needs for it. `--floor` measures `examples/miss_floor.rs` too: a
forwarder that does nothing but relay each request and response, the least a miss costs any
proxy on this machine. The scratch directory (the peers' caches) is on
/dev/shm when there is one, as the harness puts its scratch on tmpfs.
"""
import argparse, os, re, shutil, signal, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import HARNESS, free_port, start_nginx_origin, wait_port, write_config  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def session_cpu(sid):
    """(user, system) clock ticks of every process in session `sid`."""
    user = system = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        # The command name may hold spaces: the fields after it are counted from its ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid:
            user += int(fields[11])
            system += int(fields[12])
    return user, system


def steal_cpu0():
    for line in open("/proc/stat"):
        if line.startswith("cpu0 "):
            return int(line.split()[8])
    return 0


def wrk_misses(port, seconds, prefix):
    lua_dir = os.path.join(HARNESS, "lua")
    env = dict(os.environ, BENCH_LUA_DIR=lua_dir, BENCH_MISS_PATH="/slow/4k.bin",
               BENCH_MISS_PREFIX=prefix)
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{seconds}s",
                          "--timeout", "5s", "-s", os.path.join(lua_dir, "miss.lua"),
                          f"http://127.0.0.1:{port}/"],
                         env=env, cwd=lua_dir, capture_output=True, text=True).stdout
    m = re.search(r"(\d+) requests in", out)
    if not m or "Non-2xx" in out or "Socket errors" in out:
        sys.exit(f"wrk against port {port} failed:\n{out}")
    return int(m.group(1))


def wrk_hits(port, seconds):
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c16", f"-d{seconds}s",
                          "--timeout", "5s", f"http://127.0.0.1:{port}/obj/1k.bin"],
                         capture_output=True, text=True).stdout
    m = re.search(r"(\d+) requests in", out)
    if not m or "Non-2xx" in out or "Socket errors" in out:
        sys.exit(f"wrk against port {port} failed:\n{out}")
    return int(m.group(1))


def measure(name, proc, port, a):
    wait_port(port)
    time.sleep(1)
    if a.hits:
        load = lambda seconds, _prefix: wrk_hits(port, seconds)
    else:
        load = lambda seconds, prefix: wrk_misses(port, seconds, prefix)
    load(2, f"{name}-warm-{time.time_ns()}")
    rows = []
    for rep in range(a.reps):
        u0, s0 = session_cpu(proc.pid)
        st0 = steal_cpu0()
        n = load(a.seconds, f"{name}-{rep}-{time.time_ns()}")
        u1, s1 = session_cpu(proc.pid)
        st1 = steal_cpu0()
        per = lambda ticks: ticks / TICK * 1e6 / n
        row = (per(u1 - u0), per(s1 - s0), per(st1 - st0))
        rows.append(row)
        what = "hits" if a.hits else "misses"
        print(f"{name:6} rep {rep + 1}: {n:6} {what}  user {row[0]:6.2f} µs  system "
              f"{row[1]:6.2f} µs  total {row[0] + row[1]:6.2f} µs  (CPU 0 steal {row[2]:5.2f} µs)",
              flush=True)
    return [statistics.median(col) for col in zip(*rows)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--hits", action="store_true",
                    help="1 KiB hits on 16 connections instead of misses on 64")
    ap.add_argument("--peer", action="append", default=[],
                    help="a peer of the harness (../shared/bench/peers/NAME), e.g. nginx, ats")
    ap.add_argument("--floor", help="the miss_floor example's binary, measured as `floor`")
    ap.add_argument("--floor-busy", type=int, default=0,
                    help="µs the floor spins in user space per miss (its BUSY_MICROS)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    a = ap.parse_args()
    # As the harness does, the peers' caches on tmpfs: nginx and Traffic Server write every
    # miss into files, which on a disk's file system costs them several times the CPU.
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    work = tempfile.mkdtemp(prefix="skua-miss-cpu-", dir=shm)
    print(f"scratch in {work}" + ("" if shm else " (no /dev/shm: on disk)"), flush=True)
    os.chmod(work, 0o755)
    docroot = os.path.join(work, "docroot", "obj")
    os.makedirs(docroot)
    for name, size in (("1k.bin", 1024), ("4k.bin", 4096)):
        with open(os.path.join(docroot, name), "wb") as f:
            f.write(os.urandom(size))
    origin_port = free_port()
    origin = start_nginx_origin(origin_port, os.path.join(work, "origin"),
                                os.path.join(work, "docroot"), cpu=1)
    results = {}
    try:
        wait_port(origin_port)
        for name in ["skua"] + a.peer + (["floor"] if a.floor else []):
            port = free_port()
            if name == "floor":
                cmd = [a.floor, str(port), f"127.0.0.1:{origin_port}", str(a.floor_busy)]
                env = os.environ
            elif name == "skua":
                conf = os.path.join(work, "skua.toml")
                write_config(conf, work, port, free_port(), f"127.0.0.1:{origin_port}",
                             1 << 30, "compress = []")
                cmd = [a.binary, "serve", "--config", conf]
                env = os.environ
            else:
                peer_dir = os.path.join(HARNESS, "peers", name)
                peer_work = os.path.join(work, name)
                os.makedirs(peer_work)
                os.chmod(peer_work, 0o777)
                env = dict(os.environ, PORT=str(port), ORIGIN_HOST="127.0.0.1",
                           ORIGIN_PORT=str(origin_port), WORKDIR=peer_work, PEER_DIR=peer_dir,
                           LIB_DIR=os.path.join(HARNESS, "lib"),
                           DOCROOT=os.path.join(work, "docroot"))
                cmd = ["bash", os.path.join(peer_dir, "start.sh")]
            proc = subprocess.Popen(["taskset", "-c", "0"] + cmd, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                results[name] = measure(name, proc, port, a)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
    finally:
        os.killpg(origin.pid, signal.SIGTERM)
        origin.wait()
        shutil.rmtree(work, ignore_errors=True)
    what = "hit" if a.hits else "miss"
    print(f"\nmedians of {a.reps} runs of {a.seconds} s, µs per {what} | user | system | total | steal")
    for name, (user, system, steal) in results.items():
        print(f"{name} | {user:.2f} | {system:.2f} | {user + system:.2f} | {steal:.2f}")


if __name__ == "__main__":
    main()
