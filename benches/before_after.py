#!/usr/bin/env python3
"""Hit-path speed of two Skua binaries side by side: memory-hit req/s on one 1 KiB page, asked
three ways (a plain GET, a GET with cookies the key ignores, a GET whose target needs
normalising), so that a change to the request path shows up against the binary before it.

A Python origin serves the page with `Vary: Accept-Encoding, Cookie` (as MediaWiki does); Skua
(one worker thread, pinned to CPU 0) sits in front; wrk (pinned to CPU 1, -t1 -c64) drives
each spelling after one request has filled it. The binaries alternate, each run a fresh Skua,
`--reps` times, and the medians are printed with the ratio after/before.

    python3 benches/before_after.py --before /tmp/skua-before --after target/release/skua \
        [--reps 5] [--seconds 5] [--only plain|cookies|encoded]
"""
import argparse, http.client, os, statistics

from benchlib import PinnedSkua, fixed_page, start_origin, wrk_rate

PAGE = b"x" * 1024
HOST = "Host: wiki.test"
# (name, path, extra request headers)
SPELLINGS = [
    ("plain", "/wiki/Main_Page", []),
    ("cookies", "/wiki/Main_Page", ["Cookie: skin=vector; _ga=GA1.2.3.4; lang=en"]),
    ("encoded", "/wiki/%4Dain_Page?", []),
]


def fill(port, path, headers):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    fields = dict(h.split(": ", 1) for h in [HOST] + headers)
    for _ in range(2):
        conn.request("GET", path, headers=fields)
        r = conn.getresponse()
        r.read()
    status = r.getheader("X-Cache-Status") or ""
    if "hit" not in status:
        raise SystemExit(f"{path} {headers}: not a hit after a fill ({status})")


def cpu_seconds(pid):
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(binary, origin, seconds, spellings):
    with PinnedSkua(binary, origin, 64 << 20) as skua:
        rates, cpu = {}, {}
        for name, path, headers in spellings:
            fill(skua.port, path, headers)
            start = cpu_seconds(skua.proc.pid)
            rates[name] = wrk_rate(skua.port, path, seconds, [HOST] + headers)
            # Skua's own CPU per request: steadier than req/s on a VM whose neighbours vary.
            cpu[name] = (cpu_seconds(skua.proc.pid) - start) / (rates[name] * seconds) * 1e6
        return rates, cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--only", choices=[n for n, _, _ in SPELLINGS], help="one spelling alone")
    a = ap.parse_args()
    spellings = [s for s in SPELLINGS if a.only in (None, s[0])]
    origin = start_origin(fixed_page(PAGE, [("Cache-Control", "s-maxage=3600"),
                                            ("Vary", "Accept-Encoding, Cookie")]))
    rates = {"before": [], "after": []}
    cpus = {"before": [], "after": []}
    for rep in range(a.reps):
        for which in ("before", "after"):
            rate, cpu = run(getattr(a, which), origin, a.seconds, spellings)
            rates[which].append(rate)
            cpus[which].append(cpu)
            shown = ", ".join(f"{n} {rate[n]:,.0f} req/s {cpu[n]:.2f} us" for n in rate)
            print(f"rep {rep + 1} {which}: {shown}", flush=True)
    for name, _, _ in spellings:
        before = statistics.median(r[name] for r in rates["before"])
        after = statistics.median(r[name] for r in rates["after"])
        cpu_before = statistics.median(c[name] for c in cpus["before"])
        cpu_after = statistics.median(c[name] for c in cpus["after"])
        print(f"median {name}: before {before:,.0f}, after {after:,.0f} req/s "
              f"({after / before:.3f}x); CPU per hit before {cpu_before:.2f}, "
              f"after {cpu_after:.2f} us ({cpu_after / cpu_before:.3f}x)")


if __name__ == "__main__":
    main()
