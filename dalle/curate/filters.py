"""The filter stage: rule filters on every crawled sample, and the CLIP-score filter the embed
stage applies.

Each check returns a `Decision` (reason, a sentence, the measured value and the
threshold it failed) or None when the sample passes, so every removal is
recorded with why and by how much.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, UnidentifiedImageError

from dalle.config import FilterConfig, RunConfig
from dalle.curate.crawl import (
    RAW_IMAGE_COLUMN,
    classify_download_error,
    crawl_batches,
    finished_shards,
    iter_raw_shard,
)
from dalle.curate.fates import PASS, fate_record, sample_uid
from dalle.runroot import FILTER_TABLE, REFUSED_NAME, batch_input
from dalle.schemas import FILTER_DECISIONS_SCHEMA
from dalle.storage import Storage


@dataclass(frozen=True)
class Decision:
    reason: str
    detail: str
    value: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str


def caption_decision(caption: str | None, utf8: bool, cfg: FilterConfig) -> Decision | None:
    """Why a caption is unusable, or None when it passes."""
    if not utf8:
        return Decision("caption_not_utf8", "caption bytes are not valid UTF-8")
    text = (caption or "").strip()
    if not text:
        return Decision("caption_empty", "caption is empty", 0, cfg.min_caption_chars)
    if not any(ch.isalpha() for ch in text):
        return Decision("caption_not_text", f"caption has no letters: {text[:40]!r}")
    chars = len(text)
    if chars < cfg.min_caption_chars:
        return Decision(
            "caption_too_short", f"{chars} characters < {cfg.min_caption_chars}", chars, cfg.min_caption_chars
        )
    if chars > cfg.max_caption_chars:
        return Decision(
            "caption_too_long", f"{chars} characters > {cfg.max_caption_chars}", chars, cfg.max_caption_chars
        )
    words = len(text.split())
    if words < cfg.min_caption_words:
        return Decision(
            "caption_too_few_words", f"{words} words < {cfg.min_caption_words}", words, cfg.min_caption_words
        )
    if words > cfg.max_caption_words:
        return Decision(
            "caption_too_many_words", f"{words} words > {cfg.max_caption_words}", words, cfg.max_caption_words
        )
    return None


def inspect_image(data: bytes | None, cfg: FilterConfig) -> tuple[ImageInfo | None, Decision | None]:
    """Decode an image safely: size checks run on the header before any pixel is decoded."""
    size = len(data or b"")
    if size < cfg.min_image_bytes:
        return None, Decision(
            "image_too_few_bytes", f"{size} bytes < {cfg.min_image_bytes}", size, cfg.min_image_bytes
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            pixels = width * height
            if pixels > cfg.max_image_pixels:
                return None, Decision(
                    "decompression_bomb",
                    f"declared {width}x{height} = {pixels} pixels > {cfg.max_image_pixels}",
                    pixels,
                    cfg.max_image_pixels,
                )
            image.load()  # a truncated or corrupt body fails here, not later in training
    except UnidentifiedImageError:
        return None, Decision("not_an_image", "body is not a decodable image")
    except Image.DecompressionBombError as err:
        return None, Decision("decompression_bomb", str(err))
    except (OSError, ValueError, SyntaxError) as err:
        return None, Decision("corrupt_image", f"image does not decode: {err}")
    info = ImageInfo(width, height, image.format or "")
    short, long = min(width, height), max(width, height)
    if short < cfg.min_side:
        return info, Decision(
            "image_too_small", f"short side {short}px < {cfg.min_side}px", short, cfg.min_side
        )
    ratio = long / short
    if ratio > cfg.max_aspect_ratio:
        return info, Decision(
            "aspect_ratio", f"aspect ratio {ratio:.2f} > {cfg.max_aspect_ratio}", ratio, cfg.max_aspect_ratio
        )
    return info, None


def clip_score_cutoff(scores: np.ndarray, cfg: FilterConfig) -> float | None:
    """The CLIP score below which pairs are dropped: the configured threshold, or the
    score of the lowest pair inside the kept top fraction (computed over the whole input)."""
    if cfg.clip_score_threshold is not None:
        return float(cfg.clip_score_threshold)
    if cfg.clip_keep_top_fraction is not None and len(scores):
        keep = max(1, int(np.ceil(cfg.clip_keep_top_fraction * len(scores))))
        return float(np.sort(scores)[::-1][keep - 1])
    return None


def clip_decision(score: float, cutoff: float | None) -> Decision | None:
    if cutoff is None or score >= cutoff:
        return None
    return Decision("clip_score_low", f"CLIP score {score:.3f} < {cutoff:.3f}", float(score), cutoff)


# --- the stage -------------------------------------------------------------------------------
def refused_decisions(storage: Storage) -> list[dict]:
    """The fates of the input rows the crawl refused before downloading (blocked, robots.txt...)."""
    return [
        {
            "input_row": refused["input_row"],
            "url": refused["url"],
            "caption": refused["caption"],
            "uid": sample_uid(refused["url"], None),
            **fate_record(refused["fate"], refused["reason"], refused["detail"]),
        }
        for batch in crawl_batches(storage)
        for refused in storage.read_table(batch_input(batch, REFUSED_NAME)).to_pylist()
    ]


def filter_shard(storage: Storage, rel: str, cfg: FilterConfig) -> pa.Table:
    """The fates of one raw shard's samples: failed download, filtered by a rule, or passed. The unit of
    work a Dask worker takes (orchestration.dask_address): it needs the run root and the shard's path."""
    rows: list[dict] = []
    # Batch by batch: a shard of 10,000 bodies is never in memory at once.
    for raw in (raw for batch in iter_raw_shard(storage, rel) for raw in batch.to_pylist()):
        row = {
            "input_row": raw["input_row"],
            "url": raw["url"],
            "caption": raw["caption"],
            "raw_shard": rel,
            "raw_key": raw["key"],
            "sha256": raw["sha256"],
        }
        if raw["status"] != "success":
            message = raw["error_message"] or raw["status"]
            fate, reason = classify_download_error(message)
            rows.append({**row, "uid": sample_uid(raw["url"], None), **fate_record(fate, reason, message)})
            continue
        row["uid"] = sample_uid(raw["url"], raw["sha256"])
        decision = caption_decision(raw["caption"], raw["caption_utf8"], cfg)
        info, image_decision = inspect_image(raw[RAW_IMAGE_COLUMN], cfg)
        if info is not None:
            row["width"], row["height"] = info.width, info.height
        decision = decision or image_decision
        if decision is not None:
            fate = fate_record(
                "filtered", decision.reason, decision.detail, decision.value, decision.threshold
            )
            rows.append({**row, **fate})
        else:
            rows.append({**row, **fate_record(PASS)})
    return pa.Table.from_pylist(rows, schema=FILTER_DECISIONS_SCHEMA)


def write_filter_decisions(storage: Storage, shard_tables: list[pa.Table]) -> dict[str, int]:
    """Every crawled sample's fate so far (the refused rows and each shard's), in input order, as
    FILTER_TABLE; returns the count of each fate."""
    refused = pa.Table.from_pylist(refused_decisions(storage), schema=FILTER_DECISIONS_SCHEMA)
    table = pa.concat_tables([refused, *shard_tables]) if shard_tables else refused
    table = table.take(pc.sort_indices(table, [("input_row", "ascending")]))
    storage.write_table(FILTER_TABLE, table)
    return dict(Counter(table.column("fate").to_pylist()))


def filter_stage(storage: Storage, cfg: RunConfig) -> dict[str, int]:
    """Record every crawled sample's fate so far: refused, failed download, filtered by a rule, or
    passed; one shard after another in this process (flows.curate hands shards to Dask instead)."""
    tables = [filter_shard(storage, rel, cfg.filter) for rel in finished_shards(storage)]
    return write_filter_decisions(storage, tables)
