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
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from dalle.config import CrawlConfig
from dalle.curate.netguard import BLOCKED_MARKER, AddressPolicy, RobotsChecker, url_refusal
from dalle.curate.urls import read_url_list
from dalle.errors import UserError
from dalle.runroot import INPUT_LIST, INPUT_MANIFEST, RAW_DIR, REFUSED_LIST
from dalle.schemas import URL_LIST_SCHEMA
from dalle.storage import Storage, filesystem_for

# Columns of img2dataset's output that later stages read (image bytes are in "jpg"
# whatever their real format, because re-encoding is off).
RAW_IMAGE_COLUMN = "jpg"
X_ROBOTS_MESSAGE = "disallowed by x-robots-tag"  # img2dataset's message, lower-cased


class CrawlError(UserError, RuntimeError):
    """The crawl cannot go on; the message says what to do."""


@dataclass
class PreparedInput:
    input_rows: int
    to_crawl: int
    refused: dict[str, int] = field(default_factory=dict)
    reused: bool = False


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


def prepare_input(urls_uri: str, storage: Storage, cfg: CrawlConfig) -> PreparedInput:
    """Normalise the URL list and refuse what must not be fetched; reused as is on a re-run."""
    fingerprint = _input_fingerprint(urls_uri, cfg)
    if storage.exists(INPUT_MANIFEST):
        manifest = storage.read_json(INPUT_MANIFEST)
        if manifest.get("fingerprint") != fingerprint:
            raise CrawlError(
                f"{storage.uri(RAW_DIR)} was crawled from {manifest.get('source')} with other crawl settings or "
                f"another version of the list; use a new --out for {urls_uri}, or delete {storage.uri(RAW_DIR)} "
                "to crawl again from scratch"
            )
        return PreparedInput(manifest["input_rows"], manifest["to_crawl"], manifest["refused"], reused=True)

    table = read_url_list(urls_uri, cfg)
    urls = table.column("url").to_pylist()
    captions = table.column("caption").to_pylist()
    refused: list[dict] = []
    refused_rows: set[int] = set()

    def refuse(row: int, fate: str, reason: str, detail: str) -> None:
        refused.append(
            {
                "input_row": row,
                "url": urls[row],
                "caption": captions[row],
                "fate": fate,
                "reason": reason,
                "detail": detail,
            }
        )
        refused_rows.add(row)

    first_seen: dict[str, int] = {}
    for row, url in enumerate(urls):
        problem = url_refusal(url)
        if problem is not None:
            refuse(row, "blocked", *problem)
        elif url in first_seen:
            # The same URL twice would give two samples with one uid: keep the first.
            refuse(row, "duplicate_exact", "repeated_url", f"same URL as input row {first_seen[url]}")
        else:
            first_seen[url] = row

    if cfg.respect_robots_txt:
        candidates = [row for row in range(len(urls)) if row not in refused_rows]
        checker = RobotsChecker(AddressPolicy(cfg.allow_networks), cfg.user_agent_token, cfg.robots_timeout_s)
        for index, (reason, detail) in checker.disallowed([urls[row] for row in candidates]).items():
            refuse(candidates[index], "blocked", reason, detail)

    keep = pa.array([row not in refused_rows for row in range(len(urls))])
    to_crawl = table.filter(keep).cast(URL_LIST_SCHEMA)
    storage.write_table(INPUT_LIST, to_crawl)
    storage.write_table(REFUSED_LIST, _refused_table(sorted(refused, key=lambda r: r["input_row"])))
    counts = dict(Counter(r["reason"] for r in refused))
    storage.write_json(
        INPUT_MANIFEST,
        {
            "source": urls_uri,
            "fingerprint": fingerprint,
            "input_rows": len(urls),
            "to_crawl": to_crawl.num_rows,
            "refused": counts,
        },
    )
    return PreparedInput(len(urls), to_crawl.num_rows, counts)


def img2dataset_arguments(storage: Storage, cfg: CrawlConfig) -> dict:
    """Keyword arguments for `img2dataset.download`: raw bytes kept as served, sha256 computed."""
    return {
        "url_list": storage.uri(INPUT_LIST),
        "input_format": "parquet",
        "url_col": "url",
        "caption_col": "caption",
        "save_additional_columns": ["input_row", "caption_utf8"],
        "output_folder": storage.uri(RAW_DIR),
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


def expected_shards(to_crawl: int, cfg: CrawlConfig) -> int:
    return math.ceil(to_crawl / cfg.samples_per_shard)


def finished_shards(storage: Storage) -> list[str]:
    """Relative paths of raw shards whose stats file exists (img2dataset writes it last)."""
    stats = {rel[: -len("_stats.json")] for rel in storage.list(RAW_DIR, "_stats.json")}
    return [rel for rel in storage.list(RAW_DIR, ".parquet") if rel[: -len(".parquet")] in stats]


def run_crawl(storage: Storage, cfg: CrawlConfig, prepared: PreparedInput) -> list[str]:
    """Download every prepared URL (skipping finished shards); returns the finished shard paths."""
    want = expected_shards(prepared.to_crawl, cfg)
    if prepared.to_crawl and len(finished_shards(storage)) < want:
        spec = {"download": img2dataset_arguments(storage, cfg), "allow_networks": list(cfg.allow_networks)}
        # A child process: img2dataset's spawn-based workers re-import the caller's __main__,
        # which would re-run whatever script called us; `python -m dalle.curate.crawl` is safe.
        result = subprocess.run([sys.executable, "-m", "dalle.curate.crawl", json.dumps(spec)], check=False)
        if result.returncode != 0:
            raise CrawlError(
                f"img2dataset exited with status {result.returncode}; its output is above. "
                "Finished shards are kept: run the same command again to resume."
            )
    done = finished_shards(storage)
    if len(done) < want:
        raise CrawlError(
            f"{want - len(done)} of {want} crawl shards did not finish (see img2dataset's output above); "
            "run the same command again to resume"
        )
    return done


def classify_download_error(message: str) -> tuple[str, str]:
    """(fate, reason) for img2dataset's error_message of a failed download."""
    text = message or ""
    lowered = text.lower()
    if BLOCKED_MARKER in text:
        return "blocked", "blocked_address"
    if X_ROBOTS_MESSAGE in lowered:
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


def read_raw_shard(storage: Storage, rel: str, with_images: bool = True) -> pa.Table:
    """One finished raw shard with the columns the pipeline uses."""
    columns = ["key", "url", "caption", "status", "error_message", "sha256", "input_row", "caption_utf8"]
    if with_images:
        columns.append(RAW_IMAGE_COLUMN)
    table = storage.read_table(rel)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise CrawlError(
            f"{storage.uri(rel)} lacks columns {missing}; it was not written by this crawl stage"
        )
    return table.select(columns)


def _child_main(spec_json: str) -> None:
    import img2dataset

    from dalle.curate.netguard import use_guard_in_img2dataset

    spec = json.loads(spec_json)
    with use_guard_in_img2dataset(spec["allow_networks"]):
        img2dataset.download(**spec["download"])


if __name__ == "__main__":
    _child_main(sys.argv[1])
