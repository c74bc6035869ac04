#!/usr/bin/env python3
"""Fleet purge figures: purge reach time over the NATS JetStream bus, and catch-up time.

Starts a nats-server (JetStream, temp store) and three release `skua serve` nodes on
loopback ports (A and B memory only, C with a disk tier), then
  1. sends 1,000 PURGEs to A, paced at about 1,000/s, and reads `skua_purge_reach_seconds`
     on B and C (p50/p99 interpolated within buckets, as Prometheus' histogram_quantile does);
  2. stops C, sends 100,000 PURGEs to A, starts C again and times start -> /readyz 200
     (C has applied every purge it missed).
Needs nats-server on PATH and `cargo build --release`.

    python3 benches/fleet.py [--missed 100000] [--reach 1000]
"""
import argparse, http.client, os, signal, socket, subprocess, sys, tempfile, threading, time

from benchlib import free_port, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "skua")


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.01)
    raise SystemExit(f"nothing listening on {port}")


def get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", path)
    r = c.getresponse()
    body = r.read().decode()
    c.close()
    return r.status, body


def metrics(node):
    return get(node["admin"], "/metrics")[1]


def metric(node, series):
    for line in metrics(node).splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def histogram(node, name):
    buckets = []
    for line in metrics(node).splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    return buckets


def quantile(q, buckets):
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-9)
        prev_le, prev_count = le, count
    return prev_le


class Node:
    def __init__(self, name, nats_url, work, disk):
        self.name = name
        self.port, self.admin = free_port(), free_port()
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, exist_ok=True)
        disk_lines = f'[cache.disk]\npath = "{self.dir}/disk"\nsize = 1073741824\n' if disk else ""
        self.config = os.path.join(self.dir, "skua.toml")
        bus = f'[purge.bus]\nservers = ["{nats_url}"]\nnode = "{name}"\n'
        write_config(self.config, self.dir, self.port, self.admin, "127.0.0.1:9", 67108864,
                     disk_lines + bus)
        self.proc = None

    def __getitem__(self, k):
        return getattr(self, k)

    def start(self):
        self.started = time.time()
        self.proc = subprocess.Popen([BIN, "serve", "--config", self.config],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        wait_port(self.admin)

    def wait_ready(self, timeout=600):
        end = time.time() + timeout
        while time.time() < end:
            try:
                if get(self.admin, "/readyz")[0] == 200:
                    return time.time() - self.started
            except OSError:
                pass
            time.sleep(0.005)
        raise SystemExit(f"{self.name} never became ready")

    def stop(self):
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
            self.proc = None


def purge_many(port, paths, pace=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for i, p in enumerate(paths):
        c.request("PURGE", p, headers={"Host": "wiki.test"})
        c.getresponse().read()
        if pace:
            time.sleep(pace)
    c.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reach", type=int, default=1000)
    ap.add_argument("--missed", type=int, default=100000)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="skua-fleet-bench-")
    nats_port = free_port()
    nats = subprocess.Popen(["nats-server", "-js", "-a", "127.0.0.1", "-p", str(nats_port),
                             "-sd", os.path.join(work, "nats")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(nats_port)
    url = f"nats://127.0.0.1:{nats_port}"
    a, b, c = Node("a", url, work, False), Node("b", url, work, False), Node("c", url, work, True)
    try:
        for n in (a, b, c):
            n.start()
            n.wait_ready()
        # 1. reach time
        purge_many(a.port, [f"/wiki/Reach_{i}" for i in range(args.reach)], pace=0.001)
        series = 'skua_purges_total{result="not_found",source="bus"}'
        end = time.time() + 30
        while time.time() < end and min(metric(b, series), metric(c, series)) < args.reach:
            time.sleep(0.05)
        print(f"reach: {args.reach} purges sent to A at ~1000/s")
        merged = None
        for n in (b, c):
            h = histogram(n, "skua_purge_reach_seconds")
            merged = h if merged is None else [(le, x + y[1]) for (le, x), y in zip(merged, h)]
            print(f"  node {n.name}: applied {metric(n, series):.0f}, "
                  f"p50 {quantile(0.5, h) * 1000:.2f} ms, p99 {quantile(0.99, h) * 1000:.2f} ms")
        print(f"  both: p50 {quantile(0.5, merged) * 1000:.2f} ms, "
              f"p99 {quantile(0.99, merged) * 1000:.2f} ms")
        # 2. catch-up
        c.stop()
        t0 = time.time()
        threads = []
        per = args.missed // 4
        for t in range(4):
            paths = [f"/wiki/Missed_{t}_{i}" for i in range(per)]
            th = threading.Thread(target=purge_many, args=(a.port, paths))
            th.start()
            threads.append(th)
        for th in threads:
            th.join()
        total = args.reach + per * 4
        while metric(a, "skua_purge_bus_published_total") < total:
            time.sleep(0.05)
        print(f"catch-up: {per * 4} purges sent to A and published in {time.time() - t0:.1f} s "
              f"while C was down")
        c.start()
        listening = time.time() - c.started
        ready = c.wait_ready()
        applied = metric(c, series)
        print(f"  C listening after {listening * 1000:.0f} ms, caught up (/readyz 200) after "
              f"{ready:.2f} s; bus purges applied in all {applied:.0f}; "
              f"{per * 4 / max(ready, 1e-9):.0f} purges/s")
    finally:
        for n in (a, b, c):
            try:
                n.stop()
            except Exception:
                pass
        nats.kill()


if __name__ == "__main__":
    main()
