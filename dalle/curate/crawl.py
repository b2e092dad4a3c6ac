"""Crawl: a URL list to image–caption pairs under `{root}/raw/`, with img2dataset.

Two steps. `prepare_input` reads the URL list (any supported format), refuses
URLs that must never be fetched (bad scheme, repeated URL, robots.txt) and writes
the normalised list under `raw/_input/`. `run_crawl` hands that list to
`img2dataset.download` in a child process, with the network guard installed in
img2dataset's workers so that no connection reaches a non-public address that the
config does not allow-list, redirects included. img2dataset's incremental mode
makes a re-run skip finished shards; a shard counts as finished once its
`NNNNN_stats.json` exists, and only finished shards are ever read.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from dalle.config import CrawlConfig
from dalle.curate.fetch import TOO_LARGE_MARKER, X_ROBOTS_MESSAGE
from dalle.curate.netguard import BLOCKED_MARKER, AddressPolicy, RobotsChecker, url_refusal
from dalle.curate.urls import read_url_list
from dalle.errors import UserError
from dalle.processes import run_watched
from dalle.runroot import (
    BATCH_PREFIX,
    INPUT_MANIFEST,
    INPUT_NAME,
    MANIFEST,
    RAW_DIR,
    REFUSED_NAME,
    batch_dir,
    batch_input,
)
from dalle.schemas import URL_LIST_SCHEMA
from dalle.storage import Storage, filesystem_for

# Columns of img2dataset's output that later stages read (image bytes are in "jpg"
# whatever their real format, because re-encoding is off).
RAW_IMAGE_COLUMN = "jpg"


class CrawlError(UserError, RuntimeError):
    """The crawl cannot go on; the message says what to do."""


@dataclass
class PreparedInput:
    input_rows: int  # rows of the batch (for a changed list: the rows not seen before)
    to_crawl: int
    refused: dict[str, int] = field(default_factory=dict)
    reused: bool = False
    batch: str = RAW_DIR


def _input_fingerprint(urls_uri: str, cfg: CrawlConfig) -> str:
    fs, path = filesystem_for(urls_uri)
    digest = hashlib.sha256()
    try:
        with fs.open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise CrawlError(f"URL list {urls_uri} does not exist") from None
    settings = cfg.model_dump(
        include={
            "input_format",
            "url_col",
            "caption_col",
            "column_names",
            "allow_networks",
            "respect_robots_txt",
            "user_agent_token",
        }
    )
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def _refused_table(rows: list[dict]) -> pa.Table:
    schema = pa.schema(
        [
            ("input_row", pa.int64()),
            ("url", pa.string()),
            ("caption", pa.string()),
            ("fate", pa.string()),
            ("reason", pa.string()),
            ("detail", pa.string()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def crawl_batches(storage: Storage) -> list[str]:
    """The run root's crawl batches (raw/ first, then raw/batch_NNNN/), each with its input manifest."""
    batches = [RAW_DIR] if storage.exists(INPUT_MANIFEST) else []
    for name in storage.subfolders(RAW_DIR):
        folder = f"{RAW_DIR}/{name}"
        if name.startswith(BATCH_PREFIX) and storage.exists(batch_input(folder, MANIFEST)):
            batches.append(folder)
    return batches


def batch_manifests(storage: Storage) -> dict[str, dict]:
    return {batch: storage.read_json(batch_input(batch, MANIFEST)) for batch in crawl_batches(storage)}


def prepare_input(urls_uri: str, storage: Storage, cfg: CrawlConfig) -> PreparedInput:
    """Normalise the URL list and refuse what must not be fetched. The list the root was crawled from
    is reused as it is; a list that changed since becomes a new batch of the rows not seen before
    (known URLs keep the fate they have), so a grown list is curated incrementally."""
    fingerprint = _input_fingerprint(urls_uri, cfg)
    manifests = batch_manifests(storage)
    for batch, manifest in manifests.items():
        if manifest.get("fingerprint") == fingerprint:
            return PreparedInput(
                manifest["input_rows"], manifest["to_crawl"], manifest["refused"], reused=True, batch=batch
            )

    table = read_url_list(urls_uri, cfg)
    known: set[str] = set()
    for batch in manifests:
        for name in (INPUT_NAME, REFUSED_NAME):
            known.update(
                storage.read_table(batch_input(batch, name), columns=["url"]).column("url").to_pylist()
            )
    offset = sum(m["input_rows"] for m in manifests.values())
    listed = table.num_rows
    if known:
        table = table.filter(pa.array([url not in known for url in table.column("url").to_pylist()]))
    # Row numbers stay unique across the run root's batches: this batch's rows follow the earlier ones.
    table = table.set_column(
        table.schema.get_field_index("input_row"),
        "input_row",
        pa.array(range(offset, offset + table.num_rows), pa.int64()),
    )
    batch = batch_dir(len(manifests))
    urls = table.column("url").to_pylist()
    captions = table.column("caption").to_pylist()
    rows = table.column("input_row").to_pylist()
    refused: list[dict] = []
    refused_rows: set[int] = set()

    def refuse(index: int, fate: str, reason: str, detail: str) -> None:
        refused.append(
            {
                "input_row": rows[index],
                "url": urls[index],
                "caption": captions[index],
                "fate": fate,
                "reason": reason,
                "detail": detail,
            }
        )
        refused_rows.add(index)

    first_seen: dict[str, int] = {}
    for index, url in enumerate(urls):
        problem = url_refusal(url)
        if problem is not None:
            refuse(index, "blocked", *problem)
        elif url in first_seen:
            # The same URL twice would give two samples with one uid: keep the first.
            refuse(index, "duplicate_exact", "repeated_url", f"same URL as input row {first_seen[url]}")
        else:
            first_seen[url] = rows[index]

    if cfg.respect_robots_txt:
        candidates = [index for index in range(len(urls)) if index not in refused_rows]
        checker = RobotsChecker(AddressPolicy(cfg.allow_networks), cfg.user_agent_token, cfg.robots_timeout_s)
        for found, (reason, detail) in checker.disallowed([urls[index] for index in candidates]).items():
            refuse(candidates[found], "blocked", reason, detail)

    keep = pa.array([index not in refused_rows for index in range(len(urls))])
    to_crawl = table.filter(keep).cast(URL_LIST_SCHEMA)
    storage.write_table(batch_input(batch, INPUT_NAME), to_crawl)
    storage.write_table(
        batch_input(batch, REFUSED_NAME), _refused_table(sorted(refused, key=lambda r: r["input_row"]))
    )
    counts = dict(Counter(r["reason"] for r in refused))
    storage.write_json(  # last: the batch exists once its manifest does
        batch_input(batch, MANIFEST),
        {
            "source": urls_uri,
            "fingerprint": fingerprint,
            "input_rows": len(urls),
            "first_input_row": offset,
            "seen_before": listed - len(urls),  # rows of the list that an earlier batch has
            "to_crawl": to_crawl.num_rows,
            "refused": counts,
        },
    )
    return PreparedInput(len(urls), to_crawl.num_rows, counts, batch=batch)


def img2dataset_arguments(storage: Storage, cfg: CrawlConfig, batch: str = RAW_DIR) -> dict:
    """Keyword arguments for `img2dataset.download` of one batch: raw bytes kept as served, sha256 computed."""
    return {
        "url_list": storage.uri(batch_input(batch, INPUT_NAME)),
        "input_format": "parquet",
        "url_col": "url",
        "caption_col": "caption",
        "save_additional_columns": ["input_row", "caption_utf8"],
        "output_folder": storage.uri(batch),
        "output_format": "parquet",
        "processes_count": cfg.processes,
        "thread_count": cfg.threads,
        "timeout": cfg.timeout_s,
        "retries": cfg.retries,
        "number_sample_per_shard": cfg.samples_per_shard,
        "incremental_mode": "incremental",
        # Keep the bytes as served: the filter stage decodes them itself, with bomb checks
        # before decoding, and exact dedup hashes the original bytes.
        "disable_all_reencoding": True,
        "compute_hash": "sha256",
        "extract_exif": False,
        "user_agent_token": cfg.user_agent_token,
        "disallowed_header_directives": cfg.disallowed_header_directives,
        "enable_wandb": False,
    }


def fetch_limits(cfg: CrawlConfig) -> dict:
    """The per-response limits of `dalle.curate.fetch`, as plain values for the crawl's child process."""
    return {
        "max_image_bytes": cfg.max_image_bytes,
        "max_download_s": cfg.max_download_s,
        # Each worker process paces its own requests: spacing them by interval x processes keeps the
        # whole crawl at most one request per interval to a host.
        "host_interval_s": cfg.host_interval_s * cfg.processes,
        "max_retry_after_s": cfg.max_retry_after_s,
    }


def expected_shards(to_crawl: int, cfg: CrawlConfig) -> int:
    return math.ceil(to_crawl / cfg.samples_per_shard)


def finished_shards(storage: Storage, batch: str | None = None) -> list[str]:
    """Relative paths of raw shards (of one batch, or of all) whose stats file exists (img2dataset
    writes it last)."""
    done = []
    for folder in [batch] if batch else crawl_batches(storage):
        stats = {rel[: -len("_stats.json")] for rel in storage.list(folder, "_stats.json")}
        done += [rel for rel in storage.list(folder, ".parquet") if rel[: -len(".parquet")] in stats]
    return done


def run_crawl(
    storage: Storage,
    cfg: CrawlConfig,
    prepared: PreparedInput | None = None,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Download every batch's prepared URLs (skipping finished shards; an earlier batch that was
    stopped is finished first); returns the finished shard paths of all batches.
    img2dataset's output goes to `log`; its process is stopped after cfg.max_crawl_s, or once it
    has printed nothing for cfg.stall_s (a hung download)."""
    for batch, manifest in batch_manifests(storage).items():
        want = expected_shards(manifest["to_crawl"], cfg)
        if len(finished_shards(storage, batch)) >= want:
            continue
        spec = {
            "download": img2dataset_arguments(storage, cfg, batch),
            "allow_networks": list(cfg.allow_networks),
            "limits": fetch_limits(cfg),
        }
        # A child process: img2dataset's spawn-based workers re-import the caller's __main__,
        # which would re-run whatever script called us; `python -m dalle.curate.crawl` is safe.
        command = [sys.executable, "-m", "dalle.curate.crawl", json.dumps(spec)]
        returncode, stopped = run_watched(command, log, cfg.max_crawl_s, cfg.stall_s)
        if stopped:
            raise CrawlError(
                f"the crawl was stopped: {stopped}. Finished shards are kept: run the same command again "
                "to resume (raise crawl.max_crawl_s or crawl.stall_s if the crawl is just slow)"
            )
        if returncode != 0:
            raise CrawlError(
                f"img2dataset exited with status {returncode}; its output is in the log above. "
                "Finished shards are kept: run the same command again to resume."
            )
        done = finished_shards(storage, batch)
        if len(done) < want:
            raise CrawlError(
                f"{want - len(done)} of {want} crawl shards of {storage.uri(batch)} did not finish (see "
                "img2dataset's output above); run the same command again to resume"
            )
    return finished_shards(storage)


def classify_download_error(message: str) -> tuple[str, str]:
    """(fate, reason) for img2dataset's error_message of a failed download."""
    text = message or ""
    lowered = text.lower()
    if BLOCKED_MARKER in text:
        return "blocked", "blocked_address"
    if TOO_LARGE_MARKER in text:
        return "download_failed", "too_large"
    if X_ROBOTS_MESSAGE.lower() in lowered:
        return "blocked", "x_robots_tag"
    if "http error" in lowered:
        code = text.split("HTTP Error", 1)[-1].strip().split(":", 1)[0].strip()
        return "download_failed", f"http_{code}" if code.isdigit() else "http_error"
    if "timed out" in lowered or "timeout" in lowered:
        return "download_failed", "timeout"
    if "connection refused" in lowered:
        return "download_failed", "connection_refused"
    if "connection reset" in lowered or "remote end closed" in lowered:
        return "download_failed", "connection_reset"
    if (
        "name or service not known" in lowered
        or "nodename nor servname" in lowered
        or "getaddrinfo" in lowered
    ):
        return "download_failed", "dns_failure"
    if "unknown url type" in lowered:
        return "blocked", "scheme_not_allowed"
    if "certificate" in lowered or "ssl" in lowered:
        return "download_failed", "tls_error"
    if "incompleteread" in lowered or "incomplete read" in lowered:
        return "download_failed", "truncated_body"
    return "download_failed", "other_error"


RAW_COLUMNS = ["key", "url", "caption", "status", "error_message", "sha256", "input_row", "caption_utf8"]
# Rows of a raw shard held at once by a streamed read: img2dataset writes row groups of 100 rows
# (its parquet writer's buffer), so a read holds about 100 bodies (each at most
# crawl.max_image_bytes), not the shard's crawl.samples_per_shard.
RAW_BATCH_ROWS = 100


def _raw_columns(storage: Storage, rel: str, names: list[str], with_images: bool) -> list[str]:
    columns = RAW_COLUMNS + ([RAW_IMAGE_COLUMN] if with_images else [])
    missing = [c for c in columns if c not in names]
    if missing:
        raise CrawlError(
            f"{storage.uri(rel)} lacks columns {missing}; it was not written by this crawl stage"
        )
    return columns


def read_raw_shard(storage: Storage, rel: str, with_images: bool = True) -> pa.Table:
    """One finished raw shard with the columns the pipeline uses."""
    table = storage.read_table(rel)
    return table.select(_raw_columns(storage, rel, table.column_names, with_images))


def iter_raw_shard(
    storage: Storage, rel: str, with_images: bool = True, batch_rows: int = RAW_BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    """One finished raw shard, streamed as batches of at most `batch_rows` rows with the columns the
    pipeline uses: memory holds a batch (and one Parquet row group), never the whole shard."""
    columns = _raw_columns(storage, rel, storage.parquet_schema(rel).names, with_images)
    yield from storage.iter_batches(rel, batch_rows, columns)


def _child_main(spec_json: str) -> None:
    import img2dataset

    from dalle.curate.fetch import FetchLimits, use_guard_in_img2dataset

    spec = json.loads(spec_json)
    with use_guard_in_img2dataset(spec["allow_networks"], FetchLimits(**spec["limits"])):
        img2dataset.download(**spec["download"])


if __name__ == "__main__":
    _child_main(sys.argv[1])
