"""A URL list whose every row is refused: the commands that curate write the ledger and the funnel,
contact nothing, and end with one line that counts why and says what to do."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dalle.config import as_config
from dalle.curate import fates, ledger
from dalle.runroot import CURATE_REPORT, FILTER_TABLE, SAMPLES_REPORT
from dalle.schemas import FILTER_DECISIONS_SCHEMA
from dalle.storage import Storage
from tests.test_cli import run_cli
from tests.test_netguard import CountingServer

ROWS = 12


@pytest.fixture
def loopback():
    """A web server on 127.0.0.1 that counts the connections it accepts; the default network policy
    refuses loopback, so it must see none."""
    server = CountingServer("127.0.0.1")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _loopback_list(tmp_path, server) -> str:
    path = tmp_path / "urls.parquet"
    urls = [server.url(f"/img/{i}.png") for i in range(ROWS)]
    pq.write_table(
        pa.table({"url": urls, "caption": [f"a red circle, number {i}" for i in range(ROWS)]}), path
    )
    return str(path)


@pytest.mark.parametrize("command", ["curate", "pipeline", "ingest"])
def test_a_list_of_refused_urls_ends_in_one_line_after_writing_every_fate(
    command, tmp_path, prefect_server, loopback
):
    urls = _loopback_list(tmp_path, loopback)
    root = str(tmp_path / "run")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"source": {"urls": urls}}))
    args = {
        "curate": ["curate", "--urls", urls, "--out", root],
        "pipeline": ["pipeline", "--config", str(config), "--out", root],
        "ingest": ["ingest", "--config", str(config), "--out", root],
    }[command]

    done = run_cli(*args)

    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    storage = Storage(root)
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: all {ROWS} input rows were refused: {ROWS} blocked_address; if you mean to crawl that "
        "network, allow it with --allow-network 127.0.0.1/32 or crawl.allow_networks. "
        f"Every row's fate: {storage.uri(SAMPLES_REPORT)}"
    )
    assert loopback.connections == 0, loopback.paths
    ledger = storage.read_table(SAMPLES_REPORT).to_pylist()
    assert sorted(e["input_row"] for e in ledger) == list(range(ROWS))
    assert {(e["fate"], e["reason"]) for e in ledger} == {("blocked", "blocked_address")}
    report = storage.read_json(CURATE_REPORT)
    assert report["input_rows"] == ROWS and report["blocked"] == {"blocked_address": ROWS}
    assert report["kept"] == 0 and report["downloaded"] == 0


def test_one_pair_is_too_few_for_the_small_clip_and_the_ledger_says_so(tmp_path):
    # The fates the rule filters leave: one pair passed, three pages were gone, one caption empty.
    storage = Storage(str(tmp_path / "run"))
    rows = [
        {"input_row": 0, "url": "https://a.example/0.png", "uid": "u0", "fate": "pass", "sha256": "ab"},
        *(
            {
                "input_row": i,
                "url": f"https://a.example/{i}.png",
                "uid": f"u{i}",
                **fates.fate_record("download_failed", "http_404", "HTTP Error 404: Not Found"),
            }
            for i in (1, 2, 3)
        ),
        {
            "input_row": 4,
            "url": "https://a.example/4.png",
            "uid": "u4",
            **fates.fate_record("filtered", "caption_empty", "caption is empty"),
        },
    ]
    storage.write_table(FILTER_TABLE, pa.Table.from_pylist(rows, schema=FILTER_DECISIONS_SCHEMA))

    fates.record_unscored(storage, "too few pairs to train the small CLIP")
    ledger.write_curated(storage, as_config(None), None)
    error = fates.too_few_pairs(storage, passed=1, needed=fates.SMALL_CLIP_MIN_PAIRS)

    by_row = {
        e["input_row"]: (e["fate"], e["reason"]) for e in storage.read_table(SAMPLES_REPORT).to_pylist()
    }
    assert by_row == {
        0: ("filtered", fates.NOT_CLIP_SCORED),
        **{i: ("download_failed", "http_404") for i in (1, 2, 3)},
        4: ("filtered", "caption_empty"),
    }
    assert str(error) == (
        "only 1 of the 5 input rows passed the rule filters, too few to train the small CLIP (it needs 2; "
        "or set clip.pretrained or clip.checkpoint): 3 http_404, 1 caption_empty; check that the sites are "
        f"reachable from this machine. Every row's fate: {storage.uri(SAMPLES_REPORT)}"
    )
