"""The GPU check: a short training and sampling run at a paper-like configuration, with the model FLOPs
utilisation (MFU), tokens/s and images/s. `benchmarks/gpu_check.sh` runs it.

    bash benchmarks/gpu_check.sh                 # the whole check, under 5 minutes on one GPU
    bash benchmarks/gpu_check.sh --no-compile    # eager instead of torch.compile

On a CUDA device it trains the transformer through the real loop (`dalle.train.loop.train`: loader,
schedule, clipping, metrics, checkpoint) at width 1024, 16 layers, 16 heads, 128 text tokens and a
32x32 code grid (1,152 tokens per sample; codebook 8192), in bf16 autocast with fused AdamW, flash
attention through `scaled_dot_product_attention` and, unless --no-compile, `torch.compile`. MFU is the
loop's own metric (`mfu` in the metrics records: the model's FLOPs per sample, counted by
`DalleTransformer.flops_per_sample`, times samples/s, over the device's dense bf16 peak; set --peak-flops
for a GPU the loop does not know). Sampling draws every code of 32x32 grids with the key-value cache
and decodes them to 256 px images with a dVAE of the paper's downsampling.

Without a CUDA device it says so on stderr and runs the same path on the CPU at a tiny configuration
(width 256, 8x8 codes), so the script stays tested; those figures are not GPU figures and carry
"fallback": true. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import BenchTraining, write_token_shards

from dalle.config import DVAEConfig, config_from_dict
from dalle.models.dvae import DiscreteVAE
from dalle.models.transformer import DalleTransformer
from dalle.sample.generate import generate
from dalle.storage import Storage
from dalle.train.loop import train

# grid: codes per side; image: pixels per side (grid * 2**downsample_steps).
PROFILES = {
    "gpu": {
        "width": 1024, "depth": 16, "heads": 16, "text_len": 128, "text_vocab": 16384,
        "grid": 32, "codebook": 8192, "image_size": 256, "downsample_steps": 3,
        "batch": 32, "steps": 150, "sample_batch": 16,
    },
    "cpu": {
        "width": 256, "depth": 4, "heads": 4, "text_len": 32, "text_vocab": 10000,
        "grid": 8, "codebook": 512, "image_size": 64, "downsample_steps": 3,
        "batch": 16, "steps": 12, "sample_batch": 4,
    },
}  # fmt: skip


def run_config(spec: dict, device: str, steps: int, compiled: bool, peak_flops: float | None):
    log_every = max(1, steps // 10)
    return config_from_dict(
        {
            "transformer": {
                "text_seq_len": spec["text_len"],
                "width": spec["width"],
                "depth": spec["depth"],
                "heads": spec["heads"],
            },
            "train_transformer": {
                "batch_size": spec["batch"],
                "max_steps": steps,
                "warmup_steps": 1,
                "log_every": log_every,
                "checkpoint_every": steps,
                "device": device,
                "precision": "bf16" if device == "cuda" else "fp32",
                "compile": compiled,
                "peak_flops": peak_flops,
            },
        },
        "bench_gpu",
    )


def measure_training(spec: dict, device: str, steps: int, compiled: bool, peak_flops: float | None) -> dict:
    """The loop's own metrics records after the first (the first holds the compile and the warm-up)."""
    cfg = run_config(spec, device, steps, compiled, peak_flops)
    grid = spec["grid"]
    records: list[dict] = []
    messages: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as root:
        storage = Storage(root)
        shard_spec = {
            "text_vocab": spec["text_vocab"],
            "text_len": spec["text_len"],
            "codebook": spec["codebook"],
        }
        write_token_shards(storage, shard_spec, grid, shards=max(2, math.ceil(4 * spec["batch"] / 64)))
        task = BenchTraining(storage, cfg, spec["text_vocab"], grid, spec["codebook"])
        start = time.perf_counter()
        train(
            task,
            storage,
            cfg,
            cfg.train_transformer,
            resume=False,
            log=messages.append,
            on_metrics=records.append,
        )
        wall = time.perf_counter() - start
    steady = records[1:] or records

    def median(key: str) -> float | None:
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {
        "train_wall_s": wall,
        "train_tokens_per_s": median("tokens_per_s"),
        "train_samples_per_s": median("samples_per_s"),
        "model_flops_per_s": median("model_flops_per_s"),
        "mfu": median("mfu"),
        "mfu_basis": next((m for m in messages if "mfu" in m), None),
        "params": sum(p.numel() for p in task.build_model().parameters()),
        "compiled": compiled,
    }


def measure_sampling(spec: dict, device: str) -> dict:
    """Images/s: every code of a grid drawn with the cache (top 10% of the logits), decoded to pixels."""
    dev = torch.device(device)
    torch.manual_seed(0)
    tcfg = run_config(spec, device, 1, False, None).transformer
    model = DalleTransformer(tcfg, spec["text_vocab"], spec["codebook"], spec["grid"]).to(dev).eval()
    dvae_cfg = DVAEConfig(
        image_size=spec["image_size"],
        downsample_steps=spec["downsample_steps"],
        codebook_size=spec["codebook"],
    )
    dvae = DiscreteVAE(dvae_cfg).to(dev).eval()
    text = torch.randint(1, spec["text_vocab"], (spec["sample_batch"], spec["text_len"]), device=dev)
    top_k = max(1, math.ceil(0.1 * spec["codebook"]))
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def sample() -> float:
        start = time.perf_counter()
        with torch.inference_mode(), autocast:
            images = dvae.decode(generate(model, text, top_k=top_k, seed=0))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        assert images.shape[-1] == spec["image_size"]
        return time.perf_counter() - start

    sample()  # warm-up
    seconds = min(sample(), sample())
    return {"sample_images_per_s": spec["sample_batch"] / seconds, "sample_s_per_batch": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="training steps (default: the profile's)")
    parser.add_argument("--no-compile", action="store_true", help="train eager, without torch.compile")
    parser.add_argument("--peak-flops", type=float, help="the GPU's dense bf16 peak FLOP/s, when not known")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if cuda:
        device, profile, name = "cuda", "gpu", torch.cuda.get_device_name(0)
    else:
        device, profile, name = "cpu", "cpu", "cpu"
        print(
            "gpu_check: no CUDA device here, so the GPU check falls back to the CPU path at a tiny "
            "configuration; its figures are not GPU figures (no MFU without a known peak).",
            file=sys.stderr,
        )
    spec = PROFILES[profile]
    steps = args.steps or spec["steps"]
    compiled = cuda and not args.no_compile  # on the CPU the fallback stays quick: no compile
    result = {
        "device": name,
        "fallback": not cuda,
        "profile": profile,
        "torch": torch.__version__,
        **{k: v for k, v in spec.items() if k != "steps"},
        "steps": steps,
        "seq_len": spec["text_len"] + spec["grid"] ** 2,
        **measure_training(spec, device, steps, compiled, args.peak_flops),
        **measure_sampling(spec, device),
    }
    if cuda:
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(
        f"{name}: training {result['train_tokens_per_s']:.0f} tokens/s, MFU "
        + (f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a")
        + f", sampling {result['sample_images_per_s']:.2f} images/s",
        file=sys.stderr,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
