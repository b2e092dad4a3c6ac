"""What each model's training needs on top of the shared loop: model, data, loss, architecture."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dalle.config import RunConfig
from dalle.data.loader import ImageBatch, ShardDataset, TokenBatch
from dalle.data.text_tokenizer import load_tokenizer
from dalle.models.dvae import DiscreteVAE, codebook_usage
from dalle.models.transformer import DalleTransformer
from dalle.storage import CURATED, MANIFEST, SHARDS, Storage

DVAE = "dvae"
TRANSFORMER = "dalle"


def _linear_and_conv_weights(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            is_weight = name == "weight" and isinstance(module, (nn.Linear, nn.Conv2d))
            (decay if is_weight else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class DVAETask:
    """The dVAE on the curated images."""

    name = DVAE
    tokens_per_sample = 1

    def __init__(self, storage: Storage, cfg: RunConfig):
        self.storage, self.cfg = storage, cfg

    def build_model(self) -> nn.Module:
        return DiscreteVAE(self.cfg.dvae)

    def model_meta(self) -> dict[str, Any]:
        return {"kind": "dvae", "dvae": self.cfg.dvae.model_dump(mode="json")}

    def dataset(self, batch_size, seed, start_batch, rank, world_size) -> ShardDataset:
        decode = ImageBatch(self.cfg.dvae.image_size)
        return ShardDataset(
            self.storage.uri(), CURATED, decode, batch_size, seed, start_batch, rank, world_size
        )

    def loss(self, model, batch, step):
        out = model(batch["images"], step)
        return out.loss, {
            "reconstruction": out.reconstruction,
            "kl": out.kl,
            "kl_weight": out.kl_weight,
            "usage_kl": out.usage_kl,
            "temperature": out.temperature,
            **codebook_usage(out.codes, self.cfg.dvae.codebook_size),
        }

    def optimizer_groups(self, model, weight_decay):
        return _linear_and_conv_weights(model, weight_decay)


class TransformerTask:
    """The transformer on the token shards; its vocabularies come from the tokenizer and the shards' dVAE."""

    name = TRANSFORMER

    def __init__(self, storage: Storage, cfg: RunConfig):
        self.storage, self.cfg = storage, cfg
        manifest_rel = f"{SHARDS}/{MANIFEST}"
        if not storage.exists(manifest_rel):
            raise FileNotFoundError(
                f"no token shards under {storage.uri(SHARDS)}; run `dalle tokenize` first"
            )
        self.manifest = storage.read_json(manifest_rel)
        self.tokenizer = load_tokenizer(storage, cfg.tokenizer)
        if self.manifest.get("tokenizer") != self.tokenizer.identity:
            raise ValueError(
                f"{storage.uri(manifest_rel)} was tokenized with {self.manifest.get('tokenizer')}, but the run's "
                f"tokenizer is {self.tokenizer.identity}; re-run `dalle tokenize` into a fresh shards folder"
            )
        self.grid = int(self.manifest["grid"])
        self.codebook_size = int(self.manifest["codebook_size"])
        self.tokens_per_sample = cfg.transformer.text_seq_len + self.grid * self.grid

    def build_model(self) -> nn.Module:
        return DalleTransformer(
            self.cfg.transformer, self.tokenizer.vocab_size, self.codebook_size, self.grid
        )

    def model_meta(self) -> dict[str, Any]:
        return {
            "kind": "transformer",
            "transformer": self.cfg.transformer.model_dump(mode="json"),
            "text_vocab_size": self.tokenizer.vocab_size,
            "tokenizer": self.tokenizer.identity,
            "image_vocab_size": self.codebook_size,
            "image_grid": self.grid,
            "dvae": self.manifest["dvae"],
        }

    def dataset(self, batch_size, seed, start_batch, rank, world_size) -> ShardDataset:
        decode = TokenBatch(self.cfg.transformer.text_seq_len)
        return ShardDataset(
            self.storage.uri(), SHARDS, decode, batch_size, seed, start_batch, rank, world_size
        )

    def loss(self, model, batch, step):
        out = model(batch["text_tokens"], batch["image_codes"])
        return out.loss, {"text_loss": out.text_loss, "image_loss": out.image_loss}

    def optimizer_groups(self, model, weight_decay):
        return model.optimizer_groups(weight_decay)


def load_trained(
    storage: Storage, rel_dir: str, device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict]:
    """A dVAE or transformer from a checkpoint folder, in eval mode, with its model.json."""
    from dalle.config import DVAEConfig, TransformerConfig
    from dalle.train.checkpoint import load_model_state

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
        raise ValueError(
            f"{storage.uri(rel_dir)} holds a {meta.get('kind')!r} model, not a dVAE or transformer"
        )
    model.load_state_dict(state)
    return model.to(device).eval(), meta
