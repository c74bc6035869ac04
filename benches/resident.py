#!/usr/bin/env python3
"""Resident memory of Skua binaries after the same small workload: 2,000 pages of 4 KiB filled,
one purge, 3 s of wrk hits, a metrics scrape and the dashboard page; then RssFile (mapped
code and data) and RssAnon from /proc/<pid>/status. Used to see what the hot-code layout and
LTO keep resident (benches/README.md section 3).

    python3 benches/resident.py target/release/skua [other binaries...]
"""
import http.client, os, re, sys, urllib.request

from benchlib import PinnedSkua, fixed_page, start_origin, wrk_rate


def main():
    origin = start_origin(fixed_page(b"x" * 4096, [("Cache-Control", "s-maxage=3600")]))
    for _ in range(2):
        for binary in sys.argv[1:]:
            with PinnedSkua(binary, origin, 64 << 20) as skua:
                conn = http.client.HTTPConnection("127.0.0.1", skua.port)
                for i in range(2000):
                    conn.request("GET", f"/p{i}", headers={"Host": "wiki.test"})
                    conn.getresponse().read()
                conn.request("PURGE", "/p1", headers={"Host": "wiki.test"})
                conn.getresponse().read()
                wrk_rate(skua.port, "/p2", 3, ["Host: wiki.test"])
                for page in ("metrics", ""):
                    urllib.request.urlopen(f"http://127.0.0.1:{skua.admin}/{page}").read()
                status = open(f"/proc/{skua.proc.pid}/status").read()
                kib = lambda field: int(re.search(rf"{field}:\s+(\d+)", status).group(1))
                print(f"{binary}: file {kib('RssFile') / 1024:.1f} MiB, "
                      f"anon {kib('RssAnon') / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
