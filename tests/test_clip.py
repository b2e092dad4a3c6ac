"""The pipeline's CLIP: a small one trained on shapes, checkpoints in and out, and the embed stage."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import random
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
from PIL import Image, ImageDraw

from dalle.config import (
    ClipConfig,
    ConfigError,
    DVAEConfig,
    RunConfig,
    SmallClipConfig,
    TokenizerConfig,
    TrainConfig,
    TransformerConfig,
)
from dalle.curate.embed import CLIP_MODEL_KEY, embed_pairs, embed_stage, vectors
from dalle.models.clip import CheckpointError, ClipModel, load_clip, save_clip
from dalle.models.dvae import DiscreteVAE
from dalle.models.transformer import DalleTransformer
from dalle.runroot import CLIP, EMBEDDINGS_DIR, read_metrics
from dalle.sample.relations import binding_margins, parse_pairing, parse_relation, relation_margins
from dalle.sample.rerank import SamplingSettings, samples_for
from dalle.storage import Storage
from dalle.tokens.bpe import train_bpe
from dalle.train.clip import ClipTraining, distinct_caption_batches
from dalle.train.loop import train

COLORS = {"red": (215, 35, 35), "green": (35, 165, 45), "blue": (35, 60, 215), "yellow": (225, 195, 25)}
SHAPES = ("circle", "square")
CLASSES = [f"a {color} {shape}" for color in COLORS for shape in SHAPES]

SMALL = SmallClipConfig(
    image_size=32,
    embed_dim=64,
    vision_width=64,
    vision_layers=2,
    patch_size=8,
    text_width=64,
    text_layers=2,
    text_heads=2,
    context_length=16,
)
# The run's CLIP training settings (open_clip's AdamW, cosine to zero) with these few changed;
# steps, not seconds: a loaded machine must train the same CLIP.
TRAINING = RunConfig().train_clip.model_copy(
    update={
        "batch_size": 64,
        "lr": 2e-3,
        "max_steps": 300,
        "seed": 0,
        "device": "cpu",
        "log_every": 1,  # a metrics line (with its loss) per step
        "checkpoint_every": 10_000,  # one checkpoint, at the end
    }
)


def make_shapes(count: int, seed: int, size: int = 40) -> tuple[list[Image.Image], list[str], np.ndarray]:
    """`count` images of one coloured circle or square at a random place and size, with their captions."""
    rng = random.Random(seed)
    images, captions, labels = [], [], []
    for i in range(count):
        label = i % len(CLASSES)
        _, color, shape = CLASSES[label].split()
        image = Image.new("RGB", (size, size), (236, 234, 226))
        radius = rng.randint(size // 6, size // 3)
        x, y = rng.randint(radius, size - radius), rng.randint(radius, size - radius)
        box = [x - radius, y - radius, x + radius, y + radius]
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
        images.append(image)
        captions.append(CLASSES[label])
        labels.append(label)
    return images, captions, np.array(labels)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def train_clip_on_pairs(
    images: list[Image.Image], captions: list[str], root: Path, training: TrainConfig = TRAINING
) -> tuple[ClipModel, list[tuple[int, float]]]:
    """The small CLIP of SMALL trained on these pairs in a run root at `root` through the shared
    training loop (as curation trains it, minus the filter stage that would pick the pairs), loaded
    from its checkpoint; and the (step, loss) of every logged step."""
    storage = Storage(str(root))
    run_cfg = RunConfig(clip=ClipConfig(small=SMALL, device="cpu"), train_clip=training)
    task = ClipTraining.__new__(ClipTraining)  # __init__ would read the pairs from the filter stage
    task.storage, task.cfg = storage, run_cfg
    task.images, task.captions = [png(image) for image in images], list(captions)
    uri = train(task, storage, run_cfg, run_cfg.train_clip, log=lambda line: None)
    clip = load_clip(run_cfg.clip.model_copy(update={"checkpoint": uri}))
    return clip, [(r["step"], r["loss"]) for r in read_metrics(storage, CLIP)]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The machine's cores are shared; a model this small gains little from a second thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(learning_seed, tmp_path_factory) -> tuple[ClipModel, list[tuple[int, float]]]:
    images, captions, _ = make_shapes(200, seed=0)
    training = TRAINING.model_copy(update={"seed": learning_seed})
    return train_clip_on_pairs(images, captions, tmp_path_factory.mktemp("clip_run"), training)


# --- the small CLIP ------------------------------------------------------------------


@pytest.mark.learning
def test_small_clip_finds_unseen_images_by_caption(trained):
    clip, losses = trained
    assert losses[-1][1] < losses[0][1] - 1.0, f"loss went {losses[0][1]:.2f} -> {losses[-1][1]:.2f}"
    images, _, labels = make_shapes(80, seed=1)  # positions and sizes never seen in training
    similarity = clip.encode_images(images) @ clip.encode_texts(CLASSES).T

    separated = [
        similarity[labels == k, k].mean() > similarity[labels != k, k].mean() + 0.1
        for k in range(len(CLASSES))
    ]
    assert sum(separated) >= 7, (
        f"matching images do not score higher for {np.flatnonzero(~np.array(separated))}"
    )
    accuracy = float((similarity.argmax(axis=1) == labels).mean())
    assert accuracy >= 0.4, f"caption-of-image accuracy {accuracy:.2f}; chance is {1 / len(CLASSES):.2f}"


def test_vectors_are_unit_norm_and_scores_are_cosines(trained):
    clip, _ = trained
    images, captions, _ = make_shapes(16, seed=2)
    image_emb, text_emb = clip.encode_images(images, batch_size=5), clip.encode_texts(captions, batch_size=3)
    assert image_emb.shape == text_emb.shape == (16, clip.embed_dim) and image_emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(clip.score(images, captions), (image_emb * text_emb).sum(axis=1), atol=1e-5)
    np.testing.assert_allclose(clip.encode_images(images, batch_size=16), image_emb, atol=1e-5)


@pytest.mark.learning
def test_rerank_puts_matching_images_first(trained):
    clip, _ = trained
    images, _, labels = make_shapes(40, seed=3)
    ranked = clip.rerank(images, "a blue square", top=5)
    expected_scores = clip.score(images, ["a blue square"] * len(images))
    assert [i for i, _ in ranked] == list(np.argsort(-expected_scores, kind="stable")[:5])
    np.testing.assert_allclose([score for _, score in ranked], np.sort(expected_scores)[::-1][:5], atol=1e-5)
    assert len(clip.rerank(images, "a blue square")) == len(images)
    for color in COLORS:
        best = [CLASSES[labels[i]] for i, _ in clip.rerank(images, f"a {color} square", top=3)]
        assert all(caption.split()[1] == color for caption in best), (color, best)


def make_relation_scenes(count: int, seed: int, size: int = 40) -> list[tuple[Image.Image, Image.Image, str]]:
    """(scene, its swap, prompt): two objects of different colours side by side or one above the
    other, as the prompt says, and the same two with their places exchanged. Only single objects
    were in the CLIP's training."""
    rng = random.Random(seed)
    scenes = []
    while len(scenes) < count:
        objects = [CLASSES[i].split()[1:] for i in rng.sample(range(len(CLASSES)), 2)]
        if objects[0][0] == objects[1][0]:
            continue
        axis = rng.choice(["horizontal", "vertical"])
        radius, drawn = rng.randint(6, 8), []
        for order in ((0, 1), (1, 0)):
            image = Image.new("RGB", (size, size), (236, 234, 226))
            draw = ImageDraw.Draw(image)
            for slot, (color, shape) in zip(order, objects):
                along, across = (
                    size // 4 + slot * size // 2 + rng.randint(-2, 2),
                    size // 2 + rng.randint(-4, 4),
                )
                x, y = (along, across) if axis == "horizontal" else (across, along)
                box = [x - radius, y - radius, x + radius, y + radius]
                (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
            drawn.append(image)
        word = "to the left of" if axis == "horizontal" else "above"
        scenes.append((drawn[0], drawn[1], f"a {' '.join(objects[0])} {word} a {' '.join(objects[1])}"))
    return scenes


def make_binding_scenes(count: int, seed: int, size: int = 40) -> list[tuple[Image.Image, Image.Image, str]]:
    """(scene, its colour swap, prompt): a circle and a square of two colours apart along either axis,
    and the same scene with the two colours exchanged. Only single objects were in the CLIP's training."""
    rng = random.Random(seed)
    scenes = []
    while len(scenes) < count:
        colors = rng.sample(list(COLORS), 2)
        shapes = list(SHAPES) if rng.random() < 0.5 else list(SHAPES)[::-1]
        axis = rng.choice(["horizontal", "vertical"])
        radius = rng.randint(6, 8)
        places = []
        for slot in (0, 1):
            along, across = size // 4 + slot * size // 2 + rng.randint(-2, 2), size // 2 + rng.randint(-4, 4)
            places.append((along, across) if axis == "horizontal" else (across, along))
        drawn = []
        for paint in (colors, colors[::-1]):
            image = Image.new("RGB", (size, size), (236, 234, 226))
            draw = ImageDraw.Draw(image)
            for (x, y), color, shape in zip(places, paint, shapes):
                box = [x - radius, y - radius, x + radius, y + radius]
                (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
            drawn.append(image)
        scenes.append((drawn[0], drawn[1], f"a {colors[0]} {shapes[0]} and a {colors[1]} {shapes[1]}"))
    return scenes


@pytest.mark.learning
def test_binding_margins_tell_a_scene_from_its_colour_swap(trained):
    # Each object's phrase on its own side of a cut, against the phrases with the colours swapped. CLIP's
    # pooled score preferred the right scene 0.43-0.60 of the time (seeds 0-2); the margin 0.77-0.90.
    clip, _ = trained
    right = positive = pooled = 0
    scenes = make_binding_scenes(60, seed=6)
    for scene, swap, prompt in scenes:
        margins = binding_margins(clip, [scene, swap], parse_pairing(prompt))
        right += margins[0] > margins[1]
        positive += margins[0] > 0
        scores = clip.score([scene, swap], [prompt] * 2)
        pooled += scores[0] > scores[1]
    n = len(scenes)
    assert right >= 0.7 * n and right >= pooled + 0.15 * n and positive >= 0.65 * n, (right, pooled, positive)


@pytest.mark.learning
def test_relation_margins_tell_a_scene_from_its_swap(trained):
    # CLIP's pooled score hardly tells them apart (0.42-0.57 on three seeds); the margin, scoring each
    # object on its side, did in every case.
    clip, _ = trained
    right = positive = 0
    scenes = make_relation_scenes(40, seed=5)
    for scene, swap, prompt in scenes:
        margins = relation_margins(clip, [scene, swap], parse_relation(prompt))
        right += margins[0] > margins[1]
        positive += margins[0] > 0
    assert right >= 0.9 * len(scenes) and positive >= 0.85 * len(scenes), (right, positive)


def test_samples_of_a_relation_prompt_are_ranked_by_score_plus_margin(trained):
    clip, _ = trained
    torch.manual_seed(0)
    dvae = DiscreteVAE(DVAEConfig(image_size=16, downsample_steps=2, codebook_size=16, hidden_width=8)).eval()
    tokenizer = train_bpe(["a red circle above a blue square"] * 10, TokenizerConfig(vocab_size=300))
    model = DalleTransformer(
        TransformerConfig(text_seq_len=12, width=32, depth=1, heads=2), tokenizer.vocab_size, 16, 4
    )
    prompt = "a red circle above a blue square"
    weighted = samples_for(
        prompt, model, dvae, tokenizer, clip, SamplingSettings(num_samples=6, relation_weight=3.0)
    )
    margins = relation_margins(clip, weighted.images, parse_relation(prompt))
    np.testing.assert_allclose(weighted.relation_margins, margins, atol=1e-6)
    np.testing.assert_allclose(weighted.scores, clip.score(weighted.images, [prompt] * 6), atol=1e-5)
    assert weighted.ranking == list(np.argsort(-(weighted.scores + 3.0 * margins), kind="stable"))
    plain = samples_for(
        prompt, model, dvae, tokenizer, clip, SamplingSettings(num_samples=6, relation_weight=0)
    )
    assert plain.relation_margins is None
    assert plain.ranking == list(np.argsort(-plain.scores, kind="stable"))
    no_relation = samples_for("a red circle", model, dvae, tokenizer, clip, SamplingSettings(num_samples=6))
    assert no_relation.relation_margins is None


def test_samples_of_a_two_object_prompt_are_ranked_by_score_plus_binding_margin(trained):
    clip, _ = trained
    torch.manual_seed(0)
    dvae = DiscreteVAE(DVAEConfig(image_size=16, downsample_steps=2, codebook_size=16, hidden_width=8)).eval()
    prompt = "a red circle and a blue square"
    tokenizer = train_bpe([prompt] * 10, TokenizerConfig(vocab_size=300))
    model = DalleTransformer(
        TransformerConfig(text_seq_len=12, width=32, depth=1, heads=2), tokenizer.vocab_size, 16, 4
    )
    weighted = samples_for(
        prompt, model, dvae, tokenizer, clip, SamplingSettings(num_samples=6, binding_weight=3.0)
    )
    margins = binding_margins(clip, weighted.images, parse_pairing(prompt))
    np.testing.assert_allclose(weighted.binding_margins, margins, atol=1e-6)
    assert weighted.relation_margins is None
    assert weighted.ranking == list(np.argsort(-(weighted.scores + 3.0 * margins), kind="stable"))
    plain = samples_for(
        prompt, model, dvae, tokenizer, clip, SamplingSettings(num_samples=6, binding_weight=0)
    )
    assert plain.binding_margins is None
    assert plain.ranking == list(np.argsort(-plain.scores, kind="stable"))


def test_contrastive_batches_hold_each_caption_once_and_cover_every_pair():
    # 30 single-object captions repeated (as in the demo) and 200 unique ones.
    captions = [f"a shape {i % 30}" for i in range(600)] + [f"two shapes {i}" for i in range(200)]
    batches = distinct_caption_batches(captions, 32, torch.Generator().manual_seed(0))
    counts = np.zeros(len(captions), dtype=int)
    for _ in range(25 * 4):  # four epochs' worth
        batch = next(batches).tolist()
        assert len(batch) == 32
        assert len({captions[i] for i in batch}) == 32, "a caption twice in one batch"
        np.add.at(counts, batch, 1)
    # Deferred pairs are late, not lost: every pair was drawn about once per epoch.
    assert counts.min() >= 2 and counts.max() <= 6


def test_contrastive_batches_repeat_captions_only_when_too_few_are_distinct():
    captions = ["a red circle"] * 50 + ["a blue square"] * 50
    batch = next(distinct_caption_batches(captions, 8, torch.Generator().manual_seed(0))).tolist()
    assert len(batch) == 8 and {captions[i] for i in batch} == {"a red circle", "a blue square"}


def test_training_starts_from_the_seeded_initialisation(tmp_path):
    images, captions, _ = make_shapes(12, seed=4)
    one_step = TRAINING.model_copy(update={"max_steps": 1, "batch_size": 64})  # batch larger than the data
    first, _ = train_clip_on_pairs(images, captions, tmp_path / "first", one_step)
    again, _ = train_clip_on_pairs(images, captions, tmp_path / "again", one_step)
    other, _ = train_clip_on_pairs(
        images, captions, tmp_path / "other", one_step.model_copy(update={"seed": 1})
    )
    assert first.identity == again.identity != other.identity
    assert first.identity.startswith("trained:")


def test_step_bound_training_is_reproducible(tmp_path):
    """Without a wall-clock budget the run is a function of the data and the seed alone."""
    images, captions, _ = make_shapes(24, seed=5)
    steps = TRAINING.model_copy(update={"max_steps": 4, "batch_size": 8})
    first, first_losses = train_clip_on_pairs(images, captions, tmp_path / "first", steps)
    again, again_losses = train_clip_on_pairs(images, captions, tmp_path / "again", steps)
    assert [step for step, _ in first_losses] == [step for step, _ in again_losses] == [1, 2, 3, 4]
    assert first.identity == again.identity


# --- checkpoints ---------------------------------------------------------------------


def test_saved_clip_loads_back_identical(trained, run_root):
    clip, _ = trained
    storage = Storage(run_root)
    uri = save_clip(clip, storage, "models/clip/step_00000300")
    assert uri == storage.uri("models/clip/step_00000300")
    assert storage.list("models/clip/step_00000300") == [
        "models/clip/step_00000300/config.json",
        "models/clip/step_00000300/model.safetensors",
    ]

    loaded = load_clip(ClipConfig(checkpoint=uri, device="cpu"))
    assert loaded.identity == clip.identity
    images, captions, _ = make_shapes(10, seed=5)
    assert np.array_equal(loaded.encode_images(images), clip.encode_images(images))
    assert np.array_equal(loaded.encode_texts(captions), clip.encode_texts(captions))


def test_a_clip_an_older_release_trained_is_kept_not_retrained(trained, tmp_path):
    # Run roots of the previous release hold the small CLIP in save_clip's folder format, which the
    # shared loop cannot resume: curation and `dalle train clip` use it as it is.
    from dalle.config import RunConfig
    from dalle.runroot import set_latest
    from dalle.train.launch import launch

    clip, _ = trained
    storage = Storage(str(tmp_path / "old"))
    uri = save_clip(clip, storage, "models/clip/step_00000300")
    set_latest(storage, "clip", 300)
    messages = []
    assert launch("clip", storage.uri(), RunConfig(), log=messages.append) == uri
    assert "trained by an older release" in messages[0]
    assert storage.list("models/clip/step_00000300") == [
        "models/clip/step_00000300/config.json",
        "models/clip/step_00000300/model.safetensors",
    ]


def test_damaged_saved_weights_are_refused(trained, tmp_path):
    clip, _ = trained
    uri = save_clip(clip, Storage(tmp_path), "clip")
    weights = Path(uri) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="sha256"):
        load_clip(ClipConfig(checkpoint=uri, device="cpu"))


TINY_ARCH = "dalle-test-tiny-vit"


@pytest.fixture(scope="module")
def registered_tiny_architecture(tmp_path_factory) -> str:
    """A small architecture registered with open_clip, as a user's own model config would be."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / f"{TINY_ARCH}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{TINY_ARCH}.json")
    return TINY_ARCH


@pytest.mark.parametrize("layout", ["state_dict.pt", "training_checkpoint.pt", "weights.safetensors"])
def test_open_clip_weights_file_loads_for_its_architecture(registered_tiny_architecture, tmp_path, layout):
    torch.manual_seed(7)
    reference = open_clip.create_model(registered_tiny_architecture).eval()
    state_dict = reference.state_dict()
    path = tmp_path / layout
    if layout == "state_dict.pt":
        torch.save(state_dict, path)
    elif layout == "training_checkpoint.pt":  # open_clip's trainer saves DDP names inside a dict
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, path)
    else:
        safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, path)

    clip = load_clip(ClipConfig(model=registered_tiny_architecture, checkpoint=str(path), device="cpu"))

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert clip.identity == f"checkpoint:{path}#{sha[:16]}"
    assert clip.embed_dim == 32
    texts = ["a red circle", "a green square"]
    with torch.no_grad():
        expected = reference.encode_text(
            open_clip.get_tokenizer("", context_length=16)(texts), normalize=True
        )
    np.testing.assert_allclose(clip.encode_texts(texts), expected.numpy(), atol=1e-5)


def test_weights_for_another_architecture_are_refused(registered_tiny_architecture, tmp_path):
    small = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 32, "layers": 1, "width": 32, "head_width": 32, "patch_size": 16},
        text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    )
    torch.save(small.state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not fit the architecture"):
        load_clip(
            ClipConfig(
                model=registered_tiny_architecture, checkpoint=str(tmp_path / "other.pt"), device="cpu"
            )
        )


def _leave_mark(path: str) -> None:
    Path(path).write_text("unpickled")


class _RunsCodeWhenUnpickled:
    def __init__(self, mark: Path):
        self.mark = str(mark)

    def __reduce__(self):
        return (_leave_mark, (self.mark,))


def test_checkpoint_with_pickled_objects_is_refused(registered_tiny_architecture, tmp_path):
    mark = tmp_path / "unpickled.txt"
    weights = open_clip.create_model(registered_tiny_architecture).state_dict()
    path = tmp_path / "trap.pt"
    torch.save({"state_dict": weights, "extra": _RunsCodeWhenUnpickled(mark)}, path)

    with pytest.raises(CheckpointError, match="weights_only"):
        load_clip(ClipConfig(model=registered_tiny_architecture, checkpoint=str(path), device="cpu"))
    assert not mark.exists()

    torch.load(path, weights_only=False)  # the trap is armed: a plain unpickle runs its code
    assert mark.exists()


def test_no_pretrained_and_no_checkpoint_says_to_train():
    with pytest.raises(ConfigError, match="dalle train clip"):
        load_clip(ClipConfig(device="cpu"))


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_clip(ClipConfig(checkpoint=str(tmp_path / "nowhere.pt"), device="cpu"))


# --- the embed stage -------------------------------------------------------------------


def _parts(storage: Storage) -> list[str]:
    return storage.list(EMBEDDINGS_DIR, ".parquet")


def _clip_of_part(storage: Storage, rel: str) -> bytes:
    with storage.fs.open(storage.path(rel), "rb") as handle:
        return pq.read_schema(handle).metadata[CLIP_MODEL_KEY]


def test_embed_stage_embeds_each_uid_once_per_clip(trained, run_root):
    clip, _ = trained
    storage = Storage(run_root)
    images, captions, _ = make_shapes(23, seed=6)
    encoded = [png(image) for image in images]
    uids = [f"uid-{i:03d}" for i in range(23)]

    first = embed_stage(storage, uids[:20], encoded[:20], captions[:20], clip, batch_size=8)
    assert first.column("uid").to_pylist() == uids[:20]
    assert _parts(storage) == [f"{EMBEDDINGS_DIR}/part-00000.parquet"]
    assert _clip_of_part(storage, _parts(storage)[0]) == clip.identity.encode()
    image_emb, text_emb = vectors(first, "image_embedding"), vectors(first, "text_embedding")
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        first.column("clip_score").to_numpy(), (image_emb * text_emb).sum(1), atol=1e-5
    )
    expected = embed_pairs(clip, encoded[:20], captions[:20], batch_size=8)
    np.testing.assert_allclose(image_emb, expected[0], atol=1e-5)
    np.testing.assert_allclose(text_emb, expected[1], atol=1e-5)

    again = embed_stage(storage, uids[:20], encoded[:20], captions[:20], clip, batch_size=8)
    assert _parts(storage) == [f"{EMBEDDINGS_DIR}/part-00000.parquet"]
    assert again.equals(first)

    # Three new uids among known ones, in another order: one new part with exactly those three.
    order = [22, 3, 20, 0, 21, 7]
    mixed = embed_stage(
        storage, [uids[i] for i in order], [encoded[i] for i in order], [captions[i] for i in order], clip, 8
    )
    assert mixed.column("uid").to_pylist() == [uids[i] for i in order]
    assert _parts(storage) == [f"{EMBEDDINGS_DIR}/part-00000.parquet", f"{EMBEDDINGS_DIR}/part-00001.parquet"]
    new_part = storage.read_table(f"{EMBEDDINGS_DIR}/part-00001.parquet")
    assert sorted(new_part.column("uid").to_pylist()) == [uids[20], uids[21], uids[22]]
    np.testing.assert_array_equal(vectors(mixed)[[1, 3, 5]], image_emb[[3, 0, 7]])


def test_embed_stage_ignores_vectors_of_another_clip(trained, tmp_path):
    clip, _ = trained
    storage = Storage(tmp_path / "run")
    images, captions, _ = make_shapes(5, seed=7)
    encoded, uids = [png(image) for image in images], [f"u{i}" for i in range(5)]
    embed_stage(storage, uids, encoded, captions, clip, batch_size=4)

    other = copy.copy(clip)
    other.identity = "trained:another-model"
    table = embed_stage(storage, uids, encoded, captions, other, batch_size=4)
    assert table.column("uid").to_pylist() == uids
    parts = _parts(storage)
    assert len(parts) == 2  # the first CLIP's part is kept, a full part made for the other
    identities = {_clip_of_part(storage, rel) for rel in parts}
    assert identities == {clip.identity.encode(), b"trained:another-model"}
    assert storage.read_table(parts[1]).num_rows == 5


class _PixelMeans:
    """A stand-in CLIP: an image's vector is its mean colour, a caption's its length; enough to store."""

    identity = "test:pixel-means"
    embed_dim = 3

    def encode_images(self, images, batch_size=None):
        return np.array([np.asarray(image, np.float32).mean(axis=(0, 1)) + 1 for image in images], np.float32)

    def encode_texts(self, texts, batch_size=None):
        return np.array([[len(text), 1.0, 1.0] for text in texts], np.float32)


def test_embed_stage_in_a_part_scope_names_its_part_and_reads_only_its_own_and_the_numbered(tmp_path):
    storage = Storage(tmp_path / "run")
    clip = _PixelMeans()
    images, captions, _ = make_shapes(8, seed=8)
    encoded, uids = [png(image) for image in images], [f"u{i}" for i in range(8)]

    def run(rows, scope=None):
        pick = list(rows)
        return embed_stage(
            storage,
            [uids[i] for i in pick],
            [encoded[i] for i in pick],
            [captions[i] for i in pick],
            clip,
            2,
            scope,
        )

    first = run(range(4), "raw/00000.parquet")
    (part,) = _parts(storage)
    assert re.fullmatch(rf"{EMBEDDINGS_DIR}/shard-[0-9a-f]{{16}}-[0-9a-f]{{16}}\.parquet", part)
    assert run(range(4), "raw/00000.parquet").equals(first) and _parts(storage) == [part]  # its own part
    run(range(4), "raw/00001.parquet")  # another shard's scope does not read this one's parts
    assert len(_parts(storage)) == 2
    assert run(range(4)).equals(first) and len(_parts(storage)) == 2  # one process reads every part

    run(range(4, 8))  # a numbered part, which every scope reads
    assert f"{EMBEDDINGS_DIR}/part-00000.parquet" in _parts(storage)
    run(range(8), "raw/00000.parquet")
    assert len(_parts(storage)) == 3


def test_embed_stage_names_an_undecodable_image(trained, tmp_path):
    clip, _ = trained
    with pytest.raises(ValueError, match="uid broken"):
        embed_stage(Storage(tmp_path), ["broken"], [b"not an image"], ["a red circle"], clip, batch_size=4)
    assert _parts(Storage(tmp_path)) == []


# --- hard negatives (clip.hard_negatives) ------------------------------------------------


def test_hard_negatives_join_the_batch_as_extra_captions(tmp_path):
    """With demo.negatives, each pair caption brings one near miss into its batch; the loss then has the
    images choose among the captions and those negatives, and the metrics say how many there were."""
    from demo.world import WorldConfig, generate_samples

    world = WorldConfig(num_images=60, image_size=32, pair_fraction=0.5, count_fraction=0.3, two_fraction=0.2)
    samples = generate_samples(world)
    images = [Image.open(io.BytesIO(s.image)).convert("RGB") for s in samples]
    captions = [s.caption for s in samples]
    storage = Storage(str(tmp_path))
    training = TRAINING.model_copy(update={"max_steps": 3, "batch_size": 16})
    run_cfg = RunConfig(
        clip=ClipConfig(small=SMALL, device="cpu", hard_negatives="demo.negatives"), train_clip=training
    )
    task = ClipTraining.__new__(ClipTraining)
    task.storage, task.cfg = storage, run_cfg
    task.images, task.captions = [png(image) for image in images], captions
    batch = next(iter(task.dataset(16, 0, 0, 0, 1)))
    assert 0 < len(batch["negatives"]) <= 16 and batch["negatives"].shape[1] == batch["text"].shape[1]
    train(task, storage, run_cfg, run_cfg.train_clip, log=lambda line: None)
    records = [r for r in read_metrics(storage, CLIP) if "loss" in r]
    assert all(r["hard_negatives"] > 0 and 0.0 <= r["hard_negative_wins"] <= 1.0 for r in records)


def test_batch_negatives_never_push_away_a_caption_of_the_batch():
    from dalle.train.clip import batch_negatives
    from demo.negatives import hard_negatives

    captions = ["a red circle above a blue square", "a red circle below a blue square", "two red circles"]
    chosen = batch_negatives(captions, hard_negatives, random.Random(0))
    assert len(chosen) == 3 and not {c.lower() for c in chosen} & {c.lower() for c in captions}
    assert batch_negatives(["a red circle"], hard_negatives, random.Random(0)) == []


def test_hard_negatives_module_is_checked():
    from dalle.train.clip import load_hard_negatives

    with pytest.raises(ConfigError, match="cannot be imported"):
        load_hard_negatives("no_such_module_here")
    with pytest.raises(ConfigError, match="has no function hard_negatives"):
        load_hard_negatives("demo.world")
    assert load_hard_negatives(None) is None


# --- mirrored twins (clip.mirrored_captions) ---------------------------------------------


def _relation_world(n: int = 48):
    from demo.world import WorldConfig, generate_samples

    world = WorldConfig(num_images=n, image_size=32, pair_fraction=1.0, two_fraction=0.0, count_fraction=0.0)
    samples = generate_samples(world)
    return [Image.open(io.BytesIO(s.image)).convert("RGB") for s in samples], [s.caption for s in samples]


def test_mirrored_twins_show_what_their_captions_say():
    """Each twin's image, the pair's image mirrored, is judged by the demo's detector to show the twin's
    caption (the relation turned over), and the original caption no longer holds for it."""
    from dalle.train.clip import mirror, mirrored_twins
    from demo.detect import judge
    from demo.negatives import mirrored_caption

    images, captions = _relation_world()
    twins = mirrored_twins(captions, mirrored_caption, random.Random(0), limit=len(captions))
    assert len(twins) >= len(captions) // 3  # left/right always mirror; above/below unless a triangle
    axes = {axis for _, axis, _ in twins}
    assert axes == {"horizontal", "vertical"}
    for index, axis, caption in twins:
        turned = mirror(images[index], axis)
        assert caption != captions[index]
        assert judge(turned, caption)["tasks"]["position"], (captions[index], axis, caption)
        assert not judge(turned, captions[index])["tasks"]["position"], (captions[index], axis)


def test_mirrored_twins_keep_to_the_limit_and_never_repeat_a_caption_of_the_batch():
    from dalle.train.clip import mirrored_twins
    from demo.negatives import mirrored_caption

    captions = ["a red circle to the left of a blue square", "a red circle to the right of a blue square",
                "a green cross above a red circle", "a blue diamond below a red square", "two red circles"]  # fmt: skip
    twins = mirrored_twins(captions, mirrored_caption, random.Random(0), limit=10)
    # The first two are each other's mirror: neither brings a twin that is already a pair of the batch.
    assert [(i, axis) for i, axis, _ in twins] == [(2, "vertical"), (3, "vertical")]
    assert [c for _, _, c in twins] == [
        "a green cross below a red circle",
        "a blue diamond above a red square",
    ]
    assert len(mirrored_twins(captions, mirrored_caption, random.Random(0), limit=1)) == 1
    assert mirrored_twins(captions, mirrored_caption, random.Random(0), limit=0) == []


def test_mirrored_caption_turns_only_what_the_mirror_turns():
    from demo.negatives import mirrored_caption

    assert mirrored_caption("a red circle to the left of a blue square", "horizontal") == (
        "a red circle to the right of a blue square"
    )
    assert mirrored_caption("a red circle to the left of a blue square", "vertical") is None
    assert (
        mirrored_caption("a red circle above a blue square", "vertical") == "a red circle below a blue square"
    )
    # Upside down, the world's triangle points down: a shape no caption names.
    assert mirrored_caption("a red triangle above a blue square", "vertical") is None
    assert mirrored_caption("a red circle and a blue square", "horizontal") is None
    assert mirrored_caption("three red circles", "vertical") is None
    assert mirrored_caption("not a caption of this world", "horizontal") is None


def test_mirrored_twins_train_with_hard_negatives(tmp_path):
    """A batch gains its twins as extra pairs (images and captions alike, before the hard negatives), and
    training runs on such batches."""
    images, captions = _relation_world()
    storage = Storage(str(tmp_path))
    training = TRAINING.model_copy(update={"max_steps": 2, "batch_size": 16})
    clip = ClipConfig(small=SMALL, device="cpu", hard_negatives="demo.negatives",
                      mirrored_captions="demo.negatives", mirror_twins_per_batch=4)  # fmt: skip
    run_cfg = RunConfig(clip=clip, train_clip=training)
    task = ClipTraining.__new__(ClipTraining)
    task.storage, task.cfg = storage, run_cfg
    task.images, task.captions = [png(image) for image in images], captions
    batch = next(iter(task.dataset(16, 0, 0, 0, 1)))
    assert len(batch["images"]) == len(batch["text"]) == 20
    assert len(batch["negatives"]) > 0
    train(task, storage, run_cfg, run_cfg.train_clip, log=lambda line: None)
    assert [r["step"] for r in read_metrics(storage, CLIP) if "loss" in r][-1] == 2


def test_mirrored_captions_module_is_checked():
    from dalle.train.clip import load_mirrored_captions

    with pytest.raises(ConfigError, match="has no function mirrored_caption"):
        load_mirrored_captions("demo.world")
    assert load_mirrored_captions(None) is None


def test_blurred_images_are_as_soft_as_a_small_decode_and_keep_their_size():
    from dalle.train.clip import blurred

    image = Image.new("RGB", (64, 48), (236, 234, 226))
    ImageDraw.Draw(image).rectangle([20, 10, 40, 30], fill=(35, 60, 215))
    soft = blurred(image, 16)
    assert soft.size == (64, 48) and soft.mode == "RGB"
    edges = lambda im: np.abs(np.diff(np.asarray(im, dtype=np.float32), axis=1)).max()
    assert edges(soft) < 0.6 * edges(image)  # a hard edge is smeared over several pixels
    assert np.abs(np.asarray(soft, dtype=np.float32) - np.asarray(image, dtype=np.float32)).mean() < 20
    assert blurred(image, 64) is image  # not larger than the side: as it is


def test_blur_side_softens_that_share_of_a_batch(tmp_path):
    images, captions, _ = make_shapes(32, seed=4)

    def batch(**changes):
        run_cfg = RunConfig(clip=ClipConfig(small=SMALL, device="cpu", **changes), train_clip=TRAINING)
        task = ClipTraining.__new__(ClipTraining)
        task.storage, task.cfg = Storage(str(tmp_path)), run_cfg
        task.images, task.captions = [png(image) for image in images], captions
        torch.manual_seed(0)  # the augmentation's random crops
        return next(iter(task.dataset(16, 0, 0, 0, 1)))["images"]

    sharp, every, none = (
        batch(),
        batch(blur_side=8, blur_probability=1.0),
        batch(blur_side=8, blur_probability=0.0),
    )
    torch.testing.assert_close(none, sharp)

    # Every image softened: less energy in the differences of neighbouring pixels, image by image (a
    # smeared edge keeps its total rise, spread over more pixels).
    def roughness(x):
        return (x[..., 1:] - x[..., :-1]).pow(2).mean(dim=(1, 2, 3))

    assert (roughness(every) < roughness(sharp)).all()
    half = batch(blur_side=8, blur_probability=0.5)
    changed = int((roughness(half) < roughness(sharp) - 1e-4).sum())
    assert 2 <= changed <= 14, changed
