"""Speed of the models against the peer (dalle-pytorch 1.6.6): transformer training through the real
training loop, sampling with the key-value cache, and the dVAE like for like.

    python benchmarks/bench_models.py --config tiny --peer-python /tmp/peer/bin/python
    python benchmarks/bench_models.py --config paper-grid --peer-python /tmp/peer/bin/python

Training runs `dalle.train.loop.train` on token shards written to a temporary run root: the loader,
the learning-rate schedule, gradient clipping, the NaN guard, the metrics and the checkpoint are all
in the timed steps. Tokens/s is counted after the warm-up steps, with the time of one checkpoint spread
over train_transformer.checkpoint_every steps (the cadence a run has); the loop's own overhead is the
loop's step time less a bare step (forward, backward, clip, AdamW) on one batch, measured alongside.
Sampling draws every code with the cache, keeps the top 10% of the logits (the peer's filter_thres=0.9)
and decodes to pixels. The dVAE is compared like for like: the peer's shape (64 channels, 3 downsamples,
codebook 512, 1 residual block) for both, images/s and, since the two architectures differ, FLOP/s.

The peer runs in the same invocation, at the same configuration, under its own interpreter
(--peer-python; see benchmarks/peers/dalle_pytorch_runner.py for its install), and the ratios are
printed against the goals of issue 16. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.flop_counter import FlopCounterMode

from dalle.config import DVAEConfig, config_from_dict
from dalle.devices import resolve_device
from dalle.models.dvae import DiscreteVAE
from dalle.models.transformer import DalleTransformer
from dalle.runroot import MANIFEST, SHARDS_DIR
from dalle.sample.generate import generate
from dalle.schemas import SCHEMA_VERSION, token_shard_schema
from dalle.storage import Storage
from dalle.train.loop import train
from dalle.train.transformer import TransformerTraining

PEER_RUNNER = Path(__file__).resolve().parent / "peers" / "dalle_pytorch_runner.py"

# The configurations named in the issue; the peer runs with the same numbers, at equal batch.
CONFIGS = {
    "tiny": {"image_size": 64, "batch": 16, "sample_batch": 8},
    "paper-grid": {"image_size": 256, "batch": 4, "sample_batch": 2},
}
COMMON = {
    "vae_layers": 3,
    "codebook": 512,
    "dim": 256,
    "depth": 4,
    "heads": 4,
    "text_len": 32,
    "text_vocab": 10_000,
}
# The peer's dVAE, which ours is compared with at the same shape.
PEER_DVAE = {"hidden_width": 64, "blocks_per_group": 1}
# Goals of issue 16 against the peer: ours / peer for throughput, peer / ours for time.
GOALS = {
    "tiny": {"train_tokens_per_s": 3.0, "sample_speedup": 30.0},
    "paper-grid": {"train_tokens_per_s": 3.0, "sample_speedup": 50.0},
}
SHARD_ROWS = 64


class BenchTraining(TransformerTraining):
    """The transformer's own training task (dataset, loss, parameter groups) on the benchmark's shards,
    with a vocabulary of `text_vocab` ids in place of a trained tokenizer."""

    def __init__(self, storage: Storage, cfg, text_vocab: int, grid: int, codebook: int):
        self.storage, self.cfg = storage, cfg
        self.text_vocab, self.grid, self.codebook_size = text_vocab, grid, codebook
        self.tokens_per_sample = cfg.transformer.text_seq_len + grid * grid
        self.step_ends: list[float] = []  # perf_counter after each optimizer step

    def build_model(self) -> DalleTransformer:
        return DalleTransformer(self.cfg.transformer, self.text_vocab, self.codebook_size, self.grid)

    def model_meta(self) -> dict[str, Any]:
        return {"kind": "transformer", "transformer": self.cfg.transformer.model_dump(mode="json")}

    def after_step(self, model) -> None:
        self.step_ends.append(time.perf_counter())


def write_token_shards(storage: Storage, spec: dict, grid: int, shards: int) -> None:
    """Random captions of text_len tokens and random codes, as `dalle tokenize` lays them out."""
    rng = np.random.default_rng(0)
    entries = []
    for index in range(shards):
        rel = f"{SHARDS_DIR}/{index:05d}.parquet"
        table = pa.table(
            {
                "uid": [f"{index}-{row}" for row in range(SHARD_ROWS)],
                "caption": ["benchmark"] * SHARD_ROWS,
                "text_tokens": rng.integers(1, spec["text_vocab"], (SHARD_ROWS, spec["text_len"])).tolist(),
                "image_codes": rng.integers(0, spec["codebook"], (SHARD_ROWS, grid * grid)).tolist(),
                "clip_score": [0.3] * SHARD_ROWS,
            },
            schema=token_shard_schema(grid * grid),
        )
        storage.write_table(rel, table)
        digest = hashlib.sha256(storage.read_bytes(rel)).hexdigest()
        entries.append({"path": rel, "rows": SHARD_ROWS, "sha256": digest})
    storage.write_json(
        f"{SHARDS_DIR}/{MANIFEST}",
        {"schema_version": SCHEMA_VERSION, "rows": SHARD_ROWS * shards, "shards": entries},
    )


def run_config(spec: dict, device: str, max_steps: int):
    return config_from_dict(
        {
            "transformer": {
                "text_seq_len": spec["text_len"],
                "width": spec["dim"],
                "depth": spec["depth"],
                "heads": spec["heads"],
            },
            "train_transformer": {"batch_size": spec["batch"], "max_steps": max_steps, "device": device},
        },
        "bench_models",
    )


def measure_training(spec: dict, grid: int, device: str, warmup: int, steps: int) -> dict:
    """Tokens/s of `train(...)` on token shards after `warmup` steps, the checkpoint's cost, and the
    loop's overhead over a bare step on one batch."""
    cfg = run_config(spec, device, warmup + steps)
    tcfg = cfg.train_transformer
    tokens_per_step = spec["batch"] * (spec["text_len"] + grid * grid)
    with tempfile.TemporaryDirectory(prefix="bench_models_") as root:
        storage = Storage(root)
        write_token_shards(storage, spec, grid, shards=max(2, math.ceil(4 * spec["batch"] / SHARD_ROWS)))
        task = BenchTraining(storage, cfg, spec["text_vocab"], grid, spec["codebook"])
        checkpoint_at: list[float] = []
        train(
            task,
            storage,
            cfg,
            tcfg,
            resume=False,
            log=lambda message: None,
            on_checkpoint=lambda record: checkpoint_at.append(time.perf_counter()),
        )
        ends = task.step_ends
        loop_step_s = (ends[-1] - ends[warmup - 1]) / steps
        checkpoint_s = checkpoint_at[-1] - ends[-1]

        # The same step by hand on one batch from the same shards: what the loop adds is overhead.
        dev = resolve_device(tcfg.device, setting="train_transformer.device")
        model = task.build_model().to(dev)
        optimizer = torch.optim.AdamW(
            task.optimizer_groups(model, tcfg.weight_decay), lr=tcfg.lr, fused=dev.type in ("cpu", "cuda")
        )
        batch = next(iter(task.dataset(spec["batch"], 0, 0, 0, 1)))
        batch = {k: v.to(dev) for k, v in batch.items()}
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

        def bare_step():
            with autocast:
                loss = model(batch["text_tokens"], batch["image_codes"]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            optimizer.step()
            _sync(dev)

        bare_step_s = _seconds_per_call(bare_step, steps, warmup)
    every = tcfg.checkpoint_every
    return {
        "train_tokens_per_s": tokens_per_step * every / (loop_step_s * every + checkpoint_s),
        "train_tokens_per_s_without_checkpoints": tokens_per_step / loop_step_s,
        "train_step_s": loop_step_s,
        "checkpoint_s": checkpoint_s,
        "checkpoint_every": every,
        "bare_step_s": bare_step_s,
        "loop_overhead_s_per_step": loop_step_s - bare_step_s,
        "train_model_flops_per_s": model.flops_per_sample() * spec["batch"] / loop_step_s,
        "params": sum(p.numel() for p in model.parameters()),
    }


def measure_sampling(spec: dict, grid: int, device: str, without_cache: bool) -> dict:
    """Seconds per image: codes drawn with the cache from an untrained model, decoded to pixels."""
    dev = resolve_device(device, setting="--device")
    torch.manual_seed(0)
    cfg = run_config(spec, device, 1)
    model = DalleTransformer(cfg.transformer, spec["text_vocab"], spec["codebook"], grid).to(dev).eval()
    dvae = DiscreteVAE(_dvae_config(spec)).to(dev).eval()
    text = torch.randint(1, spec["text_vocab"], (spec["sample_batch"], spec["text_len"]), device=dev)
    top_k = max(1, math.ceil(0.1 * spec["codebook"]))
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def sample(use_cache: bool) -> float:
        start = time.perf_counter()
        with torch.inference_mode(), autocast:
            dvae.decode(generate(model, text, top_k=top_k, seed=0, use_cache=use_cache))
        _sync(dev)
        return (time.perf_counter() - start) / spec["sample_batch"]

    sample(True)  # warm-up
    out = {"sample_s_per_image": min(sample(True), sample(True))}
    if without_cache:
        out["sample_s_per_image_without_cache"] = sample(False)
    return out


def _dvae_config(spec: dict) -> DVAEConfig:
    return DVAEConfig(
        image_size=spec["image_size"],
        downsample_steps=spec["vae_layers"],
        codebook_size=spec["codebook"],
        **PEER_DVAE,
    )


def measure_dvae(spec: dict, device: str, steps: int) -> dict:
    """Training images/s of our dVAE at the peer's shape, and its FLOPs per image (forward and backward)."""
    dev = resolve_device(device, setting="--device")
    torch.manual_seed(0)
    dvae = DiscreteVAE(_dvae_config(spec)).to(dev)
    images = torch.rand(spec["batch"], 3, spec["image_size"], spec["image_size"], device=dev)
    optimizer = torch.optim.AdamW(dvae.parameters(), lr=1e-3, fused=dev.type in ("cpu", "cuda"))
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    count = [0]

    def step():
        with autocast:
            loss = dvae(images, count[0]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        count[0] += 1
        _sync(dev)

    with FlopCounterMode(display=False) as counter:
        step()
    images_per_s = spec["batch"] / _seconds_per_call(step, steps, 1)
    flops = counter.get_total_flops() / spec["batch"]
    return {
        "dvae_train_images_per_s": images_per_s,
        "dvae_flops_per_image": flops,
        "dvae_params": sum(p.numel() for p in dvae.parameters()),
    }


def _seconds_per_call(fn, calls: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_peer(spec: dict, python: str, steps: int, warmup: int) -> dict:
    args = [
        python, str(PEER_RUNNER),
        "--image-size", str(spec["image_size"]), "--vae-layers", str(spec["vae_layers"]),
        "--vae-hidden", str(PEER_DVAE["hidden_width"]), "--vae-resblocks", str(PEER_DVAE["blocks_per_group"]),
        "--codebook", str(spec["codebook"]), "--dim", str(spec["dim"]), "--depth", str(spec["depth"]),
        "--heads", str(spec["heads"]), "--text-len", str(spec["text_len"]),
        "--text-vocab", str(spec["text_vocab"]), "--batch", str(spec["batch"]),
        "--sample-batch", str(spec["sample_batch"]), "--steps", str(steps), "--warmup", str(warmup),
    ]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(
            f"the peer baseline failed (exit {result.returncode}); is dalle-pytorch 1.6.6 installed in "
            f"{python}'s environment as {PEER_RUNNER.name} says?\n{result.stderr[-2000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def best_of(rounds: list[dict]) -> dict:
    """Each figure's best over the rounds: the highest rate (*_per_s), the lowest time (*_s, *_s_per_image)."""
    best = dict(rounds[0])
    for key, value in best.items():
        if isinstance(value, float):
            values = [r[key] for r in rounds]
            best[key] = max(values) if "_per_s" in key else min(values) if "_s" in key else value
    return best


def ratios(ours: dict, peer: dict) -> dict:
    """Ours against the peer: rates as ours / peer, times as peer / ours; above 1, ours is faster."""
    return {
        "train_tokens_per_s": ours["train_tokens_per_s"] / peer["train_tokens_per_s"],
        "sample_speedup": peer["sample_s_per_image"] / ours["sample_s_per_image"],
        "dvae_train_images_per_s": ours["dvae_train_images_per_s"] / peer["dvae_train_images_per_s"],
        "dvae_flops_per_s": (ours["dvae_train_images_per_s"] * ours["dvae_flops_per_image"])
        / (peer["dvae_train_images_per_s"] * peer["dvae_flops_per_image"]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed training steps (default: 20 tiny, 6 paper-grid)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument(
        "--sample-batch",
        type=int,
        default=None,
        help="images sampled at once, by both (default: the config's)",
    )
    parser.add_argument("--peer-python", help="interpreter of a virtual environment with dalle-pytorch 1.6.6")
    parser.add_argument(
        "--repeat", type=int, default=2, help="rounds of ours then the peer; the best of each is kept"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.peer_python and not Path(args.peer_python).exists():
        parser.error(
            f"--peer-python {args.peer_python} does not exist; install the peer as {PEER_RUNNER} says"
        )
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step's time is not a steady state)")
    steps = args.steps or (20 if args.config == "tiny" else 6)
    spec = {**COMMON, **CONFIGS[args.config]}
    if args.sample_batch is not None:
        if args.sample_batch < 1:
            parser.error("--sample-batch must be at least 1")
        spec["sample_batch"] = args.sample_batch
    grid = spec["image_size"] // 2 ** spec["vae_layers"]

    result: dict[str, Any] = {
        "config": args.config,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "seq_len": spec["text_len"] + grid * grid,
        "repeat": args.repeat,
        **spec,
    }
    # Ours and the peer alternate, `repeat` times; each side's best figure of the rounds is kept, so a
    # burst of load on the shared cores in one round does not decide the ratio.
    ours_rounds, peer_rounds = [], []
    for _ in range(args.repeat):
        ours = measure_training(spec, grid, args.device, args.warmup, steps)
        ours.update(measure_sampling(spec, grid, args.device, without_cache=args.config == "tiny"))
        ours.update(measure_dvae(spec, args.device, steps))
        ours_rounds.append(ours)
        if args.peer_python:
            peer_rounds.append(measure_peer(spec, args.peer_python, steps, args.warmup))
    result.update(best_of(ours_rounds))
    result["loop_overhead_s_per_step"] = result["train_step_s"] - result["bare_step_s"]
    if args.peer_python:
        peer = best_of(peer_rounds)
        result["peer"] = {k: v for k, v in peer.items() if k != "config"}
        result["vs_peer"] = ratios(result, peer)
        result["vs_peer_each_round"] = [ratios(o, p) for o, p in zip(ours_rounds, peer_rounds)]
        result["goals"] = GOALS[args.config]
        result["goals_met"] = {
            key: result["vs_peer"][key] >= goal for key, goal in GOALS[args.config].items()
        }
    else:
        result["peer"] = None
        print("no --peer-python given: the peer baseline was not run", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
