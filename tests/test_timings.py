"""reports/timings.json: the wall time of every stage, summed over its runs, whole after each run."""

from __future__ import annotations

import pytest

from dalle.storage import Storage
from dalle.timings import timed_stage, timings_text, write_summary


def test_each_run_of_a_stage_adds_its_time_and_the_summary_follows_the_pipeline_order(tmp_path):
    storage = Storage(str(tmp_path))
    with timed_stage(storage, "train_transformer"):
        pass
    with timed_stage(storage, "crawl"):
        sum(range(200_000))
    with timed_stage(storage, "train_transformer"):
        pass
    with timed_stage(storage, "my_own_stage"):
        pass

    summary = storage.read_json("reports/timings.json")
    assert list(summary["stages"]) == ["crawl", "train_transformer", "my_own_stage"]
    assert summary["stages"]["train_transformer"]["runs"] == 2
    assert summary["stages"]["crawl"]["seconds"] > 0
    runs = storage.read_json("reports/timings/train_transformer.json")["runs"]
    assert len(runs) == 2 and all(run["ok"] for run in runs)
    assert summary["stages"]["train_transformer"]["seconds"] == pytest.approx(
        sum(run["seconds"] for run in runs), abs=0.002
    )
    assert summary["total_s"] == pytest.approx(
        sum(s["seconds"] for s in summary["stages"].values()), abs=0.01
    )
    assert write_summary(storage) == summary  # rebuilt from the stages' files, nothing else

    text = timings_text(summary)
    assert text.splitlines()[0].startswith("wall time per stage (reports/timings.json)")
    assert "(2 runs)" in text.splitlines()[2] and text.splitlines()[2].split()[0] == "train_transformer"


def test_a_stage_that_fails_is_recorded_as_failed_and_its_error_is_the_one_raised(tmp_path):
    storage = Storage(str(tmp_path))
    with pytest.raises(ZeroDivisionError), timed_stage(storage, "filter"):
        1 / 0  # noqa: B018
    runs = storage.read_json("reports/timings/filter.json")["runs"]
    assert [run["ok"] for run in runs] == [False]


def test_a_stage_name_that_is_not_a_plain_word_is_refused_before_the_work(tmp_path):
    storage = Storage(str(tmp_path))
    ran = []
    with pytest.raises(ValueError, match="letters, digits and underscores"), timed_stage(storage, "../x"):
        ran.append(1)
    assert not ran and not (tmp_path / "reports").exists()


def test_a_timing_that_cannot_be_written_warns_and_never_fails_the_stage(tmp_path):
    (tmp_path / "reports").write_text("a file where the reports folder should be")
    warned = pytest.warns(UserWarning, match="wall time of stage crawl was not recorded")
    with warned, timed_stage(Storage(str(tmp_path)), "crawl"):
        done = True
    assert done
