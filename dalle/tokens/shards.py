"""Curated pairs -> token shards: captions by the run's tokenizer, images by the trained dVAE.

    {root}/shards/NNNNN.parquet   token_shard_schema rows
    {root}/shards/_manifest.json  rows, per-shard sha256, schema version, tokenizer identity,
                                  the dVAE checkpoint that made the codes

The manifest is rewritten after every finished shard, so it always lists exactly the
complete shards. A re-run tokenizes only curated uids that no listed shard holds yet
(new curated data becomes new shards), removes shard files a crash left unlisted, and
refuses to mix codes from another dVAE or tokens from another tokenizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch

from dalle.config import RunConfig
from dalle.errors import UserError
from dalle.runroot import CURATED_DIR, CURATED_MANIFEST, SHARDS_DIR, SHARDS_MANIFEST
from dalle.schemas import SCHEMA_VERSION, token_shard_schema
from dalle.storage import Storage, parquet_bytes
from dalle.tokens.bpe import tokenizer_for_run
from dalle.tokens.loader import ImageBatch


class ImageCoder(Protocol):
    """What tokenizing needs of a trained dVAE (dalle.models.dvae.DiscreteVAE is one)."""

    cfg: Any  # image_size, codebook_size and grid

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...


class ShardsMismatch(UserError, ValueError):
    """Existing token shards were made with another dVAE, tokenizer or sequence length."""


def curated_captions(storage: Storage) -> Callable[[], list[str]]:
    """A callable returning every curated caption (read only if the tokenizer must be trained)."""

    def read() -> list[str]:
        table = storage.read_tables(CURATED_DIR, columns=["caption"])
        return [] if table is None else table.column("caption").to_pylist()

    return read


def _curated_shards(storage: Storage) -> list[dict]:
    if not storage.exists(CURATED_MANIFEST):
        raise FileNotFoundError(
            f"no curated pairs under {storage.uri(CURATED_DIR)}; run `dalle curate` first"
        )
    return storage.read_json(CURATED_MANIFEST)["shards"]


def _expected_manifest_keys(dvae_identity: dict, tokenizer_identity: str, cfg: RunConfig, grid: int) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "tokenizer": tokenizer_identity,
        "dvae": dvae_identity,
        "text_seq_len": cfg.transformer.text_seq_len,
        "grid": grid,
        "codebook_size": dvae_identity["codebook_size"],
    }


def _check_compatible(existing: dict, expected: dict, uri: str) -> None:
    if existing.get("schema_version") != SCHEMA_VERSION:
        raise ShardsMismatch(
            f"{uri} has schema version {existing.get('schema_version')}, this release writes {SCHEMA_VERSION}; "
            "tokenize into a fresh run root"
        )
    ex_dvae, new_dvae = existing.get("dvae", {}), expected["dvae"]
    if ex_dvae.get("weights_sha256") != new_dvae["weights_sha256"]:
        raise ShardsMismatch(
            f"the shards under {uri} hold codes from the dVAE checkpoint {ex_dvae.get('uri')} "
            f"(step {ex_dvae.get('step')}), but this run would use {new_dvae['uri']} (step {new_dvae['step']}); "
            "codes of two dVAEs must never be mixed: tokenize into another run root, or delete the shards "
            "folder to re-tokenize everything with the new dVAE"
        )
    for key in ("tokenizer", "text_seq_len", "grid", "codebook_size"):
        if existing.get(key) != expected[key]:
            raise ShardsMismatch(
                f"the shards under {uri} were made with {key} = {existing.get(key)!r}, this run has "
                f"{expected[key]!r}; tokenize into another run root or delete the shards folder"
            )


def _trim_padding(row: np.ndarray) -> list[int]:
    nonzero = np.flatnonzero(row)
    return row[: nonzero[-1] + 1].tolist() if len(nonzero) else []


def tokenize_stage(
    storage: Storage,
    cfg: RunConfig,
    dvae: ImageCoder,
    dvae_identity: dict,
    log: Callable[[str], None] = print,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write token shards for every curated pair not tokenized yet; returns a summary with the shards' URI.

    `dvae` encodes the images (on its own device); `dvae_identity` names its checkpoint (uri, step,
    weights_sha256, ...) in the manifest, so that shards of another dVAE are never mixed in.
    `on_progress(done, total)` follows the curated shards read.
    """
    curated = _curated_shards(storage)
    dvae_cfg = dvae.cfg
    grid = dvae_cfg.grid
    device = next(dvae.parameters()).device if hasattr(dvae, "parameters") else torch.device("cpu")
    tokenizer = tokenizer_for_run(storage, cfg.tokenizer, curated_captions(storage))
    expected = _expected_manifest_keys(dvae_identity, tokenizer.identity, cfg, grid)

    if storage.exists(SHARDS_MANIFEST):
        manifest = storage.read_json(SHARDS_MANIFEST)
        _check_compatible(manifest, expected, storage.uri(SHARDS_DIR))
    else:
        manifest = {**expected, "rows": 0, "shards": []}
    listed = {s["path"] for s in manifest["shards"]}
    for rel in storage.list(SHARDS_DIR, ".parquet"):
        if rel not in listed:  # a crash between writing a shard and listing it
            log(f"tokenize: removing unfinished {storage.uri(rel)}")
            storage.delete(rel)

    done: set[str] = set()
    for shard in manifest["shards"]:
        done.update(storage.read_table(shard["path"], columns=["uid"]).column("uid").to_pylist())

    schema = token_shard_schema(grid * grid)
    to_images = ImageBatch(dvae_cfg.image_size)
    rows_per_shard = cfg.tokenize.rows_per_shard
    pending: list[pa.Table] = []
    pending_rows = 0
    new_rows = 0

    def write_shard(table: pa.Table) -> None:
        nonlocal new_rows
        rel = f"{SHARDS_DIR}/{len(manifest['shards']):05d}.parquet"
        tokens = tokenizer.encode_batch(table.column("caption").to_pylist(), cfg.transformer.text_seq_len)
        codes = []
        for start in range(0, table.num_rows, cfg.tokenize.batch_size):
            images = to_images(table.slice(start, cfg.tokenize.batch_size))["images"].to(device)
            with torch.no_grad():
                codes.append(dvae.encode(images).flatten(1).to(torch.int16).cpu().numpy())
        codes_array = np.concatenate(codes)
        out = pa.table(
            {
                "uid": table.column("uid"),
                "caption": table.column("caption"),
                "text_tokens": pa.array([_trim_padding(r) for r in tokens], type=pa.list_(pa.int32())),
                "image_codes": pa.FixedSizeListArray.from_arrays(
                    pa.array(codes_array.reshape(-1)), grid * grid
                ),
                "clip_score": table.column("clip_score").cast(pa.float32()),
            },
            schema=schema,
        )
        data = parquet_bytes(out)
        storage.write_bytes(rel, data)
        manifest["shards"].append(
            {"path": rel, "rows": out.num_rows, "sha256": hashlib.sha256(data).hexdigest()}
        )
        manifest["rows"] = sum(s["rows"] for s in manifest["shards"])
        storage.write_json(SHARDS_MANIFEST, manifest)  # after the shard: the manifest lists only whole shards
        new_rows += out.num_rows
        log(f"tokenize: {storage.uri(rel)} ({out.num_rows} rows)")

    for index, shard in enumerate(curated):
        if on_progress is not None:
            on_progress(index, len(curated))
        table = storage.read_table(shard["path"], columns=["uid", "caption", "image", "clip_score"])
        if done:
            keep = np.array([uid not in done for uid in table.column("uid").to_pylist()], dtype=bool)
            table = table.filter(pa.array(keep))
        while table.num_rows:
            take = min(rows_per_shard - pending_rows, table.num_rows)
            pending.append(table.slice(0, take))
            pending_rows += take
            table = table.slice(take)
            if pending_rows == rows_per_shard:
                write_shard(pa.concat_tables(pending).combine_chunks())
                pending, pending_rows = [], 0
    if pending_rows:
        write_shard(pa.concat_tables(pending).combine_chunks())
    if on_progress is not None:
        on_progress(len(curated), len(curated))
    if not manifest["shards"]:
        storage.write_json(SHARDS_MANIFEST, manifest)
    return {
        "uri": storage.uri(SHARDS_DIR),
        "shards": len(manifest["shards"]),
        "rows": manifest["rows"],
        "new_rows": new_rows,
        "dvae": dvae_identity["uri"],
        "tokenizer": tokenizer.identity,
    }
