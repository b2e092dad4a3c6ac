"""The run root's layout module: checkpoint lookup and the one-off migration of older run roots."""

from __future__ import annotations

import json

import pytest

from dalle.config import ConfigError, RunConfig, dump_config
from dalle.runroot import (
    METRICS,
    TRANSFORMER,
    checkpoint_dir,
    latest_checkpoint,
    migrate,
    run_config,
    set_latest,
    split_checkpoint_uri,
)
from dalle.storage import Storage


def _old_run_root(storage: Storage) -> None:
    """What a run root of the previous release held: the transformer under models/dalle/."""
    for step in (2, 4):
        for name in ("model.safetensors", "model.json", "train_state.pt", "config.yaml"):
            storage.write_bytes(f"models/dalle/step_{step:08d}/{name}", f"{name} at {step}".encode())
    storage.write_json(
        "models/dalle/latest.json", {"step": 4, "uri": storage.uri("models/dalle/step_00000004")}
    )
    lines = [{"model": "dvae", "step": 1, "loss": 1.0}, {"model": "dalle", "step": 1, "loss": 5.0}]
    storage.write_bytes(METRICS, ("\n".join(json.dumps(line) for line in lines) + "\n").encode())
    storage.write_bytes("config.yaml", dump_config(RunConfig()).encode())


def test_an_older_run_root_is_migrated_once_when_opened(tmp_path):
    storage = Storage(str(tmp_path / "old"))
    _old_run_root(storage)

    run_config(storage)  # opening the run migrates it

    latest = latest_checkpoint(storage, TRANSFORMER)
    assert latest is not None and latest.step == 4
    assert latest.uri == storage.uri(checkpoint_dir(TRANSFORMER, 4))
    for step in (2, 4):
        for name in ("model.safetensors", "model.json", "train_state.pt", "config.yaml"):
            rel = f"{checkpoint_dir(TRANSFORMER, step)}/{name}"
            assert storage.read_bytes(rel) == f"{name} at {step}".encode()
    assert not storage.exists("models/dalle")
    models = [json.loads(line)["model"] for line in storage.read_bytes(METRICS).decode().splitlines()]
    assert models == ["dvae", "transformer"]
    assert migrate(storage) == []  # nothing left to do


def test_a_migration_interrupted_before_latest_is_finished_by_the_next(tmp_path):
    storage = Storage(str(tmp_path / "old"))
    _old_run_root(storage)
    # As if the copy stopped after step 2: its files are there, latest.json of the new folder is not.
    for name in ("model.safetensors", "model.json"):
        storage.write_bytes(f"{checkpoint_dir(TRANSFORMER, 2)}/{name}", f"{name} at 2".encode())
    assert migrate(storage)
    assert latest_checkpoint(storage, TRANSFORMER).step == 4
    assert storage.read_bytes(f"{checkpoint_dir(TRANSFORMER, 4)}/train_state.pt") == b"train_state.pt at 4"


def test_an_old_checkpoint_uri_names_the_transformer_folder(tmp_path):
    root, rel = split_checkpoint_uri(f"{tmp_path}/run/models/dalle/step_00000006")
    assert (root, rel) == (f"{tmp_path}/run", "models/transformer/step_00000006")
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        split_checkpoint_uri(f"{tmp_path}/run/galleries/step_00000006")


def test_latest_names_the_newest_complete_checkpoint(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    assert latest_checkpoint(storage, "dvae") is None
    uri = set_latest(storage, "dvae", 12)
    assert uri == storage.uri("models/dvae/step_00000012")
    assert latest_checkpoint(storage, "dvae").rel_dir == "models/dvae/step_00000012"


def test_a_folder_without_config_is_not_a_run_root(tmp_path):
    with pytest.raises(ConfigError, match="no config.yaml .* pass --config"):
        run_config(Storage(str(tmp_path / "empty")))
