"""The captioned-shapes world: coloured shapes on a plain light background, with captions.

`generate_samples` draws them and captions them ("a small red circle", "a blue square to the
left of an orange cross"); colour-shape combinations listed in `WorldConfig.heldout` never
appear, so the gallery can prompt them for the zero-shot test. Everything is deterministic
for `WorldConfig.seed`.
"""

from __future__ import annotations

import hashlib
import io
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
    pair_fraction: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Share of images with two objects and a relation ('a red circle above ...').",
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
        return self


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
_MARGIN = 0.02  # of the side, between an object and the image border
_GAP = 0.04  # of the side, between the two objects of a pair
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


def caption_for(objects: list[ShapeObject], relation: str | None = None) -> str:
    """Caption of one object, or of two objects where objects[0] is `relation` objects[1]."""
    if relation is None:
        if len(objects) != 1:
            raise ValueError(f"a caption without a relation describes one object, got {len(objects)}")
        return describe(objects[0])
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
    rng: np.random.Generator, combos: list[tuple[str, str]], relation: str, side: int
) -> tuple[ShapeObject, ShapeObject]:
    """Two non-overlapping objects with objects[0] `relation` objects[1].

    Along the relation's axis the boxes are separated by a gap; across it the centres
    differ by at most half the separation, so the relation is the dominant one.
    """
    picks = rng.choice(len(combos), size=2, replace=False) if len(combos) > 1 else [0, 0]
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
        color, shape = combos[int(picks[i])]
        objects.append(ShapeObject(color, shape, sizes[i], cx, cy, radii[i]))
    return objects[0], objects[1]


def generate_samples(cfg: WorldConfig) -> list[DemoSample]:
    """cfg.num_images distinct captioned images, round(num_images * pair_fraction) of them pairs; same seed, same bytes."""
    combos = allowed_combinations(cfg)
    rng = seeded_rng(cfg.seed, 0)
    side = cfg.image_size
    n_pairs = round(cfg.num_images * cfg.pair_fraction)
    is_pair = np.zeros(cfg.num_images, dtype=bool)
    is_pair[rng.permutation(cfg.num_images)[:n_pairs]] = True
    relations = list(RELATIONS)
    seen: set[bytes] = set()
    samples = []
    for index in range(cfg.num_images):
        # Redraw on the (rare) identical image so that planted duplicates are the only exact ones.
        while True:
            if is_pair[index]:
                relation = relations[int(rng.integers(len(relations)))]
                objects = list(_pair(rng, combos, relation, side))
            else:
                relation = None
                objects = [_single(rng, combos[int(rng.integers(len(combos)))], side)]
            png = png_bytes(render(objects, side))
            digest = hashlib.sha256(png).digest()
            if digest not in seen:
                seen.add(digest)
                break
        samples.append(
            DemoSample(f"img/{index:06d}.png", caption_for(objects, relation), objects, relation, png)
        )
    return samples
