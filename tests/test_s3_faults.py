"""S3 through a proxy that injects 500/503, resets, stalls and truncated bodies (tests/faulty_s3.py):
the Storage's every operation finishes and no object is left truncated, and real stages run through
the CLI (`dalle train dvae`, `dalle tokenize`) finish with the results of a run on a healthy S3."""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from dalle.runroot import CURATED_DIR, DVAE, SHARDS_DIR, checkpoint_dir, latest_pointer, read_metrics
from dalle.storage import S3_CONNECT_TIMEOUT_ENV, S3_READ_TIMEOUT_ENV, Storage, StorageError, s3_timeout
from dalle.tokens.loader import read_listed_shards, read_manifest
from dalle.train.checkpoint import load_train_state
from tests.faulty_s3 import FAULT_KINDS, FaultyS3Proxy
from tests.test_cli import task_attempts
from tests.test_train import SETTINGS, write_curated

SEED = 20261203


@pytest.fixture
def faulty_s3(s3_bucket, s3_endpoint, monkeypatch):
    """`s3_bucket` reached through a FaultyS3Proxy at a 30% fault rate; yields the proxy. The client's
    read timeout is cut to 0.5 s (the operator's variable) so that a 1 s stall costs little."""
    proxy = FaultyS3Proxy(s3_endpoint, rate=0.3, seed=SEED, stall_s=1.0)
    monkeypatch.setenv(S3_READ_TIMEOUT_ENV, "0.5")
    monkeypatch.setenv(S3_CONNECT_TIMEOUT_ENV, "2")
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


def test_the_s3_timeouts_come_from_the_environment_and_a_bad_value_is_named(s3_endpoint, monkeypatch):
    monkeypatch.setenv(S3_READ_TIMEOUT_ENV, "2.5")
    monkeypatch.setenv(S3_CONNECT_TIMEOUT_ENV, " 7 ")
    config = Storage("s3://any-bucket/run").fs.config_kwargs
    assert (config["read_timeout"], config["connect_timeout"]) == (2.5, 7.0)
    monkeypatch.setenv(S3_READ_TIMEOUT_ENV, "")
    monkeypatch.delenv(S3_CONNECT_TIMEOUT_ENV)
    config = Storage("s3://any-bucket/run").fs.config_kwargs
    assert (config["read_timeout"], config["connect_timeout"]) == (60.0, 10.0)
    for bad in ("0", "-1", "abc", "nan", "inf", "5s"):
        monkeypatch.setenv(S3_READ_TIMEOUT_ENV, bad)
        with pytest.raises(StorageError, match=f"{S3_READ_TIMEOUT_ENV}=.* set it to a positive number"):
            Storage("s3://any-bucket/run")
    assert s3_timeout("DALLE_UNSET_FOR_THIS_TEST", 3.0) == 3.0


# ----- real stages through the CLI -------------------------------------------------------------------

STAGE_SEED = 20261204
STATE = "train_state.pt"


def _stages(root: str, config: str, env: dict[str, str]) -> dict[str, float]:
    """`dalle train dvae` (6 steps, checkpoints at 3 and 6), then `dalle tokenize`, on `root`, each in
    a child process with `env` over the test's environment (as tests.test_cli.run_cli runs it, against
    the session's Prefect server); the seconds each took."""
    from prefect.settings import PREFECT_API_URL

    took = {}
    for args in (["train", "dvae", "--out", root, "--config", config], ["tokenize", "--out", root]):
        name = " ".join(args[: args.index("--out")])
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "flows.cli", *args],
            check=False,
            capture_output=True,
            text=True,
            env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), **env},
            timeout=300,
        )
        assert done.returncode == 0, (name, done.stderr[-4000:])
        took[name] = round(time.monotonic() - started, 1)
    return took


def _differences(a, b, at: str = "") -> list[str]:
    """Where two nested dicts, lists and tuples of tensors and plain values differ (exactly)."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [at]
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return [d for k in a for d in _differences(a[k], b[k], f"{at}/{k}")]
    if isinstance(a, (list, tuple)) and type(a) is type(b) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{at}/{i}")]
    return [] if a == b else [at]


def _listed_objects_whole(storage: Storage) -> dict[str, str]:
    """Every object a manifest or a checkpoint's model.json lists, checked against its recorded sha256
    (read straight from `storage`); returns {path: sha256} of the checkpoint files."""
    for shard_dir in (CURATED_DIR, SHARDS_DIR):
        manifest = read_manifest(storage, shard_dir)
        assert manifest["shards"], shard_dir
        for entry in manifest["shards"]:
            data = storage.read_bytes(entry["path"])
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]
            assert pq.read_metadata(io.BytesIO(data)).num_rows == entry["rows"], entry["path"]
    checkpoints = {}
    for step in (3, 6):
        folder = checkpoint_dir(DVAE, step)
        meta = storage.read_json(f"{folder}/model.json")
        files = {"model.safetensors": meta["weights_sha256"], **meta["files_sha256"]}
        for name, digest in files.items():
            rel = f"{folder}/{name}"
            assert hashlib.sha256(storage.read_bytes(rel)).hexdigest() == digest, rel
            checkpoints[rel] = digest
    return checkpoints


def test_train_and_tokenize_through_the_cli_finish_on_a_misbehaving_s3_as_on_a_healthy_one(
    s3_bucket, s3_endpoint, prefect_server, tmp_path
):
    """`dalle train dvae` and `dalle tokenize` on an S3 that fails 30% of their requests (every fault
    kind; stalls past a 1 s read timeout set with DALLE_S3_READ_TIMEOUT_S) finish without a Prefect
    retry, every object a manifest or checkpoint lists is whole in moto, and the results are those of
    the same stages run straight against moto: the same dVAE checkpoints, losses and token rows."""
    clean, faulty = Storage(f"{s3_bucket}/clean"), Storage(f"{s3_bucket}/faulty")
    for storage in (clean, faulty):  # the curated pairs `dalle curate` would have published
        write_curated(storage, 0, 48, 0)
        write_curated(storage, 48, 20, 1)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(SETTINGS))
    proxy = FaultyS3Proxy(s3_endpoint, rate=0.3, seed=STAGE_SEED, stall_s=2.5)
    # The faulty run mostly waits (back-off, timeouts): the healthy one, straight to moto, runs meanwhile.
    faults = {"AWS_ENDPOINT_URL": proxy.url, S3_READ_TIMEOUT_ENV: "1", S3_CONNECT_TIMEOUT_ENV: "2"}
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            healthy = pool.submit(_stages, clean.uri(), str(config), {"AWS_ENDPOINT_URL": s3_endpoint})
            misbehaving = pool.submit(_stages, faulty.uri(), str(config), faults)
            took = {"healthy": healthy.result(), "faulty": misbehaving.result()}
    finally:
        proxy.close()
    print(f"seed {proxy.seed}: {proxy.requests} requests, faults {dict(proxy.counts)}; seconds {took}")
    for kind in FAULT_KINDS:
        assert proxy.counts[kind] >= 1, (kind, dict(proxy.counts))
    # The storage layer's retries absorbed every fault: no Prefect task ran twice.
    for flow_name in ("train-dvae", "tokenize"):
        attempts = task_attempts(flow_name, faulty.uri())
        assert attempts and set(attempts.values()) == {1}, (flow_name, attempts)

    # Read straight from moto: only the children's environment pointed at the proxy.
    files = [_listed_objects_whole(s) for s in (clean, faulty)]
    assert files[0].keys() == files[1].keys()
    assert {k: v for k, v in files[0].items() if not k.endswith(STATE)} == {
        k: v for k, v in files[1].items() if not k.endswith(STATE)
    }  # the weights and config of each checkpoint, byte for byte
    for step in (3, 6):
        states = [load_train_state(s, checkpoint_dir(DVAE, step)) for s in (clean, faulty)]
        # Only the trainer's own RNG is seeded (torch's); numpy's and Python's global ones start from OS
        # entropy in every process (Python's also draws botocore's retry jitter), so they differ between
        # any two runs and the trainers draw nothing from them. Everything else is equal.
        for state in states:
            for rank in state["rng"]:
                del rank["numpy"], rank["python"]
        assert _differences(*states) == [], step
    for storage in (clean, faulty):
        assert storage.read_json(latest_pointer(DVAE))["step"] == 6
    losses = [[(m["step"], m["loss"]) for m in read_metrics(s, DVAE) if "loss" in m] for s in (clean, faulty)]
    assert losses[0] == losses[1] and [step for step, _ in losses[0]] == [1, 2, 3, 4, 5, 6]
    rows = [read_listed_shards(s, SHARDS_DIR).sort_by("uid").to_pylist() for s in (clean, faulty)]
    assert len(rows[1]) == 68 and len({r["uid"] for r in rows[1]}) == 68
    assert rows[0] == rows[1]
