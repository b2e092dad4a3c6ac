import io

import numpy as np
from PIL import Image

from dalle.config import FilterConfig
from dalle.curate.filters import caption_decision, clip_decision, clip_score_cutoff, inspect_image

CFG = FilterConfig(min_side=32, max_aspect_ratio=3, min_image_bytes=50, max_image_pixels=1_000_000)


def png(width, height):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_captions():
    assert caption_decision("a red circle", True, CFG) is None
    assert caption_decision("", True, CFG).reason == "caption_empty"
    assert caption_decision("   ", True, CFG).reason == "caption_empty"
    assert caption_decision(None, True, CFG).reason == "caption_empty"
    assert caption_decision("1234 5678", True, CFG).reason == "caption_not_text"
    assert caption_decision("ok", True, CFG).reason == "caption_too_short"
    long = caption_decision("word " * 2000, True, CFG)
    assert long.reason == "caption_too_long" and long.value == len(("word " * 2000).strip())
    assert long.threshold == CFG.max_caption_chars
    assert caption_decision("caf\ufffd", False, CFG).reason == "caption_not_utf8"
    many = FilterConfig(max_caption_words=3)
    assert caption_decision("one two three four", True, many).reason == "caption_too_many_words"


def test_images():
    info, decision = inspect_image(png(64, 48), CFG)
    assert decision is None and (info.width, info.height) == (64, 48)
    assert inspect_image(png(16, 64), CFG)[1].reason == "image_too_small"
    assert inspect_image(png(200, 40), CFG)[1].reason == "aspect_ratio"
    assert inspect_image(b"", CFG)[1].reason == "image_too_few_bytes"
    assert inspect_image(b"<html>" + b"x" * 100, CFG)[1].reason == "not_an_image"
    data = png(64, 64)
    assert inspect_image(data[: len(data) // 2], CFG)[1].reason in ("corrupt_image", "image_too_few_bytes")
    bomb = inspect_image(png(1100, 1000), CFG)[1]
    assert bomb.reason == "decompression_bomb" and bomb.value == 1_100_000


def test_clip_cutoffs():
    scores = np.array([0.1, 0.5, 0.3, 0.9], dtype=np.float32)
    assert clip_score_cutoff(scores, FilterConfig()) is None
    assert clip_score_cutoff(scores, FilterConfig(clip_score_threshold=0.25)) == 0.25
    cutoff = clip_score_cutoff(scores, FilterConfig(clip_keep_top_fraction=0.5))
    assert cutoff == np.float32(0.5)
    assert sum(clip_decision(float(s), cutoff) is None for s in scores) == 2
    assert clip_decision(0.2, 0.25).reason == "clip_score_low"
