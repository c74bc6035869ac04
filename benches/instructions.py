#!/usr/bin/env python3
"""Instructions per request of Skua binaries, counted by valgrind's callgrind: a measure of CPU
cost that does not move with the machine's noise (on a shared VM, the time per request of one
binary spreads by 10-20 % from one process start to the next; these counts by under 1 %).

Each binary runs under callgrind in front of a Python origin that answers like the
../shared/bench origin (`Cache-Control: public, max-age=3600`, ETag, Last-Modified). A client
on one keep-alive connection fills 1,000 pages of 4 KiB, warms up, and then, with callgrind's
counters zeroed before and dumped after each phase, sends:

  hit1k     2,000 GETs of one 1 KiB object (memory hits)
  manykeys  2,000 GETs spread over the 1,000 pages (memory hits)
  miss      1,000 GETs of new URLs (fetched, stored, delivered)

and prints Skua's instructions per request (all threads, user space; the kernel's work is not
counted). With several binaries it prints the ratio of each to the first. With --disk, Skua
has a disk tier and a memory tier that takes no benchmark object (as config/bench-disk.toml),
so the hits are disk hits, read from the page cache.

    python3 benches/instructions.py /tmp/skua-before target/release/skua [--repeat 2]

Instructions are not time: a cache miss or a lock costs more than its instruction count. Use
this beside the harness (benches/README.md), to see where a change in cost comes from
(`callgrind_annotate` on the dumps kept with --keep DIR).
"""

import argparse, hashlib, http.client, json, os, random, shutil, subprocess, sys, tempfile, time

from benchlib import OriginHandler, free_port, rules_from, start_origin, wait_port, write_config

PHASES = [("hit1k", 2000), ("manykeys", 2000), ("miss", 1000)]


def origin_handler():
    small = os.urandom(1024)
    page = os.urandom(4096)

    class Origin(OriginHandler):
        def do_GET(self):
            body = small if self.path.startswith("/obj/1k") else page
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Cache-Control", "public, max-age=3600")
            self.send_header("ETag", '"%s"' % hashlib.md5(self.path.encode()).hexdigest())
            self.send_header("Last-Modified", "Tue, 01 Dec 2026 10:00:00 GMT")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Origin


def paths(phase, n, tag):
    rng = random.Random(7)
    for i in range(n):
        if phase == "hit1k":
            yield "/obj/1k.bin"
        elif phase in ("fill", "every page"):
            yield f"/pages/p{i:05d}.html"
        elif phase == "manykeys":
            yield f"/pages/p{rng.randrange(1000):05d}.html"
        else:
            yield f"/obj/4k.bin?cb={tag}-{i}"


def send(port, phase, n, tag=""):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for path in paths(phase, n, tag):
        conn.request("GET", path, headers={"Host": "wiki.test", "User-Agent": "instructions"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            sys.exit(f"{path}: status {resp.status}")
    conn.close()


def dump_total(work, pid, before):
    """Waits for the dump callgrind writes after `callgrind_control -d` and returns its total."""
    for _ in range(600):
        dumps = [f for f in os.listdir(work) if f.startswith(f"cg.{pid}.") and f not in before]
        if dumps:
            path = os.path.join(work, dumps[0])
            time.sleep(0.5)
            with open(path) as f:
                for line in f:
                    if line.startswith(("summary:", "totals:")):
                        return int(line.split()[1]), path
        time.sleep(0.1)
    sys.exit("callgrind wrote no dump")


# A memory tier below the smallest object, and a disk tier: every hit is a disk hit.
DISK_TIER = """max_object_size = 512
[cache.disk]
path = "{work}/disk"
size = 1073741824
"""


def wait_disk_writes(admin):
    """Until the disk tier's writer has nothing queued, so that every fill is indexed."""
    for _ in range(600):
        conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=30)
        conn.request("GET", "/stats")
        stats = json.loads(conn.getresponse().read())
        conn.close()
        if stats["tiers"]["disk"]["write_queue_objects"] == 0:
            return
        time.sleep(0.2)
    sys.exit("the disk tier's writer did not finish")


def measure(binary, origin, keep, label, rules=None, disk=False):
    work = tempfile.mkdtemp()
    port, admin = free_port(), free_port()
    config = os.path.join(work, "skua.toml")
    extra = DISK_TIER.format(work=work) if disk else ""
    extra += rules_from(rules, origin) if rules else ""
    write_config(config, work, port, admin, origin, 1 << 30, extra)
    proc = subprocess.Popen(
        # Names written out in every dump, so that `callgrind_annotate` reads a kept phase's
        # dump on its own (compressed, a name is spelled only in the first dump using it).
        ["valgrind", "--tool=callgrind", "--compress-strings=no",
         f"--callgrind-out-file={work}/cg.%p",
         binary, "serve", "--config", config],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        send(port, "fill", 1000)
        send(port, "hit1k", 200)
        if disk:
            wait_disk_writes(admin)
        # Every page is hit once before the measured phases, as a timed run's warm-up does: a
        # stored object's first hit under rules reads the rules' URL conditions once for it.
        send(port, "every page", 1000)
        send(port, "miss", 100, "warm")
        counts = {}
        for phase, n in PHASES:
            subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True,
                           capture_output=True)
            send(port, phase, n, f"m{random.randrange(1 << 30)}")
            before = set(os.listdir(work))
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True,
                           capture_output=True)
            total, path = dump_total(work, proc.pid, before)
            counts[phase] = total / n
            if keep:
                shutil.copy(path, os.path.join(keep, f"{label}-{phase}.callgrind"))
        return counts
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("binaries", nargs="+")
    ap.add_argument("--repeat", type=int, default=1, help="runs per binary, alternating")
    ap.add_argument("--keep", help="directory to keep the callgrind dumps in")
    ap.add_argument("--disk", action="store_true",
                    help="hits from a disk tier (in the page cache) instead of the memory tier")
    ap.add_argument("--rules", help="also measure each binary with this config's [[rule]]s "
                    "(e.g. config/mediawiki.toml), as BINARY+rules")
    args = ap.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed (apt-get install valgrind)")
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    origin = start_origin(origin_handler())
    runs = [(b, None) for b in args.binaries]
    if args.rules:
        runs += [(b, args.rules) for b in args.binaries]
    results = {b + ("+rules" if r else ""): [] for b, r in runs}
    labels = list(results)
    for r in range(args.repeat):
        for i, ((binary, rules), b) in enumerate(zip(runs, labels)):
            counts = measure(binary, origin, args.keep, f"{i}-{r}", rules, args.disk)
            results[b].append(counts)
            print(f"{b} run {r + 1}: " + ", ".join(f"{p} {counts[p]:,.0f}" for p, _ in PHASES),
                  flush=True)
    first = labels[0]
    print("\ninstructions per request (median of runs)" + "".join(f" | {p}" for p, _ in PHASES))
    med = lambda b, p: sorted(c[p] for c in results[b])[len(results[b]) // 2]
    for b in labels:
        cells = []
        for p, _ in PHASES:
            ratio = "" if b == first else f" ({med(b, p) / med(first, p):.3f}x)"
            cells.append(f"{med(b, p):,.0f}{ratio}")
        print(f"{b} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
