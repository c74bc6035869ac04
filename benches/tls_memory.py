#!/usr/bin/env python3
"""Resident memory after the harness's many-keys workload (10,000 pages of 4 KiB filled, then
3 x 5 s of load cycling over them) three ways: plain HTTP with no [server.tls], HTTPS/1.1
(wrk -c64), and HTTP/2 (h2load, 16 connections x 32 streams; filled over HTTPS/1.1), each on a fresh process with a 1 GiB
memory tier, one worker thread pinned to CPU 0, the clients on CPU 1. #19 asks that HTTPS cost
no more than 5 MiB of RSS over plain HTTP (benches/README.md section 14).

    python3 benches/tls_memory.py target/release/skua [rounds]

Needs wrk, h2load and openssl (apt-get install wrk nghttp2-client openssl).
"""
import os, re, subprocess, sys, tempfile

from benchlib import PinnedSkua, fixed_page, free_port, start_origin, wait_port

PAGES = 10_000
MEMORY = 1 << 30


def certificate(work):
    cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


def wrk_pages(url, seconds, conns, lua):
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s",
                          "-s", lua, url], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        sys.exit(f"errors under load:\n{out}")


def h2load_pages(url_list, seconds):
    out = subprocess.run(["taskset", "-c", "1", "h2load", "-c16", "-m32", "-D", str(seconds),
                          "-i", url_list], capture_output=True, text=True, check=True).stdout
    failed = re.search(r"(\d+) failed", out)
    if failed is None or failed.group(1) != "0":
        sys.exit(f"errors under load:\n{out}")


def rss_mib(pid):
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


def main():
    binary = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    work = tempfile.mkdtemp()
    cert, key = certificate(work)
    origin = start_origin(fixed_page(b"x" * 4096, [("Cache-Control", "public, max-age=3600")]))
    lua = os.path.join(work, "pages.lua")
    with open(lua, "w") as f:
        f.write(f"""local reqs, i = {{}}, 0
function init(args)
  for k = 0, {PAGES - 1} do reqs[k] = wrk.format("GET", string.format("/pages/p%05d.html", k)) end
end
function request()
  local r = reqs[i]
  i = (i + 1) % {PAGES}
  return r
end
""")
    for _ in range(rounds):
        for mode in ("plain", "https", "h2"):
            tls_port = None
            extra = ""
            if mode != "plain":
                tls_port = free_port()
                extra = f"""[server.tls]
listen = ["127.0.0.1:{tls_port}"]
[[server.tls.certificate]]
chain = "{cert}"
key = "{key}"
"""
            with PinnedSkua(binary, origin, MEMORY, extra) as skua:
                port = tls_port or skua.port
                if tls_port:
                    wait_port(tls_port)
                scheme = "http" if mode == "plain" else "https"
                base = f"{scheme}://127.0.0.1:{port}"
                # Fills over HTTP/1.1 (h2load's -i gives each connection the list from its
                # start, so a timed run does not reach every page), then the load.
                for _ in range(3):
                    wrk_pages(base + "/", 2, 32, lua)
                if mode == "h2":
                    urls = os.path.join(work, "urls.txt")
                    with open(urls, "w") as f:
                        f.writelines(f"{base}/pages/p{k:05d}.html\n" for k in range(PAGES))
                    for _ in range(3):
                        h2load_pages(urls, 5)
                else:
                    for _ in range(3):
                        wrk_pages(base + "/", 5, 64, lua)
                print(f"{mode:6} RSS {rss_mib(skua.proc.pid):.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
