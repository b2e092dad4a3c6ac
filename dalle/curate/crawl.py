"""Crawl: a URL list to image–caption pairs under `{root}/raw/`, with img2dataset.

Two steps. `prepare_input` reads the URL list (any supported format), refuses
URLs that must never be fetched (bad scheme, repeated URL, robots.txt) and writes
the normalised list under `raw/_input/`. `run_crawl` hands that list to
`img2dataset.download` in a child process, with the network guard installed in
img2dataset's workers so that no connection reaches a non-public address that the
config does not allow-list, redirects included (names of the static host map
`crawl.resolve` get their mapped address in both steps, checked the same way).
img2dataset's incremental mode makes a re-run skip finished shards; a shard counts
as finished once its `NNNNN_stats.json` exists, and only finished shards are ever read.

img2dataset runs the shards on `crawl.distributor`: its own worker processes, or Ray or Spark, which
the child process starts (or connects to) around the download and stops after
(`dalle.curate.engines`); the guard travels with img2dataset's downloader to every worker.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dalle.config import CrawlConfig
from dalle.curate.engines import check_engine, engine_spec
from dalle.curate.fetch import TOO_LARGE_MARKER, X_ROBOTS_MESSAGE
from dalle.curate.netguard import BLOCKED_MARKER, AddressPolicy, RobotsChecker, url_refusal
from dalle.curate.urls import URL_BATCH_ROWS, iter_url_list
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
    if cfg.resolve:
        # robots.txt is read at the mapped addresses. Left out when empty, so earlier roots keep their fingerprints.
        settings["resolve"] = cfg.resolve
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


REFUSED_SCHEMA = pa.schema(
    [
        ("input_row", pa.int64()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("fate", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


def _refused_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=REFUSED_SCHEMA)


# Repeated URLs are found by digest, so that memory holds 24 bytes a row (digest and input row), never the
# URLs. 128 bits of keyed BLAKE2b: two different URLs of a list of n share a digest with probability
# about n^2 / 2^129 (1e-25 for ten million, 1e-21 for a billion), and the key is drawn at random for
# each call, so no list can be written to make two of its URLs collide. A digest match is therefore
# taken as the same URL: checking it against the URL itself would mean holding the URLs.
URL_DIGEST_BYTES = 16
_MIN_RUN_CAP = 1 << 21  # digests a run may reach by merging, at least (48 MiB with their rows)


class _UrlDigests:
    """A set of URLs as keyed digests, each with an input row: sorted runs that merge as they grow (a
    log-structured set), so adding a batch and looking one up cost O(batch x log n). A merge never
    builds a run of more than an eighth of the set (or _MIN_RUN_CAP), so it needs little beyond the set."""

    def __init__(self, key: bytes):
        self._hasher = hashlib.blake2b(digest_size=URL_DIGEST_BYTES, key=key)
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def digests(self, urls: Sequence[str]) -> np.ndarray:
        def one(url: str) -> bytes:
            hasher = self._hasher.copy()
            hasher.update(url.encode("utf-8", errors="surrogatepass"))
            return hasher.digest()

        return np.frombuffer(b"".join(map(one, urls)), dtype=f"S{URL_DIGEST_BYTES}")

    def find(self, digests: np.ndarray) -> np.ndarray:
        """The input row stored with each digest; -1 where the set does not hold it."""
        found = np.full(len(digests), -1, np.int64)
        for keys, rows in self._runs:
            at = np.minimum(np.searchsorted(keys, digests), len(keys) - 1)
            hit = keys[at] == digests
            found[hit] = rows[at[hit]]
        return found

    def add(self, digests: np.ndarray, rows: np.ndarray) -> None:
        """Add digests the set does not hold yet, each once, with their input rows."""
        if not len(digests):
            return
        order = np.argsort(digests, kind="stable")
        self._runs.append((digests[order], np.asarray(rows, np.int64)[order]))
        self._size += len(digests)
        cap = max(_MIN_RUN_CAP, self._size // 8)
        while len(self._runs) > 1:
            (keys_a, rows_a), (keys_b, rows_b) = self._runs[-2], self._runs[-1]
            if len(keys_a) > 2 * len(keys_b) or len(keys_a) + len(keys_b) > cap:
                break
            # Merge two sorted runs: b's entries go where a's order puts them.
            at = np.searchsorted(keys_a, keys_b) + np.arange(len(keys_b))
            from_b = np.zeros(len(keys_a) + len(keys_b), bool)
            from_b[at] = True
            keys = np.empty(len(from_b), keys_a.dtype)
            merged_rows = np.empty(len(from_b), np.int64)
            keys[at], merged_rows[at] = keys_b, rows_b
            keys[~from_b], merged_rows[~from_b] = keys_a, rows_a
            self._runs[-2:] = [(keys, merged_rows)]


class _RememberingRobots(RobotsChecker):
    """A RobotsChecker that keeps the rules of the last `keep` origins between calls, so a list checked
    batch by batch fetches an origin's robots.txt once while its URLs keep coming, and memory holds the
    rules of a bounded number of origins."""

    def __init__(self, *args, keep: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._keep = keep
        self._remembered: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def _rules_for(self, origin):
        with self._lock:
            if origin in self._remembered:
                self._remembered.move_to_end(origin)
                return self._remembered[origin]
        rules = super()._rules_for(origin)
        with self._lock:
            self._remembered[origin] = rules
            while len(self._remembered) > self._keep:
                self._remembered.popitem(last=False)
        return rules


ROBOTS_URLS_PER_CALL = 1024  # URLs (so origins) whose robots.txt rules are fetched and held at once
ROBOTS_ORIGINS_KEPT = 1024  # origins whose rules are remembered between calls


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
    (known URLs keep the fate they have), so a grown list is curated incrementally.

    The list streams through batch by batch (iter_url_list), and so do the tables it writes: memory
    holds a batch of rows, the digests of the URLs seen (URL_DIGEST_BYTES and an input row each, for
    repeated URLs and those of earlier batches) and the robots.txt rules of a bounded number of
    origins, never the list."""
    fingerprint = _input_fingerprint(urls_uri, cfg)
    manifests = batch_manifests(storage)
    for batch, manifest in manifests.items():
        if manifest.get("fingerprint") == fingerprint:
            return PreparedInput(
                manifest["input_rows"], manifest["to_crawl"], manifest["refused"], reused=True, batch=batch
            )

    key = os.urandom(16)
    known = _UrlDigests(key)  # URLs of the earlier batches
    for earlier in manifests:
        for name in (INPUT_NAME, REFUSED_NAME):
            for part in storage.iter_batches(batch_input(earlier, name), URL_BATCH_ROWS, ["url"]):
                digests = np.unique(known.digests(part.column("url").to_pylist()))
                digests = digests[known.find(digests) < 0]
                known.add(digests, np.zeros(len(digests), np.int64))
    offset = sum(m["input_rows"] for m in manifests.values())
    batch = batch_dir(len(manifests))
    state = _Preparing(cfg, offset, _UrlDigests(key), known)
    with tempfile.TemporaryDirectory(prefix="dalle-refused-") as folder:
        spool_path = os.path.join(folder, "refused.parquet")
        # The refused rows wait in a local file while the list streams into the to-crawl table.
        with pq.ParquetWriter(spool_path, REFUSED_SCHEMA, compression="zstd") as spool:
            storage.write_parquet(
                batch_input(batch, INPUT_NAME), URL_LIST_SCHEMA, state.to_crawl(urls_uri, spool)
            )
        with pq.ParquetFile(spool_path) as refused:
            storage.write_parquet(
                batch_input(batch, REFUSED_NAME), REFUSED_SCHEMA, refused.iter_batches(URL_BATCH_ROWS)
            )
    counts = {**state.refused, **state.robots_refused}  # as listed before: URL checks, then robots.txt
    storage.write_json(  # last: the batch exists once its manifest does
        batch_input(batch, MANIFEST),
        {
            "source": urls_uri,
            "fingerprint": fingerprint,
            "input_rows": state.rows,
            "first_input_row": offset,
            "seen_before": state.listed - state.rows,  # rows of the list that an earlier batch has
            "to_crawl": state.kept,
            "refused": counts,
        },
    )
    return PreparedInput(state.rows, state.kept, counts, batch=batch)


class _Preparing:
    """prepare_input's pass over the list: the fates of each batch of rows, and the counts so far."""

    def __init__(self, cfg: CrawlConfig, offset: int, seen: _UrlDigests, known: _UrlDigests):
        self.cfg, self.offset, self.seen, self.known = cfg, offset, seen, known
        self.listed = self.rows = self.kept = 0
        self.refused: Counter = Counter()
        self.robots_refused: Counter = Counter()
        self.checker = (
            _RememberingRobots(
                AddressPolicy(cfg.allow_networks, cfg.resolve),
                cfg.user_agent_token,
                cfg.robots_timeout_s,
                keep=ROBOTS_ORIGINS_KEPT,
            )
            if cfg.respect_robots_txt
            else None
        )

    def to_crawl(self, urls_uri: str, spool: pq.ParquetWriter) -> Iterator[pa.RecordBatch]:
        """The rows to crawl, batch by batch; the refused ones are written to `spool`."""
        for part in iter_url_list(urls_uri, self.cfg, URL_BATCH_ROWS):
            self.listed += part.num_rows
            digests = self.seen.digests(part.column("url").to_pylist())
            if len(self.known):
                new = self.known.find(digests) < 0
                part, digests = part.filter(pa.array(new)), digests[new]
            part, keep, refused = self._fates(part, digests)
            if refused:
                spool.write_table(_refused_table(sorted(refused, key=lambda r: r["input_row"])))
            to_crawl = part.filter(pa.array(keep, pa.bool_())).cast(URL_LIST_SCHEMA)
            self.kept += to_crawl.num_rows
            yield to_crawl

    def _fates(
        self, part: pa.RecordBatch, digests: np.ndarray
    ) -> tuple[pa.RecordBatch, list[bool], list[dict]]:
        """The batch with its rows renumbered after those before them, which of them to crawl, and the
        refused ones: a URL that is not http(s) with a host, one that a row before has (the first row
        keeps it, as the same URL twice would give two samples one uid), one that robots.txt rules out."""
        count = part.num_rows
        # Row numbers stay unique across the run root's batches: this batch's rows follow the earlier ones.
        first = self.offset + self.rows
        part_rows = np.arange(first, first + count, dtype=np.int64)
        part = part.set_column(
            part.schema.get_field_index("input_row"), "input_row", pa.array(part_rows, pa.int64())
        )
        self.rows += count
        urls = part.column("url").to_pylist()
        captions = part.column("caption").to_pylist()
        keep = [True] * count
        refused: list[dict] = []

        def refuse(index: int, fate: str, reason: str, detail: str) -> None:
            keep[index] = False
            refused.append(
                {
                    "input_row": int(part_rows[index]),
                    "url": urls[index],
                    "caption": captions[index],
                    "fate": fate,
                    "reason": reason,
                    "detail": detail,
                }
            )

        problems = {index: problem for index, url in enumerate(urls) if (problem := url_refusal(url))}
        candidates = [index for index in range(count) if index not in problems]
        repeats: dict[int, int] = {}
        if candidates:
            # Repeated URLs: a row whose URL an earlier batch or an earlier row of this one has.
            wanted = np.asarray(candidates, np.int64)
            unique, first_at, inverse = np.unique(digests[wanted], return_index=True, return_inverse=True)
            earlier = self.seen.find(unique)
            new = earlier < 0
            self.seen.add(unique[new], part_rows[wanted[first_at[new]]])
            first_rows = np.where(new, part_rows[wanted[first_at]], earlier)[inverse.reshape(-1)]
            repeats = {
                index: first_row
                for index, first_row in zip(candidates, first_rows.tolist())
                if first_row != first + index
            }
        for index in sorted([*problems, *repeats]):  # in row order, as the counts list their reasons
            if index in problems:
                refuse(index, "blocked", *problems[index])
                self.refused[problems[index][0]] += 1
            else:
                refuse(index, "duplicate_exact", "repeated_url", f"same URL as input row {repeats[index]}")
                self.refused["repeated_url"] += 1
        candidates = [index for index in candidates if index not in repeats]
        if self.checker is not None:
            for start in range(0, len(candidates), ROBOTS_URLS_PER_CALL):
                some = candidates[start : start + ROBOTS_URLS_PER_CALL]
                found = self.checker.disallowed([urls[index] for index in some])
                for at, (reason, detail) in found.items():
                    refuse(some[at], "blocked", reason, detail)
                    self.robots_refused[reason] += 1
        return part, keep, refused


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
        "distributor": cfg.distributor,
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
    has printed nothing for cfg.stall_s (a hung download). A distributor whose package (or Java) is
    missing raises EngineError before anything starts."""
    for batch, manifest in batch_manifests(storage).items():
        want = expected_shards(manifest["to_crawl"], cfg)
        if len(finished_shards(storage, batch)) >= want:
            continue
        check_engine(cfg)
        spec = {
            "download": img2dataset_arguments(storage, cfg, batch),
            "allow_networks": list(cfg.allow_networks),
            "resolve": dict(cfg.resolve),
            "limits": fetch_limits(cfg),
            "engine": engine_spec(cfg),
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
    storage: Storage,
    rel: str,
    with_images: bool = True,
    batch_rows: int = RAW_BATCH_ROWS,
    columns: list[str] | None = None,
) -> Iterator[pa.RecordBatch]:
    """One finished raw shard, streamed as batches of at most `batch_rows` rows with the columns the
    pipeline uses (or only `columns` of them): memory holds a batch (and one Parquet row group), never
    the whole shard."""
    known = _raw_columns(storage, rel, storage.parquet_schema(rel).names, with_images)
    if columns is not None:
        unknown = [c for c in columns if c not in known]
        if unknown:
            raise ValueError(f"columns {unknown} are not raw shard columns; they are {known}")
        known = columns
    yield from storage.iter_batches(rel, batch_rows, known)


def _child_main(spec_json: str) -> None:
    import img2dataset

    from dalle.curate.engines import running_engine
    from dalle.curate.fetch import FetchLimits, use_guard_in_img2dataset

    spec = json.loads(spec_json)
    with (
        running_engine(spec["engine"]),
        use_guard_in_img2dataset(
            spec["allow_networks"], FetchLimits(**spec["limits"]), resolve=spec.get("resolve")
        ),
    ):
        img2dataset.download(**spec["download"])


if __name__ == "__main__":
    _child_main(sys.argv[1])
