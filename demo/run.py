"""`dalle demo` and `dalle serve-demo`: the captioned-shapes world served over loopback HTTP, and the
whole pipeline run on it. The demo plugs into the `dalle` command through the `dalle.commands`
entry point; the library knows nothing of it.
"""

from __future__ import annotations

import argparse
import ipaddress
import time
from pathlib import Path
from typing import Any

from dalle.config import RunConfig, load_config, with_changes
from dalle.runroot import SOURCE_DIR
from dalle.storage import Storage
from demo.site import DemoServer, DemoSite, build_site, url_table
from demo.world import world_config

DEMO_CONFIG = str(Path(__file__).with_name("config.yaml"))  # demo/config.yaml
DEMO_NETWORK = "127.0.0.0/8"
DEMO_URLS = f"{SOURCE_DIR}/urls.parquet"
DEMO_SERVER = f"{SOURCE_DIR}/server.json"
# A fixed port, so that every run's URLs, and with them the samples' uids (and so the order the
# models see them in), are the same; a run on a machine where it is taken falls back to a free one.
DEMO_PORT = 28620


def demo_server(site: DemoSite, storage: Storage) -> DemoServer:
    """The demo site served on DEMO_PORT (any free port when that is taken). A re-run serves on
    the port of the first run, so the URL list and the finished crawl shards stay valid and the
    crawl resumes instead of starting over."""
    from dalle.curate.crawl import CrawlError  # the crawler's imports are slow; `dalle --help` skips them

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


def demo_run_config(cfg: RunConfig, storage: Storage) -> RunConfig:
    """`cfg` pointed at the demo site's URL list, with loopback allowed and the demo's evaluator on."""
    networks = cfg.crawl.allow_networks
    return with_changes(
        cfg,
        "the demo",
        crawl={
            **cfg.crawl.model_dump(),
            "allow_networks": networks if DEMO_NETWORK in networks else [*networks, DEMO_NETWORK],
        },
        gallery={**cfg.gallery.model_dump(), "evaluator": cfg.gallery.evaluator or "demo.evaluation"},
        source={**cfg.source.model_dump(), "urls": storage.uri(DEMO_URLS)},
    )


def run_demo(root: str, cfg: RunConfig) -> dict[str, Any]:
    """Serve the demo world, run the whole pipeline on it into `root`; returns the pipeline's result."""
    from flows.pipeline import pipeline_flow  # Prefect is imported only when a flow runs

    storage = Storage(root)
    storage.check_writable()
    site = build_site(world_config(cfg))
    with demo_server(site, storage) as server:
        if not storage.exists(DEMO_SERVER):
            storage.write_table(DEMO_URLS, url_table(site, server.base_url))
            storage.write_json(DEMO_SERVER, {"port": server.port, "base_url": server.base_url})
        print(f"demo source: {len(site.rows)} URLs served at {server.base_url}")
        return pipeline_flow(root, demo_run_config(cfg, storage).model_dump(mode="json"))


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.cli import show_pipeline_result, with_networks

    cfg = with_networks(load_config(args.config or DEMO_CONFIG), args.allow_network)
    show_pipeline_result(run_demo(args.out, cfg))
    return 0


def cmd_serve_demo(args: argparse.Namespace) -> int:
    from flows.output import show_result

    site = build_site(world_config(load_config(args.config or DEMO_CONFIG)))
    with DemoServer(site, host=args.host, port=args.port) as server:
        uri = Storage(args.out).write_table("urls.parquet", url_table(site, server.base_url))
        try:
            show_result(
                {"base_url": server.base_url, "images": len(site.rows), "urls": uri},
                f"serving {len(site.rows)} demo images at {server.base_url}; URL list: {uri}\n"
                f"crawl it with: dalle curate --urls {uri} --out RUN --allow-network {DEMO_NETWORK}"
                "   (Ctrl-C stops)",
            )
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def loopback_host(text: str) -> str:
    """argparse type: an IPv4 loopback address (127.x.x.x) or localhost; the demo serves nowhere else."""
    if text == "localhost":
        return text
    try:
        if ipaddress.IPv4Address(text).is_loopback:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"must be a loopback address such as 127.0.0.1, not {text!r}")


def add_commands(commands: argparse._SubParsersAction) -> None:
    """The demo's commands, for the `dalle` command line (entry point group `dalle.commands`)."""
    from flows.cli import add_command, location, port_number

    demo = add_command(
        commands,
        "demo",
        run=cmd_demo,
        help="serve the built-in captioned-shapes world over loopback and run the whole pipeline on it",
        description="Serve the built-in world of captioned shapes over loopback HTTP and run the whole\n"
        "pipeline on it: crawl, curate, train the dVAE and the transformer, draw the galleries and\n"
        "score them. A re-run into the same --out resumes.",
        examples=["dalle demo --out runs/demo", "dalle --json demo --out runs/demo > demo-result.json"],
    )
    demo.add_argument(
        "--out", type=location, required=True, help="run root: a local folder or s3://bucket/prefix"
    )
    demo.add_argument("--config", type=location, help="run configuration YAML (default: demo/config.yaml)")
    demo.add_argument("--allow-network", action="append", metavar="CIDR", help=argparse.SUPPRESS)

    serve = add_command(
        commands,
        "serve-demo",
        run=cmd_serve_demo,
        help="serve the captioned-shapes world over loopback HTTP",
        description="Serve the captioned-shapes world over loopback HTTP until Ctrl-C, and write its URL\n"
        "list, to crawl with `dalle curate` as any other source.",
        examples=[
            "dalle serve-demo --out demo-urls --port 8000",
            "dalle curate --urls demo-urls/urls.parquet --out runs/shapes --allow-network 127.0.0.0/8",
        ],
    )
    serve.add_argument("--out", type=location, required=True, help="folder for the URL list (urls.parquet)")
    serve.add_argument(
        "--config", help="run configuration YAML; its plugins.demo is used (default: demo/config.yaml)"
    )
    serve.add_argument(
        "--host", type=loopback_host, default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)"
    )
    serve.add_argument("--port", type=port_number, default=0, help="port (default: any free one)")
