"""A URL list that grows after the first crawl is curated incrementally: the new rows become a batch
of their own (crawled into raw/batch_0001/), known URLs are not fetched again, and every sample of
every batch has one fate. Also: the crawl's process is watched (output to the log, time limits)."""

from __future__ import annotations

import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dalle.config import config_from_dict
from dalle.curate.crawl import crawl_batches, prepare_input, run_crawl
from dalle.curate.filters import filter_stage
from dalle.processes import run_watched
from dalle.runroot import FILTER_TABLE
from dalle.storage import Storage
from demo.site import DemoServer, build_site
from demo.world import world_config


def _write_list(path, server, rows) -> str:
    pq.write_table(pa.table({"url": [server.url(p) for p, _ in rows], "caption": [c for _, c in rows]}), path)
    return str(path)


@pytest.mark.slow
def test_a_grown_url_list_crawls_only_its_new_rows(tmp_path):
    cfg = config_from_dict(
        {
            "plugins": {"demo": {"num_images": 30, "image_size": 24}},
            "crawl": {
                "allow_networks": ["127.0.0.1/32"],
                "processes": 1,
                "threads": 4,
                "samples_per_shard": 8,
            },
            "filter": {"min_side": 8, "min_image_bytes": 10},
        }
    )
    site = build_site(world_config(cfg))
    storage = Storage(tmp_path / "run")
    with DemoServer(site) as server:
        first = _write_list(tmp_path / "v1.parquet", server, site.rows[:20])
        prepared = prepare_input(first, storage, cfg.crawl)
        assert (prepared.batch, prepared.input_rows, prepared.to_crawl) == ("raw", 20, 20)
        run_crawl(storage, cfg.crawl, prepared, log=lambda line: None)
        assert prepare_input(first, storage, cfg.crawl).reused  # the same list again: nothing new

        # Version 2 of the list: 10 new rows (after 5 known ones, in another order).
        grown = _write_list(
            tmp_path / "v2.parquet", server, site.rows[25:30] + site.rows[:20] + site.rows[20:25]
        )
        fetched_before = sum(server.requests.values())
        prepared = prepare_input(grown, storage, cfg.crawl)
        assert (prepared.batch, prepared.input_rows, prepared.to_crawl) == ("raw/batch_0001", 10, 10)
        lines: list[str] = []
        shards = run_crawl(storage, cfg.crawl, prepared, log=lines.append)
        assert lines, "img2dataset's output reaches the log"
        fetched = sum(server.requests.values()) - fetched_before
        assert fetched <= 10 + 1  # the new rows (and at most robots.txt), none of the known ones
    assert crawl_batches(storage) == ["raw", "raw/batch_0001"]
    assert sum(s.startswith("raw/batch_0001/") for s in shards) == 2  # 10 rows, 8 per shard
    filter_stage(storage, cfg)
    decisions = storage.read_table(FILTER_TABLE).to_pylist()
    assert len(decisions) == 30
    assert sorted(d["input_row"] for d in decisions) == list(range(30))  # unique across batches
    assert len({d["url"] for d in decisions}) == 30
    manifest = storage.read_json("raw/batch_0001/_input/_manifest.json")
    assert (manifest["first_input_row"], manifest["seen_before"]) == (20, 20)


def test_the_crawl_process_is_stopped_when_it_hangs_or_runs_too_long(tmp_path):
    marker = tmp_path / "child-alive"
    grandchild = f"import pathlib, time; time.sleep(8); pathlib.Path({str(marker)!r}).write_text('x')"
    # A child that starts a grandchild in its process group, prints, then hangs without output.
    script = tmp_path / "hang.py"
    script.write_text(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
        "print('downloading', flush=True)\n"
        "time.sleep(60)\n"
    )
    lines: list[str] = []
    start = time.monotonic()
    code, stopped = run_watched([sys.executable, str(script)], lines.append, max_s=30, stall_s=2)
    assert time.monotonic() - start < 20
    assert "printed nothing for crawl.stall_s" in stopped and code != 0
    assert lines == ["downloading"]

    chatty = "import time\nfor i in range(100):\n    print(i, flush=True); time.sleep(0.2)\n"
    code, stopped = run_watched([sys.executable, "-c", chatty], lines.append, max_s=2, stall_s=30)
    assert "ran past crawl.max_crawl_s" in stopped

    code, stopped = run_watched([sys.executable, "-c", "print('done')"], lines.append, max_s=30, stall_s=30)
    assert (code, stopped) == (0, None)
    time.sleep(9)
    assert not marker.exists()  # the whole process group was stopped, grandchild included
