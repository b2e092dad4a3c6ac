"""A model's weights on disk: model.safetensors plus model.json (its architecture and the weights'
sha256), as every checkpoint folder of a run holds them; and loading a dVAE or transformer back."""

from __future__ import annotations

import hashlib
from typing import Any

import safetensors.torch
import torch
from torch import nn

from dalle.config import DVAEConfig, TransformerConfig
from dalle.errors import UserError
from dalle.models.dvae import DiscreteVAE
from dalle.models.transformer import DalleTransformer
from dalle.runroot import (
    CHECKPOINT_META,
    CHECKPOINT_WEIGHTS,
    DVAE,
    MODELS_DIR,
    checkpoint_step,
    latest_checkpoint,
)
from dalle.storage import Storage


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint that cannot be resumed or loaded with the current configuration."""


def state_dict_bytes(state: dict[str, torch.Tensor]) -> bytes:
    # safetensors refuses shared storage and non-contiguous views; clone what it needs.
    return safetensors.torch.save({k: v.detach().contiguous().cpu().clone() for k, v in state.items()})


def save_model(storage: Storage, rel_dir: str, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Weights as safetensors, then model.json with the architecture and the weights' sha256."""
    data = state_dict_bytes(state)
    storage.write_bytes(f"{rel_dir}/{CHECKPOINT_WEIGHTS}", data)
    storage.write_json(
        f"{rel_dir}/{CHECKPOINT_META}", {**meta, "weights_sha256": hashlib.sha256(data).hexdigest()}
    )


def load_model_state(storage: Storage, rel_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and model.json of a checkpoint folder, checked against the recorded sha256."""
    if not storage.exists(f"{rel_dir}/{CHECKPOINT_META}"):
        raise CheckpointMismatch(
            f"{storage.uri(rel_dir)} has no {CHECKPOINT_META}: not a finished checkpoint"
        )
    meta = storage.read_json(f"{rel_dir}/{CHECKPOINT_META}")
    data = storage.read_bytes(f"{rel_dir}/{CHECKPOINT_WEIGHTS}")
    if hashlib.sha256(data).hexdigest() != meta.get("weights_sha256"):
        raise CheckpointMismatch(
            f"{storage.uri(rel_dir)}/{CHECKPOINT_WEIGHTS} does not match the sha256 in {CHECKPOINT_META}; "
            "the checkpoint is damaged"
        )
    return safetensors.torch.load(data), meta


def load_model(storage: Storage, rel_dir: str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """A dVAE or transformer from a checkpoint folder, in eval mode, with its model.json."""
    state, meta = load_model_state(storage, rel_dir)
    if meta.get("kind") == "dvae":
        model: nn.Module = DiscreteVAE(DVAEConfig.model_validate(meta["dvae"]))
    elif meta.get("kind") == "transformer":
        model = DalleTransformer(
            TransformerConfig.model_validate(meta["transformer"]),
            meta["text_vocab_size"],
            meta["image_vocab_size"],
            meta["image_grid"],
        )
    else:
        raise CheckpointMismatch(
            f"{storage.uri(rel_dir)} holds a {meta.get('kind')!r} model, not a dVAE or transformer"
        )
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def load_dvae(
    storage: Storage, checkpoint_rel: str | None = None, device: torch.device | str = "cpu"
) -> tuple[DiscreteVAE, dict]:
    """The dVAE at `checkpoint_rel` (default: the run's latest) and its identity for shard manifests:
    uri, step, weights_sha256, codebook_size, image_size."""
    if checkpoint_rel is None:
        latest = latest_checkpoint(storage, DVAE)
        if latest is None:
            raise FileNotFoundError(
                f"no trained dVAE under {storage.uri(f'{MODELS_DIR}/{DVAE}')}; run `dalle train dvae` first"
            )
        checkpoint_rel, step = latest.rel_dir, latest.step
    else:
        step = checkpoint_step(checkpoint_rel) if "step_" in checkpoint_rel else -1
    dvae, meta = load_model(storage, checkpoint_rel, device)
    if not isinstance(dvae, DiscreteVAE):
        raise CheckpointMismatch(f"{storage.uri(checkpoint_rel)} is not a dVAE checkpoint")
    identity = {
        "uri": storage.uri(checkpoint_rel),
        "step": step,
        "weights_sha256": meta["weights_sha256"],
        "codebook_size": dvae.cfg.codebook_size,
        "image_size": dvae.cfg.image_size,
    }
    return dvae, identity
