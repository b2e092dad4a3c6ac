"""Tokenize throughput: images/s through dVAE encoding and rows/s written as token shards.

    python benchmarks/bench_tokenize.py [--rows 2000] [--s3]

Builds curated pairs from the demo source, a dVAE checkpoint (untrained weights: encoding
costs the same) and runs `tokenize_stage` on a local run root and, with --s3, on a bucket of
moto's S3 server on 127.0.0.1. The baseline, measured in the same run, is the dVAE's bare
`encode` on tensors already in memory: the ratio shows what decoding images, tokenizing
captions and writing shards cost on top. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import tempfile
import time

import pyarrow as pa
import torch

from dalle.config import config_from_dict
from dalle.models.dvae import DiscreteVAE
from dalle.models.weights import load_dvae, save_model
from dalle.runroot import checkpoint_dir, set_latest
from dalle.schemas import CURATED_SCHEMA, SCHEMA_VERSION
from dalle.storage import Storage
from dalle.tokens.loader import ImageBatch
from dalle.tokens.shards import tokenize_stage
from demo.world import WorldConfig, generate_samples

SETTINGS = {
    "dvae": {"image_size": 64, "downsample_steps": 3, "codebook_size": 512, "hidden_width": 64},
    "transformer": {"text_seq_len": 32},
    "tokenizer": {"vocab_size": 2000},
    "tokenize": {"rows_per_shard": 1000, "batch_size": 64, "device": "cpu"},
}


def build_run(storage: Storage, rows: list[dict], cfg) -> None:
    for index in range(0, len(rows), 1000):
        chunk = rows[index : index + 1000]
        storage.write_table(
            f"curated/{index // 1000:05d}.parquet", pa.Table.from_pylist(chunk, schema=CURATED_SCHEMA)
        )
    shards = [
        {
            "path": rel,
            "rows": storage.read_table(rel).num_rows,
            "sha256": hashlib.sha256(storage.read_bytes(rel)).hexdigest(),
        }
        for rel in storage.list("curated", ".parquet")
    ]
    storage.write_json(
        "curated/_manifest.json", {"schema_version": SCHEMA_VERSION, "rows": len(rows), "shards": shards}
    )
    torch.manual_seed(0)
    dvae = DiscreteVAE(cfg.dvae)
    save_model(
        storage,
        checkpoint_dir("dvae", 1),
        dvae.state_dict(),
        {"kind": "dvae", "dvae": cfg.dvae.model_dump(mode="json")},
    )
    set_latest(storage, "dvae", 1)


def curated_rows(count: int, image_size: int) -> list[dict]:
    samples = generate_samples(WorldConfig(num_images=count, image_size=image_size))
    return [
        {
            "uid": f"u{i:06d}",
            "url": f"http://127.0.0.1/{s.name}",
            "caption": s.caption,
            "image": s.image,
            "sha256": hashlib.sha256(s.image).hexdigest(),
            "width": image_size,
            "height": image_size,
            "clip_score": 0.3,
            "provenance": None,
        }
        for i, s in enumerate(samples)
    ]


def measure(root: str, rows: list[dict], cfg) -> dict:
    storage = Storage(root)
    build_run(storage, rows, cfg)
    start = time.perf_counter()
    summary = tokenize_stage(storage, cfg, *load_dvae(storage), log=lambda m: None)
    seconds = time.perf_counter() - start
    return {"rows": summary["rows"], "seconds": seconds, "rows_per_s": summary["rows"] / seconds}


def bare_encode(rows: list[dict], cfg) -> float:
    torch.manual_seed(0)
    dvae = DiscreteVAE(cfg.dvae).eval()
    images = ImageBatch(cfg.dvae.image_size)(pa.Table.from_pylist(rows, schema=CURATED_SCHEMA))["images"]
    start = time.perf_counter()
    for index in range(0, len(images), cfg.tokenize.batch_size):
        dvae.encode(images[index : index + cfg.tokenize.batch_size])
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--s3", action="store_true", help="also measure on moto's S3 server on 127.0.0.1")
    args = parser.parse_args()
    cfg = config_from_dict(SETTINGS)
    rows = curated_rows(args.rows, cfg.dvae.image_size)
    result = {"rows": args.rows, "dvae": SETTINGS["dvae"], "threads": torch.get_num_threads()}
    result["baseline_dvae_encode_images_per_s"] = bare_encode(rows, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        local = measure(os.path.join(tmp, "run"), rows, cfg)
    result["local_rows_per_s"] = local["rows_per_s"]
    result["local_over_bare_encode"] = local["rows_per_s"] / result["baseline_dvae_encode_images_per_s"]
    if args.s3:
        import boto3
        from moto.server import ThreadedMotoServer

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        os.environ.update(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
        )
        try:
            boto3.client("s3").create_bucket(Bucket="bench-tokenize")
            s3 = measure("s3://bench-tokenize/run", rows, cfg)
        finally:
            server.stop()
        result["s3_rows_per_s"] = s3["rows_per_s"]
        result["s3_over_local"] = s3["rows_per_s"] / local["rows_per_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
