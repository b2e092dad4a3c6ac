"""The paper's central claim, measured: images for prompts whose composition no training image shows.

The gallery's evaluator plug-in for demo runs (`gallery.evaluator: demo.evaluation`): one gallery
section per level of the suite and kind of scene (demo/suite.py), every sample judged from its pixels by the
deterministic detector, scored GenEval's way before reranking (every sample) and after (the
CLIP-reranked top), so the reranker's gain is a number. The suite's prompts are written with every
run as JSON lines (`prompt_metadata`), to judge any model's images with the same suite.
"""

from __future__ import annotations

from dalle.config import RunConfig
from demo.suite import (
    KIND_TITLES,
    LEVEL_TITLES,
    LEVELS,
    SuitePrompt,
    judge_prompt,
    metadata_lines,
    scorecard,
    suite_prompts,
)
from demo.world import SCENE_KINDS, WorldConfig, world_config


class ShapesEvaluation:
    """The suite's sections of a demo run's gallery and their scorecard (dalle.sample.evaluation.Evaluator)."""

    def __init__(self, world: WorldConfig):
        self.world = world
        self.prompts = suite_prompts(world)

    def prompt_groups(self) -> list[tuple[str, str, list[str]]]:
        """A section per level and kind of scene, keyed "level/kind"."""
        groups = []
        for level in LEVELS:
            for kind in SCENE_KINDS:
                prompts = [p.prompt for p in self.prompts if (p.level, p.kind) == (level, kind)]
                if prompts:
                    groups.append((f"{level}/{kind}", f"{LEVEL_TITLES[level]}: {KIND_TITLES[kind]}", prompts))
        return groups

    def prompt_metadata(self) -> str:
        return metadata_lines(self.prompts)

    def evaluate(self, sections: list, clip) -> dict:
        """The scorecard of the gallery's sections that are levels of the suite."""
        by_key: dict[tuple[str, str], SuitePrompt] = {
            (f"{p.level}/{p.kind}", p.prompt): p for p in self.prompts
        }
        judged = []
        for section in sections:
            for samples in section.samples:
                prompt = by_key.get((section.key, samples.prompt))
                if prompt is not None:
                    judged.append(
                        judge_prompt(
                            prompt,
                            samples.images,
                            kept=samples.ranking[: section.top],
                            colors=self.world.colors,
                            shapes=self.world.shapes,
                        )
                    )
        if not judged:
            return {}
        report = scorecard(judged)
        report["samples_per_prompt"] = max(len(j.judgments) for j in judged)
        report["reranked_top"] = max(len(j.kept) for j in judged)
        report["reranked_by"] = getattr(clip, "identity", None) if clip is not None else None
        return report


def evaluator(cfg: RunConfig) -> ShapesEvaluation:
    """The plug-in's entry point: the evaluation of the world in cfg.plugins.demo."""
    return ShapesEvaluation(world_config(cfg))
