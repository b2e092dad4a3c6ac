"""The composition suite (demo/suite.py): prompts per level of novelty, what no training image shows,
the metadata file, GenEval-style scores before and after reranking, and the gallery's evaluator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dalle.config import ConfigError, config_from_dict
from dalle.sample.evaluation import load_evaluator, scorecard_rows, scorecard_text
from dalle.sample.page import Section
from dalle.sample.rerank import PromptSamples
from demo.detect import TASKS, parse_prompt
from demo.suite import (
    LEVELS,
    SuitePrompt,
    judge_prompt,
    metadata_lines,
    read_metadata,
    score_images,
    scorecard,
    suite_prompts,
)
from demo.world import (
    INVERSE_RELATIONS,
    WorldConfig,
    compose,
    generate_samples,
    render,
    seeded_rng,
    world_config,
)

WORLD = WorldConfig()


def draw(prompt: SuitePrompt, seed: int, side: int = 32, swap_colors: bool = False, count_off: int = 0):
    """A clean image of what `prompt` asks for (or of a deliberate mistake)."""
    combos = [(c, s) for c, s, _ in prompt.objects]
    if swap_colors:
        combos = [(combos[1][0], combos[0][1]), (combos[0][0], combos[1][1])]
    count = prompt.objects[0][2] + count_off
    kind = "count" if prompt.kind == "single" and count > 1 else prompt.kind
    objects = compose(seeded_rng(seed, 9), kind, combos, side, relation=prompt.relation, count=count)
    return render(objects, side)


def composition(sample) -> tuple:
    """What a training scene shows, in the suite's terms."""
    combos = tuple((o.color, o.shape) for o in sample.objects)
    if sample.kind in ("single", "count"):
        return ("count", len(combos), combos[0])
    return (sample.kind, combos, sample.relation)


def test_every_level_and_kind_is_prompted_and_parses():
    prompts = suite_prompts(WORLD)
    assert [p.level for p in prompts] == sorted((p.level for p in prompts), key=LEVELS.index)
    kinds = {level: {p.kind for p in prompts if p.level == level} for level in LEVELS}
    assert kinds == {
        "seen": {"single", "count", "two", "relation"},
        "heldout_combos": {"single", "count", "two", "relation"},
        "heldout_pairings": {"two", "relation"},
        "heldout_counts": {"count"},
    }
    for prompt in prompts:
        parsed = parse_prompt(prompt.prompt)
        one = prompt.kind in ("single", "count") and prompt.objects[0][2] == 1  # "a red circle"
        assert parsed["kind"] == ("single" if one else prompt.kind)
        assert [(o["color"], o["shape"], o["count"]) for o in parsed["objects"]] == list(prompt.objects)
        assert parsed["relation"] == prompt.relation
    counted = [p.objects[0][2] for p in prompts if p.kind == "count" and p.level != "heldout_counts"]
    assert set(counted) == {1, 2, 3}  # suite_counts in turn
    assert len({(p.level, p.kind, p.prompt) for p in prompts}) == len(prompts)


@pytest.mark.parametrize(
    "world",
    [
        WORLD,
        WorldConfig(
            seed=3,
            heldout=["orange circle"],
            heldout_pairings=["red circle above blue square", "green cross + purple triangle"],
            heldout_counts=["2 yellow square", "4 red cross"],
            count_fraction=0.3,
            two_fraction=0.2,
        ),
    ],
    ids=["default", "relation-held-out"],
)
def test_no_training_image_shows_a_heldout_prompt(world):
    world = world.model_copy(update={"num_images": 2000, "image_size": 32})
    samples = generate_samples(world)
    shown = {composition(sample) for sample in samples}
    heldout_combos = {tuple(c.split()) for c in world.heldout}
    for sample in samples:
        assert not heldout_combos & {(o.color, o.shape) for o in sample.objects}
    for prompt in suite_prompts(world):
        combos = tuple((c, s) for c, s, _ in prompt.objects)
        if prompt.level == "heldout_pairings":
            forbidden = {("two", combos, None), ("two", combos[::-1], None)}
            forbidden |= {("relation", combos, prompt.relation), ("relation", combos[::-1], INVERSE_RELATIONS[prompt.relation])} if prompt.relation else set()  # fmt: skip
            assert not forbidden & shown, prompt
            # Both objects are seen, alone and with others.
            assert {("count", 1, combo) for combo in combos} <= shown
        if prompt.level == "heldout_counts":
            assert ("count", prompt.objects[0][2], combos[0]) not in shown
            assert ("count", 1, combos[0]) in shown  # the object is seen
            assert any(c[0] == "count" and c[1] == prompt.objects[0][2] for c in shown)  # and the count
    pairing = world.pairings()[0]
    if pairing.relation is not None:
        # Held out in one relation only: the pair is seen in others, never in that one nor its inverse.
        a, b = pairing.first, pairing.second
        together = {c for c in shown if c[0] == "relation" and set(c[1]) == {a, b}}
        assert together and all(c[2] != pairing.relation for c in together if c[1] == (a, b))
        assert all(c[2] != INVERSE_RELATIONS[pairing.relation] for c in together if c[1] == (b, a))


def test_bad_heldout_entries_say_what_to_write():
    with pytest.raises(ValueError, match="heldout_pairings entry 'red circle near blue square'"):
        WorldConfig(heldout_pairings=["red circle near blue square"])
    with pytest.raises(ValueError, match="'red square' is held out as a combination already"):
        WorldConfig(heldout_pairings=["red square + blue circle"])
    with pytest.raises(ValueError, match="count from 2 to max_count"):
        WorldConfig(heldout_counts=["5 red circle"])
    with pytest.raises(ConfigError, match="plugins.demo"):
        world_config(config_from_dict({"plugins": {"demo": {"heldout_counts": ["three red circles"]}}}))
    # Defaults that name a combination held out give way; the world stays valid.
    assert WorldConfig(heldout=["purple circle"]).heldout_pairings == [
        p for p in WorldConfig().heldout_pairings if "purple circle" not in p
    ]
    with pytest.raises(ValueError, match="at most 1"):
        WorldConfig(pair_fraction=0.5, two_fraction=0.3, count_fraction=0.3)


def test_metadata_lines_round_trip():
    prompts = suite_prompts(WORLD)
    text = metadata_lines(prompts)
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == len(prompts)
    assert set(rows[0]) == {"prompt", "level", "kind", "tasks", "objects", "relation"}
    position = next(r for r in rows if r["kind"] == "relation")
    assert position["tasks"] == ["position"] and position["relation"] in INVERSE_RELATIONS
    assert read_metadata(text) == prompts


def test_ground_truth_scores_one_and_mistakes_score_zero():
    """Every prompt drawn as asked is right on all its tasks; swapped colours fail colour attribution
    only; one copy too many fails counting."""
    prompts = suite_prompts(WORLD)
    right = score_images(prompts, {p.prompt: [draw(p, seed) for seed in range(3)] for p in prompts})
    for level in LEVELS:
        for task, cell in right["levels"][level]["tasks"].items():
            assert cell["before"] == cell["after"] == 1.0, (level, task)
    two = [p for p in prompts if p.kind == "two"]
    swapped = score_images(two, {p.prompt: [draw(p, 0, swap_colors=True)] for p in two})
    for figures in swapped["levels"].values():
        assert figures["tasks"]["two_object"]["before"] == 1.0
        assert figures["tasks"]["color_attr"]["before"] == 0.0
    counts = [p for p in prompts if p.kind == "count"]
    extra = score_images(counts, {p.prompt: [draw(p, 1, count_off=1)] for p in counts})
    assert all(f["tasks"]["counting"]["before"] == 0.0 for f in extra["levels"].values())


def test_scores_before_and_after_reranking():
    prompt = next(p for p in suite_prompts(WORLD) if p.level == "heldout_pairings" and p.kind == "two")
    images = [draw(prompt, 0), draw(prompt, 1, swap_colors=True), render([], 32), draw(prompt, 2)]
    judged = judge_prompt(prompt, images, kept=[0, 3], colors=WORLD.colors, shapes=WORLD.shapes)
    card = scorecard([judged])
    tasks = card["levels"]["heldout_pairings"]["tasks"]
    assert tasks["two_object"]["before"] == 0.75 and tasks["two_object"]["after"] == 1.0
    assert tasks["color_attr"]["before"] == 0.5 and tasks["color_attr"]["after"] == 1.0
    assert tasks["color_attr"]["parts"]["colors"]["before"] == 0.5
    assert tasks["color_attr"]["oracle_after"] == 1.0  # two right samples for a top of two
    assert tasks["two_object"]["images"] == 4 and tasks["two_object"]["kept"] == 2
    overall = card["levels"]["heldout_pairings"]["overall"]
    assert overall == {"before": 0.625, "after": 1.0, "spread": None}  # the mean of the level's two tasks
    assert tasks["two_object"]["spread"] is None  # one prompt cannot show how a figure varies
    columns, rows = scorecard_rows(card)
    assert columns == [*TASKS, "overall"] and rows[0][0] == "heldout_pairings"
    text = scorecard_text(card)
    assert "heldout_pairings" in text and "0.75/1.00" in text and "0.62/1.00" in text


def test_every_figure_carries_its_standard_error_over_prompts():
    """Half the prompts drawn right and half with their colours swapped: colour attribution's share is
    0.5 with a bootstrap standard error near sqrt(0.5 * 0.5 / prompts); two objects, right everywhere,
    does not vary; the overall (their mean) varies half as much. The same judgments give the same
    spreads, and the command line shows the after figure's."""
    world = WorldConfig(suite_prompts_per_kind=8)
    two = [p for p in suite_prompts(world) if p.level == "seen" and p.kind == "two"]
    assert len(two) == 8
    judged = [
        judge_prompt(p, [draw(p, seed, swap_colors=n % 2 == 1) for seed in range(3)], kept=[0, 1])
        for n, p in enumerate(two)
    ]
    card = scorecard(judged)
    level = card["levels"]["seen"]
    attribution, both = level["tasks"]["color_attr"], level["tasks"]["two_object"]
    assert attribution["after"] == 0.5 and both["after"] == 1.0
    expected = (0.5 * 0.5 / len(two)) ** 0.5
    for stage in ("before", "after"):
        assert abs(attribution["spread"][stage] - expected) < 0.025, attribution["spread"]
        assert both["spread"][stage] == 0.0
        assert abs(level["overall"]["spread"][stage] - expected / 2) < 0.0125
    assert scorecard(judged) == card
    assert f"0.75/0.75 ±{level['overall']['spread']['after']:.2f}" in scorecard_text(card)


def test_the_gallery_evaluator_draws_a_section_per_level_and_kind():
    world = {"heldout": ["orange cross", "purple circle"], "suite_prompts_per_kind": 2}
    cfg = config_from_dict({"gallery": {"evaluator": "demo.evaluation"}, "plugins": {"demo": world}})
    evaluator = load_evaluator(cfg)
    groups = evaluator.prompt_groups()
    assert groups[0][0] == "seen/single" and groups[-1][0] == "heldout_counts/count"
    assert ["an orange cross", "a purple circle"] in [prompts for _, _, prompts in groups]
    assert read_metadata(evaluator.prompt_metadata()) == suite_prompts(WorldConfig(**world))
    by_text = {(f"{p.level}/{p.kind}", p.prompt): p for p in suite_prompts(WorldConfig(**world))}
    sections = []
    for key, title, prompts in groups:
        samples = []
        for text in prompts:
            images = [draw(by_text[(key, text)], seed) for seed in range(2)]
            samples.append(PromptSamples(text, images, np.array([0.2, 0.9]), [1, 0]))
        sections.append(Section(title, samples, top=1, key=key))
    sections.append(Section("Captions from the data", [], key=""))
    report = evaluator.evaluate(sections, clip=None)
    assert report["samples_per_prompt"] == 2 and report["reranked_top"] == 1
    assert all(
        cell["before"] == 1.0 for figures in report["levels"].values() for cell in figures["tasks"].values()
    )
    assert load_evaluator(config_from_dict({})) is None
