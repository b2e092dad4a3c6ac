"""The demo's models on a curated run: how fast they train here, and what the zero-shot
evaluation reaches for a given number of steps (on a GPU, far more steps than the demo's budget).

    python benchmarks/bench_demo_models.py --from runs/demo --out /tmp/bench-models \\
        [--config demo/config.yaml] [--dvae-steps 1200] [--transformer-steps 4000] [--device auto] \\
        [--set transformer.dropout=0.2 --set train_transformer.seed=1 ...]

--from is a run root that `dalle demo` (or `dalle curate` on the shapes source) made: its
curated pairs, its CLIP and its source/ folder are copied to --out, then the dVAE and the
transformer are trained from scratch with the given steps, the pairs tokenized, and the last
checkpoint's gallery published with the suite's scores. --set changes one key of the config
(section.key=YAML value), to compare recipes on the same curated pairs.

--retrain clip trains the small CLIP alone instead, from scratch on the run's curated pairs, and
keeps the run's dVAE, token shards and transformer: the gallery then draws the very same samples
(same checkpoint, same gallery.seed) and only the reranking differs, so a CLIP recipe is judged
by what it keeps. On a run without a transformer yet (`dalle curate`) it trains the CLIP only, for
bench_composition.py to judge. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import yaml

from dalle.config import ConfigError, config_from_dict, load_config
from dalle.models.weights import load_dvae
from dalle.runroot import (
    CLIP,
    CURATED_DIR,
    DVAE,
    EVAL_REPORT,
    MODELS_DIR,
    RAW_DIR,
    SHARDS_DIR,
    SOURCE_DIR,
    TOKENIZER_DIR,
    TRANSFORMER,
    checkpoint_dir,
    latest_pointer,
    read_metrics,
    run_config,
)
from dalle.sample.evaluation import scorecard_figures
from dalle.sample.gallery import draw_gallery
from dalle.storage import Storage
from dalle.tokens.shards import tokenize_stage
from dalle.train.launch import launch

# What each --retrain copies from the run: the models it does not train, and what they were made from
# (the CLIP trains on, and bench_composition.py reads, the images of the raw shards).
COPIED = {
    "models": (CURATED_DIR, RAW_DIR, SOURCE_DIR, f"{MODELS_DIR}/{CLIP}"),
    "clip": (
        CURATED_DIR,
        RAW_DIR,
        SOURCE_DIR,
        SHARDS_DIR,
        TOKENIZER_DIR,
        f"{MODELS_DIR}/{DVAE}",
        f"{MODELS_DIR}/{TRANSFORMER}",
    ),
}


def copy_folder(source: Storage, target: Storage, folder: str) -> None:
    for rel in source.list(folder):
        target.write_bytes(rel, source.read_bytes(rel))
    for name in source.subfolders(folder):
        copy_folder(source, target, f"{folder}/{name}")


def copy_curated_run(source: Storage, target: Storage, retrain: str = "models") -> None:
    for folder in COPIED[retrain]:
        copy_folder(source, target, folder)
    # A model's latest.json names its checkpoint by URI: point it into the copy.
    for model in (CLIP, DVAE, TRANSFORMER):
        pointer = latest_pointer(model)
        if target.exists(pointer):
            latest = source.read_json(pointer)
            target.write_json(pointer, {**latest, "uri": target.uri(checkpoint_dir(model, latest["step"]))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", required=True, help="run root with curated pairs and a CLIP")
    parser.add_argument("--out", required=True, help="fresh run root for this benchmark")
    parser.add_argument("--config", default="demo/config.yaml")
    parser.add_argument("--dvae-steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--transformer-steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--retrain",
        choices=sorted(COPIED),
        default="models",
        help="models: the dVAE and the transformer (the run's CLIP kept); clip: the small CLIP alone",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="change one config key, e.g. transformer.dropout=0.2 (repeatable)",
    )
    args = parser.parse_args()

    cfg = load_config(args.config).model_dump(mode="json")
    for override in args.overrides:
        key, sep, value = override.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot and section in cfg and isinstance(cfg[section], dict)):
            raise SystemExit(
                f"--set {override!r}: expected SECTION.KEY=VALUE with a config section, e.g. transformer.dropout=0.2"
            )
        cfg[section][name] = yaml.safe_load(value)
    for section, steps in (("train_dvae", args.dvae_steps), ("train_transformer", args.transformer_steps)):
        cfg[section]["device"] = args.device
        if steps is not None:
            cfg[section]["max_steps"] = steps
            cfg[section]["checkpoint_every"] = steps
    cfg["dvae"]["temperature_anneal_steps"] = cfg["train_dvae"]["max_steps"]
    cfg["tokenize"]["device"] = args.device
    try:  # an unknown key or a bad value is named before any work
        config_from_dict(cfg, origin="--set")
    except ConfigError as err:
        raise SystemExit(str(err)) from None

    target = Storage(args.out)
    if target.exists(CURATED_DIR):
        raise SystemExit(f"{target.uri()} is not empty; pass a fresh --out")
    copy_curated_run(Storage(args.source), target, args.retrain)
    config = run_config(target, cfg)
    quiet = lambda message: None

    if args.retrain == "clip":
        # The run's transformer, if it has one yet, draws the gallery that the new CLIP reranks.
        drawn = target.exists(latest_pointer(TRANSFORMER))
        steps = target.read_json(latest_pointer(TRANSFORMER))["step"] if drawn else 0
        stages = {"clip_s": lambda: launch(CLIP, target.root, config, log=quiet)}
    else:
        drawn, steps = True, config.train_transformer.max_steps
        stages = {
            "dvae_s": lambda: launch(DVAE, target.root, config, log=quiet),
            "tokenize_s": lambda: tokenize_stage(target, config, *load_dvae(target), log=quiet),
            "transformer_s": lambda: launch(TRANSFORMER, target.root, config, log=quiet),
        }
    if drawn:
        stages["gallery_s"] = lambda: draw_gallery(
            target, config, checkpoint_dir(TRANSFORMER, steps), log=quiet
        )
    timings = {}
    for name, stage in stages.items():
        start = time.perf_counter()
        stage()
        timings[name] = time.perf_counter() - start

    evaluation = target.read_json(EVAL_REPORT) if drawn else {"sampling": None}
    last = {m["model"]: m for m in read_metrics(target)}
    if args.retrain == "clip":
        trained = {
            "clip_steps": config.train_clip.max_steps,
            "clip_samples_per_s": round(last[CLIP]["samples_per_s"], 1),
            "clip_loss": round(last[CLIP]["loss"], 4),
        }
    else:
        trained = {
            "dvae_steps": config.train_dvae.max_steps,
            "dvae_images_per_s": round(last[DVAE]["samples_per_s"], 1),
            "dvae_codebook_perplexity": round(last[DVAE]["codebook_perplexity"], 1),
            "transformer_tokens_per_s": round(last[TRANSFORMER]["tokens_per_s"], 1),
            "transformer_loss": round(last[TRANSFORMER]["loss"], 4),
        }
    summary = {
        "device": args.device,
        "retrain": args.retrain,
        "overrides": args.overrides,
        "transformer_steps": steps,
        **{k: round(v, 1) for k, v in timings.items()},
        **trained,
        "sampling": evaluation["sampling"],
        "eval": scorecard_figures(evaluation) if drawn else None,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
