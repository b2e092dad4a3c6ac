"""The tokenize flow: curated pairs -> token shards (captions by the run's BPE, images by the dVAE)."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from dalle.config import Location
from dalle.devices import resolve_device
from dalle.models.weights import load_dvae
from dalle.runroot import run_config
from dalle.storage import Storage
from dalle.tokens.shards import tokenize_stage
from flows.common import (
    Progress,
    announce_shards,
    literal_markdown,
    log,
    retry_unless_user_error,
    timed,
    timeout,
)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
@timed("tokenize")
def tokenize(root: str, config: dict[str, Any] | str | None) -> dict:
    storage = Storage(root)
    cfg = run_config(storage, config)
    with timeout(cfg.orchestration.tokenize_timeout_s, "orchestration.tokenize_timeout_s"):
        dvae, identity = load_dvae(
            storage, device=resolve_device(cfg.tokenize.device, setting="tokenize.device")
        )
        progress = Progress(
            "tokenize-progress",
            f"tokenize of {literal_markdown(storage.uri())}",
            cfg.orchestration.progress_every_s,
        )
        return tokenize_stage(storage, cfg, dvae, identity, log=log, on_progress=progress.update)


@flow(name="tokenize")
def tokenize_flow(root: Location, config: dict[str, Any] | str | None = None, announce: bool = True) -> str:
    """Tokenize every curated pair not in a shard yet; returns the shards folder's URI. New shards are
    announced with the `dalle.shards.updated` event, which starts the retraining deployment (`announce`
    False: the caller trains next itself, as the pipeline does)."""
    cfg = run_config(Storage(root), config)
    summary = tokenize(root, config)
    create_table_artifact(
        key="token-shards",
        # Paths and identities are text the v1 UI would render as Markdown: shown literally.
        table=[
            {"key": k, "value": literal_markdown(v) if isinstance(v, str) else str(v)}
            for k, v in summary.items()
        ],
        description="token shards",
    )
    if announce and summary["new_rows"]:
        announce_shards(root, {**summary, "retrain_steps": cfg.orchestration.retrain_steps})
    return summary["uri"]
