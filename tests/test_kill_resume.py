"""SIGKILL each long stage at random moments, run it again, and compare with an uninterrupted run.

Stages: `curate` (crawl, filter, CLIP, embed, dedup, publish in one command), `tokenize`,
`train dvae`, `train transformer`. Kill moments come from a seeded RNG (tests/kill_harness.py):
`KILL_SEED=<n>` replays one, `KILL_POINTS=<k>` gives each stage k kill points (default 1).
"""

from __future__ import annotations

import random
import shutil
from collections import Counter

import pytest
import yaml
from kill_harness import kill_moments, kill_points, kill_seed, kill_then_finish, run_cli

from dalle.runroot import (
    CURATED_DIR,
    DVAE,
    SAMPLES_REPORT,
    SHARDS_DIR,
    TRANSFORMER,
    latest_pointer,
    read_metrics,
)
from dalle.storage import Storage
from dalle.tokens.loader import read_listed_shards, read_manifest
from demo.site import DemoServer, build_site
from demo.world import world_config
from tests.test_pipeline import TINY
from tests.test_train import SETTINGS, make_run

TRAIN = {
    "train_dvae": {**SETTINGS["train_dvae"], "max_steps": 16, "checkpoint_every": 4},
    "train_transformer": {**SETTINGS["train_transformer"], "max_steps": 16, "checkpoint_every": 4},
}


@pytest.fixture(scope="module")
def seed() -> int:
    return kill_seed()


@pytest.fixture
def rng(seed, request):
    """Each test's own stream of the seed: `-k` and test order do not change a test's draws."""
    return random.Random(f"{seed}-{request.node.name}")


def assert_listed_files_intact(root: str) -> None:
    """Every manifest's shards exist with their recorded sha256 (read_listed_shards checks it), and
    no step folder named by latest.json is missing."""
    storage = Storage(root)
    for shard_dir in (CURATED_DIR, SHARDS_DIR):
        if storage.exists(f"{shard_dir}/_manifest.json"):
            read_manifest(storage, shard_dir)
            read_listed_shards(storage, shard_dir)
    for model in (DVAE, TRANSFORMER):
        if storage.exists(latest_pointer(model)):
            step = storage.read_json(latest_pointer(model))["step"]
            assert storage.exists(f"models/{model}/step_{step:08d}/model.json")


def _copy(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


# ----- training ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_dvae(tmp_path_factory, prefect_server):
    """A root with curated pairs and an uninterrupted dVAE run; returns (root, seconds it took)."""
    root = str(tmp_path_factory.mktemp("kill") / "dvae")
    make_run(root, **TRAIN)
    done = run_cli(["train", "dvae", "--out", root])
    assert done.returncode == 0, done.stderr[-3000:]
    return root, done.seconds


@pytest.fixture(scope="module")
def tokenized(trained_dvae, tmp_path_factory):
    """`trained_dvae` tokenized without a kill; returns (root, seconds it took)."""
    root = _copy(trained_dvae[0], str(tmp_path_factory.mktemp("kill") / "tokens"))
    done = run_cli(["tokenize", "--out", root])
    assert done.returncode == 0, done.stderr[-3000:]
    return root, done.seconds


def _assert_training_equal(whole: str, killed: str, model: str) -> None:
    steps = TRAIN[f"train_{model}"]["max_steps"]
    a, b = Storage(whole), Storage(killed)
    assert b.read_json(latest_pointer(model))["step"] == steps
    got = [m["step"] for m in read_metrics(b, model) if "loss" in m]
    assert sorted(got) == list(range(1, steps + 1)), "each step logged once, none duplicated or lost"
    expected = {m["step"]: m["loss"] for m in read_metrics(a, model) if "loss" in m}
    # The run resumes from its newest checkpoint with the same data order and RNG state: from there on
    # the losses are the uninterrupted run's (tests/test_train.py shows exactness; here, closeness).
    final = {m["step"]: m["loss"] for m in read_metrics(b, model) if "loss" in m}
    assert final[steps] == pytest.approx(expected[steps], rel=1e-4, abs=1e-6)
    assert_listed_files_intact(killed)


def test_train_dvae_killed_at_random_moments_finishes_as_an_uninterrupted_run(trained_dvae, tmp_path, rng):
    whole, seconds = trained_dvae
    for i, at in enumerate(kill_moments(rng, seconds, kill_points())):
        root = str(tmp_path / f"k{i}")
        make_run(root, **TRAIN)
        kill_then_finish(["train", "dvae", "--out", root], at)
        _assert_training_equal(whole, root, DVAE)


def test_train_transformer_killed_at_random_moments_finishes_as_an_uninterrupted_run(
    tokenized, tmp_path, rng
):
    base, _ = tokenized
    whole = _copy(base, str(tmp_path / "whole"))
    done = run_cli(["train", "--out", whole])
    assert done.returncode == 0, done.stderr[-3000:]
    for i, at in enumerate(kill_moments(rng, done.seconds, kill_points())):
        root = _copy(base, str(tmp_path / f"k{i}"))
        kill_then_finish(["train", "--out", root], at)
        _assert_training_equal(whole, root, TRANSFORMER)


# ----- tokenize ------------------------------------------------------------------------------


def _token_rows(root: str) -> Counter:
    table = read_listed_shards(Storage(root), SHARDS_DIR)
    rows = table.to_pylist()
    uids = [r["uid"] for r in rows]
    assert len(uids) == len(set(uids)), "a uid is tokenized twice"
    return Counter(tuple(sorted((k, repr(v)) for k, v in r.items())) for r in rows)


def test_tokenize_killed_at_random_moments_equals_an_uninterrupted_run(
    trained_dvae, tokenized, tmp_path, rng
):
    whole, seconds = tokenized
    expected = _token_rows(whole)
    for i, at in enumerate(kill_moments(rng, seconds, kill_points())):
        root = _copy(trained_dvae[0], str(tmp_path / f"k{i}"))
        kill_then_finish(["tokenize", "--out", root], at)
        assert_listed_files_intact(root)
        assert _token_rows(root) == expected


# ----- curate: crawl, filter, CLIP, embed, dedup, publish -------------------------------------

CURATE = {
    **{k: v for k, v in TINY.items() if k in ("crawl", "filter", "clip", "train_clip", "dedup")},
    "plugins": {"demo": {"num_images": 48, "image_size": 48, "exact_duplicates": 4, "near_duplicates": 4}},
    "crawl": {**TINY["crawl"], "allow_networks": ["127.0.0.1/32"], "samples_per_shard": 16},
}


@pytest.fixture(scope="module")
def demo_urls(tmp_path_factory):
    from dalle.config import config_from_dict

    cfg = config_from_dict(CURATE)
    site = build_site(world_config(cfg))
    folder = tmp_path_factory.mktemp("curate")
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(CURATE))
    with DemoServer(site) as server:
        lines = ["url,caption"] + [f'"{server.url(path)}","{caption}"' for path, caption in site.rows]
        urls = folder / "urls.csv"
        urls.write_text("\n".join(lines) + "\n")
        yield str(urls), str(config), folder


def _curated(root: str) -> tuple[dict, Counter]:
    storage = Storage(root)
    fates = {}
    for entry in storage.read_table(SAMPLES_REPORT).to_pylist():
        assert entry["input_row"] not in fates, f"input row {entry['input_row']} has two fates"
        fates[entry["input_row"]] = (entry["uid"], entry["fate"], entry["reason"])
    rows = read_listed_shards(storage, CURATED_DIR, ["uid", "url", "caption", "sha256"]).to_pylist()
    uids = [r["uid"] for r in rows]
    assert len(uids) == len(set(uids)), "a uid is published twice"
    return fates, Counter(tuple(sorted(r.items())) for r in rows)


def test_curate_killed_at_random_moments_equals_an_uninterrupted_run(demo_urls, prefect_server, rng):
    urls, config, folder = demo_urls
    whole = str(folder / "whole")
    args = ["curate", "--urls", urls, "--config", config, "--out"]
    done = run_cli([*args, whole])
    assert done.returncode == 0, done.stderr[-3000:]
    expected_fates, expected_rows = _curated(whole)
    assert sum(expected_rows.values()) > 0
    for i, at in enumerate(kill_moments(rng, done.seconds, kill_points())):
        root = str(folder / f"k{i}")
        kill_then_finish([*args, root], at)
        assert_listed_files_intact(root)
        fates, rows = _curated(root)
        assert fates == expected_fates
        assert rows == expected_rows
