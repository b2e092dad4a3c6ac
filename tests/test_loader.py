import hashlib
import io
import itertools
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from dalle.runroot import CURATED_DIR, MANIFEST, SHARDS_DIR
from dalle.schemas import CURATED_SCHEMA, SchemaError, token_shard_schema
from dalle.storage import Storage
from dalle.tokens.loader import ImageBatch, ShardDataset, ShardError, TokenBatch, make_loader

NUM_CODES = 4
TEXT_LEN = 6
SIZES = [23, 17, 30]  # 70 rows; uneven on purpose


def token_rows(first: int, count: int) -> pa.Table:
    """Rows whose uid is their global row number; tokens and codes are derived from it."""
    rows = range(first, first + count)
    return pa.table(
        {
            "uid": [f"{r:05d}" for r in rows],
            "caption": [f"caption {r}" for r in rows],
            "text_tokens": [[r + 1] * (1 + r % TEXT_LEN) for r in rows],
            "image_codes": [[r + i for i in range(NUM_CODES)] for r in rows],
            "clip_score": [0.5] * count,
        },
        schema=token_shard_schema(NUM_CODES),
    )


def write_manifest(storage: Storage, shard_dir: str, entries: list[tuple[str, int]]) -> None:
    storage.write_json(
        f"{shard_dir}/{MANIFEST}",
        {
            "schema_version": 1,
            "rows": sum(rows for _, rows in entries),
            "shards": [
                {"path": path, "rows": rows, "sha256": hashlib.sha256(storage.read_bytes(path)).hexdigest()}
                for path, rows in entries
            ],
        },
    )


def write_token_shards(root: str, sizes=SIZES) -> list[range]:
    """Token shards of the given sizes plus their manifest; returns each shard's global rows."""
    storage = Storage(root)
    entries, spans, first = [], [], 0
    for index, size in enumerate(sizes):
        path = f"{SHARDS_DIR}/{index:05d}.parquet"
        storage.write_table(path, token_rows(first, size))
        entries.append((path, size))
        spans.append(range(first, first + size))
        first += size
    write_manifest(storage, SHARDS_DIR, entries)
    return spans


class RowIds:
    """A decode that returns which rows a batch holds (their uids are row numbers)."""

    columns = ("uid",)

    def __call__(self, table: pa.Table) -> dict[str, torch.Tensor]:
        return {"rows": torch.tensor([int(uid) for uid in table.column("uid").to_pylist()])}


def batches(source, count: int) -> list[list[int]]:
    return [batch["rows"].tolist() for batch in itertools.islice(iter(source), count)]


def share(rows: int, g: int, num_global: int) -> int:
    return len(range(g, rows, num_global))


@pytest.fixture
def token_root(tmp_path):
    root = str(tmp_path / "run")
    write_token_shards(root)
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_the_uninterrupted_stream(token_root, num_workers):
    def loader(start_batch):
        dataset = ShardDataset(
            token_root, SHARDS_DIR, RowIds(), batch_size=4, seed=3, start_batch=start_batch
        )
        return make_loader(dataset, num_workers=num_workers)

    reference = batches(loader(0), 45)  # about two and a half epochs
    for k in (1, 5, 18, 37):  # mid-epoch, across shard and epoch boundaries
        assert batches(loader(k), 6) == reference[k : k + 6], f"resume at batch {k}"


def test_one_epoch_over_ranks_and_workers_covers_every_row_once(token_root):
    world_size, workers = 2, 2
    num_global = world_size * workers
    seen = []
    for rank in range(world_size):
        dataset = ShardDataset(
            token_root, SHARDS_DIR, RowIds(), batch_size=4, rank=rank, world_size=world_size
        )
        stream = batches(make_loader(dataset, num_workers=workers), 12)
        for role in range(workers):
            g = rank * workers + role
            rows = [row for batch in stream[role::workers] for row in batch]  # batch k is worker k % W's
            epoch_rows = sum(share(size, g, num_global) for size in SIZES)
            seen.extend(rows[:epoch_rows])
    assert sorted(seen) == list(range(sum(SIZES)))


def test_one_worker_reads_each_listed_shard_whole_in_a_seeded_order(tmp_path):
    root = str(tmp_path / "run")
    spans = write_token_shards(root)
    # A shard the manifest does not list is never read.
    Storage(root).write_table(f"{SHARDS_DIR}/00099.parquet", token_rows(1000, 8))

    def shard_of(row):
        return next(index for index, span in enumerate(spans) if row in span)

    orders = set()
    for seed in range(6):
        dataset = ShardDataset(root, SHARDS_DIR, RowIds(), batch_size=5, seed=seed)
        rows = [row for batch in batches(dataset, 14) for row in batch]  # the epoch's 70 rows exactly
        assert sorted(rows) == list(range(70))
        visits = [shard for shard, _ in itertools.groupby(shard_of(row) for row in rows)]
        assert sorted(visits) == [0, 1, 2], "each shard is read in one piece per epoch"
        orders.add(tuple(visits))
    assert len(orders) > 1, "the shard order depends on the seed"


def test_seed_fixes_the_order_and_epochs_reshuffle(token_root):
    def stream(seed):
        return batches(ShardDataset(token_root, SHARDS_DIR, RowIds(), batch_size=7, seed=seed), 20)

    assert stream(0) == stream(0)
    assert stream(0) != stream(1)
    epoch0, epoch1 = stream(0)[:10], stream(0)[10:]  # 70 rows = 10 batches of 7
    for epoch in (epoch0, epoch1):
        assert sorted(itertools.chain.from_iterable(epoch)) == list(range(70))
    assert epoch0 != epoch1


def test_resume_opens_only_the_shard_where_it_resumes(tmp_path, monkeypatch):
    root = str(tmp_path / "run")
    spans = write_token_shards(root, sizes=[20] * 6)  # 120 rows: 30 batches of 4 per epoch
    start = 2 * 30 + 7  # third epoch, row 28 of it: inside its second shard
    reference = batches(ShardDataset(root, SHARDS_DIR, RowIds(), batch_size=4), start + 1)[start]

    reads = []
    original = Storage.read_bytes

    def counting_read_bytes(self, rel):
        if rel.endswith(".parquet"):
            reads.append(rel)
        return original(self, rel)

    monkeypatch.setattr(Storage, "read_bytes", counting_read_bytes)
    resumed = batches(ShardDataset(root, SHARDS_DIR, RowIds(), batch_size=4, start_batch=start), 1)
    assert resumed == [reference]
    shard = next(index for index, span in enumerate(spans) if reference[0] in span)
    assert reads == [f"{SHARDS_DIR}/{shard:05d}.parquet"]


def test_dataset_pickles_for_spawned_workers(token_root):
    dataset = ShardDataset(token_root, SHARDS_DIR, TokenBatch(TEXT_LEN), batch_size=4, seed=1, start_batch=3)
    clone = pickle.loads(pickle.dumps(dataset))
    for a, b in zip(itertools.islice(iter(dataset), 3), itertools.islice(iter(clone), 3)):
        assert torch.equal(a["text_tokens"], b["text_tokens"])
        assert torch.equal(a["image_codes"], b["image_codes"])


def test_token_batches_over_s3_and_local(run_root):
    write_token_shards(run_root, sizes=[12, 9])

    def loader(start_batch):
        dataset = ShardDataset(
            run_root, SHARDS_DIR, TokenBatch(TEXT_LEN), batch_size=3, start_batch=start_batch
        )
        return make_loader(dataset, num_workers=2)

    reference = list(itertools.islice(iter(loader(0)), 6))
    resumed = list(itertools.islice(iter(loader(2)), 4))
    for got, want in zip(resumed, reference[2:]):
        assert torch.equal(got["image_codes"], want["image_codes"])
        assert torch.equal(got["text_tokens"], want["text_tokens"])
    batch = reference[0]
    assert batch["text_tokens"].shape == (3, TEXT_LEN) and batch["text_tokens"].dtype == torch.int64
    assert batch["image_codes"].shape == (3, NUM_CODES) and batch["image_codes"].dtype == torch.int64


def test_token_batch_pads_text_and_keeps_codes():
    table = token_rows(0, 8).slice(3, 4)  # a slice, as a batch that starts mid-table is
    batch = TokenBatch(TEXT_LEN)(table)
    for i, row in enumerate(range(3, 7)):
        length = 1 + row % TEXT_LEN
        assert batch["text_tokens"][i].tolist() == [row + 1] * length + [0] * (TEXT_LEN - length)
        assert batch["image_codes"][i].tolist() == [row + j for j in range(NUM_CODES)]


def test_token_batch_refuses_text_longer_than_the_model_takes():
    with pytest.raises(ShardError, match="6 text tokens, more than text_seq_len=4"):
        TokenBatch(4)(token_rows(0, 6))


def test_missing_manifest_says_what_to_run(tmp_path):
    with pytest.raises(ShardError, match=r"no _manifest.json under .*shards; run `dalle tokenize` first"):
        ShardDataset(str(tmp_path), SHARDS_DIR, RowIds(), batch_size=2)


def test_shard_that_disagrees_with_its_manifest_is_named(tmp_path):
    root = str(tmp_path / "run")
    storage = Storage(root)
    storage.write_table(f"{SHARDS_DIR}/00000.parquet", token_rows(0, 10))
    storage.write_table(f"{SHARDS_DIR}/00001.parquet", token_rows(10, 10))
    write_manifest(
        storage, SHARDS_DIR, [(f"{SHARDS_DIR}/00000.parquet", 10), (f"{SHARDS_DIR}/00001.parquet", 12)]
    )
    dataset = ShardDataset(root, SHARDS_DIR, RowIds(), batch_size=2)
    message = "shards/00001.parquet has 10 rows, its manifest says 12; re-run `dalle tokenize`"
    with pytest.raises(ShardError, match=message):
        batches(dataset, 11)  # the epoch reads both shards


def test_empty_or_too_small_data_fails_instead_of_hanging(tmp_path):
    root = str(tmp_path / "run")
    write_manifest(Storage(root), SHARDS_DIR, [])
    with pytest.raises(ShardError, match="holds no rows"):
        ShardDataset(root, SHARDS_DIR, RowIds(), batch_size=2)

    small = str(tmp_path / "small")
    write_token_shards(small, sizes=[10])
    # 5 rows each: fits
    dataset = ShardDataset(small, SHARDS_DIR, RowIds(), batch_size=4, rank=0, world_size=2)
    with pytest.raises(ShardError, match="too few for 2 ranks x 2 loader workers at batch size 4"):
        make_loader(dataset, num_workers=2)  # 2 or 3 rows each


def test_shard_of_another_kind_is_refused(tmp_path):
    root = str(tmp_path / "run")
    storage = Storage(root)
    storage.write_table(
        f"{SHARDS_DIR}/00000.parquet", curated_rows(["a", "b"], [png(4, 4, [(0, 0, 255)])] * 2)
    )
    write_manifest(storage, SHARDS_DIR, [(f"{SHARDS_DIR}/00000.parquet", 2)])
    with pytest.raises(SchemaError, match="is not a dalle token_shard table"):
        batches(ShardDataset(root, SHARDS_DIR, RowIds(), batch_size=2), 1)


def png(width: int, height: int, stripes: list[tuple[int, int, int]], vertical: bool = True, mode="RGB"):
    """An image cut into equal stripes of the given colours (left to right, or top to bottom)."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for i, colour in enumerate(stripes):
        if vertical:
            pixels[:, i * width // len(stripes) : (i + 1) * width // len(stripes)] = colour
        else:
            pixels[i * height // len(stripes) : (i + 1) * height // len(stripes), :] = colour
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def curated_rows(uids: list[str], images: list[bytes]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "uid": uid,
                "url": f"http://127.0.0.1/{uid}.png",
                "caption": f"caption of {uid}",
                "image": image,
                "sha256": hashlib.sha256(image).hexdigest(),
                "width": 1,
                "height": 1,
                "clip_score": 0.3,
                "provenance": None,
            }
            for uid, image in zip(uids, images)
        ],
        schema=CURATED_SCHEMA,
    )


def test_image_batches_are_centre_cropped_rgb_in_unit_range(tmp_path):
    root = str(tmp_path / "run")
    storage = Storage(root)
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    wide = png(60, 20, [red, green, blue])  # the centre square is the green third
    tall = png(20, 60, [red, green, blue], vertical=False)
    grey = png(30, 30, [(128, 128, 128)], mode="L")
    storage.write_table(f"{CURATED_DIR}/00000.parquet", curated_rows(["wide", "tall"], [wide, tall]))
    storage.write_table(f"{CURATED_DIR}/00001.parquet", curated_rows(["grey", "wide2"], [grey, wide]))
    write_manifest(
        storage, CURATED_DIR, [(f"{CURATED_DIR}/00000.parquet", 2), (f"{CURATED_DIR}/00001.parquet", 2)]
    )

    dataset = ShardDataset(root, CURATED_DIR, ImageBatch(8), batch_size=4)
    batch = next(iter(make_loader(dataset)))
    images, captions = batch["images"], batch["captions"]
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert sorted(captions) == ["caption of grey", "caption of tall", "caption of wide", "caption of wide2"]
    for image, caption in zip(images, captions):
        centre = image[:, 2:6, 2:6].mean(dim=(1, 2))
        expected = [128 / 255] * 3 if caption.endswith("grey") else [0.0, 1.0, 0.0]
        assert torch.allclose(centre, torch.tensor(expected), atol=0.02), caption


def test_a_shard_changed_after_its_manifest_is_refused(tmp_path):
    root = str(tmp_path / "run")
    write_token_shards(root, sizes=[8, 8])
    storage = Storage(root)
    manifest = storage.read_json(f"{SHARDS_DIR}/_manifest.json")
    other = storage.read_bytes(manifest["shards"][1]["path"])
    storage.write_bytes(manifest["shards"][0]["path"], other)  # same rows, other bytes
    with pytest.raises(ShardError, match="does not match the sha256"):
        next(iter(ShardDataset(root, SHARDS_DIR, TokenBatch(TEXT_LEN), batch_size=4)))
