"""Versioned origin for the purge checker (check.py), on the port given.

GET or HEAD /p/NNNN (or any path whose decoded form holds the number once, such as
/wiki/Rock_%27n%27_roll_(NNNN): the page /p/NNNN, however the proxy spelled it): a 4 KiB text
page whose every 64-byte line names the page and its version, with a strong ETag "vN", a Surrogate-Key "page-p-NNNN all" and Vary: Accept-Encoding.
What else it sends depends on the page number modulo 4:
  0  s-maxage=300
  1  max-age=300, stale-while-revalidate=30 (a soft purge may serve it stale)
  2  s-maxage=300, and gzip when the request takes it (ETag "vNgz"), as Apache's mod_deflate
  3  s-maxage=300, must-revalidate, max-age=0 (what MediaWiki sends)
It answers If-None-Match with 304 when a tag names the current version, and a Range with 206
half the time (an origin may ignore Range). Each answer waits up to 30 ms, so that fills race
purges. POST /__edit/p/NNNN makes a new version and answers its number.
"""
import email.utils
import gzip
import random
import re
import socketserver
import sys
import threading
import time
import urllib.parse

versions = {}
lock = threading.Lock()


def page_of(path):
    """The page a path names: the first four digits of its decoded path, or None."""
    m = re.search(r"\d{4}", urllib.parse.unquote(path.split("?")[0]))
    return "/p/" + m.group(0) if m else None


def page_body(page, version):
    line = ("%s v=%06d " % (page, version)).ljust(63, ".") + "\n"
    return (line * 64).encode()


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        while True:
            line = self.rfile.readline()
            if not line:
                return
            method, path = line.split()[0].decode(), line.split()[1].decode()
            headers = {}
            while True:
                h = self.rfile.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                name, _, value = h.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            if length:
                self.rfile.read(length)
            if path.startswith("/__edit/"):
                page = page_of(path[len("/__edit"):])
                with lock:
                    versions[page] = versions.get(page, 0) + 1
                    body = str(versions[page]).encode()
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                continue
            self.answer(method, page_of(path), headers)

    def answer(self, method, page, headers):
        if page is None:
            self.wfile.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        with lock:
            version = versions.get(page, 0)
        time.sleep(random.random() * 0.03)
        kind = int(page[3:]) % 4
        etag = '"v%d"' % version
        fields = ["Content-Type: text/html; charset=utf-8",
                  "Surrogate-Key: page-%s all" % page.strip("/").replace("/", "-"),
                  "Last-Modified: " + email.utils.formatdate(1700000000 + version * 10, usegmt=True),
                  "Vary: Accept-Encoding",
                  "Cache-Control: " + ["s-maxage=300",
                                       "max-age=300, stale-while-revalidate=30",
                                       "s-maxage=300",
                                       "s-maxage=300, must-revalidate, max-age=0"][kind]]
        body = page_body(page, version)
        coded = kind == 2 and "gzip" in headers.get("accept-encoding", "")
        if coded:
            body = gzip.compress(body, mtime=0)
            fields.append("Content-Encoding: gzip")
            etag = '"v%dgz"' % version
        fields.append("ETag: " + etag)
        asked = [t.strip().removeprefix("W/") for t in headers.get("if-none-match", "").split(",")]
        if any(t in ('"v%d"' % version, '"v%dgz"' % version, "*") for t in asked):
            self.wfile.write(("HTTP/1.1 304 Not Modified\r\n" + "\r\n".join(fields) + "\r\n\r\n").encode())
            return
        status = "200 OK"
        ranged = headers.get("range", "")
        if ranged.startswith("bytes=") and not coded and random.random() < 0.5:
            first, _, last = ranged[6:].partition("-")
            try:
                first = int(first)
                last = min(int(last), len(body) - 1) if last else len(body) - 1
                if first <= last < len(body):
                    fields.append("Content-Range: bytes %d-%d/%d" % (first, last, len(body)))
                    body = body[first:last + 1]
                    status = "206 Partial Content"
            except ValueError:
                pass
        fields.append("Content-Length: %d" % len(body))
        head = ("HTTP/1.1 %s\r\n" % status + "\r\n".join(fields) + "\r\n\r\n").encode()
        self.wfile.write(head + (body if method != "HEAD" else b""))


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
