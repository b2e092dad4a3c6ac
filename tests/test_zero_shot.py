"""The zero-shot evaluation: prompts per group, accuracies before and after reranking, eval.json's keys."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
from PIL import ImageFilter

from dalle.config import config_from_dict
from dalle.sample.evaluation import load_evaluator
from dalle.sample.page import Section
from dalle.sample.rerank import PromptSamples
from demo.detect import parse_prompt
from demo.evaluation import (
    HELDOUT,
    HELDOUT_PAIRS,
    SEEN,
    TITLES,
    eval_prompts,
    evaluate_group,
    evaluate_sections,
)
from demo.world import ShapeObject, WorldConfig, render

SOURCE = WorldConfig()
KEYS = {"color_acc", "shape_acc", "both_acc", "color_acc_reranked", "shape_acc_reranked", "both_acc_reranked",
        "num_prompts", "samples_per_prompt"}  # fmt: skip


def _image(color: str, shape: str, cx: float = 32, cy: float = 32) -> PIL.Image.Image:
    return render([ShapeObject(color, shape, "medium", cx, cy, 14)], 64)


def test_prompt_groups_follow_the_source():
    groups = eval_prompts(SOURCE)
    assert groups[HELDOUT] == ["a red square", "a blue triangle", "a green circle", "a yellow cross"]
    seen = {tuple(o.values())[:2] for p in groups[SEEN] for o in parse_prompt(p)["objects"]}
    assert len(groups[SEEN]) == 4 and not seen & {tuple(c.split()) for c in SOURCE.heldout}
    for prompt in groups[HELDOUT_PAIRS]:
        parsed = parse_prompt(prompt)
        assert len(parsed["objects"]) == 2 and parsed["relation"]


def test_the_gallery_evaluator_prompts_the_runs_world():
    """`gallery.evaluator: demo.evaluation` gives the groups of the world in plugins.demo."""
    world = {"heldout": ["orange cross", "purple circle"]}
    cfg = config_from_dict({"gallery": {"evaluator": "demo.evaluation"}, "plugins": {"demo": world}})
    evaluator = load_evaluator(cfg)
    groups = evaluator.prompt_groups()
    assert [(key, title) for key, title, _ in groups] == [
        (k, TITLES[k]) for k in (HELDOUT, SEEN, HELDOUT_PAIRS)
    ]
    assert {key: prompts for key, _, prompts in groups} == eval_prompts(WorldConfig(**world))
    assert groups[0][2] == ["an orange cross", "a purple circle"]
    assert load_evaluator(config_from_dict({})) is None


def test_accuracy_before_and_after_reranking():
    # 4 samples for "a red square": 2 right, 1 wrong colour, 1 wrong shape; CLIP ranks the right ones first.
    images = [
        _image("red", "square"),
        _image("blue", "square"),
        _image("red", "circle"),
        _image("red", "square"),
    ]
    samples = PromptSamples("a red square", images, np.array([0.9, 0.1, 0.2, 0.8]), [0, 3, 2, 1])
    figures = evaluate_group([samples], top=2, pairs=False)
    assert KEYS <= set(figures)
    assert figures["both_acc"] == 0.5 and figures["color_acc"] == 0.75 and figures["shape_acc"] == 0.75
    assert figures["both_acc_reranked"] == 1.0 and figures["color_acc_reranked"] == 1.0
    assert figures["num_prompts"] == 1 and figures["samples_per_prompt"] == 4


def test_pairs_report_the_relation():
    above = render(
        [
            ShapeObject("red", "square", "small", 32, 14, 9),
            ShapeObject("blue", "triangle", "small", 32, 48, 9),
        ],
        64,
    )
    below = render(
        [
            ShapeObject("red", "square", "small", 32, 48, 9),
            ShapeObject("blue", "triangle", "small", 32, 14, 9),
        ],
        64,
    )
    samples = PromptSamples(
        "a red square above a blue triangle", [above, below], np.array([0.5, 0.4]), [1, 0]
    )
    figures = evaluate_group([samples], top=1, pairs=True)
    assert figures["relation_acc"] == 0.5 and figures["relation_acc_reranked"] == 0.0
    assert figures["both_acc"] == 1.0


def test_sections_carry_their_group():
    png = io.BytesIO()
    _image("red", "square").save(png, format="PNG")
    section = Section(
        "t",
        [PromptSamples("a red square", [_image("red", "square")], np.array([1.0]), [0])],
        top=1,
        key=HELDOUT,
    )
    report = evaluate_sections([section, Section("captions", [], key="")], clip=None)
    assert set(report) == {HELDOUT, "reranked_by"} and report[HELDOUT]["both_acc"] == 1.0


def test_samples_are_judged_among_the_runs_colours_and_shapes():
    """The demo's world has no diamonds: a blurred small cross is a cross there."""
    cross = render([ShapeObject("green", "cross", "small", 16, 16, 6)], 32).filter(
        ImageFilter.GaussianBlur(1.5)
    )
    samples = PromptSamples("a green cross", [cross], np.array([0.5]), [0])
    assert evaluate_group([samples], top=1, pairs=False)["shape_acc"] == 0.0
    assert evaluate_group([samples], top=1, pairs=False, source=SOURCE)["shape_acc"] == 1.0
    section = Section("Held-out combinations", [samples], top=1, key=HELDOUT)
    assert evaluate_sections([section], clip=None, source=SOURCE)[HELDOUT]["both_acc"] == 1.0
