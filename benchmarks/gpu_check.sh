#!/usr/bin/env bash
# The GPU check (benchmarks/bench_gpu.py): a short training and sampling run at a paper-like
# configuration, printing MFU, tokens/s and images/s; the last line is one JSON object. On a
# machine without CUDA it says so and runs the CPU path at a tiny configuration.
#   bash benchmarks/gpu_check.sh [--steps N] [--no-compile] [--peak-flops F]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-$repo/.venv/bin/python}"
if [ ! -x "$python" ]; then
  echo "gpu_check: no interpreter at $python; run 'make install' first, or set PYTHON" >&2
  exit 2
fi
cd "$repo"
exec timeout "${GPU_CHECK_TIMEOUT_S:-300}" "$python" "$here/bench_gpu.py" "$@"
