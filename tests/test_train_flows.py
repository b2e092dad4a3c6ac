"""The commands and flows of tokenizing and training, against the session's Prefect test server."""

from __future__ import annotations

import time

import pytest

from dalle.runroot import latest_pointer, read_metrics
from dalle.storage import Storage
from tests.test_cli import run_cli
from tests.test_train import SETTINGS, make_run, write_filter_stage


def _checkpoint_events(uri_prefix: str) -> list:
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    with get_client(sync_client=True) as client:
        page = client.read_events(
            EventFilter(event=EventNameFilter(name=["dalle.checkpoint.saved"])), limit=50
        )
    return [e for e in page.events if e.resource.id.startswith(uri_prefix)]


def test_commands_train_tokenize_and_publish_each_checkpoint(tmp_path, prefect_server):
    root = str(tmp_path / "run")
    storage, _ = make_run(root)

    done = run_cli("train", "dvae", "--out", root, "--max-steps", "6")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == storage.uri("models/dvae/step_00000006")

    done = run_cli("tokenize", "--out", root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert storage.read_json("shards/_manifest.json")["rows"] == 48

    done = run_cli("train", "--out", root, "--max-steps", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert storage.read_json(latest_pointer("transformer"))["step"] == 3

    refused = run_cli("train", "--out", root, "--max-steps", "6", "--no-resume")
    assert refused.returncode == 2
    assert "already has checkpoints up to step 3" in refused.stderr
    assert storage.read_json(latest_pointer("transformer"))["step"] == 3

    # One event per checkpoint (dVAE at 3 and 6, transformer at 3), with the checkpoint as resource.
    deadline = time.monotonic() + 30
    while True:
        events = _checkpoint_events(storage.uri("models"))
        if len(events) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert sorted(e.resource.id for e in events) == sorted(
        storage.uri(f"models/{m}")
        for m in ("transformer/step_00000003", "dvae/step_00000003", "dvae/step_00000006")
    )
    from prefect import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"dvae-checkpoint", "dvae-checkpoint-metrics", "transformer-checkpoint", "token-shards"} <= keys


@pytest.mark.slow
def test_a_flow_under_torchrun_publishes_the_checkpoints_its_children_write(tmp_path, prefect_server):
    root = str(tmp_path / "ddp")
    storage, _ = make_run(root, train_dvae={**SETTINGS["train_dvae"], "nproc": 2, "checkpoint_every": 2})
    done = run_cli("train", "dvae", "--out", root, "--max-steps", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    # Polling sees at least the last checkpoint (an earlier one may be overtaken between two polls);
    # events reach the server asynchronously, so wait for it.
    last = storage.uri("models/dvae/step_00000004")
    deadline = time.monotonic() + 30
    while last not in {e.resource.id for e in _checkpoint_events(storage.uri("models/dvae"))}:
        assert time.monotonic() < deadline, "no checkpoint event for the last checkpoint"
        time.sleep(1)


def test_train_without_a_run_root_says_what_to_do(tmp_path, prefect_server):
    done = run_cli("train", "--out", str(tmp_path / "nothing"))
    assert done.returncode == 2
    assert "pass --config YAML" in done.stderr
    assert not Storage(str(tmp_path / "nothing")).exists("models")


def test_train_clip_trains_a_clip_the_pipeline_can_load(tmp_path, prefect_server):
    from dalle.config import ClipConfig
    from dalle.models.clip import load_clip

    root = str(tmp_path / "run")
    small = {
        "image_size": 16, "embed_dim": 16, "vision_width": 16, "vision_layers": 1, "patch_size": 8,
        "text_width": 16, "text_layers": 1, "text_heads": 2, "context_length": 16,
    }  # fmt: skip
    training = {"batch_size": 8, "max_steps": 3, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1}
    storage, _ = make_run(root, clip={"small": small}, train_clip=training)
    write_filter_stage(storage)
    done = run_cli("train", "clip", "--out", root)
    assert done.returncode == 0, done.stderr[-3000:]
    uri = done.stdout.strip().splitlines()[-1]
    assert storage.read_json(latest_pointer("clip"))["uri"] == uri == storage.uri("models/clip/step_00000003")
    clip = load_clip(ClipConfig(checkpoint=uri))
    assert clip.encode_texts(["a red circle"]).shape == (1, 16)
    # The CLIP trains on the shared loop: more steps resume from its checkpoint, like the other models.
    done = run_cli("train", "clip", "--out", root, "--max-steps", "5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert storage.read_json(latest_pointer("clip"))["step"] == 5
    assert [record["step"] for record in read_metrics(storage, "clip")] == [1, 2, 3, 4, 5]


def test_more_steps_resume_past_the_newest_checkpoint_and_a_time_limit_stops_training(
    tmp_path, prefect_server
):
    root = str(tmp_path / "run")
    storage, _ = make_run(root)
    done = run_cli("train", "dvae", "--out", root, "--max-steps", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_cli("train", "dvae", "--out", root, "--more-steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert storage.read_json(latest_pointer("dvae"))["step"] == 5
    # Progress reaches the log, a line per log_every steps.
    assert "dvae: step 5/5 loss" in done.stderr
    both = run_cli("train", "dvae", "--out", root, "--more-steps", "2", "--max-steps", "9")
    assert both.returncode == 2 and "not both" in both.stderr

    # A training that runs past orchestration.train_timeout_s is stopped once (not retried), with a
    # line naming the setting; its checkpoints stay and the next run resumes from them.
    slow = {**SETTINGS["train_dvae"], "max_steps": 1_000_000, "checkpoint_every": 5}
    config = tmp_path / "limited.yaml"
    import yaml

    config.write_text(
        yaml.safe_dump({**SETTINGS, "train_dvae": slow, "orchestration": {"train_timeout_s": 8}})
    )
    started = time.monotonic()
    stopped = run_cli("train", "dvae", "--out", root, "--config", str(config))
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert "stopped after 8 s (orchestration.train_timeout_s)" in stopped.stderr
    assert time.monotonic() - started < 120
    assert stopped.stderr.count("dvae: resuming from step 5") == 1  # no retry
    assert storage.read_json(latest_pointer("dvae"))["step"] >= 5


@pytest.mark.parametrize("flow_name", ["train_dvae_flow", "train_transformer_flow", "train_clip_flow"])
@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"root": "runs/x", "more_steps": 0}, "more_steps: Input should be greater than or equal to 1"),
        ({"root": "runs/x", "max_steps": -5}, "max_steps: Input should be greater than or equal to 1"),
        ({"root": "runs/x", "more_steps": 2.5}, "more_steps: Input should be a valid integer"),
        ({"root": " "}, "root: Value error, must be a local path or an s3:// URI"),
    ],
)
def test_training_flows_refuse_bad_parameters_before_they_run(flow_name, parameters, message):
    """Deployments and event triggers pass parameters without the command line's checks: Prefect
    validates them against the flow's signature (and the deployment's schema) before a run starts."""
    from prefect.exceptions import ParameterTypeError

    from flows import train

    flow = getattr(train, flow_name)
    with pytest.raises(ParameterTypeError, match=message):
        flow.validate_parameters(parameters)
    schema = flow.parameters.model_dump()["properties"]
    assert {"minimum": 1, "type": "integer"} in schema["more_steps"]["anyOf"]
    assert flow.validate_parameters({"root": "runs/x", "more_steps": "3"})["more_steps"] == 3


def test_every_flow_refuses_a_blank_root_url_list_or_checkpoint():
    from prefect.exceptions import ParameterTypeError

    from flows.curate import curate_flow
    from flows.gallery import gallery_flow
    from flows.ingest import ingest_flow
    from flows.pipeline import pipeline_flow
    from flows.tokens import tokenize_flow

    with pytest.raises(ParameterTypeError, match="urls: Value error, must be a local path"):
        ingest_flow.validate_parameters({"root": "runs/x", "urls": "  "})
    with pytest.raises(ParameterTypeError, match="root: String should have at least 1 character"):
        pipeline_flow.validate_parameters({"root": ""})
    with pytest.raises(ParameterTypeError, match="urls: Value error, must be a local path"):
        curate_flow.validate_parameters({"root": "runs/x", "urls": "\t"})
    with pytest.raises(ParameterTypeError, match="root: Value error, must be a local path"):
        tokenize_flow.validate_parameters({"root": " "})
    with pytest.raises(ParameterTypeError, match="checkpoint: String should have at least 1 character"):
        gallery_flow.validate_parameters({"root": "runs/x", "checkpoint": ""})
    assert tokenize_flow.validate_parameters({"root": "runs/x"})["root"] == "runs/x"
