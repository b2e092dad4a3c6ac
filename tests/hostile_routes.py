"""Misbehaving routes for the crawler's tests, served next to a demo site by DemoServer:
errors, a slow answer, a page that claims to be an image, a truncated JPEG, a decompression
bomb, a `noai` header, redirects, an empty body and a /private/ folder for robots.txt."""

from __future__ import annotations

import functools
import struct
import time
import zlib

from demo.site import DemoServer, DemoSite, Response
from demo.world import ShapeObject, allowed_combinations, jpeg_bytes, png_bytes, render


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


class HostileRoutes:
    """The `/bad/...` and `/private/...` routes; any other path is left to the site."""

    def __init__(self, site: DemoSite | None):
        obj = _fallback_object(site)
        self.image_png = png_bytes(render([obj], site.cfg.image_size if site else 64))
        # Drawn at 256 px: at 64 px the JPEG headers alone are over 40% of the file, and the cut
        # must land in the scan data so that the image opens but fails to decode.
        jpeg = jpeg_bytes(render([ShapeObject(obj.color, obj.shape, obj.size, 128, 128, 64)], 256))
        self.truncated_jpeg = jpeg[: int(len(jpeg) * 0.4)]

    def __call__(self, path: str, query: dict[str, list[str]]) -> Response | None:
        png = {"Content-Type": "image/png"}
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
            return 200, png, self.image_png
        if path == "/bad/not-image":
            return (
                200,
                {"Content-Type": "image/jpeg"},
                b"<!doctype html><html><body>Not an image</body></html>\n",
            )
        if path == "/bad/truncated.jpg":
            return 200, {"Content-Type": "image/jpeg"}, self.truncated_jpeg
        if path == "/bad/bomb.png":
            return 200, png, bomb_png()
        if path == "/bad/noai.png":
            return 200, {**png, "X-Robots-Tag": "noai"}, self.image_png
        if path == "/bad/redirect":
            target = query.get("to", [None])[0]
            if not target:
                return 400, {"Content-Type": "text/plain"}, b"redirect needs ?to=URL\n"
            return 302, {"Location": target, "Content-Type": "text/plain"}, b""
        if path == "/bad/empty":
            return 200, png, b""
        if path.startswith("/private/"):
            return 200, png, self.image_png
        return None


def hostile_server(site: DemoSite | None, **kwargs) -> DemoServer:
    """A DemoServer for `site` (or none) that also serves the misbehaving routes."""
    return DemoServer(site, routes=HostileRoutes(site), **kwargs)
