"""The benchmarks' own argument checks, and the GPU check's CPU fallback (figures are measured by running
the benchmarks, not here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dalle.runroot import run_config
from dalle.storage import Storage

REPO = Path(__file__).resolve().parents[1]


def bench_demo_models(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "benchmarks" / "bench_demo_models.py")]
    command += ["--from", str(tmp_path / "no-run"), "--out", str(tmp_path / "out"), *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dropout=0.2", "expected SECTION.KEY=VALUE"),
        ("transformer.dropuot=0.2", "transformer.dropuot"),
        ("transformer.dropout=2", "transformer.dropout"),
    ],
)
def test_a_bad_override_is_named_before_any_work(tmp_path, override, message):
    done = bench_demo_models(tmp_path, "--set", override)
    assert done.returncode != 0
    assert message in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("cond_scael=2", "expected KEY=VALUE with KEY one of"),
        ("dropout=0.2", "expected KEY=VALUE with KEY one of"),
        ("top_k=0", "gallery.top_k"),
        ("cond_scale=2,temperature=-1", "gallery.temperature"),
    ],
)
def test_a_bad_sampling_variant_is_named_before_any_work(tmp_path, variant, message):
    root = tmp_path / "run"
    run_config(Storage(str(root)), str(REPO / "demo" / "config.yaml"))
    before = sorted(root.rglob("*"))
    command = [sys.executable, str(REPO / "benchmarks" / "bench_sampling.py"), "--run", str(root)]
    done = subprocess.run(
        [*command, "--variant", variant], check=False, capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode != 0
    assert message in done.stderr
    assert sorted(root.rglob("*")) == before


def test_sampling_benchmark_names_a_folder_that_is_no_run(tmp_path):
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_sampling.py"),
        "--run",
        str(tmp_path / "none"),
    ]
    done = subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode != 0 and "is not a run root" in done.stderr


def test_models_benchmark_names_a_missing_peer_interpreter_before_any_work(tmp_path):
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_models.py"),
        "--peer-python",
        str(tmp_path / "no"),
    ]
    done = subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode != 0
    assert "does not exist" in done.stderr and "dalle_pytorch_runner.py" in done.stderr


def bench_peer_quality(run: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "benchmarks" / "bench_peer_quality.py"), "--run", str(run), *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO, timeout=120)


def test_peer_quality_benchmark_names_what_is_missing_before_any_work(tmp_path):
    out = tmp_path / "peer-out"
    no_peer = bench_peer_quality(tmp_path / "run", "--peer-python", str(tmp_path / "no"), "--out", str(out))
    assert no_peer.returncode != 0 and "dalle_pytorch_runner.py" in no_peer.stderr

    peer = ["--peer-python", sys.executable, "--out", str(out)]
    for bad, message in [
        (["--seconds", "0"], "--seconds must be above 0"),
        (["--dvae-share", "23"], "0.23, not 23"),
    ]:
        refused = bench_peer_quality(tmp_path / "run", *peer, *bad)
        assert refused.returncode != 0 and message in refused.stderr

    no_run = bench_peer_quality(tmp_path / "run", *peer)
    assert no_run.returncode != 0 and "must be a run root" in no_run.stderr

    storage = Storage(str(tmp_path / "run"))
    run_config(storage, str(REPO / "demo" / "config.yaml"))
    not_judged = bench_peer_quality(tmp_path / "run", *peer)
    assert not_judged.returncode != 0 and "run `dalle gallery`" in not_judged.stderr

    # Models trained outside the pipeline (bench_demo_models.py) leave no training times to match.
    storage.write_json("reports/eval.json", {})
    storage.write_bytes("reports/eval_prompts.jsonl", b"")
    storage.write_json("reports/timings.json", {"stages": {"gallery": {"seconds": 90.0}}, "total_s": 90.0})
    untimed = bench_peer_quality(tmp_path / "run", *peer, "--seconds", "60")
    assert untimed.returncode != 0
    assert "train_dvae and train_transformer" in untimed.stderr and "--dvae-share" in untimed.stderr
    assert not out.exists()


def test_the_gpu_check_without_a_gpu_says_so_and_runs_the_cpu_path():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    command = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--steps", "4"]
    done = subprocess.run(
        command, check=False, capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA device here" in done.stderr and "not GPU figures" in done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["fallback"] is True and result["device"] == "cpu" and result["steps"] == 4
    assert result["train_tokens_per_s"] > 0 and result["sample_images_per_s"] > 0
    assert result["model_flops_per_s"] > 0 and result["mfu"] is None and "peak_flops" in result["mfu_basis"]


@pytest.mark.parametrize(
    ("hosts", "message"),
    [("0", "each host count must be 1..1000"), ("1,x", "expected host counts like 1,64"), ("", "expected")],
)
def test_crawl_benchmark_names_a_bad_host_count_before_any_work(hosts, message):
    command = [sys.executable, str(REPO / "benchmarks" / "bench_crawl.py"), "--hosts", hosts]
    done = subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"argument --hosts: {message}" in done.stderr


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("bench_*.py")))
def test_every_benchmark_imports_and_explains_its_options(script):
    # A benchmark that falls behind the library (a moved name) fails here, not on the day it is run.
    command = [sys.executable, str(REPO / "benchmarks" / script), "--help"]
    done = subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
