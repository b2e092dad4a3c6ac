#!/usr/bin/env bash
# Every benchmark once, one after the other (run it on an idle machine: the figures are timings).
# Each one's whole output goes to $OUT/<name>.log; its last line (one JSON object) is printed here as
#   {"benchmark": "<name>", "seconds": <wall time>, "result": <that object>}
# and a benchmark that fails prints {"benchmark": ..., "error": "exit status N"} without stopping the rest.
#   bash benchmarks/run_all.sh                 # OUT=reports-bench by default
#   PEER_PYTHON=/tmp/peer/bin/python bash benchmarks/run_all.sh   # with the peer in bench_models
#   DEMO_RUN=runs/demo bash benchmarks/run_all.sh   # also a finished demo run's composition figures
#                                                   # (and, with PEER_PYTHON, the peer's on its pairs)
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-$repo/.venv/bin/python}"
out="${OUT:-$repo/reports-bench}"
mkdir -p "$out"
cd "$repo"
peer=()
if [ -n "${PEER_PYTHON:-}" ]; then peer=(--peer-python "$PEER_PYTHON"); fi

run() {
  local name="$1"; shift
  local start end status
  start=$(date +%s.%N)
  "$@" >"$out/$name.log" 2>&1
  status=$?
  end=$(date +%s.%N)
  "$python" - "$name" "$status" "$start" "$end" "$out/$name.log" <<'PY'
import json, sys
name, status, start, end, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
record = {"benchmark": name, "seconds": round(end - start, 1)}
lines = [line for line in open(log, encoding="utf-8", errors="replace").read().splitlines() if line.strip()]
if status:
    record["error"] = f"exit status {status}; see {log}"
else:
    try:
        record["result"] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        record["error"] = f"the last line is not one JSON object; see {log}"
print(json.dumps(record), flush=True)
PY
}

run crawl "$python" benchmarks/bench_crawl.py
run url_list "$python" benchmarks/bench_url_list.py
run dedup "$python" benchmarks/bench_dedup.py --sizes 100000,300000,1000000
run embed "$python" benchmarks/bench_embed.py --images 128 --batch 64
run tokenize "$python" benchmarks/bench_tokenize.py --s3
run loader "$python" benchmarks/bench_loader.py --s3
run models_tiny "$python" benchmarks/bench_models.py --config tiny "${peer[@]}"
run models_paper_grid "$python" benchmarks/bench_models.py --config paper-grid --repeat 1 "${peer[@]}"
run gpu_check bash benchmarks/gpu_check.sh
if [ -n "${DEMO_RUN:-}" ]; then
  run composition "$python" benchmarks/bench_composition.py --run "$DEMO_RUN"
  if [ -n "${PEER_PYTHON:-}" ]; then
    run peer_quality "$python" benchmarks/bench_peer_quality.py --run "$DEMO_RUN" --peer-python "$PEER_PYTHON"
  fi
fi
