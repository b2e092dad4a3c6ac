"""The Storage's S3 client through a proxy that injects 500/503, resets, stalls and truncated bodies
(tests/faulty_s3.py): every operation finishes and no object is left truncated."""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pytest

import dalle.storage
from dalle.storage import Storage
from tests.faulty_s3 import FAULT_KINDS, FaultyS3Proxy

SEED = 20261203


@pytest.fixture
def faulty_s3(s3_bucket, s3_endpoint, monkeypatch):
    """`s3_bucket` reached through a FaultyS3Proxy at a 30% fault rate; yields the proxy. The client's
    read timeout is cut to 0.5 s so that a 1 s stall costs little."""
    proxy = FaultyS3Proxy(s3_endpoint, rate=0.3, seed=SEED, stall_s=1.0)
    monkeypatch.setattr(dalle.storage, "S3_READ_TIMEOUT_S", 0.5)
    monkeypatch.setattr(dalle.storage, "S3_CONNECT_TIMEOUT_S", 2.0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        yield proxy
    finally:
        proxy.close()


def _payload(i: int) -> bytes:
    # Sizes from a few bytes to ~200 KiB, so truncation cuts small and multi-packet bodies.
    return hashlib.sha256(str(i).encode()).digest() * (1 + (i * 397) % 6400)


def test_storage_survives_a_misbehaving_s3_and_leaves_no_object_truncated(faulty_s3, s3_bucket, s3_endpoint):
    storage = Storage(f"{s3_bucket}/run")
    n = 60
    expected = {}
    for i in range(n):
        rel = f"blobs/{i:04d}.bin"
        storage.write_bytes(rel, _payload(i))
        expected[rel] = hashlib.sha256(_payload(i)).hexdigest()
    tables = {}
    for i in range(10):
        rel = f"tables/{i:03d}.parquet"
        tables[rel] = pa.table(
            {"uid": [f"{i}-{j}" for j in range(50 * (i + 1))], "n": list(range(50 * (i + 1)))}
        )
        storage.write_table(rel, tables[rel])

    for rel, digest in expected.items():
        assert hashlib.sha256(storage.read_bytes(rel)).hexdigest() == digest, rel
    for rel, table in tables.items():
        assert storage.read_table(rel).equals(table), rel
    assert storage.list("blobs", ".bin") == sorted(expected)
    assert storage.list("tables", ".parquet") == sorted(tables)
    for i in range(0, n, 4):
        storage.delete(f"blobs/{i:04d}.bin")
        del expected[f"blobs/{i:04d}.bin"]
    assert storage.list("blobs", ".bin") == sorted(expected)

    faulty_s3.enabled = False
    # Every object whole, read back straight from moto (no proxy, no retries): what the writes left.
    os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
    direct = Storage(f"{s3_bucket}/run")
    for rel, digest in expected.items():
        assert hashlib.sha256(direct.read_bytes(rel)).hexdigest() == digest, rel
    for rel, table in tables.items():
        assert direct.read_table(rel).equals(table), rel
    print(f"seed {faulty_s3.seed}: {faulty_s3.requests} requests, faults {dict(faulty_s3.counts)}")
    for kind in FAULT_KINDS:
        assert faulty_s3.counts[kind] >= 1, (kind, dict(faulty_s3.counts))
