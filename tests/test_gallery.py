"""Galleries: sampled, ranked images per prompt written as static pages; captions never become markup."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import re
import urllib.request

import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import pytest
import torch

from dalle.config import DVAEConfig, TokenizerConfig, TransformerConfig
from dalle.errors import UserError
from dalle.models.dvae import DiscreteVAE
from dalle.models.transformer import DalleTransformer
from dalle.runroot import GALLERY_INDEX, METRICS, gallery_dir
from dalle.sample.page import Completion, GalleryPage, Section, write_gallery_page, write_standalone_page
from dalle.sample.rerank import PromptSamples, SamplingSettings, samples_for
from dalle.storage import Storage
from dalle.tokens.bpe import train_bpe
from flows.gallery import gallery_flow, transformer_checkpoint

HOSTILE = "a red circle <script>document.title='pwned'</script> & \"quotes\""
RELATION = "a blue square above a red circle"
PAIRING = "a blue square and a red circle"


def _samples(prompt: str, count: int, seed: int) -> PromptSamples:
    rng = np.random.default_rng(seed)
    images = [PIL.Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(count)]
    scores = rng.random(count).astype(np.float32)
    return PromptSamples(prompt, images, scores, [int(i) for i in np.argsort(-scores)])


def _relation_samples(prompt: str, count: int, seed: int, kind: str = "relation") -> PromptSamples:
    samples = _samples(prompt, count, seed)
    margins = np.linspace(-0.2, 0.2, count).astype(np.float32)
    setattr(samples, f"{kind}_margins", margins)
    samples.ranking = [int(i) for i in np.argsort(-(samples.scores + margins))]
    return samples


def test_gallery_pages_images_and_scores(run_root):
    storage = Storage(run_root)
    storage.write_bytes(
        METRICS,
        b'{"model": "transformer", "step": 1, "loss": 3.0}\n{"model": "transformer", "step": 2, "loss": 2.5}\n',
    )
    page = GalleryPage(
        step=2,
        checkpoint_uri=storage.uri("models/transformer/step_00000002"),
        sections=[
            Section(
                "held-out",
                [
                    _samples(HOSTILE, 5, 0),
                    _relation_samples(RELATION, 5, 1),
                    _relation_samples(PAIRING, 5, 2, "binding"),
                ],
                top=3,
            )
        ],
        completions=[
            Completion("a green cross", PIL.Image.new("RGB", (8, 8)), [PIL.Image.new("RGB", (8, 8))] * 2, 4)
        ],
        evaluation={
            "tasks": ["colors", "position"],
            "levels": {
                "heldout": {
                    "title": "<b>held out</b>",
                    "tasks": {"colors": {"before": 0.5, "after": 0.75}},
                    "overall": {"before": 0.5, "after": 0.75, "spread": {"before": 0.04, "after": 0.06}},
                }
            },
        },
        sampling=SamplingSettings(num_samples=5, top=3, cond_scale=2.0).described(),
    )
    uri = write_gallery_page(storage, page)
    folder = gallery_dir(2)
    assert uri == storage.uri(f"{folder}/index.html")
    text = storage.read_bytes(f"{folder}/index.html").decode()
    assert "<script>" not in text and "&lt;script&gt;" in text
    for src in re.findall(r"src='([^']+)'", text):
        image = PIL.Image.open(io.BytesIO(storage.read_bytes(f"{folder}/{src}")))
        assert image.size == (16, 16)  # shown twice the size, pixels kept sharp
    assert len(re.findall(r"<img ", text)) == 3 * 3 + 1 + 2

    scores = pq.read_table(io.BytesIO(storage.read_bytes(f"{folder}/scores.parquet"))).to_pylist()
    assert len(scores) == 15 and sum(r["shown"] for r in scores) == 9
    first = [r for r in scores if r["prompt"] == HOSTILE]
    assert [r["rank"] for r in first] == list(range(5))
    assert all(a["clip_score"] >= b["clip_score"] for a, b in itertools.pairwise(first))
    assert all(r["relation_margin"] is None and r["binding_margin"] is None for r in first)
    # A relation prompt's samples: ranked by score plus margin, the margin recorded and shown signed.
    placed = [r for r in scores if r["prompt"] == RELATION]
    keys = [r["clip_score"] + r["relation_margin"] for r in placed]
    assert keys == sorted(keys, reverse=True) and len({r["relation_margin"] for r in placed}) == 5
    assert f"{placed[0]['clip_score']:.3f} {placed[0]['relation_margin']:+.3f}</figcaption>" in text
    assert all(r["binding_margin"] is None for r in placed)
    # A two-object prompt's samples: the same with the binding margin.
    paired = [r for r in scores if r["prompt"] == PAIRING]
    keys = [r["clip_score"] + r["binding_margin"] for r in paired]
    assert keys == sorted(keys, reverse=True) and all(r["relation_margin"] is None for r in paired)
    assert f"{paired[0]['clip_score']:.3f} {paired[0]['binding_margin']:+.3f}</figcaption>" in text

    summary = json.loads(storage.read_bytes(f"{folder}/summary.json"))
    assert summary["prompts"][0]["best"] == max(r["clip_score"] for r in first)
    # How the samples were drawn sits next to the figures, on the page and in the summary.
    assert summary["sampling"]["cond_scale"] == 2.0
    assert "cond_scale 2.0" in text and "samples_per_prompt 5" in text
    index = storage.read_bytes(GALLERY_INDEX).decode()
    assert "href='step_00000002/index.html'" in index
    assert storage.exists("galleries/loss.png") and storage.exists("galleries/eval.png")
    # The scorecard as a table: a task the level lacks shows "-", a reported spread its "±", titles are escaped.
    assert "<td>0.50 / 0.75</td><td>-</td><td>0.50 / 0.75 ±0.06</td>" in text
    assert "&lt;b&gt;held out&lt;/b&gt;" in text

    # The link the Prefect UI shows opens in a browser: one self-contained page (images inlined),
    # a presigned HTTPS URL for S3 (fetched here from the S3 endpoint) or a file:// URL.
    standalone = write_standalone_page(storage, f"{folder}/index.html")
    link = storage.browser_url(standalone)
    if storage.is_s3:
        assert link.startswith(os.environ["AWS_ENDPOINT_URL"]) and "Signature" in link
        page_text = urllib.request.urlopen(link, timeout=10).read().decode()
    else:
        assert link.startswith("file://")
        page_text = urllib.request.urlopen(link).read().decode()
    inlined = re.findall(r"src='data:image/png;base64,([^']+)'", page_text)
    assert len(inlined) == len(re.findall(r"<img ", text)) == 12
    assert PIL.Image.open(io.BytesIO(base64.b64decode(inlined[0]))).size == (16, 16)
    assert "<script>" not in page_text


def test_samples_for_draws_ranks_and_decodes():
    torch.manual_seed(0)
    dvae = DiscreteVAE(DVAEConfig(image_size=16, downsample_steps=2, codebook_size=16, hidden_width=8)).eval()
    tokenizer = train_bpe(["a red circle", "a blue square"] * 10, TokenizerConfig(vocab_size=300))
    model = DalleTransformer(
        TransformerConfig(text_seq_len=8, width=32, depth=1, heads=2), tokenizer.vocab_size, 16, 4
    )
    settings = SamplingSettings(num_samples=5, batch_size=2, seed=3)
    out = samples_for("a red circle", model, dvae, tokenizer, None, settings)
    assert len(out.images) == 5 and out.images[0].size == (16, 16)
    again = samples_for("a red circle", model, dvae, tokenizer, None, settings)
    assert [np.asarray(i).tobytes() for i in out.images] == [np.asarray(i).tobytes() for i in again.images]


@pytest.mark.parametrize(
    "checkpoint",
    [
        "../../x",
        "models/transformer/../../../x",
        "{root}/../other-root/models/transformer/step_00000100",
        "/etc/passwd",
        "s3://elsewhere/run/models/transformer/step_00000100",
        "models/dvae/step_00000100",
        "models/transformer/step_00000100/../../dvae/step_00000100",
        "models/transformer/step_100",
        "models/transformer",
    ],
)
def test_the_gallery_refuses_anything_but_a_transformer_checkpoint_of_its_root(tmp_path, checkpoint):
    # The gallery deployment takes root and checkpoint from a dalle.checkpoint.saved event.
    root = tmp_path / "run"
    checkpoint = checkpoint.format(root=root)
    with pytest.raises(UserError) as refused:  # a user error: the flow does not retry it
        gallery_flow.fn(str(root), checkpoint)
    message = str(refused.value)
    assert checkpoint in message and "\n" not in message
    assert "is not a transformer checkpoint of" in message or "is not under the run root" in message
    assert not root.exists()  # refused before any work


def test_the_gallery_takes_a_checkpoint_as_its_uri_or_its_path_in_the_root(tmp_path):
    storage = Storage(tmp_path / "run")
    rel = "models/transformer/step_00000100"
    assert transformer_checkpoint(storage, storage.uri(rel)) == rel
    assert transformer_checkpoint(storage, storage.uri(rel) + "/") == rel
    assert transformer_checkpoint(storage, f"./{rel}/") == rel
