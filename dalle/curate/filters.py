"""Rule filters and the CLIP-score filter.

Each check returns a `Decision` (reason, a sentence, the measured value and the
threshold it failed) or None when the sample passes, so every removal is
recorded with why and by how much.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from dalle.config import FilterConfig


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
