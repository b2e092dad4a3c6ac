"""The curation flow: crawl → filter → (train the small CLIP) → score → deduplicate → curated shards.

Thin orchestration over `dalle.curate`: tasks pass the run root and small summaries,
never images or arrays; retries sit on the tasks that touch the network or storage. A run that
keeps no pair, or lets too few through the rule filters to train the small CLIP, still writes the
ledger and the funnel, then fails with one line that says why (`fates.TooFewPairs`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dalle.config import ClipConfig, Location, RunConfig, as_config, with_changes
from dalle.curate import crawl as crawl_lib
from dalle.curate import dedup, embed, fates, filters, ledger
from dalle.curate.crawl import finished_shards
from dalle.models.clip import ClipModel, load_clip
from dalle.runroot import CLIP, RAW_DIR, SAMPLES_REPORT, run_config
from dalle.storage import Storage
from dalle.timings import timed_stage
from dalle.train.launch import launch
from flows.common import Progress, announce_checkpoint, literal_markdown, timed, timeout, trainer_slot
from flows.common import log as _log
from flows.common import retry_unless_user_error as _retry_unless_user_error


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_user_error)
@timed("prepare_input")
def prepare_input(urls: str, root: str, cfg: RunConfig) -> dict:
    storage = Storage(root)
    run_config(storage, cfg)  # checks the root is writable, then keeps the configuration with the run
    prepared = crawl_lib.prepare_input(urls, storage, cfg.crawl)
    _log(
        f"{prepared.input_rows} input rows, {prepared.to_crawl} to crawl, refused before crawling: {prepared.refused}"
    )
    return prepared.__dict__


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=_retry_unless_user_error)
@timed("crawl")
def crawl(root: str, cfg: RunConfig, prepared: dict) -> list[str]:
    shards = crawl_lib.run_crawl(Storage(root), cfg.crawl, crawl_lib.PreparedInput(**prepared), log=_log)
    _log(f"{len(shards)} raw shards finished under {Storage(root).uri(RAW_DIR)}")
    return shards


@task
@timed("filter")
def apply_filters(root: str, cfg: RunConfig, shards: list[str]) -> dict:
    counts = filters.filter_stage(Storage(root), cfg)
    _log(f"rule filters: {counts}")
    return counts


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_user_error)
def filter_shard(root: str, cfg: RunConfig, rel: str) -> pa.Table:
    """One raw shard's fates, on whichever worker the task runner picks."""
    return filters.filter_shard(Storage(root), rel, cfg.filter)


@flow(name="filter-on-dask")
def filter_on_dask(root: str, cfg: RunConfig) -> dict:
    """The rule filters with each raw shard a task on the flow's task runner (a DaskTaskRunner at
    orchestration.dask_address), then every fate written in input order, as the in-process stage does."""
    storage = Storage(root)
    with timed_stage(storage, "filter"):
        futures = filter_shard.map(root, unmapped(cfg), finished_shards(storage))
        counts = filters.write_filter_decisions(storage, [future.result() for future in futures])
    _log(f"rule filters on {cfg.orchestration.dask_address}: {counts}")
    return counts


def _on_dask(subflow, cfg: RunConfig):
    """`subflow` with its tasks on the Dask cluster of orchestration.dask_address."""
    from prefect_dask import DaskTaskRunner  # only runs that use a cluster import Dask

    return subflow.with_options(task_runner=DaskTaskRunner(address=cfg.orchestration.dask_address))


def run_filters(root: str, cfg: RunConfig, shards: list[str]) -> dict:
    """The filter stage here, or on the Dask cluster of orchestration.dask_address."""
    if not cfg.orchestration.dask_address:
        return apply_filters(root, cfg, shards)
    return _on_dask(filter_on_dask, cfg)(root, cfg)


def pairs_needed(cfg: RunConfig) -> int:
    """The fewest pairs that must pass the rule filters: enough to train the small CLIP, unless a
    pretrained CLIP or checkpoint is configured."""
    return 1 if cfg.clip.pretrained or cfg.clip.checkpoint else fates.SMALL_CLIP_MIN_PAIRS


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_user_error)
def record_unscored(root: str, cfg: RunConfig) -> None:
    fates.record_unscored(
        Storage(root),
        f"too few pairs passed the rule filters to train the small CLIP (it needs {pairs_needed(cfg)}), "
        "so no CLIP scored this one",
    )


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=_retry_unless_user_error)
@timed("train_clip")
def train_clip(root: str, cfg: RunConfig, filtered: dict) -> str | None:
    """The small CLIP, trained on the shared loop (resumed, or left as it is once at train_clip.max_steps),
    unless a pretrained CLIP or checkpoint is configured (None)."""
    if cfg.clip.pretrained or cfg.clip.checkpoint:
        return None
    with trainer_slot(root, cfg.orchestration.trainer_wait_s, cfg.orchestration.trainer_lease_s):
        return launch(CLIP, root, cfg, on_checkpoint=announce_checkpoint, log=_log)


def open_clip_model(cfg: RunConfig, checkpoint_uri: str | None) -> ClipModel:
    """The configured CLIP, or the one trained in the run at `checkpoint_uri`."""
    if checkpoint_uri is None:
        return load_clip(cfg.clip)
    return load_clip(with_changes(cfg.clip, "clip", checkpoint=checkpoint_uri))


@functools.lru_cache(maxsize=1)
def _worker_clip(clip_json: str, checkpoint_uri: str | None) -> ClipModel:
    """The CLIP on a Dask worker, loaded once for all the shards the worker embeds."""
    return open_clip_model(RunConfig(clip=ClipConfig.model_validate_json(clip_json)), checkpoint_uri)


@task
@timed("score")
def score(root: str, cfg: RunConfig, clip_uri: str | None) -> dict:
    counts = embed.score_stage(Storage(root), cfg, open_clip_model(cfg, clip_uri))
    _log(f"CLIP-score filter: {counts}")
    return counts


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_user_error)
def embed_shard(root: str, cfg: RunConfig, clip_uri: str | None, rel: str) -> int:
    """One raw shard's passing pairs embedded and stored, on whichever worker the task runner picks."""
    return embed.embed_shard(Storage(root), cfg, _worker_clip(cfg.clip.model_dump_json(), clip_uri), rel)


@flow(name="score-on-dask")
def score_on_dask(root: str, cfg: RunConfig, clip_uri: str | None) -> dict:
    """The CLIP embedding with each raw shard a task on the flow's task runner (a DaskTaskRunner at
    orchestration.dask_address), then the CLIP-score filter here over the stored vectors, as the
    in-process stage does."""
    storage = Storage(root)
    with timed_stage(storage, "score"):
        futures = embed_shard.map(root, unmapped(cfg), unmapped(clip_uri), embed.shards_to_embed(storage))
        pairs = sum(future.result() for future in futures)
        counts = embed.score_stage(storage, cfg, open_clip_model(cfg, clip_uri))
    _log(f"CLIP-score filter, {pairs} pairs embedded on {cfg.orchestration.dask_address}: {counts}")
    return counts


def run_score(root: str, cfg: RunConfig, clip_uri: str | None) -> dict:
    """The embed stage and CLIP-score filter here, or the embedding on the Dask cluster of
    orchestration.dask_address."""
    if not cfg.orchestration.dask_address:
        return score(root, cfg, clip_uri)
    return _on_dask(score_on_dask, cfg)(root, cfg, clip_uri)


@task
@timed("dedup")
def deduplicate(root: str, cfg: RunConfig, clip_uri: str | None, scored: dict) -> dict:
    report = dedup.dedup_stage(Storage(root), cfg, open_clip_model(cfg, clip_uri))
    _log(f"dedup: {report['duplicates_exact']} exact, {report['duplicates_near']} near duplicates")
    return report


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_user_error)
def search_clusters(root: str, rel: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The near-duplicate pairs of a batch of dedup's clusters, on whichever worker the runner picks."""
    return dedup.search_stored_batch(Storage(root), rel, threshold)


@flow(name="dedup-on-dask")
def dedup_on_dask(root: str, cfg: RunConfig, clip_uri: str | None) -> dict:
    """Dedup here, with the range searches of `partition: clusters` as tasks on the flow's task runner
    (a DaskTaskRunner at orchestration.dask_address), each reading its batch of clusters from the run root."""
    storage = Storage(root)

    def submit(rel: str, threshold: float):
        return search_clusters.submit(root, rel, threshold).result

    with timed_stage(storage, "dedup"):
        search = dedup.search_through_storage(storage, submit)
        report = dedup.dedup_stage(storage, cfg, open_clip_model(cfg, clip_uri), search)
    _log(
        f"dedup, clusters searched on {cfg.orchestration.dask_address}: {report['duplicates_exact']} exact, "
        f"{report['duplicates_near']} near duplicates"
    )
    return report


def run_dedup(root: str, cfg: RunConfig, clip_uri: str | None, scored: dict) -> dict:
    """Dedup here, or with its clusters searched on the Dask cluster of orchestration.dask_address."""
    if not cfg.orchestration.dask_address:
        return deduplicate(root, cfg, clip_uri, scored)
    return _on_dask(dedup_on_dask, cfg)(root, cfg, clip_uri)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_user_error)
@timed("publish")
def write_curated(root: str, cfg: RunConfig, clip_uri: str | None, dedup_report: dict) -> dict:
    return ledger.write_curated(Storage(root), cfg, dedup_report["clip_model"])


def _curation_artifacts(root: str, report: dict) -> None:
    """The funnel as a table and a summary with examples of removed rows. The rows' URLs, captions and
    details come from the web and from the user's list, so each is shown by `literal_markdown`."""
    storage = Storage(root)
    funnel = [
        {"stage": "input rows", "count": report["input_rows"]},
        *({"stage": f"blocked: {k}", "count": v} for k, v in report["blocked"].items()),
        *({"stage": f"download failed: {k}", "count": v} for k, v in report["download_failed"].items()),
        {"stage": "downloaded", "count": report["downloaded"]},
        *({"stage": f"filtered: {k}", "count": v} for k, v in report["filtered"].items()),
        {"stage": "exact duplicates", "count": report["duplicates_exact"]},
        {"stage": "near duplicates", "count": report["duplicates_near"]},
        {"stage": "kept", "count": report["kept"]},
    ]
    create_table_artifact(
        key="curation-funnel",
        table=funnel,
        description=f"Curation funnel of {literal_markdown(storage.root)}",
    )
    lines = [
        f"# Curation of {literal_markdown(storage.root)}",
        "",
        (
            f"**{report['kept']}** of {report['input_rows']} input rows kept; "
            f"{report['duplicates_exact']} exact and {report['duplicates_near']} near duplicates removed."
        ),
        "",
    ]
    widths = {"fate": 40, "reason": 40, "url": 120, "caption": 80, "detail": 160}  # characters shown
    lines += ["| " + " | ".join(widths) + " |", "|" + " --- |" * len(widths)]
    for entry in ledger.examples_of_removals(storage):
        cells = [literal_markdown(entry[k] or "", width, table_cell=True) for k, width in widths.items()]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Per-sample ledger: {literal_markdown(storage.uri(SAMPLES_REPORT))}"]
    create_markdown_artifact(key="curation-summary", markdown="\n".join(lines))


@flow(name="curate", log_prints=True)
def curate_flow(urls: Location, root: Location, config: dict[str, Any] | str | None = None) -> dict:
    """Crawl `urls` into the run root `root` and curate it; returns reports/curate.json. A list that
    grew since the last run is curated incrementally: only its new rows are crawled. `config`: a
    mapping, or a YAML path or s3:// URI (default: the built-in defaults)."""
    cfg = as_config(config)
    with timeout(cfg.orchestration.curate_timeout_s, "orchestration.curate_timeout_s"):
        return _curate(urls, root, cfg)


def _curate(urls: str, root: str, cfg: RunConfig) -> dict:
    stages = 7
    progress = Progress(
        "curation-progress",
        f"curation of {literal_markdown(urls)} into {literal_markdown(root)}",
        cfg.orchestration.progress_every_s,
    )
    prepared = prepare_input(urls, root, cfg)
    progress.update(1, stages)
    shards = crawl(root, cfg, prepared)
    progress.update(2, stages)
    filtered = run_filters(root, cfg, shards)
    progress.update(3, stages)
    passed = filtered.get(fates.PASS, 0)
    if passed < pairs_needed(cfg):
        # Nothing for a CLIP to learn from or score: the fates so far become the ledger and the funnel.
        record_unscored(root, cfg)
        report = write_curated(root, cfg, None, {"clip_model": None})  # no CLIP made these fates
        _curation_artifacts(root, report)
        raise fates.too_few_pairs(Storage(root), passed, pairs_needed(cfg) if passed else None)
    clip_uri = train_clip(root, cfg, filtered)
    progress.update(4, stages)
    scored = run_score(root, cfg, clip_uri)
    progress.update(5, stages)
    dedup_report = run_dedup(root, cfg, clip_uri, scored)
    progress.update(6, stages)
    report = write_curated(root, cfg, clip_uri, dedup_report)
    progress.update(7, stages)
    _curation_artifacts(root, report)
    if not report["kept"]:
        raise fates.too_few_pairs(Storage(root), 0)
    return report
