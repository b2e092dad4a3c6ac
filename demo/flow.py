"""The demo as a Prefect flow, for a deployment (infra/prefect.yaml: demo/flow.py:demo_flow)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from dalle.config import as_config, load_config
from demo.run import DEMO_CONFIG, run_demo


@flow(name="demo", log_prints=True)
def demo_flow(root: str, config: dict[str, Any] | str | None = None) -> dict[str, Any]:
    """Serve the captioned-shapes world and run the whole pipeline on it; `config` (a mapping, or a YAML
    path or s3:// URI) defaults to demo/config.yaml."""
    cfg = as_config(config) if config is not None else load_config(DEMO_CONFIG)
    return run_demo(root, cfg)
