"""CLIP for filtering, dedup vectors and reranking: open_clip models behind one small wrapper.

Three ways to get one: an open_clip pretrained tag (needs network), a checkpoint (a
checkpoint folder of the run's training loop, our folder format written by `save_clip`, or
an open_clip-style weights file), or the small CLIP that dalle/train/clip.py trains on the
crawled pairs with open_clip's own model and loss (`build_small_clip` makes it).
Every model carries an `identity` string that names its weights exactly, so vectors made
by different models are never mixed.
"""

from __future__ import annotations

import copy
import hashlib
import io
import pickle
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import open_clip
import PIL.Image
import safetensors.torch
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2

from dalle.config import ClipConfig, ConfigError, SmallClipConfig
from dalle.devices import resolve_device
from dalle.errors import UserError
from dalle.models.weights import load_model_state
from dalle.runroot import CHECKPOINT_META, CHECKPOINT_WEIGHTS
from dalle.storage import Storage, filesystem_for

FOLDER_FORMAT = "dalle.clip"
FOLDER_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# open_clip's BPE vocabulary (ships inside the package, works offline).
BPE_VOCAB_SIZE = 49408


class CheckpointError(UserError, ValueError):
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


# --- architecture -------------------------------------------------------------------


def small_clip_architecture(cfg: SmallClipConfig) -> dict[str, Any]:
    """open_clip model config (embed_dim, vision_cfg, text_cfg) of the small CLIP that `cfg` describes."""
    # The run config names attention heads once; the image tower uses the same count when it
    # divides the width (open_clip sizes ViT heads by head_width).
    vision_heads = cfg.text_heads if cfg.vision_width % cfg.text_heads == 0 else 1
    if cfg.text_width % cfg.text_heads:
        raise ConfigError(
            f"clip.small.text_width {cfg.text_width} must be a multiple of text_heads {cfg.text_heads}"
        )
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(
            f"clip.small.image_size {cfg.image_size} must be a multiple of patch_size {cfg.patch_size}"
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


def build_small_clip(cfg: SmallClipConfig) -> torch.nn.Module:
    """A randomly initialised small CLIP of the architecture `cfg` describes."""
    return model_from_architecture(small_clip_architecture(cfg))


def small_clip_preprocess(cfg: SmallClipConfig) -> dict[str, Any]:
    """open_clip's evaluation preprocessing settings for the small CLIP's input side."""
    return asdict(PreprocessCfg(size=cfg.image_size))


def model_from_architecture(architecture: dict[str, Any]) -> torch.nn.Module:
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
    device = resolve_device(cfg.device, setting="clip.device")
    if cfg.pretrained and cfg.checkpoint:
        raise ConfigError("clip.pretrained and clip.checkpoint are both set; keep one of them")
    if cfg.checkpoint:
        return _load_checkpoint(cfg, device)
    if cfg.pretrained:
        return _load_pretrained(cfg, device)
    raise ConfigError(
        "clip.pretrained and clip.checkpoint are both unset, so there is no CLIP to load: name an open_clip "
        "pretrained tag (needs network) or a checkpoint, or train the small CLIP on the pairs with "
        "`dalle train clip` (what curation does when neither is set)"
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


def _load_trained(storage: Storage, device: torch.device, batch_size: int) -> ClipModel:
    """A small CLIP from a checkpoint folder of the training loop (model.json of kind "clip")."""
    state, meta = load_model_state(storage, "")
    if meta.get("kind") != "clip":
        raise CheckpointError(f"{storage.uri()} holds a {meta.get('kind')!r} model, not a CLIP")
    model = model_from_architecture(meta["architecture"])
    _load_state_dict(model, state, storage.uri(CHECKPOINT_WEIGHTS))
    return ClipModel(
        model,
        identity=f"trained:{meta['weights_sha256'][:16]}",
        architecture=meta["architecture"],
        preprocess_cfg=meta["preprocess"],
        device=device,
        batch_size=batch_size,
    )


def _load_folder(storage: Storage, device: torch.device, batch_size: int) -> ClipModel:
    if storage.exists(CHECKPOINT_META):
        return _load_trained(storage, device, batch_size)
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
    model = model_from_architecture(meta["architecture"])
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
