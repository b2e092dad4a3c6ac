"""A deterministic detector for the demo's captioned shapes: colour, shape and relative position from pixels.

Every pixel is projected onto the line from the background to each demo colour. An
anti-aliased, blurred or washed-out pixel is a mixture of one colour with the background,
so it lies near that colour's line and its position along the line is its coverage. Pixels
at least half covered make up the objects: connected components, split by colour where two
colours touch.

Shape comes from the complex moments of the soft coverage around each object,
sum w (z - centroid)^n / area^(n/2 + 1) for n = 2, 3, 4, with z = x + iy. They do not depend
on the object's size, and a rotationally symmetric blur (roughly what a small dVAE does to
edges) leaves them unchanged, as long as the blurred edge stays within EDGE_RING pixels of
the object. The demo's shapes differ in them clearly: the triangle alone has a third moment,
and the fourth is negative for the square, zero for the circle, positive for the diamond and
over twice that for the cross. Each shape's prototype is measured on a large
clean render by `demo.site.render`, so the detector follows the drawing code.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
from scipy import ndimage

from demo.world import (
    BACKGROUND,
    COLORS,
    RELATIONS,
    SHAPES,
    SIZE_BANDS,
    SIZE_WORDS,
    ShapeObject,
    render,
)

# A pixel belongs to an object when the object's colour covers at least this share of it;
# fainter pixels (soft edges, washed-out decoder output) count as background.
MIN_COVERAGE = 0.5
# A pixel further than this share of its colour's contrast from the background-colour line
# (grey, black, a colour between two others) belongs to no colour.
MAX_RESIDUAL = 0.6
# Components smaller than this share of the image are specks. The smallest demo object
# (a small diamond) covers about 4% of the image.
MIN_AREA_FRACTION = 0.01
# A colour with at least this share of a component's coverage is a separate object when
# it also forms a connected piece of its own (two objects of different colours touching).
SPLIT_SHARE = 0.2
# Pixels this close to an object carry its blurred edge into the moments.
EDGE_RING = 2.0
# Rough spread of the 2nd, 3rd and 4th moments around their prototypes on blurred and JPEG
# re-encoded 32 px renders: the distance to each shape prototype is taken in these units.
_MOMENT_SCALE = np.array([0.01, 0.015, 0.005])
_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)

ImageInput = PIL.Image.Image | np.ndarray | bytes


@dataclass(frozen=True)
class DetectedObject:
    """One object in an image: colour (a COLORS key), shape (a SHAPES entry), centroid and area in pixels."""

    color: str
    shape: str
    cx: float
    cy: float
    area: int


@dataclass(frozen=True)
class _Palette:
    names: tuple[str, ...]
    contrast: np.ndarray  # (K, 3): colour - background
    contrast2: np.ndarray  # (K,): squared length of each contrast vector


@dataclass(frozen=True)
class _Blob:
    colour: int  # index into the palette
    area: int  # pixels at least half covered
    cx: float
    cy: float
    moments: np.ndarray  # complex moments of order 2, 3, 4


def _check_names(kind: str, names: Sequence[str], known: Sequence[str]) -> None:
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        what = f"unknown {kind} {unknown[0]!r}" if unknown else f"no {kind}s given"
        raise ValueError(f"{what} for the detector; known {kind}s are: {', '.join(known)}")


@functools.lru_cache(maxsize=32)
def _palette(names: tuple[str, ...]) -> _Palette:
    _check_names("colour", names, list(COLORS))
    contrast = np.array([COLORS[name] for name in names], dtype=np.float64) - np.array(BACKGROUND)
    return _Palette(names, contrast, (contrast * contrast).sum(axis=1))


def _as_rgb(image: ImageInput) -> np.ndarray:
    """(H, W, 3) float64 in 0..255 from a PIL image, encoded bytes or an array (uint8, or floats in 0..1)."""
    if isinstance(image, bytes | bytearray):
        image = PIL.Image.open(io.BytesIO(image))
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {array.shape}")
    array = array[..., :3]
    if np.issubdtype(array.dtype, np.floating):
        return np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0
    return array.astype(np.float64)


def _classify(rgb: np.ndarray, palette: _Palette) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel: nearest colour index, its coverage, whether it is object; and all projections (H, W, K)."""
    h, w, _ = rgb.shape
    offset = rgb.reshape(-1, 3) - np.array(BACKGROUND)
    dots = offset @ palette.contrast.T
    projection = dots / palette.contrast2
    coverage = np.clip(projection, 0.0, 1.0)
    # Squared distance to the segment background..colour, for every colour at once.
    residual2 = (offset * offset).sum(axis=1)[:, None] + palette.contrast2 * (
        coverage * coverage - 2 * coverage * projection
    )
    nearest = residual2.argmin(axis=1)
    rows = np.arange(len(nearest))
    best_coverage = coverage[rows, nearest]
    residual = np.sqrt(np.maximum(residual2[rows, nearest], 0.0))
    is_object = (best_coverage >= MIN_COVERAGE) & (
        residual <= MAX_RESIDUAL * np.sqrt(palette.contrast2[nearest])
    )
    return (
        nearest.reshape(h, w),
        best_coverage.reshape(h, w),
        is_object.reshape(h, w),
        projection.reshape(h, w, -1),
    )


def _segment(
    nearest: np.ndarray, coverage: np.ndarray, is_object: np.ndarray, n_colours: int, min_area: int
) -> list[tuple[np.ndarray, int]]:
    """(mask, colour index) of each object: components of object pixels, split where two colours touch."""
    components, count = ndimage.label(is_object, structure=_EIGHT_NEIGHBOURS)
    found: list[tuple[np.ndarray, int]] = []
    for index in range(1, count + 1):
        component = components == index
        if component.sum() < min_area:
            continue
        votes = np.bincount(nearest[component], weights=coverage[component], minlength=n_colours)
        strong = [int(k) for k in np.argsort(-votes, kind="stable") if votes[k] >= SPLIT_SHARE * votes.sum()]
        pieces: list[tuple[np.ndarray, int]] = []
        if len(strong) > 1:
            for colour in strong:
                parts, n_parts = ndimage.label(component & (nearest == colour), structure=_EIGHT_NEIGHBOURS)
                for part in range(1, n_parts + 1):
                    piece = parts == part
                    if piece.sum() >= min_area:
                        pieces.append((piece, colour))
        found.extend(pieces if len(pieces) > 1 else [(component, int(votes.argmax()))])
    return found


def _moments(weights: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> tuple[float, float, np.ndarray] | None:
    """Soft centroid (x, y) and the size-free complex moments of order 2, 3 and 4."""
    mass = weights.sum()
    if mass <= 0:
        return None
    cx, cy = (weights * xs).sum() / mass, (weights * ys).sum() / mass
    z = (xs - cx) + 1j * (ys - cy)
    moments = np.array([(weights * z**n).sum() / mass ** (n / 2 + 1) for n in (2, 3, 4)])
    return cx, cy, moments


def _measure(rgb: np.ndarray, palette: _Palette, min_area_fraction: float) -> list[_Blob]:
    """Colour, area, soft centroid and moments of every object in the image."""
    nearest, coverage, is_object, projection = _classify(rgb, palette)
    min_area = max(1, round(min_area_fraction * is_object.size))
    objects = _segment(nearest, coverage, is_object, len(palette.names), min_area)
    if not objects:
        return []
    owner = np.zeros(is_object.shape, dtype=np.int32)
    for number, (mask, _) in enumerate(objects, start=1):
        owner[mask] = number
    # Each background pixel near an object goes to the nearest one, so that the soft edges
    # of two close objects are shared out rather than counted twice.
    distance, (iy, ix) = ndimage.distance_transform_edt(owner == 0, return_indices=True)
    nearest_owner = np.where(distance <= EDGE_RING, owner[iy, ix], 0)
    measured = []
    for number, (mask, colour) in enumerate(objects, start=1):
        ys, xs = np.nonzero(nearest_owner == number)
        inside = mask[ys, xs]
        # Inside, the coverage of the pixel's own colour (robust to a drifting hue); on the
        # edge, the signed projection onto the object's colour, so background noise averages out.
        raw = np.where(inside, coverage[ys, xs], np.clip(projection[ys, xs, colour], -1.0, 1.0))
        # A washed-out object is a fainter copy of itself: scale its interior back to full coverage.
        level = max(float(coverage[mask].max()), MIN_COVERAGE)
        result = _moments(raw / level, ys.astype(np.float64), xs.astype(np.float64))
        if result is None:
            continue
        cx, cy, moments = result
        # Pixel (i, j) covers [j, j + 1) x [i, i + 1): its centre is half a pixel in.
        measured.append(_Blob(colour, int(mask.sum()), float(cx) + 0.5, float(cy) + 0.5, moments))
    return measured


@functools.lru_cache(maxsize=1)
def _prototypes() -> dict[str, np.ndarray]:
    """Moments of each shape on a large clean render: the targets the nearest-shape rule compares with."""
    side = 128
    prototypes = {}
    palette = _palette(tuple(COLORS))
    for shape in SHAPES:
        image = render([ShapeObject("blue", shape, "large", side / 2, side / 2, 0.35 * side)], side)
        (blob,) = _measure(np.asarray(image, dtype=np.float64), palette, MIN_AREA_FRACTION)
        prototypes[shape] = blob.moments
    return prototypes


def _nearest_shape(moments: np.ndarray, shapes: Sequence[str]) -> str:
    prototypes = _prototypes()
    distances = [
        float((np.abs(moments - prototypes[shape]) ** 2 / _MOMENT_SCALE**2).sum()) for shape in shapes
    ]
    return shapes[int(np.argmin(distances))]


def detect_objects(
    image: ImageInput,
    max_objects: int = 2,
    colors: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    min_area_fraction: float = MIN_AREA_FRACTION,
) -> list[DetectedObject]:
    """The `max_objects` largest objects, largest first, with colour, shape, centroid and area; [] when blank.

    `colors` and `shapes` restrict the answers to those names (default: every demo colour and shape).
    """
    palette = _palette(tuple(colors) if colors is not None else tuple(COLORS))
    shape_names = tuple(shapes) if shapes is not None else SHAPES
    _check_names("shape", shape_names, SHAPES)
    found = [
        DetectedObject(
            palette.names[blob.colour], _nearest_shape(blob.moments, shape_names), blob.cx, blob.cy, blob.area
        )
        for blob in _measure(_as_rgb(image), palette, min_area_fraction)
    ]
    found.sort(key=lambda obj: (-obj.area, obj.cy, obj.cx))
    return found[:max_objects]


def relation_of(a: DetectedObject, b: DetectedObject) -> str:
    """Where `a` is relative to `b` (a RELATIONS key), judged along the axis of the larger offset."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) > abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _alternatives(words: Sequence[str]) -> str:
    # Longest first, so that "to the left of" is never cut short by a shorter alternative.
    return "|".join(re.escape(word) for word in sorted(words, key=len, reverse=True))


_SIZE_BY_WORD = {word: size for size, word in SIZE_WORDS.items() if word} | {
    size: size for size in SIZE_BANDS
}
_RELATION_BY_PHRASE = {phrase: relation for relation, phrase in RELATIONS.items()}
_OBJECT = (
    rf"an? (?:({_alternatives(list(_SIZE_BY_WORD))}) )?"
    rf"({_alternatives(list(COLORS))}) ({_alternatives(SHAPES)})"
)
_CAPTION = re.compile(rf"{_OBJECT}(?: ({_alternatives(list(_RELATION_BY_PHRASE))}) {_OBJECT})?")


def parse_prompt(caption: str) -> dict:
    """The objects and relation of a demo caption, the inverse of `caption_for`.

    Returns {"objects": [{"color", "shape", "size"}], "relation": a RELATIONS key or None};
    "size" is None when the caption has no size word (the demo draws those medium).
    """
    text = " ".join(caption.lower().split()).rstrip(".")
    match = _CAPTION.fullmatch(text)
    if match is None:
        raise ValueError(
            f"cannot parse {caption!r} as a demo caption; expected e.g. 'a small red circle' or "
            f"'a red circle above a blue square', with colours {', '.join(COLORS)} "
            f"and shapes {', '.join(SHAPES)}"
        )
    size1, color1, shape1, phrase, size2, color2, shape2 = match.groups()
    objects = [{"color": color1, "shape": shape1, "size": _SIZE_BY_WORD[size1] if size1 else None}]
    if phrase is None:
        return {"objects": objects, "relation": None}
    objects.append({"color": color2, "shape": shape2, "size": _SIZE_BY_WORD[size2] if size2 else None})
    return {"objects": objects, "relation": _RELATION_BY_PHRASE[phrase]}


def judge(
    image: ImageInput, caption: str, colors: Sequence[str] | None = None, shapes: Sequence[str] | None = None
) -> dict:
    """Whether the image shows what the demo caption says: {"color", "shape", "both", "relation"} as booleans.

    One object: the largest detected object's colour, shape and both; "relation" is None.
    Two objects: each caption object matched by its own detected object (colours, shapes,
    both), and "relation" right between the matched objects; it is False when the objects
    cannot be told apart (both pairings fit equally well). `colors` and `shapes` are the
    names the detector chooses among (default: every demo colour and shape), e.g. a run's
    source vocabulary, so a blurred cross in a world without diamonds is not called a diamond.
    """
    wanted = parse_prompt(caption)
    targets = wanted["objects"]
    found = detect_objects(image, max_objects=len(targets), colors=colors, shapes=shapes)
    if len(targets) == 1:
        if not found:
            return {"color": False, "shape": False, "both": False, "relation": None}
        color = found[0].color == targets[0]["color"]
        shape = found[0].shape == targets[0]["shape"]
        return {"color": color, "shape": shape, "both": color and shape, "relation": None}
    if len(found) < 2:
        return {"color": False, "shape": False, "both": False, "relation": False}
    pairings = [(found[0], found[1]), (found[1], found[0])]

    def matches(pairing: tuple[DetectedObject, DetectedObject], key: str) -> bool:
        return all(getattr(det, key) == target[key] for det, target in zip(pairing, targets))

    def score(pairing: tuple[DetectedObject, DetectedObject]) -> tuple[int, int]:
        pairs = list(zip(pairing, targets))
        full = sum(det.color == t["color"] and det.shape == t["shape"] for det, t in pairs)
        parts = sum((det.color == t["color"]) + (det.shape == t["shape"]) for det, t in pairs)
        return full, parts

    color = any(matches(p, "color") for p in pairings)
    shape = any(matches(p, "shape") for p in pairings)
    both = any(matches(p, "color") and matches(p, "shape") for p in pairings)
    scores = [score(p) for p in pairings]
    relation = False
    if scores[0] != scores[1]:
        first, second = pairings[0] if scores[0] > scores[1] else pairings[1]
        relation = relation_of(first, second) == wanted["relation"]
    return {"color": color, "shape": shape, "both": both, "relation": relation}
