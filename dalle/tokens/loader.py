"""Batches from Parquet shards for training: seeded, split over ranks and workers, resumable.

Manifests. A shard folder (`curated/`, `shards/`) is read only through its `_manifest.json`:
`read_manifest`, `read_listed_shard` and `read_listed_shards` are how every stage reads one, so
a file the manifest does not list is never opened, and a listed file must exist and match the
listed sha256 and row count.

Order. Epoch e visits the manifest's shards in a permutation seeded by (seed, e); the
rows of shard s are permuted by (seed, e, s).

Split. With G = world_size * num_workers global workers (num_workers 0 counts as one),
global worker g = rank * num_workers + worker takes rows [g::G] of each shard's
permuted rows, so even a single shard splits evenly and no row goes to two workers.
Each worker batches its own stream; a batch may span two shards or two epochs. The
stream never ends, so every rank always has a next batch and DDP cannot hang on one
rank running dry.

Resume. `start_batch` is the number of batches this rank has consumed (what a checkpoint
records). A DataLoader with W workers hands batch k to worker k % W, so a worker works out
which of the first `start_batch` batches were its own and skips their rows arithmetically
from the manifest's row counts: whole epochs and whole shards are jumped over unread, and
only the shard where it resumes is opened. Resuming reproduces the uninterrupted stream
only with the same world_size, num_workers, batch_size and seed.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dalle.runroot import CURATED_DIR, MANIFEST, SHARDS_DIR
from dalle.schemas import CURATED_SCHEMA, SCHEMA_VERSION, SchemaError, check_schema, token_shard_schema
from dalle.storage import Storage, StorageError

# The command that (re)writes each shard folder, named in error messages.
_PRODUCER = {SHARDS_DIR: "dalle tokenize", CURATED_DIR: "dalle curate"}

# Keys of the seeded permutations: the third entry keeps shard-order and row-order streams apart.
_SHARD_ORDER, _ROW_ORDER = 0, 1


class ShardError(StorageError):
    """A shard folder that is missing, disagrees with its manifest, or is too small for the split."""


def _producer(shard_dir: str) -> str:
    return _PRODUCER.get(shard_dir, "the stage that writes it")


def read_manifest(storage: Storage, shard_dir: str) -> dict:
    """`{shard_dir}/_manifest.json`, refused unless it exists, has this release's schema version and
    its shards add up to its row count."""
    rel = f"{shard_dir}/{MANIFEST}"
    producer = _producer(shard_dir)
    if not storage.exists(rel):
        raise ShardError(f"no {MANIFEST} under {storage.uri(shard_dir)}; run `{producer}` first")
    manifest = storage.read_json(rel)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"{storage.uri(rel)} has schema version {version}, this release reads {SCHEMA_VERSION}; "
            f"re-run `{producer}`"
        )
    listed = sum(int(entry["rows"]) for entry in manifest.get("shards") or [])
    if "rows" in manifest and int(manifest["rows"]) != listed:
        raise ShardError(
            f"{storage.uri(rel)} says {manifest['rows']} rows but its shards add up to {listed}; "
            f"re-run `{producer}`"
        )
    return manifest


def read_listed_shard(
    storage: Storage, shard_dir: str, entry: dict, columns: list[str] | None = None
) -> pa.Table:
    """One shard as its manifest entry (path, rows, sha256) lists it; refused when the file is
    missing or its bytes or row count differ from the entry."""
    rel = entry["path"]
    origin = storage.uri(rel)
    producer = _producer(shard_dir)
    try:
        data = storage.read_bytes(rel)
    except (FileNotFoundError, StorageError):
        raise ShardError(
            f"{origin} is listed in {shard_dir}/{MANIFEST} but does not exist: either `{producer}` published "
            f"the folder again since this command read the manifest (run this command again) or the file "
            f"was deleted (re-run `{producer}`)"
        ) from None
    expected_sha = entry.get("sha256")
    if expected_sha and hashlib.sha256(data).hexdigest() != expected_sha:
        raise ShardError(
            f"{origin} does not match the sha256 in {shard_dir}/{MANIFEST}: the file was changed or damaged "
            f"after it was listed; re-run `{producer}`"
        )
    table = pq.read_table(pa.BufferReader(data), columns=columns)
    if table.num_rows != int(entry["rows"]):
        raise ShardError(
            f"{rel} has {table.num_rows} rows, its manifest says {entry['rows']}; re-run `{producer}`"
        )
    return table


def read_listed_shards(storage: Storage, shard_dir: str, columns: list[str] | None = None) -> pa.Table | None:
    """Every shard `{shard_dir}/_manifest.json` lists, in its order, concatenated; None when it lists none."""
    tables = [
        read_listed_shard(storage, shard_dir, e, columns) for e in read_manifest(storage, shard_dir)["shards"]
    ]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def _expected_schema(shard_dir: str, file_schema: pa.Schema | None) -> pa.Schema:
    """The schema a shard under `shard_dir` must have. The code count of token shards is a property
    of the dVAE, not of the loader, so it is taken from the shard itself; the decode checks it."""
    if shard_dir == CURATED_DIR:
        return CURATED_SCHEMA
    num_codes = 1
    if file_schema is not None and "image_codes" in file_schema.names:
        codes_type = file_schema.field("image_codes").type
        num_codes = getattr(codes_type, "list_size", 1)
    return token_shard_schema(num_codes)


class ShardDataset(IterableDataset):
    """An endless stream of batches (whatever `decode` makes of `batch_size` rows) from the shards
    under `{root}/{shard_dir}`, in a seeded order, split over DDP ranks and DataLoader workers.

    `decode` turns a pyarrow table of exactly `batch_size` rows into a dict of tensors (lists of
    str are allowed too); it must be picklable for spawned workers. `columns` limits what is read;
    by default the decode's own `columns` attribute, else every column. Each shard's schema is
    checked on first read against the schema of its folder (token shards under `shards/`, curated
    pairs under `curated/`) or against `expected_schema` for any other folder.
    """

    def __init__(
        self,
        root: str,
        shard_dir: str,
        decode: Callable[[pa.Table], dict[str, Any]],
        batch_size: int,
        seed: int = 0,
        start_batch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        columns: list[str] | None = None,
        expected_schema: pa.Schema | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if seed < 0 or start_batch < 0:
            raise ValueError(f"seed and start_batch must not be negative, got {seed} and {start_batch}")
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = (
            world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        )
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        if expected_schema is None and shard_dir not in (SHARDS_DIR, CURATED_DIR):
            raise ValueError(f"no known schema for shard folder {shard_dir!r}; pass expected_schema")

        self.shard_dir = shard_dir.strip("/")
        self.decode = decode
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = start_batch
        self.expected_schema = expected_schema
        chosen = columns if columns is not None else getattr(decode, "columns", None)
        self.columns = list(chosen) if chosen is not None else None
        if self.columns is not None:
            known = (expected_schema or _expected_schema(self.shard_dir, None)).names
            unknown = [c for c in self.columns if c not in known]
            if unknown:
                raise SchemaError(
                    f"columns {unknown} are not in {self.shard_dir} shards; columns are {known}"
                )

        storage = Storage(root)
        self.root = storage.root
        self.shards, self.rows = self._read_manifest(storage)
        self.num_rows = sum(self.rows)
        self.check_split(0)

    # ----- manifest and split arithmetic

    def _read_manifest(self, storage: Storage) -> tuple[list[dict], list[int]]:
        shards = read_manifest(storage, self.shard_dir).get("shards") or []
        rows = [int(entry["rows"]) for entry in shards]
        if sum(rows) == 0:
            raise ShardError(
                f"{storage.uri(self.shard_dir)} holds no rows ({len(shards)} shards in its manifest); "
                f"nothing to train on: run `{_producer(self.shard_dir)}` on a data set with kept pairs"
            )
        return shards, rows

    def _shares(self, g: int, num_global: int) -> list[int]:
        """Rows of each shard (manifest order) that global worker g of num_global takes per epoch."""
        return [max(0, (rows - g + num_global - 1) // num_global) for rows in self.rows]

    def check_split(self, num_workers: int) -> None:
        """Raise ShardError unless every global worker gets at least one whole batch per epoch."""
        workers = max(1, num_workers)
        num_global = self.world_size * workers
        smallest = sum(self._shares(num_global - 1, num_global))  # shares shrink as g grows
        if smallest < self.batch_size:
            raise ShardError(
                f"{self.root}/{self.shard_dir} has {self.num_rows} rows in {len(self.rows)} shards, too few "
                f"for {self.world_size} ranks x {workers} loader workers at batch size {self.batch_size}: "
                f"the smallest share is {smallest} rows per epoch and a batch needs {self.batch_size} "
                f"(at least {num_global * self.batch_size} rows); use fewer workers, a smaller batch or more data"
            )

    def _shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, _SHARD_ORDER]).permutation(len(self.rows))

    def _row_order(self, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, _ROW_ORDER, shard]).permutation(self.rows[shard])

    # ----- reading

    def _read_shard(self, storage: Storage, shard: int, checked: set[int]) -> pa.Table:
        table = read_listed_shard(storage, self.shard_dir, self.shards[shard], self.columns)
        if shard not in checked:
            origin = storage.uri(self.shards[shard]["path"])
            expected = self.expected_schema or _expected_schema(self.shard_dir, table.schema)
            if self.columns is not None:
                expected = pa.schema([expected.field(c) for c in self.columns], metadata=expected.metadata)
            check_schema(table, expected, origin)
            for field in expected:
                actual = table.schema.field(field.name).type
                if actual != field.type:
                    raise SchemaError(f"{origin}: column {field.name} is {actual}, expected {field.type}")
            checked.add(shard)
        return table

    def _pieces(self, storage: Storage, g: int, num_global: int, skip_rows: int) -> Iterator[pa.Table]:
        """Global worker g's rows, shard by shard and epoch after epoch, after its first skip_rows."""
        shares = self._shares(g, num_global)
        epoch, offset = divmod(skip_rows, sum(shares))
        checked: set[int] = set()
        while True:
            for shard in self._shard_order(epoch):
                if offset >= shares[shard]:  # a whole share skipped (or empty): its shard is never opened
                    offset -= shares[shard]
                    continue
                table = self._read_shard(storage, int(shard), checked)
                mine = self._row_order(epoch, int(shard))[g::num_global][offset:]
                offset = 0
                yield table.take(mine)
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        self.check_split(workers)
        # The loader's first batch comes from worker 0 but must be batch `start_batch` of the
        # uninterrupted run, made there by worker start_batch % W: rotate the roles accordingly.
        role = (worker + self.start_batch) % workers
        num_global = self.world_size * workers
        g = self.rank * workers + role
        done = max(
            0, (self.start_batch - role + workers - 1) // workers
        )  # batches k < start_batch, k % W == role
        storage = Storage(self.root)  # opened here, inside the worker process, never pickled
        pending: list[pa.Table] = []
        have = 0
        for piece in self._pieces(storage, g, num_global, done * self.batch_size):
            pending.append(piece)
            have += piece.num_rows
            while have >= self.batch_size:
                rows = pa.concat_tables(pending)
                yield self.decode(rows.slice(0, self.batch_size))
                pending = [rows.slice(self.batch_size)]
                have -= self.batch_size

    def __repr__(self) -> str:
        return (
            f"ShardDataset({self.root}/{self.shard_dir}, {self.num_rows} rows in {len(self.rows)} shards, "
            f"batch {self.batch_size}, rank {self.rank}/{self.world_size}, seed {self.seed})"
        )


def make_loader(dataset: ShardDataset, num_workers: int = 0) -> DataLoader:
    """A DataLoader over a ShardDataset: the dataset batches, workers split the rows, memory is
    pinned when CUDA is present. Checks in the calling process that the split leaves no worker
    without a whole batch per epoch."""
    dataset.check_split(num_workers)
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )


class TokenBatch:
    """Decode token-shard rows: text_tokens (B, text_seq_len) right-padded with 0 and image_codes
    (B, num_codes), both int64."""

    columns = ("text_tokens", "image_codes")

    def __init__(self, text_seq_len: int):
        if text_seq_len < 1:
            raise ValueError(f"text_seq_len must be at least 1, got {text_seq_len}")
        self.text_seq_len = text_seq_len

    def __call__(self, table: pa.Table) -> dict[str, torch.Tensor]:
        tokens = table.column("text_tokens").combine_chunks()
        lengths = tokens.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        longest = int(lengths.max(initial=0))
        if longest > self.text_seq_len:
            raise ShardError(
                f"a token shard row has {longest} text tokens, more than text_seq_len={self.text_seq_len}; "
                "train with the text_seq_len the shards were tokenized with, or re-run `dalle tokenize`"
            )
        text = np.zeros((len(lengths), self.text_seq_len), dtype=np.int64)
        # Row-major boolean assignment fills each row's first `length` slots, in order.
        text[np.arange(self.text_seq_len)[None, :] < lengths[:, None]] = tokens.flatten().to_numpy()
        codes = table.column("image_codes").combine_chunks()
        image_codes = codes.flatten().to_numpy().astype(np.int64).reshape(len(codes), codes.type.list_size)
        return {"text_tokens": torch.from_numpy(text), "image_codes": torch.from_numpy(image_codes)}


class ImageBatch:
    """Decode curated pairs: "images" float32 (B, 3, S, S) in [0, 1], RGB, centre-cropped to a
    square and resized (bicubic) to image_size; "captions" a list of B str (not a tensor)."""

    columns = ("uid", "image", "caption")

    def __init__(self, image_size: int):
        if image_size < 1:
            raise ValueError(f"image_size must be at least 1, got {image_size}")
        self.image_size = image_size

    def _pixels(self, uid: str, data: bytes) -> np.ndarray:
        side = self.image_size
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.draft("RGB", (side, side))  # JPEG: decode at a reduced scale, still >= side
                image = image.convert("RGB")
                width, height = image.size
                crop = min(width, height)
                left, top = (width - crop) // 2, (height - crop) // 2
                image = image.resize(
                    (side, side), Image.Resampling.BICUBIC, box=(left, top, left + crop, top + crop)
                )
                return np.asarray(image)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ShardError(f"image of {uid} cannot be decoded ({err}); re-run `dalle curate`") from None

    def __call__(self, table: pa.Table) -> dict[str, Any]:
        uids = table.column("uid").to_pylist()
        blobs = table.column("image").to_pylist()
        pixels = np.stack([self._pixels(uid, blob) for uid, blob in zip(uids, blobs)])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().float().div_(255)
        return {"images": images, "captions": table.column("caption").to_pylist()}


__all__ = [
    "ImageBatch",
    "ShardDataset",
    "ShardError",
    "TokenBatch",
    "make_loader",
    "read_listed_shard",
    "read_listed_shards",
    "read_manifest",
]
