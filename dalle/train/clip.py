"""What training the small CLIP needs on top of the shared loop: open_clip's model and contrastive
loss, on the pairs that passed curation's rule filters, in batches without a repeated caption.

Curation trains it (through dalle.train.launch) when no pretrained CLIP is configured, and
`dalle train clip` continues it: one code path, so it resumes, logs and checkpoints like the
dVAE and the transformer, under torchrun too.
"""

from __future__ import annotations

import collections
import io
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import open_clip
import torch
from open_clip.transform import AugmentationCfg, image_transform
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import IterableDataset, get_worker_info

from dalle.config import ConfigError, RunConfig, plugin_function
from dalle.curate.fates import TooFewPairs, passing_pairs
from dalle.models.clip import build_small_clip, small_clip_architecture, small_clip_preprocess
from dalle.runroot import CLIP
from dalle.storage import Storage

_MAX_LOGIT_SCALE = math.log(100.0)  # open_clip's training clamps the temperature here too
# Mild zoom only: a large random crop can cut an object away and flips would turn
# "left of" into a wrong caption, so neither is used; colour jitter would change "red".
_TRAIN_AUGMENTATION = AugmentationCfg(scale=(0.85, 1.0))


class ClipTraining:
    """The small CLIP of clip.small on the filtered pairs."""

    name = CLIP
    tokens_per_sample = 1

    def __init__(self, storage: Storage, cfg: RunConfig):
        if cfg.clip.pretrained or cfg.clip.checkpoint:
            raise ConfigError(
                "clip.pretrained or clip.checkpoint is set, so the run uses that CLIP and trains none; "
                "unset both to train the small CLIP on the crawled pairs"
            )
        self.storage, self.cfg = storage, cfg
        self.images, self.captions = passing_pairs(storage)
        if len(self.captions) < 2:
            raise TooFewPairs(
                f"only {len(self.captions)} pairs passed the filters, too few to train a CLIP; "
                "crawl more pairs or set clip.pretrained / clip.checkpoint"
            )

    def build_model(self) -> nn.Module:
        return build_small_clip(self.cfg.clip.small)

    def model_meta(self) -> dict[str, Any]:
        meta = {
            "kind": "clip",
            "architecture": small_clip_architecture(self.cfg.clip.small),
            "preprocess": small_clip_preprocess(self.cfg.clip.small),
        }
        return json.loads(
            json.dumps(meta)
        )  # as model.json stores it (tuples are lists), to compare on resume

    def dataset(self, batch_size, seed, start_batch, rank, world_size) -> IterableDataset:
        return PairBatches(
            self.images, self.captions, min(batch_size, len(self.captions)), self.cfg.clip.small,
            seed, start_batch, rank, load_hard_negatives(self.cfg.clip.hard_negatives),
            self.cfg.clip.hard_negatives_per_caption, load_mirrored_captions(self.cfg.clip.mirrored_captions),
            self.cfg.clip.mirror_twins_per_batch, self.cfg.clip.blur_side, self.cfg.clip.blur_probability,
        )  # fmt: skip

    def loss(self, model, batch, step):
        images = batch["images"]
        texts = batch["text"] if "negatives" not in batch else torch.cat([batch["text"], batch["negatives"]])
        # One forward for the captions and the hard negatives: the captions come first.
        image_features, text_features, logit_scale = model(images, texts)
        if "negatives" not in batch:
            loss = open_clip.ClipLoss()(image_features, text_features, logit_scale)
            return loss, {"logit_scale": float(logit_scale.detach())}
        # NegCLIP: each image chooses among the batch's captions and the hard negatives; each caption
        # among the batch's images, as in CLIP. Mirrored twins are pairs like the others.
        count = len(images)
        labels = torch.arange(count, device=images.device)
        per_image = logit_scale * image_features @ text_features.T
        per_text = logit_scale * text_features[:count] @ image_features.T
        loss = (
            nn.functional.cross_entropy(per_image, labels) + nn.functional.cross_entropy(per_text, labels)
        ) / 2
        hard = per_image[:, count:].max(dim=1).values > per_image.gather(1, labels[:, None])[:, 0]
        return loss, {
            "logit_scale": float(logit_scale.detach()),
            "hard_negatives": len(texts) - count,
            "hard_negative_wins": float(hard.float().mean()),
        }

    def optimizer_groups(self, model, weight_decay):
        # Biases, norms, the logit scale and the class token are not decayed (open_clip's rule).
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def after_step(self, model) -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, _MAX_LOGIT_SCALE)


class PairBatches(IterableDataset):
    """Endless batches of augmented images and tokenized captions, no caption twice in a batch.

    The order is seeded by (seed, rank); a DataLoader worker w of W yields batches w, w+W, ...
    Resuming after `start_batch` batches replays only the index stream, not the images.
    """

    def __init__(
        self, images: list[bytes], captions: list[str], batch_size, small_cfg, seed, start_batch, rank,
        hard_negatives: HardNegatives | None = None, negatives_per_caption: int = 1,
        mirrored_caption: MirroredCaption | None = None, twins_per_batch: int = 0,
        blur_side: int | None = None, blur_probability: float = 0.0,
    ):  # fmt: skip
        super().__init__()
        self.images, self.captions, self.hard_negatives = images, captions, hard_negatives
        self.negatives_per_caption = negatives_per_caption
        self.mirrored_caption, self.twins_per_batch = mirrored_caption, twins_per_batch
        self.blur_side, self.blur_probability = blur_side, blur_probability
        self.batch_size, self.seed, self.start_batch, self.rank = batch_size, seed, start_batch, rank
        self.image_size, self.context_length = small_cfg.image_size, small_cfg.context_length

    def check_split(self, num_workers: int) -> None:
        """Every worker draws from the whole set: any number of workers works."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        augment = image_transform(self.image_size, is_train=True, aug_cfg=_TRAIN_AUGMENTATION)
        tokenizer = open_clip.get_tokenizer("", context_length=self.context_length)
        tokens = tokenizer([str(c) for c in self.captions])
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.rank)
        batches = distinct_caption_batches(self.captions, self.batch_size, generator)
        number = 0
        for index in batches:
            number += 1
            if number <= self.start_batch or (number - 1) % workers != worker_id:
                continue
            images = [Image.open(io.BytesIO(self.images[int(i)])).convert("RGB") for i in index]
            captions = [str(self.captions[int(i)]) for i in index]
            text = tokens[index]
            rng = random.Random(self.seed * 1000003 + number)
            if self.mirrored_caption is not None and self.twins_per_batch:
                twins = mirrored_twins(captions, self.mirrored_caption, rng, self.twins_per_batch)
                if twins:
                    images += [mirror(images[i], axis) for i, axis, _ in twins]
                    captions += [caption for _, _, caption in twins]
                    text = torch.cat([text, tokenizer([caption for _, _, caption in twins])])
            if self.blur_side:
                images = [
                    blurred(image, self.blur_side) if rng.random() < self.blur_probability else image
                    for image in images
                ]
            batch = {"images": torch.stack([augment(image) for image in images]), "text": text}
            if self.hard_negatives is not None:
                negatives = batch_negatives(captions, self.hard_negatives, rng, self.negatives_per_caption)
                if negatives:
                    batch["negatives"] = tokenizer(negatives)
            yield batch


HardNegatives = Callable[[str, random.Random], list[str]]
MirroredCaption = Callable[[str, str], "str | None"]
MIRROR_AXES = ("horizontal", "vertical")


def load_hard_negatives(name: str | None) -> HardNegatives | None:
    """The hard_negatives function of the module `clip.hard_negatives` names (None when unset)."""
    if not name:
        return None
    return plugin_function("clip.hard_negatives", name, "hard_negatives", "hard_negatives(caption, rng)")


def load_mirrored_captions(name: str | None) -> MirroredCaption | None:
    """The mirrored_caption function of the module `clip.mirrored_captions` names (None when unset)."""
    if not name:
        return None
    return plugin_function(
        "clip.mirrored_captions", name, "mirrored_caption", "mirrored_caption(caption, axis)"
    )


def blurred(image: Image.Image, side: int) -> Image.Image:
    """`image` shrunk to fit `side` (its aspect kept) and enlarged back: as blurry as a decoded sample
    of that side. An image no larger than `side` is returned as it is."""
    width, height = image.size
    scale = side / max(width, height)
    if scale >= 1:
        return image
    small = image.resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR
    )
    return small.resize((width, height), Image.Resampling.BICUBIC)


def mirror(image: Image.Image, axis: str) -> Image.Image:
    """The image mirrored left to right (axis "horizontal") or upside down ("vertical")."""
    return ImageOps.mirror(image) if axis == "horizontal" else ImageOps.flip(image)


def mirrored_twins(
    captions: Sequence[str], mirrored_caption: MirroredCaption, rng: random.Random, limit: int
) -> list[tuple[int, str, str]]:
    """(index, axis, caption) of up to `limit` mirrored twins for a batch's captions: a caption whose
    mirror (on an axis chosen at random among those that change it) says something else. None is the
    caption of another pair of the batch, nor of another twin: that pair would be pushed away from
    an image it describes."""
    taken = {caption.strip().lower() for caption in captions}
    offered = []
    for index, caption in enumerate(captions):
        options = []
        for axis in MIRROR_AXES:
            text = mirrored_caption(caption, axis)
            if text and text.strip().lower() != caption.strip().lower():
                options.append((index, axis, text))
        if options:
            offered.append(rng.choice(options))
    twins = []
    for index, axis, text in rng.sample(offered, len(offered)):
        if len(twins) < limit and text.strip().lower() not in taken:
            taken.add(text.strip().lower())
            twins.append((index, axis, text))
    return sorted(twins)


def batch_negatives(
    captions: Sequence[str], hard_negatives: HardNegatives, rng: random.Random, per_caption: int = 1
) -> list[str]:
    """Up to `per_caption` hard negatives per caption (at random among those the function offers), none
    that is a caption of the batch (a "negative" that is another pair's caption would be a positive
    pushed away) and none twice."""
    taken = {caption.strip().lower() for caption in captions}
    chosen = []
    for caption in captions:
        offered = [text for text in hard_negatives(caption, rng) if text.strip().lower() not in taken]
        for text in rng.sample(offered, min(per_caption, len(offered))):
            taken.add(text.strip().lower())
            chosen.append(text)
    return chosen


def distinct_caption_batches(
    captions: Sequence[str], batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless batches of pair indices in shuffled epochs, no caption twice in a batch.

    ClipLoss treats every other pair of a batch as a negative. When two pairs share a caption
    (the demo has a few dozen single-object captions) that "negative" is really a positive,
    and pushing it away blurs exactly the distinctions a reranker needs ("a yellow cross"
    vs "a yellow square"). A pair whose caption is already in the batch waits for the next
    batch, so every pair is still seen about once per epoch. Batches are chosen from a window of
    four batches' pairs; when that window holds fewer distinct captions than a batch, the batch
    is topped up with repeats.
    """
    keys = [str(c).strip().lower() for c in captions]
    pending: collections.deque[int] = collections.deque()
    while True:
        if len(pending) < 4 * batch_size:  # a window to choose distinct captions from
            pending.extend(torch.randperm(len(keys), generator=generator).tolist())
            continue
        window = [pending.popleft() for _ in range(4 * batch_size)]
        batch: list[int] = []
        seen: set[str] = set()
        rest: list[int] = []
        for index in window:
            if len(batch) < batch_size and keys[index] not in seen:
                batch.append(index)
                seen.add(keys[index])
            else:
                rest.append(index)
        missing = batch_size - len(batch)  # too few distinct captions in the window: repeats it is
        batch, rest = batch + rest[:missing], rest[missing:]
        pending.extendleft(reversed(rest))
        yield torch.tensor(batch, dtype=torch.long)
