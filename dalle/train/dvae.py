"""What training the dVAE needs on top of the shared loop: the model, the curated images, the loss."""

from __future__ import annotations

from typing import Any

from torch import nn

from dalle.config import RunConfig
from dalle.models.dvae import DiscreteVAE, codebook_usage
from dalle.runroot import CURATED_DIR, DVAE
from dalle.storage import Storage
from dalle.tokens.loader import ImageBatch, ShardDataset


def _linear_and_conv_weights(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            is_weight = name == "weight" and isinstance(module, (nn.Linear, nn.Conv2d))
            (decay if is_weight else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class DVAETraining:
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
            self.storage.uri(), CURATED_DIR, decode, batch_size, seed, start_batch, rank, world_size
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

    def after_step(self, model) -> None:
        pass
