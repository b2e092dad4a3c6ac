"""Where objects are: the spatial relation of a prompt, checked object by object on the image's halves.

A contrastive CLIP scores "a red circle above a blue square" and its upside-down twin alike: its
pooled vector keeps which objects are there, not where (measured on the demo's CLIP: it preferred
the right one of a scene and its swapped twin 0.52 of the time). It does tell one object's phrase
from another. So a relation is checked as ReCLIP (Subramanian et al., ACL 2022) does it: each
object's phrase is scored on the image with all but one side of it painted over, and the layout that
puts both objects on their stated sides must beat the layout that swaps them.

`relation_margins` is that check as a number per image, which reranking adds to CLIP's score
(gallery.relation_weight).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import PIL.Image

# English spatial phrases: (phrase, axis, whether the subject comes first along the axis: left or top).
# Longer phrases first, so "to the left of" is not read as "left of" with "to the" in the subject.
SPATIAL_PHRASES: tuple[tuple[str, str, bool], ...] = (
    ("to the left of", "horizontal", True),
    ("to the right of", "horizontal", False),
    ("on the left of", "horizontal", True),
    ("on the right of", "horizontal", False),
    ("left of", "horizontal", True),
    ("right of", "horizontal", False),
    ("on top of", "vertical", True),
    ("underneath", "vertical", False),
    ("beneath", "vertical", False),
    ("above", "vertical", True),
    ("below", "vertical", False),
    ("under", "vertical", False),
)
# Where the image is cut in two, as shares of its side along the axis: the objects of a generated
# scene are not always either side of the middle.
SPLITS: tuple[float, ...] = (0.35, 0.425, 0.5, 0.575, 0.65)


@dataclass(frozen=True)
class SpatialRelation:
    """A prompt's two objects in image order along `axis`: `first` is left or top, `second` right or bottom."""

    first: str
    second: str
    axis: str  # "horizontal" or "vertical"


def parse_relation(prompt: str) -> SpatialRelation | None:
    """The relation of a prompt of the form "<subject> <spatial phrase> <object>"; None for any other
    prompt (no spatial phrase, more than one, or a side left empty)."""
    text = " ".join(prompt.strip().rstrip(".").split())
    found = []
    for phrase, axis, subject_first in SPATIAL_PHRASES:
        for match in re.finditer(rf"\b{re.escape(phrase)}\b", text, flags=re.IGNORECASE):
            if not any(match.start() < end and start < match.end() for start, end, *_ in found):
                found.append((match.start(), match.end(), axis, subject_first))
    if len(found) != 1:
        return None
    start, end, axis, subject_first = found[0]
    subject, obj = text[:start].strip(" ,"), text[end:].strip(" ,")
    if not subject or not obj:
        return None
    return SpatialRelation(subject, obj, axis) if subject_first else SpatialRelation(obj, subject, axis)


def background_colour(image: np.ndarray) -> np.ndarray:
    """The median colour of an (H, W, 3) image's border: what a painted-over side is filled with."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(border, axis=0).astype(image.dtype)


def isolate(image: PIL.Image.Image, axis: str, start: float, end: float) -> PIL.Image.Image:
    """A copy of `image` with everything outside [start, end) of its side along `axis` (shares of
    the side) painted in its background colour; objects keep their size and place."""
    if axis not in ("horizontal", "vertical"):
        raise ValueError(f"axis must be 'horizontal' or 'vertical', got {axis!r}")
    pixels = np.array(image.convert("RGB"))
    side = pixels.shape[1] if axis == "horizontal" else pixels.shape[0]
    lo, hi = round(start * side), round(end * side)
    fill = background_colour(pixels)
    view = pixels if axis == "vertical" else pixels.transpose(1, 0, 2)
    view[:lo] = fill
    view[hi:] = fill
    return PIL.Image.fromarray(pixels, "RGB")


class Encoder(Protocol):
    def encode_images(self, images: Sequence[PIL.Image.Image]) -> np.ndarray: ...
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def relation_margins(
    clip: Encoder,
    images: Sequence[PIL.Image.Image],
    relation: SpatialRelation,
    splits: Sequence[float] = SPLITS,
) -> np.ndarray:
    """(N,) how much better each image shows `relation` than its swap, in units of CLIP's cosine.

    At each cut along the relation's axis, the two sides are scored with the two phrases: the stated
    layout (first phrase before the cut, second after) against the swapped one. An image's margin is
    the best stated layout over the cuts minus the best swapped layout, halved (a mean of two cosines):
    positive when the objects are where the prompt says, negative when they are the other way round,
    near zero when neither side holds one object alone.
    """
    if not images:
        return np.zeros(0, dtype=np.float32)
    sides = [
        isolate(image, relation.axis, start, end)
        for image in images
        for cut in splits
        for start, end in ((0.0, cut), (cut, 1.0))
    ]
    # (image, cut, side: before/after the cut, phrase: first/second)
    sims = (clip.encode_images(sides) @ clip.encode_texts([relation.first, relation.second]).T).reshape(
        len(images), len(splits), 2, 2
    )
    stated = sims[:, :, 0, 0] + sims[:, :, 1, 1]
    swapped = sims[:, :, 0, 1] + sims[:, :, 1, 0]
    return ((stated.max(axis=1) - swapped.max(axis=1)) / 2).astype(np.float32)
