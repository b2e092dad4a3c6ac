"""The curation's per-shard work on a Dask cluster (orchestration.dask_address) through Prefect's
DaskTaskRunner: a LocalCluster of two worker processes on loopback gives the same fates, byte for
byte, as the stage run in one process: the rule filters and the CLIP embedding shard by shard, and
dedup's cluster searches batch by batch."""

from __future__ import annotations

import contextlib

import numpy as np
import pyarrow.parquet as pq
import pytest

from dalle.config import ConfigError, SmallClipConfig, config_from_dict, with_changes
from dalle.curate import crawl as crawl_lib
from dalle.curate import dedup, embed, filters
from dalle.runroot import (
    DEDUP_BATCHES_DIR,
    DEDUP_REPORT,
    DEDUP_TABLE,
    EMBEDDINGS_DIR,
    FILTER_TABLE,
    SCORES_TABLE,
)
from dalle.storage import Storage
from demo.site import DemoServer, build_site, url_table
from demo.world import world_config

CONFIG = {
    "plugins": {"demo": {"num_images": 150, "image_size": 32, "exact_duplicates": 4, "near_duplicates": 4}},
    "crawl": {"allow_networks": ["127.0.0.1/32"], "processes": 1, "threads": 8, "samples_per_shard": 40},
    "filter": {"min_side": 24, "min_image_bytes": 20, "min_caption_words": 4},  # single objects filtered
}


@pytest.fixture(scope="module")
def crawled(tmp_path_factory):
    """A run root with the demo world crawled into several raw shards."""
    cfg = config_from_dict(CONFIG)
    site = build_site(world_config(cfg))
    root = tmp_path_factory.mktemp("dask") / "root"
    storage = Storage(str(root))
    with DemoServer(site) as server:
        urls = storage.write_table("urls.parquet", url_table(site, server.base_url))
        prepared = crawl_lib.prepare_input(urls, storage, cfg.crawl)
        shards = crawl_lib.run_crawl(storage, cfg.crawl, prepared, log=lambda message: None)
    assert len(shards) >= 3
    return storage, cfg


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as c,
        Client(c) as client,
    ):
        yield c, client


def test_the_filter_stage_on_two_dask_workers_writes_what_one_process_writes(
    crawled, cluster, prefect_server
):
    from distributed import get_task_stream

    from flows.curate import run_filters

    storage, cfg = crawled
    alone = filters.filter_stage(storage, cfg)
    in_process = pq.read_table(storage.path(FILTER_TABLE))
    assert alone.get("filtered", 0) > 0 and alone["pass"] > 0

    local, client = cluster
    on_dask = with_changes(cfg, "test", orchestration={"dask_address": local.scheduler_address})
    storage.delete(FILTER_TABLE)
    with get_task_stream(client) as stream:
        counts = run_filters(storage.root, on_dask, [])
    assert counts == alone
    assert pq.read_table(storage.path(FILTER_TABLE)).equals(in_process)
    shards = crawl_lib.finished_shards(storage)
    ran = [task for task in stream.data if "filter_shard" in task["key"]]
    assert len({task["key"] for task in ran}) == len(shards)  # one task per raw shard, on the cluster
    assert storage.read_json("reports/timings.json")["stages"]["filter"]["runs"] == 1


@pytest.fixture(scope="module")
def with_clip(crawled, tmp_path_factory):
    """The crawled run root with its rule filters applied, and a config naming a small CLIP of random
    weights saved as a checkpoint that the workers load."""
    import torch

    from dalle.models.clip import (
        ClipModel,
        build_small_clip,
        save_clip,
        small_clip_architecture,
        small_clip_preprocess,
    )

    storage, cfg = crawled
    small = SmallClipConfig(
        image_size=32,
        embed_dim=32,
        vision_width=32,
        vision_layers=1,
        patch_size=8,
        text_width=32,
        text_layers=1,
        text_heads=2,
        context_length=16,
    )
    torch.manual_seed(0)
    clip = ClipModel(
        build_small_clip(small),
        identity="test:small-clip-of-random-weights",
        architecture=small_clip_architecture(small),
        preprocess_cfg=small_clip_preprocess(small),
        device=torch.device("cpu"),
    )
    uri = save_clip(clip, Storage(str(tmp_path_factory.mktemp("clip"))), "clip")
    # Batches of 16 cross the shards' bounds in one process, not on the workers.
    cfg = with_changes(cfg, "test", clip={"checkpoint": uri, "device": "cpu", "batch_size": 16})
    if not storage.exists(FILTER_TABLE):
        filters.filter_stage(storage, cfg)
    return storage, cfg


@contextlib.contextmanager
def torch_threads(count: int):
    """Torch on `count` threads, as on the workers (Dask's nanny starts them with OMP_NUM_THREADS=1): a
    product summed by another number of threads can differ in its last bit (6e-8 here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _stored_vectors(storage: Storage, cfg) -> dict[str, np.ndarray]:
    from dalle.models.clip import load_clip

    uids = [r["uid"] for r in storage.read_table(SCORES_TABLE).to_pylist()]
    table = embed.embed_stage(storage, uids, [None] * len(uids), [""] * len(uids), load_clip(cfg.clip), 1)
    return dict(zip(uids, embed.vectors(table)))


def test_the_embedding_on_two_dask_workers_stores_and_scores_what_one_process_does(
    with_clip, cluster, prefect_server
):
    from distributed import get_task_stream

    from dalle.models.clip import load_clip
    from flows.curate import run_score

    storage, cfg = with_clip
    storage.delete(EMBEDDINGS_DIR)
    with torch_threads(1):
        alone = embed.score_stage(storage, cfg, load_clip(cfg.clip))
    in_process = pq.read_table(storage.path(SCORES_TABLE))
    vectors_alone = _stored_vectors(storage, cfg)
    assert storage.list(EMBEDDINGS_DIR, ".parquet") == [f"{EMBEDDINGS_DIR}/part-00000.parquet"]

    local, client = cluster
    on_dask = with_changes(cfg, "test", orchestration={"dask_address": local.scheduler_address})
    storage.delete(EMBEDDINGS_DIR)
    storage.delete(SCORES_TABLE)
    with get_task_stream(client) as stream:
        counts = run_score(storage.root, on_dask, None)
    assert counts == alone
    assert pq.read_table(storage.path(SCORES_TABLE)).equals(in_process)
    vectors_on_dask = _stored_vectors(storage, cfg)
    assert vectors_on_dask.keys() == vectors_alone.keys()
    for uid, vector in vectors_alone.items():
        np.testing.assert_array_equal(vectors_on_dask[uid], vector)
    shards = embed.shards_to_embed(storage)
    parts = storage.list(EMBEDDINGS_DIR, ".parquet")
    assert len(shards) >= 3 and len(parts) == len(shards)  # a part of its own for each shard, no numbered one
    assert all("/shard-" in rel for rel in parts)
    ran = [task for task in stream.data if "embed_shard" in task["key"]]
    assert len({task["key"] for task in ran}) == len(shards)  # one task per raw shard, on the cluster

    # Again: every vector is stored, so no shard writes a part and the scores stay the same.
    assert run_score(storage.root, on_dask, None) == alone
    assert storage.list(EMBEDDINGS_DIR, ".parquet") == parts
    assert pq.read_table(storage.path(SCORES_TABLE)).equals(in_process)


def test_dedup_with_its_clusters_searched_on_two_dask_workers_decides_what_one_process_does(
    with_clip, cluster, prefect_server
):
    from distributed import get_task_stream

    from dalle.models.clip import load_clip
    from flows.curate import run_dedup

    storage, cfg = with_clip
    clip = load_clip(cfg.clip)
    if not storage.exists(SCORES_TABLE):
        with torch_threads(1):
            embed.score_stage(storage, cfg, clip)
    # The small set partitioned into clusters, each cluster a task of its own; the random CLIP's pooled
    # vectors are all alike, its patch tokens are not.
    cfg = with_changes(
        cfg,
        "test",
        dedup={
            "vectors": "clip_tokens",
            "near_threshold": 0.9,
            "partition_min_size": 2,
            "boundary_margin": 0.1,
            "cluster_task_vectors": 1,
        },
    )
    alone = dedup.dedup_stage(storage, cfg, clip)
    in_process = pq.read_table(storage.path(DEDUP_TABLE))
    assert alone["index"]["index"] == "clusters" and alone["index"]["clusters"] >= 2, alone
    assert 1 < alone["index"]["clusters_per_vector"] < 2, alone  # a few vectors in two clusters
    assert alone["duplicates_exact"] > 0 and alone["duplicates_near"] > 0, alone

    local, client = cluster
    on_dask = with_changes(cfg, "test", orchestration={"dask_address": local.scheduler_address})
    storage.delete(DEDUP_TABLE)
    storage.delete(DEDUP_REPORT)
    with get_task_stream(client) as stream:
        report = run_dedup(storage.root, on_dask, None, {})
    assert pq.read_table(storage.path(DEDUP_TABLE)).equals(in_process)

    def without_times(report: dict) -> dict:
        return {**report, "seconds": None, "index": {**report["index"], "seconds": None}}

    assert without_times(report) == without_times(alone)
    assert without_times(storage.read_json(DEDUP_REPORT)) == without_times(alone)
    ran = {task["key"] for task in stream.data if "search_clusters" in task["key"]}
    assert len(ran) == alone["index"]["clusters"]  # a task per cluster of two members or more
    assert storage.list(DEDUP_BATCHES_DIR) == []  # the clusters stored for the workers are gone


@pytest.mark.parametrize("address", ["8786", "http://scheduler:8786", "tcp://", "tcp://a b:1"])
def test_a_scheduler_address_that_is_not_one_is_refused(address):
    with pytest.raises(ConfigError, match="dask_address must be a scheduler address"):
        config_from_dict({"orchestration": {"dask_address": address}})
