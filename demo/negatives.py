"""Hard negatives for the small CLIP (`clip.hard_negatives: demo.negatives`): for a caption of the
captioned-shapes world, the captions of the scenes nearest to it that it does not describe, so that
the reranker learns what a bag-of-words CLIP ignores: which colour goes with which shape, where each
object is, and how many there are (NegCLIP, Yuksekgonul et al. 2023, builds its negatives alike by
swapping a caption's words).
"""

from __future__ import annotations

import random

from demo.detect import parse_prompt
from demo.world import INVERSE_RELATIONS, ShapeObject, caption_for, count_phrase


def _objects(parsed: dict, swap: str | None = None) -> list[ShapeObject]:
    specs = [dict(o) for o in parsed["objects"]]
    if swap is not None and len(specs) == 2:
        specs[0][swap], specs[1][swap] = specs[1][swap], specs[0][swap]
    return [ShapeObject(o["color"], o["shape"], o["size"] or "medium", 0.0, 0.0, 0.0) for o in specs]


def hard_negatives(caption: str, rng: random.Random) -> list[str]:
    """Captions one change away from `caption` that describe another scene; [] for a caption of no
    composition (one object) or one this world does not write."""
    try:
        parsed = parse_prompt(caption)
    except ValueError:
        return []
    kind, relation = parsed["kind"], parsed["relation"]
    negatives: list[str] = []
    if kind == "count":
        target = parsed["objects"][0]
        negatives += [
            count_phrase(count, target["color"], target["shape"])
            for count in (target["count"] - 1, target["count"] + 1)
            if 1 <= count <= 4
        ]
    elif kind in ("two", "relation"):
        first, second = parsed["objects"]
        scene = sorted((o["color"], o["shape"]) for o in (first, second))
        for swap in ("color", "shape"):
            swapped = _objects(parsed, swap)
            # "a red circle and a red square" with its shapes swapped is the same scene: no negative.
            if kind == "relation" or sorted((o.color, o.shape) for o in swapped) != scene:
                negatives.append(caption_for(swapped, relation))
        if kind == "relation":
            negatives.append(caption_for(_objects(parsed), INVERSE_RELATIONS[relation]))
    return [text for text in negatives if text != caption]
