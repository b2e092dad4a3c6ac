"""Speed of the token-shard loader against the transformer's training speed it has to keep up with.

    python benchmarks/bench_loader.py                # local folder
    python benchmarks/bench_loader.py --s3           # also through moto's S3 server on 127.0.0.1

Builds token shards at the tiny configuration (text length 32, 8x8 = 64 image codes) in a
temporary folder, times the loader (batch 16, num_workers 0 and 2) and, as the baseline in
the same run, AdamW training steps of the tiny transformer at batch 16. The loader is fast
enough when loader_over_training exceeds 1. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch

from dalle.config import TransformerConfig
from dalle.models.transformer import DalleTransformer
from dalle.runroot import MANIFEST, SHARDS_DIR
from dalle.schemas import SCHEMA_VERSION, token_shard_schema
from dalle.storage import Storage
from dalle.tokens.loader import ShardDataset, TokenBatch, make_loader

TEXT_LEN = 32
GRID = 8
TEXT_VOCAB = 10_000
IMAGE_VOCAB = 512
BATCH = 16


def write_shards(root: str, rows: int, shards: int, seed: int = 0) -> None:
    """Random token shards (variable-length captions) and their manifest under {root}/shards."""
    rng = np.random.default_rng(seed)
    storage = Storage(root)
    entries = []
    per_shard = -(-rows // shards)
    for index, first in enumerate(range(0, rows, per_shard)):
        count = min(per_shard, rows - first)
        lengths = rng.integers(4, TEXT_LEN + 1, count)
        table = pa.table(
            {
                "uid": [f"{first + i:08d}" for i in range(count)],
                "caption": ["a small red circle above a large blue square"] * count,
                "text_tokens": [rng.integers(1, TEXT_VOCAB, n, dtype=np.int32) for n in lengths],
                "image_codes": list(rng.integers(0, IMAGE_VOCAB, (count, GRID * GRID), dtype=np.int16)),
                "clip_score": rng.random(count, dtype=np.float32),
            },
            schema=token_shard_schema(GRID * GRID),
        )
        path = f"{SHARDS_DIR}/{index:05d}.parquet"
        storage.write_table(path, table)
        digest = hashlib.sha256(storage.read_bytes(path)).hexdigest()
        entries.append({"path": path, "rows": count, "sha256": digest})
    storage.write_json(
        f"{SHARDS_DIR}/{MANIFEST}", {"schema_version": SCHEMA_VERSION, "rows": rows, "shards": entries}
    )


def loader_samples_per_s(root: str, num_workers: int, batches: int) -> float:
    """Steady-state samples/s: the clock starts after the first batch (worker start, first read)."""
    dataset = ShardDataset(root, SHARDS_DIR, TokenBatch(TEXT_LEN), batch_size=BATCH, seed=0)
    stream = iter(make_loader(dataset, num_workers=num_workers))
    next(stream)
    start = time.perf_counter()
    for batch in itertools.islice(stream, batches):
        assert batch["image_codes"].shape == (BATCH, GRID * GRID)
    elapsed = time.perf_counter() - start
    del stream  # shuts the workers down
    return batches * BATCH / elapsed


def training_samples_per_s(device: torch.device, steps: int) -> float:
    torch.manual_seed(0)
    cfg = TransformerConfig(text_seq_len=TEXT_LEN, width=256, depth=4, heads=4)
    model = DalleTransformer(cfg, text_vocab_size=TEXT_VOCAB, image_vocab_size=IMAGE_VOCAB, image_grid=GRID)
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.045), lr=3e-4, betas=(0.9, 0.96), fused=True)
    text = torch.randint(1, TEXT_VOCAB, (BATCH, TEXT_LEN), device=device)
    codes = torch.randint(0, IMAGE_VOCAB, (BATCH, GRID * GRID), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss = model(text, codes).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - start)


@contextlib.contextmanager
def moto_bucket() -> Iterator[str]:
    """A bucket on moto's S3 server on 127.0.0.1, with the AWS variables pointing at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    names = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench-key-id",
        AWS_SECRET_ACCESS_KEY="bench-secret-value",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-loader")
        yield "s3://bench-loader/run"
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batches", type=int, default=800, help="timed loader batches per setting")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--s3", action="store_true", help="also time the loader through moto's S3 server")
    args = parser.parse_args(argv)

    loader: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        write_shards(tmp, args.rows, args.shards)
        for workers in args.workers:
            loader[f"local_workers_{workers}"] = loader_samples_per_s(tmp, workers, args.batches)
    if args.s3:
        with moto_bucket() as root:
            write_shards(root, args.rows, args.shards)
            for workers in args.workers:
                loader[f"s3_workers_{workers}"] = loader_samples_per_s(root, workers, args.batches)

    training = training_samples_per_s(torch.device(args.device), args.steps)
    ratios = {name: value / training for name, value in loader.items()}
    result = {
        "rows": args.rows,
        "shards": args.shards,
        "batch": BATCH,
        "text_len": TEXT_LEN,
        "image_codes": GRID * GRID,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "samples_per_s": {name: round(value, 1) for name, value in loader.items()},
        "training_samples_per_s": round(training, 1),
        "loader_over_training": {name: round(value, 2) for name, value in ratios.items()},
        "loader_exceeds_training": {name: value > 1 for name, value in ratios.items()},
    }
    if not all(result["loader_exceeds_training"].values()):
        print("the loader is slower than training in some setting", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
