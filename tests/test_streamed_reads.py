"""Raw shards and URL lists are read as streams: the filter stage holds one batch of a raw shard, not
the shard, and a URL list of millions of rows is read in batches. The results are those of reading
everything at once; peak memory (ru_maxrss of a child process) is measured against a baseline."""

from __future__ import annotations

import errno
import http.server
import io
import json
import os
import random
import socketserver
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dalle.config import CrawlConfig, RunConfig
from dalle.curate import crawl, fates, filters
from dalle.curate import urls as urls_module
from dalle.curate.crawl import CrawlError, _refused_table, iter_raw_shard, read_raw_shard
from dalle.curate.fates import iter_images
from dalle.curate.netguard import url_refusal
from dalle.curate.urls import UrlListError, iter_url_list, read_url_list
from dalle.runroot import (
    FILTER_TABLE,
    INPUT_MANIFEST,
    INPUT_NAME,
    MANIFEST,
    REFUSED_LIST,
    REFUSED_NAME,
    batch_input,
)
from dalle.schemas import URL_LIST_SCHEMA
from dalle.storage import TEMP_PREFIX, Storage, StorageError

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
    # 150 MB more shard: a whole read grows by all of it, a streamed one by the allocator's slack (measured
    # 10-30 MB between runs, so the bound leaves room for that and still catches a whole read 2.5 times over).
    assert streamed_large - streamed_small < 0.4 * growth_mib
    assert streamed_large - floor < 0.75 * (whole - floor)


def _write_tsv(path: Path, rows: int, pad: int = 0) -> None:
    """A TSV list of `rows` rows; `pad` more characters in each URL's path and each caption make rows
    as long as real lists' (pad=60: about 190 bytes a row)."""
    folder, tail = (f"{'x' * pad}/", f" {'x' * pad}") if pad else ("", "")
    with open(path, "w") as out:
        out.write("url\tcaption\n")
        out.writelines(
            f"http://host{i % 997}.test/img/{folder}{i}.jpg\ta photo of thing number {i}{tail}\n"
            for i in range(rows)
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


class _ReadLog(io.RawIOBase):
    """A file that notes which thread reads it and where each read starts, and each seek to 0."""

    def __init__(self, path: Path):
        self.file, self.events = open(path, "rb"), []  # noqa: SIM115 (closed by close())

    def readable(self):
        return True

    def readinto(self, buffer):
        self.events.append(("read", threading.get_ident(), self.file.tell()))
        return self.file.readinto(buffer)

    def seek(self, offset, whence=0):
        if (offset, whence) == (0, 0):
            self.events.append(("seek", threading.get_ident(), 0))
        return self.file.seek(offset, whence)

    def tell(self):
        return self.file.tell()

    def seekable(self):
        return True

    def close(self):
        self.file.close()
        super().close()


@pytest.mark.parametrize("fmt", ["tsv", "csv"])
def test_the_header_probe_of_a_delimited_list_never_reads_the_handle_behind_the_readers_back(
    tmp_path, monkeypatch, fmt
):
    """Arrow's CSV reader reads blocks ahead on a background thread. A header probe opened on the
    list's own handle went on reading it after the handle was rewound for the main reader, which then
    began mid-file ("Column 'url' in include_columns does not exist") once in a few thousand runs. So
    every read before the last rewind happens on the calling thread, and the rows come out whole."""
    path = tmp_path / f"urls.{fmt}"
    _write_tsv(path, 50_000, pad=60)  # about 9 MB: many of the reader's blocks
    if fmt == "csv":
        path.write_text(path.read_text().replace("\t", ","))
    handles = []

    class LoggedFiles:
        def open(self, where, mode):
            handles.append(_ReadLog(Path(where)))
            return handles[-1]

    monkeypatch.setattr(urls_module, "filesystem_for", lambda uri: (LoggedFiles(), uri))
    table = pa.Table.from_batches(list(iter_url_list(str(path), CrawlConfig(), batch_rows=7_000)))
    assert table.column("input_row").to_pylist() == list(range(50_000))
    assert table.column("url")[49_999].as_py().endswith("/49999.jpg")
    (handle,) = handles
    rewinds = [n for n, event in enumerate(handle.events) if event[0] == "seek"]
    before = handle.events[: rewinds[-1]]
    assert {thread for _, thread, _ in before} == {threading.get_ident()}, before
    assert next(start for kind, _, start in handle.events[rewinds[-1] :] if kind == "read") == 0


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
    # Reading the list whole would grow by more than the file (the Arrow table and its offsets); a
    # stream grows by its warm-up and allocator noise only (12-24 MiB seen on a 102 MiB difference; the
    # benchmark's 10M rows peak 128 MiB above the imports, as 2M rows do here).
    assert peaks[2_000_000] - peaks[400_000] < 0.4 * (sizes[2_000_000] - sizes[400_000])


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
    assert figures["prepare_input_peak_mib"] >= figures["prepare_floor_peak_mib"] > 0
    assert figures["prepare_input_s"] > 0 and figures["prepare_input_rows_per_s"] > 0
    bad = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_url_list.py"), "--rows", "0"],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert bad.returncode == 2 and "--rows must be at least 1" in bad.stderr


# --- prepare_input: the list streams through, repeats are found by digest ---------------------------


def _expected_fates(rows: list[tuple[str, str | None]], first_row: int = 0, known=frozenset()) -> dict:
    """The fates of a whole list read at once, as a dict and a list would give them: rows whose URL an
    earlier batch has are not this batch's; the others are numbered from `first_row`; a URL that must
    not be fetched is blocked, a later row of a URL gets duplicate_exact, naming the first row."""
    fates, first_of = {}, {}
    for number, (url, caption) in enumerate([r for r in rows if r[0] not in known]):
        row = first_row + number
        if (problem := url_refusal(url)) is not None:
            fates[row] = (url, caption, "blocked", *problem)
        elif url in first_of:
            detail = f"same URL as input row {first_of[url]}"
            fates[row] = (url, caption, "duplicate_exact", "repeated_url", detail)
        else:
            first_of[url] = row
            fates[row] = (url, caption, "crawl", None, None)
    return fates


def _batch_fates(storage: Storage, batch: str) -> dict:
    """Each input row's fate as prepare_input wrote it for `batch`: the to-crawl and refused tables,
    which must partition the batch's rows (each in input order)."""
    to_crawl = storage.read_table(batch_input(batch, INPUT_NAME))
    refused = storage.read_table(batch_input(batch, REFUSED_NAME)).to_pylist()
    assert to_crawl.schema.equals(URL_LIST_SCHEMA, check_metadata=False)
    to_crawl = to_crawl.to_pylist()
    crawl_rows, refused_rows = [r["input_row"] for r in to_crawl], [r["input_row"] for r in refused]
    assert crawl_rows == sorted(crawl_rows) and refused_rows == sorted(refused_rows)
    rows = crawl_rows + refused_rows
    manifest = storage.read_json(batch_input(batch, MANIFEST))
    first = manifest["first_input_row"]
    assert sorted(rows) == list(range(first, first + manifest["input_rows"]))  # each row once, none lost
    fates = {r["input_row"]: (r["url"], r["caption"], "crawl", None, None) for r in to_crawl}
    fates.update(
        {r["input_row"]: (r["url"], r["caption"], r["fate"], r["reason"], r["detail"]) for r in refused}
    )
    return fates


def _check_manifest(storage: Storage, batch: str, expected: dict, listed: int, first: int) -> None:
    manifest = storage.read_json(batch_input(batch, MANIFEST))
    reasons = Counter(fate[3] for fate in expected.values() if fate[2] != "crawl")
    assert manifest["refused"] == dict(reasons)
    assert (manifest["input_rows"], manifest["first_input_row"]) == (len(expected), first)
    assert manifest["to_crawl"] == sum(fate[2] == "crawl" for fate in expected.values())
    assert manifest["seen_before"] == listed - len(expected)


def _write_list(path: Path, rows: list[tuple[str, str | None]]) -> str:
    urls, captions = zip(*rows)
    pq.write_table(pa.table({"url": list(urls), "caption": list(captions)}), path, row_group_size=50)
    return str(path)


BLOCKED_URLS = ["ftp://h1.test/a.jpg", "http:///no-host.jpg", "", "file:///etc/passwd", "no url at all"]


def test_prepare_input_streams_a_list_into_the_fates_of_the_whole_list(run_root, tmp_path, monkeypatch):
    """Batches of 7 rows and runs of 4 digests before they merge: repeats within a batch and across
    batches, blocked URLs (repeated too), then a grown list whose known URLs are left out and whose
    new rows continue the numbering; fates equal those of the whole list at once."""
    monkeypatch.setattr(crawl, "URL_BATCH_ROWS", 7)
    monkeypatch.setattr(crawl, "_MIN_RUN_CAP", 4)
    rng = random.Random(7)
    storage, cfg = Storage(run_root), CrawlConfig(respect_robots_txt=False)

    def draw(pool: list[str], count: int, start: int) -> list[tuple[str, str | None]]:
        return [
            (rng.choice(BLOCKED_URLS) if rng.random() < 0.15 else rng.choice(pool), f"caption {start + n}")
            if n % 13
            else (rng.choice(pool), None)
            for n in range(count)
        ]

    old_pool = [f"http://h{k % 5}.test/p/{k}.jpg" for k in range(40)]
    first_rows = draw(old_pool, 150, 0)
    prepared = crawl.prepare_input(_write_list(tmp_path / "v1.parquet", first_rows), storage, cfg)
    expected = _expected_fates(first_rows)
    assert _batch_fates(storage, "raw") == expected
    _check_manifest(storage, "raw", expected, 150, 0)
    to_crawl = sum(fate[2] == "crawl" for fate in expected.values())
    assert (prepared.batch, prepared.input_rows, prepared.to_crawl) == ("raw", 150, to_crawl)
    # The list exercises what it means to: repeats in a batch and across batches, blocked rows.
    repeats = [(row, int(f[4].rsplit(" ", 1)[1])) for row, f in expected.items() if f[3] == "repeated_url"]
    assert any(row // 7 == first // 7 for row, first in repeats)
    assert any(row // 7 > first // 7 + 1 for row, first in repeats)
    assert {fate[3] for fate in expected.values()} >= {"repeated_url", "scheme_not_allowed", "malformed_url"}

    # Version 2: known URLs (old and blocked ones) among new ones, some of them repeated.
    new_pool = [f"https://h{k % 3}.test/new/{k}.jpg" for k in range(25)] + ["ftp://h9.test/new.jpg"]
    grown = draw(old_pool, 60, 1000) + draw(new_pool, 90, 2000)
    rng.shuffle(grown)
    prepared = crawl.prepare_input(_write_list(tmp_path / "v2.parquet", grown), storage, cfg)
    expected = _expected_fates(grown, first_row=150, known={u for u, _ in first_rows})
    assert prepared.batch == "raw/batch_0001" and prepared.input_rows == len(expected) < 150
    assert _batch_fates(storage, "raw/batch_0001") == expected
    _check_manifest(storage, "raw/batch_0001", expected, 150, 150)
    assert any(fate[3] == "repeated_url" for fate in expected.values())


class _RobotsServer(http.server.ThreadingHTTPServer):
    """A loopback site whose robots.txt disallows /private/; counts the robots.txt requests."""

    daemon_threads = True

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server = self.server
                body = b"User-agent: *\nDisallow: /private/\n" if self.path == "/robots.txt" else b"?"
                with server.lock:
                    server.robots_requests += self.path == "/robots.txt"
                self.send_response(200 if self.path == "/robots.txt" else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.robots_requests = 0

    def server_bind(self) -> None:  # no reverse DNS query for the server's name
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


@pytest.mark.parametrize("kept", [3, 1])
def test_prepare_input_checks_robots_txt_in_calls_and_remembers_a_bounded_number_of_origins(
    tmp_path, monkeypatch, kept
):
    """Three loopback sites, checked 3 URLs a call in batches of 7 rows: disallowed URLs are refused
    (a repeat of one is a repeat), and each site's robots.txt is fetched once while its rules are kept
    (3 origins kept), again after they were forgotten (1 kept)."""
    monkeypatch.setattr(crawl, "URL_BATCH_ROWS", 7)
    monkeypatch.setattr(crawl, "ROBOTS_URLS_PER_CALL", 3)
    monkeypatch.setattr(crawl, "ROBOTS_ORIGINS_KEPT", kept)
    servers = [_RobotsServer() for _ in range(3)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        rng = random.Random(kept)
        ports = [server.server_port for server in servers]
        rows = [
            (f"http://127.0.0.1:{rng.choice(ports)}/{rng.choice(['img', 'private'])}/{n % 40}.jpg", "c")
            for n in range(60)
        ]
        cfg = CrawlConfig(allow_networks=["127.0.0.1/32"], robots_timeout_s=5)
        crawl.prepare_input(_write_list(tmp_path / "urls.parquet", rows), Storage(tmp_path / "run"), cfg)
        fetches = [s.robots_requests for s in servers]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    expected = _expected_fates(rows)
    for row, (url, caption, fate, _, _) in expected.items():
        if fate == "crawl" and "/private/" in url:
            origin = url.split("/private/")[0]
            detail = f"{origin}/robots.txt disallows this URL for user agent {cfg.user_agent_token!r}"
            expected[row] = (url, caption, "blocked", "robots_txt", detail)
    assert _batch_fates(Storage(tmp_path / "run"), "raw") == expected
    assert {fate[3] for fate in expected.values()} >= {None, "robots_txt", "repeated_url"}
    if kept == 3:
        assert fetches == [1, 1, 1]
    else:
        assert min(fetches) >= 1 and sum(fetches) > 3  # forgotten rules are fetched again, not kept all


# --- _UrlDigests: sorted runs that merge, looked up like a dict -------------------------------------


def test_url_digests_find_what_a_dict_finds_as_runs_merge(monkeypatch):
    monkeypatch.setattr(crawl, "_MIN_RUN_CAP", 64)
    rng = np.random.default_rng(3)
    # Random digests, and some that differ only in trailing or embedded NUL bytes, which a bytes dtype
    # must not take for equal.
    crafted = [b"\x00" * 16, b"\x00" * 15 + b"\x01", b"\x01" + b"\x00" * 15, b"a\x00b" + b"\x00" * 13]
    crafted += [b"a\x00c" + b"\x00" * 13, b"a" + b"\x00" * 15, b"\xff" * 16, b"\xff" * 15 + b"\x00"]
    pool = np.unique(np.concatenate([np.array(crafted, "S16"), np.frombuffer(rng.bytes(16 * 60_000), "S16")]))
    pool = pool[rng.permutation(len(pool))]
    members, absent = pool[:50_000], pool[50_000:]
    digests = crawl._UrlDigests(b"k" * 16)
    reference: dict[bytes, int] = {}
    start, largest = 0, 0
    while start < len(members):
        size = int(rng.choice([1, 2, 7, 64, 300, 1000, 4000]))
        part = members[start : start + size]
        rows = rng.integers(0, 1 << 40, len(part))
        digests.add(part, rows)
        reference.update(zip(part.tolist(), rows.tolist()))
        start, largest = start + len(part), max(largest, len(part))
        runs = digests._runs
        assert len(digests) == len(reference) == sum(len(keys) for keys, _ in runs)
        assert all(np.all(keys[:-1] < keys[1:]) for keys, _ in runs)  # each run sorted, no repeats
        assert max(len(keys) for keys, _ in runs) <= max(64, len(digests) // 8, largest)
        if rng.random() < 0.1 or start == len(members):
            probe = np.concatenate([rng.choice(members[:start], 500), rng.choice(absent, 500)])
            probe = np.concatenate([probe, np.array(crafted, "S16")])
            want = [reference.get(d, -1) for d in probe.tolist()]
            assert digests.find(probe).tolist() == want
    assert len(digests._runs) < 40  # runs merge: 50,000 digests in a few dozen, not one per add
    assert digests.find(members).tolist() == [reference[d] for d in members.tolist()]
    assert (digests.find(absent) == -1).all()
    assert digests.find(absent[:0]).tolist() == []


def test_url_digests_are_keyed_and_take_any_text():
    one, other = crawl._UrlDigests(b"a" * 16), crawl._UrlDigests(b"b" * 16)
    urls = ["http://a.test/x", "http://a.test/x", "http://a.test/y", "http://a.test/\ud800", ""]
    mine = one.digests(urls)
    assert mine.dtype == np.dtype("S16") and len(mine) == 5
    assert mine[0] == mine[1] and len(set(mine.tolist())) == 4
    assert not set(mine.tolist()) & set(other.digests(urls).tolist())  # another call's key, other digests


def test_a_list_that_fails_late_leaves_no_input_tables(tmp_path, monkeypatch):
    """A JSONL list whose caption key is in no line is refused after its last batch streamed into the
    to-crawl table: neither table is left, nor a temporary file, nor a manifest."""
    monkeypatch.setattr(crawl, "URL_BATCH_ROWS", 7)
    path = tmp_path / "urls.jsonl"
    path.write_text("".join(json.dumps({"url": f"http://h.test/{n}.jpg"}) + "\n" for n in range(30)))
    storage = Storage(tmp_path / "run")
    with pytest.raises(UrlListError, match="caption key"):
        crawl.prepare_input(str(path), storage, CrawlConfig(respect_robots_txt=False))
    assert [files for _, _, files in os.walk(tmp_path / "run") if files] == []
    assert crawl.crawl_batches(storage) == []


def test_prepare_input_of_a_million_rows_holds_their_digests_not_the_list(tmp_path):
    """prepare_input of 1,000,000 rows (about 180 MB of TSV, rows as long as real lists') peaks no more
    above 200,000 rows than the digests of 800,000 URLs (24 bytes each, twice while two runs merge) and
    allocator noise; holding the list would cost more than its 140 MB more of file."""
    peaks, sizes, seconds = {}, {}, {}
    for rows in (200_000, 1_000_000):
        path = tmp_path / f"urls-{rows}.tsv"
        _write_tsv(path, rows, pad=60)
        sizes[rows] = path.stat().st_size / (1 << 20)
        setup = f"""
            from dalle.config import CrawlConfig
            from dalle.curate.crawl import prepare_input
            from dalle.storage import Storage
            uri, root = {str(path)!r}, {str(tmp_path / f"run-{rows}")!r}
        """
        work = f"""
prepared = prepare_input(uri, Storage(root), CrawlConfig(respect_robots_txt=False))
assert (prepared.input_rows, prepared.to_crawl) == ({rows}, {rows}), prepared
"""
        started = time.perf_counter()
        peaks[rows] = _peak_rss_mib(setup, work)
        seconds[rows] = round(time.perf_counter() - started, 1)
    print(json.dumps({"file_mib": sizes, "peak_mib": peaks, "seconds": seconds}))
    digests_mib = 2 * (crawl.URL_DIGEST_BYTES + 8) * 800_000 / (1 << 20)
    file_mib = sizes[1_000_000] - sizes[200_000]
    assert peaks[1_000_000] - peaks[200_000] < digests_mib + 0.3 * file_mib
    assert digests_mib + 0.3 * file_mib < 0.6 * file_mib  # so the test tells a held list apart


# --- iter_images: bodies in the order asked, read ahead on disk -------------------------------------


class _CountingSpill:
    """iter_images' temporary file, counting the bytes spilled to it."""

    def __init__(self, file):
        self.file, self.written = file, 0

    def write(self, data: bytes) -> int:
        self.written += len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def test_iter_images_hands_out_a_whole_shard_reads_bytes_in_the_order_asked(run_root, monkeypatch):
    storage = Storage(run_root)
    _write_raw_root(storage, shards=2, rows_per_shard=250)
    bodies = {}
    for rel in ("raw/00000.parquet", "raw/00001.parquet"):
        table = read_raw_shard(storage, rel)
        bodies[rel] = dict(zip(table.column("key").to_pylist(), table.column("jpg").to_pylist()))
    reverse = [f"{i:09d}" for i in range(249, -1, -1)]  # the first one asked is the shard's last row
    reverse.insert(10, reverse[200])  # asked twice, far apart
    reverse.insert(3, reverse[3])  # asked twice in a row
    forward = [f"{i:09d}" for i in range(250, 500, 3)] + ["000000250"]
    runs = [
        ("raw/00000.parquet", reverse),
        ("raw/00001.parquet", forward),
        ("raw/00000.parquet", ["000000007"]),
    ]
    rows = [{"raw_shard": rel, "raw_key": key} for rel, keys in runs for key in keys]
    spills = []

    def counting(*args, **kwargs):
        spills.append(_CountingSpill(tempfile.TemporaryFile(*args, **kwargs)))  # noqa: SIM115 - it closes it
        return spills[-1]

    monkeypatch.setattr(fates, "tempfile", types.SimpleNamespace(TemporaryFile=counting))
    chunks = list(iter_images(storage, rows, chunk=3))
    assert [len(indices) for indices, _ in chunks] == [3] * (len(rows) // 3) + [len(rows) % 3]
    assert [index for indices, _ in chunks for index in indices] == list(range(len(rows)))
    assert all(len(indices) == len(images) for indices, images in chunks)
    images = [image for _, chunk in chunks for image in chunk]
    assert images == [bodies[row["raw_shard"]][row["raw_key"]] for row in rows]  # a naive whole-shard read
    assert len(spills) == len(runs)
    shard_bytes = sum(len(body) for body in bodies["raw/00000.parquet"].values() if body)
    assert spills[0].written > shard_bytes / 2  # read ahead of their turn: on disk, not in memory
    assert spills[1].written == spills[2].written == 0  # rows asked in shard order never wait


def test_iter_images_names_a_key_the_shard_lacks(run_root):
    storage = Storage(run_root)
    _write_raw_root(storage, shards=1, rows_per_shard=50)
    rows = [
        {"raw_shard": "raw/00000.parquet", "raw_key": key} for key in ("000000040", "000000999", "000000002")
    ]
    handed = []
    with pytest.raises(CrawlError, match="'000000999'") as raised:
        for indices, _ in iter_images(storage, rows, chunk=1):
            handed += indices
    assert storage.uri("raw/00000.parquet") in str(raised.value)
    assert handed == [0]  # the rows before it were handed out, none after it
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        next(iter_images(storage, rows, chunk=0))


# --- Storage.write_parquet: atomic, from batches as they come ---------------------------------------

PARTS_SCHEMA = pa.schema([("n", pa.int64()), ("text", pa.string())])


class _BatchesFailed(RuntimeError):
    pass


def _parts(count: int, fail_at: int | None = None, error: BaseException | None = None):
    """`count` parts of 0 to 400 rows (Tables and RecordBatches), raising `error` before part `fail_at`."""
    for k in range(count):
        if k == fail_at:
            raise error  # type: ignore[misc]
        rows = 0 if k == 1 else 100 * k
        columns = {
            "n": pa.array(range(rows), pa.int64()),
            "text": pa.array([f"{k}-{n}" for n in range(rows)]),
        }
        yield (
            pa.table(columns, schema=PARTS_SCHEMA) if k % 2 else pa.record_batch(columns, schema=PARTS_SCHEMA)
        )


def test_write_parquet_writes_the_batches_as_they_come(run_root):
    storage = Storage(run_root)
    assert storage.write_parquet("out/t.parquet", PARTS_SCHEMA, _parts(5)) == storage.uri("out/t.parquet")
    expected = pa.Table.from_batches(
        [b for p in _parts(5) for b in (p.to_batches() if isinstance(p, pa.Table) else [p])], PARTS_SCHEMA
    )
    assert storage.read_table("out/t.parquet").equals(expected)
    with pq.ParquetFile(pa.BufferReader(storage.read_bytes("out/t.parquet"))) as parquet:
        assert parquet.num_row_groups == 3  # one per non-empty part
    storage.write_parquet("out/empty.parquet", PARTS_SCHEMA, iter(()))
    empty = storage.read_table("out/empty.parquet")
    assert empty.num_rows == 0 and empty.schema.equals(PARTS_SCHEMA)


@pytest.mark.parametrize("failure", ["own", "oserror", "schema"])
def test_write_parquet_leaves_no_file_when_its_batches_fail(run_root, tmp_path, monkeypatch, failure):
    """A failure halfway through the batches (the caller's own error, an OSError of its own, which is
    not taken for the write's, or a batch of another schema) leaves no file and no temporary, and an
    existing file at the target as it was."""
    local_temp = tmp_path / "local-temp"
    local_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(local_temp))  # where an S3 write stages its file
    storage = Storage(run_root)
    storage.write_parquet("out/kept.parquet", PARTS_SCHEMA, _parts(3))
    before = storage.read_bytes("out/kept.parquet")
    for rel in ("out/new.parquet", "out/kept.parquet"):
        if failure == "schema":
            parts = [*_parts(3), pa.record_batch({"other": [1.5]}), *_parts(2)]
            with pytest.raises((ValueError, pa.ArrowException)):
                storage.write_parquet(rel, PARTS_SCHEMA, parts)
            continue
        error = (
            _BatchesFailed("the list broke halfway")
            if failure == "own"
            else OSError(errno.ENOSPC, "No space left on device", "urls.tsv")
        )
        with pytest.raises(type(error)) as raised:
            storage.write_parquet(rel, PARTS_SCHEMA, _parts(5, fail_at=3, error=error))
        assert raised.value is error and not isinstance(raised.value, StorageError)
    assert not storage.exists("out/new.parquet")
    assert storage.read_bytes("out/kept.parquet") == before
    assert storage.list("out") == ["out/kept.parquet"]
    if not storage.is_s3:
        assert os.listdir(storage.path("out")) == ["kept.parquet"]  # no .tmp-* left behind
    assert [name for name in os.listdir(local_temp) if name.startswith("dalle-")] == []


def test_write_parquet_reports_a_full_disk_of_its_own(tmp_path, monkeypatch):
    storage = Storage(tmp_path / "run")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError, match="the disk is full"):
        storage.write_parquet("out/t.parquet", PARTS_SCHEMA, _parts(3))
    assert not any(name.startswith(TEMP_PREFIX) for name in os.listdir(storage.path("out")))
    assert not storage.exists("out/t.parquet")
