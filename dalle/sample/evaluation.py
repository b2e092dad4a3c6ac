"""Evaluation plug-ins: prompt sections a gallery adds, scored by the plug-in after sampling.

`gallery.evaluator` names a Python module (e.g. `demo.evaluation`) with a function
`evaluator(cfg: RunConfig) -> Evaluator`. The library knows nothing else about it, so a world
with its own ground truth (the demo's shapes) plugs in without the library depending on it.

What `evaluate` returns is written to reports/eval.json and shown by the gallery page, the index
page and the command line. It is a scorecard, GenEval's shape: task scores per level of novelty,
before reranking (every sample) and after (the reranked top), and each level's overall score:

    {"tasks": ["single_object", ...],                      the column order
     "levels": {"seen": {"title": "...",
                         "tasks": {"counting": {"before": 0.41, "after": 0.62, ...}, ...},
                         "overall": {"before": 0.55, "after": 0.71}},
                ...},
     ...}                                                  anything else the plug-in reports
"""

from __future__ import annotations

from typing import Any, Protocol

from dalle.config import RunConfig, plugin_function


class Evaluator(Protocol):
    def prompt_groups(self) -> list[tuple[str, str, list[str]]]:
        """(key, title, prompts) of each section to sample; `key` names the section in the figures."""
        ...

    def evaluate(self, sections: list, clip: Any) -> dict:
        """The scorecard of the drawn sections (gallery Sections with PromptSamples), for reports/eval.json."""
        ...

    # Optional: def prompt_metadata(self) -> str, the prompts as JSON lines, one per prompt with what it
    # asks for, written to reports/eval_prompts.jsonl so that any model's images can be judged alike.


STAGES = ("before", "after")  # of a score: over every sample, over the reranked top


def scorecard_rows(evaluation: dict) -> tuple[list[str], list[tuple[str, list[dict | None]]]]:
    """(columns, [(level, cells)]) of a scorecard: the tasks then "overall"; a cell is {"before", "after"}
    or None where the level has no such task. Empty for a report in another form."""
    levels = evaluation.get("levels")
    if not isinstance(levels, dict):
        return [], []
    columns = [*evaluation.get("tasks", []), "overall"]
    rows = []
    for level, figures in levels.items():
        tasks = {**figures.get("tasks", {}), "overall": figures.get("overall")}
        rows.append((level, [tasks.get(column) for column in columns]))
    return columns, rows


def scorecard_figures(evaluation: dict, digits: int = 3) -> dict[str, dict[str, dict[str, float]]]:
    """{level: {task or "overall": {"before", "after"}}}, rounded: a scorecard's figures alone."""
    columns, rows = scorecard_rows(evaluation)
    return {
        level: {
            column: {stage: round(cell[stage], digits) for stage in STAGES}
            for column, cell in zip(columns, cells)
            if cell
        }
        for level, cells in rows
    }


def scorecard_text(evaluation: dict) -> str:
    """A scorecard as a plain-text table, "before/after" reranking in each cell."""
    columns, rows = scorecard_rows(evaluation)
    if not rows:
        return ""
    width = max(9, *(len(c) for c in columns))
    first = max(len(level) for level, _ in rows)
    lines = [f"  {'':{first}}  " + "  ".join(f"{c:>{width}}" for c in columns)]
    for level, cells in rows:
        shown = [f"{c['before']:.2f}/{c['after']:.2f}" if c else "-" for c in cells]
        lines.append(f"  {level:{first}}  " + "  ".join(f"{text:>{width}}" for text in shown))
    return "\n".join(lines)


def load_evaluator(cfg: RunConfig) -> Evaluator | None:
    """The evaluator `gallery.evaluator` names, or None when it is unset."""
    name = cfg.gallery.evaluator
    if not name:
        return None
    return plugin_function("gallery.evaluator", name, "evaluator", "evaluator(cfg) returning an Evaluator")(
        cfg
    )
