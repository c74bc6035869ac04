#!/usr/bin/env python3
"""Hits under many bans: memory-hit req/s on one 1 KiB page with no bans, then with 10,000
prefix bans (`PURGE` + `Skua-Purge-Prefix: 1`) on the page's own host, none covering it.

A Python origin serves the page; Skua (release, one worker thread, pinned to CPU 0) sits in
front; wrk (pinned to CPU 1, -t1 -c64) drives the hot page. Runs alternate between a fresh
Skua with no bans and one given the bans, `--reps` times each, and print the medians.

    python3 benches/bans.py [--bans 10000] [--reps 3] [--seconds 5] [--bin target/release/skua]
"""
import argparse, http.client, os, statistics

from benchlib import PinnedSkua, fixed_page, start_origin, wrk_rate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = b"x" * 1024





def run(binary, origin, bans, seconds):
    with PinnedSkua(binary, origin, 64 << 20) as skua:
        port = skua.port
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("GET", "/wiki/Main_Page", headers={"Host": "wiki.test"})
        conn.getresponse().read()
        for i in range(bans):
            # Prefixes of several lengths, on the page's host, none a prefix of its path.
            conn.request("PURGE", f"/wiki/Page_{i}/" + "s" * (i % 40),
                         headers={"Host": "wiki.test", "Skua-Purge-Prefix": "1"})
            r = conn.getresponse()
            r.read()
            assert r.status in (200, 204, 404), r.status
        conn.request("GET", "/wiki/Main_Page", headers={"Host": "wiki.test"})
        r = conn.getresponse()
        r.read()
        assert "hit" in (r.getheader("X-Cache-Status") or ""), r.getheader("X-Cache-Status")
        return wrk_rate(port, "/wiki/Main_Page", seconds, ["Host: wiki.test"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bans", type=int, default=10000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "skua"))
    a = ap.parse_args()
    origin = start_origin(fixed_page(PAGE, [("Cache-Control", "max-age=3600")]))
    none, many = [], []
    for rep in range(a.reps):
        none.append(run(a.bin, origin, 0, a.seconds))
        many.append(run(a.bin, origin, a.bans, a.seconds))
        print(f"rep {rep + 1}: no bans {none[-1]:,.0f} req/s, {a.bans} bans {many[-1]:,.0f} req/s",
              flush=True)
    m0, m1 = statistics.median(none), statistics.median(many)
    print(f"median: no bans {m0:,.0f} req/s, {a.bans} bans {m1:,.0f} req/s ({m1 / m0:.3f}x)")


if __name__ == "__main__":
    main()
