"""The ingest flow a schedule runs: curate what is new in the configured URL list, then tokenize the
new pairs into new shards. Its `dalle.shards.updated` event starts the retraining deployment, whose
checkpoints' `dalle.checkpoint.saved` events start the gallery deployment."""

from __future__ import annotations

from typing import Any

from prefect import flow

from dalle.config import ConfigError, Location
from dalle.runroot import run_config
from dalle.storage import Storage
from flows.curate import curate_flow
from flows.tokens import tokenize_flow


@flow(name="ingest", log_prints=True)
def ingest_flow(
    root: Location, config: dict[str, Any] | str | None = None, urls: Location | None = None
) -> dict:
    """Curate `urls` (default: the config's source.urls) into `root` incrementally and tokenize the new
    pairs; returns the curation report and the shards summary. The run root must already have a dVAE
    (the first `dalle pipeline` run trains it)."""
    storage = Storage(root)
    cfg = run_config(storage, config)
    urls = urls or cfg.source.urls
    if not urls:
        raise ConfigError(
            "no URL list to ingest: set source.urls in the run's config, or pass the urls parameter"
        )
    report = curate_flow(urls, root, cfg.model_dump(mode="json"))
    shards = tokenize_flow(root)
    return {"root": storage.root, "curate": report, "shards": shards}
