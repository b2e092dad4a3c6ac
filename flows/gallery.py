"""The gallery flow: sample, rerank and draw a transformer checkpoint's gallery (and its zero-shot eval)."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from dalle.config import Location
from dalle.runroot import (
    GALLERY_SUMMARY,
    TRANSFORMER,
    checkpoint_rel,
    checkpoint_step,
    gallery_dir,
    run_config,
)
from dalle.sample.evaluation import cell_text, scorecard_rows
from dalle.sample.gallery import draw_gallery
from dalle.sample.page import write_standalone_page
from dalle.sample.rerank import describe_sampling
from dalle.storage import Storage, StorageError
from flows.common import Progress, link_target, literal_markdown, log, retry_unless_user_error, timed, timeout


def path_in_root(storage: Storage, location: str) -> str:
    """A checkpoint or page given as a URI under the run root, or already relative to it."""
    root = storage.uri().rstrip("/") + "/"
    if location.startswith(root):
        return location[len(root) :].rstrip("/")
    if "://" in location or location.startswith("/"):
        raise StorageError(f"{location} is not under the run root {storage.uri()}; pass --out its root")
    return location.rstrip("/")


def transformer_checkpoint(storage: Storage, location: str) -> str:
    """The transformer checkpoint folder `location` names, relative to the run root; refuses (as a user
    error, not retried) any path that is not one, since an event's parameters are not to be trusted."""
    return checkpoint_rel(path_in_root(storage, location), TRANSFORMER, storage.uri(), given=location)


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
@timed("gallery")
def draw(root: str, checkpoint: str, config: dict[str, Any] | str | None) -> dict:
    storage = Storage(root)
    rel = transformer_checkpoint(storage, checkpoint)
    cfg = run_config(storage, config)
    with timeout(cfg.orchestration.gallery_timeout_s, "orchestration.gallery_timeout_s"):
        progress = Progress(
            "gallery-progress",
            f"gallery of {literal_markdown(storage.uri(rel))}",
            cfg.orchestration.progress_every_s,
        )
        uri = draw_gallery(storage, cfg, rel, log=log, on_progress=progress.update)
    step = checkpoint_step(rel)
    return {"uri": uri, "summary": storage.read_json(f"{gallery_dir(step)}/{GALLERY_SUMMARY}")}


@flow(name="gallery")
def gallery_flow(root: Location, checkpoint: Location, config: dict[str, Any] | str | None = None) -> str:
    """Draw the gallery of one transformer checkpoint (URI or path under the root); returns the page URI."""
    checkpoint = transformer_checkpoint(Storage(root), checkpoint)  # before any work: fails fast
    result = draw(root, checkpoint, config)
    summary = result["summary"]
    # Prompts, sections and paths are the user's text, and the UIs render artifacts (and the v1 UI
    # string cells of tables) as Markdown: each is shown by literal_markdown.
    create_table_artifact(
        key="gallery-prompts",
        table=[
            {
                "section": literal_markdown(p["section"]),
                "prompt": literal_markdown(p["prompt"]),
                "best_clip": p["best"],
                "mean_clip": p["mean"],
            }
            for p in summary["prompts"]
        ],
        description=f"CLIP scores per prompt at step {summary['step']}",
    )
    lines = [f"### Gallery, step {summary['step']}", "", f"Page: {literal_markdown(result['uri'])}", ""]
    columns, rows = scorecard_rows(summary.get("evaluation") or {})
    for level, cells in rows:
        # The evaluator plug-in's own names, not the user's or the web's text.
        shown = ", ".join(f"{column} {cell_text(cell)}" for column, cell in zip(columns, cells) if cell)
        lines.append(f"- **{level}** (before/after reranking): {shown}")
    if summary.get("sampling"):
        lines += ["", f"Sampled with {describe_sampling(summary['sampling'])}."]
    create_markdown_artifact(key="gallery-summary", markdown="\n".join(lines), description="gallery summary")
    storage = Storage(root)
    page = write_standalone_page(storage, path_in_root(storage, result["uri"]))
    create_link_artifact(
        key="gallery",
        link=link_target(storage.browser_url(page)),
        link_text=f"gallery of step {int(summary['step'])}",
        description=(
            f"gallery of step {int(summary['step'])} ({literal_markdown(result['uri'])}); "
            "an S3 link expires after 7 days"
        ),
    )
    return result["uri"]
