"""A model's weights on disk: model.safetensors plus model.json (its architecture and the sha256 of the
weights and of the folder's other files), as every checkpoint folder of a run holds them; loading a
dVAE or transformer back; and finding the newest intact checkpoint when the latest is damaged."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import safetensors.torch
import torch
from torch import nn

from dalle.config import DVAEConfig, TransformerConfig
from dalle.models.dvae import DiscreteVAE
from dalle.models.transformer import DalleTransformer
from dalle.runroot import (
    CHECKPOINT_META,
    CHECKPOINT_WEIGHTS,
    DVAE,
    MODELS_DIR,
    CheckpointMismatch,
    CorruptCheckpoint,
    checkpoint_dir,
    checkpoint_step,
    checkpoint_steps,
    latest_checkpoint,
    latest_pointer,
)
from dalle.storage import Storage, StorageError

FILES_SHA256 = "files_sha256"  # in model.json: {file name: sha256} of the folder's other files
HASH_KEYS = ("weights_sha256", FILES_SHA256)  # the keys of model.json that are not the architecture

T = TypeVar("T")
_log = logging.getLogger(__name__)


def state_dict_bytes(state: dict[str, torch.Tensor]) -> bytes:
    # safetensors refuses shared storage and non-contiguous views; clone what it needs.
    return safetensors.torch.save({k: v.detach().contiguous().cpu().clone() for k, v in state.items()})


def save_model(
    storage: Storage,
    rel_dir: str,
    state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    files: dict[str, bytes] | None = None,
) -> None:
    """Weights as safetensors and the folder's other `files` (name: content), then model.json last with
    the architecture and the sha256 of each: the folder is complete when model.json exists."""
    data = state_dict_bytes(state)
    storage.write_bytes(f"{rel_dir}/{CHECKPOINT_WEIGHTS}", data)
    hashes = {}
    for name, content in (files or {}).items():
        storage.write_bytes(f"{rel_dir}/{name}", content)
        hashes[name] = hashlib.sha256(content).hexdigest()
    storage.write_json(
        f"{rel_dir}/{CHECKPOINT_META}",
        {
            **meta,
            "weights_sha256": hashlib.sha256(data).hexdigest(),
            **({FILES_SHA256: hashes} if files else {}),
        },
    )


def read_model_meta(storage: Storage, rel_dir: str) -> dict[str, Any]:
    """model.json of a checkpoint folder; CorruptCheckpoint when it is missing or not a JSON object."""
    rel = f"{rel_dir}/{CHECKPOINT_META}"
    if not storage.exists(rel):
        raise CorruptCheckpoint(f"{storage.uri(rel_dir)} has no {CHECKPOINT_META}: not a finished checkpoint")
    try:
        meta = storage.read_json(rel)
    except (ValueError, StorageError) as err:
        raise CorruptCheckpoint(
            f"{storage.uri(rel)} is damaged: {type(err).__name__}: {str(err)[:80]}"
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("weights_sha256"), str):
        raise CorruptCheckpoint(f"{storage.uri(rel)} is damaged: no weights_sha256")
    return meta


def read_checked(storage: Storage, rel_dir: str, name: str, sha256: str | None) -> bytes:
    """File `name` of a checkpoint folder, checked against `sha256` (None: checkpoints of older
    releases recorded none); CorruptCheckpoint when it is missing or changed."""
    try:
        data = storage.read_bytes(f"{rel_dir}/{name}")
    except StorageError:
        raise CorruptCheckpoint(
            f"{storage.uri(rel_dir)} has no {name}: the checkpoint is incomplete"
        ) from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CorruptCheckpoint(
            f"{storage.uri(rel_dir)}/{name} does not match the sha256 in {CHECKPOINT_META}; "
            "the checkpoint is damaged (truncated or changed since it was written)"
        )
    return data


def load_model_state(storage: Storage, rel_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and model.json of a checkpoint folder, checked against the recorded sha256;
    CorruptCheckpoint when either is missing, truncated or changed."""
    meta = read_model_meta(storage, rel_dir)
    data = read_checked(storage, rel_dir, CHECKPOINT_WEIGHTS, meta["weights_sha256"])
    try:
        return safetensors.torch.load(data), meta
    except Exception as err:  # noqa: BLE001  (the recorded sha256 was of these bytes: written damaged)
        raise CorruptCheckpoint(
            f"{storage.uri(rel_dir)}/{CHECKPOINT_WEIGHTS} cannot be read: {type(err).__name__}"
        ) from None


def newest_intact(
    storage: Storage, model: str, load: Callable[[str], T], warn: Callable[[str], None] | None = None
) -> tuple[int, str, T] | None:
    """(step, folder, load(folder)) of the checkpoint latest.json names or, when that one is missing or
    damaged (`load` raises CorruptCheckpoint) or latest.json itself is, of the newest earlier checkpoint
    that loads, after `warn` names each damaged one (nothing is deleted). None when `model` has no
    latest.json; CorruptCheckpoint, naming what is wrong with each, when none loads. Any other error
    of `load` (a checkpoint of another configuration) is raised as it is: no fall-back."""
    warn = warn or _log.warning
    pointer = latest_pointer(model)
    if not storage.exists(pointer):
        return None
    problems: list[str] = []
    try:
        latest = latest_checkpoint(storage, model)
        newest = latest.step if latest is not None else None
    except CorruptCheckpoint as err:
        problems.append(str(err))
        warn(f"{model}: {err}; looking for the newest intact checkpoint")
        newest = None
    steps = [s for s in checkpoint_steps(storage, model) if newest is None or s < newest]
    candidates = ([newest] if newest is not None else []) + sorted(steps, reverse=True)
    for step in candidates:
        rel = checkpoint_dir(model, step)
        try:
            loaded = load(rel)
        except CorruptCheckpoint as err:
            problems.append(str(err))
            warn(f"{model}: checkpoint at step {step} is damaged and is skipped (not deleted): {err}")
            continue
        if problems:
            warn(f"{model}: using the newest intact checkpoint, step {step} ({storage.uri(rel)})")
        return step, rel, loaded
    if not candidates:
        problems.append(f"{storage.uri(pointer)} names step {newest}, and there is no checkpoint folder")
    raise CorruptCheckpoint(
        f"no intact {model} checkpoint under {storage.uri(f'{MODELS_DIR}/{model}')}: {'; '.join(problems)}; "
        f"move the folder aside (or delete {latest_pointer(model)}) to train from scratch"
    )


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
    storage: Storage,
    checkpoint_rel: str | None = None,
    device: torch.device | str = "cpu",
    warn: Callable[[str], None] | None = None,
) -> tuple[DiscreteVAE, dict]:
    """The dVAE at `checkpoint_rel` (default: the run's latest, or the newest intact one after `warn`
    when that is damaged; an explicit damaged one is an error) and its identity for shard manifests:
    uri, step, weights_sha256, codebook_size, image_size."""
    if checkpoint_rel is None:
        found = newest_intact(storage, DVAE, lambda rel: load_model(storage, rel, device), warn)
        if found is None:
            raise FileNotFoundError(
                f"no trained dVAE under {storage.uri(f'{MODELS_DIR}/{DVAE}')}; run `dalle train dvae` first"
            )
        step, checkpoint_rel, (dvae, meta) = found
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
