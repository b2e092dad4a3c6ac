"""Damaged checkpoints and the training metrics of several trainers on one run root.

A damaged latest checkpoint (truncated or changed files, latest.json naming a missing step) is skipped
with a warning for the newest intact one when a trainer resumes or the run's latest model is loaded; a
damaged checkpoint asked for by name is a clear error. Each trainer writes its own metrics files, so
two at once lose nothing, and a resumed run's steps appear once."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from test_train import make_run, metric_lines  # tests/ is on sys.path under pytest

from dalle.errors import UserError
from dalle.models.weights import CorruptCheckpoint, load_dvae, load_model, save_model
from dalle.runroot import (
    METRICS,
    checkpoint_dir,
    latest_checkpoint,
    latest_pointer,
    metrics_file,
    read_metrics,
)
from dalle.sample.sampler import Sampler
from dalle.storage import Storage
from dalle.train import loop
from dalle.train.dvae import DVAETraining
from dalle.train.launch import launch
from dalle.train.loop import MetricsLog, train


def _truncate(storage: Storage, rel: str) -> None:
    data = storage.read_bytes(rel)
    storage.write_bytes(rel, data[: len(data) // 2])


@pytest.fixture
def dvae_run(tmp_path):
    """A run root whose dVAE has checkpoints at steps 3 and 6 (and metrics for steps 1 to 6)."""
    root = str(tmp_path / "run")
    storage, cfg = make_run(root)
    launch("dvae", root, cfg, log=lambda m: None)
    assert latest_checkpoint(storage, "dvae").step == 6
    return root, storage, cfg


@pytest.mark.parametrize("damaged", ["model.safetensors", "train_state.pt", "config.yaml", "model.json"])
def test_a_damaged_latest_checkpoint_is_resumed_from_the_one_before_with_a_warning(dvae_run, damaged):
    root, storage, cfg = dvae_run
    _truncate(storage, f"{checkpoint_dir('dvae', 6)}/{damaged}")
    lines: list[str] = []
    uri = launch("dvae", root, cfg, max_steps=7, log=lines.append)
    assert uri == storage.uri(checkpoint_dir("dvae", 7))
    warning = next(line for line in lines if "damaged" in line)
    assert "step 6" in warning and "step_00000006" in warning and "not deleted" in warning
    assert any("resuming from step 3" in line for line in lines)
    assert storage.read_json(latest_pointer("dvae"))["step"] == 7
    # Steps 4 to 6 of the first run are superseded by the resumed run's: each step once.
    assert [m["step"] for m in metric_lines(storage, "dvae")] == list(range(1, 8))


def test_a_truncated_train_state_of_an_older_release_without_hashes_is_skipped_too(dvae_run):
    root, storage, cfg = dvae_run
    folder = checkpoint_dir("dvae", 6)
    meta = storage.read_json(f"{folder}/model.json")
    storage.write_json(f"{folder}/model.json", {k: v for k, v in meta.items() if k != "files_sha256"})
    _truncate(storage, f"{folder}/train_state.pt")
    lines: list[str] = []
    launch("dvae", root, cfg, max_steps=6, log=lines.append)
    assert any("train_state.pt cannot be read" in line for line in lines)
    assert any("resuming from step 3" in line for line in lines)


def test_latest_json_naming_a_missing_step_falls_back_to_the_newest_intact_one(dvae_run):
    root, storage, cfg = dvae_run
    shutil.rmtree(storage.path(checkpoint_dir("dvae", 6)))
    warnings: list[str] = []
    _, identity = load_dvae(storage, warn=warnings.append)  # the run's latest dVAE, as tokenize loads it
    assert identity["step"] == 3 and identity["uri"] == storage.uri(checkpoint_dir("dvae", 3))
    assert "step 6" in warnings[0] and "no model.json" in warnings[0]

    storage.write_bytes(latest_pointer("dvae"), b'{"step": ')  # a damaged latest.json: every folder is tried
    warnings.clear()
    assert load_dvae(storage, warn=warnings.append)[1]["step"] == 3
    assert "latest.json is damaged" in warnings[0]

    lines: list[str] = []
    launch("dvae", root, cfg, max_steps=5, log=lines.append)
    assert any("resuming from step 3" in line for line in lines)
    assert latest_checkpoint(storage, "dvae").step == 5


def test_with_no_intact_checkpoint_training_stops_with_a_clear_error(dvae_run):
    root, storage, cfg = dvae_run
    for step in (3, 6):
        _truncate(storage, f"{checkpoint_dir('dvae', step)}/model.safetensors")
    with pytest.raises(CorruptCheckpoint, match="no intact dvae checkpoint") as caught:
        launch("dvae", root, cfg, max_steps=8, log=lambda m: None)
    assert isinstance(caught.value, UserError) and "\n" not in str(caught.value)
    assert "step_00000003" in str(caught.value) and "step_00000006" in str(caught.value)
    assert latest_checkpoint(storage, "dvae").step == 6, "nothing is deleted or rewritten"


def test_a_damaged_checkpoint_asked_for_by_name_is_a_clear_error_without_fallback(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    storage.write_bytes("config.yaml", b"{}\n")
    state = {"weight": torch.arange(64, dtype=torch.float32)}
    for step in (1, 2):  # step 1 intact: it is not used in place of the step asked for
        save_model(storage, checkpoint_dir("transformer", step), state, {"kind": "transformer"})
    asked = checkpoint_dir("transformer", 2)
    _truncate(storage, f"{asked}/model.safetensors")
    with pytest.raises(CorruptCheckpoint, match="does not match the sha256") as caught:
        Sampler.from_checkpoint(storage.uri(asked))
    message = str(caught.value)
    assert isinstance(caught.value, UserError) and "\n" not in message and "step_00000002" in message
    with pytest.raises(CorruptCheckpoint, match="no model.json"):
        load_model(storage, checkpoint_dir("transformer", 3))  # a missing folder
    storage.write_bytes(f"{asked}/model.json", b"{not json")
    with pytest.raises(CorruptCheckpoint, match="model.json is damaged"):
        load_model(storage, asked)


# ----- metrics of several trainers ----------------------------------------------------------------


class _SecondDVAE(DVAETraining):
    """A second trainer of its own name (its own checkpoints and metrics), as the transformer would be."""

    name = "transformer"


def test_two_trainers_on_one_root_keep_every_line_and_a_resume_duplicates_none(tmp_path):
    storage, cfg = make_run(str(tmp_path / "run"))
    settings = {"max_steps": 6, "checkpoint_every": 2, "log_every": 1}
    tcfg = cfg.train_dvae.model_copy(update=settings)
    started = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(task, max_steps: int) -> None:
        try:
            started.wait(timeout=60)
            train(task, storage, cfg, tcfg.model_copy(update={"max_steps": max_steps}), log=lambda m: None)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [
        threading.Thread(target=run, args=(DVAETraining(storage, cfg), 6)),
        threading.Thread(target=run, args=(_SecondDVAE(storage, cfg), 6)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for model in ("dvae", "transformer"):
        assert [m["step"] for m in read_metrics(storage, model)] == list(range(1, 7)), model
    assert len(read_metrics(storage)) == 12

    # The dVAE's newest checkpoint is lost (as if killed before it): the resumed run repeats steps 5, 6.
    shutil.rmtree(storage.path(checkpoint_dir("dvae", 6)))
    storage.write_json(latest_pointer("dvae"), {"step": 4})
    train(
        DVAETraining(storage, cfg), storage, cfg, tcfg.model_copy(update={"max_steps": 8}), log=lambda m: None
    )
    assert [m["step"] for m in read_metrics(storage, "dvae")] == list(range(1, 9))
    assert [m["step"] for m in read_metrics(storage, "transformer")] == list(range(1, 7))


def test_metrics_of_older_roots_and_of_several_runs_are_merged(tmp_path, monkeypatch):
    storage = Storage(str(tmp_path / "run"))
    old = [{"model": "dvae", "step": s, "loss": 1.0, "time": s} for s in (1, 2, 3)]
    old.append({"model": "transformer", "step": 1, "loss": 5.0, "time": 3.5})
    storage.write_bytes(METRICS, ("\n".join(json.dumps(r) for r in old) + "\n{torn").encode())
    monkeypatch.setattr(loop, "METRICS_PART_LINES", 2)  # parts of two lines: 3 files for 5 records
    log = MetricsLog(storage, "dvae", resume_step=2)  # supersedes the old file's step 3
    for step in range(3, 8):
        log.add({"model": "dvae", "step": step, "loss": 0.5, "time": 10 + step})
    log.flush(force=True)
    assert len(storage.list("reports/metrics/dvae", ".jsonl")) == 3
    assert [r["step"] for r in read_metrics(storage, "dvae")] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["loss"] for r in read_metrics(storage, "dvae")][2] == 0.5
    merged = read_metrics(storage)
    assert [(r["model"], r["step"]) for r in merged][:4] == [
        ("dvae", 1),
        ("dvae", 2),
        ("transformer", 1),
        ("dvae", 3),
    ]
    # A file that is not a run's (or another writer's temporary) is ignored.
    storage.write_bytes("reports/metrics/dvae/notes.jsonl", b'{"model": "dvae", "step": 99}\n')
    assert max(r["step"] for r in read_metrics(storage, "dvae")) == 7
    assert metrics_file("dvae", "20260101T000000000000Z-ab", 3, 1).endswith("-from_00000003-0001.jsonl")
