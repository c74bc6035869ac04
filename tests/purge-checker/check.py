"""Randomised purge checker: readers ask Skua for pages in many shapes (methods, encodings,
ranges, conditionals, spellings of the URL) while an editor edits pages at the origin and purges
each edit through Skua in one of every way it takes (URL, absolute form, soft, surrogate key,
xkey, prefix, admin port, HTCP). Once a purge is acknowledged, no request started after it may
be answered with an older version of the page: each one that is, is printed as STALE with what
answered it. Optionally kills (-9) and stops nodes at random and starts them again.

Driven by run.sh, which starts the origin, the nodes and nats-server. Settings by environment:
  NODES       port:admin,... of the nodes Skua listens on (purges go to one at random, or to
              all in a random order with PURGE_ALL=1)
  READ_NODES  indexes into NODES the readers ask (one per reader, round robin)
  CONFIGS     config files of the nodes, when this script is to start them
  CHAOS_NODES indexes of the nodes to kill and restart (none: no restarts)
  UPGRADES    with CHAOS_NODES: replace the node by a zero-downtime upgrade instead (a new
              process with --upgrade, SIGQUIT to the old one after up to two seconds)
  RELOADS     with CHAOS_NODES: send SIGHUP (a reload of the same file) instead
  HTCP        host:port of a node's HTCP receiver (adds HTCP CLR to the purge forms)
  SLACK       seconds after an acknowledgement a purge may still be on its way (a fleet)
  NATS_CMD    the nats-server command line: this script starts it, and stops it (-9 or TERM)
              for 1 to 3 s every 4 to 9 s; a purge acknowledged during an outage (from a tenth
              of a second before it until every node has reconnected) may be on its way until
              REJOIN seconds (default 3) after nats-server is back, as the README's bounds say
  NPAGES      pages (default 8; half the requests go to the first 8)
  STYLE       "wiki": pages are MediaWiki titles (/wiki/Rock_%27n%27_roll_(NNNN)), asked for and
              purged in the spellings a `normalize_path`/`normalize_query` rule makes one
  TLS         port of a node's HTTPS listener: a quarter of the readers ask there (https
              objects, which a purge of either scheme removes with the http ones)
  HOSTS       host names readers and purges use, one object (default wiki.test)
  LOG_DIR     where the nodes' logs go
Arguments: origin port, skua binary, seconds to run. Exits 1 if any answer was stale.
"""
import gzip
import http.client
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter

ORIGIN, SKUA, DURATION = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
NODES = [tuple(map(int, n.split(":"))) for n in os.environ["NODES"].split(",")]
READ_NODES = [int(i) for i in os.environ.get("READ_NODES", "0").split(",")]
CONFIGS = [c for c in os.environ.get("CONFIGS", "").split(",") if c]
CHAOS_NODES = [int(i) for i in os.environ.get("CHAOS_NODES", "").split(",") if i]
UPGRADES = bool(os.environ.get("UPGRADES"))
RELOADS = bool(os.environ.get("RELOADS"))
HTCP = os.environ.get("HTCP", "")
SLACK = float(os.environ.get("SLACK", "0"))
PURGE_ALL = bool(os.environ.get("PURGE_ALL"))
NPAGES = int(os.environ.get("NPAGES", "8"))
LOG_DIR = os.environ.get("LOG_DIR", ".")
TLS = int(os.environ.get("TLS", "0"))
STYLE = os.environ.get("STYLE", "")
HOSTS = os.environ.get("HOSTS", "wiki.test").split(",")
WIKI_TITLE = "/wiki/Rock_%27n%27_roll_({})"
PAGES = [(WIKI_TITLE if STYLE == "wiki" else "/p/{}").format("%04d" % i) for i in range(NPAGES)]
VERSION = re.compile(rb"v=(\d{6})")

acks = {p: [] for p in PAGES}  # (acknowledged at + SLACK, version, how)
acks_lock = threading.Lock()
records = []
records_lock = threading.Lock()
stop = False
procs = [None] * len(CONFIGS)
NATS_CMD = os.environ.get("NATS_CMD", "")
REJOIN = float(os.environ.get("REJOIN", "3"))
outages = []  # (down at, back at) of nats-server
nats = None


def pick(rnd):
    return PAGES[rnd.randrange(min(8, NPAGES))] if rnd.random() < 0.5 else rnd.choice(PAGES)


def number(page):
    return re.search(r"\d{4}", page).group(0)


def spellings(page):
    """Spellings Skua keys as one object: RFC 3986 §6.2.2's, and with STYLE=wiki the ones
    MediaWiki reads as one title (a `normalize_path = "mediawiki"` rule) and tracking
    parameters (a `normalize_query` rule that drops them)."""
    n = number(page)
    escaped_digit = "%s%%%02X" % (n[:-1], ord(n[-1]))
    if STYLE != "wiki":
        return [page, page + "?", "/p/" + escaped_digit, "/p/./" + n, "/q/../p/" + n]
    title = "/wiki/Rock_{}n{}_roll_{}{}{}"
    return [page, page + "?", page + "?utm_source=news&utm_medium=mail", page + "?fbclid=x1",
            title.format("'", "'", "(", n, ")"),
            title.format("%27", "%27", "%28", n, "%29"),
            title.format("%27", "'", "(", escaped_digit, "%29") + "?utm_campaign=c",
            "/wiki/./Rock_%27n%27_roll_(" + n + ")"]


def tag(page):
    return "page-p-" + number(page)


def kind(page):
    """What the origin sends for a page (see origin.py)."""
    return int(number(page)) % 4


def observe(resp, body, sent_inm):
    """The version an answer shows, and an error if it contradicts itself."""
    etag_version = None
    etag = resp.getheader("etag")
    if etag:
        m = re.search(r"v(\d+)", etag)
        etag_version = int(m.group(1)) if m else None
    if resp.status == 304:
        m = re.search(r"v(\d+)", sent_inm or "")
        return (int(m.group(1)) if m else None), None
    body_version = None
    coding = resp.getheader("content-encoding")
    if body:
        if coding == "gzip" and resp.status == 200:
            try:
                body = gzip.decompress(body)
            except Exception as e:
                return None, "gzip does not decode: %s" % e
        elif coding:
            body = None  # brotli: the ETag tells the version
        if body:
            versions = set(VERSION.findall(body))
            if len(versions) > 1:
                return None, "a body of several versions %s" % versions
            if versions:
                body_version = int(versions.pop())
    if body_version is not None and etag_version is not None and body_version != etag_version:
        return body_version, "body v%d under ETag v%d" % (body_version, etag_version)
    return (body_version if body_version is not None else etag_version), None


def connect(port, tls):
    if tls:
        return http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                           context=ssl._create_unverified_context())
    return http.client.HTTPConnection("127.0.0.1", port, timeout=10)


def url(rnd, page):
    """An absolute URL of `page`, as a purge names it: either scheme, any host and spelling."""
    scheme = rnd.choice(["http", "https"])
    return "%s://%s%s" % (scheme, rnd.choice(HOSTS), rnd.choice(spellings(page)))


def reader(seed):
    rnd = random.Random(seed)
    tls = bool(TLS) and seed % 4 == 3
    port = TLS if tls else NODES[READ_NODES[seed % len(READ_NODES)]][0]
    conn = connect(port, tls)
    while not stop:
        page = pick(rnd)
        target = rnd.choice(spellings(page))
        method = "HEAD" if rnd.random() < 0.15 else "GET"
        headers = {"Host": rnd.choice(HOSTS)}
        coding = rnd.choice([None, "gzip", "br", "gzip, deflate, br", "identity"])
        if coding:
            headers["Accept-Encoding"] = coding
        if rnd.random() < 0.2:
            first = rnd.randrange(0, 3900)
            headers["Range"] = "bytes=%d-%d" % (first, first + rnd.randrange(130, 190))
        inm = None
        if rnd.random() < 0.2:
            with acks_lock:
                current = acks[page][-1][1] if acks[page] else 0
            v = max(0, current - rnd.randrange(0, 3))
            inm = rnd.choice(['"v%d"' % v, 'W/"v%d"' % v, 'W/"v%dgz"' % v])
            headers["If-None-Match"] = inm
        if rnd.random() < 0.1:
            headers["Cookie"] = "foo=bar"
        if rnd.random() < 0.05:
            headers["Cache-Control"] = "no-cache"
        started = time.time()
        try:
            conn.request(method, target, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except Exception as e:
            conn.close()
            conn = connect(port, tls)
            with records_lock:
                records.append((page, started, None, "failed: %r" % e, headers, target, method, None))
            continue
        version, error = observe(resp, body if method == "GET" else None, inm)
        answer = (resp.status, resp.getheader("x-cache-status"), resp.getheader("cache-status"),
                  resp.getheader("etag"), resp.getheader("content-encoding"))
        with records_lock:
            records.append((page, started, version, error, headers, target, method, answer))
        if (resp.getheader("connection") or "").lower() == "close":
            conn.close()
            conn = connect(port, tls)


def edit(page):
    c = http.client.HTTPConnection("127.0.0.1", ORIGIN, timeout=10)
    c.request("POST", "/__edit" + page)
    v = int(c.getresponse().read())
    c.close()
    return v


def purge_at(page, how, rnd, node):
    port, admin = node
    if how == "htcp":
        subprocess.run([SKUA, "purge", "--htcp", HTCP, url(rnd, page)],
                       check=True, capture_output=True)
        time.sleep(0.3)  # no acknowledgement: a UDP packet
        return 200
    if how == "admin":
        c = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
        c.request("POST", "/purge?url=" + urllib.parse.quote(url(rnd, page), safe=""),
                  headers={"Skua-Purge": "1"})
    else:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Host": rnd.choice(HOSTS)}
        target = rnd.choice(spellings(page))
        if how == "absolute":
            target = url(rnd, page)
        elif how == "soft":
            headers["Skua-Soft-Purge"] = "1"
        elif how == "key":
            target, headers["Surrogate-Key"] = "/", tag(page)
        elif how == "xkey":
            target, headers["xkey-purge"] = "/", tag(page)
        elif how == "prefix":
            headers["Skua-Purge-Prefix"] = "1"
        c.request("PURGE", target, headers=headers)
    r = c.getresponse()
    r.read()
    c.close()
    return r.status


def purge(page, how, rnd):
    nodes = NODES[:] if PURGE_ALL else [rnd.choice(NODES)]
    rnd.shuffle(nodes)
    statuses = [purge_at(page, how, rnd, node) for node in nodes]
    return max(statuses)


def editor(seed):
    rnd = random.Random(seed)
    while not stop:
        page = pick(rnd)
        hows = ["plain", "absolute", "key", "xkey", "prefix", "admin"]
        if HTCP and (UPGRADES or RELOADS or not CHAOS_NODES):
            hows.append("htcp")  # a packet sent while the node is down is lost, by design
        if kind(page) != 1:
            hows.append("soft")  # kind 1 allows stale-while-revalidate: stale may be served
        how = rnd.choice(hows)
        v = edit(page)
        while True:
            try:
                status = purge(page, how, rnd)
                break
            except OSError:
                time.sleep(0.05)  # a node is down: the purge is sent again
        if status not in (200, 204, 404):
            print("purge %s %s answered %d" % (how, page, status), flush=True)
        with acks_lock:
            acks[page].append((time.time() + SLACK, v, how))
        time.sleep(rnd.random() * 0.3)


def start_node(i, upgrade=False):
    log = open(os.path.join(LOG_DIR, "node-%d.log" % i), "a")
    procs[i] = subprocess.Popen([SKUA, "serve", "--config", CONFIGS[i]] +
                                (["--upgrade"] if upgrade else []), stdout=log,
                                stderr=subprocess.STDOUT)
    if upgrade:
        return
    for _ in range(400):
        try:
            c = http.client.HTTPConnection("127.0.0.1", NODES[i][1], timeout=1)
            c.request("GET", "/readyz")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)


def chaos(seed):
    rnd = random.Random(seed)
    while not stop:
        time.sleep(0.5 + rnd.random() if RELOADS else 3 + rnd.random() * 5)
        i = rnd.choice(CHAOS_NODES)
        if RELOADS:
            procs[i].send_signal(signal.SIGHUP)
            continue
        if UPGRADES:
            old = procs[i]
            start_node(i, upgrade=True)
            time.sleep(rnd.random() * 2)
            print("node %d: upgraded at %.3f" % (i, time.time()), flush=True)
            old.send_signal(signal.SIGQUIT)
            threading.Thread(target=old.wait).start()
            continue
        sig = rnd.choice([signal.SIGKILL, signal.SIGTERM])
        print("node %d: %s at %.3f" % (i, sig.name, time.time()), flush=True)
        procs[i].send_signal(sig)
        procs[i].wait()
        start_node(i)


def start_nats():
    global nats
    log = open(os.path.join(LOG_DIR, "nats.log"), "a")
    nats = subprocess.Popen(NATS_CMD.split(), stdout=log, stderr=subprocess.STDOUT)
    port = int(NATS_CMD.split("-p ")[1].split()[0])
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)


def nats_chaos(seed):
    rnd = random.Random(seed)
    while not stop:
        time.sleep(4 + rnd.random() * 5)
        if stop:
            break
        down = time.time()
        nats.send_signal(rnd.choice([signal.SIGKILL, signal.SIGTERM]))
        nats.wait()
        print("nats-server: down at %.3f" % down, flush=True)
        time.sleep(1 + rnd.random() * 2)
        start_nats()
        outages.append((down, time.time()))
        print("nats-server: back at %.3f" % outages[-1][1], flush=True)


def main():
    global stop
    if NATS_CMD:
        start_nats()
    for i in range(len(CONFIGS)):
        start_node(i)
    threads = [threading.Thread(target=reader, args=(i,)) for i in range(12)]
    threads.append(threading.Thread(target=editor, args=(99,)))
    if CHAOS_NODES:
        threads.append(threading.Thread(target=chaos, args=(5,)))
    if NATS_CMD:
        threads.append(threading.Thread(target=nats_chaos, args=(7,)))
    for t in threads:
        t.start()
    time.sleep(DURATION)
    stop = True
    for t in threads:
        t.join()
    for p in procs:
        p.terminate()
        p.wait()
    if nats:
        nats.terminate()
        nats.wait()
    # A purge acknowledged during a bus outage reaches the others once the bus is back.
    for page in acks:
        for i, (at, v, how) in enumerate(acks[page]):
            for (down, back) in outages:
                if down - 0.1 <= at - SLACK <= back + REJOIN:
                    acks[page][i] = (max(at, back + REJOIN), v, how)
    stale = 0
    for (page, started, version, error, headers, target, method, answer) in records:
        if error and not error.startswith("failed"):
            stale += 1
            print("WRONG %s: %s %s %s %s %s" % (page, error, method, target, headers, answer))
        if version is None:
            continue
        need = max([(v, how, at) for (at, v, how) in acks[page] if at < started],
                   default=(0, "", 0))
        if version < need[0]:
            stale += 1
            print("STALE %s at %.3f: v%d, v%d purged (%s) %.3f s before the request: %s %s %s %s"
                  % (page, started, version, need[0], need[1], started - need[2], method, target,
                     headers, answer))
    print("requests %d, edits %d, stale or wrong %d" % (
        len(records), sum(len(a) for a in acks.values()), stale))
    print("answered by:", Counter((r[7][1] if r[7] else "failed") for r in records).most_common())
    sys.exit(1 if stale else 0)


main()
