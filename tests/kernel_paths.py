"""The learning tests under every CPU kernel path and several seeds (`make test-paths`).

A seeded training run is a property of the float order, not of the code: another CPU (AVX2 or
AVX-512 kernels, MKL's Intel or AMD code paths, another thread count) takes another trajectory.
PyTorch, MKL and oneDNN let one machine take the others' paths, so a test that learns on one
trajectory only is caught here. Prints one row per path and seed, then one JSON object.

    python tests/kernel_paths.py [--seeds 0 1 2 3 4] [--paths default avx2 ...] [-- PYTEST_ARGS]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

# Each path names the settings that switch a kernel family to another instruction set or
# reduction order: ATen's vectorised kernels, MKL's BLAS, oneDNN's convolutions, the threads.
PATHS = {
    "default": {"ATEN_CPU_CAPABILITY": "default"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "mkl-compatible": {"MKL_CBWR": "COMPATIBLE"},
    "1-thread": {"OMP_NUM_THREADS": "1"},
    "4-threads": {"OMP_NUM_THREADS": "4"},
}
REPO = Path(__file__).resolve().parent.parent


def cpu_capability() -> str:
    """What ATen picks on this CPU when left alone (e.g. AVX512, AVX2, DEFAULT)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def counts(output: str) -> dict[str, int]:
    """pytest's closing counts ('3 passed, 1 failed, 2 deselected in 9.1s') as a dict."""
    found = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", output)}
    found["failed"] = found.get("failed", 0) + found.pop("error", 0) + found.pop("errors", 0)
    return found


def run(path: str, seed: int, pytest_args: list[str]) -> dict:
    env = {**os.environ, **PATHS[path]}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "learning"]
    command += ["--learning-seed", str(seed), *pytest_args]
    start = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    failed = re.findall(r"^FAILED (\S+)", done.stdout, flags=re.MULTILINE)
    return {
        "path": path,
        "seed": seed,
        **counts(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""),
        "failed_tests": failed,
        "returncode": done.returncode,
        "seconds": round(time.monotonic() - start, 1),
        "output": done.stdout[-6000:] + done.stderr[-2000:] if done.returncode else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--paths", nargs="+", choices=sorted(PATHS), default=None)
    args, pytest_args = parser.parse_known_args(argv)
    pytest_args = [a for a in pytest_args if a != "--"]
    capability = cpu_capability()
    paths = args.paths or [p for p in PATHS if p != "avx512" or capability == "AVX512"]
    rows = []
    for path in paths:
        for seed in args.seeds:
            row = run(path, seed, pytest_args)
            rows.append(row)
            verdict = "ok" if row["returncode"] == 0 else "FAILED " + " ".join(row["failed_tests"])
            print(
                f"{path:15} seed {seed}: {row.get('passed', 0)} passed in {row['seconds']} s  {verdict}",
                flush=True,
            )
            if row["returncode"]:
                print(row.pop("output"), flush=True)
    bad = [r for r in rows if r["returncode"] != 0]
    for row in rows:
        row.pop("output", None)
    print(
        json.dumps({"cpu_capability": capability, "runs": len(rows), "failed_runs": len(bad), "rows": rows})
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
