"""Starting a training run: alone in this process, or as `torchrun --nproc_per_node=N` children.

Children read the run's configuration from {root}/config.yaml (a run root keeps the
configuration it was made with), so the command line and the flows only pass the root,
the model and the step target.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from dalle.config import RunConfig, TrainConfig, load_config
from dalle.runroot import CHECKPOINT_META, CLIP, DVAE, MODEL_NAMES, TRANSFORMER, latest_checkpoint, run_config
from dalle.storage import Storage
from dalle.train.clip import ClipTraining
from dalle.train.dvae import DVAETraining
from dalle.train.loop import ModelTraining, train
from dalle.train.transformer import TransformerTraining

_TRAININGS = {CLIP: ClipTraining, DVAE: DVAETraining, TRANSFORMER: TransformerTraining}


def training_settings(model: str, cfg: RunConfig, max_steps: int | None = None) -> TrainConfig:
    """The train_<model> section of `cfg`, with max_steps replaced when given."""
    section: TrainConfig = getattr(cfg, f"train_{model}")
    return section.model_copy(update={"max_steps": max_steps}) if max_steps is not None else section


def model_training(model: str, storage: Storage, cfg: RunConfig) -> ModelTraining:
    if model not in _TRAININGS:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(MODEL_NAMES)}")
    return _TRAININGS[model](storage, cfg)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(model: str, root: str, nproc: int, max_steps: int | None, resume: bool) -> list[str]:
    """The torchrun command line for one node with `nproc` processes (rendezvous on loopback)."""
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=1", f"--nproc_per_node={nproc}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
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
) -> str:
    """Train `model` (clip, dvae or transformer) in the run root; returns the newest checkpoint's URI.

    With train_<model>.nproc > 1 (and not already under torchrun) it launches torchrun and
    waits; the run root's config.yaml must then be the configuration to use.
    """
    storage = Storage(root)
    tcfg = training_settings(model, cfg, max_steps)
    latest = latest_checkpoint(storage, model)
    if latest is not None and not storage.exists(f"{latest.rel_dir}/{CHECKPOINT_META}"):
        # A CLIP an older release trained outside the loop: usable, but it cannot be resumed.
        log(f"{model}: {latest.uri} was trained by an older release and is kept as it is")
        return latest.uri
    if tcfg.nproc > 1 and "WORLD_SIZE" not in os.environ:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // tcfg.nproc)))
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one node: the processes meet on loopback
        result = subprocess.run(
            torchrun_command(model, root, tcfg.nproc, max_steps, resume), env=env, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"torchrun training of the {model} exited with status {result.returncode}")
        latest = latest_checkpoint(storage, model)
        return latest.uri if latest else ""
    return train(model_training(model, storage, cfg), storage, cfg, tcfg, resume, on_checkpoint, log)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dalle.train", description="Train one model of a run root."
    )
    parser.add_argument("model", choices=MODEL_NAMES)
    parser.add_argument("--out", required=True, help="run root (folder or s3://bucket/prefix)")
    parser.add_argument("--config", help="YAML configuration (default: the run root's config.yaml)")
    parser.add_argument("--max-steps", type=int, help="total optimizer steps to reach")
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
