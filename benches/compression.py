#!/usr/bin/env python3
"""Compression at the edge: memory per stored page and hit req/s, with `[cache] compress`
on (the default, ["br", "gzip"]) and off ([]).

A Python origin serves wiki-like HTML pages (16 KiB of words drawn from a 2,000-word
vocabulary, uncompressed, `Vary: Accept-Encoding`, as MediaWiki sends them without PHP output
compression); Skua (release, one worker thread, pinned to CPU 0) stores 2,000 of them for a
browser (`Accept-Encoding: gzip, deflate, br`), then `wrk -t1 -c64` (pinned to CPU 1) hits one
of them with the same header. Runs alternate off/on, `--reps` times each; medians printed.

    python3 benches/compression.py [--reps 3] [--pages 2000] [--seconds 5]
"""
import argparse, http.client, http.server, os, random, re, statistics, sys

from benchlib import PinnedSkua, start_origin, wrk_rate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BROWSER = "gzip, deflate, br"


def make_page(seed):
    rnd = random.Random(seed)
    words = [("".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9))))
             for _ in range(2000)]
    rnd = random.Random(seed + 1)
    out, size = [], 0
    while size < 16384:
        para = "<p>" + " ".join(rnd.choice(words) for _ in range(40)) + "</p>\n"
        out.append(para)
        size += len(para)
    return "".join(out).encode()[:16384]


PAGES = {}


class Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        digits = re.search(r"(\d+)$", self.path)
        n = int(digits.group(1)) if digits else 0
        body = PAGES.setdefault(n % 50, make_page(n % 50))
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=UTF-8")
        self.send_header("Cache-Control", "s-maxage=86400, must-revalidate, max-age=0")
        self.send_header("Vary", "Accept-Encoding, Cookie")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def metric(admin, series):
    conn = http.client.HTTPConnection("127.0.0.1", admin)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    sys.exit(f"no {series}")


def run(binary, origin, compress, pages, seconds):
    with PinnedSkua(binary, origin, 256 << 20, "compress = %s" % compress) as skua:
        conn = http.client.HTTPConnection("127.0.0.1", skua.port)
        for i in range(pages):
            conn.request("GET", f"/wiki/Page_{i}", headers={"Host": "wiki.test", "Accept-Encoding": BROWSER})
            conn.getresponse().read()
        stored = metric(skua.admin, 'skua_cache_bytes{tier="memory"}')
        objects = metric(skua.admin, 'skua_cache_objects{tier="memory"}')
        rate = wrk_rate(skua.port, "/wiki/Page_7", seconds,
                        ["Host: wiki.test", f"Accept-Encoding: {BROWSER}"])
        return stored / objects, rate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pages", type=int, default=2000)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "skua"))
    a = ap.parse_args()
    origin = start_origin(Origin)
    results = {"[]": [], '["br", "gzip"]': []}
    for rep in range(a.reps):
        for setting in results:
            per_page, rate = run(a.bin, origin, setting, a.pages, a.seconds)
            results[setting].append((per_page, rate))
            print(f"rep {rep + 1} compress = {setting}: {per_page:,.0f} bytes/page, {rate:,.0f} req/s",
                  flush=True)
    for setting, runs in results.items():
        print(f"median compress = {setting}: {statistics.median(r[0] for r in runs):,.0f} bytes/page, "
              f"{statistics.median(r[1] for r in runs):,.0f} req/s")


if __name__ == "__main__":
    main()
