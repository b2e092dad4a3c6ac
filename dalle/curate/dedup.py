"""Duplicate removal: exact duplicates by sha256 of the image bytes, near duplicates by
cosine similarity of CLIP image vectors searched with FAISS.

`deduplicate` is pure: arrays in, a `DedupResult` out. `dedup_stage` runs it over the pairs that
survived the CLIP-score filter and writes their decisions and `{root}/reports/dedup.json`.

Grouping is by connected components of the "near duplicate" graph, so groups can chain:
a~b and b~c put a, b and c in one group even when a and c are below the threshold. That
is accepted (it only ever removes more near-identical images); the similarity recorded for
each removed row is its own cosine similarity to the survivor, so chained members are
visible as rows whose similarity is below the threshold.
"""

from __future__ import annotations

import io
import math
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dalle.config import DedupConfig, RunConfig, with_changes
from dalle.curate.embed import ClipEncoder, embed_stage
from dalle.curate.embed import vectors as embedding_matrix
from dalle.curate.fates import PASS, decode_rgb, iter_images, passing_rows
from dalle.runroot import DEDUP_BATCHES_DIR, DEDUP_REPORT, DEDUP_TABLE, SCORES_TABLE
from dalle.schemas import DEDUP_DECISIONS_SCHEMA
from dalle.storage import Storage

# float32 inner products of unit vectors carry rounding of order 1e-7 (faiss and numpy
# disagree in that digit); searching this much below the threshold keeps pairs at exactly
# the threshold (threshold 1.0 on identical vectors included) and makes the flat index
# agree with brute force.
SIMILARITY_TOLERANCE = 1e-5

# faiss warns below 39 training points per IVF cell; k-means gains little above 64.
_MIN_TRAIN_PER_CELL = 39
_MAX_TRAIN_PER_CELL = 64
_INDEX_SEED = 1234


@dataclass
class DedupResult:
    """Per-row decisions for removed rows (survivors have no entry) and the report for dedup.json."""

    dup_of: dict[str, str] = field(default_factory=dict)
    kind: dict[str, str] = field(default_factory=dict)
    similarity: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def exact_groups(sha256: Sequence[str]) -> list[np.ndarray]:
    """Indices of rows that share an image hash, one array per hash seen at least twice."""
    hashes = np.asarray(list(sha256), dtype=object)
    if len(hashes) == 0:
        return []
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(counts)[:-1]
    return [group for group in np.split(order, bounds) if len(group) >= 2]


def _chunks(n: int, size: int) -> Iterable[slice]:
    return (slice(start, min(n, start + size)) for start in range(0, n, size))


def _unit_vectors(vectors: np.ndarray, uids: Sequence[str] | None = None) -> np.ndarray:
    """float32, C-contiguous, L2-normalised: the array itself when it already is one (no copy of a
    million vectors per step), else a normalised copy. NaN, inf or all-zero rows are an error."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be a 2-D array (rows, dim), got shape {vectors.shape}")
    bad_value = np.zeros(len(vectors), bool)
    norms = np.empty(len(vectors), np.float64)
    for rows in _chunks(len(vectors), 65_536):  # no temporary the size of the whole matrix
        part = vectors[rows]
        bad_value[rows] = ~np.isfinite(part).all(axis=1)
        norms[rows] = np.sqrt(np.einsum("ij,ij->i", part, part, dtype=np.float64))
    bad = bad_value | (norms == 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        who = f"uid {uids[row]!r}" if uids is not None else f"row {row}"
        problem = "contains NaN or inf" if bad_value[row] else "is all zeros"
        raise ValueError(
            f"image vector of {who} {problem} ({int(bad.sum())} such rows in all); "
            "re-run the embed stage for these images or drop them before dedup"
        )
    if np.abs(norms - 1).max(initial=0.0) <= 1e-6:
        return vectors
    return np.ascontiguousarray(vectors / norms[:, None].astype(np.float32), dtype=np.float32)


def choose_nlist(n: int, cfg: DedupConfig) -> int:
    """IVF cells: cfg.ivf_nlist or about 4*sqrt(N), capped so every cell gets enough training points."""
    wanted = cfg.ivf_nlist if cfg.ivf_nlist is not None else round(4 * math.sqrt(n))
    return int(max(1, min(wanted, n // _MIN_TRAIN_PER_CELL)))


def build_index(vectors: np.ndarray, cfg: DedupConfig) -> tuple[faiss.Index, dict[str, Any]]:
    """Inner-product index over the (normalised) vectors: exact flat below cfg.partition_min_size, IVF
    from it on (the index of `partition: ivf`)."""
    vectors = _unit_vectors(vectors)
    n, dim = vectors.shape
    if n < cfg.partition_min_size:
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index, {"index": "flat", "nlist": None, "nprobe": None}

    nlist = choose_nlist(n, cfg)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = _INDEX_SEED
    rng = np.random.default_rng(_INDEX_SEED)
    train_size = min(n, _MAX_TRAIN_PER_CELL * nlist)
    train_rows = np.sort(rng.choice(n, size=train_size, replace=False))
    index.train(vectors[train_rows])
    index.add(vectors)
    index.nprobe = min(cfg.ivf_nprobe, nlist)
    return index, {"index": "ivf", "nlist": nlist, "nprobe": int(index.nprobe), "train_size": int(train_size)}


def range_neighbours(
    index: faiss.Index, queries: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, indexed id, similarity) for every indexed vector at or above threshold, self included."""
    # faiss keeps inner products strictly above the radius; search slightly lower, filter after.
    lims, sims, ids = index.range_search(queries, float(threshold) - 2 * SIMILARITY_TOLERANCE)
    keep = sims >= threshold - SIMILARITY_TOLERANCE
    rows = np.repeat(np.arange(len(queries)), np.diff(lims).astype(np.int64))
    return rows[keep], ids[keep].astype(np.int64), sims[keep]


def near_pairs(
    index: faiss.Index, vectors: np.ndarray, threshold: float, chunk_size: int = 4096
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) of indexed rows with inner product >= threshold, as arrays i, j, sim.

    `vectors` are the rows that were added to `index`, in the same order. A pair is kept
    when either endpoint finds the other, which matters for an approximate (IVF) index.
    """
    vectors = _unit_vectors(vectors)
    n = len(vectors)
    found_i, found_j, found_sim = [], [], []
    for start in range(0, n, chunk_size):
        rows, ids, sims = range_neighbours(index, vectors[start : start + chunk_size], threshold)
        rows = rows + start
        not_self = rows != ids
        rows, ids, sims = rows[not_self], ids[not_self], sims[not_self]
        found_i.append(np.minimum(rows, ids))
        found_j.append(np.maximum(rows, ids))
        found_sim.append(sims)
    if not found_i:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    i, j, sim = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_sim)
    _, first = np.unique(i * n + j, return_index=True)
    return i[first], j[first], sim[first]


def near_duplicate_pairs(
    vectors: np.ndarray, threshold: float, cfg: DedupConfig, search: ClusterSearch | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Pairs (i < j) of unit vectors with inner product >= threshold, by the search cfg chooses for
    their number: exact all against all below cfg.partition_min_size, else part by part. `search`:
    where the clusters of `partition: clusters` are searched (default: here, one after another)."""
    if len(vectors) < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64), {"index": "flat", "nlist": None, "nprobe": None}
    if len(vectors) >= cfg.partition_min_size and cfg.partition == "clusters":
        return clustered_pairs(vectors, threshold, cfg, search)
    index, description = build_index(vectors, cfg)
    pair_i, pair_j, _ = near_pairs(index, vectors, threshold)
    return pair_i, pair_j, description


@dataclass(frozen=True)
class ClusterBatch:
    """Consecutive clusters of `clustered_pairs`, the unit of its search: `rows`, the members' row
    numbers in the searched set, cluster after cluster (ascending within a cluster); `bounds`, where
    each cluster starts in `rows`, then where the last ends; `vectors`, one unit vector per entry of
    `rows` (a vector in several clusters is there once for each)."""

    rows: np.ndarray
    bounds: np.ndarray
    vectors: np.ndarray


# Where clustered_pairs searches its clusters: given the batches (made as the search takes them) and
# the threshold, the (i, j) pairs of each batch (search_cluster_batch), in any order. The default searches
# them here one after another; search_through_storage hands each to a worker that reads the run root.
ClusterSearch = Callable[[Iterator[ClusterBatch], float], Iterable[tuple[np.ndarray, np.ndarray]]]


def search_cluster_batch(batch: ClusterBatch, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j) of rows with inner product >= threshold inside each cluster of the batch, by an
    exact range search; a pair found in two clusters is listed twice."""
    found_i, found_j = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    dim = batch.vectors.shape[1]
    for c in range(len(batch.bounds) - 1):
        start, stop = int(batch.bounds[c]), int(batch.bounds[c + 1])
        if stop - start < 2:
            continue
        rows, part = batch.rows[start:stop], batch.vectors[start:stop]
        index = faiss.IndexFlatIP(dim)
        index.add(part)
        for queries in _chunks(len(rows), 8192):
            q, ids, _ = range_neighbours(index, part[queries], threshold)
            q = q + queries.start
            keep = q < ids  # each pair once per cluster, never a vector with itself
            found_i.append(rows[q[keep]].astype(np.int64))
            found_j.append(rows[ids[keep]].astype(np.int64))
    return np.concatenate(found_i), np.concatenate(found_j)


def search_here(batches: Iterator[ClusterBatch], threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The default ClusterSearch: each batch in this process, as the batches are made."""
    return (search_cluster_batch(batch, threshold) for batch in batches)


def _cluster_batches(
    vectors: np.ndarray, member_rows: np.ndarray, bounds: np.ndarray, min_members: int
) -> Iterator[ClusterBatch]:
    """The clusters of two members or more, in order, as batches of at least `min_members` members each
    (the last may hold fewer); each batch's vectors are copied only when it is taken."""
    sizes = np.diff(bounds)
    batch: list[int] = []
    members = 0
    for c in np.flatnonzero(sizes >= 2).tolist() + [None]:
        if c is not None:
            batch.append(c)
            members += int(sizes[c])
        if batch and (members >= min_members or c is None):
            rows = np.concatenate([member_rows[bounds[k] : bounds[k + 1]] for k in batch])
            starts = np.concatenate([[0], np.cumsum(sizes[batch])])
            yield ClusterBatch(rows, starts, vectors[rows])
            batch, members = [], 0


def clustered_pairs(
    vectors: np.ndarray, threshold: float, cfg: DedupConfig, search: ClusterSearch | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Near-duplicate pairs by clusters, as SemDeDup partitions: spherical k-means on a sample, each
    vector in its nearest cluster and in those nearly as near, then an exact range search inside
    each cluster. Cost grows as N x (N / clusters + clusters) x dim, least at about sqrt(N) clusters.

    Two near duplicates a, b (distance at most r) with nearest centroids c_a, c_b satisfy
    |a - c_b| <= |a - c_a| + 2r, so a vector searched in every cluster within that bound of its own
    shares a cluster with each of its near duplicates. `boundary_margin` scales the bound (1: the
    whole bound, within the `max_clusters_per_vector` nearest clusters); what the smaller default
    misses is measured by the recall sample (dedup.json) and in benchmarks/bench_dedup.py.

    The clusters' searches are independent: `search` (a ClusterSearch) may run them elsewhere, in
    batches of about cfg.cluster_task_vectors members; without it they run here one cluster at a time.
    The pairs are the same either way.
    """
    vectors = _unit_vectors(vectors)
    n, dim = vectors.shape
    started = time.perf_counter()
    wanted = cfg.clusters if cfg.clusters is not None else round(math.sqrt(n))
    k = int(max(1, min(wanted, n // _MIN_TRAIN_PER_CELL)))
    rng = np.random.default_rng(_INDEX_SEED)
    train_rows = np.sort(rng.choice(n, size=min(n, _MAX_TRAIN_PER_CELL * k), replace=False))
    kmeans = faiss.Kmeans(
        dim, k, niter=10, spherical=True, seed=_INDEX_SEED, max_points_per_centroid=_MAX_TRAIN_PER_CELL
    )
    kmeans.train(vectors[train_rows])
    centroids = faiss.IndexFlatIP(dim)
    centroids.add(kmeans.centroids)
    trained = time.perf_counter()

    # Each vector's nearest clusters by distance to the centroid (unit vectors: d^2 = 2 - 2 cos).
    reach = min(cfg.max_clusters_per_vector, k)
    bound = cfg.boundary_margin * 2 * math.sqrt(max(0.0, 2 - 2 * threshold))
    members: list[np.ndarray] = []
    clusters: list[np.ndarray] = []
    for rows in _chunks(n, 65_536):
        sims, nearest = centroids.search(vectors[rows], reach)
        dist = np.sqrt(np.maximum(0.0, 2 - 2 * sims.astype(np.float64)))
        joins = dist <= dist[:, :1] + bound + SIMILARITY_TOLERANCE
        joins[:, 0] = True
        row_ids = np.arange(rows.start, rows.stop)[:, None].repeat(reach, axis=1)
        members.append(row_ids[joins])
        clusters.append(nearest[joins])
    member_rows = np.concatenate(members)
    member_cluster = np.concatenate(clusters)
    order = np.argsort(member_cluster, kind="stable")
    member_rows, member_cluster = member_rows[order], member_cluster[order]
    bounds = np.searchsorted(member_cluster, np.arange(k + 1))
    assigned = time.perf_counter()

    batches = _cluster_batches(
        vectors, member_rows, bounds, 1 if search is None else cfg.cluster_task_vectors
    )
    found = list((search or search_here)(batches, threshold))
    i = np.concatenate([np.empty(0, np.int64)] + [pair[0] for pair in found])
    j = np.concatenate([np.empty(0, np.int64)] + [pair[1] for pair in found])
    if len(i):
        low, high = np.minimum(i, j), np.maximum(i, j)
        keys = np.unique(low.astype(np.int64) * n + high)  # a pair found in two clusters is one pair
        pair_i, pair_j = keys // n, keys % n
    else:
        pair_i = pair_j = np.empty(0, np.int64)
    sizes = np.diff(bounds)
    return (
        pair_i,
        pair_j,
        {
            "index": "clusters",
            "clusters": k,
            "train_size": len(train_rows),
            "clusters_per_vector": round(len(member_rows) / n, 3),
            "largest_cluster": int(sizes.max()),
            "boundary_margin": cfg.boundary_margin,
            "max_clusters_per_vector": reach,
            "seconds": {
                "kmeans": round(trained - started, 3),
                "assign": round(assigned - trained, 3),
                "search": round(time.perf_counter() - assigned, 3),
            },
        },
    )


# --- the clusters' search on workers that read the run root -------------------------------------
def write_cluster_batch(storage: Storage, rel: str, batch: ClusterBatch) -> str:
    """Store a batch for a worker (an .npz of rows, bounds and vectors, written whole); returns `rel`."""
    buffer = io.BytesIO()
    np.savez(buffer, rows=batch.rows, bounds=batch.bounds, vectors=batch.vectors)
    storage.write_bytes(rel, buffer.getvalue())
    return rel


def search_stored_batch(storage: Storage, rel: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """`search_cluster_batch` of a batch that `write_cluster_batch` stored: a Dask worker's unit of work."""
    with np.load(io.BytesIO(storage.read_bytes(rel)), allow_pickle=False) as stored:
        batch = ClusterBatch(stored["rows"], stored["bounds"], stored["vectors"])
    return search_cluster_batch(batch, threshold)


def search_through_storage(
    storage: Storage, submit: Callable[[str, float], Callable[[], tuple[np.ndarray, np.ndarray]]]
) -> ClusterSearch:
    """A ClusterSearch that stores each batch under the run root's DEDUP_BATCHES_DIR as it is made and
    hands its path to `submit`, which starts `search_stored_batch` of it where the run root can be read (a
    Dask worker) and returns a function that waits for its pairs. The batches' files are deleted once the
    pairs are all back, or the search failed."""

    def search(batches: Iterator[ClusterBatch], threshold: float) -> list[tuple[np.ndarray, np.ndarray]]:
        folder = f"{DEDUP_BATCHES_DIR}/{secrets.token_hex(8)}"  # this run's; another may search at once
        try:
            waits = [
                submit(write_cluster_batch(storage, f"{folder}/batch-{number:05d}.npz", batch), threshold)
                for number, batch in enumerate(batches)
            ]
            return [wait() for wait in waits]
        finally:
            storage.delete(folder)

    return search


def _query_sample(n: int, sample_size: int, seed: int) -> np.ndarray:
    """A seeded sample of query rows, sorted."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(sample_size, n), replace=False))


def _brute_force_neighbours(
    vectors: np.ndarray, queries: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """(query row, row) of every other vector at or above threshold, by exact numpy products."""
    found_rows, found_ids = [], []
    for start in range(0, len(queries), 64):  # 64 x N similarities at a time (256 MB at a million)
        chunk = queries[start : start + 64]
        rows, ids = np.nonzero(vectors[chunk] @ vectors.T >= threshold)
        rows = chunk[rows]
        not_self = rows != ids
        found_rows.append(rows[not_self])
        found_ids.append(ids[not_self])
    if not found_rows:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(found_rows).astype(np.int64), np.concatenate(found_ids).astype(np.int64)


def pair_recall(
    vectors: np.ndarray,
    threshold: float,
    pair_i: np.ndarray,
    pair_j: np.ndarray,
    sample_size: int,
    seed: int = 0,
) -> tuple[int, int, int]:
    """(true pairs found, true pairs, queries): the brute-force pairs (>= threshold) of a seeded sample of
    query rows, and how many of them are among the pairs (i, j) a search found, whichever search it was."""
    vectors = _unit_vectors(vectors)
    n = len(vectors)
    if n == 0:
        return 0, 0, 0
    queries = _query_sample(n, sample_size, seed)
    rows, ids = _brute_force_neighbours(vectors, queries, threshold)
    truth_keys = np.minimum(rows, ids) * n + np.maximum(rows, ids)
    if len(truth_keys) == 0:
        return 0, 0, len(queries)
    found_keys = np.asarray(pair_i, np.int64) * n + np.asarray(pair_j, np.int64)
    return int(np.isin(truth_keys, found_keys).sum()), len(truth_keys), len(queries)


def measure_recall(
    vectors: np.ndarray, threshold: float, index: faiss.Index, sample_size: int, seed: int = 0
) -> float | None:
    """Share of brute-force neighbour pairs (>= threshold) of a seeded query sample that `index` finds.

    None when brute force finds no pair for the sampled queries: there was nothing to miss,
    and 1.0 would claim a measurement that was not made.
    """
    found, true_pairs, _ = recall_counts(vectors, threshold, index, sample_size, seed)
    return found / true_pairs if true_pairs else None


def recall_counts(
    vectors: np.ndarray, threshold: float, index: faiss.Index, sample_size: int, seed: int = 0
) -> tuple[int, int, int]:
    """(pairs found by `index`, pairs found by brute force, queries) for a seeded sample of query rows.

    Brute force is an exact numpy product of each query with every vector. Each query is
    searched once, so this is a lower bound on `near_pairs`, which also keeps a pair that
    only its other endpoint finds.
    """
    vectors = _unit_vectors(vectors)
    n = len(vectors)
    if n == 0:
        return 0, 0, 0
    queries = _query_sample(n, sample_size, seed)
    rows, ids = _brute_force_neighbours(vectors, queries, threshold)
    truth_keys = np.searchsorted(queries, rows) * n + ids  # keyed by query position, as the index answers
    if len(truth_keys) == 0:
        return 0, 0, len(queries)

    rows, ids, _ = range_neighbours(index, vectors[queries], threshold)
    found = int(np.isin(truth_keys, rows * n + ids).sum())
    return found, len(truth_keys), len(queries)


def _survivor(members: np.ndarray, clip_scores: np.ndarray, uids: np.ndarray) -> int:
    """Highest CLIP score wins; ties go to the smallest uid so reruns keep the same row."""
    return min(members, key=lambda row: (-clip_scores[row], uids[row]))


def deduplicate(
    uids: Sequence[str],
    sha256: Sequence[str],
    vectors: np.ndarray,
    clip_scores: Sequence[float],
    cfg: DedupConfig,
    search: ClusterSearch | None = None,
) -> DedupResult:
    """Mark exact, then near duplicates; one survivor per group, every other member gets `dup_of`.

    `dup_of` always names the group's final survivor. `kind` is "exact" when the row has the
    survivor's sha256 and "near" otherwise; `similarity` is 1.0 for exact and the cosine
    similarity to the survivor for near duplicates. A missing (NaN) CLIP score never wins.
    `search`: where the clusters of `partition: clusters` are searched (clustered_pairs); the result
    does not depend on it.
    """
    if cfg.near_threshold is None:
        raise ValueError(
            "dedup.near_threshold is unset: resolve it first (dalle.curate.ledger.dedup_settings)"
        )
    timings: dict[str, float] = {}
    started = time.perf_counter()
    uids = np.asarray(list(uids), dtype=object)
    sha256 = np.asarray(list(sha256), dtype=object)
    scores = np.asarray(clip_scores, dtype=np.float64)
    n = len(uids)
    if not (len(sha256) == len(scores) == len(vectors) == n):
        raise ValueError(
            f"deduplicate needs one sha256, vector and clip_score per uid: got {n} uids, {len(sha256)} "
            f"hashes, {len(vectors)} vectors, {len(scores)} clip scores"
        )
    if len(set(uids.tolist())) != n:
        _, counts = np.unique(uids, return_counts=True)
        raise ValueError(f"uids must be unique; {int((counts > 1).sum())} uids appear more than once")
    scores = np.where(np.isnan(scores), -np.inf, scores)
    vectors = np.asarray(vectors, dtype=np.float32)
    if n == 0 and vectors.ndim != 2:
        vectors = vectors.reshape(0, 0)
    vectors = _unit_vectors(vectors, uids)

    # Exact stage: each hash group keeps its best row; only those rows go on to near search.
    t0 = time.perf_counter()
    exact_parent = np.arange(n)
    hash_groups = exact_groups(sha256)
    for group in hash_groups:
        exact_parent[group] = _survivor(group, scores, uids)
    reps = np.flatnonzero(exact_parent == np.arange(n))
    timings["exact"] = time.perf_counter() - t0

    # Near stage over the exact survivors.
    t0 = time.perf_counter()
    searched = vectors[reps] if len(reps) < n else vectors
    pair_i, pair_j, description = near_duplicate_pairs(searched, cfg.near_threshold, cfg, search)
    timings["search"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    recall_found, recall_pairs, recall_queries = pair_recall(
        searched, cfg.near_threshold, pair_i, pair_j, cfg.recall_sample, seed=0
    )
    recall = recall_found / recall_pairs if recall_pairs else None
    timings["recall"] = time.perf_counter() - t0
    del searched

    # Components over the exact survivors; a component of size >= 2 is a near group.
    m = len(reps)
    graph = coo_matrix((np.ones(len(pair_i), np.int8), (pair_i, pair_j)), shape=(m, m))
    _, labels = connected_components(graph, directed=False) if m else (0, np.empty(0, np.int64))
    near_parent = np.arange(n)
    by_component = np.split(reps[np.argsort(labels, kind="stable")], np.cumsum(np.bincount(labels))[:-1])
    near_groups = [members for members in by_component if len(members) >= 2]
    for members in near_groups:
        near_parent[members] = _survivor(members, scores, uids)

    result = DedupResult()
    final = near_parent[exact_parent]
    for row in np.flatnonzero(final != np.arange(n)):
        survivor = int(final[row])
        uid = str(uids[row])
        result.dup_of[uid] = str(uids[survivor])
        if sha256[row] == sha256[survivor]:
            result.kind[uid] = "exact"
            result.similarity[uid] = 1.0
        else:
            result.kind[uid] = "near"
            result.similarity[uid] = float(np.dot(vectors[row], vectors[survivor]))

    group_sizes = np.bincount(final, minlength=n) if n else np.zeros(0, int)
    kinds = list(result.kind.values())
    timings["total"] = time.perf_counter() - started
    result.report = {
        "threshold": cfg.near_threshold,
        "index": description,
        "num_vectors": n,
        "num_searched": m,
        "duplicates_exact": kinds.count("exact"),
        "duplicates_near": kinds.count("near"),
        "groups_exact": len(hash_groups),
        "groups_near": len(near_groups),
        "largest_group": int(group_sizes.max()) if n else 0,
        "survivors": n - len(result.dup_of),
        "recall": recall,
        "recall_sample": recall_queries,
        "recall_true_pairs": recall_pairs,
        "seconds": {name: round(value, 4) for name, value in timings.items()},
    }
    return result


# --- the stage ---------------------------------------------------------------------------------
def dedup_vectors(cfg: RunConfig) -> str:
    """Which vectors near-duplicate search compares. A small CLIP trained on captions maps every
    image of one caption to nearly one pooled vector, so its patch tokens are used instead."""
    if cfg.dedup.vectors != "auto":
        return cfg.dedup.vectors
    return "clip" if (cfg.clip.pretrained or cfg.clip.checkpoint) else "clip_tokens"


DEFAULT_NEAR_THRESHOLD = {"clip": 0.95, "clip_tokens": 0.99}


def dedup_settings(cfg: RunConfig) -> DedupConfig:
    """The dedup config with the near-duplicate threshold resolved for the vectors in use."""
    if cfg.dedup.near_threshold is not None:
        return cfg.dedup
    return with_changes(cfg.dedup, "dedup", near_threshold=DEFAULT_NEAR_THRESHOLD[dedup_vectors(cfg)])


def _token_vectors(clip: ClipEncoder, chunks: Iterable[list[bytes]], batch_size: int) -> np.ndarray:
    """Patch-token vectors of the images, given as chunks (decoded a chunk at a time), centred on their
    mean over the set so that the shared background does not make every pair look alike, then
    L2-normalised."""
    parts = [clip.encode_image_tokens([decode_rgb(b) for b in chunk], batch_size) for chunk in chunks]
    tokens = np.concatenate(parts) if parts else np.zeros((0, clip.embed_dim), dtype=np.float32)
    if len(tokens) == 0:
        return np.zeros((0, clip.embed_dim), dtype=np.float32)
    tokens -= tokens.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(tokens, axis=1, keepdims=True)
    return (tokens / np.maximum(norms, 1e-12)).astype(np.float32)


def dedup_stage(
    storage: Storage, cfg: RunConfig, clip: ClipEncoder, search: ClusterSearch | None = None
) -> dict:
    """Exact (sha256) then near (CLIP image vectors, FAISS) duplicates among the scored survivors.
    `search`: where the clusters of `partition: clusters` are searched (flows.curate passes
    `search_through_storage` with Dask workers at orchestration.dask_address); the same result anywhere."""
    scored = {r["uid"]: r for r in storage.read_table(SCORES_TABLE).to_pylist() if r["fate"] == PASS}
    rows = [r for r in passing_rows(storage) if r["uid"] in scored]
    uids = [r["uid"] for r in rows]
    if dedup_vectors(cfg) == "clip_tokens":
        chunks = (chunk for _, chunk in iter_images(storage, rows))  # a chunk of bodies in memory at once
        vectors = _token_vectors(clip, chunks, cfg.clip.batch_size)
    else:
        # Everything needed is cached by now, so embed_stage only reads.
        stored = embed_stage(storage, uids, [None] * len(uids), [r["caption"] for r in rows], clip, 1)
        vectors = embedding_matrix(stored, "image_embedding")
    scores = np.asarray([scored[u]["clip_score"] for u in uids], dtype=np.float32)
    result = deduplicate(uids, [r["sha256"] for r in rows], vectors, scores, dedup_settings(cfg), search)
    out = []
    for uid in uids:
        if uid in result.dup_of:
            out.append(
                {
                    "uid": uid,
                    "fate": f"duplicate_{result.kind[uid]}",
                    "dup_of": result.dup_of[uid],
                    "similarity": result.similarity[uid],
                }
            )
        else:
            out.append({"uid": uid, "fate": PASS, "dup_of": None, "similarity": None})
    storage.write_table(DEDUP_TABLE, pa.Table.from_pylist(out, schema=DEDUP_DECISIONS_SCHEMA))
    report = {"clip_model": clip.identity, "vectors": dedup_vectors(cfg), **result.report}
    storage.write_json(DEDUP_REPORT, report)
    return report
