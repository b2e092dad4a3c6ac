"""Sampling settings compared on one trained checkpoint of a demo run: the suite's scores of each
variant against the run's own gallery settings, measured in the same process.

    python benchmarks/bench_sampling.py --run runs/demo [--step 4000] [--device auto] \\
        --variant cond_scale=1 --variant cond_scale=1.5,temperature=0.8 ...

A variant is a comma-separated list of gallery keys (temperature, top_k, top_p, cond_scale,
samples_per_prompt, top, seed, relation_weight, binding_weight; see dalle/config.py; null keeps the
run's value). Nothing is written to the run: the samples are drawn, reranked by the run's CLIP and
judged in memory. This is how the demo's `gallery.cond_scale` was chosen (docs/results.md). The run's
`gallery.evaluator`
names the prompts and scores them (demo.evaluation for a demo run). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import yaml

from dalle.config import ConfigError, RunConfig
from dalle.runroot import RUN_CONFIG, TRANSFORMER, checkpoint_dir, latest_checkpoint, run_config
from dalle.sample.evaluation import Evaluator, load_evaluator, scorecard_figures
from dalle.sample.gallery import draw_section, sampling_settings, with_sampling
from dalle.sample.sampler import Sampler
from dalle.storage import Storage

SAMPLING_KEYS = (
    "temperature", "top_k", "top_p", "cond_scale", "samples_per_prompt", "top", "seed", "relation_weight",
    "binding_weight",
)  # fmt: skip


def parse_variant(text: str, cfg: RunConfig) -> RunConfig:
    """The run's config with the variant's gallery keys changed; a bad key or value exits naming it."""
    changes = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in SAMPLING_KEYS:
            raise SystemExit(
                f"--variant {text!r}: expected KEY=VALUE with KEY one of {', '.join(SAMPLING_KEYS)}"
            )
        changes[key] = yaml.safe_load(value)
    try:
        return with_sampling(cfg, f"--variant {text!r}", **changes)
    except ConfigError as err:
        raise SystemExit(str(err)) from None


def measure(sampler: Sampler, evaluator: Evaluator, cfg: RunConfig) -> dict:
    """The evaluator's figures of every group, sampled with `cfg.gallery`'s settings."""
    settings = sampling_settings(cfg)
    start = time.perf_counter()
    sections = [
        draw_section(title, key, prompts, sampler, settings)
        for key, title, prompts in evaluator.prompt_groups()
    ]
    report = evaluator.evaluate(sections, sampler.clip)
    figures = scorecard_figures(report)
    return {
        "sampling": settings.described(),
        "seconds": round(time.perf_counter() - start, 1),
        "eval": figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="root of a demo run with a trained transformer")
    parser.add_argument("--step", type=int, default=None, help="transformer checkpoint (default: the latest)")
    parser.add_argument(
        "--device", default=None, help="auto, cpu or cuda (default: the run's gallery.device)"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="sampling settings to compare",
    )
    args = parser.parse_args()

    storage = Storage(args.run)
    if not storage.exists(RUN_CONFIG):
        raise SystemExit(
            f"{storage.uri()} is not a run root (no {RUN_CONFIG}); pass the --out of `dalle demo`"
        )
    cfg = run_config(storage)
    cfg = with_sampling(cfg, "--device", device=args.device)
    variants = [(text, parse_variant(text, cfg)) for text in args.variant]  # all checked before any work
    evaluator = load_evaluator(cfg)
    if evaluator is None:
        raise SystemExit(
            f"{storage.uri()} has no gallery.evaluator (e.g. demo.evaluation for a demo run): nothing to score"
        )
    if args.step is None:
        latest = latest_checkpoint(storage, TRANSFORMER)
        if latest is None:
            raise SystemExit(f"{storage.uri()} has no transformer checkpoint yet; train one first")
        args.step = latest.step
    sampler = Sampler.from_run(storage, cfg, checkpoint_dir(TRANSFORMER, args.step))

    report = {
        "run": storage.uri(),
        "step": args.step,
        "baseline": measure(sampler, evaluator, cfg),
        "variants": [],
    }
    for text, variant in variants:
        report["variants"].append({"variant": text, **measure(sampler, evaluator, variant)})
    print(json.dumps(report))


if __name__ == "__main__":
    main()
