"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 endpoint (moto's server in the tests).

Each request draws from a seeded random schedule (`random.Random(seed)`, the seed is logged) whether it
is forwarded untouched or meets one fault:

- ``500``: HTTP 500 with an S3 ``InternalError`` XML body, not forwarded;
- ``503``: HTTP 503 with an S3 ``SlowDown`` XML body, not forwarded;
- ``reset_before``: the connection is reset (RST) before the request reaches the server;
- ``reset_after``: the request is forwarded (the server acts on it), then the connection is reset
  instead of answering;
- ``stall``: the request is forwarded, then nothing is sent for `stall_s` seconds (longer than the
  client's read timeout) and the connection is closed;
- ``truncate``: the answer's headers announce the whole body (Content-Length N), fewer bytes follow,
  then the connection is closed. Only for answers with a body; others get ``reset_after``.

`counts` holds how many faults of each kind were injected, so a test can assert each happened.
"""

from __future__ import annotations

import http.client
import http.server
import logging
import random
import socket
import struct
import threading
from collections import Counter
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

FAULT_KINDS = ("500", "503", "reset_before", "reset_after", "stall", "truncate")

_ERROR_BODIES = {
    500: b"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>InternalError</Code><Message>We encountered "
    b"an internal error. Please try again.</Message></Error>",
    503: b"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>SlowDown</Code><Message>Please reduce your "
    b"request rate.</Message></Error>",
}


class FaultyS3Proxy:
    """A threaded proxy on 127.0.0.1 that forwards to `upstream` and injects faults at `rate` (0..1),
    spread evenly over `kinds`. `url` is its endpoint; `close()` stops it."""

    def __init__(
        self,
        upstream: str,
        rate: float = 0.3,
        seed: int | None = None,
        stall_s: float = 3.0,
        kinds: tuple[str, ...] = FAULT_KINDS,
    ):
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; choose from {FAULT_KINDS}")
        self.seed = random.randrange(2**32) if seed is None else seed
        log.warning("faulty S3 proxy: seed %d, fault rate %.2f, kinds %s", self.seed, rate, kinds)
        self.rate = rate
        self.kinds = kinds
        self.stall_s = stall_s
        self.counts: Counter[str] = Counter()
        self.requests = 0
        self.enabled = True
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        target = urlsplit(upstream)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):
                pass

            def _reset(self) -> None:
                # SO_LINGER with a zero timeout: close() sends RST, not FIN.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._draw()
                if fault == "reset_before":
                    self._reset()
                    return
                if fault in ("500", "503"):
                    status = int(fault)
                    payload = _ERROR_BODIES[status]
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    headers["Host"] = target.netloc
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    status, answer_headers = response.status, response.getheaders()
                finally:
                    conn.close()
                if fault == "truncate" and (self.command == "HEAD" or len(data) < 2):
                    fault = "reset_after"
                proxy._count(fault)
                if fault == "reset_after":
                    self._reset()
                    return
                if fault == "stall":
                    proxy._stop.wait(proxy.stall_s)
                    self.close_connection = True
                    self.connection.close()
                    return
                self.send_response(status)
                for key, value in answer_headers:
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == "truncate":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_WR)
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _draw(self) -> str | None:
        """The fault for the next request (None: forward it untouched); counts the ones decided here."""
        with self._lock:
            self.requests += 1
            if not self.enabled or self._rng.random() >= self.rate:
                return None
            fault = self._rng.choice(self.kinds)
        if fault in ("500", "503", "reset_before"):
            self._count(fault)
        return fault

    def _count(self, fault: str | None) -> None:
        if fault is not None:
            with self._lock:
                self.counts[fault] += 1

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
