"""Near-duplicate search speed and recall: the index `deduplicate` picks against exact flat search.

N random unit vectors, of which --dups are noisy copies (cosine 0.97-0.995) of distinct
originals. Exact flat range search over all N is O(N^2 d), so the flat baseline is timed
on a random sample of queries in the same run and extrapolated to N; the sample's flat
results are also the brute-force truth for the recall figure.

    python benchmarks/bench_dedup.py            # N = 100,000, dim 512

The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np

from dalle.config import DedupConfig
from dalle.curate.dedup import build_index, measure_recall, near_pairs, range_neighbours


def planted_vectors(n: int, dim: int, dups: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n unit vectors; the last `dups` are copies of distinct earlier rows with cosine drawn from 0.97-0.995."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    originals = rng.choice(n - dups, size=dups, replace=False)
    # |noise| = sqrt(1/cos^2 - 1) puts the copy at that cosine from its original (up to O(1/sqrt(dim))).
    target = rng.uniform(0.97, 0.995, dups)
    noise = rng.standard_normal((dups, dim), dtype=np.float32) / np.sqrt(dim)
    noise *= np.sqrt(1 / target**2 - 1)[:, None].astype(np.float32)
    copies = vectors[originals] + noise
    vectors[n - dups :] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    return vectors, originals, np.arange(n - dups, n)


def main() -> None:
    defaults = DedupConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000, help="vectors in all, planted copies included")
    parser.add_argument("--dim", type=int, default=512, help="vector dimension (ViT-B-32 gives 512)")
    parser.add_argument("--dups", type=int, default=1000, help="planted near duplicates")
    parser.add_argument("--threshold", type=float, default=0.95, help="cosine similarity threshold")
    parser.add_argument("--ivf-min-size", type=int, default=defaults.ivf_min_size, help="IVF from this N on")
    parser.add_argument("--nlist", type=int, default=defaults.ivf_nlist, help="IVF cells (default 4*sqrt(N))")
    parser.add_argument("--nprobe", type=int, default=defaults.ivf_nprobe, help="IVF cells visited per query")
    parser.add_argument("--recall-sample", type=int, default=defaults.recall_sample, help="as in DedupConfig")
    parser.add_argument(
        "--flat-queries",
        type=int,
        default=5000,
        help="queries the flat baseline is timed on (all N if larger)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 <= args.dups < args.n:
        parser.error("--dups must be at least 0 and below --n")

    cfg = DedupConfig(
        near_threshold=args.threshold,
        ivf_min_size=args.ivf_min_size,
        ivf_nlist=args.nlist,
        ivf_nprobe=args.nprobe,
        recall_sample=args.recall_sample,
    )
    vectors, originals, copies = planted_vectors(args.n, args.dim, args.dups, args.seed)
    n = args.n
    print(f"{n} vectors of dim {args.dim}, {args.dups} planted near duplicates, threshold {args.threshold}")
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")

    # The index deduplicate would choose, timed end to end: build, then range search over all N.
    t0 = time.perf_counter()
    index, description = build_index(vectors, cfg)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pair_i, pair_j, _ = near_pairs(index, vectors, args.threshold)
    search_s = time.perf_counter() - t0
    print(f"{description['index']} index {description}: build {build_s:.2f} s, search {search_s:.2f} s")

    # Exact flat baseline on a random query sample, extrapolated to N queries.
    flat_index, _ = build_index(vectors, DedupConfig(ivf_min_size=n + 1))
    flat_queries = np.sort(
        np.random.default_rng(args.seed + 1).choice(n, min(args.flat_queries, n), replace=False)
    )
    t0 = time.perf_counter()
    rows, ids, _ = range_neighbours(flat_index, vectors[flat_queries], args.threshold)
    flat_sample_s = time.perf_counter() - t0
    flat_s = flat_sample_s * n / len(flat_queries)
    print(
        f"flat index: {len(flat_queries)} queries in {flat_sample_s:.2f} s, {flat_s:.1f} s extrapolated to {n}"
    )

    # Recall of near_pairs (both directions, as deduplicate uses it) on the flat sample's true pairs.
    query_rows = flat_queries[rows]
    true = ids != query_rows
    truth = np.minimum(query_rows[true], ids[true]) * n + np.maximum(query_rows[true], ids[true])
    truth = np.unique(truth)
    found_keys = pair_i * n + pair_j
    recall = float(np.isin(truth, found_keys).mean()) if len(truth) else None
    planted_keys = np.minimum(originals, copies) * n + np.maximum(originals, copies)
    planted_found = float(np.isin(planted_keys, found_keys).mean()) if len(planted_keys) else None

    t0 = time.perf_counter()
    library_recall = measure_recall(vectors, args.threshold, index, cfg.recall_sample, seed=0)
    recall_s = time.perf_counter() - t0

    figures = {
        "n": n,
        "dim": args.dim,
        "dups": args.dups,
        "threshold": args.threshold,
        "index": description["index"],
        "nlist": description["nlist"],
        "nprobe": description["nprobe"],
        "threads": faiss.omp_get_max_threads(),
        "build_s": round(build_s, 3),
        "search_s": round(search_s, 3),
        "vectors_per_s": round(n / (build_s + search_s), 1),
        "search_vectors_per_s": round(n / search_s, 1),
        "flat_vectors_per_s": round(len(flat_queries) / flat_sample_s, 1),
        "flat_measured_on_queries": len(flat_queries),
        "flat_s_extrapolated": round(flat_s, 2),
        "speedup_vs_flat": round(flat_s / (build_s + search_s), 2),
        "speedup_search_only": round(flat_s / search_s, 2),
        "pairs_found": len(pair_i),
        "recall_vs_brute_force": recall,
        "recall_true_pairs": len(truth),
        "planted_found": planted_found,
        "measure_recall": library_recall,
        "measure_recall_sample": min(cfg.recall_sample, n),
        "measure_recall_s": round(recall_s, 3),
    }
    print(
        f"{figures['vectors_per_s']:.0f} vectors/s with build ({figures['search_vectors_per_s']:.0f} search only) "
        f"vs flat {figures['flat_vectors_per_s']:.0f}: x{figures['speedup_vs_flat']}; recall {recall} on "
        f"{len(truth)} brute-force pairs, planted pairs found {planted_found}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
