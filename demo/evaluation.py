"""The paper's central claim, measured: images for captions never seen in training.

The gallery's evaluator plug-in for demo runs (`gallery.evaluator: demo.evaluation`): prompts in three groups: held-out single objects ("a red square" never appeared),
seen single objects, and two held-out objects in a relation. Each sample is judged from its
pixels by the deterministic detector; accuracies are reported over all samples (before
reranking) and over the CLIP-reranked top (after), so the reranker's gain is a number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dalle.config import RunConfig
from demo.detect import judge
from demo.world import RELATIONS, ShapeObject, WorldConfig, allowed_combinations, caption_for, world_config

HELDOUT, SEEN, HELDOUT_PAIRS = "heldout", "seen", "heldout_pairs"
TITLES = {
    HELDOUT: "Held-out combinations (never in a training image)",
    SEEN: "Seen combinations",
    HELDOUT_PAIRS: "Two held-out objects in a relation",
}


def _caption(objects: Sequence[tuple[str, str]], relation: str | None = None) -> str:
    return caption_for(
        [ShapeObject(color, shape, "medium", 0.0, 0.0, 0.0) for color, shape in objects], relation
    )


def eval_prompts(source: WorldConfig, seen: int = 4) -> dict[str, list[str]]:
    """The prompts of each group, deterministic for the source configuration."""
    heldout = [tuple(combo.split()) for combo in source.heldout]
    allowed = allowed_combinations(source)
    stride = max(1, len(allowed) // max(seen, 1))
    seen_combos = allowed[::stride][:seen]
    relations = list(RELATIONS)
    pairs = [
        _caption([heldout[i], heldout[(i + 1) % len(heldout)]], relations[i % len(relations)])
        for i in range(len(heldout))
        if len(heldout) > 1
    ]
    return {
        HELDOUT: [_caption([c]) for c in heldout],
        SEEN: [_caption([c]) for c in seen_combos],
        HELDOUT_PAIRS: pairs,
    }


def _rates(judgments: list[dict], key: str) -> float:
    values = [bool(j[key]) for j in judgments if j.get(key) is not None]
    return float(np.mean(values)) if values else 0.0


def evaluate_group(samples: list, top: int, pairs: bool, source: WorldConfig | None = None) -> dict:
    """Accuracy figures of one group of PromptSamples (judged before and after keeping the CLIP top).

    With `source`, the detector names only that source's colours and shapes."""
    vocabulary = {"colors": source.colors, "shapes": source.shapes} if source is not None else {}
    before: list[dict] = []
    after: list[dict] = []
    per_sample = 0
    for prompt_samples in samples:
        judged = [judge(image, prompt_samples.prompt, **vocabulary) for image in prompt_samples.images]
        before += judged
        after += [judged[i] for i in prompt_samples.ranking[:top]]
        per_sample = len(prompt_samples.images)
    keys = ["color", "shape", "both"] + (["relation"] if pairs else [])
    figures: dict = {}
    for key in keys:
        figures[f"{key}_acc"] = _rates(before, key)
        figures[f"{key}_acc_reranked"] = _rates(after, key)
    figures["num_prompts"] = len(samples)
    figures["samples_per_prompt"] = per_sample
    figures["reranked_top"] = top
    return figures


def evaluate_sections(sections: list, clip, source: WorldConfig | None = None) -> dict:
    """The eval.json figures from the gallery's sections whose `key` names an eval group."""
    report = {}
    for section in sections:
        key = section.key
        if key in (HELDOUT, SEEN, HELDOUT_PAIRS) and section.samples:
            report[key] = evaluate_group(
                section.samples, section.top, pairs=key == HELDOUT_PAIRS, source=source
            )
    if report:
        report["reranked_by"] = getattr(clip, "identity", None) if clip is not None else None
    return report


class ShapesEvaluation:
    """The zero-shot sections of a demo run's gallery and their figures (dalle.sample.evaluation.Evaluator)."""

    def __init__(self, world: WorldConfig):
        self.world = world

    def prompt_groups(self) -> list[tuple[str, str, list[str]]]:
        return [(key, TITLES[key], prompts) for key, prompts in eval_prompts(self.world).items()]

    def evaluate(self, sections: list, clip) -> dict:
        return evaluate_sections(sections, clip, self.world)


def evaluator(cfg: RunConfig) -> ShapesEvaluation:
    """The plug-in's entry point: the evaluation of the world in cfg.plugins.demo."""
    return ShapesEvaluation(world_config(cfg))
