"""Exact and near duplicate removal (dalle/curate/dedup.py)."""

from __future__ import annotations

import numpy as np
import pytest

from dalle.config import DedupConfig
from dalle.curate.dedup import (
    build_index,
    clustered_pairs,
    deduplicate,
    exact_groups,
    measure_recall,
    near_duplicate_pairs,
    near_pairs,
    search_stored_batch,
    search_through_storage,
)
from dalle.runroot import DEDUP_BATCHES_DIR
from dalle.storage import Storage


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def random_with_planted(n: int, dim: int, dups: int, seed: int = 0):
    """n random unit vectors whose last `dups` rows are noisy copies (cosine ~0.98) of distinct earlier rows."""
    rng = np.random.default_rng(seed)
    vectors = unit(rng.standard_normal((n, dim)))
    originals = rng.choice(n - dups, size=dups, replace=False)
    noise = rng.standard_normal((dups, dim)) * (0.2 / np.sqrt(dim))
    vectors[n - dups :] = unit(vectors[originals] + noise)
    copies = np.arange(n - dups, n)
    return vectors, originals, copies


def table(n: int, seed: int = 0):
    uids = [f"u{i:05d}" for i in range(n)]
    sha = [f"sha{i}" for i in range(n)]
    scores = np.random.default_rng(seed).uniform(0.2, 0.4, n)
    return uids, sha, scores


def test_exact_groups_are_rows_sharing_a_hash():
    groups = exact_groups(["a", "b", "a", "c", "b", "a"])
    assert sorted(g.tolist() for g in groups) == [[0, 2, 5], [1, 4]]
    assert exact_groups(["a", "b"]) == []
    assert exact_groups([]) == []


def test_exact_duplicates_keep_the_highest_clip_score():
    vectors, _, _ = random_with_planted(50, 16, 0)
    uids, sha, scores = table(50)
    for row in (3, 17, 40):  # same bytes at three URLs; the embedder may jitter the vector
        sha[row] = "same"
        vectors[row] = vectors[3] + np.float32(1e-3)
    scores[[3, 17, 40]] = [0.30, 0.35, 0.10]

    result = deduplicate(uids, sha, vectors, scores, DedupConfig(near_threshold=0.95))

    assert result.dup_of == {"u00003": "u00017", "u00040": "u00017"}
    assert result.kind == {"u00003": "exact", "u00040": "exact"}
    assert result.similarity == {"u00003": 1.0, "u00040": 1.0}
    assert result.report["duplicates_exact"] == 2
    assert result.report["duplicates_near"] == 0
    assert result.report["largest_group"] == 3


def test_planted_near_duplicates_found_with_flat_index():
    vectors, originals, copies = random_with_planted(2000, 64, 60)
    uids, sha, scores = table(2000)
    scores[originals] = 0.9  # originals win, so every copy points at its own original

    result = deduplicate(uids, sha, vectors, scores, DedupConfig(near_threshold=0.95, recall_sample=2000))

    assert result.report["index"]["index"] == "flat"
    assert result.dup_of == {uids[c]: uids[o] for o, c in zip(originals, copies)}
    assert set(result.kind.values()) == {"near"}
    for o, c in zip(originals, copies):
        assert result.similarity[uids[c]] == pytest.approx(float(vectors[o] @ vectors[c]), abs=1e-5)
        assert result.similarity[uids[c]] >= 0.95
    assert result.report["duplicates_near"] == 60
    assert result.report["groups_near"] == 60
    assert result.report["recall"] == 1.0
    assert result.report["recall_true_pairs"] == 120  # both directions of each planted pair


def test_planted_near_duplicates_found_with_ivf_index():
    n, dups = 25_000, 300  # large enough that nlist = 4*sqrt(N) is not capped by training points
    vectors, originals, copies = random_with_planted(n, 64, dups, seed=1)
    uids, sha, scores = table(n, seed=1)
    cfg = DedupConfig(
        near_threshold=0.95, partition_min_size=1000, partition="ivf", ivf_nprobe=8, recall_sample=5000
    )

    result = deduplicate(uids, sha, vectors, scores, cfg)

    assert result.report["index"]["index"] == "ivf"
    assert result.report["index"]["nlist"] == round(4 * np.sqrt(n))
    assert result.report["index"]["nprobe"] == 8
    assert result.report["recall"] >= 0.9
    assert result.report["recall_true_pairs"] >= 30
    planted = {frozenset((uids[o], uids[c])) for o, c in zip(originals, copies)}
    found = {frozenset(pair) for pair in result.dup_of.items()}
    assert len(planted & found) / len(planted) >= 0.9
    assert found <= planted  # random 64-d vectors are never this similar by chance


def test_ivf_recall_is_measured_not_assumed():
    # One probed cell out of many: the index misses pairs that straddle cells, and recall says so.
    vectors, _, _ = random_with_planted(4000, 32, 400, seed=2)
    vectors[-400:] = unit(vectors[-400:] + np.random.default_rng(3).standard_normal((400, 32)) * 0.12)
    cfg = DedupConfig(partition_min_size=1, partition="ivf", ivf_nlist=64, ivf_nprobe=1)
    index, description = build_index(vectors, cfg)
    assert description["index"] == "ivf"
    ivf_recall = measure_recall(vectors, 0.9, index, sample_size=4000, seed=0)
    flat_index, _ = build_index(vectors, DedupConfig(near_threshold=0.95))
    assert measure_recall(vectors, 0.9, flat_index, sample_size=4000, seed=0) == 1.0
    assert ivf_recall < 1.0


def test_near_groups_chain_through_a_middle_member():
    # a~b and b~c at cos 0.99, but a and c only at cos(2*acos 0.99) ~ 0.96 < threshold 0.985.
    angle = np.arccos(0.99)
    chain = np.zeros((3, 8), np.float32)
    for k in range(3):
        chain[k, 0], chain[k, 1] = np.cos(k * angle), np.sin(k * angle)
    others = unit(np.random.default_rng(4).standard_normal((20, 8)))
    others[:, :2] = 0  # orthogonal to the chain's plane
    others = unit(others)
    vectors = np.vstack([chain, others])
    uids, sha, scores = table(len(vectors))
    scores[:3] = [0.5, 0.1, 0.2]

    result = deduplicate(uids, sha, vectors, scores, DedupConfig(near_threshold=0.985))

    assert result.dup_of == {"u00001": "u00000", "u00002": "u00000"}
    assert result.similarity["u00001"] == pytest.approx(0.99, abs=1e-5)
    assert result.similarity["u00002"] == pytest.approx(np.cos(2 * angle), abs=1e-5)
    assert result.similarity["u00002"] < 0.985
    assert result.report["groups_near"] == 1
    assert result.report["largest_group"] == 3


def test_exact_group_joins_a_near_group_and_points_at_the_final_survivor():
    vectors, _, _ = random_with_planted(10, 16, 0)
    vectors[1] = vectors[0]
    vectors[2] = unit(vectors[0] + 0.01)
    uids, sha, scores = table(10)
    sha[1] = sha[0]
    scores[:3] = [0.3, 0.2, 0.4]

    result = deduplicate(uids, sha, vectors, scores, DedupConfig(near_threshold=0.95))

    assert result.dup_of == {"u00000": "u00002", "u00001": "u00002"}
    assert result.kind == {"u00000": "near", "u00001": "near"}
    assert result.report["largest_group"] == 3


def test_ties_go_to_the_smallest_uid_whatever_the_input_order():
    vectors = np.tile(unit(np.ones((1, 8))), (4, 1))
    uids = ["d", "b", "c", "a"]
    sha = ["h"] * 4
    scores = [0.3, 0.3, 0.1, 0.3]
    first = deduplicate(uids, sha, vectors, scores, DedupConfig(near_threshold=0.95))
    order = [2, 0, 3, 1]
    second = deduplicate(
        [uids[i] for i in order], sha, vectors, [scores[i] for i in order], DedupConfig(near_threshold=0.95)
    )
    assert first.dup_of == second.dup_of == {"b": "a", "c": "a", "d": "a"}


def test_all_identical_vectors_form_one_group():
    vectors = np.tile(unit(np.arange(1, 9, dtype=np.float32)), (30, 1))
    uids, sha, scores = table(30)
    result = deduplicate(uids, sha, vectors, scores, DedupConfig(near_threshold=1.0))
    best = uids[int(np.argmax(scores))]
    assert set(result.dup_of.values()) == {best}
    assert len(result.dup_of) == 29
    assert result.report["largest_group"] == 30


def test_no_duplicates_gives_no_dup_of():
    vectors, _, _ = random_with_planted(500, 32, 0)
    uids, sha, scores = table(500)
    result = deduplicate(uids, sha, vectors, scores, DedupConfig(near_threshold=0.95, recall_sample=500))
    assert result.dup_of == {} and result.kind == {} and result.similarity == {}
    assert result.report["duplicates_exact"] == result.report["duplicates_near"] == 0
    assert result.report["largest_group"] == 1
    assert result.report["recall"] is None  # no true pair to miss: no claim made


def test_nan_vector_is_an_error_naming_the_uid():
    vectors, _, _ = random_with_planted(20, 8, 0)
    vectors[7, 3] = np.nan
    uids, sha, scores = table(20)
    with pytest.raises(ValueError, match="u00007.*NaN"):
        deduplicate(uids, sha, vectors, scores, DedupConfig(near_threshold=0.95))
    with pytest.raises(ValueError, match="NaN"):
        build_index(vectors, DedupConfig(near_threshold=0.95))


def test_zero_and_one_rows():
    empty = deduplicate([], [], np.zeros((0, 16), np.float32), [], DedupConfig(near_threshold=0.95))
    assert empty.dup_of == {}
    assert empty.report["num_vectors"] == 0 and empty.report["largest_group"] == 0
    one = deduplicate(["a"], ["h"], np.ones((1, 16), np.float32), [0.2], DedupConfig(near_threshold=0.95))
    assert one.dup_of == {}
    assert one.report["num_vectors"] == 1 and one.report["largest_group"] == 1


def test_near_pairs_include_the_threshold_and_list_each_pair_once():
    vectors = unit(np.array([[1, 0], [0.6, 0.8], [1, 0], [0, 1]], np.float32))
    index, _ = build_index(vectors, DedupConfig(near_threshold=0.95))
    i, j, _ = near_pairs(index, vectors, 0.6, chunk_size=1)
    pairs = sorted(zip(i.tolist(), j.tolist()))
    assert pairs == [(0, 1), (0, 2), (1, 2), (1, 3)]  # cos 0.6 and 0.8 at threshold 0.6 count


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="one sha256, vector and clip_score per uid"):
        deduplicate(["a", "b"], ["h"], np.ones((2, 4)), [0.1, 0.2], DedupConfig(near_threshold=0.95))


def test_ivf_cells_are_capped_so_each_gets_enough_training_points():
    vectors, _, _ = random_with_planted(2000, 16, 0)
    _, default = build_index(vectors, DedupConfig(partition_min_size=1000, partition="ivf"))
    assert default["nlist"] == 2000 // 39  # 4*sqrt(2000) ~ 179 cells would get ~11 points each
    _, chosen = build_index(
        vectors, DedupConfig(partition_min_size=1000, partition="ivf", ivf_nlist=20, ivf_nprobe=4)
    )
    assert (chosen["index"], chosen["nlist"], chosen["nprobe"]) == ("ivf", 20, 4)
    _, flat = build_index(vectors, DedupConfig(partition_min_size=2001, partition="ivf"))
    assert flat["index"] == "flat"


def clustered_with_pairs(n: int, dim: int, threshold: float, seed: int):
    """Unit vectors in tight uneven clusters, with copies planted at cosines on both sides of threshold."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((12, dim)))
    label = rng.choice(12, size=n, p=np.arange(12, 0, -1) / 78)  # uneven cluster sizes
    vectors = unit(centres[label] + rng.standard_normal((n, dim)).astype(np.float32) * 0.9 / np.sqrt(dim))
    planted = n // 20
    rows = rng.choice(n, size=2 * planted, replace=False)
    bases, copies = rows[:planted], rows[planted:]
    cosines = rng.uniform(threshold - 0.02, threshold + 0.02, planted)
    direction = rng.standard_normal((planted, dim)).astype(np.float32)
    direction -= np.einsum("ij,ij->i", direction, vectors[bases])[:, None] * vectors[bases]
    direction = unit(direction)
    vectors[copies] = unit(cosines[:, None] * vectors[bases] + np.sqrt(1 - cosines[:, None] ** 2) * direction)
    return vectors.astype(np.float32), bases, copies, cosines


def _flat_pairs(vectors, threshold):
    index, _ = build_index(vectors, DedupConfig(near_threshold=threshold))
    i, j, _ = near_pairs(index, vectors, threshold)
    return set(zip(i.tolist(), j.tolist()))


def test_clustered_search_with_the_whole_bound_finds_exactly_the_brute_force_pairs():
    vectors, _, _, cosines = clustered_with_pairs(6000, 32, 0.95, seed=5)
    truth = _flat_pairs(vectors, 0.95)
    assert sum(cosines >= 0.95) > 100 and sum(cosines < 0.95) > 100  # both sides of the threshold
    cfg = DedupConfig(near_threshold=0.95, clusters=24, boundary_margin=1.0, max_clusters_per_vector=16)
    i, j, description = clustered_pairs(vectors, 0.95, cfg)
    assert description["index"] == "clusters" and description["clusters"] == 24
    assert set(zip(i.tolist(), j.tolist())) == truth
    # Each vector in its nearest cluster only: the pairs whose ends lie in different clusters are lost,
    # so there were such pairs, and the bound found them.
    alone = DedupConfig(near_threshold=0.95, clusters=24, boundary_margin=0.0, max_clusters_per_vector=1)
    i, j, description = clustered_pairs(vectors, 0.95, alone)
    assert description["clusters_per_vector"] == 1.0
    assert set(zip(i.tolist(), j.tolist())) < truth


def test_clustered_search_at_its_defaults_keeps_recall_and_never_reports_a_pair_below_threshold():
    vectors, bases, copies, cosines = clustered_with_pairs(20_000, 32, 0.95, seed=6)
    truth = _flat_pairs(vectors, 0.95)
    cfg = DedupConfig(near_threshold=0.95, partition_min_size=10_000)
    i, j, description = near_duplicate_pairs(vectors, 0.95, cfg)
    found = set(zip(i.tolist(), j.tolist()))
    assert description["index"] == "clusters" and description["clusters"] == round(np.sqrt(20_000))
    assert found <= truth  # exact products: nothing below the threshold
    assert len(found) / len(truth) >= 0.99
    planted_above = {(min(a, b), max(a, b)) for a, b, c in zip(bases, copies, cosines) if c >= 0.95}
    assert len(planted_above & found) / len(planted_above) >= 0.99

    uids, sha, scores = table(len(vectors), seed=6)
    result = deduplicate(uids, sha, vectors, scores, cfg)
    assert result.report["index"]["index"] == "clusters"
    assert result.report["recall"] is None or result.report["recall"] >= 0.99
    assert set(result.report["index"]["seconds"]) == {"kmeans", "assign", "search"}


def test_clusters_searched_in_stored_batches_give_the_same_pairs_and_leave_no_file(tmp_path):
    vectors, _, _, _ = clustered_with_pairs(4000, 32, 0.95, seed=7)
    cfg = DedupConfig(near_threshold=0.95, clusters=20, partition_min_size=2, cluster_task_vectors=700)
    here_i, here_j, here = clustered_pairs(vectors, 0.95, cfg)
    storage = Storage(str(tmp_path / "run"))
    batches = []

    def submit(rel, threshold):  # as a worker would: read the stored batch, later
        batch = storage.read_bytes(rel)
        batches.append(len(batch))
        return lambda: search_stored_batch(storage, rel, threshold)

    i, j, stored = clustered_pairs(vectors, 0.95, cfg, search_through_storage(storage, submit))
    np.testing.assert_array_equal(i, here_i)
    np.testing.assert_array_equal(j, here_j)
    assert len(here_i) > 100
    assert {**stored, "seconds": None} == {**here, "seconds": None}
    # Batches of at least 700 members: fewer tasks than clusters, more than one.
    members = round(stored["clusters_per_vector"] * len(vectors))
    assert 1 < len(batches) <= members // 700 + 1 < 20
    assert storage.list(DEDUP_BATCHES_DIR) == []

    uids, sha, scores = table(len(vectors), seed=7)
    alone = deduplicate(uids, sha, vectors, scores, cfg)
    searched = deduplicate(uids, sha, vectors, scores, cfg, search_through_storage(storage, submit))
    assert searched.dup_of == alone.dup_of and searched.similarity == alone.similarity


def test_a_failed_batch_search_leaves_no_stored_batch(tmp_path):
    vectors, _, _, _ = clustered_with_pairs(2000, 32, 0.95, seed=8)
    storage = Storage(str(tmp_path / "run"))

    def submit(rel, threshold):
        def wait():
            raise RuntimeError("the worker died")

        return wait

    cfg = DedupConfig(near_threshold=0.95, clusters=10, partition_min_size=2, cluster_task_vectors=100)
    with pytest.raises(RuntimeError, match="the worker died"):
        clustered_pairs(vectors, 0.95, cfg, search_through_storage(storage, submit))
    assert storage.list(DEDUP_BATCHES_DIR) == []


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"boundary_margin": 1.5}, "boundary_margin"),
        ({"boundary_margin": -0.1}, "boundary_margin"),
        ({"max_clusters_per_vector": 0}, "max_clusters_per_vector"),
        ({"clusters": 0}, "clusters"),
        ({"partition": "lsh"}, "partition"),
    ],
)
def test_bad_partition_settings_are_named(change, name):
    from dalle.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=name):
        config_from_dict({"dedup": change}, origin="test")


def test_a_config_of_an_older_release_keeps_its_ivf_size():
    from dalle.config import config_from_dict

    cfg = config_from_dict({"dedup": {"ivf_min_size": 1234, "ivf_nprobe": 4}}, origin="old run root")
    assert cfg.dedup.partition_min_size == 1234 and cfg.dedup.ivf_nprobe == 4
