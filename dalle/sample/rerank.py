"""Images for prompts: sample codes from the transformer, decode them with the dVAE, rerank with CLIP.

The paper draws 512 samples per caption and keeps the ones CLIP scores best; `samples_for`
does the same at any count, in batches, and keeps every sample's score so that the gain of
reranking can be measured. A prompt that places one object relative to another ("... above ...")
is ranked by CLIP's score plus its relation margin, and one that names two objects with their
attributes ("a red circle and a blue square") by CLIP's score plus its binding margin
(dalle.sample.relations): what CLIP's pooled vector alone misses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import PIL.Image
import torch

from dalle.models.clip import ClipModel
from dalle.models.dvae import DiscreteVAE
from dalle.models.transformer import DalleTransformer
from dalle.sample.generate import generate
from dalle.sample.relations import binding_margins, parse_pairing, parse_relation, relation_margins
from dalle.tokens.bpe import TextTokenizer


@dataclass
class SamplingSettings:
    """How samples are drawn (the gallery's and `dalle sample`'s knobs)."""

    num_samples: int = 64
    top: int = 8
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cond_scale: float = 1.0
    batch_size: int = 64
    seed: int = 0
    relation_weight: float = 1.0
    binding_weight: float = 1.0

    def described(self) -> dict:
        """What decides the samples (not how they are batched), for reports next to the figures."""
        return {
            "samples_per_prompt": self.num_samples,
            "top": self.top,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "cond_scale": self.cond_scale,
            "seed": self.seed,
            "relation_weight": self.relation_weight,
            "binding_weight": self.binding_weight,
        }


def describe_sampling(described: dict) -> str:
    """`SamplingSettings.described()` as one line of text: "samples_per_prompt 64, top 8, ..."."""
    return ", ".join(f"{name} {value}" for name, value in described.items())


@dataclass
class PromptSamples:
    """Every sample drawn for one prompt, with CLIP's score of each; `ranking` is best first (by the
    score, plus relation_weight times the relation margin when the prompt states a spatial relation, or
    binding_weight times the binding margin when it names two objects with their attributes)."""

    prompt: str
    images: list[PIL.Image.Image]
    scores: np.ndarray  # (num_samples,) cosine similarity with the prompt
    ranking: list[int] = field(default_factory=list)
    relation_margins: np.ndarray | None = None  # (num_samples,) when the ranking used them
    binding_margins: np.ndarray | None = None  # (num_samples,) when the ranking used them


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """(B, 3, H, W) floats in [0, 1] -> RGB PIL images."""
    array = (
        (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    )
    return [PIL.Image.fromarray(a, "RGB") for a in array]


def encode_prompts(tokenizer: TextTokenizer, prompts: Sequence[str], text_seq_len: int) -> torch.Tensor:
    return torch.from_numpy(tokenizer.encode_batch(list(prompts), text_seq_len).astype(np.int64))


@torch.no_grad()
def decode_codes(dvae: DiscreteVAE, codes: torch.Tensor, batch_size: int = 64) -> list[PIL.Image.Image]:
    images: list[PIL.Image.Image] = []
    for start in range(0, len(codes), batch_size):
        images += to_pil(dvae.decode(codes[start : start + batch_size].to(next(dvae.parameters()).device)))
    return images


def samples_for(
    prompt: str,
    transformer: DalleTransformer,
    dvae: DiscreteVAE,
    tokenizer: TextTokenizer,
    clip: ClipModel | None,
    settings: SamplingSettings,
    prime_codes: torch.Tensor | None = None,
) -> PromptSamples:
    """`settings.num_samples` images for `prompt`, scored and ranked by `clip` (generation order without one)."""
    text = encode_prompts(tokenizer, [prompt], transformer.text_len)
    codes = []
    remaining, batch_index = settings.num_samples, 0
    while remaining > 0:
        count = min(remaining, settings.batch_size)
        codes.append(
            generate(
                transformer,
                text,
                num_images=count,
                temperature=settings.temperature,
                top_k=settings.top_k,
                top_p=settings.top_p,
                cond_scale=settings.cond_scale,
                seed=settings.seed + 1000 * batch_index,
                prime_codes=prime_codes,
            )
        )
        remaining -= count
        batch_index += 1
    images = decode_codes(dvae, torch.cat(codes))
    if clip is None:
        return PromptSamples(
            prompt, images, np.zeros(len(images), dtype=np.float32), list(range(len(images)))
        )
    ranked = rerank_key(clip, images, prompt, settings.relation_weight, settings.binding_weight)
    ranking = [int(i) for i in np.argsort(-ranked.key, kind="stable")]
    return PromptSamples(
        prompt, images, ranked.scores, ranking, ranked.relation_margins, ranked.binding_margins
    )


class RerankKey(NamedTuple):
    """What reranking sorts one prompt's images by (`key`, best highest) and what it is made of."""

    key: np.ndarray  # scores, plus the weighted margin of the prompt's kind
    scores: np.ndarray  # CLIP's cosine of each image with the prompt
    # Each the margin of one kind of prompt, None for other prompts or when its weight is 0:
    relation_margins: np.ndarray | None  # a spatial relation
    binding_margins: np.ndarray | None  # two objects with their attributes


def rerank_key(
    clip: ClipModel,
    images: Sequence[PIL.Image.Image],
    prompt: str,
    relation_weight: float,
    binding_weight: float,
) -> RerankKey:
    """What reranking sorts `images` by for `prompt`: CLIP's score, plus relation_weight times the
    relation margin when the prompt states a spatial relation, or binding_weight times the binding
    margin when it names two objects with their attributes (a prompt is at most one of the two)."""
    scores = (clip.encode_images(images) @ clip.encode_texts([prompt])[0] if images else np.zeros(0)).astype(
        np.float32
    )
    relation = parse_relation(prompt) if relation_weight else None
    if relation is not None:
        margins = relation_margins(clip, images, relation)
        return RerankKey(scores + relation_weight * margins, scores, margins, None)
    pairing = parse_pairing(prompt) if binding_weight else None
    if pairing is not None:
        margins = binding_margins(clip, images, pairing)
        return RerankKey(scores + binding_weight * margins, scores, None, margins)
    return RerankKey(scores, scores, None, None)
