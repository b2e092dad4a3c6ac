"""Speed, memory and recall of `deduplicate` (the function the dedup stage runs) on clustered vectors.

    python benchmarks/bench_dedup.py                                  # 100k and 300k, a few minutes
    python benchmarks/bench_dedup.py --sizes 100000,300000,1000000    # the growth curve to 1M
    python benchmarks/bench_dedup.py --sizes 1000000 --baseline-sizes 100000

Real CLIP embeddings are clustered, so the vectors here are too: a mixture of Gaussian clusters on
the unit sphere with Zipf-distributed sizes and spreads of their own. Pairs are planted on both sides
of the threshold (copies at cosine threshold - 0.03 .. threshold + 0.03), so a search must find the
ones above and the ones below must not be called near duplicates (they can still join a group through
a chain, which the report counts). Each size runs in a child process, whose peak resident memory is
the figure printed. Recall is against brute force on a sample of query rows (as dedup.json reports
it). The baseline, in the same run, is the IVF-Flat index at nprobe 16 (`partition: ivf`), the
method before clustering. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def clustered_vectors(n: int, dim: int, threshold: float, planted_share: float, seed: int):
    """(unit vectors (n, dim) float32, planted pairs (k, 2), their cosines (k,))."""
    rng = np.random.default_rng(seed)
    clusters = max(1, n // 500)
    sizes = 1.0 / np.arange(1, clusters + 1) ** 0.8  # Zipf: a few large clusters, many small ones
    sizes = np.maximum(1, np.floor(sizes / sizes.sum() * n)).astype(np.int64)
    sizes[0] += n - sizes.sum()
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.6, 1.4, clusters).astype(np.float32)  # cosine to the centre 0.58 .. 0.86
    label = np.repeat(np.arange(clusters), sizes)
    vectors = np.empty((n, dim), np.float32)
    for start in range(0, n, 65_536):
        part = slice(start, min(n, start + 65_536))
        noise = rng.standard_normal((part.stop - part.start, dim), dtype=np.float32)
        noise *= spread[label[part], None] / np.sqrt(dim)
        noise += centres[label[part]]
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        vectors[part] = noise
    # Planted pairs: a copy of a random row at an exact cosine, in a random direction orthogonal to it.
    planted = int(n * planted_share)
    rows = rng.choice(n, size=2 * planted, replace=False)
    bases, copies = rows[:planted], rows[planted:]
    cosines = rng.uniform(threshold - 0.03, threshold + 0.03, planted)
    direction = rng.standard_normal((planted, dim)).astype(np.float32)
    direction -= np.einsum("ij,ij->i", direction, vectors[bases])[:, None] * vectors[bases]
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    vectors[copies] = cosines[:, None] * vectors[bases] + np.sqrt(1 - cosines[:, None] ** 2) * direction
    vectors[copies] /= np.linalg.norm(vectors[copies], axis=1, keepdims=True)
    return vectors, np.stack([bases, copies], axis=1), cosines


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def run_one(n: int, dim: int, threshold: float, partition: str, recall_sample: int, seed: int) -> dict:
    from dalle.config import DedupConfig
    from dalle.curate.dedup import deduplicate

    started = time.perf_counter()
    vectors, planted, cosines = clustered_vectors(n, dim, threshold, 0.01, seed)
    made_s = time.perf_counter() - started
    uids = [f"{i:09d}" for i in range(n)]
    sha256 = uids  # no exact duplicates: every row reaches the near search
    scores = np.random.default_rng(seed + 1).random(n).astype(np.float32)
    before = _peak_rss_mib()
    margin = {"boundary_margin": float(os.environ["BENCH_MARGIN"])} if os.environ.get("BENCH_MARGIN") else {}
    cfg = DedupConfig(near_threshold=threshold, partition=partition, recall_sample=recall_sample, **margin)
    started = time.perf_counter()
    result = deduplicate(uids, sha256, vectors, scores, cfg)
    seconds = time.perf_counter() - started
    peak = _peak_rss_mib()

    def root(row: int) -> str:
        return result.dup_of.get(uids[row], uids[row])

    together = np.array([root(a) == root(b) for a, b in planted])
    above = cosines >= threshold
    # Brute force from rows next to the threshold (the planted copies): of their true pairs, the share
    # that ended in one group. A harder sample than random rows, most of which have no pair at all.
    rng = np.random.default_rng(seed + 2)
    queries = np.sort(rng.choice(planted[:, 1], size=min(recall_sample, len(planted)), replace=False))
    truth = found = 0
    for start in range(0, len(queries), 256):
        chunk = queries[start : start + 256]
        rows, ids = np.nonzero(vectors[chunk] @ vectors.T >= threshold)
        rows = chunk[rows]
        pairs = [(a, b) for a, b in zip(rows.tolist(), ids.tolist()) if a != b]
        truth += len(pairs)
        found += sum(root(a) == root(b) for a, b in pairs)
    report = result.report
    return {
        "n": n,
        "dim": dim,
        "partition": partition,
        "seconds": round(seconds, 2),
        "phases_s": report["seconds"],
        "search": {k: v for k, v in report["index"].items()},
        "recall": report["recall"],
        "recall_true_pairs": report["recall_true_pairs"],
        "recall_queries": report["recall_sample"],
        "recall_near_threshold": round(found / truth, 5) if truth else None,
        "recall_near_threshold_pairs": truth,
        "planted_above_found": round(float(together[above].mean()), 4),
        "planted_below_grouped": round(float(together[~above].mean()), 4),
        "near_duplicates": report["duplicates_near"],
        "peak_rss_mib": round(peak),
        "dedup_added_mib": round(peak - before),
        "rss_before_mib": round(before),
        "vectors_mib": round(vectors.nbytes / 2**20),
        "make_vectors_s": round(made_s, 1),
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
    }


def in_child(n: int, args: argparse.Namespace, partition: str) -> dict:
    command = [sys.executable, __file__, "--one", str(n), "--dim", str(args.dim), "--threshold",
               str(args.threshold), "--partition", partition, "--recall-sample", str(args.recall_sample),
               "--seed", str(args.seed)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench_dedup: the run at n={n} ({partition}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100000,300000", help="vector counts, comma-separated")
    parser.add_argument(
        "--baseline-sizes", default=None, help="sizes the IVF baseline runs at (default: the smallest)"
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument(
        "--recall-sample", type=int, default=1000, help="query rows of the brute-force recall"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--partition", default="clusters", choices=["clusters", "ivf"], help=argparse.SUPPRESS
    )
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: one size, one method
    args = parser.parse_args()
    if args.one:
        print(
            json.dumps(
                run_one(args.one, args.dim, args.threshold, args.partition, args.recall_sample, args.seed)
            )
        )
        return
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        baseline_sizes = (
            [int(s) for s in args.baseline_sizes.split(",")] if args.baseline_sizes else [min(sizes)]
        )
    except ValueError:
        parser.error("--sizes and --baseline-sizes are comma-separated whole numbers, e.g. 100000,1000000")
    if min(sizes + baseline_sizes) < 1000:
        parser.error("sizes start at 1000 vectors")
    runs = []
    for n in sizes:
        run = in_child(n, args, "clusters")
        runs.append(run)
        print(f"clusters  n={n:>9,}  {run['seconds']:8.1f} s  peak {run['peak_rss_mib']:>6,} MiB  "
              f"recall {run['recall']} / near threshold {run['recall_near_threshold']}", file=sys.stderr)  # fmt: skip
    baselines = []
    for n in baseline_sizes:
        run = in_child(n, args, "ivf")
        baselines.append(run)
        print(f"ivf       n={n:>9,}  {run['seconds']:8.1f} s  peak {run['peak_rss_mib']:>6,} MiB  "
              f"recall {run['recall']}", file=sys.stderr)  # fmt: skip
    growth = [
        {"n": r["n"], "seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"], "recall": r["recall"]}
        for r in runs
    ]
    if len(runs) >= 2:
        first, last = runs[0], runs[-1]
        scale = last["n"] / first["n"]
        time_exponent = float(np.log(last["seconds"] / first["seconds"]) / np.log(scale))
    else:
        time_exponent = None
    speedups = {
        str(b["n"]): round(b["seconds"] / r["seconds"], 2)
        for b in baselines
        for r in runs
        if r["n"] == b["n"]
    }
    print(
        json.dumps(
            {
                "benchmark": "dedup",
                "threshold": args.threshold,
                "dim": args.dim,
                "runs": runs,
                "baseline_ivf_nprobe16": baselines,
                "speedup_vs_ivf": speedups,
                "growth": growth,
                "time_exponent": None if time_exponent is None else round(time_exponent, 2),
                "goal_1m": {"seconds_at_most": 180, "recall_at_least": 0.99},
            }
        )
    )


if __name__ == "__main__":
    main()
