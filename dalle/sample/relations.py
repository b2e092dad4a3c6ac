"""Where objects are: the spatial relation of a prompt, checked object by object on the image's halves.

A contrastive CLIP scores "a red circle above a blue square" and its upside-down twin alike: its
pooled vector keeps which objects are there, not where (measured on the demo's CLIP: it preferred
the right one of a scene and its swapped twin 0.52 of the time). It does tell one object's phrase
from another. So a relation is checked as ReCLIP (Subramanian et al., ACL 2022) does it: each
object's phrase is scored on the image with all but one side of it painted over, and the layout that
puts both objects on their stated sides must beat the layout that swaps them.

`relation_margins` is that check as a number per image, which reranking adds to CLIP's score
(gallery.relation_weight).

Two objects with their attributes ("a red circle and a blue square") have the same weakness: the
pooled vector keeps that red, blue, a circle and a square are there, not which colour is whose.
`binding_margins` checks it the same way: at each cut along either axis, the two object phrases are
scored on the two sides (in either order), against the phrases with their attributes swapped ("a
blue circle", "a red square"); reranking adds it with gallery.binding_weight.
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


def _side_similarities(
    clip: Encoder,
    images: Sequence[PIL.Image.Image],
    axes: Sequence[str],
    splits: Sequence[float],
    phrases: Sequence[str],
) -> np.ndarray:
    """(image, axis and cut, side: before/after the cut, phrase) cosines: each image cut at each share of
    `splits` along each of `axes`, each side isolated and scored with each phrase, in one encoding."""
    sides = [
        isolate(image, axis, start, end)
        for image in images
        for axis in axes
        for cut in splits
        for start, end in ((0.0, cut), (cut, 1.0))
    ]
    return (clip.encode_images(sides) @ clip.encode_texts(list(phrases)).T).reshape(
        len(images), len(axes) * len(splits), 2, len(phrases)
    )


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
    # (image, cut, side: before/after the cut, phrase: first/second)
    sims = _side_similarities(clip, images, (relation.axis,), splits, [relation.first, relation.second])
    stated = sims[:, :, 0, 0] + sims[:, :, 1, 1]
    swapped = sims[:, :, 0, 1] + sims[:, :, 1, 0]
    return ((stated.max(axis=1) - swapped.max(axis=1)) / 2).astype(np.float32)


# Words that open a noun phrase without describing the object: kept in place when attributes swap.
_DETERMINERS = frozenset({"a", "an", "the", "one", "some"})


@dataclass(frozen=True)
class Pairing:
    """A prompt's two object phrases ("a red circle", "a blue square") and the same phrases with their
    attributes swapped ("a blue circle", "a red square"): what a binding check tells apart."""

    first: str
    second: str
    swapped_first: str
    swapped_second: str


def parse_pairing(prompt: str) -> Pairing | None:
    """The two objects of a prompt of the form "<attributes> <noun> and <attributes> <noun>" (an article
    may open each side: "a red circle and a blue square"); None for any other prompt: a spatial
    relation (`parse_relation`), no "and" or more than one, a side of one word, or the same attributes
    on both sides, where there is nothing to bind."""
    text = " ".join(prompt.strip().rstrip(".").split())
    if parse_relation(text) is not None:
        return None
    sides = re.split(r"\band\b", text, flags=re.IGNORECASE)
    if len(sides) != 2:
        return None
    words = [side.strip(" ,").split() for side in sides]
    parts = []
    for side in words:
        opening = side[:1] if side and side[0].lower() in _DETERMINERS else []
        attributes, noun = side[len(opening) : -1], side[-1:]
        if not attributes or not noun:
            return None
        parts.append((opening, attributes, noun))
    (open_a, attrs_a, noun_a), (open_b, attrs_b, noun_b) = parts
    if [w.lower() for w in attrs_a] == [w.lower() for w in attrs_b]:
        return None
    return Pairing(
        " ".join(open_a + attrs_a + noun_a),
        " ".join(open_b + attrs_b + noun_b),
        " ".join(open_a + attrs_b + noun_a),
        " ".join(open_b + attrs_a + noun_b),
    )


def binding_margins(
    clip: Encoder,
    images: Sequence[PIL.Image.Image],
    pairing: Pairing,
    splits: Sequence[float] = SPLITS,
) -> np.ndarray:
    """(N,) how much better each image shows the pairing's two objects, each on its own side of a cut,
    than the two with their attributes swapped, in units of CLIP's cosine.

    At each cut along each axis, the two sides are scored with the four phrases; a layout puts one
    phrase of a pair on each side, in either order. An image's margin is the best layout of the
    stated phrases minus the best layout of the swapped ones, halved (a mean of two cosines): positive
    when each object has its own attributes, negative when they are swapped, near zero when no cut
    holds the objects apart.
    """
    if not images:
        return np.zeros(0, dtype=np.float32)
    phrases = [pairing.first, pairing.second, pairing.swapped_first, pairing.swapped_second]
    # (image, axis and cut, side: before/after the cut, phrase)
    sims = _side_similarities(clip, images, ("horizontal", "vertical"), splits, phrases)

    def best_layout(one: int, other: int) -> np.ndarray:
        either = np.maximum(
            sims[:, :, 0, one] + sims[:, :, 1, other], sims[:, :, 0, other] + sims[:, :, 1, one]
        )
        return either.max(axis=1)

    return ((best_layout(0, 1) - best_layout(2, 3)) / 2).astype(np.float32)
