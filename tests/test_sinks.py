"""The optional metrics sinks (config section `dashboards`): TensorBoard event files in the run root,
W&B offline runs, the clear error for a missing package, and a failing sink that training outlives.
the run root's metrics files (read_metrics) are the source of truth every sink is checked against."""

from __future__ import annotations

import glob
import json
import os
import struct
import sys
import tempfile
import types
from pathlib import Path

import pytest
from test_train import make_run, metric_lines  # tests/ is on sys.path under `pytest` and `python -m pytest`

from dalle.config import ConfigError, config_from_dict
from dalle.errors import UserError
from dalle.runroot import METRICS_DIR, latest_checkpoint, read_metrics
from dalle.storage import Storage
from dalle.train import sinks as sinks_module
from dalle.train.dvae import DVAETraining
from dalle.train.loop import train
from dalle.train.sinks import SinkUnavailable, check_available, open_sinks, tensorboard_dir


def train_dvae(storage: Storage, cfg, max_steps: int, logs: list[str] | None = None) -> str:
    tcfg = cfg.train_dvae.model_copy(update={"max_steps": max_steps})
    log = logs.append if logs is not None else (lambda message: None)
    return train(DVAETraining(storage, cfg), storage, cfg, tcfg, log=log)


def tensorboard_scalars(storage: Storage, model: str, folder) -> dict[str, list]:
    """Every scalar of the model's event files in the run root, read back with TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder.mkdir()
    for rel in storage.list(tensorboard_dir(model)):
        (folder / rel.rsplit("/", 1)[-1]).write_bytes(storage.read_bytes(rel))
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def test_tensorboard_events_in_the_run_root_equal_metrics_jsonl(run_root, tmp_path, monkeypatch):
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    storage, cfg = make_run(run_root, dashboards={"tensorboard": True})
    train_dvae(storage, cfg, max_steps=3)
    first_files = storage.list(tensorboard_dir("dvae"))
    assert len(first_files) == 1 and first_files[0].rsplit("/", 1)[-1].startswith("events.out.tfevents.")
    first_bytes = storage.read_bytes(first_files[0])

    # A resumed run adds an event file of its own; the first one stays as it was.
    train_dvae(storage, cfg, max_steps=5)
    files = storage.list(tensorboard_dir("dvae"))
    assert len(files) == 2 and first_files[0] in files
    assert storage.read_bytes(first_files[0]) == first_bytes

    records = metric_lines(storage, "dvae")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    scalars = tensorboard_scalars(storage, "dvae", tmp_path / "events")
    numeric = {k for k, v in records[0].items() if isinstance(v, (int, float)) and k not in ("step", "time")}
    assert {"loss", "grad_norm", "lr", "samples_per_s", "skipped_steps", "codebook_perplexity"} <= numeric
    assert set(scalars) == {f"dvae/{key}" for key in numeric}
    for key in ("loss", "grad_norm", "lr", "codebook_perplexity"):
        events = scalars[f"dvae/{key}"]
        assert [e.step for e in events] == [r["step"] for r in records]
        assert [e.value for e in events] == pytest.approx([r[key] for r in records], rel=1e-6)
    assert [e.wall_time for e in scalars["dvae/loss"]] == pytest.approx([r["time"] for r in records])
    assert not glob.glob(str(tmp_path / "tmp" / "dalle-tensorboard-*")), "the local event folders are removed"


def wandb_history(path: str) -> list[dict]:
    """The history rows of an offline W&B run file (a LevelDB-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos = Path(path).read_bytes(), 32768, 7  # after the ":W&B" header
    assert data[:4] == b":W&B"
    rows, pending = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                rows.append({key: json.loads(value) for key, value in row.items()})
    return rows


def test_wandb_offline_run_holds_the_history(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    storage, cfg = make_run(
        str(tmp_path / "run"), dashboards={"wandb_project": "dalle-test", "wandb_mode": "offline"}
    )
    logs: list[str] = []
    train_dvae(storage, cfg, max_steps=3, logs=logs)

    runs = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1 and os.path.getsize(runs[0]) > 0
    assert any("wandb sync" in line for line in logs)
    history = wandb_history(runs[0])
    records = metric_lines(storage, "dvae")
    assert [row["_step"] for row in history] == [r["step"] for r in records] == [1, 2, 3]
    assert [row["dvae/loss"] for row in history] == pytest.approx([r["loss"] for r in records])
    assert [row["dvae/lr"] for row in history] == pytest.approx([r["lr"] for r in records])


def test_a_missing_package_is_a_clear_error_before_any_training_step(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed (import raises ImportError)
    storage, cfg = make_run(str(tmp_path / "run"), dashboards={"mlflow_tracking_uri": "http://127.0.0.1:9"})
    with pytest.raises(SinkUnavailable, match=r"`pip install mlflow`") as caught:
        train_dvae(storage, cfg, max_steps=3)
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ConfigError)
    assert latest_checkpoint(storage, "dvae") is None and read_metrics(storage) == []
    assert not storage.subfolders(METRICS_DIR)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    tensorboard = config_from_dict({"dashboards": {"tensorboard": True}}).dashboards
    with pytest.raises(SinkUnavailable, match=r"pip install 'dalle-pipeline\[dashboards\]'"):
        check_available(tensorboard)

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    online = config_from_dict({"dashboards": {"wandb_project": "p"}}).dashboards
    with pytest.raises(SinkUnavailable, match="WANDB_API_KEY is not in the environment"):
        check_available(online)


def test_a_failing_sink_is_switched_off_with_one_warning_and_training_completes(tmp_path, monkeypatch):
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the failed sink's events stay there
    storage, cfg = make_run(str(tmp_path / "run"), dashboards={"tensorboard": True})
    monkeypatch.setattr(sinks_module, "UPLOAD_EVERY_S", 0.0)  # upload at every write
    write_bytes = Storage.write_bytes

    def dashboard_copy_fails(self, rel, data):
        if rel.startswith(tensorboard_dir("dvae")):
            raise ConnectionError("network is unreachable")
        return write_bytes(self, rel, data)

    monkeypatch.setattr(Storage, "write_bytes", dashboard_copy_fails)
    logs: list[str] = []
    train_dvae(storage, cfg, max_steps=4, logs=logs)

    warnings = [line for line in logs if line.startswith("warning:")]
    assert len(warnings) == 1 and "TensorBoard" in warnings[0] and "network is unreachable" in warnings[0]
    assert [r["step"] for r in metric_lines(storage, "dvae")] == [1, 2, 3, 4]
    assert latest_checkpoint(storage, "dvae").step == 4
    assert storage.list(tensorboard_dir("dvae")) == []
    assert glob.glob(str(tmp_path / "tmp" / "dalle-tensorboard-*" / "events.out.tfevents.*"))


def _fake_mlflow(monkeypatch, fail_at: str | None = None) -> list[tuple]:
    """mlflow's client API as a recording stand-in (the real package is large and not installed here)."""
    calls: list[tuple] = []

    class Client:
        def __init__(self, tracking_uri):
            calls.append(("client", tracking_uri))

        def _call(self, name, *args):
            if name == fail_at:
                raise ConnectionError("connection refused")
            calls.append((name, *args))

        def get_experiment_by_name(self, name):
            self._call("get_experiment_by_name", name)

        def create_experiment(self, name):
            self._call("create_experiment", name)
            return "7"

        def create_run(self, experiment_id, run_name):
            self._call("create_run", experiment_id, run_name)
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))

        def log_batch(self, run_id, metrics):
            self._call("log_batch", run_id, sorted((m.key, m.value, m.step) for m in metrics))

        def set_terminated(self, run_id, status):
            self._call("set_terminated", run_id, status)

    class Metric:
        def __init__(self, key, value, timestamp, step):
            self.key, self.value, self.timestamp, self.step = key, value, timestamp, step

    monkeypatch.setitem(sys.modules, "mlflow", types.ModuleType("mlflow"))
    monkeypatch.setitem(sys.modules, "mlflow.entities", types.SimpleNamespace(Metric=Metric))
    monkeypatch.setitem(sys.modules, "mlflow.tracking", types.SimpleNamespace(MlflowClient=Client))
    return calls


def test_mlflow_sink_calls_and_an_unreachable_server(tmp_path, monkeypatch):
    dashboards = config_from_dict({"dashboards": {"mlflow_tracking_uri": "http://127.0.0.1:9"}}).dashboards
    storage = Storage(str(tmp_path / "run"))
    calls = _fake_mlflow(monkeypatch)
    sinks = open_sinks(storage, dashboards, "dvae", "run-dvae", log=lambda m: None)
    sinks.write({"model": "dvae", "step": 2, "loss": 0.5, "skipped_steps": 0, "time": 1.0e9})
    sinks.close()
    assert calls == [
        ("client", "http://127.0.0.1:9"),
        ("get_experiment_by_name", "dalle"),
        ("create_experiment", "dalle"),
        ("create_run", "7", "run-dvae"),
        ("log_batch", "r1", [("dvae/loss", 0.5, 2), ("dvae/skipped_steps", 0.0, 2)]),
        ("set_terminated", "r1", "FINISHED"),
    ]

    _fake_mlflow(monkeypatch, fail_at="get_experiment_by_name")
    logs: list[str] = []
    sinks = open_sinks(storage, dashboards, "dvae", "run-dvae", log=logs.append)
    assert sinks.names == [] and len(logs) == 1 and "could not be opened" in logs[0]
    sinks.write({"model": "dvae", "step": 1, "loss": 1.0})
    sinks.close()


def test_secrets_are_refused_in_the_config():
    with pytest.raises(ConfigError, match="secrets never go in the configuration"):
        config_from_dict({"dashboards": {"wandb_api_key": "abc"}})
    with pytest.raises(ConfigError, match="holds credentials"):
        config_from_dict({"dashboards": {"mlflow_tracking_uri": "https://user:pw@mlflow.example"}})
    with pytest.raises(ConfigError, match="unknown key 'dashboards.tensorbord'"):
        config_from_dict({"dashboards": {"tensorbord": True}})
