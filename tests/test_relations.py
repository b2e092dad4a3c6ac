"""Reading a prompt's spatial relation or its two objects with their attributes, painting over a side
of an image, and the arithmetic of the relation and binding margins (the margins with a trained CLIP
are tested in test_clip.py)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from dalle.sample.relations import (
    Pairing,
    SpatialRelation,
    binding_margins,
    isolate,
    parse_pairing,
    parse_relation,
    relation_margins,
)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a red circle above a blue square", ("a red circle", "a blue square", "vertical")),
        ("a red circle below a blue square", ("a blue square", "a red circle", "vertical")),
        ("a cat to the left of a dog", ("a cat", "a dog", "horizontal")),
        ("A cat  To The Right Of a dog.", ("a dog", "A cat", "horizontal")),
        ("a lamp on top of a table", ("a lamp", "a table", "vertical")),
        ("a ball under a chair", ("a chair", "a ball", "vertical")),
        ("a ball underneath a chair", ("a chair", "a ball", "vertical")),
        ("a cup left of a plate", ("a cup", "a plate", "horizontal")),
    ],
)
def test_a_spatial_relation_is_read_in_image_order(prompt, expected):
    assert parse_relation(prompt) == SpatialRelation(*expected)


@pytest.mark.parametrize(
    "prompt",
    [
        "a red circle",
        "a red circle and a blue square",
        "three yellow crosses",
        "above a blue square",  # no subject
        "a red circle above",  # no object
        "a cat above a dog to the left of a bird",  # two relations: which objects go where is unclear
        "a thunderstorm",  # "under" inside a word is not a relation
        "a leftover sandwich",
    ],
)
def test_prompts_without_one_relation_are_left_to_clip(prompt):
    assert parse_relation(prompt) is None


def _scene(left: tuple[int, int, int], right: tuple[int, int, int], size: int = 32) -> PIL.Image.Image:
    pixels = np.full((size, size, 3), 240, dtype=np.uint8)
    pixels[12:20, 3:11] = left
    pixels[12:20, 21:29] = right
    return PIL.Image.fromarray(pixels, "RGB")


def test_isolate_paints_the_rest_in_the_background_colour_and_leaves_the_input_alone():
    image = _scene((200, 0, 0), (0, 0, 200))
    before = np.asarray(image).copy()
    left = np.asarray(isolate(image, "horizontal", 0.0, 0.5))
    assert (left[:, 16:] == 240).all() and (left[12:20, 3:11] == (200, 0, 0)).all()
    right = np.asarray(isolate(image, "horizontal", 0.5, 1.0))
    assert (right[:, :16] == 240).all() and (right[12:20, 21:29] == (0, 0, 200)).all()
    top = np.asarray(isolate(image, "vertical", 0.0, 0.5))
    assert (top[16:] == 240).all() and (top[12:16] == before[12:16]).all()
    np.testing.assert_array_equal(np.asarray(image), before)
    with pytest.raises(ValueError, match="axis"):
        isolate(image, "diagonal", 0.0, 0.5)


class _Redness:
    """An encoder of two dimensions, for the margin's arithmetic alone: how red and how blue an image is;
    the phrases "red" and "blue" are the two axes."""

    def encode_images(self, images):
        rows = []
        for image in images:
            pixels = np.asarray(image, dtype=np.float32)
            rows.append(
                [
                    (pixels[..., 0] - pixels[..., 2] > 100).mean(),
                    (pixels[..., 2] - pixels[..., 0] > 100).mean(),
                ]
            )
        return np.asarray(rows, dtype=np.float32)

    def encode_texts(self, texts):
        return np.asarray([[1.0, 0.0] if "red" in t else [0.0, 1.0] for t in texts], dtype=np.float32)


def test_the_margin_is_positive_for_the_stated_layout_and_negative_for_its_swap():
    red_left, red_right = _scene((200, 0, 0), (0, 0, 200)), _scene((0, 0, 200), (200, 0, 0))
    relation = parse_relation("red to the left of blue")
    margins = relation_margins(_Redness(), [red_left, red_right], relation)
    assert margins[0] > 0 > margins[1]
    np.testing.assert_allclose(margins[0], -margins[1], atol=1e-6)
    assert relation_margins(_Redness(), [], relation).shape == (0,)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (
            "a red circle and a blue square",
            ("a red circle", "a blue square", "a blue circle", "a red square"),
        ),
        ("Red circle  and blue square.", ("Red circle", "blue square", "blue circle", "Red square")),
        ("a big red dog and a small cat", ("a big red dog", "a small cat", "a small dog", "a big red cat")),
        (
            "the wooden chair AND a glass table",
            ("the wooden chair", "a glass table", "the glass chair", "a wooden table"),
        ),
    ],
)
def test_two_objects_are_read_with_their_attributes_swapped(prompt, expected):
    assert parse_pairing(prompt) == Pairing(*expected)


@pytest.mark.parametrize(
    "prompt",
    [
        "a red circle",
        "a red circle above a blue square",  # a relation: the relation margin's
        "a circle and a square",  # no attributes to bind
        "a red circle and a red square",  # the same attributes: swapping changes nothing
        "a red circle and a blue square and a green cross",  # three objects
        "a black and white cat",  # "and" inside one object's attributes
        "three yellow crosses",
        "a sandy beach",  # "and" inside a word
    ],
)
def test_prompts_without_two_attributed_objects_are_left_to_clip(prompt):
    assert parse_pairing(prompt) is None


def _two_objects(first: tuple, second: tuple, axis: str = "horizontal", size: int = 32) -> PIL.Image.Image:
    """A (colour, side) object before the middle and one after it along `axis`, on a light ground."""
    pixels = np.full((size, size, 3), 240, dtype=np.uint8)
    for (colour, side), start in ((first, 4), (second, 20)):
        rows, cols = slice(12, 12 + side), slice(start, start + side)
        pixels[(cols, rows) if axis == "vertical" else (rows, cols)] = colour
    return PIL.Image.fromarray(pixels, "RGB")


RED, BLUE, SMALL, BIG = (200, 0, 0), (0, 0, 200), 3, 8


class _ColourAndSize:
    """An encoder of four dimensions for the binding margin's arithmetic: whether an image holds a small
    red, a big red, a small blue or a big blue object ("red circle" is small and red, "red square" big)."""

    def encode_images(self, images):
        rows = []
        for image in images:
            pixels = np.asarray(image, dtype=np.int32)
            red = int((pixels[..., 0] - pixels[..., 2] > 100).sum())
            blue = int((pixels[..., 2] - pixels[..., 0] > 100).sum())
            rows.append([0 < red <= 16, red > 16, 0 < blue <= 16, blue > 16])
        return np.asarray(rows, dtype=np.float32)

    def encode_texts(self, texts):
        axes = ["red circle", "red square", "blue circle", "blue square"]
        return np.asarray([[float(a in t) for a in axes] for t in texts], dtype=np.float32)


@pytest.mark.parametrize("axis", ["horizontal", "vertical"])
def test_the_binding_margin_is_positive_for_the_stated_attributes_in_either_order_and_negative_swapped(axis):
    pairing = parse_pairing("a red circle and a blue square")
    right = _two_objects((RED, SMALL), (BLUE, BIG), axis)
    right_other_order = _two_objects((BLUE, BIG), (RED, SMALL), axis)
    swapped = _two_objects((BLUE, SMALL), (RED, BIG), axis)
    margins = binding_margins(_ColourAndSize(), [right, right_other_order, swapped], pairing)
    assert margins[0] > 0 and margins[1] > 0 > margins[2]
    np.testing.assert_allclose(margins[0], -margins[2], atol=1e-6)
    assert binding_margins(_ColourAndSize(), [], pairing).shape == (0,)
