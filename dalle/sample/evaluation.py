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

A cell may also carry "spread": {"before": 0.04, "after": 0.06}, the standard errors of its figures
(how far they move with other prompts of the same kinds); the command line and the pages show the
after figure's as "±0.06".
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


def cell_text(cell: dict, joiner: str = "/") -> str:
    """A scorecard cell as "before/after", with the after figure's standard error over prompts ("±0.05")
    when the plug-in reports one (a cell's "spread": {"before", "after"})."""
    text = f"{cell['before']:.2f}{joiner}{cell['after']:.2f}"
    spread = cell.get("spread")
    return (
        f"{text} ±{spread['after']:.2f}"
        if isinstance(spread, dict) and spread.get("after") is not None
        else text
    )


def scorecard_text(evaluation: dict) -> str:
    """A scorecard as a plain-text table, "before/after" reranking in each cell (`cell_text`)."""
    columns, rows = scorecard_rows(evaluation)
    if not rows:
        return ""
    shown = [(level, [cell_text(c) if c else "-" for c in cells]) for level, cells in rows]
    widths = [max(9, len(c), *(len(texts[i]) for _, texts in shown)) for i, c in enumerate(columns)]
    first = max(len(level) for level, _ in rows)
    lines = [f"  {'':{first}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths))]
    for level, texts in shown:
        lines.append(f"  {level:{first}}  " + "  ".join(f"{t:>{w}}" for t, w in zip(texts, widths)))
    return "\n".join(lines)


def load_evaluator(cfg: RunConfig) -> Evaluator | None:
    """The evaluator `gallery.evaluator` names, or None when it is unset."""
    name = cfg.gallery.evaluator
    if not name:
        return None
    return plugin_function("gallery.evaluator", name, "evaluator", "evaluator(cfg) returning an Evaluator")(
        cfg
    )
