"""Checkpoints: models/<name>/step_XXXXXXXX/ and models/<name>/latest.json, local or S3.

A checkpoint folder holds the model weights (safetensors) with their architecture, the
training state (optimizer, scheduler, step, data position, every rank's RNG state) and
the run configuration. Each file is written atomically and `latest.json` last, so a run
killed at any moment resumes from the newest complete checkpoint. Everything loads
with `weights_only=True`: no pickled code runs on load.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors.torch
import torch

from dalle.storage import MODELS, Storage, checkpoint_dir, checkpoint_step, latest_pointer

WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
TRAIN_STATE = "train_state.pt"
RUN_CONFIG = "config.yaml"


class CheckpointMismatch(ValueError):
    """A checkpoint that cannot be resumed or loaded with the current configuration."""


@dataclass
class Checkpoint:
    """A complete checkpoint found through latest.json."""

    step: int
    rel_dir: str
    uri: str


def checkpoint_steps(storage: Storage, name: str) -> list[int]:
    """Steps of every checkpoint folder of model `name`, published or not, ascending."""
    folders = storage.subfolders(f"{MODELS}/{name}")
    return sorted(checkpoint_step(folder) for folder in folders if folder.startswith("step_"))


def latest_checkpoint(storage: Storage, name: str) -> Checkpoint | None:
    """The checkpoint latest.json names, or None when the model has none yet."""
    pointer = latest_pointer(name)
    if not storage.exists(pointer):
        return None
    data = storage.read_json(pointer)
    step = int(data["step"])
    return Checkpoint(step=step, rel_dir=checkpoint_dir(name, step), uri=data["uri"])


def state_dict_bytes(state: dict[str, torch.Tensor]) -> bytes:
    # safetensors refuses shared storage and non-contiguous views; clone what it needs.
    return safetensors.torch.save({k: v.detach().contiguous().cpu().clone() for k, v in state.items()})


def save_model(storage: Storage, rel_dir: str, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Weights as safetensors, then model.json with the architecture and the weights' sha256."""
    data = state_dict_bytes(state)
    storage.write_bytes(f"{rel_dir}/{WEIGHTS}", data)
    storage.write_json(
        f"{rel_dir}/{MODEL_META}", {**meta, "weights_sha256": hashlib.sha256(data).hexdigest()}
    )


def load_model_state(storage: Storage, rel_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and model.json of a checkpoint folder, checked against the recorded sha256."""
    if not storage.exists(f"{rel_dir}/{MODEL_META}"):
        raise CheckpointMismatch(f"{storage.uri(rel_dir)} has no {MODEL_META}: not a finished checkpoint")
    meta = storage.read_json(f"{rel_dir}/{MODEL_META}")
    data = storage.read_bytes(f"{rel_dir}/{WEIGHTS}")
    if hashlib.sha256(data).hexdigest() != meta.get("weights_sha256"):
        raise CheckpointMismatch(
            f"{storage.uri(rel_dir)}/{WEIGHTS} does not match the sha256 in {MODEL_META}; the checkpoint is damaged"
        )
    return safetensors.torch.load(data), meta


def save_train_state(storage: Storage, rel_dir: str, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(f"{rel_dir}/{TRAIN_STATE}", buffer.getvalue())


def load_train_state(storage: Storage, rel_dir: str) -> dict[str, Any]:
    data = storage.read_bytes(f"{rel_dir}/{TRAIN_STATE}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def publish(storage: Storage, name: str, step: int) -> str:
    """Point latest.json at the checkpoint of `step` (the last write of a checkpoint)."""
    uri = storage.uri(checkpoint_dir(name, step))
    storage.write_json(latest_pointer(name), {"step": step, "uri": uri})
    return uri


# ----- random number generators ------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's RNG states, in types that load with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
