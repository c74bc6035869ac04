#!/usr/bin/env python3
"""What an idle keep-alive connection costs a running server in resident memory.

Opens N connections to 127.0.0.1:PORT, sends each one GET PATH over plain HTTP/1.1, HTTPS
(--tls) or HTTP/2 over TLS (--h2), reads the whole answer and keeps the connection open; then
prints how much the anonymous resident memory (RssAnon) of process PID grew, per connection.
Measure a freshly started process: memory freed by an earlier run is reused and hides the cost.

    python3 benches/idle_connections.py --pid $(pgrep -f 'skua serve') --port 28050 -n 2000
    python3 benches/idle_connections.py --pid PID --port 28053 --h2 -n 1000

benches/README.md §30 has the figures for Skua and nginx.
"""
import argparse
import socket
import ssl
import struct
import sys
import time


def rss_anon_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise SystemExit("no RssAnon for pid %d" % pid)


def tls_socket(port, alpn):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([alpn])
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="wiki.test")
    if s.selected_alpn_protocol() != alpn:
        raise SystemExit("the server chose %r, not %r" % (s.selected_alpn_protocol(), alpn))
    return s


def http1(s, path):
    s.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path.encode())
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("closed after %r" % got[:200])
        got += chunk
        end = got.find(b"\r\n\r\n")
        if end < 0:
            continue
        head = got[:end].decode("latin-1").lower()
        if not head.startswith("http/1.1 200"):
            raise SystemExit("answer: %r" % head[:200])
        length = [int(l.split(":")[1]) for l in head.split("\r\n") if l.startswith("content-length:")]
        if not length:
            raise SystemExit("an answer without Content-Length: %r" % head[:200])
        if len(got) >= end + 4 + length[0]:
            return


def h2_frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def h2(s, path):
    def literal(name, value):
        # RFC 7541 §6.2.2: a literal field without indexing, new name, no Huffman coding.
        return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value

    block = (literal(b":method", b"GET") + literal(b":scheme", b"https")
             + literal(b":authority", b"127.0.0.1") + literal(b":path", path.encode()))
    # RFC 9113 §3.4: the preface, then SETTINGS; HEADERS with END_STREAM and END_HEADERS.
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b"") + h2_frame(1, 5, 1, block))
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("closed before the answer ended")
        buf += chunk
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            length, kind, flags = int.from_bytes(buf[:3], "big"), buf[3], buf[4]
            if kind == 4 and not flags & 1:
                s.sendall(h2_frame(4, 1, 0, b""))
            if kind == 7:
                raise SystemExit("GOAWAY")
            if kind == 0 and flags & 1:
                return
            buf = buf[9 + length:]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pid", type=int, required=True, help="the server process to measure")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("-n", type=int, default=2000, help="connections (default 2000)")
    ap.add_argument("--path", default="/obj/1k.bin")
    ap.add_argument("--misses", action="store_true",
                    help="a query string of its own on each connection's path: each one a miss")
    ap.add_argument("--tls", action="store_true", help="HTTPS, HTTP/1.1")
    ap.add_argument("--h2", action="store_true", help="HTTP/2 over TLS")
    a = ap.parse_args()
    before = rss_anon_kib(a.pid)
    held = []
    for i in range(a.n):
        path = "%s?idle=%d" % (a.path, i) if a.misses else a.path
        if a.h2:
            s = tls_socket(a.port, "h2")
            h2(s, path)
        else:
            s = tls_socket(a.port, "http/1.1") if a.tls else socket.create_connection(("127.0.0.1", a.port))
            http1(s, path)
        held.append(s)
    time.sleep(1)
    grown = rss_anon_kib(a.pid) - before
    print("%d idle connections: RssAnon +%d KiB, %d bytes each" % (a.n, grown, grown * 1024 // a.n))
    for s in held:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
