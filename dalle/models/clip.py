"""CLIP for filtering, dedup vectors and reranking: open_clip models behind one small wrapper.

Three ways to get one (DESIGN.md, "Models"): an open_clip pretrained tag (needs network),
a checkpoint (our folder format written by `save_clip`, or an open_clip-style weights
file), or `train_small_clip` on the crawled pairs with open_clip's own model and loss.
Every model carries an `identity` string that names its weights exactly, so vectors made
by different models are never mixed.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import io
import math
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import open_clip
import PIL.Image
import safetensors.torch
import torch
import torch.nn.functional as F
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform, image_transform_v2

from dalle.config import ClipConfig, ClipTrainConfig, ConfigError
from dalle.storage import Storage, filesystem_for

FOLDER_FORMAT = "dalle.clip"
FOLDER_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# open_clip's BPE vocabulary (ships inside the package, works offline).
BPE_VOCAB_SIZE = 49408

# Training constants too minor for the run config.
_WEIGHT_DECAY = 0.1
_WARMUP_FRACTION = 0.05
_GRAD_CLIP_NORM = 1.0
_MAX_LOGIT_SCALE = math.log(100.0)  # open_clip's training clamps the temperature here too
# Mild zoom only: a large random crop can cut an object away and flips would turn
# "left of" into a wrong caption, so neither is used; colour jitter would change "red".
_TRAIN_AUGMENTATION = AugmentationCfg(scale=(0.85, 1.0))

ImageSource = Sequence[PIL.Image.Image] | Callable[[int], PIL.Image.Image]


class CheckpointError(ValueError):
    """A CLIP checkpoint that cannot be loaded; the message says why and what to do."""


class ClipModel:
    """An open_clip model with its preprocessing, tokenizer, device and exact identity."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        identity: str,
        architecture: dict[str, Any],
        preprocess_cfg: dict[str, Any],
        device: torch.device,
        model_name: str | None = None,
        batch_size: int = ClipConfig.model_fields["batch_size"].default,
    ):
        self.model = model.to(device).eval()
        self.identity = identity
        self.architecture = copy.deepcopy(architecture)
        self.preprocess_cfg = copy.deepcopy(preprocess_cfg)
        self.model_name = model_name
        self.device = device
        self.batch_size = batch_size
        self.preprocess = image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=False)
        self.tokenizer = open_clip.get_tokenizer(model_name or "", context_length=self.context_length)

    def __repr__(self) -> str:
        return f"ClipModel({self.identity!r}, embed_dim={self.embed_dim}, device={self.device})"

    @property
    def embed_dim(self) -> int:
        return int(self.architecture["embed_dim"])

    @property
    def context_length(self) -> int:
        return int(self.architecture["text_cfg"].get("context_length", 77))

    @torch.inference_mode()
    def encode_images(self, images: Sequence[PIL.Image.Image], batch_size: int | None = None) -> np.ndarray:
        """L2-normalised image vectors, (N, embed_dim) float32."""
        batch_size = batch_size or self.batch_size
        out = np.zeros((len(images), self.embed_dim), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(_rgb(img)) for img in images[start : start + batch_size]])
            features = self.model.encode_image(batch.to(self.device))
            out[start : start + len(batch)] = _unit_rows(features)
        return out

    @torch.inference_mode()
    def encode_image_tokens(
        self, images: Sequence[PIL.Image.Image], batch_size: int | None = None
    ) -> np.ndarray:
        """The image tower's patch tokens, flattened: (N, patches * width) float32, not normalised.

        Unlike the pooled embedding, they keep where things are in the image; a small CLIP
        trained on captions maps every "red circle" to nearly one pooled vector.
        """
        visual = self.model.visual
        if not hasattr(visual, "output_tokens"):
            raise ValueError(
                f"{type(visual).__name__} has no patch tokens; use dedup.vectors: clip with this CLIP model"
            )
        batch_size = batch_size or self.batch_size
        chunks = []
        saved = visual.output_tokens
        visual.output_tokens = True
        try:
            for start in range(0, len(images), batch_size):
                batch = torch.stack(
                    [self.preprocess(_rgb(img)) for img in images[start : start + batch_size]]
                )
                _, tokens = visual(batch.to(self.device))
                chunks.append(tokens.float().reshape(len(batch), -1).cpu().numpy())
        finally:
            visual.output_tokens = saved
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """L2-normalised caption vectors, (N, embed_dim) float32."""
        batch_size = batch_size or self.batch_size
        out = np.zeros((len(texts), self.embed_dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            chunk = [str(text) for text in texts[start : start + batch_size]]
            features = self.model.encode_text(self.tokenizer(chunk).to(self.device))
            out[start : start + len(chunk)] = _unit_rows(features)
        return out

    def score(
        self, images: Sequence[PIL.Image.Image], texts: Sequence[str], batch_size: int | None = None
    ) -> np.ndarray:
        """Cosine similarity of image i with text i, (N,) float32."""
        if len(images) != len(texts):
            raise ValueError(
                f"score needs one text per image, got {len(images)} images and {len(texts)} texts"
            )
        return row_cosine(self.encode_images(images, batch_size), self.encode_texts(texts, batch_size))

    def rerank(
        self,
        images: Sequence[PIL.Image.Image],
        text: str,
        top: int | None = None,
        batch_size: int | None = None,
    ) -> list[tuple[int, float]]:
        """(index, score) of the `top` images that best match `text`, best first (all when top is None)."""
        if not images:
            return []
        scores = self.encode_images(images, batch_size) @ self.encode_texts([text])[0]
        order = np.argsort(-scores, kind="stable")[:top]
        return [(int(i), float(scores[i])) for i in order]


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two batches of unit vectors, float32."""
    return np.einsum("nd,nd->n", a, b).astype(np.float32)


def _unit_rows(features: torch.Tensor) -> np.ndarray:
    return F.normalize(features.float(), dim=-1).cpu().numpy()


def _rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def resolve_device(name: str) -> torch.device:
    """The torch device for a config value: 'auto' is cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(
            f"clip.device {name!r} is not a torch device ({err}); use auto, cpu or cuda"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"clip.device is {name!r} but torch sees no CUDA device; use auto or cpu")
    return device


# --- architecture -------------------------------------------------------------------


def small_clip_architecture(cfg: ClipTrainConfig) -> dict[str, Any]:
    """open_clip model config (embed_dim, vision_cfg, text_cfg) of the small CLIP that `cfg` describes."""
    # The run config names attention heads once; the image tower uses the same count when it
    # divides the width (open_clip sizes ViT heads by head_width).
    vision_heads = cfg.text_heads if cfg.vision_width % cfg.text_heads == 0 else 1
    if cfg.text_width % cfg.text_heads:
        raise ConfigError(
            f"clip.train.text_width {cfg.text_width} must be a multiple of text_heads {cfg.text_heads}"
        )
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(
            f"clip.train.image_size {cfg.image_size} must be a multiple of patch_size {cfg.patch_size}"
        )
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "image_size": cfg.image_size,
            "layers": cfg.vision_layers,
            "width": cfg.vision_width,
            "head_width": cfg.vision_width // vision_heads,
            "patch_size": cfg.patch_size,
        },
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": BPE_VOCAB_SIZE,
            "width": cfg.text_width,
            "heads": cfg.text_heads,
            "layers": cfg.text_layers,
        },
    }


def _model_from_architecture(architecture: dict[str, Any]) -> torch.nn.Module:
    """A randomly initialised open_clip model for a model config, picking the class as open_clip does."""
    arch = copy.deepcopy(architecture)
    custom_text = arch.pop("custom_text", False) or "hf_model_name" in arch.get("text_cfg", {})
    if "multimodal_cfg" in arch:
        raise CheckpointError("CoCa models (multimodal_cfg) are not supported as the pipeline's CLIP")
    # The weights come from our checkpoint: never fetch tower weights from a hub.
    if "hf_model_name" in arch.get("text_cfg", {}):
        arch["text_cfg"]["hf_model_pretrained"] = False
    if "timm_model_name" in arch.get("vision_cfg", {}):
        arch["vision_cfg"]["timm_model_pretrained"] = False
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return cls(**arch)


def _registered_architecture(name: str) -> dict[str, Any]:
    arch = open_clip.get_model_config(name)
    if arch is None:
        raise ConfigError(
            f"clip.model {name!r} is not an open_clip architecture; names include ViT-B-32, ViT-B-16, RN50 "
            "(open_clip.list_models() lists all)"
        )
    return arch


# --- weights ------------------------------------------------------------------------


def _weights_bytes(model: torch.nn.Module) -> bytes:
    """The model's state_dict as safetensors bytes (deterministic: the same weights give the same bytes)."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    return safetensors.torch.save(tensors)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parse_checkpoint_file(data: bytes, uri: str) -> dict[str, torch.Tensor]:
    """A state_dict from an open_clip-style file (.safetensors, or .pt/.bin/.pth read with weights_only=True)."""
    if uri.endswith(".safetensors"):
        try:
            return safetensors.torch.load(data)
        except (safetensors.SafetensorError, ValueError) as err:
            raise CheckpointError(f"{uri} is not a readable safetensors file: {err}") from None
    try:
        # weights_only: a checkpoint is data, and unpickling arbitrary objects would run their code.
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(
            f"{uri} was refused by torch.load(weights_only=True): it holds more than tensors and plain "
            f"containers ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Re-save only the model's state_dict (torch.save(model.state_dict(), path)) or use .safetensors"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # open_clip's training checkpoints: {"epoch", "state_dict", "optimizer", ...}
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{uri} does not hold a state_dict (a mapping of parameter names to tensors)")
    if all(name.startswith("module.") for name in obj):  # saved from DistributedDataParallel
        obj = {name[len("module.") :]: tensor for name, tensor in obj.items()}
    return obj


def _load_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], origin: str) -> None:
    """Load a state_dict into an open_clip model with open_clip's own compatibility fixes.

    Not `open_clip.load_checkpoint`: its reader retries torch.load without weights_only
    when the first attempt raises TypeError, which would unpickle arbitrary objects.
    """
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    state_dict = convert_state_dict(model, dict(state_dict))
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    for name in ("logit_scale", "logit_bias"):
        own = getattr(model, name, None)
        if name in state_dict and own is not None and own.ndim != state_dict[name].ndim:
            state_dict[name] = state_dict[name].reshape(own.shape)
    resize_pos_embed(state_dict, model)
    resize_text_pos_embed(state_dict, model)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{origin} does not fit the architecture: {str(err).splitlines()[0]} ... "
            "check that clip.model names the architecture the checkpoint was trained with"
        ) from None


# --- loading ------------------------------------------------------------------------


def load_clip(cfg: ClipConfig) -> ClipModel:
    """The CLIP that `cfg` names: an open_clip pretrained tag or a checkpoint (folder or file, local or s3://)."""
    device = resolve_device(cfg.device)
    if cfg.pretrained and cfg.checkpoint:
        raise ConfigError("clip.pretrained and clip.checkpoint are both set; keep one of them")
    if cfg.checkpoint:
        return _load_checkpoint(cfg, device)
    if cfg.pretrained:
        return _load_pretrained(cfg, device)
    raise ConfigError(
        "clip.pretrained and clip.checkpoint are both unset, so there is no CLIP to load: name an open_clip "
        "pretrained tag (needs network), a checkpoint, or train one on the pairs with "
        "dalle.models.clip.train_small_clip (what the pipeline does when neither is set)"
    )


def _load_pretrained(cfg: ClipConfig, device: torch.device) -> ClipModel:
    _registered_architecture(cfg.model)
    try:
        model, _, _ = open_clip.create_model_and_transforms(
            cfg.model, pretrained=cfg.pretrained, device=device, weights_only=True
        )
    except Exception as err:
        raise CheckpointError(
            f"cannot load open_clip {cfg.model} pretrained={cfg.pretrained!r}: {err}; without network access "
            "set clip.checkpoint instead, or leave both unset to train a small CLIP"
        ) from err
    return ClipModel(
        model,
        identity=f"open_clip:{cfg.model}:{cfg.pretrained}",
        architecture=_registered_architecture(cfg.model),
        preprocess_cfg=dict(model.visual.preprocess_cfg),
        device=device,
        model_name=cfg.model,
        batch_size=cfg.batch_size,
    )


def _load_checkpoint(cfg: ClipConfig, device: torch.device) -> ClipModel:
    uri = cfg.checkpoint
    fs, path = filesystem_for(uri)
    if fs.isdir(path):
        return _load_folder(Storage(uri), device, cfg.batch_size)
    if not fs.isfile(path):
        raise CheckpointError(f"clip.checkpoint {uri} does not exist")
    data = fs.cat_file(path)
    state_dict = _parse_checkpoint_file(data, uri)
    architecture = _registered_architecture(cfg.model)
    # Random init is overwritten by the checkpoint; no tower weights are fetched.
    model = open_clip.create_model(cfg.model, pretrained=None, pretrained_text=False, pretrained_image=False)
    _load_state_dict(model, state_dict, uri)
    return ClipModel(
        model,
        identity=f"checkpoint:{uri}#{_sha256(data)[:16]}",
        architecture=architecture,
        preprocess_cfg=dict(model.visual.preprocess_cfg),
        device=device,
        model_name=cfg.model,
        batch_size=cfg.batch_size,
    )


def _load_folder(storage: Storage, device: torch.device, batch_size: int) -> ClipModel:
    if not storage.exists(CONFIG_FILE):
        raise CheckpointError(
            f"{storage.uri()} is a folder without {CONFIG_FILE}, so not a CLIP saved by save_clip (or its save "
            "did not finish); for an open_clip weights file, point clip.checkpoint at the file itself"
        )
    meta = storage.read_json(CONFIG_FILE)
    if meta.get("format") != FOLDER_FORMAT or meta.get("format_version") != FOLDER_FORMAT_VERSION:
        raise CheckpointError(
            f"{storage.uri(CONFIG_FILE)} has format {meta.get('format')!r} version {meta.get('format_version')!r}; "
            f"this release reads {FOLDER_FORMAT!r} version {FOLDER_FORMAT_VERSION}"
        )
    data = storage.read_bytes(meta["weights"])
    if _sha256(data) != meta["weights_sha256"]:
        raise CheckpointError(
            f"{storage.uri(meta['weights'])} does not match the sha256 recorded in {CONFIG_FILE}; "
            "the checkpoint is damaged or was overwritten: save it again"
        )
    model = _model_from_architecture(meta["architecture"])
    _load_state_dict(model, safetensors.torch.load(data), storage.uri(meta["weights"]))
    return ClipModel(
        model,
        identity=meta["identity"],
        architecture=meta["architecture"],
        preprocess_cfg=meta["preprocess"],
        device=device,
        model_name=meta.get("model_name"),
        batch_size=batch_size,
    )


def save_clip(clip: ClipModel, storage: Storage, rel_dir: str) -> str:
    """Write `clip` under `rel_dir` (model.safetensors, then config.json last); returns the folder's URI."""
    rel_dir = rel_dir.strip("/")
    data = _weights_bytes(clip.model)
    storage.write_bytes(f"{rel_dir}/{WEIGHTS_FILE}", data)
    storage.write_json(
        f"{rel_dir}/{CONFIG_FILE}",
        {
            "format": FOLDER_FORMAT,
            "format_version": FOLDER_FORMAT_VERSION,
            "identity": clip.identity,
            "model_name": clip.model_name,
            "architecture": clip.architecture,
            "preprocess": clip.preprocess_cfg,
            "weights": WEIGHTS_FILE,
            "weights_sha256": _sha256(data),
            "open_clip_version": open_clip.__version__,
        },
    )
    return storage.uri(rel_dir)


# --- training -----------------------------------------------------------------------


def train_small_clip(
    images: ImageSource,
    captions: Sequence[str],
    cfg: ClipTrainConfig,
    device: str | torch.device = "cpu",
    log: Callable[[int, float], None] | None = None,
) -> ClipModel:
    """Train the small CLIP of `cfg` on image-caption pairs with open_clip's model and ClipLoss.

    `images` is a sequence of PIL images or a callable index -> PIL image (decoded on demand).
    Stops at cfg.max_steps, or earlier when cfg.max_seconds is set and spent; `log(step, loss)`
    is called after every step.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    num_pairs = len(captions)
    if num_pairs < 2:
        raise ValueError(f"a contrastive CLIP needs at least 2 image-caption pairs, got {num_pairs}")
    if not callable(images) and len(images) != num_pairs:
        raise ValueError(f"got {len(images)} images but {num_pairs} captions; pass one caption per image")
    load_image = images if callable(images) else images.__getitem__

    architecture = small_clip_architecture(cfg)
    preprocess_cfg = asdict(PreprocessCfg(size=cfg.image_size))
    augment = image_transform(cfg.image_size, is_train=True, aug_cfg=_TRAIN_AUGMENTATION)

    torch.manual_seed(cfg.seed)
    order = torch.Generator().manual_seed(cfg.seed)
    model = _model_from_architecture(architecture).to(device).train()
    tokens = open_clip.get_tokenizer("", context_length=cfg.context_length)([str(c) for c in captions])

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # biases, norms, logit_scale, class token
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": _WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=True,  # one kernel over all parameters: on CPU several times faster than the default loop
    )
    loss_fn = open_clip.ClipLoss()
    batch_size = min(cfg.batch_size, num_pairs)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    batches = distinct_caption_batches(captions, batch_size, order)
    start = time.monotonic()
    for step in range(1, cfg.max_steps + 1):
        # The schedule follows whichever budget (steps or seconds) runs out first.
        progress = (step - 1) / cfg.max_steps
        if cfg.max_seconds is not None:
            progress = max(progress, (time.monotonic() - start) / cfg.max_seconds)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(cfg.lr, progress)
        index = next(batches)

        batch_images = torch.stack([augment(_rgb(load_image(int(i)))) for i in index]).to(device)
        with autocast:
            image_features, text_features, logit_scale = model(batch_images, tokens[index].to(device))
            loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), _GRAD_CLIP_NORM)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, _MAX_LOGIT_SCALE)
        if log is not None:
            log(step, float(loss.detach()))

    model.eval()
    return ClipModel(
        model,
        identity=f"trained:{_sha256(_weights_bytes(model))[:16]}",
        architecture=architecture,
        preprocess_cfg=preprocess_cfg,
        device=device,
    )


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


def _learning_rate(peak: float, progress: float) -> float:
    """Linear warmup, then cosine decay to zero, over progress in [0, 1)."""
    if progress < _WARMUP_FRACTION:
        return peak * max(progress, 1e-3) / _WARMUP_FRACTION
    decay = (progress - _WARMUP_FRACTION) / (1.0 - _WARMUP_FRACTION)
    return peak * 0.5 * (1.0 + math.cos(math.pi * decay))
