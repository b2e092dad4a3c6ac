"""The `dalle` command line: every pipeline stage, runnable without writing Python. Plug-ins add
commands through the `dalle.commands` entry point group (the demo adds `dalle demo`)."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn

from dalle.config import ConfigError, RunConfig, load_config
from dalle.runroot import CLIP, DVAE, MODEL_NAMES, TRANSFORMER
from flows.output import command_output, show_error, show_result

# `dalle plan` plans the LAION config's models unless told otherwise (a paper-shaped dVAE and a 1024-wide transformer).
PLAN_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "laion.yaml"
)


def with_networks(cfg: RunConfig, networks: Sequence[str] | None) -> RunConfig:
    if networks:
        merged = [*cfg.crawl.allow_networks, *(n for n in networks if n not in cfg.crawl.allow_networks)]
        try:
            cfg.crawl.allow_networks = merged
        except ValueError as err:
            raise ConfigError(f"--allow-network: {err}") from None
    return cfg


def report_text(root: str, report: dict) -> str:
    """The curation report and where its outputs are, for people."""
    return (
        f"{json.dumps(report, indent=2)}\n"
        f"\ncurated pairs: {root}/curated/  (manifest: {root}/curated/_manifest.json)\n"
        f"per-sample fates: {root}/reports/samples.parquet; funnel: {root}/reports/curate.json\n"
        f"dedup report: {root}/reports/dedup.json"
    )


def cmd_curate(args: argparse.Namespace) -> int:
    cfg = with_networks(load_config(args.config), args.allow_network)
    from flows.curate import curate_flow  # Prefect is imported only for commands that run flows

    report = curate_flow(args.urls, args.out, cfg.model_dump(mode="json"))
    show_result(report, report_text(args.out, report))
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    cfg = with_networks(load_config(args.config), args.allow_network)
    from flows.pipeline import pipeline_flow

    show_pipeline_result(pipeline_flow(args.out, cfg.model_dump(mode="json")))
    return 0


def show_pipeline_result(result: dict) -> None:
    """The pipeline's result: the whole dict under --json; the reports and the gallery for people."""
    from dalle.timings import timings_text

    text = report_text(result["root"], result["curate"]) + _eval_text(result.get("eval"))
    times = timings_text(result.get("timings") or {})
    show_result(result, text + (f"\n\n{times}" if times else "") + f"\n\ngallery: {result['gallery']}")


def _eval_text(evaluation: dict | None) -> str:
    from dalle.sample.evaluation import scorecard_text

    table = scorecard_text(evaluation or {})
    if not table:
        return ""
    heading = (
        f"\n\nevaluation (step {evaluation.get('step')}; reports/eval.json), "
        "each task's share right before/after reranking (± the after figure's standard error over prompts):"
    )
    lines = [heading, table]
    if evaluation.get("sampling"):
        from dalle.sample.rerank import describe_sampling

        lines.append(f"  sampled with {describe_sampling(evaluation['sampling'])}")
    return "\n".join(lines)


def _config_arg(args: argparse.Namespace) -> dict | None:
    """A given --config as a mapping for the flow (validated here first); None: the run root's own."""
    return load_config(args.config).model_dump(mode="json") if args.config else None


def show_uri(uri: str) -> None:
    show_result({"uri": uri}, uri)


def cmd_tokenize(args: argparse.Namespace) -> int:
    from flows.tokens import tokenize_flow

    show_uri(tokenize_flow(args.out, _config_arg(args)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from flows import train as train_flows

    flow = {
        CLIP: train_flows.train_clip_flow,
        DVAE: train_flows.train_dvae_flow,
        TRANSFORMER: train_flows.train_transformer_flow,
    }[args.model]
    show_uri(flow(args.out, _config_arg(args), args.max_steps, args.resume, more_steps=args.more_steps))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from flows.ingest import ingest_flow

    config = load_config(args.config).model_dump(mode="json") if args.config else None
    result = ingest_flow(args.out, config, args.urls)
    show_result(
        result, report_text(result["root"], result["curate"]) + f"\n\ntoken shards: {result['shards']}"
    )
    return 0


def cmd_pools(args: argparse.Namespace) -> int:
    from flows.service import create_pools

    pools = create_pools(args.gpu_kubernetes, args.template)
    show_result(pools, "\n".join(f"work pool {name}: {state}" for name, state in pools.items()))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.service import serve

    if args.config:
        load_config(args.config)  # a bad file fails here, not in every run
    serve(args.root, args.config, args.deployment, args.prefect_file, args.limit, args.replace)
    return 0


def cmd_gallery(args: argparse.Namespace) -> int:
    from flows.gallery import gallery_flow

    show_uri(gallery_flow(args.out, args.checkpoint, _config_arg(args)))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from dalle.sample.gallery import sample_to_folder

    changes = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "cond_scale": args.cond_scale,
    }
    written = sample_to_folder(args.checkpoint, args.prompt, args.n, args.top, args.out, args.seed, **changes)
    show_result(written, "\n".join(written))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from dalle.plan import check_request, model_shapes, plan, plan_text, plans_table

    cfg = load_config(args.config or PLAN_CONFIG)
    overrides = dict(args.set or [])
    check_request(args.gpus, args.epochs, overrides)  # a bad value is named before the models are built
    shapes = model_shapes(cfg)
    results = [plan(cfg, pairs, args.gpus, args.epochs, overrides, shapes) for pairs in args.pairs]
    if len(results) == 1:
        show_result(results[0], plan_text(results[0]))
    else:
        show_result({"plans": results}, plans_table(results))
    return 0


class CommandLineError(SystemExit):
    """A command line argparse rejects (exit status 2, as argparse's own); `message` is its error line."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        text = f"{self.prog}: error: {message}"
        print(text, file=sys.stderr)
        raise CommandLineError(text)


def positive_int(text: str) -> int:
    """argparse type: a whole number above 0."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a number that is neither NaN nor infinite (its range is the config's)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def pair_count(text: str) -> list[int]:
    """argparse type: counts of pairs, comma-separated, each a whole number or with k, M or B (3M)."""
    counts = []
    for part in text.split(","):
        part = part.strip()
        scale = {"k": 1e3, "m": 1e6, "b": 1e9}.get(part[-1:].lower(), 1)
        number = part[:-1] if scale != 1 else part
        try:
            value = float(number) * scale
        except ValueError:
            value = 0.0
        if not (math.isfinite(value) and value >= 1 and value == int(value)):
            raise argparse.ArgumentTypeError(f"must be pair counts such as 3M or 1000000,400M, not {text!r}")
        counts.append(int(value))
    return counts


def figure_setting(text: str) -> tuple[str, float]:
    """argparse type: NAME=NUMBER, a figure of `dalle plan` replaced."""
    name, sep, number = text.partition("=")
    try:
        value = float(number) if sep and name else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER (e.g. mfu_train=0.35), not {text!r}")
    return name.strip(), value


def location(text: str) -> str:
    """argparse type: a local path or s3:// URI; a blank one would mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a local path or an s3:// URI, not {text!r}")
    return text


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1..65535, or 0 for any free one."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 (any free one) to 65535, not {text!r}")
    return value


def add_command(
    commands: argparse._SubParsersAction,
    name: str,
    *,
    run: Callable[[argparse.Namespace], int],
    help: str,
    description: str,
    examples: Sequence[str],
) -> argparse.ArgumentParser:
    """A `dalle` subcommand: `run(args)` shows its result with flows.output.show_result and returns the
    exit status; --help shows `description` and `examples` (whole command lines). Plug-ins use it too."""
    if not examples:
        raise ValueError(f"dalle {name}: give at least one example")
    sub = commands.add_parser(
        name,
        help=help,
        description=description,
        epilog="examples:\n" + "\n".join(f"  {example}" for example in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.set_defaults(func=run)
    return sub


def dalle_version() -> str:
    try:
        return version("dalle-pipeline")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dalle",
        description="DALL·E end to end: crawl, curate, train and sample, as Prefect flows.",
        epilog="examples:\n  dalle demo --out runs/demo\n  dalle --json train dvae --out runs/demo\n"
        "  dalle COMMAND --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the command's result as one JSON document on stdout (errors too); prose goes to stderr",
    )
    parser.add_argument("--debug", action="store_true", help="show the tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"dalle {dalle_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sub: argparse.ArgumentParser, out_help: str) -> None:
        sub.add_argument("--out", required=True, type=location, help=out_help)
        sub.add_argument(
            "--config",
            type=location,
            help="run configuration YAML (default: built-in defaults; see configs/ and demo/config.yaml)",
        )

    def networks(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--allow-network",
            action="append",
            metavar="CIDR",
            help="let the crawler reach this non-public network (repeatable), e.g. 10.0.0.0/8",
        )

    curate = add_command(
        commands,
        "curate",
        run=cmd_curate,
        help="crawl a URL list and curate it (filter, CLIP, dedup)",
        description="Crawl the image URLs of a list into a run root and curate the pairs: rule filters,\n"
        "CLIP scoring and near-duplicate removal. Prints the funnel report (reports/curate.json).",
        examples=[
            "dalle curate --urls urls.parquet --out runs/mine",
            "dalle curate --urls s3://bucket/urls.parquet --out s3://bucket/runs/laion --config configs/laion.yaml",
            "dalle curate --urls lan.csv --out runs/lan --allow-network 10.0.0.0/8",
        ],
    )
    curate.add_argument(
        "--urls",
        required=True,
        type=location,
        help="URL list: .parquet, .csv, .tsv, .txt or .jsonl, local or s3://",
    )
    common(curate, "run root: a local folder or s3://bucket/prefix")
    networks(curate)

    pipeline = add_command(
        commands,
        "pipeline",
        run=cmd_pipeline,
        help="run the whole pipeline on the config's source.urls: curate, train, galleries",
        description="Run every stage on the URL list the config's source.urls names: curate, train the\n"
        "dVAE, tokenize, train the transformer, draw the galleries. A re-run resumes where it stopped.",
        examples=["dalle pipeline --config configs/cc3m.yaml --out s3://YOUR-BUCKET/runs/cc3m"],
    )
    common(pipeline, "run root: a local folder or s3://bucket/prefix")
    networks(pipeline)

    run_root = "run root made by `dalle curate` (folder or s3://bucket/prefix)"
    run_config = "configuration YAML; saved as the run's. Default: the run root's config.yaml"
    tokenize = add_command(
        commands,
        "tokenize",
        run=cmd_tokenize,
        help="curated pairs -> token shards (BPE captions, dVAE codes)",
        description="Turn the curated pairs not in a shard yet into token shards: BPE caption tokens and\n"
        "dVAE image codes (train the dVAE first). Prints the shards folder.",
        examples=["dalle tokenize --out runs/mine"],
    )
    tokenize.add_argument("--out", required=True, type=location, help=run_root)
    tokenize.add_argument("--config", type=location, help=run_config)

    train = add_command(
        commands,
        "train",
        run=cmd_train,
        help="train one model of the run root (default: the transformer, on the token shards)",
        description="Train one model of a run root, continuing from its newest checkpoint. Prints the\n"
        "newest checkpoint. Order: clip (optional), dvae, then `dalle tokenize`, then transformer.",
        examples=[
            "dalle train dvae --out runs/mine",
            "dalle train --out runs/mine --max-steps 20000",
            "dalle train clip --out runs/mine --no-resume",
        ],
    )
    train.add_argument(
        "model",
        nargs="?",
        default=TRANSFORMER,
        choices=MODEL_NAMES,
        help="clip: the small CLIP on the filtered pairs; dvae: the dVAE on the curated images; "
        "transformer (default): the transformer on the token shards",
    )
    train.add_argument("--out", required=True, type=location, help=run_root)
    train.add_argument("--config", type=location, help=run_config)
    train.add_argument(
        "--max-steps", type=positive_int, help="total steps to reach, counting steps already done"
    )
    train.add_argument(
        "--more-steps",
        type=positive_int,
        help="steps to add past the newest checkpoint (instead of --max-steps), as a retrain does",
    )
    train.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from the newest checkpoint (default); --no-resume refuses to touch existing ones",
    )

    ingest = add_command(
        commands,
        "ingest",
        run=cmd_ingest,
        help="curate what is new in the URL list and tokenize it (what the retraining schedule runs)",
        description="Curate the rows of the URL list (default: the run's source.urls) that the run root has\n"
        "not crawled yet, then tokenize the new pairs into new shards and announce them with the\n"
        "dalle.shards.updated event, which starts the retraining deployment. The root needs a dVAE.",
        examples=[
            "dalle ingest --out runs/mine",
            "dalle ingest --out s3://bucket/runs/main --urls s3://bucket/lists/2026-12.parquet",
        ],
    )
    ingest.add_argument("--out", required=True, type=location, help=run_root)
    ingest.add_argument("--config", type=location, help=run_config)
    ingest.add_argument(
        "--urls", type=location, help="URL list to ingest (default: the config's source.urls)"
    )

    pools = add_command(
        commands,
        "pools",
        run=cmd_pools,
        help="create the Prefect work pools that infra/prefect.yaml's deployments use",
        description="Create the work pools local-process (CPU stages) and gpu (training, galleries) on the\n"
        "Prefect server at PREFECT_API_URL; pools that exist are kept. Then register the deployments\n"
        "with `prefect deploy --all --prefect-file infra/prefect.yaml`.",
        examples=["dalle pools", "dalle pools --gpu-kubernetes"],
    )
    pools.add_argument(
        "--gpu-kubernetes",
        action="store_true",
        help="make gpu a Kubernetes pool with infra/work-pools/gpu-kubernetes.json (GPU count, node "
        "selector, tolerations and image as job variables) instead of a process pool",
    )
    pools.add_argument(
        "--template", type=location, help="base job template for --gpu-kubernetes (default: the repository's)"
    )

    serve = add_command(
        commands,
        "serve",
        run=cmd_serve,
        help="serve every deployment of infra/prefect.yaml from this process (one machine, no workers)",
        description="Serve the deployments of infra/prefect.yaml from this process until Ctrl-C: their\n"
        "schedules and event triggers (new shards -> retrain -> gallery) start runs here. Needs a\n"
        "Prefect server (PREFECT_API_URL), e.g. `prefect server start`.",
        examples=[
            "dalle serve --root runs/mine --config configs/cc3m.yaml",
            "dalle serve --root runs/mine --deployment ingest --deployment gallery",
        ],
    )
    serve.add_argument(
        "--root", type=location, help="run root every deployment works on (default: the file's)"
    )
    serve.add_argument(
        "--config", type=location, help="config file (path or s3://) for the deployments that take one"
    )
    serve.add_argument(
        "--deployment", action="append", help="serve only this deployment (repeatable; default: all)"
    )
    serve.add_argument("--prefect-file", type=location, help="deployments file (default: infra/prefect.yaml)")
    serve.add_argument("--limit", type=positive_int, help="flow runs at a time (default: no limit)")
    serve.add_argument(
        "--replace",
        action="store_true",
        help="delete deployments of the same names that `prefect deploy` registered for work pools",
    )

    plan_cmd = add_command(
        commands,
        "plan",
        run=cmd_plan,
        help="what a run of N pairs costs per stage: storage, node-hours, GPU-hours, dedup memory",
        description="Estimate a run before starting it: storage per stage, crawl node-hours, CLIP embedding\n"
        "GPU-hours, the dedup index's memory and time, tokenize GPU-hours and transformer GPU-days, from\n"
        "the config's model shapes and from throughputs that say where each comes from (measured by\n"
        "this repository's benchmarks, published, computed from the model code, or assumed). See\n"
        "docs/scaling.md.",
        examples=[
            "dalle plan --pairs 3M --gpus 8",
            "dalle plan --pairs 1M,12M,100M,400M --gpus 64 --config configs/laion.yaml",
            "dalle plan --pairs 400M --gpus 256 --set mfu_train=0.35 --set download_success=0.55",
        ],
    )
    plan_cmd.add_argument(
        "--pairs", type=pair_count, required=True, help="URL-list rows: 3M, or 1M,100M,400M"
    )
    plan_cmd.add_argument("--gpus", type=positive_int, default=8, help="GPUs for the GPU stages (default 8)")
    plan_cmd.add_argument(
        "--epochs", type=finite_float, default=1.0, help="passes of the transformer (default 1)"
    )
    plan_cmd.add_argument(
        "--config", type=location, help=f"run configuration whose models are planned (default: {PLAN_CONFIG})"
    )
    plan_cmd.add_argument(
        "--set", type=figure_setting, action="append", metavar="NAME=VALUE", help="replace a throughput"
    )

    checkpoint = "runs/mine/models/transformer/step_00020000"
    gallery = add_command(
        commands,
        "gallery",
        run=cmd_gallery,
        help="draw the gallery of one transformer checkpoint",
        description="Draw the gallery of one transformer checkpoint: the config's gallery prompts,\n"
        "CLIP-reranked, as an HTML page in the run root. Prints the page.",
        examples=[f"dalle gallery --out runs/mine --checkpoint {checkpoint}"],
    )
    gallery.add_argument(
        "--checkpoint", required=True, type=location, help="checkpoint URI (models/transformer/step_XXXXXXXX)"
    )
    gallery.add_argument("--out", required=True, type=location, help=run_root)
    gallery.add_argument("--config", type=location, help=run_config)

    sample = add_command(
        commands,
        "sample",
        run=cmd_sample,
        help="images for your own prompt, CLIP-reranked, into a folder",
        description="Draw images for your own prompt from a transformer checkpoint and keep the\n"
        "CLIP-best ones, as PNG files and scores.json in a folder. Prints the files written.",
        examples=[
            f'dalle sample --checkpoint {checkpoint} --prompt "a red circle" --out red',
            f'dalle sample --checkpoint {checkpoint} --prompt "a blue square" -n 128 --top 4 --out blue',
        ],
    )
    sample.add_argument(
        "--checkpoint", required=True, type=location, help="transformer checkpoint URI inside its run root"
    )
    sample.add_argument("--prompt", required=True)
    sample.add_argument("-n", type=positive_int, default=64, help="samples to draw (default 64)")
    sample.add_argument("--top", type=positive_int, default=8, help="best samples to keep (default 8)")
    sample.add_argument("--seed", type=int, default=0)
    for flag, kind in (
        ("--temperature", finite_float),
        ("--top-k", positive_int),
        ("--top-p", finite_float),
        ("--cond-scale", finite_float),
    ):
        sample.add_argument(flag, type=kind, default=None, help="default: the run's gallery setting")
    sample.add_argument("--out", required=True, type=location, help="folder for the images and scores.json")
    _plugin_commands(commands)
    return parser


def _plugin_commands(commands: argparse._SubParsersAction) -> None:
    """Commands of installed plug-ins (entry point group `dalle.commands`); one that is gone is skipped."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="dalle.commands"):
        try:
            add_commands = entry.load()
        except ImportError:
            continue  # e.g. the demo folder was deleted from a development install
        add_commands(commands)


def _global_options(argv: Sequence[str]) -> list[str]:
    """The options before the command's name (--json, --debug)."""
    return list(itertools.takewhile(lambda arg: arg.startswith("-"), argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except CommandLineError as err:
        if "--json" in _global_options(argv):
            print(json.dumps({"error": err.message, "kind": "user"}))
        return 2
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with command_output(as_json=args.json, debug=args.debug):
        try:
            return args.func(args)
        except Exception as err:  # noqa: BLE001 - any failure is reported, as one line unless --debug
            return show_error(err)


if __name__ == "__main__":
    sys.exit(main())
