"""The end-to-end pipeline: source → curation → dVAE → tokenize → transformer → a gallery
for every checkpoint (with the zero-shot evaluation on the captioned-shapes source).

The source is the config's `source.urls` list (a real crawl, e.g. configs/cc3m.yaml), or by
default the built-in captioned-shapes source, served over loopback HTTP for the length of
the crawl, so the demo's crawl is a real one too.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from dalle.config import RunConfig, config_from_dict
from dalle.data.crawl import CrawlError
from dalle.data.sources import DemoServer, DemoSite, build_site, url_table
from dalle.eval.zero_shot import EVAL_REPORT
from dalle.sample.gallery import GALLERY_INDEX
from dalle.storage import SOURCE, Storage
from flows.curate import curate_flow
from flows.tokenize_shards import tokenize_flow
from flows.train import train_dvae_flow, train_transformer_flow

DEMO_NETWORK = "127.0.0.0/8"
DEMO_URLS = f"{SOURCE}/urls.parquet"
DEMO_SERVER = f"{SOURCE}/server.json"
# A fixed port, so that every run's URLs, and with them the samples' uids (and so the order the
# models see them in), are the same; a run on a machine where it is taken falls back to a free one.
DEMO_PORT = 28620


@flow(name="pipeline", log_prints=True)
def pipeline_flow(root: str, config: dict[str, Any] | None = None) -> dict:
    """Curate the config's source into `root`, train both models and publish their galleries."""
    cfg = config_from_dict(config)
    if cfg.source.urls:
        report = curate_flow(cfg.source.urls, root, cfg.model_dump(mode="json"))
    else:
        report = _curate_demo_source(root, cfg)
    train_dvae_flow(root)
    tokenize_flow(root)
    train_transformer_flow(root)
    storage = Storage(root)
    evaluation = storage.read_json(EVAL_REPORT) if storage.exists(EVAL_REPORT) else None
    return {"root": storage.root, "curate": report, "gallery": storage.uri(GALLERY_INDEX), "eval": evaluation}


def _curate_demo_source(root: str, cfg: RunConfig) -> dict:
    if DEMO_NETWORK not in cfg.crawl.allow_networks:
        cfg.crawl.allow_networks = [*cfg.crawl.allow_networks, DEMO_NETWORK]
    storage = Storage(root)
    site = build_site(cfg.source)
    with demo_server(site, storage) as server:
        if not storage.exists(DEMO_SERVER):
            storage.write_table(DEMO_URLS, url_table(site, server.base_url))
            storage.write_json(DEMO_SERVER, {"port": server.port, "base_url": server.base_url})
        get_run_logger().info(f"demo source: {len(site.rows)} URLs served at {server.base_url}")
        return curate_flow(storage.uri(DEMO_URLS), root, cfg.model_dump(mode="json"))


def demo_server(site: DemoSite, storage: Storage) -> DemoServer:
    """The demo site served on DEMO_PORT (any free port when that is taken). A re-run serves on
    the port of the first run, so the URL list and the finished crawl shards stay valid and the
    crawl resumes instead of starting over."""
    if storage.exists(DEMO_SERVER):
        port = storage.read_json(DEMO_SERVER)["port"]
        try:
            return DemoServer(site, port=port)
        except OSError as err:
            raise CrawlError(
                f"this run's demo source serves on 127.0.0.1:{port} (its URL list names that port), "
                f"and the port is taken ({err.strerror}): stop what holds it (another `dalle demo`?) "
                "and run again, or start a new run in another --out"
            ) from None
    try:
        return DemoServer(site, port=DEMO_PORT)
    except OSError:
        return DemoServer(site, port=0)
