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

import yaml

from dalle.config import ConfigError, RunConfig, TrainConfig, config_from_dict, dump_config, load_config
from dalle.storage import Storage
from dalle.train.checkpoint import latest_checkpoint
from dalle.train.loop import train
from dalle.train.tasks import DVAE, TRANSFORMER, DVAETask, TransformerTask

RUN_CONFIG = "config.yaml"
MODELS = {"dvae": DVAE, "transformer": TRANSFORMER}


def run_config(storage: Storage, config: str | dict | None = None) -> RunConfig:
    """The configuration for a command on `storage`: the given one (a YAML path or a mapping), then saved
    as the run's config.yaml; without one, the run's own config.yaml."""
    if config is not None:
        cfg = load_config(config) if isinstance(config, str) else config_from_dict(config)
        storage.check_writable()  # a missing bucket is named here, before any work
        storage.write_bytes(RUN_CONFIG, dump_config(cfg).encode())
        return cfg
    if not storage.exists(RUN_CONFIG):
        raise ConfigError(
            f"{storage.uri()} has no {RUN_CONFIG} (not a run root yet); pass --config YAML, e.g. configs/demo.yaml"
        )
    data = yaml.safe_load(storage.read_bytes(RUN_CONFIG))
    return config_from_dict(data, origin=storage.uri(RUN_CONFIG))


def train_config(model: str, cfg: RunConfig, max_steps: int | None = None) -> TrainConfig:
    section = {"dvae": cfg.train_dvae, "transformer": cfg.train_transformer}[model]
    return section.model_copy(update={"max_steps": max_steps}) if max_steps is not None else section


def make_task(model: str, storage: Storage, cfg: RunConfig):
    if model == "dvae":
        return DVAETask(storage, cfg)
    if model == "transformer":
        return TransformerTask(storage, cfg)
    raise ValueError(f"unknown model {model!r}; choose one of {sorted(MODELS)}")


def train_clip(
    root: str, cfg: RunConfig, max_steps: int | None = None, log: Callable[[str], None] = print
) -> str:
    """Train the small CLIP of clip.train on the curated pairs; returns the checkpoint's URI."""
    import io

    from PIL import Image

    from dalle.models.clip import save_clip, train_small_clip
    from dalle.storage import CURATED, checkpoint_dir, latest_pointer

    storage = Storage(root)
    table = (
        storage.read_tables(CURATED, columns=["image", "caption"])
        if storage.exists(f"{CURATED}/_manifest.json")
        else None
    )
    if table is None:
        raise FileNotFoundError(f"no curated pairs under {storage.uri(CURATED)}; run `dalle curate` first")
    images = table.column("image").to_pylist()
    clip_cfg = (
        cfg.clip.train if max_steps is None else cfg.clip.train.model_copy(update={"max_steps": max_steps})
    )
    model = train_small_clip(
        lambda i: Image.open(io.BytesIO(images[i])).convert("RGB"),
        table.column("caption").to_pylist(),
        clip_cfg,
        device=cfg.clip.device,
        log=lambda step, loss: log(f"clip step {step} loss {loss:.3f}") if step % 50 == 0 else None,
    )
    uri = save_clip(model, storage, checkpoint_dir("clip", clip_cfg.max_steps))
    storage.write_json(latest_pointer("clip"), {"step": clip_cfg.max_steps, "uri": uri})
    return uri


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


def run_training(
    model: str,
    root: str,
    cfg: RunConfig,
    max_steps: int | None = None,
    resume: bool = True,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """Train `model` ('dvae' or 'transformer') in the run root; returns the newest checkpoint's URI.

    With train_<model>.nproc > 1 (and not already under torchrun) it launches torchrun and
    waits; the run root's config.yaml must then be the configuration to use.
    """
    storage = Storage(root)
    tcfg = train_config(model, cfg, max_steps)
    if tcfg.nproc > 1 and "WORLD_SIZE" not in os.environ:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // tcfg.nproc)))
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one node: the processes meet on loopback
        result = subprocess.run(
            torchrun_command(model, root, tcfg.nproc, max_steps, resume), env=env, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"torchrun training of the {model} exited with status {result.returncode}")
        latest = latest_checkpoint(storage, MODELS[model])
        return latest.uri if latest else ""
    return train(make_task(model, storage, cfg), storage, cfg, tcfg, resume, on_checkpoint, log)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dalle.train", description="Train one model of a run root."
    )
    parser.add_argument("model", choices=sorted(MODELS))
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
    print(run_training(args.model, args.out, cfg, args.max_steps, args.resume))


if __name__ == "__main__":
    main()
