"""Speed of the models: transformer training, dVAE training and sampling, with and without the cache.

    python benchmarks/bench_models.py --config tiny
    python benchmarks/bench_models.py --config paper-grid --peer-python /tmp/peer/bin/python --peer-script RUNNER

With --peer-python (a virtual environment holding dalle-pytorch 1.6.6) and --peer-script (a
runner for it, not shipped in this repository yet), the peer baseline runs in the same invocation at the same
configuration and the ratios are printed. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from dalle.config import DVAEConfig, TransformerConfig
from dalle.models.dvae import DiscreteVAE
from dalle.models.transformer import DalleTransformer
from dalle.sample.generate import generate

# The configurations named in the issue; the peer runs with the same numbers.
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
# Goals against the peer, per configuration: ours / peer for throughput, peer / ours for time.
GOALS = {
    "tiny": {"train_tokens_per_s": 2.5, "sample_speedup": 5.0},
    "paper-grid": {"sample_speedup": 10.0},
}


def _timed(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def measure_ours(name: str, steps: int, device: torch.device, dvae_width: int) -> dict:
    spec = {**COMMON, **CONFIGS[name]}
    torch.manual_seed(0)
    dvae_cfg = DVAEConfig(
        image_size=spec["image_size"],
        downsample_steps=spec["vae_layers"],
        codebook_size=spec["codebook"],
        hidden_width=dvae_width,
    )
    tcfg = TransformerConfig(
        text_seq_len=spec["text_len"],
        width=spec["dim"],
        depth=spec["depth"],
        heads=spec["heads"],
    )
    grid = dvae_cfg.grid
    model = DalleTransformer(tcfg, spec["text_vocab"], spec["codebook"], grid).to(device)
    batch = spec["batch"]
    text = torch.randint(1, spec["text_vocab"], (batch, spec["text_len"]), device=device)
    codes = torch.randint(0, spec["codebook"], (batch, grid * grid), device=device)
    optimizer = torch.optim.AdamW(model.optimizer_groups(4.5e-2), lr=3e-4, betas=(0.9, 0.96), fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def train_step():
        with autocast:
            loss = model(text, codes).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
        optimizer.step()
        _sync(device)

    step_s = _timed(train_step, steps)
    out = {"train_tokens_per_s": batch * (spec["text_len"] + grid * grid) / step_s}

    dvae = DiscreteVAE(dvae_cfg).to(device)
    images = torch.rand(batch, 3, spec["image_size"], spec["image_size"], device=device)
    dvae_optimizer = torch.optim.AdamW(dvae.parameters(), lr=1e-3)
    dvae_step_count = [0]

    def dvae_step():
        with autocast:
            loss = dvae(images, dvae_step_count[0]).loss
        dvae_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dvae_optimizer.step()
        dvae_step_count[0] += 1
        _sync(device)

    out["dvae_train_images_per_s"] = batch / _timed(dvae_step, steps, warmup=1)

    # Sampling as the peer does it: top 10% of the logits kept (its filter_thres=0.9), decoded to pixels.
    model.eval()
    dvae.eval()
    sample_batch = spec["sample_batch"]
    top_k = max(1, math.ceil(0.1 * spec["codebook"]))

    def sample(use_cache: bool) -> float:
        start = time.perf_counter()
        with torch.no_grad(), autocast:
            sampled = generate(model, text[:sample_batch], top_k=top_k, seed=0, use_cache=use_cache)
            dvae.decode(sampled)
        _sync(device)
        return (time.perf_counter() - start) / sample_batch

    sample(True)  # warm-up
    out["sample_s_per_image"] = sample(True)
    out["sample_s_per_image_nocache"] = sample(False)
    out["params"] = {
        "transformer": sum(p.numel() for p in model.parameters()),
        "dvae": sum(p.numel() for p in dvae.parameters()),
    }
    out["dvae_hidden_width"] = dvae_width
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_peer(name: str, python: str, script: Path, steps: int) -> dict:
    spec = {**COMMON, **CONFIGS[name]}
    args = [
        python, str(script),
        "--image-size", str(spec["image_size"]), "--vae-layers", str(spec["vae_layers"]),
        "--codebook", str(spec["codebook"]), "--dim", str(spec["dim"]), "--depth", str(spec["depth"]),
        "--heads", str(spec["heads"]), "--text-len", str(spec["text_len"]),
        "--text-vocab", str(spec["text_vocab"]), "--batch", str(spec["batch"]),
        "--sample-batch", str(spec["sample_batch"]), "--steps", str(steps),
    ]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the peer baseline failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dvae-width", type=int, default=DVAEConfig().hidden_width,
                        help="dVAE hidden width (the peer uses 64 channels at every resolution)")  # fmt: skip
    parser.add_argument("--peer-python", help="interpreter of a virtual environment with dalle-pytorch 1.6.6")
    parser.add_argument("--peer-script", type=Path, help="the runner of the peer benchmark (not shipped yet)")
    args = parser.parse_args(argv)
    if args.peer_python and args.peer_script is None:
        parser.error("--peer-python needs --peer-script: this repository does not ship the peer's runner yet")

    result = {
        "config": args.config,
        "device": args.device,
        "threads": torch.get_num_threads(),
        **{k: v for k, v in {**COMMON, **CONFIGS[args.config]}.items()},
    }
    result.update(measure_ours(args.config, args.steps, torch.device(args.device), args.dvae_width))
    if args.peer_python:
        peer = measure_peer(args.config, args.peer_python, args.peer_script, args.steps)
        ratios = {
            "train_tokens_per_s": result["train_tokens_per_s"] / peer["train_tokens_per_s"],
            "sample_speedup": peer["sample_s_per_image"] / result["sample_s_per_image"],
            "dvae_train_images_per_s": result["dvae_train_images_per_s"] / peer["dvae_train_images_per_s"],
        }
        result["peer"] = {k: v for k, v in peer.items() if k != "config"}
        result["vs_peer"] = ratios
        result["goals_met"] = {key: ratios[key] >= goal for key, goal in GOALS[args.config].items()}
    else:
        result["peer"] = None
        print("no --peer-python given: the peer baseline was not run", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
