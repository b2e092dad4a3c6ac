"""The curation's per-shard work on a Dask cluster (orchestration.dask_address) through Prefect's
DaskTaskRunner: a LocalCluster of two worker processes on loopback gives the same fates, byte for
byte, as the stage run in one process."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from dalle.config import ConfigError, config_from_dict, with_changes
from dalle.curate import crawl as crawl_lib
from dalle.curate import filters
from dalle.runroot import FILTER_TABLE
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


@pytest.mark.parametrize("address", ["8786", "http://scheduler:8786", "tcp://", "tcp://a b:1"])
def test_a_scheduler_address_that_is_not_one_is_refused(address):
    with pytest.raises(ConfigError, match="dask_address must be a scheduler address"):
        config_from_dict({"orchestration": {"dask_address": address}})
