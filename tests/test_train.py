"""Tokenizing and training: checkpoints, exact resume after SIGKILL, torchrun, the NaN guard, bad input."""

from __future__ import annotations

import hashlib
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pytest
import torch

from dalle.config import ConfigError, TrainConfig, config_from_dict, dump_config
from dalle.models.weights import CheckpointMismatch, load_dvae, load_model, load_model_state
from dalle.runroot import (
    CURATED_DIR,
    FILTER_TABLE,
    SHARDS_MANIFEST,
    checkpoint_dir,
    checkpoint_steps,
    latest_pointer,
    read_metrics,
    run_config,
)
from dalle.schemas import CURATED_SCHEMA, FILTER_DECISIONS_SCHEMA, SCHEMA_VERSION, token_shard_schema
from dalle.storage import Storage
from dalle.tokens.loader import ShardError, read_listed_shards
from dalle.tokens.shards import ShardsMismatch, tokenize_stage
from dalle.train.checkpoint import load_train_state
from dalle.train.dvae import DVAETraining
from dalle.train.launch import launch, torchrun_command
from dalle.train.loop import TrainingDiverged, lr_factor, peak_flops, train
from demo.world import WorldConfig, generate_samples

SETTINGS = {
    "dvae": {"image_size": 16, "downsample_steps": 2, "codebook_size": 32, "hidden_width": 8},
    "transformer": {"text_seq_len": 12, "width": 32, "depth": 2, "heads": 2},
    "tokenizer": {"vocab_size": 300},
    "tokenize": {"rows_per_shard": 25, "batch_size": 16},
    "train_dvae": {"batch_size": 8, "max_steps": 6, "checkpoint_every": 3, "log_every": 1},
    "train_transformer": {
        "batch_size": 8,
        "max_steps": 6,
        "checkpoint_every": 3,
        "log_every": 1,
        "warmup_steps": 2,
    },
}


def write_curated(storage: Storage, first: int, count: int, shard_index: int) -> None:
    """Curated pairs made from demo images (as the curation flow publishes them), one shard per call."""
    samples = generate_samples(WorldConfig(num_images=first + count, image_size=16, pair_fraction=0.0))
    rows = [
        {
            "uid": f"uid{i:05d}",
            "url": f"http://127.0.0.1/{s.name}",
            "caption": s.caption,
            "image": s.image,
            "sha256": hashlib.sha256(s.image).hexdigest(),
            "width": 16,
            "height": 16,
            "clip_score": 0.3,
            "provenance": {
                "input_row": i,
                "raw_key": str(i),
                "raw_shard": "raw/00000.parquet",
                "clip_model": "t",
            },
        }
        for i, s in enumerate(samples[first:], start=first)
    ]
    rel = f"curated/{shard_index:05d}.parquet"
    storage.write_table(rel, pa.Table.from_pylist(rows, schema=CURATED_SCHEMA))
    shards = (
        storage.read_json("curated/_manifest.json")["shards"]
        if storage.exists("curated/_manifest.json")
        else []
    )
    shards.append({"path": rel, "rows": count, "sha256": hashlib.sha256(storage.read_bytes(rel)).hexdigest()})
    total = sum(s["rows"] for s in shards)
    storage.write_json(
        "curated/_manifest.json", {"schema_version": SCHEMA_VERSION, "rows": total, "shards": shards}
    )


def write_filter_stage(storage: Storage) -> None:
    """The curated pairs as the crawl and the rule filters would have left them (raw shard and filter
    decisions), which is what the small CLIP trains on."""
    curated = read_listed_shards(storage, CURATED_DIR).to_pylist()
    raw = [
        {
            "key": str(i),
            "url": row["url"],
            "caption": row["caption"],
            "status": "success",
            "error_message": None,
            "sha256": row["sha256"],
            "input_row": i,
            "caption_utf8": True,
            "jpg": row["image"],
        }
        for i, row in enumerate(curated)
    ]
    storage.write_table("raw/00000.parquet", pa.Table.from_pylist(raw))
    decisions = [
        {
            "input_row": r["input_row"],
            "url": r["url"],
            "caption": r["caption"],
            "raw_shard": "raw/00000.parquet",
            "raw_key": r["key"],
            "uid": f"uid{r['input_row']:05d}",
            "fate": "pass",
            "sha256": r["sha256"],
            "width": 16,
            "height": 16,
        }
        for r in raw
    ]
    storage.write_table(FILTER_TABLE, pa.Table.from_pylist(decisions, schema=FILTER_DECISIONS_SCHEMA))


def make_run(root: str, **overrides) -> tuple[Storage, object]:
    storage = Storage(root)
    write_curated(storage, 0, 48, 0)
    settings = {**SETTINGS, **overrides}
    cfg = run_config(storage, settings)
    return storage, cfg


def metric_lines(storage: Storage, model: str) -> list[dict]:
    return read_metrics(storage, model)


# ----- the whole chain, local and on S3 -------------------------------------------------------


def test_train_tokenize_train_and_resume(run_root):
    storage, cfg = make_run(run_root)
    dvae_uri = launch("dvae", run_root, cfg, log=lambda m: None)
    assert dvae_uri == storage.uri(checkpoint_dir("dvae", 6))
    for name in ("model.safetensors", "model.json", "train_state.pt", "config.yaml"):
        assert storage.exists(f"{checkpoint_dir('dvae', 3)}/{name}")
    assert storage.read_json(latest_pointer("dvae")) == {"step": 6, "uri": dvae_uri}
    dvae_metrics = metric_lines(storage, "dvae")
    assert [m["step"] for m in dvae_metrics] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "samples_per_s", "codebook_perplexity", "codebook_used_share"} <= set(
        dvae_metrics[0]
    )

    summary = tokenize_stage(storage, cfg, *load_dvae(storage), log=lambda m: None)
    assert summary["rows"] == 48 and summary["shards"] == 2 and summary["new_rows"] == 48
    manifest = storage.read_json(SHARDS_MANIFEST)
    assert manifest["dvae"]["uri"] == dvae_uri and manifest["tokenizer"].startswith("bpe:")
    for shard in manifest["shards"]:
        assert hashlib.sha256(storage.read_bytes(shard["path"])).hexdigest() == shard["sha256"]
        table = storage.read_table(shard["path"])
        assert table.schema.equals(token_shard_schema(16), check_metadata=False)

    launch("transformer", run_root, cfg, log=lambda m: None)
    # --max-steps is the total to reach: 4 more steps from the checkpoint at 6.
    uri = launch("transformer", run_root, cfg, max_steps=10, log=lambda m: None)
    assert uri == storage.uri(checkpoint_dir("transformer", 10))
    transformer_metrics = metric_lines(storage, "transformer")
    assert [m["step"] for m in transformer_metrics] == list(range(1, 11))
    # No peak FLOP/s is known for a CPU: the achieved model FLOP/s is logged, the MFU is null.
    assert all(m["model_flops_per_s"] > 0 and m["mfu"] is None for m in transformer_metrics)
    state = load_train_state(storage, checkpoint_dir("transformer", 10))
    assert state["step"] == 10 and state["batches"] == 10


# ----- exact resume after SIGKILL -------------------------------------------------------------


def _train_process(root: str, max_steps: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dalle.train", "dvae", "--out", root, "--max-steps", str(max_steps)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_run_killed_with_sigkill_resumes_with_the_losses_of_an_uninterrupted_run(tmp_path):
    steps = 40
    settings = {"train_dvae": {**SETTINGS["train_dvae"], "checkpoint_every": 5, "max_steps": steps}}
    whole, _ = make_run(str(tmp_path / "whole"), **settings)
    killed, _ = make_run(str(tmp_path / "killed"), **settings)

    assert _train_process(whole.uri(), steps).wait(timeout=300) == 0
    process = _train_process(killed.uri(), steps)
    deadline = time.monotonic() + 120
    while not (
        killed.exists(latest_pointer("dvae")) and killed.read_json(latest_pointer("dvae"))["step"] >= 10
    ):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed_from = killed.read_json(latest_pointer("dvae"))["step"]
    assert resumed_from < steps, "the kill came after the end; nothing was resumed"

    assert _train_process(killed.uri(), steps).wait(timeout=300) == 0
    expected = {m["step"]: m["loss"] for m in metric_lines(whole, "dvae")}
    got = {m["step"]: m["loss"] for m in metric_lines(killed, "dvae")}
    assert sorted(got) == list(range(1, steps + 1)), "metrics hold each step once, none duplicated"
    for step in range(resumed_from + 1, steps + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-9), step


# ----- torchrun ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_nodes_meet_at_the_configured_endpoint_and_train_as_one(tmp_path):
    # Two "nodes" on one machine: each runs the command a node runs, `python -m dalle.train dvae --out ROOT`,
    # with one process of its own; they meet at the rendezvous endpoint of the shared configuration.
    root = str(tmp_path / "nodes")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    multi = {"nnodes": 2, "nproc": 1, "rdzv_endpoint": f"127.0.0.1:{port}", "rdzv_id": "two-nodes",
             "node_addr": "127.0.0.1", "max_steps": 4, "checkpoint_every": 2}  # fmt: skip
    storage, cfg = make_run(root, train_dvae={**SETTINGS["train_dvae"], **multi})
    command = torchrun_command("dvae", root, cfg.train_dvae, None, True)
    assert command[3:8] == ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                            f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes"]  # fmt: skip
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen([sys.executable, "-m", "dalle.train", "dvae", "--out", root], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(out[-3000:] for out in outputs)
    state = load_train_state(storage, checkpoint_dir("dvae", 4))
    assert state["world_size"] == 2 and state["batches"] == 4
    assert len(set(state["rank_weight_checksums"])) == 1  # one model across the two nodes
    assert storage.read_json(latest_pointer("dvae"))["step"] == 4
    assert checkpoint_steps(storage, "dvae") == [2, 4]  # each checkpoint written once, by rank 0
    # Both nodes printed the checkpoint the run ended at; only the first node's rank logged the steps.
    assert all(out.strip().splitlines()[-1] == storage.uri(checkpoint_dir("dvae", 4)) for out in outputs)


def test_a_multi_node_setting_without_a_meeting_place_is_refused():
    with pytest.raises(ConfigError, match="set rdzv_endpoint"):
        config_from_dict({"train_transformer": {"nnodes": 2}})
    for bad in ("node0", "node0:", ":29400", "node0:99999", "node0:http"):
        with pytest.raises(ConfigError, match="rdzv_endpoint must be host:port"):
            config_from_dict({"train_transformer": {"nnodes": 2, "rdzv_endpoint": bad}})
    with pytest.raises(ConfigError, match="rdzv_id"):
        config_from_dict({"train_transformer": {"rdzv_id": "a b"}})


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_torchrun_with_two_processes(tmp_path, fsdp):
    root = str(tmp_path / "ddp")
    storage, cfg = make_run(
        root,
        train_dvae={
            **SETTINGS["train_dvae"],
            "nproc": 2,
            "fsdp": fsdp,
            "max_steps": 4,
            "checkpoint_every": 2,
        },
    )
    uri = launch("dvae", root, cfg)
    assert uri == storage.uri(checkpoint_dir("dvae", 4))
    state = load_train_state(storage, checkpoint_dir("dvae", 4))
    assert state["world_size"] == 2
    if not fsdp:  # DDP replicas: every rank reported the same weights
        assert len(state["rank_weight_checksums"]) == 2 and len(set(state["rank_weight_checksums"])) == 1
    assert len(state["rng"]) == 2  # each rank's generator, so a resume continues each one
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"]), "ranks draw different noise"
    # Each step took one batch per rank: the ranks split the data rather than repeat it.
    assert state["batches"] == 4
    model, meta = load_model(storage, checkpoint_dir("dvae", 4))  # whole weights, also after sharding
    assert meta["kind"] == "dvae" and model.encode(torch.rand(1, 3, 16, 16)).shape == (1, 4, 4)


# ----- the NaN guard ------------------------------------------------------------------------------


class _PoisonedDVAE(DVAETraining):
    """The dVAE task with a NaN loss from `first_bad` on: what a diverging run looks like."""

    def __init__(self, storage, cfg, first_bad: int, bad_steps: int):
        super().__init__(storage, cfg)
        self.first_bad, self.bad_steps, self.calls = first_bad, bad_steps, 0

    def loss(self, model, batch, step):
        loss, parts = super().loss(model, batch, step)
        self.calls += 1
        if self.first_bad <= self.calls < self.first_bad + self.bad_steps:
            loss = loss * float("nan")
        return loss, parts


def test_nan_steps_are_skipped_and_counted(tmp_path):
    storage, cfg = make_run(str(tmp_path / "run"))
    tcfg = cfg.train_dvae.model_copy(update={"max_steps": 6, "max_bad_steps": 3})
    train(_PoisonedDVAE(storage, cfg, first_bad=3, bad_steps=2), storage, cfg, tcfg, log=lambda m: None)
    state = load_train_state(storage, checkpoint_dir("dvae", 6))
    assert state["skipped_steps"] == 2 and state["step"] == 6 and state["batches"] == 8
    assert all(math.isfinite(m["loss"]) for m in metric_lines(storage, "dvae"))


def test_too_many_nan_steps_in_a_row_stop_with_a_clear_error(tmp_path):
    storage, cfg = make_run(str(tmp_path / "run"))
    tcfg = cfg.train_dvae.model_copy(update={"max_steps": 10, "max_bad_steps": 3, "checkpoint_every": 2})
    with pytest.raises(TrainingDiverged, match="3 steps in a row had a NaN/Inf loss"):
        train(_PoisonedDVAE(storage, cfg, first_bad=3, bad_steps=100), storage, cfg, tcfg, log=lambda m: None)
    assert storage.read_json(latest_pointer("dvae"))["step"] == 2, "the last good checkpoint stays"


# ----- bad input ---------------------------------------------------------------------------------


def test_a_checkpoint_from_another_config_is_refused(tmp_path):
    root = str(tmp_path / "run")
    storage, cfg = make_run(root)
    launch("dvae", root, cfg, max_steps=3, log=lambda m: None)
    other = config_from_dict({**SETTINGS, "dvae": {**SETTINGS["dvae"], "codebook_size": 64}})
    with pytest.raises(CheckpointMismatch, match="codebook_size"):
        launch("dvae", root, other, max_steps=6, log=lambda m: None)
    with pytest.raises(CheckpointMismatch, match="already has checkpoints up to step 3"):
        launch("dvae", root, cfg, max_steps=6, resume=False, log=lambda m: None)
    assert storage.read_json(latest_pointer("dvae"))["step"] == 3


def test_tokenize_is_incremental_and_never_mixes_dvaes(tmp_path):
    root = str(tmp_path / "run")
    storage, cfg = make_run(root)
    launch("dvae", root, cfg, max_steps=3, log=lambda m: None)
    first = tokenize_stage(storage, cfg, *load_dvae(storage), log=lambda m: None)
    assert (first["shards"], first["rows"]) == (2, 48)
    before = {s["path"]: s["sha256"] for s in storage.read_json(SHARDS_MANIFEST)["shards"]}

    # A crash left a shard file the manifest does not list: it is removed, not trusted.
    storage.write_bytes("shards/00009.parquet", b"partial")
    # New curated data becomes new shards; finished shards are not rewritten.
    write_curated(storage, 48, 20, 1)
    second = tokenize_stage(storage, cfg, *load_dvae(storage), log=lambda m: None)
    assert (second["rows"], second["new_rows"]) == (68, 20)
    after = {s["path"]: s["sha256"] for s in storage.read_json(SHARDS_MANIFEST)["shards"]}
    assert all(after[path] == digest for path, digest in before.items())
    assert not storage.exists("shards/00009.parquet")
    uids = [u for s in after for u in storage.read_table(s, columns=["uid"]).column("uid").to_pylist()]
    assert len(uids) == len(set(uids)) == 68

    # Another dVAE must not add codes to these shards.
    launch("dvae", root, cfg, max_steps=6, log=lambda m: None)
    with pytest.raises(ShardsMismatch, match="codes of two dVAEs must never be mixed"):
        tokenize_stage(storage, cfg, *load_dvae(storage), log=lambda m: None)
    assert {s["path"]: s["sha256"] for s in storage.read_json(SHARDS_MANIFEST)["shards"]} == after


def test_commands_need_what_comes_before_them(tmp_path):
    storage = Storage(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="pass --config"):
        run_config(storage)
    cfg = run_config(storage, SETTINGS)
    with pytest.raises(FileNotFoundError, match="run `dalle train dvae` first"):
        load_dvae(storage)
    with pytest.raises(ShardError, match="run `dalle curate` first"):
        launch("dvae", storage.uri(), cfg)
    with pytest.raises(ShardError, match="no _manifest.json under .* run `dalle tokenize` first"):
        launch("transformer", storage.uri(), cfg)
    assert storage.read_bytes("config.yaml").decode() == dump_config(cfg)


def test_mfu_needs_a_peak_and_a_cpu_has_none_unless_configured():
    cpu = torch.device("cpu")
    peak, why = peak_flops(TrainConfig(), cpu)
    assert peak is None and "peak_flops" in why
    assert peak_flops(TrainConfig(peak_flops=2e12), cpu)[0] == 2e12
    with pytest.raises(ConfigError, match="peak_flops"):
        config_from_dict({"train_transformer": {"peak_flops": 0}})


def test_learning_rate_schedules():
    cosine = TrainConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_factor(cosine, 0) == pytest.approx(0.1) and lr_factor(cosine, 9) == 1.0
    assert lr_factor(cosine, 60) == pytest.approx(0.55) and lr_factor(cosine, 110) == pytest.approx(0.1)
    step = TrainConfig(warmup_steps=0, schedule="step", step_every=100, step_gamma=0.5)
    assert [lr_factor(step, s) for s in (0, 99, 100, 250)] == [1.0, 1.0, 0.5, 0.25]


def test_an_s3_endpoint_that_fails_now_and_then_costs_retries_not_the_run(s3_bucket, flaky_s3):
    root = f"{s3_bucket}/flaky"
    storage, cfg = make_run(root)
    launch("dvae", root, cfg, max_steps=4, log=lambda m: None)
    summary = tokenize_stage(storage, cfg, *load_dvae(storage), log=lambda m: None)
    assert summary["rows"] == 48
    assert storage.read_json(latest_pointer("dvae"))["step"] == 4
    assert flaky_s3.failed >= 5, f"the proxy failed only {flaky_s3.failed} of {flaky_s3.requests} requests"


def test_a_missing_bucket_is_named_before_any_work(s3_endpoint):
    from dalle.storage import StorageError

    with pytest.raises(StorageError, match="check that the bucket exists"):
        run_config(Storage("s3://no-such-bucket-here/run"), SETTINGS)


def test_a_compiled_model_trains_like_the_eager_one_and_its_checkpoints_are_the_same_kind(
    tmp_path, monkeypatch
):
    import torch._inductor.config
    from torch._dynamo.utils import counters

    # Inductor draws random numbers (the dVAE's Gumbel noise) from its own generator unless told to
    # use eager's: with the same draws, the compiled steps must compute the eager ones.
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)

    def run(name: str, compiled: bool) -> tuple[list[float], dict, list[str]]:
        storage, cfg = make_run(str(tmp_path / name))
        tcfg = cfg.train_dvae.model_copy(update={"max_steps": 4, "checkpoint_every": 4, "compile": compiled})
        messages: list[str] = []
        train(DVAETraining(storage, cfg), storage, cfg, tcfg, log=messages.append)
        state, _ = load_model_state(storage, checkpoint_dir("dvae", 4))
        return [m["loss"] for m in metric_lines(storage, "dvae")], state, messages

    counters.clear()
    eager_losses, eager_state, eager_log = run("eager", False)
    assert not counters["stats"]["unique_graphs"]
    compiled_losses, compiled_state, compiled_log = run("compiled", True)
    assert counters["stats"]["unique_graphs"] >= 1, "torch.compile captured no graph"
    assert any("torch.compile" in m for m in compiled_log) and not any(
        "torch.compile" in m for m in eager_log
    )
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-3)
    assert compiled_state.keys() == eager_state.keys()  # no _orig_mod. prefixes: one kind of checkpoint
    for key, value in eager_state.items():
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-3, atol=1e-4)


def test_compiling_on_a_cpu_without_a_cxx_compiler_says_what_to_install(tmp_path, monkeypatch):
    storage, cfg = make_run(str(tmp_path / "run"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CXX", raising=False)
    tcfg = cfg.train_dvae.model_copy(update={"max_steps": 2, "compile": True})
    with pytest.raises(ConfigError, match="no C\\+\\+ compiler was found.*compile: false"):
        train(DVAETraining(storage, cfg), storage, cfg, tcfg, log=lambda m: None)
