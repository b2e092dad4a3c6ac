"""A fence for tests that use host names: no DNS query and no connection beyond loopback, in this
process and (through `sitecustomize_dir`) in every Python process started below it, img2dataset's
workers included.

A name the code under test fails to map would otherwise be asked of the machine's resolver (a packet
to a nameserver), and an address it fails to refuse would be connected to. With the fence, such a
lookup or connect fails at once, is written to the fence's log, and the test sees it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from pathlib import Path

_LOCAL_NAMES = ("localhost",)  # answered by /etc/hosts, no packet


def _ip(host: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if isinstance(host, bytes):
        host = host.decode("ascii", errors="replace")
    if not isinstance(host, str):
        return None
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _is_loopback(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def install(log_path: str | os.PathLike, setattr: Callable = setattr) -> None:
    """Fence this process; what the fence stops is appended to `log_path`, one line each.
    `setattr` may be pytest's monkeypatch.setattr, so that the fence is lifted after the test."""
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def note(what: str) -> None:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"{os.getpid()} {what}\n")

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        local = host is None or _ip(host) is not None or str(host).lower() in _LOCAL_NAMES
        if not local and not flags & socket.AI_NUMERICHOST:
            note(f"dns {host!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"loopback fence: no DNS query for {host!r}")
        return real_getaddrinfo(host, port, family, type, proto, flags)

    def check(sock: socket.socket, address) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
            return
        ip = _ip(address[0])
        if ip is None or not _is_loopback(ip):
            note(f"connect {address[0]!r}")
            raise ConnectionRefusedError(f"loopback fence: no connection to {address[0]!r}")

    def connect(self, address):
        check(self, address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(self, address)
        return real_connect_ex(self, address)

    setattr(socket, "getaddrinfo", getaddrinfo)
    setattr(socket.socket, "connect", connect)
    setattr(socket.socket, "connect_ex", connect_ex)


def sitecustomize_dir(folder: Path, log_path: Path) -> Path:
    """A folder holding a sitecustomize.py that fences each Python process which has it on PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    here = str(Path(__file__).resolve().parent)
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {here!r})\n"
        "import loopback_fence\n"
        f"loopback_fence.install({str(log_path)!r})\n"
        f"sys.path.remove({here!r})\n"
    )
    return folder
