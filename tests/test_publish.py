"""Publishing curated/ and shards/: a crash at any write or delete leaves a manifest whose files are
whole, readers see one publication or the other (never a mix, never an unlisted file), a re-run
ends where an uninterrupted run does, and two tokenize runs on one root keep each other's shards."""

from __future__ import annotations

import hashlib
import io
import itertools
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dalle.config import config_from_dict
from dalle.curate import ledger
from dalle.runroot import (
    CURATE_REPORT,
    CURATED_DIR,
    CURATED_MANIFEST,
    DEDUP_TABLE,
    FILTER_TABLE,
    INPUT_MANIFEST,
    MANIFEST,
    SAMPLES_REPORT,
    SCORES_TABLE,
    SHARD_WRITERS_DIR,
    SHARDS_DIR,
    SHARDS_MANIFEST,
    run_config,
)
from dalle.schemas import (
    CURATED_SCHEMA,
    DEDUP_DECISIONS_SCHEMA,
    FILTER_DECISIONS_SCHEMA,
    SCORE_DECISIONS_SCHEMA,
)
from dalle.storage import Storage
from dalle.tokens.bpe import tokenizer_for_run
from dalle.tokens.loader import ShardDataset, ShardError, read_listed_shards, read_manifest
from dalle.tokens.shards import curated_captions, tokenize_stage

SAMPLES = 20
ROWS_PER_SHARD = 6
OLD = ()  # the first publication keeps every sample
NEW = (8, 9)  # the re-publication finds these to be copies of sample 0
CLIP_MODEL = "clip:test"
SETTINGS = {
    "tokenizer": {"vocab_size": 280},
    "transformer": {"text_seq_len": 8},
    "tokenize": {"rows_per_shard": 4, "batch_size": 4},
}


class Crash(Exception):
    """The storage died: this write or delete, and every one after it, did not happen."""


class DyingStorage(Storage):
    """A run root whose writes and deletes fail from the `dies_at`-th on (never when None), as if
    the process had been killed there; `steps` counts the ones attempted."""

    def __init__(self, root: str, dies_at: int | None = None):
        super().__init__(root)
        self.dies_at = dies_at
        self.steps: list[tuple[str, str]] = []  # (action, path) of every step attempted

    def _step(self, action: str, rel: str) -> None:
        self.steps.append((action, rel))
        if self.dies_at is not None and len(self.steps) >= self.dies_at:
            raise Crash(f"{action} {rel} (step {len(self.steps)})")

    def write_bytes(self, rel: str, data: bytes) -> str:
        self._step("write", rel)
        return super().write_bytes(rel, data)

    def delete(self, rel: str) -> None:
        self._step("delete", rel)
        super().delete(rel)


def uid(i: int) -> str:
    return f"uid{i:03d}"


def png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 12 % 256, 255 - i * 12 % 256, i * 40 % 256)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_stages(storage: Storage) -> None:
    """What the crawl, the filters and the CLIP scores leave for the publish step: SAMPLES pairs that passed."""
    images = [png(i) for i in range(SAMPLES)]
    storage.write_json(INPUT_MANIFEST, {"input_rows": SAMPLES})
    raw = [
        {
            "key": str(i),
            "url": f"http://127.0.0.1/{i}.png",
            "caption": f"shape number {i}",
            "status": "success",
            "error_message": None,
            "sha256": hashlib.sha256(images[i]).hexdigest(),
            "input_row": i,
            "caption_utf8": True,
            "jpg": images[i],
        }
        for i in range(SAMPLES)
    ]
    storage.write_table("raw/00000.parquet", pa.Table.from_pylist(raw))
    decisions = [
        {
            "input_row": i,
            "url": row["url"],
            "caption": row["caption"],
            "raw_shard": "raw/00000.parquet",
            "raw_key": row["key"],
            "uid": uid(i),
            "fate": "pass",
            "sha256": row["sha256"],
            "width": 8,
            "height": 8,
        }
        for i, row in enumerate(raw)
    ]
    storage.write_table(FILTER_TABLE, pa.Table.from_pylist(decisions, schema=FILTER_DECISIONS_SCHEMA))
    scores = [{"uid": uid(i), "fate": "pass", "clip_score": 0.3} for i in range(SAMPLES)]
    storage.write_table(SCORES_TABLE, pa.Table.from_pylist(scores, schema=SCORE_DECISIONS_SCHEMA))


def publish(storage: Storage, copies_of_first: tuple[int, ...]) -> dict:
    """Deduplicate (the samples in `copies_of_first` are copies of sample 0) and publish curated/."""
    dedup = [
        {"uid": uid(i), "fate": "duplicate_exact", "dup_of": uid(0), "similarity": 1.0}
        if i in copies_of_first
        else {"uid": uid(i), "fate": "pass", "dup_of": None, "similarity": None}
        for i in range(SAMPLES)
    ]
    storage.write_table(DEDUP_TABLE, pa.Table.from_pylist(dedup, schema=DEDUP_DECISIONS_SCHEMA))
    return ledger.write_curated(storage, config_from_dict({}), CLIP_MODEL)


def kept_uids(copies_of_first: tuple[int, ...]) -> list[str]:
    return [uid(i) for i in range(SAMPLES) if i not in copies_of_first]


@pytest.fixture(autouse=True)
def small_curated_shards(monkeypatch):
    monkeypatch.setattr(ledger, "CURATED_ROWS_PER_SHARD", ROWS_PER_SHARD)


class Uids:
    columns = ("uid",)

    def __call__(self, table: pa.Table) -> dict:
        return {"uids": table.column("uid").to_pylist()}


def loader_uids(root: str) -> list[str]:
    """One epoch of the curated loader (the dVAE's), as uids."""
    dataset = ShardDataset(root, CURATED_DIR, Uids(), batch_size=1)
    return [u for batch in itertools.islice(iter(dataset), dataset.num_rows) for u in batch["uids"]]


def caption_uids(storage: Storage) -> list[str]:
    """What the tokenizer's caption reader returns, as the uids the captions belong to."""
    return [uid(int(caption.rsplit(" ", 1)[1])) for caption in curated_captions(storage)()]


def assert_listed_files_are_whole(storage: Storage, shard_dir: str) -> None:
    for entry in storage.read_json(f"{shard_dir}/{MANIFEST}")["shards"]:
        assert hashlib.sha256(storage.read_bytes(entry["path"])).hexdigest() == entry["sha256"], entry


def published(storage: Storage, shard_dir: str) -> dict[str, bytes]:
    """Every Parquet file directly under `shard_dir` (listed or not) and the manifest, by name."""
    files = storage.list(shard_dir, ".parquet") + [f"{shard_dir}/{MANIFEST}"]
    return {rel: storage.read_bytes(rel) for rel in files}


# ----- curated/ ---------------------------------------------------------------------------------


def test_a_republish_writes_new_names_and_keeps_the_name_of_unchanged_content(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    write_stages(storage)
    publish(storage, OLD)
    old = {e["path"]: e for e in read_manifest(storage, CURATED_DIR)["shards"]}
    assert [e["rows"] for e in old.values()] == [6, 6, 6, 2]
    publish(storage, NEW)
    new = {e["path"]: e for e in read_manifest(storage, CURATED_DIR)["shards"]}
    assert [e["rows"] for e in new.values()] == [6, 6, 6]
    # Samples 0-5 did not change: that shard keeps its name; the others are new files.
    assert len(set(old) & set(new)) == 1
    for rel, entry in new.items():
        index, digest = rel.removeprefix(f"{CURATED_DIR}/").removesuffix(".parquet").split("-")
        assert digest == entry["sha256"][:12] and len(index) == 5
    assert storage.list(CURATED_DIR, ".parquet") == sorted(new), "the old publication's files are gone"
    before = published(storage, CURATED_DIR)
    publish(storage, NEW)
    assert published(storage, CURATED_DIR) == before, "publishing the same result again changes nothing"


def crash_in_a_republish(base: str, at_the_switch_only: bool = False) -> None:
    """For every write or delete N of a re-publish (or only the steps around the manifest's switch):
    die there, check what the readers see, re-run and compare with an uninterrupted run."""
    reference = Storage(f"{base}/uninterrupted")
    write_stages(reference)
    publish(reference, OLD)
    counting = DyingStorage(reference.root)
    expected_report = publish(counting, NEW)
    want = published(reference, CURATED_DIR)
    old_uids, new_uids = sorted(kept_uids(OLD)), sorted(kept_uids(NEW))
    steps = range(1, len(counting.steps) + 1)
    if at_the_switch_only:
        switch = counting.steps.index(("write", CURATED_MANIFEST)) + 1
        steps = [switch - 1, switch, switch + 1]  # the last new shard, the manifest, the first delete
    assert [action for action, _ in counting.steps].count("delete") >= 2, "the test needs old files to delete"

    for dies_at in steps:
        root = f"{base}/dies-at-{dies_at}"
        storage = Storage(root)
        write_stages(storage)
        publish(storage, OLD)
        with pytest.raises(Crash):
            publish(DyingStorage(root, dies_at), NEW)

        assert_listed_files_are_whole(storage, CURATED_DIR)
        seen = sorted(loader_uids(root))
        assert seen in (old_uids, new_uids), f"died at step {dies_at}: the loader read a mix"
        assert sorted(caption_uids(storage)) == seen, f"died at step {dies_at}: the caption reader disagrees"

        assert publish(storage, NEW) == expected_report
        assert published(storage, CURATED_DIR) == want, f"died at step {dies_at}: the re-run differs"
        assert storage.read_bytes(SAMPLES_REPORT) == reference.read_bytes(SAMPLES_REPORT)
        assert storage.read_json(CURATE_REPORT) == expected_report


def test_a_crash_anywhere_in_a_republish_leaves_one_whole_publication(tmp_path):
    crash_in_a_republish(str(tmp_path))


def test_a_crash_around_the_switch_on_s3(s3_bucket):
    crash_in_a_republish(f"{s3_bucket}/runs", at_the_switch_only=True)


def test_a_file_the_manifest_does_not_list_is_never_read(tmp_path):
    root = str(tmp_path / "run")
    storage = Storage(root)
    write_stages(storage)
    publish(storage, NEW)
    stray = pa.Table.from_pylist(
        [
            {
                "uid": "stray",
                "url": "http://127.0.0.1/stray.png",
                "caption": "shape number 999",
                "image": png(99),
                "sha256": hashlib.sha256(png(99)).hexdigest(),
                "width": 8,
                "height": 8,
                "clip_score": 0.9,
                "provenance": None,
            }
        ],
        schema=CURATED_SCHEMA,
    )
    storage.write_table(f"{CURATED_DIR}/zzz.parquet", stray)

    assert sorted(loader_uids(root)) == sorted(kept_uids(NEW))
    assert sorted(caption_uids(storage)) == sorted(kept_uids(NEW))
    cfg = run_config(storage, SETTINGS)
    summary = tokenize_stage(storage, cfg, *fake_dvae(), log=lambda m: None)
    assert summary["rows"] == len(kept_uids(NEW))
    assert "stray" not in read_listed_shards(storage, SHARDS_DIR, ["uid"]).column("uid").to_pylist()
    # The next publication removes it.
    publish(storage, NEW)
    assert not storage.exists(f"{CURATED_DIR}/zzz.parquet")


def test_a_listed_file_that_changed_is_refused_by_every_reader(tmp_path):
    root = str(tmp_path / "run")
    storage, cfg = curated_run(root)  # the tokenizer is trained: tokenize reads the shards itself
    first, second = read_manifest(storage, CURATED_DIR)["shards"][:2]
    storage.write_bytes(first["path"], storage.read_bytes(second["path"]))  # same row count, other bytes

    message = "does not match the sha256 in curated/_manifest.json"
    with pytest.raises(ShardError, match=message):
        curated_captions(storage)()
    with pytest.raises(ShardError, match=message):
        loader_uids(root)
    with pytest.raises(ShardError, match=message):
        tokenize_stage(storage, cfg, *fake_dvae(), log=lambda m: None)


# ----- shards/ ----------------------------------------------------------------------------------


class MeanColourCoder:
    """A stand-in dVAE: each 4x4 patch's mean brightness as one of 16 codes (2x2 grid)."""

    cfg = SimpleNamespace(image_size=8, codebook_size=16, grid=2)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return (F.avg_pool2d(images, 4).mean(dim=1) * 15).round().long()


def fake_dvae() -> tuple[MeanColourCoder, dict]:
    identity = {"uri": "memory://dvae", "step": 1, "weights_sha256": "0" * 64, "codebook_size": 16}
    return MeanColourCoder(), identity


def curated_run(root: str):
    """A run root with the NEW publication and the run's tokenizer trained: ready to tokenize."""
    storage = Storage(root)
    write_stages(storage)
    publish(storage, NEW)
    cfg = run_config(storage, SETTINGS)
    tokenizer_for_run(storage, cfg.tokenizer, curated_captions(storage))
    return storage, cfg


def without_run_ids(manifest: dict) -> dict:
    """A shards manifest without its file names (which name the run that wrote each shard)."""
    return {**manifest, "shards": [{k: v for k, v in e.items() if k != "path"} for e in manifest["shards"]]}


def token_uids(storage: Storage) -> list[str]:
    return read_listed_shards(storage, SHARDS_DIR, ["uid"]).column("uid").to_pylist()


def leftovers(storage: Storage) -> tuple[list[str], list[str]]:
    """Unlisted shard files and tokenize claims under shards/."""
    listed = {e["path"] for e in storage.read_json(SHARDS_MANIFEST)["shards"]}
    unlisted = [rel for rel in storage.list(SHARDS_DIR, ".parquet") if rel not in listed]
    return unlisted, storage.list(SHARD_WRITERS_DIR, ".json")


class InterruptedStorage(Storage):
    """A run root that, right after its `at`-th write or delete, runs `meanwhile()` once."""

    def __init__(self, root: str, at: int | None, meanwhile=None):
        super().__init__(root)
        self.at, self.meanwhile, self.steps = at, meanwhile, 0

    def _after_step(self) -> None:
        self.steps += 1
        if self.steps == self.at:
            self.meanwhile()

    def write_bytes(self, rel: str, data: bytes) -> str:
        uri = super().write_bytes(rel, data)
        self._after_step()
        return uri

    def delete(self, rel: str) -> None:
        super().delete(rel)
        self._after_step()


class DiesAtFirstWrite(Storage):
    """A run root on which a run dies as it first writes: after its clean-up, before its claim."""

    def write_bytes(self, rel: str, data: bytes) -> str:
        raise Crash(f"write {rel}")


@pytest.mark.parametrize("b_finishes", [True, False], ids=["b-finishes", "b-dies-after-its-clean-up"])
def test_two_tokenize_runs_at_once_keep_each_others_shards(tmp_path, b_finishes):
    """Run B starts between any two storage steps of run A, and finishes or dies there."""
    storage, cfg = curated_run(str(tmp_path / "template"))
    solo = InterruptedStorage(storage.root, at=None)
    tokenize_stage(solo, cfg, *fake_dvae(), log=lambda m: None)
    curated = sorted(kept_uids(NEW))
    b_died: list[int] = []

    for at in range(1, solo.steps + 1):
        root = str(tmp_path / f"b-after-step-{at}")
        storage, cfg = curated_run(root)
        b = {"new_rows": 0, "shards": []}

        def run_b(root=root, cfg=cfg, b=b, at=at):
            if b_finishes:
                b.update(tokenize_stage(Storage(root), cfg, *fake_dvae(), log=lambda m: None))
                b["shards"] = Storage(root).read_json(SHARDS_MANIFEST)["shards"]
            else:
                try:  # a run with nothing left to write finishes without a write
                    tokenize_stage(DiesAtFirstWrite(root), cfg, *fake_dvae(), log=lambda m: None)
                except Crash:
                    b_died.append(at)
            b["ran"] = True

        a = tokenize_stage(InterruptedStorage(root, at, run_b), cfg, *fake_dvae(), log=lambda m: None)

        assert b.get("ran"), f"run B did not start after step {at} of run A"
        assert_listed_files_are_whole(storage, SHARDS_DIR)
        final = storage.read_json(SHARDS_MANIFEST)["shards"]
        assert all(entry in final for entry in b["shards"]), f"after step {at}: run A dropped run B's shards"
        assert sorted(token_uids(storage)) == curated, f"after step {at}: rows lost or tokenized twice"
        assert a["new_rows"] + b["new_rows"] == len(curated)
        assert leftovers(storage) == ([], []), f"after step {at}"
    assert b_finishes or b_died, "run B never had anything to write"


class StaleManifestWrite(Storage):
    """A run root where, right after the `at`-th manifest write, another run writes back the manifest
    it read before (as a concurrent read-modify-write that lost the race would)."""

    def __init__(self, root: str, at: int):
        super().__init__(root)
        self.at, self.writes = at, 0

    def write_bytes(self, rel: str, data: bytes) -> str:
        before = self.read_bytes(rel) if rel == SHARDS_MANIFEST and self.exists(rel) else None
        uri = super().write_bytes(rel, data)
        if rel == SHARDS_MANIFEST:
            self.writes += 1
            if self.writes == self.at and before is not None:
                super().write_bytes(rel, before)
        return uri


def test_a_shard_whose_listing_a_concurrent_write_replaced_is_listed_again(tmp_path):
    curated = sorted(kept_uids(NEW))
    for at in range(1, 6):
        storage, cfg = curated_run(str(tmp_path / f"replaced-{at}"))
        summary = tokenize_stage(StaleManifestWrite(storage.root, at), cfg, *fake_dvae(), log=lambda m: None)
        assert_listed_files_are_whole(storage, SHARDS_DIR)
        assert sorted(token_uids(storage)) == curated, f"manifest write {at}"
        assert summary["new_rows"] == len(curated)
        assert leftovers(storage) == ([], [])


def test_a_crash_anywhere_in_tokenize_leaves_whole_shards_and_a_rerun_finishes(tmp_path):
    reference, cfg = curated_run(str(tmp_path / "uninterrupted"))
    counting = DyingStorage(reference.root)
    tokenize_stage(counting, cfg, *fake_dvae(), log=lambda m: None)
    want = without_run_ids(reference.read_json(SHARDS_MANIFEST))

    for dies_at in range(1, len(counting.steps) + 1):
        storage, cfg = curated_run(str(tmp_path / f"dies-at-{dies_at}"))
        with pytest.raises(Crash):
            tokenize_stage(DyingStorage(storage.root, dies_at), cfg, *fake_dvae(), log=lambda m: None)
        if storage.exists(SHARDS_MANIFEST):
            assert_listed_files_are_whole(storage, SHARDS_DIR)

        tokenize_stage(storage, cfg, *fake_dvae(), log=lambda m: None)
        assert without_run_ids(storage.read_json(SHARDS_MANIFEST)) == want, f"died at step {dies_at}"
        # What the dead run wrote but never listed stays while its claim could belong to a live run,
        # and goes with the first run after the claim expired.
        unlisted, claims = leftovers(storage)
        assert len(claims) <= 1 and set(unlisted) <= set(
            storage.read_json(claims[0])["files"] if claims else []
        ), f"died at step {dies_at}"
        for claim in claims:
            storage.write_json(claim, {**storage.read_json(claim), "expires": 0})
        assert tokenize_stage(storage, cfg, *fake_dvae(), log=lambda m: None)["new_rows"] == 0
        assert without_run_ids(storage.read_json(SHARDS_MANIFEST)) == want, f"died at step {dies_at}"
        assert leftovers(storage) == ([], []), f"died at step {dies_at}"
