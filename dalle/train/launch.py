"""Starting a training run: alone in this process, or as `torchrun --nproc_per_node=N` children.

Children read the run's configuration from {root}/config.yaml (a run root keeps the
configuration it was made with), so the command line and the flows only pass the root,
the model and the step target.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from dalle.config import ConfigError, RunConfig, TrainConfig, load_config, with_changes
from dalle.models.clip import CONFIG_FILE as CLIP_FOLDER_CONFIG
from dalle.processes import run_watched
from dalle.runroot import (
    CHECKPOINT_META,
    CLIP,
    DVAE,
    MODEL_NAMES,
    TRANSFORMER,
    CorruptCheckpoint,
    checkpoint_steps,
    latest_checkpoint,
    run_config,
)
from dalle.storage import Storage
from dalle.train.clip import ClipTraining
from dalle.train.dvae import DVAETraining
from dalle.train.loop import ModelTraining, train
from dalle.train.sinks import check_available
from dalle.train.transformer import TransformerTraining

_TRAININGS = {CLIP: ClipTraining, DVAE: DVAETraining, TRANSFORMER: TransformerTraining}


def training_settings(model: str, cfg: RunConfig, max_steps: int | None = None) -> TrainConfig:
    """The train_<model> section of `cfg`, with max_steps replaced when given and nproc 'auto'
    resolved to the number of GPUs here (1 without one)."""
    section: TrainConfig = getattr(cfg, f"train_{model}")
    update: dict[str, Any] = {}
    if max_steps is not None:
        update["max_steps"] = max_steps
    if section.nproc == "auto":
        import torch

        update["nproc"] = max(1, torch.cuda.device_count())
    return with_changes(section, f"the train_{model} settings asked for", **update) if update else section


def step_target(storage: Storage, model: str, max_steps: int | None, more_steps: int | None) -> int | None:
    """The step total to train to: `max_steps`, or `more_steps` past the newest checkpoint (None: the
    config's max_steps)."""
    if more_steps is None:
        return max_steps
    if max_steps is not None:
        raise ConfigError("give max_steps (a total) or more_steps (past the newest checkpoint), not both")
    if more_steps < 1:
        raise ConfigError(f"more_steps must be at least 1, got {more_steps}")
    try:
        latest = latest_checkpoint(storage, model)
        newest = latest.step if latest else 0
    except CorruptCheckpoint:  # training falls back to the newest intact one and says so
        newest = max(checkpoint_steps(storage, model), default=0)
    return newest + more_steps


def model_training(model: str, storage: Storage, cfg: RunConfig) -> ModelTraining:
    if model not in _TRAININGS:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(MODEL_NAMES)}")
    return _TRAININGS[model](storage, cfg)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(
    model: str, root: str, tcfg: TrainConfig, max_steps: int | None, resume: bool
) -> list[str]:
    """The torchrun command line for this node's tcfg.nproc processes: alone, the node's processes meet
    on a free loopback port; with tcfg.nnodes > 1, every node meets at tcfg.rdzv_endpoint."""
    if tcfg.nnodes > 1:
        meeting = [f"--rdzv-endpoint={tcfg.rdzv_endpoint}", f"--rdzv-id={tcfg.rdzv_id}"]
        if tcfg.node_addr:
            meeting.append(f"--local-addr={tcfg.node_addr}")
    else:
        meeting = [f"--rdzv-endpoint=127.0.0.1:{_free_port()}"]
    command = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={tcfg.nnodes}", f"--nproc_per_node={tcfg.nproc}", "--rdzv-backend=c10d", *meeting,
        "-m", "dalle.train", model, "--out", root,
    ]  # fmt: skip
    if max_steps is not None:
        command += ["--max-steps", str(max_steps)]
    if not resume:
        command.append("--no-resume")
    return command


def launch(
    model: str,
    root: str,
    cfg: RunConfig,
    max_steps: int | None = None,
    resume: bool = True,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = print,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
) -> str:
    """Train `model` (clip, dvae or transformer) in the run root; returns the newest checkpoint's URI.

    With train_<model>.nproc > 1 (and not already under torchrun) it launches torchrun and
    waits; the run root's config.yaml must then be the configuration to use.
    """
    storage = Storage(root)
    tcfg = training_settings(model, cfg, max_steps)
    # A damaged latest.json reads as None: the training below falls back to the newest intact checkpoint.
    latest = latest_checkpoint(storage, model, damaged_as_none=True)
    if (
        latest is not None
        and model == CLIP
        and not storage.exists(f"{latest.rel_dir}/{CHECKPOINT_META}")
        and storage.exists(f"{latest.rel_dir}/{CLIP_FOLDER_CONFIG}")
    ):
        # A CLIP an older release trained outside the loop: usable, but it cannot be resumed.
        log(f"{model}: {latest.uri} was trained by an older release and is kept as it is")
        return latest.uri
    if (tcfg.nproc > 1 or tcfg.nnodes > 1) and "WORLD_SIZE" not in os.environ:
        check_available(cfg.dashboards)  # one clear line here, not a child's exit status
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // tcfg.nproc)))
        if tcfg.nnodes == 1:
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one node: the processes meet on loopback
        # The children's output (rank 0's progress lines) goes to `log`; interrupted (Ctrl-C, a flow's
        # time limit), torchrun and every rank are stopped.
        returncode, _ = run_watched(torchrun_command(model, root, tcfg, max_steps, resume), log, env=env)
        if returncode != 0:
            raise RuntimeError(f"torchrun training of the {model} exited with status {returncode}")
        latest = latest_checkpoint(storage, model)
        return latest.uri if latest else ""
    return train(
        model_training(model, storage, cfg), storage, cfg, tcfg, resume, on_checkpoint, log, on_metrics
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dalle.train", description="Train one model of a run root."
    )
    parser.add_argument("model", choices=MODEL_NAMES)
    parser.add_argument("--out", required=True, help="run root (folder or s3://bucket/prefix)")
    parser.add_argument("--config", help="YAML configuration (default: the run root's config.yaml)")
    parser.add_argument("--max-steps", type=int, help="total optimizer steps to reach (at least 1)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    storage = Storage(args.out)
    # Under torchrun only rank 0 saves a given --config as the run's; the others just read it.
    if args.config and int(os.environ.get("RANK", "0")) != 0:
        cfg = load_config(args.config)
    else:
        cfg = run_config(storage, args.config)
    print(launch(args.model, args.out, cfg, args.max_steps, args.resume))


if __name__ == "__main__":
    main()
