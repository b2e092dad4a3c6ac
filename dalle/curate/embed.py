"""CLIP vectors of image-caption pairs, stored under {root}/embeddings/ keyed by uid.

Each part file carries the identity of the CLIP that made it (schema metadata). A re-run
with the same CLIP embeds only the uids it has not stored yet and adds one part for them;
parts made by another CLIP are ignored, never mixed in and never deleted. The stage in one
process adds a numbered part (part-NNNNN.parquet); a raw shard embedded on its own (`embed_shard`,
a Dask worker's unit of work) adds a part named after its CLIP and shard, then its uids
(shard-<sha16>-<sha16>.parquet), so that workers writing at once never pick the same name, a retried
shard rewrites the same file, and a shard looks for its stored vectors in the numbered parts and
its own, not in every other shard's.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dalle.config import RunConfig
from dalle.curate.fates import IMAGE_CHUNK_ROWS, PASS, fate_record, iter_images, passing_rows, passing_table
from dalle.curate.filters import clip_decision, clip_score_cutoff
from dalle.runroot import EMBEDDINGS_DIR, SCORES_TABLE
from dalle.schemas import SCORE_DECISIONS_SCHEMA, SchemaError, check_schema, embeddings_schema
from dalle.storage import Storage

CLIP_MODEL_KEY = b"dalle.clip_model"


class ClipEncoder(Protocol):
    """What curation needs of a CLIP (dalle.models.clip.ClipEncoder is one); given to the stages, so
    that curation does not depend on where the CLIP comes from."""

    identity: str  # names the weights exactly: vectors of different CLIPs are never mixed
    embed_dim: int

    def encode_images(
        self, images: Sequence[PIL.Image.Image], batch_size: int | None = None
    ) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray: ...

    def encode_image_tokens(
        self, images: Sequence[PIL.Image.Image], batch_size: int | None = None
    ) -> np.ndarray: ...


_PART_NAME = re.compile(r"part-(\d+)\.parquet$")
_SHARD_PART_NAME = re.compile(r"shard-([0-9a-f]{16})-[0-9a-f]{16}\.parquet$")

# Where embed_stage takes the images it embeds: a sequence (one per uid), or a function that, given the
# indices of the uids it needs, yields their images in that order, in chunks (so that a run's images
# are never all in memory: score_stage streams them from raw/ with fates.iter_images).
ImageChunks = Callable[[list[int]], Iterable[Sequence[bytes]]]
Images = Sequence[bytes] | ImageChunks


def _decode(data: bytes, label: str) -> PIL.Image.Image:
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (PIL.UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"{label} cannot be decoded as an image: {err}") from None


def _embed(
    clip: ClipEncoder,
    chunks: Iterable[Sequence[bytes]],
    captions: Sequence[str],
    batch_size: int,
    labels: Sequence[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings of the images that `chunks` yields (of any sizes: they are encoded in batches of
    `batch_size` in their order, the same batches whatever the chunks) and of their captions."""
    image_emb = np.zeros((len(captions), clip.embed_dim), dtype=np.float32)
    done = 0
    decoded: list[PIL.Image.Image] = []  # only a batch of decoded images is ever in memory

    def encode() -> None:
        nonlocal done
        image_emb[done : done + len(decoded)] = clip.encode_images(decoded, batch_size)
        done += len(decoded)
        decoded.clear()

    for chunk in chunks:
        if done + len(decoded) + len(chunk) > len(captions):
            raise ValueError(f"got more images than the {len(captions)} captions; pass one caption per image")
        for data in chunk:
            decoded.append(_decode(data, labels[done + len(decoded)]))
            if len(decoded) == batch_size:
                encode()
    if decoded:
        encode()
    if done != len(captions):
        raise ValueError(f"got {done} images but {len(captions)} captions; pass one caption per image")
    text_emb = clip.encode_texts(list(captions), batch_size)
    return image_emb, text_emb, np.einsum("nd,nd->n", image_emb, text_emb).astype(np.float32)


def embed_pairs(
    clip: ClipEncoder, images: Sequence[bytes], captions: Sequence[str], batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image vectors, caption vectors, clip_score) of encoded images and their captions; vectors are unit-norm."""
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions; pass one caption per image")
    return _embed(clip, [images], captions, batch_size, [f"image {i}" for i in range(len(images))])


def tagged_schema(clip: ClipEncoder) -> pa.Schema:
    """`embeddings_schema` for this CLIP, tagged with its identity."""
    schema = embeddings_schema(clip.embed_dim)
    return schema.with_metadata({**schema.metadata, CLIP_MODEL_KEY: clip.identity.encode()})


def vectors(table: pa.Table, column: str = "image_embedding") -> np.ndarray:
    """A fixed-size-list column of an embeddings table as an (N, dim) float32 array."""
    values = table.column(column).combine_chunks()
    dim = values.type.list_size
    return np.asarray(values.flatten(), dtype=np.float32).reshape(len(values), dim)


def _to_table(schema: pa.Schema, uids: Sequence[str], image_emb, text_emb, clip_score) -> pa.Table:
    dim = image_emb.shape[1]

    def fixed(matrix: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), dim)

    return pa.Table.from_arrays(
        [pa.array(uids, pa.string()), fixed(image_emb), fixed(text_emb), pa.array(clip_score, pa.float32())],
        schema=schema,
    )


def _read_stored(
    storage: Storage, wanted: set[str], schema: pa.Schema, scope: str | None = None
) -> list[pa.Table]:
    """Rows of `wanted` uids from parts tagged with the same CLIP, reading only the row groups that hold
    them; with a `scope` (_scope_key), only from the numbered parts and that scope's."""
    identity = schema.metadata[CLIP_MODEL_KEY]
    found: list[pa.Table] = []
    remaining = set(wanted)
    for rel in storage.list(EMBEDDINGS_DIR, ".parquet"):
        if not remaining:
            break
        shard_part = _SHARD_PART_NAME.search(rel)
        if not (_PART_NAME.search(rel) or (shard_part and scope in (None, shard_part.group(1)))):
            continue
        with storage.fs.open(storage.path(rel), "rb") as handle:
            part = pq.ParquetFile(handle)
            stored_schema = part.schema_arrow
            if (stored_schema.metadata or {}).get(CLIP_MODEL_KEY) != identity:
                continue
            check_schema(stored_schema, schema, storage.uri(rel))
            if stored_schema.field("image_embedding").type != schema.field("image_embedding").type:
                raise SchemaError(
                    f"{storage.uri(rel)} holds {stored_schema.field('image_embedding').type} vectors but its CLIP "
                    f"makes {schema.field('image_embedding').type}; delete the part"
                )
            value_set = pa.array(sorted(remaining), pa.string())
            hits = pc.is_in(part.read(columns=["uid"]).column("uid"), value_set=value_set).to_numpy(
                zero_copy_only=False
            )
            if not hits.any():
                continue
            bounds = np.cumsum(
                [0] + [part.metadata.row_group(i).num_rows for i in range(part.num_row_groups)]
            )
            groups = [i for i in range(part.num_row_groups) if hits[bounds[i] : bounds[i + 1]].any()]
            rows = part.read_row_groups(groups, columns=schema.names)
        rows = rows.filter(pc.is_in(rows.column("uid"), value_set=value_set))
        # A uid stored twice (two writers racing) is taken once, from the first part.
        _, first = np.unique(rows.column("uid").to_numpy(zero_copy_only=False), return_index=True)
        rows = rows.take(np.sort(first))
        remaining -= set(rows.column("uid").to_pylist())
        found.append(rows.cast(schema))
    return found


def _next_part(storage: Storage) -> str:
    numbers = [
        int(m.group(1)) for rel in storage.list(EMBEDDINGS_DIR, ".parquet") if (m := _PART_NAME.search(rel))
    ]
    return f"{EMBEDDINGS_DIR}/part-{max(numbers, default=-1) + 1:05d}.parquet"


def _scope_key(clip: ClipEncoder, scope: str) -> str:
    return hashlib.sha256(f"{clip.identity}\n{scope}".encode()).hexdigest()[:16]


def _scope_part(scope_key: str, uids: Sequence[str]) -> str:
    """A part named after its scope (CLIP and shard) and uids: writers at once never share a name, a
    rewrite of the same vectors keeps it."""
    digest = hashlib.sha256("\n".join(uids).encode())
    return f"{EMBEDDINGS_DIR}/shard-{scope_key}-{digest.hexdigest()[:16]}.parquet"


def embed_stage(
    storage: Storage,
    uids: Sequence[str],
    images: Images,
    captions: Sequence[str],
    clip: ClipEncoder,
    batch_size: int,
    part_scope: str | None = None,
) -> pa.Table:
    """Embeddings of `uids` in the given order, embedding (and storing, as one new part) only those not
    yet stored for this CLIP. `images`: one per uid, or a function that yields those of given indices
    (ImageChunks), so that only the images to embed are read, a chunk at a time. `part_scope`, for
    writers that run at once, one per scope (embed_shard: the raw shard's path): the new part is named
    after the CLIP, the scope and its uids instead of numbered, and stored vectors are looked for only
    in the numbered parts and the scope's own."""
    if not len(uids) == len(captions) or not (callable(images) or len(images) == len(uids)):
        raise ValueError(
            f"embed_stage needs one image and one caption per uid, got {len(uids)} uids, "
            f"{'images from a function' if callable(images) else len(images)} and {len(captions)} captions"
        )
    schema = tagged_schema(clip)
    first_index = {}
    for i, uid in enumerate(uids):
        first_index.setdefault(uid, i)
    scope = None if part_scope is None else _scope_key(clip, part_scope)
    tables = _read_stored(storage, set(first_index), schema, scope)
    stored = {uid for table in tables for uid in table.column("uid").to_pylist()}

    missing = [i for uid, i in first_index.items() if uid not in stored]
    if missing:
        new_uids = [uids[i] for i in missing]
        if callable(images):
            chunks = images(missing)
        else:
            chunks = (
                [images[i] for i in missing[start : start + IMAGE_CHUNK_ROWS]]
                for start in range(0, len(missing), IMAGE_CHUNK_ROWS)
            )
        image_emb, text_emb, clip_score = _embed(
            clip,
            chunks,
            [captions[i] for i in missing],
            batch_size,
            [f"image of uid {uid}" for uid in new_uids],
        )
        new = _to_table(schema, new_uids, image_emb, text_emb, clip_score)
        storage.write_table(_next_part(storage) if scope is None else _scope_part(scope, new_uids), new)
        tables.append(new)

    if not tables:
        return schema.empty_table()
    combined = pa.concat_tables(tables)
    position = {uid: i for i, uid in enumerate(combined.column("uid").to_pylist())}
    return combined.take(pa.array([position[uid] for uid in uids], pa.int64()))


# --- the stage: CLIP scores and the CLIP-score filter ------------------------------------------
def _embed_rows(
    storage: Storage, rows: list[dict], clip: ClipEncoder, batch_size: int, part_scope: str | None = None
) -> pa.Table:
    def images(indices: list[int]) -> Iterable[list[bytes]]:
        # Streamed from raw/ a chunk at a time, only for the pairs not embedded yet.
        return (chunk for _, chunk in iter_images(storage, [rows[i] for i in indices]))

    uids, captions = [r["uid"] for r in rows], [r["caption"] for r in rows]
    return embed_stage(storage, uids, images, captions, clip, batch_size, part_scope=part_scope)


def shards_to_embed(storage: Storage) -> list[str]:
    """The raw shards that hold pairs which passed the rule filters, in the order the stage meets them."""
    return list(dict.fromkeys(passing_table(storage, ["raw_shard"]).column("raw_shard").to_pylist()))


def embed_shard(storage: Storage, cfg: RunConfig, clip: ClipEncoder, rel: str) -> int:
    """Embed the passing pairs of the raw shard `rel` that this CLIP has not stored yet, as one part of
    their own written whole or not at all; returns how many pairs the shard has. The unit of work a Dask
    worker takes (orchestration.dask_address): it needs the run root, the CLIP and the shard's path.
    `score_stage` afterwards finds every vector stored and only reads them."""
    table = passing_table(
        storage, ["uid", "caption", "raw_shard", "raw_key"]
    )  # what embedding reads of a row
    rows = table.filter(pc.equal(table.column("raw_shard"), rel)).to_pylist()
    _embed_rows(storage, rows, clip, cfg.clip.batch_size, part_scope=rel)
    return len(rows)


def score_stage(storage: Storage, cfg: RunConfig, clip: ClipEncoder) -> dict[str, int]:
    """Embed the passing pairs (cached by uid under embeddings/; every one of them, when `embed_shard`
    ran for each of `shards_to_embed` first) and apply the CLIP-score filter."""
    rows = passing_rows(storage)
    table = _embed_rows(storage, rows, clip, cfg.clip.batch_size)
    scores = table.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float32)
    cutoff = clip_score_cutoff(scores, cfg.filter)
    out = []
    for row, score in zip(rows, scores):
        decision = clip_decision(float(score), cutoff)
        fate = (
            fate_record(PASS)
            if decision is None
            else fate_record("filtered", decision.reason, decision.detail, decision.value, decision.threshold)
        )
        out.append({"uid": row["uid"], **fate, "clip_score": float(score)})
    storage.write_table(SCORES_TABLE, pa.Table.from_pylist(out, schema=SCORE_DECISIONS_SCHEMA))
    return dict(Counter(r["fate"] for r in out))
