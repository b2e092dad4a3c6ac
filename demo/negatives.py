"""Hard negatives and mirrored twins for the small CLIP (`clip.hard_negatives: demo.negatives`,
`clip.mirrored_captions: demo.negatives`). Hard negatives: for a caption of the
captioned-shapes world, the captions of the scenes nearest to it that it does not describe, so that
the reranker learns what a bag-of-words CLIP ignores: which colour goes with which shape, where each
object is, and how many there are (NegCLIP, Yuksekgonul et al. 2023, builds its negatives alike by
swapping a caption's words). Mirrored twins: the caption of a relation scene mirrored left to right
or upside down, so that the CLIP sees both sides of a relation in one batch.
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


# The mirror of a relation scene on each axis: the relations it turns over. The other relations stay
# true in the mirror, so it would be a twin with the same caption (no twin).
_MIRRORED_RELATIONS = {"horizontal": ("left of", "right of"), "vertical": ("above", "below")}
# Shapes that are not their own mirror image on an axis: upside down, the world's triangle (apex up)
# is a shape no caption names.
_NOT_SYMMETRIC = {"horizontal": frozenset(), "vertical": frozenset({"triangle"})}


def mirrored_caption(caption: str, axis: str) -> str | None:
    """The caption of the scene mirrored on `axis` ("horizontal": left to right, "vertical": upside
    down), when the mirror turns its relation over; None for any other caption, or when the mirror
    would show a shape the world does not draw."""
    try:
        parsed = parse_prompt(caption)
    except ValueError:
        return None
    relation = parsed["relation"]
    if parsed["kind"] != "relation" or relation not in _MIRRORED_RELATIONS[axis]:
        return None
    if any(o["shape"] in _NOT_SYMMETRIC[axis] for o in parsed["objects"]):
        return None
    return caption_for(_objects(parsed), INVERSE_RELATIONS[relation])
