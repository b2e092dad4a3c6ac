"""The curation flow end to end under Prefect: the demo source over loopback HTTP, plus
every kind of bad input, into a local folder and into an S3 bucket on moto's server."""

from __future__ import annotations

import hashlib

import pytest
from hostile_routes import hostile_server

from dalle.config import config_from_dict
from dalle.runroot import CURATE_REPORT, CURATED_DIR, CURATED_MANIFEST, SAMPLES_REPORT, latest_checkpoint
from dalle.storage import Storage
from dalle.tokens.loader import read_listed_shards
from demo.site import DemoServer, build_site
from demo.world import world_config

pytestmark = pytest.mark.slow

REPORT_KEYS = {
    "input_rows",
    "downloaded",
    "download_failed",
    "blocked",
    "filtered",
    "duplicates_exact",
    "duplicates_near",
    "kept",
}

CONFIG = {
    "plugins": {"demo": {"num_images": 160, "image_size": 48, "exact_duplicates": 8, "near_duplicates": 8}},
    "crawl": {
        "allow_networks": ["127.0.0.1/32"],
        "processes": 1,
        "threads": 8,
        "timeout_s": 2,
        "samples_per_shard": 64,
    },
    "filter": {"min_side": 24, "min_image_bytes": 20},
    "clip": {
        "small": {
            "image_size": 32,
            "embed_dim": 64,
            "vision_width": 64,
            "vision_layers": 2,
            "patch_size": 8,
            "text_width": 64,
            "text_layers": 2,
        }
    },
    "train_clip": {"max_steps": 300, "warmup_steps": 15, "checkpoint_every": 300},
    "dedup": {"vectors": "clip_tokens", "near_threshold": 0.95},
}


def _csv_field(value: bytes) -> bytes:
    return b'"' + value.replace(b'"', b'""') + b'"'


@pytest.fixture(scope="module")
def demo(learning_seed):
    """The demo site on 127.0.0.1, a second server on 127.0.0.2 that must never be contacted."""
    cfg = config_from_dict({**CONFIG, "train_clip": {**CONFIG["train_clip"], "seed": learning_seed}})
    site = build_site(world_config(cfg))
    robots = "User-agent: *\nDisallow: /private/\n"
    with hostile_server(site, robots_txt=robots) as server, DemoServer(site, host="127.0.0.2") as forbidden:
        yield cfg, site, server, forbidden


def write_url_list(tmp_path, site, server, forbidden) -> tuple[str, dict[str, str]]:
    """A CSV URL list: the demo rows plus one row per kind of bad input; returns the path and
    the expected (fate, reason) of each bad URL."""
    good_image = server.url(site.rows[0][0])
    bad = [
        (server.url("/bad/404"), b"a red circle", ("download_failed", "http_404")),
        (server.url("/bad/500"), b"a red circle", ("download_failed", "http_500")),
        (server.url("/bad/slow?seconds=6"), b"a red circle", ("download_failed", "timeout")),
        (server.url("/bad/not-image"), b"a red circle", ("filtered", "not_an_image")),
        (server.url("/bad/truncated.jpg"), b"a red circle", ("filtered", "corrupt_image")),
        (server.url("/bad/bomb.png"), b"a red circle", ("filtered", "decompression_bomb")),
        (server.url("/bad/empty"), b"a red circle", ("filtered", "image_too_few_bytes")),
        (server.url("/bad/noai.png"), b"a red circle", ("blocked", "x_robots_tag")),
        (server.url("/private/secret.png"), b"a red circle", ("blocked", "robots_txt")),
        (forbidden.url(site.rows[1][0]), b"a red circle", ("blocked", "blocked_address")),
        (
            server.url(f"/bad/redirect?to={forbidden.url(site.rows[2][0])}"),
            b"a red circle",
            ("blocked", "blocked_address"),
        ),
        ("file:///etc/passwd", b"a red circle", ("blocked", "scheme_not_allowed")),
        ("not a url at all", b"a red circle", ("blocked", "malformed_url")),
        (good_image + "?empty", b"", ("filtered", "caption_empty")),
        (good_image + "?long", b"word " * 2000, ("filtered", "caption_too_long")),
        (good_image + "?latin1", b"caf\xe9 cr\xe8me", ("filtered", "caption_not_utf8")),
        (good_image, b"a repeated url", ("duplicate_exact", "repeated_url")),
    ]
    lines = [b"url,caption"]
    lines += [
        _csv_field(server.url(path).encode()) + b"," + _csv_field(caption.encode())
        for path, caption in site.rows
    ]
    lines += [_csv_field(url.encode()) + b"," + _csv_field(caption) for url, caption, _ in bad]
    path = tmp_path / "urls.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path), {url: expected for url, _, expected in bad}


# The near-duplicate checks rest on the small CLIP the flow trains: the local run is a learning test.
@pytest.mark.parametrize("where", [pytest.param("local", marks=pytest.mark.learning), "s3"])
def test_curate_flow_end_to_end(where, demo, tmp_path, prefect_server, request):
    from flows.curate import curate_flow

    cfg, site, server, forbidden = demo
    root = str(tmp_path / "run") if where == "local" else request.getfixturevalue("s3_bucket") + "/runs/demo"
    urls, expected_bad = write_url_list(tmp_path, site, server, forbidden)
    before = server.requests

    report = curate_flow(urls, root, cfg.model_dump(mode="json"))

    assert set(report) == REPORT_KEYS
    storage = Storage(root)
    assert storage.read_json(CURATE_REPORT) == report
    ledger = storage.read_table(SAMPLES_REPORT).to_pylist()
    total_rows = len(site.rows) + len(expected_bad)
    assert report["input_rows"] == total_rows
    assert sorted(e["input_row"] for e in ledger) == list(range(total_rows)), "every input row has one fate"

    # Every bad input is counted under its own reason, and nothing reached 127.0.0.2.
    by_url = {}
    for entry in ledger:
        by_url.setdefault(entry["url"], []).append(entry)
    for url, (fate, reason) in expected_bad.items():
        got = {(e["fate"], e["reason"]) for e in by_url[url]}
        assert (fate, reason) in got, f"{url}: expected {fate}/{reason}, got {got}"
    assert forbidden.requests == {}, "a refused address was contacted"
    assert server.count("/private/secret.png") == 0, "a robots.txt-disallowed URL was fetched"
    assert report["blocked"]["blocked_address"] == 2
    for counts in ("download_failed", "blocked", "filtered"):
        assert all(v > 0 for v in report[counts].values())

    # Planted duplicates are found: every exact copy, and most near copies.
    uid_of = {e["url"]: e["uid"] for e in ledger}
    fate_of = {e["uid"]: e for e in ledger}
    for dup_path, original_path in site.planted_exact:
        a, b = fate_of[uid_of[server.url(dup_path)]], fate_of[uid_of[server.url(original_path)]]
        if {a["fate"], b["fate"]} == {"duplicate_near"}:
            # The pair's survivor was itself taken for a near copy of a third image (the small CLIP's
            # false positives, bounded below): both then name that image's survivor, as dedup says.
            assert a["dup_of"] == b["dup_of"] not in (a["uid"], b["uid"]), (a, b)
        else:
            assert {a["fate"], b["fate"]} == {"duplicate_exact", "kept"}, (a, b)
    found_near = 0
    for dup_path, original_path in site.planted_near:
        a, b = fate_of[uid_of[server.url(dup_path)]], fate_of[uid_of[server.url(original_path)]]
        if {a["fate"], b["fate"]} == {"duplicate_near", "kept"} and (a["dup_of"] or b["dup_of"]) in (
            a["uid"],
            b["uid"],
        ):
            found_near += 1
    assert found_near >= 0.75 * len(site.planted_near), f"only {found_near} planted near duplicates found"
    # ... without throwing away the distinct images.
    assert report["duplicates_near"] <= len(site.planted_near) + 0.1 * len(site.rows)
    assert report["kept"] >= len(site.samples) - 0.1 * len(site.rows) - 2

    # The curated shards hold exactly the kept pairs, bytes intact.
    manifest = storage.read_json(CURATED_MANIFEST)
    assert manifest["rows"] == report["kept"]
    curated = read_listed_shards(storage, CURATED_DIR)
    assert curated.num_rows == report["kept"]
    for row in curated.slice(0, 20).to_pylist():
        assert hashlib.sha256(row["image"]).hexdigest() == row["sha256"]
        assert row["provenance"]["input_row"] is not None

    # A re-run resumes: no new downloads, no duplicated rows, the same result.
    downloads = sum(server.requests.values()) - sum(before.values())
    assert downloads > 0
    again = curate_flow(urls, root, cfg.model_dump(mode="json"))
    assert again == report
    assert (
        sum(server.requests.values()) - sum(before.values()) == downloads
    )  # nothing refetched, robots.txt included
    assert read_listed_shards(storage, CURATED_DIR).num_rows == report["kept"]
    # The small CLIP trained on the shared loop; the re-run resumed it at its last step, no retraining.
    clip = latest_checkpoint(storage, "clip")
    assert clip is not None and clip.step == cfg.train_clip.max_steps
    assert storage.exists(f"{clip.rel_dir}/train_state.pt")
