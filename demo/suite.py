"""The demo's composition suite, GenEval's way (Ghosh et al. 2023) in the captioned-shapes world.

Six task families, each judged per image by the detector (demo/detect.py `judge_scene`): single object,
two objects, counting, colours, position and colour attribution. A prompt-image pair is right only
when every requirement of the task holds; a task's score is the share of right images, and a
level's overall score the mean of its task scores. One prompt serves the tasks of its kind: "a red
circle" is judged for single_object and colors, "a red circle and a blue square" for two_object and
color_attr, "three red circles" for counting, "a red circle above a blue square" for position.

Prompts come at four levels of novelty (`LEVELS`), each reported on its own:

    seen               combinations, pairings and counts that training images show
    heldout_combos     (a) colour-shape combinations no training image shows (plugins.demo.heldout)
    heldout_pairings   (b) two seen objects never shown together, or never in that relation
    heldout_counts     (c) a seen object never shown that many times

`suite_prompts` lists them for a world; `metadata_lines` writes them one JSON object per line, like
GenEval's evaluation_metadata.jsonl, so that any model's images can be judged by the same suite
(`score_images`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from dalle.sample.evaluation import STAGES
from demo.detect import TASKS, TASKS_BY_KIND, ImageInput, judge_scene
from demo.world import (
    RELATIONS,
    ShapeObject,
    WorldConfig,
    allowed_combinations,
    caption_for,
    count_phrase,
)

LEVELS = ("seen", "heldout_combos", "heldout_pairings", "heldout_counts")
LEVEL_TITLES = {
    "seen": "Seen: combinations, pairings and counts shown in training",
    "heldout_combos": "Held out (a): colour-shape combinations never in a training image",
    "heldout_pairings": "Held out (b): seen objects never together (or never in that relation)",
    "heldout_counts": "Held out (c): seen objects never shown that many times",
}
KIND_TITLES = {
    "single": "one object (single object, colours)",
    "count": "copies of one object (counting)",
    "two": "two objects (two objects, colour attribution)",
    "relation": "two objects in a relation (position)",
}
SUITE_VERSION = 1  # of the metadata's fields and the tasks' rules


@dataclass(frozen=True)
class SuitePrompt:
    """One prompt of the suite: its level, the kind of scene it asks for, and what is asked."""

    prompt: str
    level: str
    kind: str  # a demo.world.SCENE_KINDS entry
    objects: tuple[tuple[str, str, int], ...]  # (colour, shape, count)
    relation: str | None = None

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS_BY_KIND[self.kind]

    def metadata(self) -> dict:
        """The prompt's line in the metadata file."""
        return {
            "prompt": self.prompt,
            "level": self.level,
            "kind": self.kind,
            "tasks": list(self.tasks),
            "objects": [{"color": c, "shape": s, "count": n} for c, s, n in self.objects],
            "relation": self.relation,
        }

    @classmethod
    def from_metadata(cls, row: dict) -> SuitePrompt:
        objects = tuple((o["color"], o["shape"], int(o["count"])) for o in row["objects"])
        return cls(row["prompt"], row["level"], row["kind"], objects, row.get("relation"))


def _phrase(*combos: tuple[str, str], relation: str | None = None) -> str:
    return caption_for([ShapeObject(c, s, "medium", 0.0, 0.0, 0.0) for c, s in combos], relation)


def _spread(items: Sequence, n: int) -> list:
    """`n` items spread evenly over the list (all of them when it has no more)."""
    if len(items) <= n:
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def _distinct_pairs(combos: Sequence[tuple[str, str]]) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Ordered pairs of combinations differing in colour and in shape (the suite's two-object prompts)."""
    return [(a, b) for a, b in itertools.permutations(combos, 2) if a[0] != b[0] and a[1] != b[1]]


def _single(level: str, combo: tuple[str, str]) -> SuitePrompt:
    return SuitePrompt(_phrase(combo), level, "single", ((*combo, 1),))


def _count(level: str, combo: tuple[str, str], count: int) -> SuitePrompt:
    return SuitePrompt(count_phrase(count, *combo), level, "count", ((*combo, count),))


def _two(level: str, a: tuple[str, str], b: tuple[str, str]) -> SuitePrompt:
    return SuitePrompt(_phrase(a, b), level, "two", ((*a, 1), (*b, 1)))


def _relation(level: str, a: tuple[str, str], b: tuple[str, str], relation: str) -> SuitePrompt:
    return SuitePrompt(_phrase(a, b, relation=relation), level, "relation", ((*a, 1), (*b, 1)), relation)


def suite_prompts(world: WorldConfig) -> list[SuitePrompt]:
    """Every prompt of the suite for this world, level by level; deterministic for the configuration.

    At most `world.suite_prompts_per_kind` prompts per level and kind of scene, spread over the
    candidates; counting prompts cycle through `world.suite_counts`."""
    n = world.suite_prompts_per_kind
    counts = world.suite_counts
    relations = list(RELATIONS)
    seen = allowed_combinations(world)
    pairings = world.pairings()
    held_counts = world.counts_held_out()
    heldout = [(c, s) for c, s in (combo.split() for combo in world.heldout)]
    prompts: list[SuitePrompt] = []

    # Seen: what training images show.
    prompts += [_single("seen", combo) for combo in _spread(seen, n)]
    seen_counts = [
        (combo, counts[i % len(counts)])
        for i, combo in enumerate(seen)
        if (counts[i % len(counts)], *combo) not in held_counts
    ]
    prompts += [_count("seen", combo, count) for combo, count in _spread(seen_counts, n)]
    free = [(a, b) for a, b in _distinct_pairs(seen) if not any(p.forbids(a, b, None) for p in pairings)]
    prompts += [_two("seen", a, b) for a, b in _spread(free, n)]
    placed = [
        (a, b, relations[i % len(relations)])
        for i, (a, b) in enumerate(_spread(free[1:] + free[:1], n))
        if not any(p.forbids(a, b, relations[i % len(relations)]) for p in pairings)
    ]
    prompts += [_relation("seen", a, b, relation) for a, b, relation in placed]

    # (a) Held-out combinations, alone, counted, and two of them together.
    if heldout:
        prompts += [_single("heldout_combos", combo) for combo in _spread(heldout, n)]
        prompts += [
            _count("heldout_combos", combo, counts[i % len(counts)])
            for i, combo in enumerate(_spread(heldout, n))
        ]
        chain = [(heldout[i], heldout[(i + 1) % len(heldout)]) for i in range(len(heldout))]
        chain = [(a, b) for a, b in chain if a != b]
        prompts += [_two("heldout_combos", a, b) for a, b in _spread(chain, n)]
        prompts += [
            _relation("heldout_combos", a, b, relations[i % len(relations)])
            for i, (a, b) in enumerate(_spread(chain, n))
        ]

    # (b) Held-out pairings of seen objects: together, and in the relation held out (or each in turn).
    picked = _spread(pairings, n)
    prompts += [_two("heldout_pairings", p.first, p.second) for p in picked]
    prompts += [
        _relation("heldout_pairings", p.first, p.second, p.relation or relations[i % len(relations)])
        for i, p in enumerate(picked)
    ]

    # (c) Held-out counts of seen objects.
    prompts += [_count("heldout_counts", (c, s), count) for count, c, s in _spread(sorted(held_counts), n)]
    return prompts


def metadata_lines(prompts: Iterable[SuitePrompt]) -> str:
    """The suite as JSON lines, one prompt each (like GenEval's evaluation_metadata.jsonl)."""
    return "".join(json.dumps(p.metadata()) + "\n" for p in prompts)


def read_metadata(text: str) -> list[SuitePrompt]:
    """The prompts of a metadata file's text (as `metadata_lines` writes it)."""
    return [SuitePrompt.from_metadata(json.loads(line)) for line in text.splitlines() if line.strip()]


@dataclass
class JudgedPrompt:
    """One prompt's judgments, one per image, and which images the reranker kept (indices, best first)."""

    prompt: SuitePrompt
    judgments: list[dict]
    kept: list[int]


def judge_prompt(
    prompt: SuitePrompt,
    images: Sequence[ImageInput],
    kept: Sequence[int] | None = None,
    colors: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
) -> JudgedPrompt:
    """Judge every image of one prompt; `kept` (default: all) are the reranked top's indices."""
    wanted = {
        "kind": prompt.kind,
        "objects": [{"color": c, "shape": s, "count": n} for c, s, n in prompt.objects],
        "relation": prompt.relation,
    }
    judgments = [judge_scene(image, wanted, colors=colors, shapes=shapes) for image in images]
    return JudgedPrompt(prompt, judgments, list(range(len(images))) if kept is None else list(kept))


def _share(judgments: list[dict], task: str, part: str | None = None) -> float | None:
    values = [j["parts"][part] if part else j["tasks"][task] for j in judgments if task in j["tasks"]]
    return sum(values) / len(values) if values else None


SPREAD_RESAMPLES = 1000


def _standard_errors(
    rows: Sequence[JudgedPrompt], tasks: Sequence[str]
) -> dict[str, dict[str, float] | None]:
    """{task or "overall": {"before", "after"}}: how far each figure of a level moves when other prompts
    of the same kinds are asked. The level's prompts are resampled with replacement within their kind
    of scene (so that every task keeps its prompts) `SPREAD_RESAMPLES` times with a fixed seed, and the
    figures recomputed; a spread is their standard deviation (a bootstrap standard error). None where a
    task has fewer than 2 prompts, whose figure cannot show how it varies."""
    rng = np.random.default_rng(0)
    # right[stage][task] and counted[stage][task]: (resamples,) totals of right and judged images
    right = {stage: {task: np.zeros(SPREAD_RESAMPLES) for task in tasks} for stage in STAGES}
    counted = {stage: {task: np.zeros(SPREAD_RESAMPLES) for task in tasks} for stage in STAGES}
    prompts = {task: 0 for task in tasks}
    for kind in sorted({j.prompt.kind for j in rows}):
        group = [j for j in rows if j.prompt.kind == kind]
        drawn = rng.integers(0, len(group), size=(SPREAD_RESAMPLES, len(group)))
        staged = {
            "before": [j.judgments for j in group],
            "after": [[j.judgments[i] for i in j.kept] for j in group],
        }
        for task in tasks:
            for stage, judged in staged.items():
                hits = np.array([sum(x["tasks"][task] for x in js if task in x["tasks"]) for js in judged])
                seen = np.array([sum(task in x["tasks"] for x in js) for js in judged])
                right[stage][task] += hits[drawn].sum(axis=1)
                counted[stage][task] += seen[drawn].sum(axis=1)
            prompts[task] += sum(any(task in x["tasks"] for x in j.judgments) for j in group)
    shares = {
        stage: {
            task: np.divide(
                right[stage][task],
                counted[stage][task],
                out=np.full(SPREAD_RESAMPLES, np.nan),
                where=counted[stage][task] > 0,
            )
            for task in tasks
        }
        for stage in STAGES
    }

    def spread_of(per_stage: dict[str, np.ndarray], enough: bool) -> dict[str, float] | None:
        if not enough:
            return None
        return {stage: float(np.nanstd(values, ddof=1)) for stage, values in per_stage.items()}

    spreads: dict[str, dict[str, float] | None] = {
        task: spread_of({stage: shares[stage][task] for stage in STAGES}, prompts[task] >= 2)
        for task in tasks
    }
    overall = {stage: np.mean([shares[stage][task] for task in tasks], axis=0) for stage in STAGES}
    spreads["overall"] = spread_of(overall, all(prompts[task] >= 2 for task in tasks))
    return spreads


def scorecard(judged: Sequence[JudgedPrompt]) -> dict:
    """Task scores and the overall per level, before and after reranking, in the library's scorecard
    form (dalle.sample.evaluation): {"tasks": [...], "levels": {level: {"title", "tasks": {task: {"before",
    "after", "oracle_after", "prompts", "images", "kept", "parts": {requirement: {"before", "after"}},
    "spread": {"before", "after"}}}, "overall": {"before", "after", "spread"}}}}. A level's overall is the
    mean of the task scores it has (GenEval's); "oracle_after" is what a perfect reranker would reach with
    the same samples (the sampler's ceiling); "spread" is each figure's standard error over prompts
    (`_standard_errors`), or None with fewer than 2 prompts."""
    levels: dict = {}
    for level in LEVELS:
        rows = [j for j in judged if j.prompt.level == level]
        tasks: dict = {}
        for task in TASKS:
            with_task = [j for j in rows if task in j.prompt.tasks]
            if not with_task:
                continue
            before = [judgment for j in with_task for judgment in j.judgments]
            after = [j.judgments[i] for j in with_task for i in j.kept]
            parts = sorted({part for judgment in before for part in judgment["parts"]})
            # What a perfect reranker would keep from these samples: the sampler's ceiling for "after".
            oracle = [
                min(sum(judgment["tasks"][task] for judgment in j.judgments), len(j.kept)) / len(j.kept)
                for j in with_task
                if j.kept
            ]
            tasks[task] = {
                "before": _share(before, task),
                "after": _share(after, task),
                "oracle_after": sum(oracle) / len(oracle) if oracle else None,
                "prompts": len(with_task),
                "images": len(before),
                "kept": len(after),
                "parts": {
                    p: {"before": _share(before, task, p), "after": _share(after, task, p)} for p in parts
                },
            }
        if tasks:
            spread = _standard_errors(rows, list(tasks))
            for task, cell in tasks.items():
                cell["spread"] = spread[task]
            levels[level] = {
                "title": LEVEL_TITLES[level],
                "tasks": tasks,
                "overall": {
                    **{stage: sum(t[stage] for t in tasks.values()) / len(tasks) for stage in STAGES},
                    "spread": spread["overall"],
                },
            }
    return {
        "suite": f"captioned shapes, GenEval's tasks (version {SUITE_VERSION})",
        "tasks": list(TASKS),
        "levels": levels,
    }


def score_images(
    prompts: Sequence[SuitePrompt],
    images: dict[str, Sequence[ImageInput]],
    colors: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
) -> dict:
    """The scorecard of any model's images: `images` maps each prompt's text to its images (every image
    counts before and after; there is no reranking). Prompts without images are left out."""
    judged = [
        judge_prompt(p, images[p.prompt], colors=colors, shapes=shapes)
        for p in prompts
        if images.get(p.prompt)
    ]
    return scorecard(judged)
