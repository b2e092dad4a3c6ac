"""Raw shards and URL lists are read as streams: the filter stage holds one batch of a raw shard, not
the shard, and a URL list of millions of rows is read in batches. The results are those of reading
everything at once; peak memory (ru_maxrss of a child process) is measured against a baseline."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dalle.config import CrawlConfig, RunConfig
from dalle.curate import filters
from dalle.curate.crawl import _refused_table, iter_raw_shard, read_raw_shard
from dalle.curate.urls import iter_url_list, read_url_list
from dalle.runroot import FILTER_TABLE, INPUT_MANIFEST, REFUSED_LIST
from dalle.storage import Storage

REPO = Path(__file__).resolve().parents[1]

RAW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("sha256", pa.string()),
        ("input_row", pa.int64()),
        ("caption_utf8", pa.bool_()),
        ("jpg", pa.binary()),
        ("width", pa.int64()),
    ]
)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (20, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def _raw_rows(count: int, first: int = 0) -> list[dict]:
    good, small, wide = _png(64, 48), _png(16, 16), _png(300, 40)
    rows = []
    for i in range(first, first + count):
        kind = i % 6
        row = {
            "key": f"{i:09d}",
            "url": f"http://h{i % 7}.test/{i}.png",
            "caption": ["a blue square", "", "a wide blue band", "ok", "a blue square", "12 34"][kind],
            "status": "failed_to_download" if kind == 3 else "success",
            "error_message": "HTTP Error 404: Not Found" if kind == 3 else None,
            "sha256": None if kind == 3 else f"{i:064x}",
            "input_row": i,
            "caption_utf8": i % 11 != 0,
            "jpg": None if kind == 3 else [good, small, wide, None, b"<html>" * 60, good][kind],
            "width": None,
        }
        rows.append(row)
    return rows


def _write_raw_root(storage: Storage, shards: int = 2, rows_per_shard: int = 250) -> None:
    """A run root as the crawl leaves it: the input manifest, refused rows, finished raw shards written
    in row groups of 100 rows as img2dataset's parquet writer does."""
    storage.write_json(
        INPUT_MANIFEST, {"input_rows": shards * rows_per_shard + 2, "to_crawl": 0, "refused": {}}
    )
    refused = [
        {
            "input_row": shards * rows_per_shard + n,
            "url": "ftp://x.test/a",
            "caption": "c",
            "fate": "blocked",
            "reason": "scheme_not_allowed",
            "detail": "ftp",
        }
        for n in range(2)
    ]
    storage.write_table(REFUSED_LIST, _refused_table(refused))
    for shard in range(shards):
        buffer = io.BytesIO()
        with pq.ParquetWriter(buffer, RAW_SCHEMA) as writer:
            rows = _raw_rows(rows_per_shard, shard * rows_per_shard)
            for start in range(0, len(rows), 100):
                writer.write_table(pa.Table.from_pylist(rows[start : start + 100], schema=RAW_SCHEMA))
        storage.write_bytes(f"raw/{shard:05d}.parquet", buffer.getvalue())
        storage.write_json(f"raw/{shard:05d}_stats.json", {"count": rows_per_shard})


def test_a_raw_shard_streams_in_batches_with_the_rows_of_the_whole_shard(run_root):
    storage = Storage(run_root)
    _write_raw_root(storage, shards=1)
    batches = list(iter_raw_shard(storage, "raw/00000.parquet", batch_rows=32))
    assert max(b.num_rows for b in batches) <= 32 and len(batches) > 250 // 32
    streamed = pa.Table.from_batches(batches)
    whole = read_raw_shard(storage, "raw/00000.parquet")
    assert streamed.select(whole.column_names).equals(whole)


@pytest.mark.parametrize("batch_rows", [1, 37, 100, 10_000])
def test_the_streamed_filter_stage_records_the_fates_of_the_whole_shard_path(
    tmp_path, monkeypatch, batch_rows
):
    storage = Storage(tmp_path / "run")
    _write_raw_root(storage)
    cfg = RunConfig()

    # The whole-shard path this stage had: one table per shard, as a single batch.
    monkeypatch.setattr(
        filters, "iter_raw_shard", lambda s, rel: read_raw_shard(s, rel).to_batches(max_chunksize=None)
    )
    whole_counts = filters.filter_stage(storage, cfg)
    whole = storage.read_table(FILTER_TABLE)

    monkeypatch.setattr(
        filters, "iter_raw_shard", lambda s, rel: iter_raw_shard(s, rel, batch_rows=batch_rows)
    )
    streamed_counts = filters.filter_stage(storage, cfg)
    streamed = storage.read_table(FILTER_TABLE)
    assert streamed.equals(whole) and streamed_counts == whole_counts
    assert streamed.num_rows == 502
    assert len(streamed_counts) >= 3  # passed, filtered, failed downloads and refused rows all occur


def test_the_filter_stage_streams_shards_on_s3(s3_bucket, tmp_path):
    local, remote = Storage(tmp_path / "run"), Storage(f"{s3_bucket}/runs/stream")
    for storage in (local, remote):
        _write_raw_root(storage)
    assert filters.filter_stage(remote, RunConfig()) == filters.filter_stage(local, RunConfig())
    assert remote.read_table(FILTER_TABLE).equals(local.read_table(FILTER_TABLE))


# The process's own peak: ru_maxrss of a process started by fork and exec keeps the peak of the
# forked copy of pytest (hundreds of MB), so on Linux the peak of its own memory map (VmHWM) is read.
_PRINT_PEAK = """
import resource, sys
try:
    with open("/proc/self/status") as _status:
        _peak = next(int(line.split()[1]) for line in _status if line.startswith("VmHWM:"))
except OSError:
    _peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(_peak / (1 << 20) if sys.platform == "darwin" else _peak / 1024)
"""


def _peak_rss_mib(setup: str, work: str = "") -> float:
    """Peak resident memory (MiB) of a fresh Python process that runs `setup`, then `work`."""
    probe = "\n".join([textwrap.dedent(setup), work, _PRINT_PEAK])
    done = subprocess.run(
        [sys.executable, "-c", probe], check=False, capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return float(done.stdout.strip().splitlines()[-1])


IMAGE_BYTES = 100 * 1024  # bodies of 100 KiB, in row groups of 100 rows as img2dataset writes them


def _image_root(root: Path, rows: int) -> str:
    storage = Storage(root)
    _write_raw_root(storage, shards=0)
    body = (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * (IMAGE_BYTES // 256))[:IMAGE_BYTES]
    with pq.ParquetWriter(storage.path("raw/00000.parquet"), RAW_SCHEMA, compression="none") as writer:
        for start in range(0, rows, 100):
            batch = _raw_rows(100, start)
            for n, row in enumerate(batch):  # distinct bodies, so nothing is shared between rows
                row.update(status="success", error_message=None, jpg=(start + n).to_bytes(4, "big") + body)
            writer.write_table(pa.Table.from_pylist(batch, schema=RAW_SCHEMA))
    storage.write_json("raw/00000_stats.json", {"count": rows})
    return f"""
        from dalle.config import RunConfig
        from dalle.curate import filters
        from dalle.curate.crawl import read_raw_shard
        from dalle.storage import Storage
        storage = Storage({str(root)!r})
    """


def test_the_filter_stage_holds_a_batch_of_a_raw_shard_not_the_shard(tmp_path):
    """Peak memory of the filter stage on a 100 MB and a 250 MB raw shard (1,000 and 2,500 rows of 100
    KiB): reading the whole 250 MB shard costs at least its size over a process that reads nothing; the
    streamed stage costs a bounded amount (about one row group and the allocator's slack), the same for
    both shards."""
    small, large = _image_root(tmp_path / "small", 1000), _image_root(tmp_path / "large", 2500)
    growth_mib = 1500 * IMAGE_BYTES / (1 << 20)
    stage = "counts = filters.filter_stage(storage, RunConfig())\nassert counts"
    floor = _peak_rss_mib(large)
    streamed_small, streamed_large = _peak_rss_mib(small, stage), _peak_rss_mib(large, stage)
    whole = _peak_rss_mib(large, "rows = read_raw_shard(storage, 'raw/00000.parquet').to_pylist()")
    figures = {
        "floor": floor,
        "streamed_1000": streamed_small,
        "streamed_2500": streamed_large,
        "whole_2500": whole,
    }
    print(json.dumps(figures))
    assert whole - floor > 2500 * IMAGE_BYTES / (1 << 20)  # the measurement sees a whole shard in memory
    assert streamed_large - streamed_small < 0.2 * growth_mib  # 150 MB more shard, not 30 MB more memory
    assert streamed_large - floor < 0.75 * (whole - floor)


def _write_tsv(path: Path, rows: int) -> None:
    with open(path, "w") as out:
        out.write("url\tcaption\n")
        out.writelines(
            f"http://host{i % 997}.test/img/{i}.jpg\ta photo of thing number {i}\n" for i in range(rows)
        )


def test_a_url_list_is_read_in_batches_with_the_rows_of_the_whole_list(tmp_path):
    path = tmp_path / "urls.tsv"
    _write_tsv(path, 10_000)
    batches = list(iter_url_list(str(path), CrawlConfig(), batch_rows=999))
    assert max(b.num_rows for b in batches) <= 999
    table = pa.Table.from_batches(batches)
    assert table.column("input_row").to_pylist() == list(range(10_000))
    assert table.equals(read_url_list(str(path), CrawlConfig()))
    for fmt in ("jsonl", "txt", "parquet"):
        other = tmp_path / f"urls.{fmt}"
        urls, captions = table.column("url").to_pylist(), table.column("caption").to_pylist()
        if fmt == "jsonl":
            other.write_text(
                "".join(json.dumps({"url": u, "caption": c}) + "\n" for u, c in zip(urls, captions))
            )
        elif fmt == "txt":
            other.write_text("".join(u + "\n" for u in urls))
        else:
            pq.write_table(pa.table({"url": urls, "caption": captions}), other, row_group_size=3000)
        read = pa.Table.from_batches(list(iter_url_list(str(other), CrawlConfig(), batch_rows=999)))
        assert read.column("url").equals(table.column("url"))
        assert read.column("input_row").equals(table.column("input_row"))


def test_a_url_list_of_millions_of_rows_streams_in_bounded_memory(tmp_path):
    """Reading a list of 2,000,000 rows (about 130 MB of TSV) peaks no higher than reading one of
    400,000: memory holds a block of the file and a batch of rows, whatever the list's length."""
    peaks, sizes = {}, {}
    for rows in (400_000, 2_000_000):
        path = tmp_path / f"urls-{rows}.tsv"
        _write_tsv(path, rows)
        sizes[rows] = path.stat().st_size / (1 << 20)
        setup = f"""
            from dalle.config import CrawlConfig
            from dalle.curate.urls import iter_url_list
            uri = {str(path)!r}
        """
        peaks[rows] = _peak_rss_mib(
            setup, f"assert sum(b.num_rows for b in iter_url_list(uri, CrawlConfig())) == {rows}"
        )
    floor = _peak_rss_mib(setup)
    print(json.dumps({"file_mib": sizes, "floor": floor, "streamed": peaks}))
    assert peaks[2_000_000] - peaks[400_000] < 0.1 * (sizes[2_000_000] - sizes[400_000])
    assert peaks[2_000_000] - floor < sizes[2_000_000]


def test_the_url_list_benchmark_prints_its_figures_as_json_on_its_last_line():
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_url_list.py"), "--rows", "20000"],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["rows"] == 20_000 and figures["streamed_peak_mib"] >= figures["floor_peak_mib"] > 0
    bad = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_url_list.py"), "--rows", "0"],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert bad.returncode == 2 and "--rows must be at least 1" in bad.stderr
