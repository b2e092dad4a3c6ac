"""Wall time of every stage of a run, in `{root}/reports/timings.json`.

Each stage run (a crawl, a training, one gallery...) adds one entry to its stage's own file,
`reports/timings/<stage>.json`, so two stages that run at once never write the same file; the
summary `reports/timings.json` is rebuilt from those files after each entry. A stage that is
resumed, or re-run to train further, adds a run: its `seconds` are the sum of its runs, the time
the stage has cost the run root so far. A re-run of a finished stage adds a run of nearly 0 s.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from dalle.runroot import TIMINGS_DIR, TIMINGS_REPORT
from dalle.storage import Storage

# The runs kept per stage (the oldest go first); the sums keep counting them.
MAX_RUNS_KEPT = 50

# The order stages are shown in: the pipeline's. Stages not named here come after, by name.
STAGE_ORDER = (
    "prepare_input",
    "crawl",
    "filter",
    "train_clip",
    "score",
    "dedup",
    "publish",
    "train_dvae",
    "tokenize",
    "train_transformer",
    "gallery",
)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _stage_file(stage: str) -> str:
    if not stage.replace("_", "").isalnum():
        raise ValueError(f"a stage name is letters, digits and underscores, not {stage!r}")
    return f"{TIMINGS_DIR}/{stage}.json"


def record_stage(storage: Storage, stage: str, seconds: float, started: str, ok: bool = True) -> None:
    """Add one run of `stage` to its file and rebuild reports/timings.json."""
    rel = _stage_file(stage)
    entry = storage.read_json(rel) if storage.exists(rel) else {"stage": stage, "runs": [], "seconds": 0.0}
    entry["runs"] = [
        *entry["runs"],
        {"started": started, "finished": _now(), "seconds": round(seconds, 3), "ok": ok},
    ][-MAX_RUNS_KEPT:]
    entry["seconds"] = round(entry["seconds"] + seconds, 3)
    entry["run_count"] = entry.get("run_count", len(entry["runs"]) - 1) + 1
    storage.write_json(rel, entry)
    write_summary(storage)


def _order(stage: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), stage)


def write_summary(storage: Storage) -> dict[str, Any]:
    """reports/timings.json from the stages' files: seconds per stage, their runs, and the total."""
    entries = [storage.read_json(rel) for rel in storage.list(TIMINGS_DIR, suffix=".json")]
    entries.sort(key=lambda entry: _order(entry["stage"]))
    summary = {
        "stages": {
            entry["stage"]: {
                "seconds": entry["seconds"],
                "runs": entry.get("run_count", len(entry["runs"])),
                "last_run_s": entry["runs"][-1]["seconds"] if entry["runs"] else None,
            }
            for entry in entries
        },
        "total_s": round(sum(entry["seconds"] for entry in entries), 3),
    }
    storage.write_json(TIMINGS_REPORT, summary)
    return summary


@contextmanager
def timed_stage(storage: Storage, stage: str) -> Iterator[None]:
    """Record the enclosed work's wall time as a run of `stage`, whether it ends well or not."""
    _stage_file(stage)  # a bad name fails before the work, not after it
    started, start = _now(), time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        try:
            record_stage(storage, stage, time.perf_counter() - start, started, ok)
        except Exception as err:  # noqa: BLE001 - a timing that cannot be written never fails the stage
            warnings.warn(f"the wall time of stage {stage} was not recorded: {err}", stacklevel=3)


def timings_text(summary: dict[str, Any]) -> str:
    """The stages' wall times as lines for people, slowest marked by its share of the total."""
    stages = summary.get("stages") or {}
    if not stages:
        return ""
    total = summary.get("total_s") or sum(s["seconds"] for s in stages.values())
    lines = [f"wall time per stage (reports/timings.json), {_clock(total)} in all:"]
    for name, figures in stages.items():
        share = figures["seconds"] / total if total else 0.0
        runs = f"  ({figures['runs']} runs)" if figures["runs"] > 1 else ""
        lines.append(f"  {name:18s} {_clock(figures['seconds']):>9s}  {share:4.0%}{runs}")
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{seconds:.1f} s"
