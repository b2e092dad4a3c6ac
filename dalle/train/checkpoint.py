"""The training half of a checkpoint: models/<name>/step_XXXXXXXX/train_state.pt, local or S3.

A checkpoint folder holds the model weights (safetensors) with their architecture, the
training state (optimizer, scheduler, step, data position, every rank's RNG state) and
the run configuration. Each file is written atomically, model.json (with the sha256 of
every other file) after them and `latest.json` last, so a run killed at any moment resumes
from the newest complete checkpoint; a damaged one is skipped for the one before it
(dalle.models.weights.newest_intact). Everything loads with `weights_only=True`: no pickled
code runs on load.
"""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import torch

from dalle.models.weights import FILES_SHA256, read_checked, read_model_meta
from dalle.runroot import CHECKPOINT_TRAIN_STATE, CorruptCheckpoint
from dalle.storage import Storage

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


def train_state_bytes(state: dict[str, Any]) -> bytes:
    """What resuming needs beyond the weights: optimizer, scheduler, step, data position, RNGs."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save_train_state(storage: Storage, rel_dir: str, state: dict[str, Any]) -> None:
    storage.write_bytes(f"{rel_dir}/{CHECKPOINT_TRAIN_STATE}", train_state_bytes(state))


def load_train_state(storage: Storage, rel_dir: str) -> dict[str, Any]:
    """The training state of a checkpoint folder, checked against the sha256 in model.json (when the
    release that wrote it recorded one); CorruptCheckpoint when it is missing, truncated or changed."""
    meta = read_model_meta(storage, rel_dir)
    sha256 = (meta.get(FILES_SHA256) or {}).get(CHECKPOINT_TRAIN_STATE)
    data = read_checked(storage, rel_dir, CHECKPOINT_TRAIN_STATE, sha256)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (truncated or garbled: older releases recorded no sha256)
        raise CorruptCheckpoint(
            f"{storage.uri(rel_dir)}/{CHECKPOINT_TRAIN_STATE} cannot be read ({type(err).__name__}); "
            "the checkpoint is damaged"
        ) from None
