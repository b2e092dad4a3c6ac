"""The peer side of benchmarks/bench_peer_quality.py: lucidrains' dalle-pytorch 1.6.6 trained on a
demo run's curated pairs for a given wall time, then sampled for every prompt of the composition
suite. It runs under the peer's own interpreter (installed as benchmarks/peers/dalle_pytorch_runner.py
says), never ours, and reads and writes plain files only:

    --pairs DIR     pairs.jsonl ({"image": "00000.png", "caption": ...} per line) and the PNGs
    --prompts FILE  the suite's prompts, one JSON object per line (reports/eval_prompts.jsonl)
    --out DIR       samples/{prompt index}/{k}.png, and samples.json mapping each prompt to its files

Training the peer's way, as its README shows it: its DiscreteVAE (gumbel-softmax, its own losses)
for `--dvae-share` of the time, then its DALLE (forward with return_loss, backward, Adam) with the
dVAE frozen for the rest, at the shapes of the run's own models. Sampling: generate_images with its
key-value cache and filter_thres 0.9. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch
from dalle_pytorch_runner import import_peer
from PIL import Image


def load_pairs(folder: Path, image_size: int) -> tuple[torch.Tensor, list[str]]:
    images, captions = [], []
    for line in (folder / "pairs.jsonl").read_text().splitlines():
        row = json.loads(line)
        image = (
            Image.open(folder / row["image"]).convert("RGB").resize((image_size, image_size), Image.BICUBIC)
        )
        images.append(
            torch.tensor(list(image.getdata()), dtype=torch.float32).view(image_size, image_size, 3)
        )
        captions.append(row["caption"])
    return torch.stack(images).permute(0, 3, 1, 2) / 255.0, captions


def to_png(pixels: torch.Tensor, path: Path) -> None:
    array = (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, required=True, help="training wall time, dVAE and DALLE")
    parser.add_argument("--dvae-share", type=float, default=0.2, help="share of --seconds for the dVAE")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--vae-layers", type=int, default=2, help="downsamples: 2 gives 8x8 codes at 32 px")
    parser.add_argument("--vae-hidden", type=int, default=32)
    parser.add_argument("--codebook", type=int, default=512)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=24)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4, help="the peer's default learning rate")
    parser.add_argument("--samples", type=int, default=64, help="samples per prompt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    DALLE, DiscreteVAE = import_peer()
    from dalle_pytorch.tokenizer import tokenizer

    images, captions = load_pairs(Path(args.pairs), args.image_size)
    text = tokenizer.tokenize(captions, args.text_len, truncate_text=True)
    vae = DiscreteVAE(
        image_size=args.image_size, num_layers=args.vae_layers, num_tokens=args.codebook,
        codebook_dim=args.vae_hidden * 4, hidden_dim=args.vae_hidden, num_resnet_blocks=1,
    )  # fmt: skip
    budget = {"dvae": args.seconds * args.dvae_share, "dalle": args.seconds * (1 - args.dvae_share)}
    steps = {}

    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < budget["dvae"]:
        index = torch.randint(len(images), (args.batch,))
        loss = vae(images[index], return_loss=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
    steps["dvae"] = step

    dalle = DALLE(
        dim=args.dim, vae=vae, num_text_tokens=tokenizer.vocab_size, text_seq_len=args.text_len,
        depth=args.depth, heads=args.heads, dim_head=args.dim // args.heads, attn_dropout=0.1, ff_dropout=0.1,
    )  # fmt: skip
    optimizer = torch.optim.Adam(dalle.parameters(), lr=args.lr)
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < budget["dalle"]:
        index = torch.randint(len(images), (args.batch,))
        loss = dalle(text[index], images[index], return_loss=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
    steps["dalle"] = step

    dalle.eval()
    out = Path(args.out)
    prompts = [
        json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines() if line.strip()
    ]
    files: dict[str, list[str]] = {}
    start = time.perf_counter()
    with torch.no_grad():
        for number, prompt in enumerate(dict.fromkeys(prompts)):
            folder = out / "samples" / f"{number:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            tokens = tokenizer.tokenize([prompt] * args.samples, args.text_len, truncate_text=True)
            drawn = dalle.generate_images(tokens, filter_thres=0.9, use_cache=True)
            files[prompt] = []
            for k, pixels in enumerate(drawn):
                path = folder / f"{k:03d}.png"
                to_png(pixels * 0.5 + 0.5, path)  # the peer's dVAE works in (x - 0.5) / 0.5
                files[prompt].append(os.path.relpath(path, out))
    (out / "samples.json").write_text(json.dumps(files))
    print(json.dumps({
        "peer": "dalle-pytorch 1.6.6", "pairs": len(captions), "steps": steps,
        "train_seconds": args.seconds, "sample_seconds": round(time.perf_counter() - start, 1),
        "samples_per_prompt": args.samples, "prompts": len(files),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
