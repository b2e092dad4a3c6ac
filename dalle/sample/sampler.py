"""Everything sampling needs, bundled: a transformer checkpoint with the dVAE and tokenizer it was
trained with, and the run's CLIP for reranking.

    sampler = Sampler.from_checkpoint("runs/demo/models/transformer/step_00004000")
    samples = sampler.sample("a red square", SamplingSettings(num_samples=64, top=8))
"""

from __future__ import annotations

from dataclasses import dataclass

from dalle.config import RunConfig, with_changes
from dalle.devices import resolve_device
from dalle.models.clip import ClipModel, load_clip
from dalle.models.dvae import DiscreteVAE
from dalle.models.transformer import DalleTransformer
from dalle.models.weights import CheckpointMismatch, load_model, newest_intact
from dalle.runroot import CLIP, DVAE, CorruptCheckpoint, checkpoint_dir, run_config, split_checkpoint_uri
from dalle.sample.rerank import PromptSamples, SamplingSettings, samples_for
from dalle.storage import Storage
from dalle.tokens.bpe import TextTokenizer, load_tokenizer


def run_clip(storage: Storage, cfg: RunConfig) -> ClipModel | None:
    """The run's CLIP: the configured one, else the small CLIP trained in the run (its latest checkpoint,
    or the newest intact one, with a warning, when that is damaged), else None (no reranking)."""
    if cfg.clip.pretrained or cfg.clip.checkpoint:
        return load_clip(cfg.clip)

    def load(rel: str) -> ClipModel:
        if not storage.list(rel):
            raise CorruptCheckpoint(f"{storage.uri(rel)} is missing or empty")
        return load_clip(with_changes(cfg.clip, "clip", checkpoint=storage.uri(rel)))

    found = newest_intact(storage, CLIP, load)
    return found[2] if found is not None else None


@dataclass
class Sampler:
    """A transformer checkpoint, ready to sample: its dVAE and tokenizer, and the CLIP that reranks."""

    transformer: DalleTransformer
    dvae: DiscreteVAE
    tokenizer: TextTokenizer
    clip: ClipModel | None
    checkpoint: str  # the transformer checkpoint's URI

    @classmethod
    def from_checkpoint(cls, checkpoint: str, cfg: RunConfig | None = None) -> Sampler:
        """The sampler of a transformer checkpoint URI (ROOT/models/transformer/step_XXXXXXXX), on
        gallery.device of `cfg` (default: the run's own configuration)."""
        root, rel = split_checkpoint_uri(checkpoint)
        storage = Storage(root)
        return cls.from_run(storage, cfg if cfg is not None else run_config(storage), rel)

    @classmethod
    def from_run(cls, storage: Storage, cfg: RunConfig, checkpoint_rel: str) -> Sampler:
        """The sampler of the transformer checkpoint at `checkpoint_rel` inside the run root `storage`."""
        device = resolve_device(cfg.gallery.device, setting="gallery.device")
        transformer, meta = load_model(storage, checkpoint_rel, device)
        if not isinstance(transformer, DalleTransformer):
            raise CheckpointMismatch(f"{storage.uri(checkpoint_rel)} is not a transformer checkpoint")
        dvae, _ = load_model(storage, checkpoint_dir(DVAE, int(meta["dvae"]["step"])), device)
        tokenizer = load_tokenizer(storage, cfg.tokenizer)
        if tokenizer.identity != meta["tokenizer"]:
            raise CheckpointMismatch(
                f"{storage.uri(checkpoint_rel)} was trained with tokenizer {meta['tokenizer']}, "
                f"the run's is {tokenizer.identity}; sample it from its own run root"
            )
        return cls(transformer, dvae, tokenizer, run_clip(storage, cfg), storage.uri(checkpoint_rel))

    def sample(self, prompt: str, settings: SamplingSettings) -> PromptSamples:
        """settings.num_samples images for `prompt`, each scored by the CLIP (best first in `ranking`)."""
        return samples_for(prompt, self.transformer, self.dvae, self.tokenizer, self.clip, settings)
