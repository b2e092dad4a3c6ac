"""What training the transformer needs on top of the shared loop: the model sized by the run's
tokenizer and the shards' dVAE, the token shards, the loss."""

from __future__ import annotations

from typing import Any

from torch import nn

from dalle.config import RunConfig
from dalle.models.transformer import DalleTransformer
from dalle.runroot import SHARDS_DIR, SHARDS_MANIFEST, TRANSFORMER
from dalle.storage import Storage
from dalle.tokens.bpe import load_tokenizer
from dalle.tokens.loader import ShardDataset, TokenBatch, read_manifest
from dalle.tokens.shards import ShardsMismatch


class TransformerTraining:
    """The transformer on the token shards; its vocabularies come from the tokenizer and the shards' dVAE."""

    name = TRANSFORMER

    def __init__(self, storage: Storage, cfg: RunConfig):
        self.storage, self.cfg = storage, cfg
        manifest_rel = SHARDS_MANIFEST
        self.manifest = read_manifest(storage, SHARDS_DIR)
        self.tokenizer = load_tokenizer(storage, cfg.tokenizer)
        if self.manifest.get("tokenizer") != self.tokenizer.identity:
            raise ShardsMismatch(
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
            self.storage.uri(), SHARDS_DIR, decode, batch_size, seed, start_batch, rank, world_size
        )

    def loss(self, model, batch, step):
        out = model(batch["text_tokens"], batch["image_codes"])
        return out.loss, {"text_loss": out.text_loss, "image_loss": out.image_loss}

    def optimizer_groups(self, model, weight_decay):
        return model.optimizer_groups(weight_decay)

    def after_step(self, model) -> None:
        pass
