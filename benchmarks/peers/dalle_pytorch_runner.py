"""The peer baseline for benchmarks/bench_models.py: lucidrains' dalle-pytorch 1.6.6, timed at the
configuration given on the command line. It runs under the peer's own interpreter, never ours.

Install (a virtual environment of its own: the peer's pinned extras would downgrade this project's;
`--no-deps` skips the extras that no longer build):

    python3 -m venv /tmp/peer
    /tmp/peer/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/peer/bin/pip install --no-deps dalle-pytorch==1.6.6 DALL-E taming-transformers-rom1504
    /tmp/peer/bin/pip install axial-positional-embedding einops rotary-embedding-torch tokenizers \\
        omegaconf pytorch-lightning transformers ftfy regex webdataset requests 'setuptools<81'

Run (bench_models.py does this with --peer-python /tmp/peer/bin/python):

    /tmp/peer/bin/python benchmarks/peers/dalle_pytorch_runner.py --image-size 64 --batch 16

What is timed, the peer's way: its training step as its README shows it (forward with return_loss,
backward, Adam step) on one fixed batch of codes, tokens/s after warm-up; generate_images with its
key-value cache and filter_thres 0.9 (the top 10% of logits kept), decoded to pixels, seconds per image;
its DiscreteVAE's training step, images/s, and the dVAE's forward+backward FLOPs per image (counted by
torch's FlopCounterMode) so that dVAEs of other shapes can be compared per FLOP. The last line printed
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types

import torch
from torch.utils.flop_counter import FlopCounterMode


def import_peer():
    """dalle_pytorch 1.6.6 imports two modules that current releases lack; neither is used here."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    shim = types.ModuleType("pytorch_lightning.utilities.distributed")
    shim.rank_zero_only = rank_zero_only
    sys.modules.setdefault("pytorch_lightning.utilities.distributed", shim)
    sys.modules.setdefault("youtokentome", types.ModuleType("youtokentome"))
    from dalle_pytorch import DALLE, DiscreteVAE

    return DALLE, DiscreteVAE


def seconds_per_call(fn, calls: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--vae-layers", type=int, default=3, help="downsamples of the dVAE")
    parser.add_argument("--vae-hidden", type=int, default=64, help="channels of the dVAE")
    parser.add_argument("--vae-resblocks", type=int, default=1)
    parser.add_argument("--codebook", type=int, default=512)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--text-vocab", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--sample-batch", type=int, default=8)
    parser.add_argument("--skip", action="append", default=[], choices=["train", "sample", "dvae"])
    args = parser.parse_args()
    DALLE, DiscreteVAE = import_peer()
    torch.manual_seed(0)

    def new_vae():
        return DiscreteVAE(
            image_size=args.image_size,
            num_layers=args.vae_layers,
            num_tokens=args.codebook,
            codebook_dim=256,
            hidden_dim=args.vae_hidden,
            num_resnet_blocks=args.vae_resblocks,
        )

    vae = new_vae()
    model = DALLE(
        dim=args.dim,
        vae=vae,
        num_text_tokens=args.text_vocab,
        text_seq_len=args.text_len,
        depth=args.depth,
        heads=args.heads,
        dim_head=args.dim // args.heads,
        attn_types=("full",),
    )
    grid = args.image_size // 2**args.vae_layers
    text = torch.randint(1, args.text_vocab, (args.batch, args.text_len))
    images = torch.rand(args.batch, 3, args.image_size, args.image_size)
    result: dict = {"peer": "dalle-pytorch 1.6.6", "threads": torch.get_num_threads()}
    result["params"] = {
        "transformer": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vae.")),
        "dvae": sum(p.numel() for p in vae.parameters()),
    }

    if "train" not in args.skip:
        with torch.no_grad():
            codes = vae.get_codebook_indices(images)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)

        def train_step():
            loss = model(text, codes, return_loss=True)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        step_s = seconds_per_call(train_step, args.steps, args.warmup)
        result["train_step_s"] = step_s
        result["train_tokens_per_s"] = args.batch * (args.text_len + grid * grid) / step_s

    if "sample" not in args.skip:
        model.eval()
        with torch.no_grad():
            start = time.perf_counter()
            model.generate_images(text[: args.sample_batch], filter_thres=0.9, use_cache=True)
            result["sample_s_per_image"] = (time.perf_counter() - start) / args.sample_batch

    if "dvae" not in args.skip:
        vae = new_vae()
        vae_optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)

        def vae_step():
            loss = vae(images, return_loss=True)
            vae_optimizer.zero_grad()
            loss.backward()
            vae_optimizer.step()

        with FlopCounterMode(display=False) as counter:
            vae_step()
        result["dvae_flops_per_image"] = counter.get_total_flops() / args.batch
        result["dvae_train_images_per_s"] = args.batch / seconds_per_call(vae_step, args.steps, 1)
    result["config"] = vars(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
