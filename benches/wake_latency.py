#!/usr/bin/env python3
"""Round trip between two processes pinned to different CPUs, after an idle gap.

Every proxy sits between wrk and the origin, which the harness pins to the other CPU, so each
miss crosses CPUs four times (client to proxy, proxy to origin and back, proxy to client);
going straight to the origin crosses none. On a VM a CPU that idles halts, and waking it goes
through the hypervisor. This measures what one such round trip costs after an idle gap of the
given length, which is what the miss path's "added latency" pays before any proxy work.

    python3 benches/wake_latency.py            # gaps of 0, 0.5 ms, 5 ms and 50 ms
    python3 benches/wake_latency.py 0.05 400   # one gap, 400 round trips
"""
import os
import socket
import sys
import time


def round_trips(gap, n, here=1, there=0):
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        a.close()
        os.sched_setaffinity(0, {there})
        while b.recv(64):
            b.send(b"y")
        os._exit(0)
    b.close()
    os.sched_setaffinity(0, {here})
    rtt = []
    for _ in range(n):
        time.sleep(gap)
        t0 = time.perf_counter_ns()
        a.send(b"x")
        a.recv(64)
        rtt.append((time.perf_counter_ns() - t0) / 1000)
    a.close()
    os.waitpid(pid, 0)
    rtt.sort()
    return rtt[n // 2], rtt[n * 9 // 10], rtt[n * 99 // 100]


def main():
    gaps = [float(sys.argv[1])] if len(sys.argv) > 1 else [0, 0.0005, 0.005, 0.05]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    for gap in gaps:
        p50, p90, p99 = round_trips(gap, n)
        print("idle gap %6.1f ms: round trip p50 %5.0f µs, p90 %5.0f µs, p99 %5.0f µs"
              % (gap * 1000, p50, p90, p99))


if __name__ == "__main__":
    main()
