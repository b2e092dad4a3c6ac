"""The `dalle` command line: every pipeline stage, runnable without writing Python. Plug-ins add
commands through the `dalle.commands` entry point group (the demo adds `dalle demo`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from dalle.config import ConfigError, RunConfig, load_config
from dalle.runroot import CLIP, DVAE, MODEL_NAMES, TRANSFORMER


def with_networks(cfg: RunConfig, networks: Sequence[str] | None) -> RunConfig:
    if networks:
        merged = [*cfg.crawl.allow_networks, *(n for n in networks if n not in cfg.crawl.allow_networks)]
        try:
            cfg.crawl.allow_networks = merged
        except ValueError as err:
            raise ConfigError(f"--allow-network: {err}") from None
    return cfg


def _print_report(root: str, report: dict) -> None:
    print(json.dumps(report, indent=2))
    print(f"\ncurated pairs: {root}/curated/  (manifest: {root}/curated/_manifest.json)")
    print(f"per-sample fates: {root}/reports/samples.parquet; funnel: {root}/reports/curate.json")
    print(f"dedup report: {root}/reports/dedup.json")


def cmd_curate(args: argparse.Namespace) -> int:
    cfg = with_networks(load_config(args.config), args.allow_network)
    from flows.curate import curate_flow  # Prefect is imported only for commands that run flows

    report = curate_flow(args.urls, args.out, cfg.model_dump(mode="json"))
    _print_report(args.out, report)
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    cfg = with_networks(load_config(args.config), args.allow_network)
    from flows.pipeline import pipeline_flow

    print_pipeline_result(pipeline_flow(args.out, cfg.model_dump(mode="json")))
    return 0


def print_pipeline_result(result: dict) -> None:
    _print_report(result["root"], result["curate"])
    _print_eval(result.get("eval"))
    print(f"\ngallery: {result['gallery']}")


def _print_eval(evaluation: dict | None) -> None:
    if not evaluation:
        return
    print(f"\nzero-shot evaluation (step {evaluation.get('step')}; reports/eval.json):")
    for group in ("heldout", "seen", "heldout_pairs"):
        figures = evaluation.get(group)
        if not figures:
            continue
        shown = "  ".join(
            f"{name} {figures[name]:.2f}"
            for name in ("color_acc", "shape_acc", "both_acc", "color_acc_reranked", "shape_acc_reranked",
                         "both_acc_reranked", "relation_acc", "relation_acc_reranked")
            if name in figures
        )  # fmt: skip
        print(f"  {group:14s} {shown}")
    if evaluation.get("sampling"):
        from dalle.sample.rerank import describe_sampling

        print(f"  sampled with {describe_sampling(evaluation['sampling'])}")


def _config_arg(args: argparse.Namespace) -> dict | None:
    """A given --config as a mapping for the flow (validated here first); None: the run root's own."""
    return load_config(args.config).model_dump(mode="json") if args.config else None


def cmd_tokenize(args: argparse.Namespace) -> int:
    from flows.tokens import tokenize_flow

    print(tokenize_flow(args.out, _config_arg(args)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from flows import train as train_flows

    flow = {
        CLIP: train_flows.train_clip_flow,
        DVAE: train_flows.train_dvae_flow,
        TRANSFORMER: train_flows.train_transformer_flow,
    }[args.model]
    print(flow(args.out, _config_arg(args), args.max_steps, args.resume))
    return 0


def cmd_gallery(args: argparse.Namespace) -> int:
    from flows.gallery import gallery_flow

    print(gallery_flow(args.out, args.checkpoint, _config_arg(args)))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from dalle.sample.gallery import sample_to_folder

    changes = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "cond_scale": args.cond_scale,
    }
    for line in sample_to_folder(
        args.checkpoint, args.prompt, args.n, args.top, args.out, args.seed, **changes
    ):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dalle", description="DALL·E end to end: crawl, curate, train and sample, as Prefect flows."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sub: argparse.ArgumentParser, out_help: str) -> None:
        sub.add_argument("--out", required=True, help=out_help)
        sub.add_argument(
            "--config",
            help="run configuration YAML (default: built-in defaults; see configs/ and demo/config.yaml)",
        )

    def networks(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--allow-network",
            action="append",
            metavar="CIDR",
            help="let the crawler reach this non-public network (repeatable), e.g. 10.0.0.0/8",
        )

    curate = commands.add_parser("curate", help="crawl a URL list and curate it (filter, CLIP, dedup)")
    curate.add_argument(
        "--urls", required=True, help="URL list: .parquet, .csv, .tsv, .txt or .jsonl, local or s3://"
    )
    common(curate, "run root: a local folder or s3://bucket/prefix")
    networks(curate)
    curate.set_defaults(func=cmd_curate)

    pipeline = commands.add_parser(
        "pipeline", help="run the whole pipeline on the config's source.urls: curate, train, galleries"
    )
    common(pipeline, "run root: a local folder or s3://bucket/prefix")
    networks(pipeline)
    pipeline.set_defaults(func=cmd_pipeline)

    run_root = "run root made by `dalle curate` (folder or s3://bucket/prefix)"
    run_config = "configuration YAML; saved as the run's. Default: the run root's config.yaml"
    tokenize = commands.add_parser(
        "tokenize", help="curated pairs -> token shards (BPE captions, dVAE codes)"
    )
    tokenize.add_argument("--out", required=True, help=run_root)
    tokenize.add_argument("--config", help=run_config)
    tokenize.set_defaults(func=cmd_tokenize)

    train = commands.add_parser(
        "train", help="train one model of the run root (default: the transformer, on the token shards)"
    )
    train.add_argument(
        "model",
        nargs="?",
        default=TRANSFORMER,
        choices=MODEL_NAMES,
        help="clip: the small CLIP on the filtered pairs; dvae: the dVAE on the curated images; "
        "transformer (default): the transformer on the token shards",
    )
    train.add_argument("--out", required=True, help=run_root)
    train.add_argument("--config", help=run_config)
    train.add_argument("--max-steps", type=int, help="total steps to reach, counting steps already done")
    train.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from the newest checkpoint (default); --no-resume refuses to touch existing ones",
    )
    train.set_defaults(func=cmd_train)

    gallery = commands.add_parser("gallery", help="draw the gallery of one transformer checkpoint")
    gallery.add_argument(
        "--checkpoint", required=True, help="checkpoint URI (models/transformer/step_XXXXXXXX)"
    )
    gallery.add_argument("--out", required=True, help=run_root)
    gallery.add_argument("--config", help=run_config)
    gallery.set_defaults(func=cmd_gallery)

    sample = commands.add_parser("sample", help="images for your own prompt, CLIP-reranked, into a folder")
    sample.add_argument("--checkpoint", required=True, help="transformer checkpoint URI inside its run root")
    sample.add_argument("--prompt", required=True)
    sample.add_argument("-n", type=int, default=64, help="samples to draw (default 64)")
    sample.add_argument("--top", type=int, default=8, help="best samples to keep (default 8)")
    sample.add_argument("--seed", type=int, default=0)
    for flag, kind in (
        ("--temperature", float),
        ("--top-k", int),
        ("--top-p", float),
        ("--cond-scale", float),
    ):
        sample.add_argument(flag, type=kind, default=None, help="default: the run's gallery setting")
    sample.add_argument("--out", required=True, help="folder for the images and scores.json")
    sample.set_defaults(func=cmd_sample)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from dalle.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
