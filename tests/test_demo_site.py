"""The captioned-shapes demo world and site: generation, site layout and the loopback server
(with the crawler tests' misbehaving routes from hostile_routes)."""

from __future__ import annotations

import http.client
import io
import itertools
import socket
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from hostile_routes import hostile_server
from PIL import Image, UnidentifiedImageError

from demo.site import DemoServer, build_site, url_table, write_url_list
from demo.world import (
    COLORS,
    SIZE_BANDS,
    WorldConfig,
    allowed_combinations,
    generate_samples,
    heldout_prompts,
    render,
)

SMALL = {
    "num_images": 120,
    "image_size": 64,
    "exact_duplicates": 6,
    "near_duplicates": 6,
    "pair_fraction": 0.3,
}


@pytest.fixture(scope="module")
def cfg() -> WorldConfig:
    return WorldConfig(**SMALL, shapes=["circle", "square", "triangle", "cross", "diamond"])


@pytest.fixture(scope="module")
def site(cfg):
    return build_site(cfg)


@pytest.fixture(scope="module")
def server(site):
    with hostile_server(site, robots_txt="User-agent: *\nDisallow: /private/\n") as srv:
        yield srv


def get(server: DemoServer, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    # http.client, not urllib: no redirect following and no proxy from the environment.
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


# --- generation --------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_images(cfg, site):
    again = generate_samples(cfg)
    assert [(s.name, s.caption, s.image) for s in again] == [
        (s.name, s.caption, s.image) for s in site.samples
    ]
    other = generate_samples(cfg.model_copy(update={"seed": cfg.seed + 1}))
    assert [s.image for s in other] != [s.image for s in site.samples]
    assert sum(a.image == b.image for a, b in zip(other, site.samples)) == 0


def test_site_layout_is_deterministic(cfg, site):
    again = build_site(cfg)
    assert again.rows == site.rows
    assert again.planted_exact == site.planted_exact and again.planted_near == site.planted_near
    assert {p: body for p, (body, _) in again.files.items()} == {
        p: body for p, (body, _) in site.files.items()
    }


def test_generated_images_are_distinct_and_sized(cfg, site):
    assert len(site.samples) == cfg.num_images
    assert len({s.image for s in site.samples}) == cfg.num_images
    assert Image.open(io.BytesIO(site.samples[0].image)).size == (cfg.image_size, cfg.image_size)


def test_no_heldout_combination_anywhere(cfg, site):
    heldout = set(cfg.heldout)
    for sample in site.samples:
        for obj in sample.objects:
            assert f"{obj.color} {obj.shape}" not in heldout, sample
        for combo in heldout:
            assert combo not in sample.caption, sample.caption
    # Every allowed combination does appear, so the held-out ones are the only gaps.
    seen = {(o.color, o.shape) for s in site.samples for o in s.objects}
    assert seen == set(allowed_combinations(cfg))


def test_heldout_prompts_use_articles():
    cfg = WorldConfig(heldout=["red square", "orange cross"])
    assert heldout_prompts(cfg) == ["a red square", "an orange cross"]


def test_captions_name_colour_shape_and_size(site):
    for sample in site.samples:
        for obj in sample.objects:
            assert f"{obj.color} {obj.shape}" in sample.caption  # "red cross" in "three red crosses" too
            lo, hi = SIZE_BANDS[obj.size]
            assert lo * 64 - 1e-6 <= obj.radius <= hi * 64 + 1e-6
            if obj.size in ("small", "large") and sample.kind != "count":
                assert f"{obj.size} {obj.color} {obj.shape}" in sample.caption


def test_every_kind_of_scene_in_its_share_with_objects_apart(cfg, site):
    from collections import Counter

    kinds = Counter(s.kind for s in site.samples)
    assert kinds["relation"] == round(cfg.num_images * cfg.pair_fraction)
    assert kinds["two"] == round(cfg.num_images * cfg.two_fraction)
    assert kinds["count"] == round(cfg.num_images * cfg.count_fraction)
    for sample in site.samples:
        if sample.kind == "count":
            assert 2 <= len(sample.objects) <= cfg.max_count
            assert len({(o.color, o.shape) for o in sample.objects}) == 1
        if sample.kind in ("count", "two"):
            for a, b in itertools.combinations(sample.objects, 2):
                # Their boxes apart by a gap: a detector can count them.
                assert max(abs(a.cx - b.cx), abs(a.cy - b.cy)) >= a.radius + b.radius + 0.05 * cfg.image_size
            for o in sample.objects:
                assert (
                    o.radius <= o.cx <= cfg.image_size - o.radius
                    and o.radius <= o.cy <= cfg.image_size - o.radius
                )


def test_pairs_share_and_relation_matches_geometry(cfg, site):
    pairs = [s for s in site.samples if s.relation is not None]
    assert len(pairs) == round(cfg.num_images * cfg.pair_fraction)
    assert {s.relation for s in pairs} == {"above", "below", "left of", "right of"}
    for sample in pairs:
        a, b = sample.objects
        phrase = {
            "above": "above",
            "below": "below",
            "left of": "to the left of",
            "right of": "to the right of",
        }
        assert f" {phrase[sample.relation]} " in sample.caption
        dx, dy = b.cx - a.cx, b.cy - a.cy  # image y grows downwards
        gap_y = abs(dy) - a.radius - b.radius
        gap_x = abs(dx) - a.radius - b.radius
        if sample.relation in ("above", "below"):
            assert (dy > 0) == (sample.relation == "above"), sample
            assert gap_y > 0 and abs(dx) <= abs(dy) / 2, sample
        else:
            assert (dx > 0) == (sample.relation == "left of"), sample
            assert gap_x > 0 and abs(dy) <= abs(dx) / 2, sample
        for obj in (a, b):
            left, top, right, bottom = obj.box
            assert left >= 0 and top >= 0 and right <= cfg.image_size and bottom <= cfg.image_size


def test_pixels_match_ground_truth(cfg, site):
    for sample in site.samples[:40]:
        pixels = decode(sample.image)
        assert np.array_equal(pixels, np.asarray(render(sample.objects, cfg.image_size), dtype=np.int16))
        for obj in sample.objects:
            centre = pixels[int(obj.cy), int(obj.cx)]
            assert np.abs(centre - np.array(COLORS[obj.color])).max() <= 12, (sample.caption, obj, centre)


def test_unknown_colour_or_shape_is_named():
    with pytest.raises(ValueError, match="'magenta'.*red"):
        generate_samples(WorldConfig(colors=["red", "magenta"], heldout=[]))
    with pytest.raises(ValueError, match="'star'.*circle"):
        generate_samples(WorldConfig(shapes=["circle", "star"], heldout=[]))


# --- site --------------------------------------------------------------------------------


def test_rows_list_every_file_once_in_shuffled_order(site):
    paths = [p for p, _ in site.rows]
    assert sorted(paths) == sorted(site.files)
    assert paths != sorted(paths)
    for path, caption in site.rows:
        assert caption == site.sample_for(path).caption


def test_planted_exact_duplicates_are_identical_bytes(cfg, site):
    assert len(site.planted_exact) == cfg.exact_duplicates
    captions = dict(site.rows)
    for dup, original in site.planted_exact:
        assert dup != original
        assert site.files[dup][0] == site.files[original][0]
        assert captions[dup] == captions[original]


def test_planted_near_duplicates_look_the_same_but_differ(cfg, site):
    assert len(site.planted_near) == cfg.near_duplicates
    captions = dict(site.rows)
    for dup, original in site.planted_near:
        body, content_type = site.files[dup]
        assert content_type == "image/jpeg" and body != site.files[original][0]
        assert captions[dup] == captions[original]
        image = Image.open(io.BytesIO(body))
        assert image.format == "JPEG" and 0.7 * cfg.image_size <= image.size[0] <= 0.9 * cfg.image_size
        back = np.asarray(
            image.convert("RGB").resize((cfg.image_size,) * 2, Image.Resampling.LANCZOS), np.int16
        )
        assert np.abs(back - decode(site.files[original][0])).mean() < 6


def test_url_list_round_trips_through_parquet(site, tmp_path):
    table = url_table(site, "http://127.0.0.1:8000/")
    assert table.column_names == ["url", "caption"]
    assert table.column("url")[0].as_py() == f"http://127.0.0.1:8000/{site.rows[0][0]}"
    uri = write_url_list(table, str(tmp_path / "lists" / "urls.parquet"))
    assert pq.read_table(uri).equals(table)


# --- server ------------------------------------------------------------------------------


def test_serves_site_images(server, site):
    path = site.rows[0][0]
    status, headers, body = get(server, "/" + path)
    assert status == 200 and body == site.files[path][0]
    assert headers["content-type"] == site.files[path][1]
    original = site.samples[0]
    status, _, body = get(server, "/" + original.name)
    assert Image.open(io.BytesIO(body)).size == (site.cfg.image_size, site.cfg.image_size)
    assert get(server, "/img/999999.png")[0] == 404


def test_request_counter_counts_paths_without_query(server):
    before = server.count("/bad/404")
    get(server, "/bad/404")
    get(server, "/bad/404?x=1")
    assert server.count("bad/404") == before + 2
    assert server.requests["/never/asked"] == 0
    assert "/never/asked" not in server.requests


def test_status_routes(server):
    assert get(server, "/bad/404")[0] == 404
    assert get(server, "/bad/500")[0] == 500


def test_not_image_is_html_labelled_as_jpeg(server):
    status, headers, body = get(server, "/bad/not-image")
    assert status == 200 and headers["content-type"] == "image/jpeg" and body.lstrip().startswith(b"<")
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(body))


def test_truncated_jpeg_opens_but_fails_to_decode(server):
    status, headers, body = get(server, "/bad/truncated.jpg")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(body))
    assert image.format == "JPEG"
    with pytest.raises(OSError, match="(?i)truncated"):
        image.load()


def test_bomb_declares_a_huge_size_in_a_small_body(server, monkeypatch):
    status, headers, body = get(server, "/bad/bomb.png")
    assert status == 200 and headers["content-type"] == "image/png"
    assert len(body) < 1_000_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(body))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    image = Image.open(io.BytesIO(body))
    assert image.size == (20000, 20000) and image.mode == "L"


def test_noai_header_on_a_valid_png(server):
    status, headers, body = get(server, "/bad/noai.png")
    assert status == 200 and headers["x-robots-tag"] == "noai"
    assert Image.open(io.BytesIO(body)).format == "PNG"


def test_redirect_answers_302_with_location(server):
    target = server.url("img/000000.png")
    status, headers, _ = get(server, f"/bad/redirect?to={target}")
    assert status == 302 and headers["location"] == target


def test_empty_body(server):
    status, headers, body = get(server, "/bad/empty")
    assert status == 200 and headers["content-type"] == "image/png" and body == b""


def test_private_and_robots(server, site):
    status, _, body = get(server, "/private/anything.png")
    assert status == 200 and Image.open(io.BytesIO(body)).size == (site.cfg.image_size,) * 2
    status, _, body = get(server, "/robots.txt")
    assert status == 200 and b"Disallow: /private/" in body
    with hostile_server(None) as bare:
        assert get(bare, "/robots.txt")[0] == 404
        assert get(bare, "/img/000000.png")[0] == 404
        assert get(bare, "/bad/500")[0] == 500


def test_plain_server_serves_only_the_site_and_robots(site):
    with DemoServer(site, robots_txt="User-agent: *\nDisallow: /private/\n") as plain:
        assert get(plain, "/" + site.samples[0].name)[0] == 200
        assert get(plain, "/robots.txt")[0] == 200
        assert get(plain, "/bad/500")[0] == 404
        assert get(plain, "/private/anything.png")[0] == 404


def test_slow_route_waits_then_serves_an_image(server):
    start = time.monotonic()
    status, _, body = get(server, "/bad/slow?seconds=0.3")
    assert time.monotonic() - start >= 0.3
    assert status == 200 and Image.open(io.BytesIO(body)).format == "PNG"


def test_close_does_not_wait_for_a_slow_handler():
    srv = hostile_server(None)
    sock = socket.create_connection((srv.host, srv.port))
    sock.sendall(b"GET /bad/slow?seconds=30 HTTP/1.0\r\n\r\n")
    deadline = time.monotonic() + 5
    while srv.count("/bad/slow") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.count("/bad/slow") == 1
    closer = threading.Thread(target=srv.close)
    start = time.monotonic()
    closer.start()
    closer.join(timeout=5)
    assert not closer.is_alive() and time.monotonic() - start < 2
    sock.close()


def test_server_is_quiet(site, capfd):
    with hostile_server(site) as srv:
        get(srv, "/" + site.samples[0].name)
        get(srv, "/bad/404")
        # A client that hangs up mid-request must not print a traceback either.
        sock = socket.create_connection((srv.host, srv.port))
        sock.sendall(b"GET /bad/slow?seconds=0.2 HTTP/1.0\r\n\r\n")
        sock.close()
        time.sleep(0.4)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
