"""The demo detector: colour, shape and relation read back from generated images, clean and degraded."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageFilter

from demo.detect import DetectedObject, detect_objects, judge, judge_scene, parse_prompt, relation_of
from demo.world import (
    BACKGROUND,
    COLORS,
    RELATIONS,
    SHAPES,
    DemoSample,
    ShapeObject,
    WorldConfig,
    caption_for,
    generate_samples,
    render,
)

SIDES = (32, 64)
# Every family of scene (per kind: single 40%, relation 30%, count 20%, two 10%): enough that 99%
# allows a handful of misses.
SAMPLES_PER_SIDE = {32: 1000, 64: 600}


@functools.cache
def demo_samples(side: int) -> tuple[DemoSample, ...]:
    """Generated demo images with every colour and shape, nothing held out."""
    cfg = WorldConfig(
        num_images=SAMPLES_PER_SIDE[side],
        image_size=side,
        pair_fraction=0.3,
        two_fraction=0.1,
        count_fraction=0.2,
        heldout_pairings=[],
        heldout_counts=[],
        colors=list(COLORS),
        shapes=list(SHAPES),
        heldout=[],
        seed=7,
    )
    drawn = tuple(generate_samples(cfg))
    combos = {(o.color, o.shape) for s in drawn for o in s.objects}
    assert len(combos) == len(COLORS) * len(SHAPES), "the test set must show every colour-shape combination"
    return drawn


@pytest.fixture(params=SIDES, ids=lambda side: f"{side}px")
def samples(request) -> tuple[DemoSample, ...]:
    return demo_samples(request.param)


def pil(sample: DemoSample) -> Image.Image:
    return Image.open(io.BytesIO(sample.image)).convert("RGB")


def blur(radius: float) -> Callable[[Image.Image], Image.Image]:
    return lambda image: image.filter(ImageFilter.GaussianBlur(radius))


def jpeg(quality: int = 75) -> Callable[[Image.Image], Image.Image]:
    def encode(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        return Image.open(buffer).convert("RGB")

    return encode


def faded(strength: float, noise: float) -> Callable[[Image.Image], Image.Image]:
    """Colours pulled toward the background by 1 - strength, plus pixel noise: a washed-out decoder."""

    def fade(image: Image.Image) -> Image.Image:
        pixels = np.asarray(image, dtype=np.float64) * strength + np.array(BACKGROUND) * (1 - strength)
        pixels += np.random.default_rng(0).normal(0, noise, pixels.shape)
        return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))

    return fade


FAMILIES = ("single_color", "single_shape", "pair_color", "pair_all", "count_all")


def accuracy(samples: tuple[DemoSample, ...], degrade=lambda image: image) -> dict[str, float]:
    """Share of samples read right, from ground truth (not captions): single objects, pairs (two and
    relation scenes: colours bound to shapes; "pair_all" adds the relation where there is one) and
    counts (every object found, none extra, each of the right colour and shape)."""
    hits: dict[str, list[bool]] = {k: [] for k in FAMILIES}
    for sample in samples:
        truth = sample.objects
        if sample.kind == "count":
            found = detect_objects(degrade(pil(sample)), max_objects=None)
            hits["count_all"].append(
                len(found) == len(truth)
                and all((d.color, d.shape) == (truth[0].color, truth[0].shape) for d in found)
            )
            continue
        found = detect_objects(degrade(pil(sample)), max_objects=len(truth))
        if len(truth) == 1:
            hits["single_color"].append(bool(found) and found[0].color == truth[0].color)
            hits["single_shape"].append(bool(found) and found[0].shape == truth[0].shape)
            continue
        color_ok = all_ok = False
        if len(found) == 2:
            for first, second in ((found[0], found[1]), (found[1], found[0])):
                colors = first.color == truth[0].color and second.color == truth[1].color
                shapes = first.shape == truth[0].shape and second.shape == truth[1].shape
                placed = sample.relation is None or relation_of(first, second) == sample.relation
                color_ok = color_ok or colors
                all_ok = all_ok or (colors and shapes and placed)
        hits["pair_color"].append(color_ok)
        hits["pair_all"].append(all_ok)
    return {k: float(np.mean(v)) for k, v in hits.items()}


def test_clean_images_are_read_right(samples):
    rates = accuracy(samples)
    side = pil(samples[0]).size[0]
    assert min(rates.values()) >= 0.99, f"clean {side} px images, share read right: {rates}"


# Bars sit a few points under what was measured when they were set (noted per case, in the
# order of the bars), so that a loss of tolerance fails them. "pair_all" asks for both
# objects' colour and shape and the relation; "count_all" every copy found and none extra. At
# 32 px a small cross's arms are under 3 px wide: blur and JPEG's half-resolution colour turn some
# of them into diamonds, and blur with JPEG merges or splits some of four small copies.
DEGRADED = {
    # measured: 1.000, 1.000, 0.998, 0.998, 0.995
    "32px-blur1": (
        32,
        blur(1),
        {"single_color": 0.98, "single_shape": 0.95, "pair_color": 0.98, "pair_all": 0.95, "count_all": 0.95},
    ),
    # measured: 1.000, 0.995, 1.000, 0.980, 0.975
    "32px-jpeg": (
        32,
        jpeg(),
        {"single_color": 0.98, "single_shape": 0.95, "pair_color": 0.98, "pair_all": 0.95, "count_all": 0.93},
    ),
    # measured: 1.000, 0.968, 0.998, 0.930, 0.860
    "32px-blur1-jpeg": (
        32,
        lambda image: jpeg()(blur(1)(image)),
        {"single_color": 0.95, "single_shape": 0.93, "pair_color": 0.95, "pair_all": 0.88, "count_all": 0.8},
    ),
    # measured: 1.000, 1.000, 1.000, 0.998, 1.000
    "32px-faded-blur1": (
        32,
        lambda image: faded(0.7, 6)(blur(1)(image)),
        {"single_color": 0.98, "single_shape": 0.95, "pair_color": 0.98, "pair_all": 0.95, "count_all": 0.95},
    ),
    # measured: 1.000, 1.000, 1.000, 0.996, 0.992
    "64px-blur2-jpeg": (
        64,
        lambda image: jpeg()(blur(2)(image)),
        {"single_color": 0.98, "single_shape": 0.95, "pair_color": 0.98, "pair_all": 0.95, "count_all": 0.95},
    ),
}


@pytest.mark.parametrize("case", list(DEGRADED))
def test_degraded_images_are_mostly_read_right(case):
    side, degrade, bars = DEGRADED[case]
    rates = accuracy(demo_samples(side), degrade)
    failed = {k: (round(rates[k], 4), bar) for k, bar in bars.items() if rates[k] < bar}
    assert not failed, f"{case}: (measured, bar) below the bar: {failed}; all rates: {rates}"


def test_centroids_land_on_the_drawn_centres(samples):
    # Circle, square, cross and diamond are centred on their box; the triangle's centroid is lower.
    errors = [
        max(abs(found.cx - obj.cx), abs(found.cy - obj.cy))
        for sample in samples
        if len(sample.objects) == 1 and (obj := sample.objects[0]).shape != "triangle"
        for found in detect_objects(pil(sample), max_objects=1)
    ]
    assert max(errors) < 0.25, f"worst centroid error {max(errors):.3f} px"


def test_judge_accepts_clean_samples_with_their_own_captions(samples):
    wrong = []
    for sample in samples[:300]:
        verdict = judge(sample.image, sample.caption)
        if not verdict["tasks"] or not all(verdict["tasks"].values()) or not all(verdict["parts"].values()):
            wrong.append((sample.caption, verdict))
    assert not wrong, f"{len(wrong)} of 300 captions judged wrong on their own image, e.g. {wrong[:3]}"


def test_blank_and_noisy_background_have_no_objects():
    assert detect_objects(Image.new("RGB", (32, 32), BACKGROUND)) == []
    assert detect_objects(np.full((64, 64, 3), 255, dtype=np.uint8)) == []
    noisy = np.array(BACKGROUND) + np.random.default_rng(0).normal(0, 6, (64, 64, 3))
    assert detect_objects(np.clip(noisy, 0, 255).astype(np.uint8)) == []


def test_faint_objects_count_as_background():
    image = render([ShapeObject("blue", "square", "large", 32, 32, 20)], 64)
    assert [f.color for f in detect_objects(faded(0.6, 0)(image))] == ["blue"]
    assert detect_objects(faded(0.4, 0)(image)) == []


def test_specks_are_ignored_unless_asked_for():
    image = np.full((64, 64, 3), BACKGROUND, dtype=np.uint8)
    image[10:13, 10:13] = COLORS["red"]  # 9 pixels: 0.2% of the image
    assert detect_objects(image) == []
    (speck,) = detect_objects(image, min_area_fraction=0)
    assert (speck.color, speck.area, speck.cx, speck.cy) == ("red", 9, 11.5, 11.5)


def test_objects_come_largest_first_and_max_objects_caps_them():
    objects = [
        ShapeObject("green", "square", "small", 12, 12, 7),
        ShapeObject("blue", "circle", "large", 44, 44, 16),
        ShapeObject("yellow", "triangle", "medium", 14, 46, 11),
    ]
    image = render(objects, 64)
    found = detect_objects(image, max_objects=5)
    assert [(f.color, f.shape) for f in found] == [
        ("blue", "circle"),
        ("yellow", "triangle"),
        ("green", "square"),
    ]
    assert [f.area for f in found] == sorted((f.area for f in found), reverse=True)
    assert detect_objects(image, max_objects=1) == found[:1]


def test_every_input_form_gives_the_same_answer(samples):
    sample = samples[1]
    image = pil(sample)
    expected = detect_objects(image)
    assert expected
    assert detect_objects(sample.image) == expected
    assert detect_objects(np.asarray(image)) == expected
    from_floats = detect_objects(np.asarray(image) / 255.0)
    assert [(f.color, f.shape, f.area) for f in from_floats] == [(e.color, e.shape, e.area) for e in expected]
    assert [f.cx for f in from_floats] == pytest.approx([e.cx for e in expected])


def test_colors_and_shapes_restrict_the_answers():
    image = render([ShapeObject("orange", "diamond", "medium", 32, 32, 14)], 64)
    (found,) = detect_objects(image, max_objects=1)
    assert (found.color, found.shape) == ("orange", "diamond")
    (restricted,) = detect_objects(image, max_objects=1, colors=["red", "blue"], shapes=["circle", "square"])
    assert restricted.color == "red" and restricted.shape == "circle"
    with pytest.raises(ValueError, match="known colours are"):
        detect_objects(image, colors=["pink"])
    with pytest.raises(ValueError, match="known shapes are"):
        detect_objects(image, shapes=["star"])


def test_relation_follows_the_dominant_axis():
    def at(x: float, y: float) -> DetectedObject:
        return DetectedObject("red", "circle", x, y, 10)

    assert relation_of(at(10, 30), at(30, 20)) == "left of"
    assert relation_of(at(30, 20), at(10, 30)) == "right of"
    assert relation_of(at(20, 5), at(28, 30)) == "above"
    assert relation_of(at(28, 30), at(20, 5)) == "below"
    assert set(RELATIONS) == {"above", "below", "left of", "right of"}


def test_parse_prompt_inverts_caption_for(samples):
    for sample in samples:
        parsed = parse_prompt(sample.caption)
        assert parsed["relation"] == sample.relation and parsed["kind"] == sample.kind
        objects = [p for p in parsed["objects"] for _ in range(p["count"])]
        assert [(p["color"], p["shape"]) for p in objects] == [(o.color, o.shape) for o in sample.objects]
        if sample.kind != "count":  # a count's caption names no size
            assert [p["size"] or "medium" for p in objects] == [o.size for o in sample.objects]
        rebuilt = [ShapeObject(p["color"], p["shape"], p["size"] or "medium", 0, 0, 1) for p in objects]
        assert caption_for(rebuilt, parsed["relation"]) == sample.caption


def test_parse_prompt_reads_loose_spelling_and_rejects_other_captions():
    assert parse_prompt("  A Small RED  circle. ") == {
        "kind": "single",
        "objects": [{"color": "red", "shape": "circle", "size": "small", "count": 1}],
        "relation": None,
    }
    assert parse_prompt("an orange cross to the right of a large cyan diamond")["relation"] == "right of"
    assert parse_prompt("Three red crosses")["objects"] == [
        {"color": "red", "shape": "cross", "size": None, "count": 3}
    ]
    assert parse_prompt("a red circle and a small blue square")["kind"] == "two"
    for caption in (
        "a pink circle",
        "a red hexagon",
        "five red circles",
        "two red circle",
        "a red circle near a blue square",
        "",
    ):
        with pytest.raises(ValueError, match="cannot parse"):
            parse_prompt(caption)


def test_judge_chooses_among_the_given_vocabulary():
    """A small cross blurred as a dVAE blurs it reads as a diamond among every shape, and as a cross
    among a run's shapes when diamonds are not one of them."""
    image = render([ShapeObject("green", "cross", "small", 16, 16, 6)], 32).filter(
        ImageFilter.GaussianBlur(1.5)
    )
    assert judge(image, "a green cross")["parts"]["shape"] is False
    run_shapes = ["circle", "square", "triangle", "cross"]
    assert judge(image, "a green cross", shapes=run_shapes) == {
        "kind": "single",
        "tasks": {"single_object": True, "colors": True},
        "parts": {"shape": True, "color": True},
    }
    assert judge(image, "a green square", shapes=run_shapes)["parts"]["shape"] is False
    assert judge(image, "a green cross", colors=["red", "blue"], shapes=run_shapes)["parts"]["color"] is False


def test_judge_single_object_right_and_wrong():
    image = render([ShapeObject("red", "triangle", "medium", 32, 30, 14)], 64)
    assert judge(image, "a red triangle")["tasks"] == {"single_object": True, "colors": True}
    assert judge(image, "a small blue triangle")["tasks"] == {"single_object": True, "colors": False}
    assert judge(image, "a red square")["tasks"] == {"single_object": False, "colors": False}
    blank = Image.new("RGB", (64, 64), BACKGROUND)
    assert judge(blank, "a red triangle")["tasks"] == {"single_object": False, "colors": False}


def test_judge_two_objects_checks_each_object_and_the_relation():
    top = ShapeObject("purple", "cross", "medium", 30, 14, 11)
    bottom = ShapeObject("cyan", "square", "small", 34, 46, 9)
    image = render([top, bottom], 64)
    assert judge(image, caption_for([top, bottom], "above"))["tasks"] == {"position": True}
    assert judge(image, caption_for([bottom, top], "below"))["tasks"] == {"position": True}
    assert judge(image, caption_for([top, bottom], "below"))["tasks"] == {"position": False}
    assert judge(image, caption_for([top, bottom], "left of"))["parts"] == {"shapes": True, "relation": False}
    assert judge(image, caption_for([top, bottom]))["tasks"] == {"two_object": True, "color_attr": True}
    # Colours swapped between the shapes: each colour and shape is there, but not together.
    swapped = [
        ShapeObject("cyan", "cross", "medium", 0, 0, 1),
        ShapeObject("purple", "square", "small", 0, 0, 1),
    ]
    assert judge(image, caption_for(swapped))["tasks"] == {"two_object": True, "color_attr": False}
    # Position is judged on shapes, as GenEval's is on classes: a wrong colour does not matter there.
    wrong_color = [ShapeObject("green", "cross", "medium", 0, 0, 1), bottom]
    assert judge(image, caption_for(wrong_color, "above"))["tasks"] == {"position": True}
    wrong_shape = [ShapeObject("purple", "circle", "medium", 0, 0, 1), bottom]
    assert judge(image, caption_for(wrong_shape, "above"))["parts"] == {"shapes": False, "relation": False}


def test_judge_counts_every_object():
    circles = [ShapeObject("red", "circle", "small", x, y, 5) for x, y in ((8, 8), (24, 8), (8, 24))]
    image = render(circles, 32)
    assert judge(image, "three red circles")["tasks"] == {"counting": True}
    assert judge(image, "two red circles")["parts"] == {"count": False, "kind": True}
    assert judge(image, "three blue circles")["parts"] == {"count": True, "kind": False}
    odd = render([*circles[:2], ShapeObject("red", "square", "small", 8, 24, 5)], 32)
    assert judge(odd, "three red circles")["parts"] == {"count": True, "kind": False}
    # One copy, asked as a count: exactly one object.
    one = {"kind": "count", "objects": [{"color": "red", "shape": "circle", "count": 1}], "relation": None}
    assert judge_scene(render(circles[:1], 32), one)["tasks"] == {"counting": True}
    assert judge_scene(image, one)["tasks"] == {"counting": False}
