"""What the curation stages share: a sample's id, a stage's decision about it, the pairs that
passed the rule filters (curated/_stages/filter.parquet) with their image bytes from raw/, and the
error that ends a curation too few pairs got through, with the ledger's count of why."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import tempfile
import urllib.parse
from collections import Counter
from collections.abc import Iterator, Sequence
from itertools import groupby

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from dalle.curate.crawl import RAW_IMAGE_COLUMN, CrawlError, iter_raw_shard
from dalle.errors import UserError
from dalle.runroot import DEDUP_TABLE, FILTER_TABLE, SAMPLES_REPORT, SCORES_TABLE
from dalle.schemas import DEDUP_DECISIONS_SCHEMA, SCORE_DECISIONS_SCHEMA
from dalle.storage import Storage

PASS = "pass"  # interim fate of a sample that a stage let through
SMALL_CLIP_MIN_PAIRS = 2  # the fewest pairs the small CLIP trains on (dalle/train/clip.py)
NOT_CLIP_SCORED = "not_clip_scored"  # reason of a pair that passed the rule filters but no CLIP scored


def sample_uid(url: str, image_sha256: str | None) -> str:
    """Stable id of a sample: its URL and, once downloaded, the hash of its bytes."""
    digest = hashlib.sha256(url.encode("utf-8", errors="surrogatepass"))
    if image_sha256:
        digest.update(b"\n" + image_sha256.encode())
    return digest.hexdigest()[:24]


def fate_record(
    fate: str, reason: str | None = None, detail: str | None = None, value=None, threshold=None
) -> dict:
    return {"fate": fate, "reason": reason, "detail": detail, "value": value, "threshold": threshold}


def passing_table(storage: Storage, columns: list[str] | None = None) -> pa.Table:
    """The filter table's rows that passed the rule filters, in its order: `columns` of them, or all."""
    table = storage.read_table(FILTER_TABLE, columns=None if columns is None else sorted({*columns, "fate"}))
    passed = table.filter(pc.equal(table.column("fate"), PASS))
    return passed if columns is None else passed.select(columns)


def passing_rows(storage: Storage) -> list[dict]:
    return passing_table(storage).to_pylist()


# Images a streamed read hands out at once (iter_images): memory holds about this many bodies (each at
# most crawl.max_image_bytes), one raw batch and as many again of bodies read ahead of their turn.
IMAGE_CHUNK_ROWS = 256


def iter_images(
    storage: Storage, rows: Sequence[dict], chunk: int = IMAGE_CHUNK_ROWS
) -> Iterator[tuple[list[int], list[bytes]]]:
    """Image bytes of the given filter rows, in their order, as chunks of (indices into `rows`, images)
    of `chunk` images each (the last may hold fewer). Each raw shard is streamed batch by batch with
    only its key and image columns, keeping the bodies of the wanted keys, so memory holds about a
    chunk of images and a raw batch, never a shard or the run's images.

    A shard's rows are in download order (img2dataset writes them as they finish), not in the rows'
    order: a body that comes before its turn waits in memory, and beyond `chunk` of them in a local
    temporary file, so a shard whose first row finished last costs disk, not memory."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    indices: list[int] = []
    images: list[bytes] = []
    for rel, run in groupby(range(len(rows)), key=lambda index: rows[index]["raw_shard"]):
        run = list(run)
        keys = [rows[index]["raw_key"] for index in run]
        for index, image in zip(run, _shard_images(storage, rel, keys, chunk)):
            indices.append(index)
            images.append(image)
            if len(indices) == chunk:
                yield indices, images
                indices, images = [], []
    if indices:
        yield indices, images


def _shard_images(storage: Storage, rel: str, keys: list[str], in_memory: int) -> Iterator[bytes]:
    """The image of each of `keys` (rows of the raw shard `rel`), in the order of `keys`; bodies read
    before their turn are held in memory up to `in_memory` of them, the rest in a temporary file."""
    uses = Counter(keys)  # a key listed twice is handed out twice
    held: dict[str, bytes | None] = {}
    spilled: dict[str, tuple[int, int]] = {}
    position = 0
    with tempfile.TemporaryFile(prefix="dalle-images-") as spill:
        for batch in iter_raw_shard(storage, rel, columns=["key", RAW_IMAGE_COLUMN]):
            if position == len(keys):
                break
            batch_keys = batch.column(0).to_pylist()
            wanted = [
                n
                for n, key in enumerate(batch_keys)
                if key in uses and key not in held and key not in spilled
            ]
            if not wanted:
                continue
            bodies = batch.column(1).take(pa.array(wanted, pa.int64())).to_pylist()
            for n, body in zip(wanted, bodies):
                key = batch_keys[n]
                if key == keys[position] or len(held) < in_memory or body is None:
                    held[key] = body
                else:
                    spill.seek(0, io.SEEK_END)
                    spilled[key] = (spill.tell(), len(body))
                    spill.write(body)
                while position < len(keys) and (keys[position] in held or keys[position] in spilled):
                    key = keys[position]
                    if key in held:
                        image = held[key]
                    else:
                        offset, size = spilled[key]
                        spill.seek(offset)
                        image = spill.read(size)
                    position += 1
                    uses[key] -= 1
                    if not uses[key]:
                        del uses[key]
                        held.pop(key, None)
                        spilled.pop(key, None)
                    yield image  # type: ignore[misc]
    if position < len(keys):
        raise CrawlError(
            f"{storage.uri(rel)} has no row with key {keys[position]!r}, which the filter stage read there; "
            "the raw shard changed since: run the curation again"
        )


def passing_pairs(storage: Storage) -> tuple[list[bytes], list[str]]:
    """Image bytes and captions of the pairs that passed the rule filters (what the small CLIP learns
    from). All of them at once: the CLIP's trainer draws its batches from the whole set."""
    rows = passing_rows(storage)
    images = [image for _, chunk in iter_images(storage, rows) for image in chunk]
    return images, [r["caption"] for r in rows]


def decode_rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def record_unscored(storage: Storage, detail: str) -> None:
    """The CLIP-score and dedup decisions of a run that scores nothing (too few pairs to train its CLIP):
    each pair that passed the rule filters is filtered as NOT_CLIP_SCORED, none is a duplicate."""
    unscored = [
        {"uid": r["uid"], **fate_record("filtered", NOT_CLIP_SCORED, detail), "clip_score": None}
        for r in passing_rows(storage)
    ]
    storage.write_table(SCORES_TABLE, pa.Table.from_pylist(unscored, schema=SCORE_DECISIONS_SCHEMA))
    storage.write_table(DEDUP_TABLE, DEDUP_DECISIONS_SCHEMA.empty_table())


class TooFewPairs(UserError, RuntimeError):
    """Curation kept no pair, or too few passed the rule filters for the CLIP; the ledger has each fate."""


# What to do about the most common reason (or fate) of removal, for the error's one line.
_REASON_HINTS = {
    "blocked_address": "if you mean to crawl that network, allow it with --allow-network {cidr} or "
    "crawl.allow_networks",
    "scheme_not_allowed": "only http(s) URLs are crawled: check that crawl.url_col names the URL column",
    "malformed_url": "check that crawl.url_col names the column of http(s) URLs",
    "robots_txt": "the sites' robots.txt forbids crawling these URLs; crawl other sites",
    "robots_txt_unavailable": "the sites' robots.txt could not be read; run again later",
    "x_robots_tag": "the sites forbid using these images (X-Robots-Tag); crawl other sites",
    "repeated_url": "the list repeats its URLs",
    "timeout": "the sites answered too slowly: raise crawl.timeout_s, or check the network",
    "caption_empty": "check that crawl.caption_col names the caption column",
    "clip_score_low": "lower filter.clip_score_threshold, or keep a top fraction with "
    "filter.clip_keep_top_fraction",
}
_FATE_HINTS = {
    "blocked": "the crawler refused these URLs; see the details in the ledger",
    "download_failed": "check that the sites are reachable from this machine",
    "filtered": "the filter.* settings say what passes; see the details in the ledger",
    "duplicate_exact": "the list holds the same images many times",
    "duplicate_near": "the list holds the same images many times (dedup.near_threshold: how close is a copy)",
}


def _allow_example(urls: list[str]) -> str:
    """A CIDR that would let the crawler reach the first of `urls` given by IP address, or "CIDR"."""
    for url in urls:
        try:
            address = ipaddress.ip_address(urllib.parse.urlsplit(url.strip()).hostname or "")
        except ValueError:
            continue
        return f"{address}/{address.max_prefixlen}"
    return "CIDR"


def too_few_pairs(storage: Storage, passed: int, needed: int | None = None) -> TooFewPairs:
    """The error that ends a curation: `passed` pairs passed the rule filters, fewer than the `needed`
    that train the small CLIP (None: none was kept at the end). It counts from the ledger why the
    other rows were removed, names the top reasons and what to do about the first."""
    ledger = storage.read_table(SAMPLES_REPORT, columns=["url", "fate", "reason"]).to_pylist()
    removed = [e for e in ledger if e["fate"] != "kept" and e["reason"] != NOT_CLIP_SCORED]
    reasons = Counter(e["reason"] or e["fate"] for e in removed)
    fate_of = {e["reason"] or e["fate"]: e["fate"] for e in removed}
    total = len(ledger)
    if needed is not None:
        head = (
            f"only {passed} of the {total} input rows passed the rule filters, too few to train the small "
            f"CLIP (it needs {needed}; or set clip.pretrained or clip.checkpoint)"
        )
    elif total and all(e["fate"] == "blocked" for e in ledger):
        head = f"all {total} input rows were refused"
    else:
        head = f"no pair of the {total} input rows was kept"
    message = head
    if reasons:
        top = reasons.most_common(3)
        message += ": " + ", ".join(f"{count} {reason}" for reason, count in top)
        if len(reasons) > len(top):
            others = sum(reasons.values()) - sum(count for _, count in top)
            message += f" and {others} of {len(reasons) - len(top)} other reasons"
        first = top[0][0]
        hint = _REASON_HINTS.get(first) or _FATE_HINTS.get(fate_of[first])
        if hint:
            blocked = [e["url"] for e in removed if e["reason"] == "blocked_address"]
            message += "; " + hint.format(cidr=_allow_example(blocked))
    return TooFewPairs(f"{message}. Every row's fate: {storage.uri(SAMPLES_REPORT)}")
