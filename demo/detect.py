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
    COUNT_WORDS,
    PLURALS,
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
    max_objects: int | None = 2,
    colors: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    min_area_fraction: float = MIN_AREA_FRACTION,
) -> list[DetectedObject]:
    """The `max_objects` largest objects (None: all), largest first, with colour, shape, centroid and
    area; [] when blank.

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
    return found if max_objects is None else found[:max_objects]


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
_COUNT_BY_WORD = {word: count for count, word in COUNT_WORDS.items() if count > 1}
_SHAPE_BY_PLURAL = {plural: shape for shape, plural in PLURALS.items()}
_OBJECT = (
    rf"an? (?:({_alternatives(list(_SIZE_BY_WORD))}) )?"
    rf"({_alternatives(list(COLORS))}) ({_alternatives(SHAPES)})"
)
_CAPTION = re.compile(rf"{_OBJECT}(?: ({_alternatives(list(_RELATION_BY_PHRASE))}|and) {_OBJECT})?")
_COUNT_CAPTION = re.compile(
    rf"({_alternatives(list(_COUNT_BY_WORD))}) (?:({_alternatives(list(_SIZE_BY_WORD))}) )?"
    rf"({_alternatives(list(COLORS))}) ({_alternatives(list(_SHAPE_BY_PLURAL))})"
)


def parse_prompt(caption: str) -> dict:
    """The objects and relation of a demo caption, the inverse of `caption_for`.

    Returns {"kind": a SCENE_KINDS entry, "objects": [{"color", "shape", "size", "count"}], "relation":
    a RELATIONS key or None}; "size" is None when the caption has no size word (the demo draws those
    medium); "count" is how many copies ("three red circles": one entry, count 3).
    """
    text = " ".join(caption.lower().split()).rstrip(".")
    counted = _COUNT_CAPTION.fullmatch(text)
    if counted is not None:
        word, size, color, plural = counted.groups()
        objects = [{"color": color, "shape": _SHAPE_BY_PLURAL[plural], "size": _SIZE_BY_WORD.get(size or ""),
                    "count": _COUNT_BY_WORD[word]}]  # fmt: skip
        return {"kind": "count", "objects": objects, "relation": None}
    match = _CAPTION.fullmatch(text)
    if match is None:
        raise ValueError(
            f"cannot parse {caption!r} as a demo caption; expected e.g. 'a small red circle', 'three red "
            "circles', 'a red circle and a blue square' or 'a red circle above a blue square', with "
            f"colours {', '.join(COLORS)} and shapes {', '.join(SHAPES)}"
        )
    size1, color1, shape1, phrase, size2, color2, shape2 = match.groups()
    objects = [
        {"color": color1, "shape": shape1, "size": _SIZE_BY_WORD[size1] if size1 else None, "count": 1}
    ]
    if phrase is None:
        return {"kind": "single", "objects": objects, "relation": None}
    objects.append(
        {"color": color2, "shape": shape2, "size": _SIZE_BY_WORD[size2] if size2 else None, "count": 1}
    )
    if phrase == "and":
        return {"kind": "two", "objects": objects, "relation": None}
    return {"kind": "relation", "objects": objects, "relation": _RELATION_BY_PHRASE[phrase]}


# GenEval's six task families, and the ones each kind of caption is judged on: a single-object prompt
# ("a red circle") for the object and its colour, a "two" prompt ("a red circle and a blue square")
# for both objects and for their colours bound to the right shapes.
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
TASKS_BY_KIND = {
    "single": ("single_object", "colors"),
    "count": ("counting",),
    "two": ("two_object", "color_attr"),
    "relation": ("position",),
}


def _match_pair(
    found: list[DetectedObject], targets: list[dict]
) -> tuple[DetectedObject, DetectedObject] | None:
    """The two largest objects in the order of the targets, matched by shape (by colour too when that
    decides it); None when their shapes are not the targets' shapes."""
    if len(found) < 2:
        return None
    orders = [(found[0], found[1]), (found[1], found[0])]

    def fit(order: tuple[DetectedObject, DetectedObject]) -> tuple[bool, int]:
        shapes = all(det.shape == t["shape"] for det, t in zip(order, targets))
        return shapes, sum(det.color == t["color"] for det, t in zip(order, targets))

    fits = [fit(order) for order in orders]
    best = max(range(2), key=lambda k: fits[k])
    if not fits[best][0] or (fits[0] == fits[1] and orders[0][0].shape == orders[0][1].shape):
        return None  # not these shapes, or two of one shape that the colours cannot tell apart
    return orders[best]


def judge(
    image: ImageInput, caption: str, colors: Sequence[str] | None = None, shapes: Sequence[str] | None = None
) -> dict:
    """Whether the image shows what the demo caption says, per task of its kind, GenEval's way (right
    only when every requirement holds): {"kind", "tasks": {task: bool}, "parts": {requirement: bool}}.

    single ("a red circle"): single_object, the largest object has the shape; colors, and the colour.
    count ("three red circles"): counting, exactly that many objects, every one of the colour and shape
      (parts: "count", the number alone; "kind", every object of the colour and shape).
    two ("a red circle and a blue square"): two_object, the two largest objects have the two shapes;
      color_attr, and each its own colour (a blue circle and a red square is wrong).
    relation ("a red circle above a blue square"): position, the two largest objects have the two shapes
      and the first stands in the relation to the second (judged along the dominant axis).
    `colors` and `shapes` are the names the detector chooses among (default: every demo colour and shape),
    e.g. a run's source vocabulary, so a blurred cross in a world without diamonds is not called a diamond.
    """
    return judge_scene(image, parse_prompt(caption), colors=colors, shapes=shapes)


def judge_scene(
    image: ImageInput, wanted: dict, colors: Sequence[str] | None = None, shapes: Sequence[str] | None = None
) -> dict:
    """`judge` for a request in `parse_prompt`'s form ({"kind", "objects", "relation"}); a "count"
    request of one copy is judged as counting (exactly one object)."""
    kind, targets = wanted["kind"], wanted["objects"]
    found = detect_objects(image, max_objects=None, colors=colors, shapes=shapes)
    parts: dict[str, bool] = {}
    if kind == "single":
        largest = found[0] if found else None
        parts["shape"] = largest is not None and largest.shape == targets[0]["shape"]
        parts["color"] = largest is not None and largest.color == targets[0]["color"]
        tasks = {"single_object": parts["shape"], "colors": parts["shape"] and parts["color"]}
    elif kind == "count":
        target = targets[0]
        parts["count"] = len(found) == target["count"]
        parts["kind"] = bool(found) and all(
            det.shape == target["shape"] and det.color == target["color"] for det in found
        )
        tasks = {"counting": parts["count"] and parts["kind"]}
    elif kind == "two":
        largest = found[:2]
        parts["shapes"] = sorted(d.shape for d in largest) == sorted(t["shape"] for t in targets)
        parts["colors"] = len(largest) == 2 and any(
            all((d.color, d.shape) == (t["color"], t["shape"]) for d, t in zip(order, targets))
            for order in (largest, largest[::-1])
        )
        tasks = {"two_object": parts["shapes"], "color_attr": parts["shapes"] and parts["colors"]}
    else:
        pair = _match_pair(found, targets)
        parts["shapes"] = pair is not None
        parts["relation"] = pair is not None and relation_of(*pair) == wanted["relation"]
        tasks = {"position": parts["relation"]}
    return {"kind": kind, "tasks": tasks, "parts": parts}
