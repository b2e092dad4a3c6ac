"""The demo web site: the captioned-shapes world laid out as files with planted exact and near
duplicates, and `DemoServer`, which serves it over loopback HTTP so that the demo's crawl is a
real one. Tests add their misbehaving routes through `routes` (tests/hostile_routes.py).
"""

from __future__ import annotations

import http.server
import io
import socketserver
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
from PIL import Image
from typing_extensions import Self

from dalle.storage import Storage
from demo.world import DemoSample, WorldConfig, generate_samples, jpeg_bytes, seeded_rng

# (status, headers, body) of an answer; a route answers None for a path it does not serve.
Response = tuple[int, dict[str, str], bytes]
Route = Callable[[str, dict[str, list[str]]], "Response | None"]


# --- the site --------------------------------------------------------------------------


@dataclass
class DemoSite:
    """The demo web site: files by path (no leading '/'), the URL list rows and the planted duplicates."""

    cfg: WorldConfig
    samples: list[DemoSample]
    files: dict[str, tuple[bytes, str]]  # path -> (body, content type)
    rows: list[tuple[str, str]]  # (path, caption) in URL-list order
    planted_exact: list[tuple[str, str]]  # (duplicate path, original path)
    planted_near: list[tuple[str, str]]
    originals: dict[str, DemoSample] = field(default_factory=dict)  # original path -> sample

    def sample_for(self, path: str) -> DemoSample:
        """The generated sample behind a path, following a planted duplicate to its original."""
        path = path.lstrip("/")
        if path in self.originals:
            return self.originals[path]
        for dup, original in self.planted_exact + self.planted_near:
            if dup == path:
                return self.originals[original]
        raise KeyError(f"{path!r} is not a file of the demo site")


def build_site(cfg: WorldConfig) -> DemoSite:
    """Generate the samples and lay them out with planted exact (same bytes) and near (resized JPEG) duplicates."""
    samples = generate_samples(cfg)
    rng = seeded_rng(cfg.seed, 1)
    files = {s.name: (s.image, "image/png") for s in samples}
    originals = {s.name: s for s in samples}
    captions = {s.name: s.caption for s in samples}
    n = len(samples)
    wanted = cfg.exact_duplicates + cfg.near_duplicates
    # Distinct originals while there are enough, so each planted duplicate has its own cluster.
    picks = rng.choice(n, size=wanted, replace=wanted > n)
    # Copies continue the numbering of the originals: nothing in a path gives a duplicate away.
    next_index = n
    planted_exact, planted_near = [], []
    for i, pick in enumerate(picks):
        original = samples[int(pick)]
        if i < cfg.exact_duplicates:
            path = f"img/{next_index:06d}.png"
            files[path] = (original.image, "image/png")
            planted_exact.append((path, original.name))
        else:
            side = cfg.image_size
            small = max(8, round(side * float(rng.uniform(0.75, 0.9))))
            image = Image.open(io.BytesIO(original.image)).convert("RGB")
            path = f"img/{next_index:06d}.jpg"
            files[path] = (
                jpeg_bytes(image.resize((small, small), Image.Resampling.LANCZOS), quality=90),
                "image/jpeg",
            )
            planted_near.append((path, original.name))
        captions[path] = original.caption
        next_index += 1
    order = rng.permutation(len(files))
    paths = list(files)
    rows = [(paths[int(i)], captions[paths[int(i)]]) for i in order]
    return DemoSite(cfg, samples, files, rows, planted_exact, planted_near, originals)


def url_table(site: DemoSite, base_url: str) -> pa.Table:
    """The URL list (columns url, caption) in site.rows order, pointing at a server at `base_url`."""
    base = base_url.rstrip("/")
    return pa.table(
        {
            "url": pa.array([f"{base}/{path}" for path, _ in site.rows], pa.string()),
            "caption": pa.array([caption for _, caption in site.rows], pa.string()),
        }
    )


def write_url_list(table: pa.Table, uri: str) -> str:
    """Write the URL list as Parquet to a full file URI (local path or s3://bucket/key.parquet); returns it."""
    folder, sep, name = uri.rstrip("/").rpartition("/")
    if not sep:
        folder = "."
    if not name or folder.endswith(":/"):
        raise ValueError(f"{uri!r} must name a file, e.g. /tmp/run/urls.parquet or s3://bucket/urls.parquet")
    return Storage(folder or "/").write_table(name, table)


# --- the server ------------------------------------------------------------------------------


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a handler still sleeping in /bad/slow never holds up close()

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks socket.getfqdn for a name: a reverse DNS query that
        # could leave the machine (127.0.0.2 is in no hosts file). The name is never used.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), port

    def handle_error(self, request, client_address) -> None:
        # Clients that time out and hang up are part of the tests; their broken pipes are not news.
        pass


class DemoServer:
    """The demo site over loopback HTTP in a daemon thread; `routes`, when given, answers first.

    Use as a context manager; `requests` counts request paths (without query) so a test can
    assert that an address was never contacted, and `host_headers` counts the Host headers sent.
    """

    def __init__(
        self,
        site: DemoSite | None,
        host: str = "127.0.0.1",
        port: int = 0,
        robots_txt: str | None = None,
        routes: Route | None = None,
    ):
        self.site = site
        self.robots_txt = robots_txt
        self.routes = routes
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self._host_headers: Counter[str | None] = Counter()
        self._httpd = _QuietServer((host, port), self._handler_class())
        self.host, self.port = self._httpd.server_address[:2]
        self.base_url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="demo-server", daemon=True
        )
        self._closed = False
        self._thread.start()

    def url(self, path: str) -> str:
        """Absolute URL of a site path ("img/000001.png" or "/bad/404")."""
        return f"{self.base_url}/{path.lstrip('/')}"

    @property
    def requests(self) -> Counter[str]:
        """A snapshot of request counts by path, e.g. requests["/img/000001.png"]."""
        with self._lock:
            return Counter(self._requests)

    @property
    def host_headers(self) -> Counter[str | None]:
        """A snapshot of request counts by Host header (None: a request without one)."""
        with self._lock:
            return Counter(self._host_headers)

    def count(self, path: str) -> int:
        """How many requests reached `path` (with or without the leading '/', query ignored)."""
        with self._lock:
            return self._requests["/" + urlsplit(path).path.lstrip("/")]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count(self, path: str, host: str | None = None) -> None:
        with self._lock:
            self._requests[path] += 1
            self._host_headers[host] += 1

    def _respond(self, path: str, query: dict[str, list[str]]) -> Response:
        if self.routes is not None:
            answer = self.routes(path, query)
            if answer is not None:
                return answer
        if path == "/robots.txt":
            if self.robots_txt is None:
                return 404, {"Content-Type": "text/plain"}, b"no robots.txt\n"
            return 200, {"Content-Type": "text/plain; charset=utf-8"}, self.robots_txt.encode()
        if self.site is not None and path.lstrip("/") in self.site.files:
            body, content_type = self.site.files[path.lstrip("/")]
            return 200, {"Content-Type": content_type}, body
        return 404, {"Content-Type": "text/plain"}, b"not found\n"

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _serve(self, with_body: bool) -> None:
                parts = urlsplit(self.path)
                server._count(parts.path, self.headers.get("Host"))
                status, headers, body = server._respond(parts.path, parse_qs(parts.query))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def do_GET(self) -> None:
                self._serve(with_body=True)

            def do_HEAD(self) -> None:
                self._serve(with_body=False)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler
