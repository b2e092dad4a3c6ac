"""The built-in captioned-shapes source, served over a loopback HTTP server.

`generate_samples` draws coloured shapes on a plain light background and captions
them ("a small red circle", "a blue square to the left of an orange cross");
colour-shape combinations listed in `SourceConfig.heldout` never appear, so the
gallery can prompt them for the zero-shot test. `build_site` lays the images out
as a small web site with planted exact and near duplicates, and `DemoServer`
serves it, together with misbehaving routes (`/bad/...`) that exercise the
crawler's error handling. Everything is deterministic for `SourceConfig.seed`.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import socketserver
import struct
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw
from typing_extensions import Self

from dalle.config import SourceConfig
from dalle.storage import Storage

# Saturated colours whose hues are at least ~25 degrees apart, so that a pixel-level
# detector can tell them apart by nearest colour after anti-aliasing and JPEG.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "orange": (245, 135, 20),
    "yellow": (235, 200, 20),
    "green": (40, 160, 60),
    "cyan": (20, 180, 200),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
BACKGROUND: tuple[int, int, int] = (245, 245, 245)

# Object radius as a fraction of the image side, per size class. The bands do not
# touch, so the size word in a caption is recoverable from the pixels.
SIZE_BANDS: dict[str, tuple[float, float]] = {
    "small": (0.14, 0.18),
    "medium": (0.20, 0.26),
    "large": (0.30, 0.40),
}
# Medium is the unmarked size: its caption carries no size word.
SIZE_WORDS: dict[str, str] = {"small": "small", "medium": "", "large": "large"}
# Two objects must fit side by side with a gap, so pairs use small and medium only,
# and medium capped: 2 * (0.18 + 0.23) + gap + margins <= 1.
PAIR_MAX_RADIUS = 0.23
RELATIONS: dict[str, str] = {
    "above": "above",
    "below": "below",
    "left of": "to the left of",
    "right of": "to the right of",
}
_MARGIN = 0.02  # of the side, between an object and the image border
_GAP = 0.04  # of the side, between the two objects of a pair
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape, in output pixels; every shape fits in the box cx +- radius, cy +- radius."""

    color: str
    shape: str
    size: str  # a key of SIZE_BANDS
    cx: float
    cy: float
    radius: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the square that contains the shape."""
        return (self.cx - self.radius, self.cy - self.radius, self.cx + self.radius, self.cy + self.radius)


@dataclass(frozen=True)
class DemoSample:
    """A generated image with its caption and ground truth; objects[0] stands in `relation` to objects[1]."""

    name: str
    caption: str
    objects: list[ShapeObject]
    relation: str | None
    image: bytes  # PNG


def validate_source(cfg: SourceConfig) -> None:
    """Raise ValueError when the config names a colour or shape this source cannot draw."""
    for kind, names, known in (("colour", cfg.colors, list(COLORS)), ("shape", cfg.shapes, list(SHAPES))):
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(
                f"unknown {kind} {unknown[0]!r} in source config; known {kind}s are: {', '.join(known)}"
            )
    if not cfg.colors or not cfg.shapes:
        raise ValueError("source config needs at least one colour and one shape")


def allowed_combinations(cfg: SourceConfig) -> list[tuple[str, str]]:
    """(colour, shape) pairs that may appear in images: every combination except the held-out ones."""
    validate_source(cfg)
    heldout = {tuple(combo.split()) for combo in cfg.heldout}
    combos = [(c, s) for c in cfg.colors for s in cfg.shapes if (c, s) not in heldout]
    if not combos:
        raise ValueError("every colour-shape combination is held out; remove some from source.heldout")
    return combos


def heldout_prompts(cfg: SourceConfig) -> list[str]:
    """Captions of the held-out combinations ("a red square"), for the zero-shot gallery and eval."""
    validate_source(cfg)
    return [f"{_article(combo)} {combo}" for combo in cfg.heldout]


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def describe(obj: ShapeObject) -> str:
    """Noun phrase of one object: "a small red circle", "an orange square"."""
    words = " ".join(w for w in (SIZE_WORDS[obj.size], obj.color, obj.shape) if w)
    return f"{_article(words)} {words}"


def caption_for(objects: list[ShapeObject], relation: str | None = None) -> str:
    """Caption of one object, or of two objects where objects[0] is `relation` objects[1]."""
    if relation is None:
        if len(objects) != 1:
            raise ValueError(f"a caption without a relation describes one object, got {len(objects)}")
        return describe(objects[0])
    if relation not in RELATIONS or len(objects) != 2:
        raise ValueError(
            f"a relation caption needs two objects and one of {list(RELATIONS)}, got {relation!r}"
        )
    return f"{describe(objects[0])} {RELATIONS[relation]} {describe(objects[1])}"


# --- rendering -----------------------------------------------------------------------


def _draw_shape(draw: ImageDraw.ImageDraw, obj: ShapeObject, scale: float) -> None:
    fill = COLORS[obj.color]
    cx, cy, r = obj.cx * scale, obj.cy * scale, obj.radius * scale
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        # Smaller than its box so that its area stays close to the circle's (2.9 r^2 vs 3.1 r^2).
        h = 0.85 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif obj.shape == "cross":
        w = 0.3 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; known shapes are: {', '.join(SHAPES)}")


def render(objects: list[ShapeObject], image_size: int) -> Image.Image:
    """Draw the objects on the plain background as an RGB image of side `image_size` (anti-aliased)."""
    big = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        _draw_shape(draw, obj, _SUPERSAMPLE)
    return canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# --- generation ----------------------------------------------------------------------


def _rng(seed: int, stream: int) -> np.random.Generator:
    # Separate streams for samples and site layout, so that changing the number of planted
    # duplicates never changes the images themselves. The mask accepts negative seeds.
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, stream])


def _radius(rng: np.random.Generator, size: str, side: int, cap: float = 1.0) -> float:
    lo, hi = SIZE_BANDS[size]
    return float(rng.uniform(lo, min(hi, cap))) * side


def _single(rng: np.random.Generator, combo: tuple[str, str], side: int) -> ShapeObject:
    size = str(rng.choice(list(SIZE_BANDS)))
    r = _radius(rng, size, side)
    lo, hi = _MARGIN * side + r, side - _MARGIN * side - r
    cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
    return ShapeObject(combo[0], combo[1], size, cx, cy, r)


def _pair(
    rng: np.random.Generator, combos: list[tuple[str, str]], relation: str, side: int
) -> tuple[ShapeObject, ShapeObject]:
    """Two non-overlapping objects with objects[0] `relation` objects[1].

    Along the relation's axis the boxes are separated by a gap; across it the centres
    differ by at most half the separation, so the relation is the dominant one.
    """
    picks = rng.choice(len(combos), size=2, replace=False) if len(combos) > 1 else [0, 0]
    sizes = [str(rng.choice(["small", "medium"])) for _ in range(2)]
    radii = [_radius(rng, s, side, cap=PAIR_MAX_RADIUS) for s in sizes]
    margin, gap = _MARGIN * side, _GAP * side
    # "first" has the smaller coordinate along the axis (top or left).
    first = 0 if relation in ("above", "left of") else 1
    r1, r2 = radii[first], radii[1 - first]
    a1 = float(rng.uniform(margin + r1, side - margin - r2 - (r1 + r2 + gap)))
    a2 = float(rng.uniform(a1 + r1 + r2 + gap, side - margin - r2))
    half = (a2 - a1) / 2
    b1 = float(rng.uniform(margin + r1, side - margin - r1))
    b2 = float(rng.uniform(max(margin + r2, b1 - half), min(side - margin - r2, b1 + half)))
    along, across = [0.0, 0.0], [0.0, 0.0]
    along[first], along[1 - first] = a1, a2
    across[first], across[1 - first] = b1, b2
    vertical = relation in ("above", "below")
    objects = []
    for i in range(2):
        cx, cy = (across[i], along[i]) if vertical else (along[i], across[i])
        color, shape = combos[int(picks[i])]
        objects.append(ShapeObject(color, shape, sizes[i], cx, cy, radii[i]))
    return objects[0], objects[1]


def generate_samples(cfg: SourceConfig) -> list[DemoSample]:
    """cfg.num_images distinct captioned images, round(num_images * pair_fraction) of them pairs; same seed, same bytes."""
    combos = allowed_combinations(cfg)
    rng = _rng(cfg.seed, 0)
    side = cfg.image_size
    n_pairs = round(cfg.num_images * cfg.pair_fraction)
    is_pair = np.zeros(cfg.num_images, dtype=bool)
    is_pair[rng.permutation(cfg.num_images)[:n_pairs]] = True
    relations = list(RELATIONS)
    seen: set[bytes] = set()
    samples = []
    for index in range(cfg.num_images):
        # Redraw on the (rare) identical image so that planted duplicates are the only exact ones.
        while True:
            if is_pair[index]:
                relation = relations[int(rng.integers(len(relations)))]
                objects = list(_pair(rng, combos, relation, side))
            else:
                relation = None
                objects = [_single(rng, combos[int(rng.integers(len(combos)))], side)]
            png = _png(render(objects, side))
            digest = hashlib.sha256(png).digest()
            if digest not in seen:
                seen.add(digest)
                break
        samples.append(
            DemoSample(f"img/{index:06d}.png", caption_for(objects, relation), objects, relation, png)
        )
    return samples


# --- the site --------------------------------------------------------------------------


@dataclass
class DemoSite:
    """The demo web site: files by path (no leading '/'), the URL list rows and the planted duplicates."""

    cfg: SourceConfig
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


def build_site(cfg: SourceConfig) -> DemoSite:
    """Generate the samples and lay them out with planted exact (same bytes) and near (resized JPEG) duplicates."""
    samples = generate_samples(cfg)
    rng = _rng(cfg.seed, 1)
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
                _jpeg(image.resize((small, small), Image.Resampling.LANCZOS), quality=90),
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


# --- misbehaving payloads ------------------------------------------------------------------


def _fallback_object(site: DemoSite | None) -> ShapeObject:
    # The images behind test routes must respect the held-out list too.
    color, shape = allowed_combinations(site.cfg)[0] if site is not None else ("blue", "circle")
    side = site.cfg.image_size if site is not None else 64
    return ShapeObject(color, shape, "medium", side / 2, side / 2, 0.25 * side)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=1)
def bomb_png(side: int = 20000) -> bytes:
    """A valid greyscale PNG of side x side zeros (a decompression bomb), a few hundred kB, built in milliseconds."""
    rows_per_block = 200
    if side % rows_per_block:
        raise ValueError(f"bomb side must be a multiple of {rows_per_block}, got {side}")
    # All-zero rows (filter byte 0 + zero pixels) compress to the same bytes every time, and a
    # full flush makes a block independent of what came before: so one block, repeated, is a
    # valid deflate stream of the whole image and only 4 MB ever gets compressed.
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes((side + 1) * rows_per_block)) + compressor.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    raw_len = (side + 1) * side
    adler = ((raw_len % 65521) << 16) | 1  # adler32 of raw_len zero bytes
    idat = b"\x78\xda" + block * (side // rows_per_block) + final + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


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
    """The demo site over loopback HTTP in a daemon thread, with built-in misbehaving `/bad/...` routes.

    Use as a context manager; `requests` counts request paths (without query) so a test can
    assert that an address was never contacted.
    """

    def __init__(
        self,
        site: DemoSite | None,
        host: str = "127.0.0.1",
        port: int = 0,
        robots_txt: str | None = None,
    ):
        self.site = site
        self.robots_txt = robots_txt
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        obj = _fallback_object(site)
        self._image_png = _png(render([obj], site.cfg.image_size if site else 64))
        # Drawn at 256 px: at 64 px the JPEG headers alone are over 40% of the file, and the cut
        # must land in the scan data so that the image opens but fails to decode.
        jpeg = _jpeg(render([ShapeObject(obj.color, obj.shape, obj.size, 128, 128, 64)], 256))
        self._truncated_jpeg = jpeg[: int(len(jpeg) * 0.4)]
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

    def _count(self, path: str) -> None:
        with self._lock:
            self._requests[path] += 1

    def _respond(self, path: str, query: dict[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
        png = {"Content-Type": "image/png"}
        if path == "/robots.txt":
            if self.robots_txt is None:
                return 404, {"Content-Type": "text/plain"}, b"no robots.txt\n"
            return 200, {"Content-Type": "text/plain; charset=utf-8"}, self.robots_txt.encode()
        if path == "/bad/404":
            return 404, {"Content-Type": "text/plain"}, b"not found\n"
        if path == "/bad/500":
            return 500, {"Content-Type": "text/plain"}, b"internal server error\n"
        if path == "/bad/slow":
            try:
                seconds = float(query.get("seconds", ["5"])[0])
            except ValueError:
                return 400, {"Content-Type": "text/plain"}, b"seconds must be a number\n"
            time.sleep(min(max(seconds, 0.0), 600.0))
            return 200, png, self._image_png
        if path == "/bad/not-image":
            return (
                200,
                {"Content-Type": "image/jpeg"},
                b"<!doctype html><html><body>Not an image</body></html>\n",
            )
        if path == "/bad/truncated.jpg":
            return 200, {"Content-Type": "image/jpeg"}, self._truncated_jpeg
        if path == "/bad/bomb.png":
            return 200, png, bomb_png()
        if path == "/bad/noai.png":
            return 200, {**png, "X-Robots-Tag": "noai"}, self._image_png
        if path == "/bad/redirect":
            target = query.get("to", [None])[0]
            if not target:
                return 400, {"Content-Type": "text/plain"}, b"redirect needs ?to=URL\n"
            return 302, {"Location": target, "Content-Type": "text/plain"}, b""
        if path == "/bad/empty":
            return 200, png, b""
        if path.startswith("/private/"):
            return 200, png, self._image_png
        if self.site is not None and path.lstrip("/") in self.site.files:
            body, content_type = self.site.files[path.lstrip("/")]
            return 200, {"Content-Type": content_type}, body
        return 404, {"Content-Type": "text/plain"}, b"not found\n"

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _serve(self, with_body: bool) -> None:
                parts = urlsplit(self.path)
                server._count(parts.path)
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


def main(argv: list[str] | None = None) -> None:
    """Serve the demo site until Ctrl-C and write its URL list to OUT/urls.parquet."""
    import argparse

    from dalle.config import load_config

    parser = argparse.ArgumentParser(prog="python -m dalle.data.sources", description=main.__doc__)
    parser.add_argument("--out", required=True, help="folder (or s3://bucket/prefix) for urls.parquet")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free port)")
    parser.add_argument("--config", default=None, help="run configuration YAML; its `source` section is used")
    args = parser.parse_args(argv)
    site = build_site(load_config(args.config).source)
    with DemoServer(site, port=args.port) as server:
        uri = write_url_list(url_table(site, server.base_url), f"{args.out.rstrip('/')}/urls.parquet")
        print(f"serving {len(site.files)} images at {server.base_url}; URL list written to {uri}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
