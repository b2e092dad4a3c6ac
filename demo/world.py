"""The captioned-shapes world: coloured shapes on a plain light background, with captions.

`generate_samples` draws four kinds of scene and captions them:

    single     "a small red circle"
    count      "three red circles"                      (2 to `max_count` copies of one object)
    two        "a red circle and a blue square"          (two different objects, anywhere)
    relation   "a blue square to the left of an orange cross"

Three kinds of composition are held out, so that the evaluation can prompt what no training
image shows (demo/suite.py): (a) colour-shape combinations (`heldout`: no image has a red
square), (b) pairings of seen objects (`heldout_pairings`: red circles and blue squares abound,
never together, or never in one relation), (c) counts of a seen object (`heldout_counts`: yellow
crosses and "three ..." are seen, three yellow crosses never). Everything is deterministic for
`WorldConfig.seed`.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dalle.config import ConfigError, RunConfig

PLUGIN = "demo"  # the key of this world's settings under `plugins` in a run configuration


class WorldConfig(BaseModel):
    """The captioned-shapes world's settings (`plugins.demo` in a run configuration)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(
        0, description="Seed of the generator: the same seed gives the same images and captions."
    )
    num_images: int = Field(
        1200, ge=1, description="Number of distinct generated images (before planted duplicates)."
    )
    image_size: int = Field(64, ge=16, description="Side of the generated square images, in pixels.")
    colors: list[str] = Field(
        default_factory=lambda: ["red", "green", "blue", "yellow", "purple", "orange"],
        description="Colour names used in images and captions (each must be a known colour).",
    )
    shapes: list[str] = Field(
        default_factory=lambda: ["circle", "square", "triangle", "cross"],
        description="Shape names used in images and captions (circle, square, triangle, cross, diamond).",
    )
    heldout: list[str] = Field(
        default_factory=lambda: ["red square", "blue triangle", "green circle", "yellow cross"],
        description="'colour shape' combinations never shown in training images; prompted later for zero-shot.",
    )
    heldout_pairings: list[str] = Field(
        default_factory=lambda: [
            "red circle + blue square",
            "yellow triangle + purple circle",
            "green square + orange triangle",
            "purple cross + yellow square",
        ],
        description="Pairings of seen objects never shown together: 'red circle + blue square' (in no "
        "image together), or 'red circle above blue square' (never in that relation, either way round; "
        "nor in a 'two' scene, whose layout is free).",
    )
    heldout_counts: list[str] = Field(
        default_factory=lambda: ["3 purple square", "2 orange circle", "3 blue cross"],
        description="'<count> <colour> <shape>' (count 2 or more): that many copies of a seen object are "
        "never shown together, while the object and the count are.",
    )
    pair_fraction: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Share of images with two objects and a relation ('a red circle above ...').",
    )
    two_fraction: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Share of images with two different objects: 'a red circle and a blue square'.",
    )
    count_fraction: float = Field(
        0.15,
        ge=0,
        le=1,
        description="Share of images with 2 to max_count copies of one object: 'three red circles'.",
    )
    max_count: int = Field(4, ge=2, le=4, description="The most copies of one object a count scene shows.")
    suite_prompts_per_kind: int = Field(
        4, ge=1, description="The evaluation suite's prompts per level and kind of scene (demo/suite.py)."
    )
    suite_counts: list[int] = Field(
        default_factory=lambda: [1, 2, 3],
        description="The counts the suite's counting prompts ask for, in turn (1 to max_count).",
    )
    exact_duplicates: int = Field(
        30, ge=0, description="Planted exact duplicates: the same bytes at another URL."
    )
    near_duplicates: int = Field(
        30, ge=0, description="Planted near duplicates: resized and re-encoded copies."
    )

    @model_validator(mode="after")
    def _heldout_known(self) -> WorldConfig:
        for combo in self.heldout:
            parts = combo.split()
            if len(parts) != 2 or parts[0] not in self.colors or parts[1] not in self.shapes:
                raise ValueError(
                    f"held-out combination {combo!r} must be '<colour> <shape>' with a colour from "
                    f"{self.colors} and a shape from {self.shapes}"
                )
        # A default pairing or count that this world cannot show (a colour or shape it lacks, a combination
        # held out above) gives way; one given is checked.
        for name, parse in (("heldout_pairings", self.pairings), ("heldout_counts", self.counts_held_out)):
            if name not in self.model_fields_set:
                kept = []
                for entry in getattr(self, name):
                    try:
                        parse([entry])
                    except ValueError:
                        continue
                    kept.append(entry)
                setattr(self, name, kept)
        self.pairings()  # each raises ValueError naming the entry
        if not self.suite_counts or not all(1 <= n <= self.max_count for n in self.suite_counts):
            raise ValueError(f"suite_counts must list counts from 1 to max_count ({self.max_count})")
        self.counts_held_out()
        if self.pair_fraction + self.two_fraction + self.count_fraction > 1:
            raise ValueError(
                "pair_fraction + two_fraction + count_fraction must be at most 1 (the rest are single objects)"
            )
        return self

    def _seen_combo(self, words: list[str], entry: str, field: str) -> tuple[str, str]:
        combo = tuple(words)
        if len(combo) != 2 or combo[0] not in self.colors or combo[1] not in self.shapes:
            raise ValueError(
                f"{field} entry {entry!r}: {' '.join(words)!r} must be '<colour> <shape>' with a colour from "
                f"{self.colors} and a shape from {self.shapes}"
            )
        if " ".join(combo) in self.heldout:
            raise ValueError(
                f"{field} entry {entry!r}: {' '.join(combo)!r} is held out as a combination already "
                "(heldout); a pairing or count holds out seen objects only"
            )
        return combo[0], combo[1]

    def pairings(self, entries: list[str] | None = None) -> list[HeldOutPairing]:
        """The held-out pairings (or these entries), parsed."""
        parsed = []
        for entry in self.heldout_pairings if entries is None else entries:
            words = entry.split()
            relation, split_at = None, None
            if "+" in words:
                split_at, width = words.index("+"), 1
            else:
                for key, phrase in sorted(RELATIONS.items(), key=lambda kv: -len(kv[1])):
                    for form in (phrase.split(), key.split()):
                        for i in range(len(words) - len(form) + 1):
                            if words[i : i + len(form)] == form and split_at is None:
                                relation, split_at, width = key, i, len(form)
            if split_at is None:
                raise ValueError(
                    f"heldout_pairings entry {entry!r} must be '<colour> <shape> + <colour> <shape>' or "
                    f"'<colour> <shape> <relation> <colour> <shape>' with a relation from {list(RELATIONS)}"
                )
            first = self._seen_combo(words[:split_at], entry, "heldout_pairings")
            second = self._seen_combo(words[split_at + width :], entry, "heldout_pairings")
            if first == second:
                raise ValueError(f"heldout_pairings entry {entry!r} pairs an object with itself")
            parsed.append(HeldOutPairing(first, second, relation))
        return parsed

    def counts_held_out(self, entries: list[str] | None = None) -> set[tuple[int, str, str]]:
        """The held-out counts (or these entries), parsed: {(count, colour, shape)}."""
        parsed = set()
        for entry in self.heldout_counts if entries is None else entries:
            words = entry.split()
            if not words or not words[0].isdigit() or not 2 <= int(words[0]) <= self.max_count:
                raise ValueError(
                    f"heldout_counts entry {entry!r} must be '<count> <colour> <shape>' with a count from 2 "
                    f"to max_count ({self.max_count})"
                )
            parsed.add((int(words[0]), *self._seen_combo(words[1:], entry, "heldout_counts")))
        return parsed


@dataclass(frozen=True)
class HeldOutPairing:
    """Two seen objects never shown together (relation None), or never with `first` `relation` `second`."""

    first: tuple[str, str]  # (colour, shape)
    second: tuple[str, str]
    relation: str | None = None

    def forbids(self, a: tuple[str, str], b: tuple[str, str], relation: str | None) -> bool:
        """Whether a scene of `a` `relation` `b` (relation None: a 'two' scene, free layout) is held out."""
        if {a, b} != {self.first, self.second}:
            return False
        if self.relation is None or relation is None:
            return True
        if a == self.first:
            return relation == self.relation
        return relation == INVERSE_RELATIONS[self.relation]


def world_config(cfg: RunConfig) -> WorldConfig:
    """The world settings of a run configuration (`plugins.demo`; defaults when absent)."""
    try:
        return WorldConfig.model_validate(cfg.plugins.get(PLUGIN) or {})
    except ValueError as err:
        raise ConfigError(f"plugins.{PLUGIN}: {err}") from None


# Saturated colours whose hues are at least ~25 degrees apart, so that a pixel-level
# detector can tell them apart by nearest colour after anti-aliasing and JPEG.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "orange": (245, 135, 20),
    "yellow": (235, 200, 20),
    "green": (40, 160, 60),
    "cyan": (20, 180, 200),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
BACKGROUND: tuple[int, int, int] = (245, 245, 245)

# Object radius as a fraction of the image side, per size class. The bands do not
# touch, so the size word in a caption is recoverable from the pixels.
SIZE_BANDS: dict[str, tuple[float, float]] = {
    "small": (0.14, 0.18),
    "medium": (0.20, 0.26),
    "large": (0.30, 0.40),
}
# Medium is the unmarked size: its caption carries no size word.
SIZE_WORDS: dict[str, str] = {"small": "small", "medium": "", "large": "large"}
# Two objects must fit side by side with a gap, so pairs use small and medium only,
# and medium capped: 2 * (0.18 + 0.23) + gap + margins <= 1.
PAIR_MAX_RADIUS = 0.23
RELATIONS: dict[str, str] = {
    "above": "above",
    "below": "below",
    "left of": "to the left of",
    "right of": "to the right of",
}
INVERSE_RELATIONS = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses",
           "diamond": "diamonds"}  # fmt: skip
SCENE_KINDS = ("single", "count", "two", "relation")
_MARGIN = 0.02  # of the side, between an object and the image border
_GAP = 0.04  # of the side, between the two objects of a pair
_SCATTER_GAP = (
    0.06  # of the side, between objects placed freely (counts, 'two' scenes): countable when blurred
)
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape, in output pixels; every shape fits in the box cx +- radius, cy +- radius."""

    color: str
    shape: str
    size: str  # a key of SIZE_BANDS
    cx: float
    cy: float
    radius: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the square that contains the shape."""
        return (self.cx - self.radius, self.cy - self.radius, self.cx + self.radius, self.cy + self.radius)


@dataclass(frozen=True)
class DemoSample:
    """A generated image with its caption and ground truth; objects[0] stands in `relation` to objects[1]."""

    name: str
    caption: str
    objects: list[ShapeObject]
    relation: str | None
    image: bytes  # PNG
    kind: str = "single"  # a SCENE_KINDS entry


def validate_source(cfg: WorldConfig) -> None:
    """Raise ValueError when the config names a colour or shape this source cannot draw."""
    for kind, names, known in (("colour", cfg.colors, list(COLORS)), ("shape", cfg.shapes, list(SHAPES))):
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(
                f"unknown {kind} {unknown[0]!r} in the demo world config; known {kind}s are: {', '.join(known)}"
            )
    if not cfg.colors or not cfg.shapes:
        raise ValueError("source config needs at least one colour and one shape")


def allowed_combinations(cfg: WorldConfig) -> list[tuple[str, str]]:
    """(colour, shape) pairs that may appear in images: every combination except the held-out ones."""
    validate_source(cfg)
    heldout = {tuple(combo.split()) for combo in cfg.heldout}
    combos = [(c, s) for c in cfg.colors for s in cfg.shapes if (c, s) not in heldout]
    if not combos:
        raise ValueError("every colour-shape combination is held out; remove some from plugins.demo.heldout")
    return combos


def heldout_prompts(cfg: WorldConfig) -> list[str]:
    """Captions of the held-out combinations ("a red square"), for the zero-shot gallery and eval."""
    validate_source(cfg)
    return [f"{_article(combo)} {combo}" for combo in cfg.heldout]


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def describe(obj: ShapeObject) -> str:
    """Noun phrase of one object: "a small red circle", "an orange square"."""
    words = " ".join(w for w in (SIZE_WORDS[obj.size], obj.color, obj.shape) if w)
    return f"{_article(words)} {words}"


def count_phrase(count: int, color: str, shape: str) -> str:
    """ "three red circles"; "a red circle" for one."""
    if count == 1:
        return f"{_article(color)} {color} {shape}"
    if count not in COUNT_WORDS:
        raise ValueError(f"counts are 1 to {max(COUNT_WORDS)}, got {count}")
    return f"{COUNT_WORDS[count]} {color} {PLURALS[shape]}"


def caption_for(objects: list[ShapeObject], relation: str | None = None) -> str:
    """The caption of a scene: one object; copies of one object ("three red circles"); two different
    objects ("a red circle and a blue square"); or two where objects[0] is `relation` objects[1]."""
    if relation is None:
        if not objects:
            raise ValueError("a caption describes at least one object")
        if len(objects) == 1:
            return describe(objects[0])
        if len({(o.color, o.shape) for o in objects}) == 1:
            return count_phrase(len(objects), objects[0].color, objects[0].shape)
        if len(objects) == 2:
            return f"{describe(objects[0])} and {describe(objects[1])}"
        raise ValueError(f"a caption describes copies of one object or two objects, got {len(objects)}")
    if relation not in RELATIONS or len(objects) != 2:
        raise ValueError(
            f"a relation caption needs two objects and one of {list(RELATIONS)}, got {relation!r}"
        )
    return f"{describe(objects[0])} {RELATIONS[relation]} {describe(objects[1])}"


# --- rendering -----------------------------------------------------------------------


def _draw_shape(draw: ImageDraw.ImageDraw, obj: ShapeObject, scale: float) -> None:
    fill = COLORS[obj.color]
    cx, cy, r = obj.cx * scale, obj.cy * scale, obj.radius * scale
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        # Smaller than its box so that its area stays close to the circle's (2.9 r^2 vs 3.1 r^2).
        h = 0.85 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif obj.shape == "cross":
        w = 0.3 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; known shapes are: {', '.join(SHAPES)}")


def render(objects: list[ShapeObject], image_size: int) -> Image.Image:
    """Draw the objects on the plain background as an RGB image of side `image_size` (anti-aliased)."""
    big = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        _draw_shape(draw, obj, _SUPERSAMPLE)
    return canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# --- generation ----------------------------------------------------------------------


def seeded_rng(seed: int, stream: int) -> np.random.Generator:
    # Separate streams for samples and site layout, so that changing the number of planted
    # duplicates never changes the images themselves. The mask accepts negative seeds.
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, stream])


def _radius(rng: np.random.Generator, size: str, side: int, cap: float = 1.0) -> float:
    lo, hi = SIZE_BANDS[size]
    return float(rng.uniform(lo, min(hi, cap))) * side


def _single(rng: np.random.Generator, combo: tuple[str, str], side: int) -> ShapeObject:
    size = str(rng.choice(list(SIZE_BANDS)))
    r = _radius(rng, size, side)
    lo, hi = _MARGIN * side + r, side - _MARGIN * side - r
    cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
    return ShapeObject(combo[0], combo[1], size, cx, cy, r)


def _pair(
    rng: np.random.Generator, combos: tuple[tuple[str, str], ...], relation: str, side: int
) -> tuple[ShapeObject, ShapeObject]:
    """Two non-overlapping objects, combos[0] `relation` combos[1].

    Along the relation's axis the boxes are separated by a gap; across it the centres
    differ by at most half the separation, so the relation is the dominant one.
    """
    sizes = [str(rng.choice(["small", "medium"])) for _ in range(2)]
    radii = [_radius(rng, s, side, cap=PAIR_MAX_RADIUS) for s in sizes]
    margin, gap = _MARGIN * side, _GAP * side
    # "first" has the smaller coordinate along the axis (top or left).
    first = 0 if relation in ("above", "left of") else 1
    r1, r2 = radii[first], radii[1 - first]
    a1 = float(rng.uniform(margin + r1, side - margin - r2 - (r1 + r2 + gap)))
    a2 = float(rng.uniform(a1 + r1 + r2 + gap, side - margin - r2))
    half = (a2 - a1) / 2
    b1 = float(rng.uniform(margin + r1, side - margin - r1))
    b2 = float(rng.uniform(max(margin + r2, b1 - half), min(side - margin - r2, b1 + half)))
    along, across = [0.0, 0.0], [0.0, 0.0]
    along[first], along[1 - first] = a1, a2
    across[first], across[1 - first] = b1, b2
    vertical = relation in ("above", "below")
    objects = []
    for i in range(2):
        cx, cy = (across[i], along[i]) if vertical else (along[i], across[i])
        color, shape = combos[i]
        objects.append(ShapeObject(color, shape, sizes[i], cx, cy, radii[i]))
    return objects[0], objects[1]


def _scatter(rng: np.random.Generator, radii: list[float], side: int) -> list[tuple[float, float]]:
    """Centres for objects of these radii, their boxes apart by _SCATTER_GAP of the side: drawn at random,
    or, when that keeps failing (four objects on a small canvas), jittered in the cells of a 2x2 grid."""
    margin, gap = _MARGIN * side, _SCATTER_GAP * side
    for _ in range(200):
        centres: list[tuple[float, float]] = []
        for r in radii:
            x, y = (float(v) for v in rng.uniform(margin + r, side - margin - r, size=2))
            # Apart as boxes, not discs: the corners of squares and crosses reach the box.
            if all(max(abs(x - a), abs(y - b)) >= r + q + gap for (a, b), q in zip(centres, radii)):
                centres.append((x, y))
            else:
                break
        if len(centres) == len(radii):
            return centres
    cells = rng.permutation(4)[: len(radii)]
    half = side / 2
    centres = []
    for cell, r in zip(cells, radii):
        slack = max(0.0, half / 2 - r - max(margin, gap / 2))
        x0, y0 = (cell % 2 + 0.5) * half, (cell // 2 + 0.5) * half
        centres.append((x0 + float(rng.uniform(-slack, slack)), y0 + float(rng.uniform(-slack, slack))))
    return centres


def _count(rng: np.random.Generator, combo: tuple[str, str], count: int, side: int) -> list[ShapeObject]:
    """`count` copies of one object, apart; small ones from three on, so that four fit."""
    sizes = ["small"] * count if count >= 3 else [str(rng.choice(["small", "medium"]))] * count
    radii = [_radius(rng, size, side, cap=PAIR_MAX_RADIUS) for size in sizes]
    return [
        ShapeObject(combo[0], combo[1], size, x, y, r)
        for (x, y), size, r in zip(_scatter(rng, radii, side), sizes, radii)
    ]


def _two(rng: np.random.Generator, combos: tuple[tuple[str, str], ...], side: int) -> list[ShapeObject]:
    """Two different objects anywhere, apart."""
    sizes = [str(rng.choice(["small", "medium"])) for _ in range(2)]
    radii = [_radius(rng, size, side, cap=PAIR_MAX_RADIUS) for size in sizes]
    return [
        ShapeObject(combo[0], combo[1], size, x, y, r)
        for (x, y), combo, size, r in zip(_scatter(rng, radii, side), combos, sizes, radii)
    ]


def _pick_two(
    rng: np.random.Generator, combos: list[tuple[str, str]], relation: str | None, held: list[HeldOutPairing]
) -> tuple[tuple[str, str], tuple[str, str]]:
    """Two different objects that may be shown together (in `relation`; None: a 'two' scene)."""
    while True:
        picks = rng.choice(len(combos), size=2, replace=False)
        a, b = combos[int(picks[0])], combos[int(picks[1])]
        if not any(pairing.forbids(a, b, relation) for pairing in held):
            return a, b


def compose(
    rng: np.random.Generator,
    kind: str,
    combos: Sequence[tuple[str, str]],
    side: int,
    relation: str | None = None,
    count: int = 1,
) -> list[ShapeObject]:
    """The objects of one scene of `kind` (a SCENE_KINDS entry) on a canvas of side `side`: one (colour,
    shape) combination for "single" and "count" (`count` copies), two for "two" and "relation"."""
    wanted = 1 if kind in ("single", "count") else 2
    if kind not in SCENE_KINDS or len(combos) != wanted:
        raise ValueError(f"a {kind!r} scene takes {wanted} colour-shape combination(s), got {list(combos)}")
    if kind == "relation":
        if relation not in RELATIONS:
            raise ValueError(f"a relation scene needs one of {list(RELATIONS)}, got {relation!r}")
        return list(_pair(rng, tuple(combos), relation, side))
    if kind == "two":
        return _two(rng, tuple(combos), side)
    if kind == "count" and count > 1:
        return _count(rng, combos[0], count, side)
    return [_single(rng, combos[0], side)]


def scene_kinds(cfg: WorldConfig, rng: np.random.Generator) -> list[str]:
    """The kind of each image: round(num_images * fraction) of each multi-object kind, placed at random."""
    kinds = np.array(["single"] * cfg.num_images, dtype=object)
    order = rng.permutation(cfg.num_images)
    start = 0
    for kind, fraction in (
        ("relation", cfg.pair_fraction),
        ("two", cfg.two_fraction),
        ("count", cfg.count_fraction),
    ):
        n = round(cfg.num_images * fraction)
        kinds[order[start : start + n]] = kind
        start += n
    return [str(kind) for kind in kinds]


def generate_samples(cfg: WorldConfig) -> list[DemoSample]:
    """cfg.num_images distinct captioned images, each scene kind in its share; same seed, same bytes.
    No image shows a held-out combination, pairing or count."""
    combos = allowed_combinations(cfg)
    if len(combos) < 2 and (cfg.pair_fraction or cfg.two_fraction):
        raise ValueError(
            "two-object scenes need at least two colour-shape combinations that are not held out"
        )
    held_pairings = cfg.pairings()
    held_counts = cfg.counts_held_out()
    rng = seeded_rng(cfg.seed, 0)
    side = cfg.image_size
    kinds = scene_kinds(cfg, rng)
    relations = list(RELATIONS)
    seen: set[bytes] = set()
    samples = []
    for index, kind in enumerate(kinds):
        # Redraw on the (rare) identical image so that planted duplicates are the only exact ones.
        while True:
            relation, count = None, 1
            if kind == "relation":
                relation = relations[int(rng.integers(len(relations)))]
                chosen = _pick_two(rng, combos, relation, held_pairings)
            elif kind == "two":
                chosen = _pick_two(rng, combos, None, held_pairings)
            elif kind == "count":
                while True:
                    chosen = (combos[int(rng.integers(len(combos)))],)
                    count = int(rng.integers(2, cfg.max_count + 1))
                    if (count, *chosen[0]) not in held_counts:
                        break
            else:
                chosen = (combos[int(rng.integers(len(combos)))],)
            objects = compose(rng, kind, chosen, side, relation=relation, count=count)
            png = png_bytes(render(objects, side))
            digest = hashlib.sha256(png).digest()
            if digest not in seen:
                seen.add(digest)
                break
        samples.append(
            DemoSample(f"img/{index:06d}.png", caption_for(objects, relation), objects, relation, png, kind)
        )
    return samples
