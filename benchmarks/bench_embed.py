"""CLIP image embedding: the embed stage's path against a plain open_clip loop, and where the time goes.

    python benchmarks/bench_embed.py                      # ViT-B-32 at random weights, 256 images, batch 64
    python benchmarks/bench_embed.py --model ViT-B-16 --images 512 --batch 128

Weights do not change the arithmetic, so the model is built at random weights (no download). The
images are 256 px JPEGs of the demo world, as img2dataset's default resize stores them. Measured in
one run:

- decode: JPEG bytes to open_clip's preprocessed tensor (PIL decode, resize, crop, normalise), on one
  thread: the images per core-second a machine must supply per GPU (`dalle plan`'s decode rate);
- model: `encode_image` on preprocessed batches, alone;
- baseline: the plain loop (decode, preprocess, stack, encode_image, normalise) at the same batch;
- ours: `dalle.curate.embed`'s path (the stage's decode and `ClipModel.encode_images`);
- variants of the model step: channels-last, bf16 autocast on the CPU, dynamic int8 of the linear
  layers, each with the largest cosine distance of its embeddings from fp32 (usable at <= 0.01).

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def jpeg_images(count: int, size: int) -> list[bytes]:
    from PIL import Image

    from demo.world import WorldConfig, generate_samples

    samples = generate_samples(WorldConfig(num_images=count, image_size=size, pair_fraction=0.2))
    images = []
    for sample in samples[:count]:
        buffer = io.BytesIO()
        Image.open(io.BytesIO(sample.image)).convert("RGB").save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def timed_alternately(first, second, repeat: int) -> tuple[float, float]:
    """Best times of two functions run in turns (a, b, a, b, ...), so that neither gets the machine's
    quieter moments or its warmer caches alone."""
    first(), second()  # warm-up
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for index, fn in enumerate((first, second)):
            start = time.perf_counter()
            fn()
            best[index] = min(best[index], time.perf_counter() - start)
    return best[0], best[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B-32", help="an open_clip architecture name")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=256, help="side of the stored JPEGs")
    parser.add_argument("--repeat", type=int, default=2, help="timed repeats; the best is kept")
    args = parser.parse_args()
    if args.images < 1 or args.batch < 1 or args.repeat < 1:
        parser.error("--images, --batch and --repeat must be positive")

    import open_clip
    from PIL import Image

    from dalle.curate.embed import _decode
    from dalle.models.clip import ClipModel, _registered_architecture

    logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights": none are wanted here
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).eval()
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    clip = ClipModel(
        model,
        identity=f"open_clip:{args.model}:random",
        architecture=_registered_architecture(args.model),
        preprocess_cfg=dict(model.visual.preprocess_cfg),
        device=torch.device("cpu"),
        model_name=args.model,
        batch_size=args.batch,
    )
    images = jpeg_images(args.images, args.image_size)
    n = len(images)

    # Decode and preprocess alone, on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    decode_s = timed(
        lambda: [preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images], args.repeat
    )
    torch.set_num_threads(threads)
    tensors = [preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]
    batches = [torch.stack(tensors[i : i + args.batch]) for i in range(0, n, args.batch)]

    def model_only(module=model, autocast=False, channels_last=False):
        out = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for batch in batches:
                x = batch.contiguous(memory_format=torch.channels_last) if channels_last else batch
                out.append(module.encode_image(x).float())
        features = torch.cat(out)
        return (features / features.norm(dim=-1, keepdim=True)).numpy()

    reference = model_only()
    model_s = timed(model_only, args.repeat)

    def baseline():
        out = []
        with torch.no_grad():
            for i in range(0, n, args.batch):
                batch = torch.stack(
                    [preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[i : i + args.batch]]
                )
                features = model.encode_image(batch)
                out.append(features / features.norm(dim=-1, keepdim=True))
        return torch.cat(out).numpy()

    def ours():
        return clip.encode_images([_decode(b, "bench image") for b in images], args.batch)

    baseline_s, ours_s = timed_alternately(baseline, ours, args.repeat)
    ours_deviation = float(np.max(1 - np.einsum("nd,nd->n", ours(), baseline())))

    variants = {}
    bf16_native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    for name, run in {
        "channels_last": lambda: model_only(channels_last=True),
        "bf16_autocast": lambda: model_only(autocast=True),
        "int8_dynamic_linear": lambda: model_only(module=quantized),
    }.items():
        seconds = timed(run, args.repeat)
        deviation = float(np.max(1 - np.einsum("nd,nd->n", run(), reference)))
        variants[name] = {
            "images_per_s": round(n / seconds, 1),
            "over_fp32_model": round(model_s / seconds, 2),
            "max_cosine_distance": round(deviation, 5),
            "usable": deviation <= 0.01,
        }

    result = {
        "benchmark": "embed",
        "model": args.model,
        "images": n,
        "batch": args.batch,
        "threads": threads,
        "decode_images_per_core_s": round(n / decode_s, 1),
        "model_images_per_s": round(n / model_s, 1),
        "baseline_images_per_s": round(n / baseline_s, 1),
        "ours_images_per_s": round(n / ours_s, 1),
        "ours_over_baseline": round(baseline_s / ours_s, 3),
        "ours_max_cosine_distance": round(ours_deviation, 6),
        "decode_share_of_baseline": round(decode_s / threads / baseline_s, 3),
        "cpu_bf16_native": bf16_native,
        "variants": variants,
        "goal": {"ours_over_baseline_at_least": 1.0, "max_cosine_distance": 0.01},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
