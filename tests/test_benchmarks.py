"""The benchmarks' own argument checks (their figures are measured by running them, not here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
