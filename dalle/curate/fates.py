"""What the curation stages share: a sample's id, a stage's decision about it, and the pairs that
passed the rule filters (curated/_stages/filter.parquet) with their image bytes from raw/."""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict

from PIL import Image

from dalle.curate.crawl import RAW_IMAGE_COLUMN, read_raw_shard
from dalle.runroot import FILTER_TABLE
from dalle.storage import Storage

PASS = "pass"  # interim fate of a sample that a stage let through


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


def passing_rows(storage: Storage) -> list[dict]:
    return [r for r in storage.read_table(FILTER_TABLE).to_pylist() if r["fate"] == PASS]


def images_for(storage: Storage, rows: list[dict]) -> list[bytes]:
    """Image bytes of the given filter rows, read shard by shard from raw/."""
    by_shard: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_shard[row["raw_shard"]].append(index)
    images: list[bytes | None] = [None] * len(rows)
    for rel, indices in by_shard.items():
        shard = read_raw_shard(storage, rel)
        by_key = dict(zip(shard.column("key").to_pylist(), shard.column(RAW_IMAGE_COLUMN).to_pylist()))
        for index in indices:
            images[index] = by_key[rows[index]["raw_key"]]
    return images  # type: ignore[return-value]


def passing_pairs(storage: Storage) -> tuple[list[bytes], list[str]]:
    """Image bytes and captions of the pairs that passed the rule filters (what the small CLIP learns from)."""
    rows = passing_rows(storage)
    return images_for(storage, rows), [r["caption"] for r in rows]


def decode_rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")
