"""Helpers shared by the Python benchmark scripts (fleet.py, soak.py)."""
import os, socket


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def write_config(path, work, port, admin, origin, memory, extra=""):
    """A one-thread Skua config at `path` in front of `origin` (ip:port), health checks off."""
    with open(path, "w") as f:
        f.write(f"""[server]
listen = ["127.0.0.1:{port}"]
admin = "127.0.0.1:{admin}"
threads = 1
upgrade_sock = "{work}/upgrade.sock"
[[origin]]
name = "bench"
addresses = ["{origin}"]
[origin.health_check]
enabled = false
[cache]
memory_size = {memory}
{extra}
""")
