"""Composition, ours against the peer: lucidrains' dalle-pytorch 1.6.6 trained on the same curated pairs
for the same wall time on this machine, its samples judged by the same suite.

    python benchmarks/bench_peer_quality.py --run runs/demo --peer-python /tmp/peer/bin/python \\
        [--seconds S --dvae-share F] [--samples 64] [--out /tmp/peer-quality]

--run is a finished demo run: its curated pairs are written out as PNGs with their captions, the
suite's prompts come from its reports/eval_prompts.jsonl, and our figures from its reports/eval.json.
The peer (benchmarks/peers/dalle_pytorch_quality.py, under its own interpreter; install it as
benchmarks/peers/dalle_pytorch_runner.py says) trains its dVAE and transformer for --seconds (default:
the run's own train_dvae + train_transformer wall time, from reports/timings.json; a run that did not
time them, such as bench_demo_models.py's, needs --seconds and --dvae-share) at the shapes of the run's
models, then draws --samples images per prompt. Its samples are reranked by the run's CLIP, as ours are, and
scored before and after. The last line is one JSON object: both scorecards' figures.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dalle.runroot import CURATED_DIR, EVAL_PROMPTS, EVAL_REPORT, RUN_CONFIG, TIMINGS_REPORT, run_config
from dalle.sample.evaluation import scorecard_figures, scorecard_text
from dalle.sample.rerank import rerank_key
from dalle.sample.sampler import run_clip
from dalle.storage import Storage
from dalle.tokens.loader import read_listed_shards
from demo.suite import judge_prompt, read_metadata, scorecard
from demo.world import world_config

PEER_SCRIPT = Path(__file__).with_name("peers") / "dalle_pytorch_quality.py"
PEER_RUNNER = PEER_SCRIPT.with_name("dalle_pytorch_runner.py")


def export_pairs(storage: Storage, folder: Path) -> int:
    """The run's curated pairs as PNG files and pairs.jsonl, for the peer."""
    table = read_listed_shards(storage, CURATED_DIR, ["caption", "image"])
    lines = []
    for number, (caption, data) in enumerate(
        zip(table.column("caption").to_pylist(), table.column("image").to_pylist())
    ):
        name = f"{number:06d}.png"
        Image.open(io.BytesIO(data)).convert("RGB").save(folder / name)
        lines.append(json.dumps({"image": name, "caption": caption}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished demo run root")
    parser.add_argument(
        "--peer-python", required=True, help="the peer's interpreter, e.g. /tmp/peer/bin/python"
    )
    parser.add_argument("--seconds", type=float, default=None, help="peer training time (default: ours)")
    parser.add_argument(
        "--dvae-share",
        type=float,
        default=None,
        help="share of --seconds for the peer's dVAE (default: ours)",
    )
    parser.add_argument("--samples", type=int, default=None, help="per prompt (default: the run's gallery's)")
    parser.add_argument(
        "--out", default=None, help="folder for the peer's pairs and samples (default: a temporary one)"
    )
    args = parser.parse_args()

    if args.seconds is not None and args.seconds <= 0:
        parser.error(f"--seconds must be above 0, got {args.seconds}")
    if args.dvae_share is not None and not 0 < args.dvae_share < 1:
        parser.error(
            f"--dvae-share is a share of --seconds, above 0 and below 1 (0.23, not 23); got {args.dvae_share}"
        )
    if not Path(args.peer_python).exists():
        parser.error(
            f"--peer-python {args.peer_python} does not exist; install the peer as {PEER_RUNNER} says"
        )
    storage = Storage(args.run)
    for needed, advice in [
        (RUN_CONFIG, "--run must be a run root, the --out of `dalle demo`"),
        (EVAL_REPORT, "the run has not been judged; run `dalle gallery` on it first"),
    ]:
        if not storage.exists(needed):
            raise SystemExit(f"{storage.uri(needed)} is missing: {advice}")
    cfg = run_config(storage)
    world = world_config(cfg)
    ours = storage.read_json(EVAL_REPORT)
    prompts = read_metadata(storage.read_bytes(EVAL_PROMPTS).decode())
    stages = storage.read_json(TIMINGS_REPORT)["stages"] if storage.exists(TIMINGS_REPORT) else {}
    trained = [stages.get(stage, {}).get("seconds") for stage in ("train_dvae", "train_transformer")]
    ours_seconds = None if None in trained else sum(trained)
    ours_share = None if ours_seconds is None else trained[0] / ours_seconds
    seconds = args.seconds if args.seconds is not None else ours_seconds
    dvae_share = args.dvae_share if args.dvae_share is not None else ours_share
    if seconds is None or dvae_share is None:
        raise SystemExit(
            f"{storage.uri(TIMINGS_REPORT)} does not time train_dvae and train_transformer (the models were "
            "not trained by this run's pipeline, e.g. by bench_demo_models.py): pass --seconds and "
            "--dvae-share, the training time its models took and the dVAE's share of it"
        )
    samples = args.samples or cfg.gallery.samples_per_prompt
    out = Path(args.out or tempfile.mkdtemp(prefix="peer-quality-"))
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    pairs = export_pairs(storage, out / "pairs")
    (out / "prompts.jsonl").write_bytes(storage.read_bytes(EVAL_PROMPTS))

    model = cfg.transformer
    command = [
        args.peer_python, str(PEER_SCRIPT), "--pairs", str(out / "pairs"), "--prompts", str(out / "prompts.jsonl"),
        "--out", str(out), "--seconds", str(seconds),
        "--dvae-share", f"{dvae_share:.3f}",
        "--image-size", str(cfg.dvae.image_size), "--vae-layers", str(cfg.dvae.downsample_steps),
        "--vae-hidden", str(cfg.dvae.hidden_width), "--codebook", str(cfg.dvae.codebook_size),
        "--dim", str(model.width), "--depth", str(model.depth), "--heads", str(model.heads),
        "--text-len", str(model.text_seq_len), "--batch", str(cfg.train_transformer.batch_size),
        "--samples", str(samples),
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the peer failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    peer_run = json.loads(done.stdout.strip().splitlines()[-1])
    files = json.loads((out / "samples.json").read_text())

    clip = run_clip(storage, cfg)
    top = ours.get("reranked_top", cfg.gallery.top)
    judged = []
    for prompt in prompts:
        images = [Image.open(out / rel).convert("RGB") for rel in files.get(prompt.prompt, [])]
        if not images:
            continue
        kept = None
        if clip is not None:  # reranked as our samples are
            key = rerank_key(
                clip, images, prompt.prompt, cfg.gallery.relation_weight, cfg.gallery.binding_weight
            ).key
            kept = [int(i) for i in np.argsort(-key, kind="stable")[:top]]
        judged.append(judge_prompt(prompt, images, kept=kept, colors=world.colors, shapes=world.shapes))
    peer = scorecard(judged)
    print("ours (before/after reranking):\n" + scorecard_text(ours), file=sys.stderr)
    print(
        "peer, dalle-pytorch 1.6.6 (before/after reranking by the same CLIP):\n" + scorecard_text(peer),
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "benchmark": "peer_quality",
                "run": storage.uri(),
                "pairs": pairs,
                "train_seconds": {
                    "ours": None if ours_seconds is None else round(ours_seconds, 1),
                    "peer": round(seconds, 1),
                },
                "samples_per_prompt": samples,
                "reranked_top": top,
                "peer_run": peer_run,
                "seconds": round(time.perf_counter() - start, 1),
                "ours": scorecard_figures(ours),
                "peer": scorecard_figures(peer),
            }
        )
    )


if __name__ == "__main__":
    main()
