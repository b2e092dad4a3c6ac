"""The curation flow: crawl → filter → CLIP → score → deduplicate → publish.

Thin orchestration over `dalle.data`: tasks pass the run root and small summaries,
never images or arrays; retries sit on the tasks that touch the network or storage.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dalle.config import RunConfig, config_from_dict, dump_config
from dalle.data import crawl as crawl_lib
from dalle.data import curate as curate_lib
from dalle.storage import Storage
from flows.common import log as _log
from flows.common import retry_unless_user_error as _retry_unless_user_error


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_user_error)
def prepare_input(urls: str, root: str, cfg: RunConfig) -> dict:
    storage = Storage(root)
    storage.check_writable()
    storage.write_bytes("config.yaml", dump_config(cfg).encode())
    prepared = crawl_lib.prepare_input(urls, storage, cfg.crawl)
    _log(
        f"{prepared.input_rows} input rows, {prepared.to_crawl} to crawl, refused before crawling: {prepared.refused}"
    )
    return prepared.__dict__


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=_retry_unless_user_error)
def crawl(root: str, cfg: RunConfig, prepared: dict) -> list[str]:
    shards = crawl_lib.run_crawl(Storage(root), cfg.crawl, crawl_lib.PreparedInput(**prepared))
    _log(f"{len(shards)} raw shards finished under {Storage(root).uri('raw')}")
    return shards


@task
def apply_filters(root: str, cfg: RunConfig, shards: list[str]) -> dict:
    counts = curate_lib.filter_stage(Storage(root), cfg)
    _log(f"rule filters: {counts}")
    return counts


@task
def obtain_clip(root: str, cfg: RunConfig, filtered: dict) -> str | None:
    return curate_lib.clip_stage(Storage(root), cfg, log=_log)


@task
def score(root: str, cfg: RunConfig, clip_uri: str | None) -> dict:
    counts = curate_lib.score_stage(Storage(root), cfg, curate_lib.open_clip_model(cfg, clip_uri))
    _log(f"CLIP-score filter: {counts}")
    return counts


@task
def deduplicate(root: str, cfg: RunConfig, clip_uri: str | None, scored: dict) -> dict:
    report = curate_lib.dedup_stage(Storage(root), cfg, curate_lib.open_clip_model(cfg, clip_uri))
    _log(f"dedup: {report['duplicates_exact']} exact, {report['duplicates_near']} near duplicates")
    return report


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_user_error)
def publish(root: str, cfg: RunConfig, clip_uri: str | None, dedup_report: dict) -> dict:
    return curate_lib.publish_stage(Storage(root), cfg, dedup_report["clip_model"])


def _publish_artifacts(root: str, report: dict) -> None:
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
        key="curation-funnel", table=funnel, description=f"Curation funnel of {storage.root}"
    )
    lines = [
        f"# Curation of `{storage.root}`",
        "",
        (
            f"**{report['kept']}** of {report['input_rows']} input rows kept; "
            f"{report['duplicates_exact']} exact and {report['duplicates_near']} near duplicates removed."
        ),
        "",
        "| fate | reason | url | caption | detail |",
        "| --- | --- | --- | --- | --- |",
    ]
    for entry in curate_lib.examples_of_removals(storage):
        cells = [
            entry["fate"],
            entry["reason"],
            entry["url"],
            (entry["caption"] or "")[:60],
            entry["detail"] or "",
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    lines += ["", f"Per-sample ledger: `{storage.uri(curate_lib.SAMPLES_REPORT)}`"]
    create_markdown_artifact(key="curation-summary", markdown="\n".join(lines))


@flow(name="curate", log_prints=True)
def curate_flow(urls: str, root: str, config: dict[str, Any] | None = None) -> dict:
    """Crawl `urls` into the run root `root` and curate it; returns reports/curate.json."""
    cfg = config_from_dict(config)
    prepared = prepare_input(urls, root, cfg)
    shards = crawl(root, cfg, prepared)
    filtered = apply_filters(root, cfg, shards)
    clip_uri = obtain_clip(root, cfg, filtered)
    scored = score(root, cfg, clip_uri)
    dedup_report = deduplicate(root, cfg, clip_uri, scored)
    report = publish(root, cfg, clip_uri, dedup_report)
    _publish_artifacts(root, report)
    return report
