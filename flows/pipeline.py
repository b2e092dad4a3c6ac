"""The end-to-end pipeline: curation of the config's URL list → dVAE → tokenize → transformer →
a gallery for every transformer checkpoint (with the evaluator plug-in's figures when one is set)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from dalle.config import ConfigError, Location, as_config
from dalle.runroot import EVAL_REPORT, GALLERY_INDEX, TIMINGS_REPORT
from dalle.storage import Storage
from flows.curate import curate_flow
from flows.tokens import tokenize_flow
from flows.train import train_dvae_flow, train_transformer_flow


@flow(name="pipeline", log_prints=True)
def pipeline_flow(root: Location, config: dict[str, Any] | str | None = None) -> dict:
    """Curate source.urls into `root`, train both models and draw their galleries. `config`: a mapping,
    or a YAML path or s3:// URI."""
    cfg = as_config(config)
    if not cfg.source.urls:
        raise ConfigError(
            "source.urls is not set, so there is nothing to crawl: name a URL list in the config "
            "(e.g. configs/cc3m.yaml), or run the built-in demo world with `dalle demo`"
        )
    report = curate_flow(cfg.source.urls, root, cfg.model_dump(mode="json"))
    train_dvae_flow(root)
    tokenize_flow(root, announce=False)
    train_transformer_flow(root)
    storage = Storage(root)
    evaluation = storage.read_json(EVAL_REPORT) if storage.exists(EVAL_REPORT) else None
    timings = storage.read_json(TIMINGS_REPORT) if storage.exists(TIMINGS_REPORT) else None
    return {
        "root": storage.root,
        "curate": report,
        "gallery": storage.uri(GALLERY_INDEX),
        "eval": evaluation,
        "timings": timings,
    }
