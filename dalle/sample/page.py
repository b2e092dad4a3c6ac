"""Static HTML galleries: one page per checkpoint, and an index over every checkpoint.

    {root}/galleries/step_XXXXXXXX/index.html    reranked samples per prompt, completions, eval
    {root}/galleries/step_XXXXXXXX/img/*.png
    {root}/galleries/step_XXXXXXXX/scores.parquet one row per sample: prompt, section, rank, clip_score, relation_margin, binding_margin, shown
    {root}/galleries/step_XXXXXXXX/summary.json   what the index page and the plots read
    {root}/galleries/index.html                   every checkpoint, with loss and eval plots

Captions come from the web: every text is escaped, nothing from a caption is ever markup.
Images and tables are written first and the page last, so a page never links a missing file.
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass, field

import PIL.Image
import pyarrow as pa

from dalle.runroot import (
    GALLERIES_DIR,
    GALLERY_INDEX,
    GALLERY_SUMMARY,
    TRANSFORMER,
    gallery_dir,
    read_metrics,
)
from dalle.sample.evaluation import cell_text, scorecard_rows
from dalle.sample.rerank import PromptSamples, describe_sampling
from dalle.storage import Storage


@dataclass
class Section:
    """A titled group of prompts, each shown as its `top` best samples."""

    title: str
    samples: list[PromptSamples]
    top: int = 8
    key: str = ""  # the evaluation group its prompts belong to, if any


@dataclass
class Completion:
    """The paper's image-to-image trick: the top rows of an image's codes kept, the rest sampled."""

    caption: str
    original: PIL.Image.Image
    completions: list[PIL.Image.Image]
    rows_kept: int


@dataclass
class GalleryPage:
    step: int
    checkpoint_uri: str
    sections: list[Section]
    completions: list[Completion] = field(default_factory=list)
    evaluation: dict | None = None
    sampling: dict = field(default_factory=dict)  # SamplingSettings.described()
    settings_fingerprint: str = ""  # of the gallery config it was drawn with: a changed one redraws it


def _png(image: PIL.Image.Image, scale: int) -> bytes:
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), PIL.Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
.prompt { margin: 1.2em 0; }
.row { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; text-align: center; font-size: 12px; }
img { image-rendering: pixelated; border: 1px solid #ccc; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 2px 8px; }
.caption { font-weight: 600; }
"""


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _eval_table(evaluation: dict) -> str:
    columns, rows = scorecard_rows(evaluation)
    if not rows:
        return ""
    header = "".join(f"<th>{html.escape(name)}</th>" for name in columns)
    body = []
    for level, cells in rows:
        shown = "".join(
            f"<td>{html.escape(cell_text(cell, ' / '))}</td>" if cell else "<td>-</td>" for cell in cells
        )
        title = (evaluation["levels"][level] or {}).get("title", "")
        body.append(f"<tr><th title='{html.escape(title)}'>{html.escape(level)}</th>{shown}</tr>")
    return (
        "<h2>Evaluation</h2><p>Share of images right per task, before / after reranking; ± is the after "
        "figure's standard error over prompts, where the evaluator reports one.</p>"
        f"<table><tr><th></th>{header}</tr>{''.join(body)}</table>"
    )


def write_gallery_page(storage: Storage, page: GalleryPage, scale: int = 2) -> str:
    """Write the checkpoint's gallery (images, scores.parquet, summary.json, then index.html); returns its URI."""
    folder = gallery_dir(page.step)
    records, parts, per_prompt = [], [], []
    parts.append(
        f"<h1>Checkpoint step {page.step}</h1><p><code>{html.escape(page.checkpoint_uri)}</code></p>"
    )
    parts.append("<p><a href='../index.html'>all checkpoints</a></p>")
    if page.sampling:
        parts.append(f"<p class='sampling'>Sampled with {html.escape(describe_sampling(page.sampling))}.</p>")
    if page.evaluation:
        parts.append(_eval_table(page.evaluation))
    for s_index, section in enumerate(page.sections):
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        for p_index, samples in enumerate(section.samples):
            figures = []
            relation = (
                None if samples.relation_margins is None else [float(m) for m in samples.relation_margins]
            )
            binding = None if samples.binding_margins is None else [float(m) for m in samples.binding_margins]
            margins = relation if relation is not None else binding  # a prompt has at most one of them
            for rank, index in enumerate(samples.ranking):
                shown = rank < section.top
                records.append(
                    {
                        "section": section.title,
                        "prompt": samples.prompt,
                        "sample": index,
                        "rank": rank,
                        "clip_score": float(samples.scores[index]),
                        "relation_margin": relation[index] if relation is not None else None,
                        "binding_margin": binding[index] if binding is not None else None,
                        "shown": shown,
                    }
                )
                if shown:
                    rel = f"img/s{s_index}_p{p_index:03d}_r{rank:02d}.png"
                    storage.write_bytes(f"{folder}/{rel}", _png(samples.images[index], scale))
                    caption = f"{samples.scores[index]:.3f}"
                    # Ranked by the score plus the weighted relation or binding margin: shown signed.
                    if margins is not None:
                        caption += f" {margins[index]:+.3f}"
                    figures.append(
                        f"<figure><img src='{rel}' alt='sample {rank + 1}'>"
                        f"<figcaption>{caption}</figcaption></figure>"
                    )
            scores = samples.scores
            per_prompt.append(
                {
                    "section": section.title,
                    "prompt": samples.prompt,
                    "best": float(scores.max()) if len(scores) else None,
                    "mean": float(scores.mean()) if len(scores) else None,
                }
            )
            parts.append(
                f"<div class='prompt'><div class='caption'>{html.escape(samples.prompt)}</div>"
                f"<div class='row'>{''.join(figures)}</div></div>"
            )
    if page.completions:
        parts.append("<h2>Image completion (top rows kept, the rest sampled)</h2>")
        for c_index, completion in enumerate(page.completions):
            original = f"img/c{c_index:03d}_original.png"
            storage.write_bytes(f"{folder}/{original}", _png(completion.original, scale))
            figures = [
                f"<figure><img src='{original}' alt='original'><figcaption>original</figcaption></figure>"
            ]
            for k, image in enumerate(completion.completions):
                rel = f"img/c{c_index:03d}_{k:02d}.png"
                storage.write_bytes(f"{folder}/{rel}", _png(image, scale))
                figures.append(
                    f"<figure><img src='{rel}' alt='completion {k + 1}'><figcaption>{k + 1}</figcaption></figure>"
                )
            parts.append(
                f"<div class='prompt'><div class='caption'>{html.escape(completion.caption)} "
                f"({completion.rows_kept} rows kept)</div><div class='row'>{''.join(figures)}</div></div>"
            )
    storage.write_table(
        f"{folder}/scores.parquet", pa.Table.from_pylist(records) if records else pa.table({})
    )
    storage.write_json(
        f"{folder}/{GALLERY_SUMMARY}",
        {
            "step": page.step,
            "checkpoint": page.checkpoint_uri,
            "prompts": per_prompt,
            "evaluation": page.evaluation,
            "sampling": page.sampling,
            "settings_fingerprint": page.settings_fingerprint,
        },
    )
    storage.write_bytes(f"{folder}/index.html", _page(f"step {page.step}", "\n".join(parts)).encode())
    write_gallery_index(storage)
    return storage.uri(f"{folder}/index.html")


def _plot(series: dict[str, tuple[list, list]], title: str, ylabel: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_gallery_index(storage: Storage) -> str:
    """galleries/index.html: a link per checkpoint gallery, the training loss and eval figures plotted."""
    summaries = []
    for name in storage.subfolders(GALLERIES_DIR):
        if name.startswith("step_") and storage.exists(f"{GALLERIES_DIR}/{name}/{GALLERY_SUMMARY}"):
            summaries.append(storage.read_json(f"{GALLERIES_DIR}/{name}/{GALLERY_SUMMARY}"))
    summaries.sort(key=lambda s: s["step"])
    parts = ["<h1>Galleries</h1>"]
    records = [r for r in read_metrics(storage, TRANSFORMER) if "loss" in r and "step" in r]
    if records:
        steps, losses = [r["step"] for r in records], [r["loss"] for r in records]
        if steps:
            storage.write_bytes(
                f"{GALLERIES_DIR}/loss.png", _plot({"loss": (steps, losses)}, "transformer loss", "loss")
            )
            parts.append("<img src='loss.png' alt='training loss'>")
    series: dict[str, tuple[list, list]] = {}
    for summary in summaries:
        _, rows = scorecard_rows(summary.get("evaluation") or {})
        for level, cells in rows:
            if cells[-1]:  # the level's overall
                xs, ys = series.setdefault(f"{level} overall (reranked)", ([], []))
                xs.append(summary["step"])
                ys.append(cells[-1]["after"])
    if series:
        storage.write_bytes(f"{GALLERIES_DIR}/eval.png", _plot(series, "evaluation", "overall score"))
        parts.append("<img src='eval.png' alt='evaluation across checkpoints'>")
    items = "".join(
        f"<li><a href='step_{s['step']:08d}/index.html'>step {s['step']}</a></li>"
        for s in reversed(summaries)
    )
    parts.append(f"<ul>{items}</ul>")
    storage.write_bytes(GALLERY_INDEX, _page("galleries", "\n".join(parts)).encode())
    return storage.uri(GALLERY_INDEX)


_IMAGE_SOURCE = re.compile(r"src='([^':/]+(?:/[^':/]+)*\.png)'")


def write_standalone_page(storage: Storage, page_rel: str) -> str:
    """A copy of the page at `page_rel` with its images inlined (data: URIs), next to it as
    standalone.html: one object that opens on its own, e.g. through a presigned S3 link; returns its
    path relative to the root."""
    folder = page_rel.rpartition("/")[0]
    text = storage.read_bytes(page_rel).decode()

    def inline(match: re.Match) -> str:
        rel = f"{folder}/{match.group(1)}" if folder else match.group(1)
        if not storage.exists(rel):
            return match.group(0)
        return f"src='data:image/png;base64,{base64.b64encode(storage.read_bytes(rel)).decode()}'"

    target = f"{folder}/standalone.html" if folder else "standalone.html"
    storage.write_bytes(target, _IMAGE_SOURCE.sub(inline, text).encode())
    return target
