"""Reading a prompt's spatial relation, painting over a side of an image, and the relation margin's
arithmetic (the margin with a trained CLIP is tested in test_clip.py)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from dalle.sample.relations import SpatialRelation, isolate, parse_relation, relation_margins


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
