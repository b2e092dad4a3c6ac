"""Curated pairs -> token shards: captions by the run's tokenizer, images by the trained dVAE.

    {root}/shards/NNNNN-<run>-<sha12>.parquet  token_shard_schema rows (see runroot.shard_file)
    {root}/shards/_manifest.json               rows, per-shard sha256, schema version, tokenizer
                                               identity, the dVAE checkpoint that made the codes
    {root}/shards/_writers/<run>.json          a tokenize run's claim on the shard files it writes

Curated pairs are read only through curated/_manifest.json (dalle.tokens.loader checks each listed
file's sha256). The manifest is rewritten after every finished shard, so it always lists exactly
the complete shards; a listed file is never rewritten. A re-run tokenizes only curated uids that no
listed shard holds yet (new curated data becomes new shards) and refuses to mix codes from another
dVAE or tokens from another tokenizer.

Two runs on one root may overlap. Each names its shard files with its own id, so no two runs
ever write one file, and names a file in its claim before writing it; the clean-up of unlisted
files (a crash's leftovers) spares every file an unexpired claim names. A claim expires
`orchestration.tokenize_timeout_s` after its last update, when its run cannot be alive any more.
Before listing a shard a run re-reads the manifest and drops the rows another run listed
meanwhile, and after writing the manifest it checks that its shard is listed (and lists it again
if a concurrent write replaced it). Storage offers no conditional write, so two manifest writes
in the same instant can still lose one shard's listing; its rows are then tokenized again by the
next run.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch

from dalle.config import RunConfig
from dalle.errors import UserError
from dalle.runroot import CURATED_DIR, SHARD_WRITERS_DIR, SHARDS_DIR, SHARDS_MANIFEST, shard_file
from dalle.schemas import SCHEMA_VERSION, token_shard_schema
from dalle.storage import Storage, StorageError, parquet_bytes
from dalle.tokens.bpe import tokenizer_for_run
from dalle.tokens.loader import ImageBatch, read_listed_shard, read_listed_shards, read_manifest


class ImageCoder(Protocol):
    """What tokenizing needs of a trained dVAE (dalle.models.dvae.DiscreteVAE is one)."""

    cfg: Any  # image_size, codebook_size and grid

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...


class ShardsMismatch(UserError, ValueError):
    """Existing token shards were made with another dVAE, tokenizer or sequence length."""


def curated_captions(storage: Storage) -> Callable[[], list[str]]:
    """A callable returning every curated caption the manifest lists (read only if the tokenizer must be trained)."""

    def read() -> list[str]:
        table = read_listed_shards(storage, CURATED_DIR, columns=["caption"])
        return [] if table is None else table.column("caption").to_pylist()

    return read


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


def _without(table: pa.Table, uids: set[str]) -> pa.Table:
    """`table` without the rows whose uid is in `uids`."""
    if not uids:
        return table
    keep = np.array([uid not in uids for uid in table.column("uid").to_pylist()], dtype=bool)
    return table.filter(pa.array(keep))


class _ShardPublisher:
    """One tokenize run's writes under shards/: its claim, the shards it lists, the clean-up."""

    def __init__(self, storage: Storage, expected: dict, claim_s: float, log: Callable[[str], None]):
        self.storage, self.expected, self.claim_s, self.log = storage, expected, claim_s, log
        self.writer = uuid.uuid4().hex[:8]
        self.claim = f"{SHARD_WRITERS_DIR}/{self.writer}.json"
        self.written: list[str] = []  # every shard file this run wrote, listed or not
        self._uids: dict[tuple[str, str], frozenset[str]] = {}  # of each listed shard seen

    def _read(self) -> dict:
        if not self.storage.exists(SHARDS_MANIFEST):
            return {**self.expected, "rows": 0, "shards": []}
        return self.storage.read_json(SHARDS_MANIFEST)

    def manifest(self) -> dict:
        """The shards manifest as it is now (a fresh one when there is none), checked against this run."""
        manifest = self._read()
        _check_compatible(manifest, self.expected, self.storage.uri(SHARDS_DIR))
        return manifest

    def done(self, manifest: dict) -> set[str]:
        """The uids the shards of `manifest` hold (each listed shard read once, its sha256 checked)."""
        done: set[str] = set()
        for entry in manifest["shards"]:
            key = (entry["path"], entry.get("sha256") or "")
            if key not in self._uids:
                table = read_listed_shard(self.storage, SHARDS_DIR, entry, columns=["uid"])
                self._uids[key] = frozenset(table.column("uid").to_pylist())
            done |= self._uids[key]
        return done

    def _claimed_by_runs(self) -> set[str]:
        """Shard files that unexpired claims name; expired claims (of runs that cannot be alive) are removed."""
        claimed: set[str] = set()
        now = time.time()
        for rel in self.storage.list(SHARD_WRITERS_DIR, ".json"):
            try:
                claim = self.storage.read_json(rel)
            except StorageError:  # its run finished after the listing
                continue
            if claim["expires"] < now:
                self.storage.delete(rel)
            else:
                claimed.update(claim["files"])
        return claimed

    def remove_unlisted(self) -> None:
        """Delete the shard files that the manifest does not list and no running tokenize claims."""
        # Listed first: a file that appears after this listing is not judged; one listed here was
        # claimed before it was written, so the claims read next name it if its run is alive.
        files = self.storage.list(SHARDS_DIR, ".parquet")
        claimed = self._claimed_by_runs()
        listed = {entry["path"] for entry in self._read()["shards"]}
        for rel in files:
            if rel not in listed and rel not in claimed:
                self.log(f"tokenize: removing unfinished {self.storage.uri(rel)}")
                self.storage.delete(rel)

    def _claim_file(self, rel: str) -> None:
        self.written.append(rel)
        claim = {"expires": time.time() + self.claim_s, "files": self.written}
        self.storage.write_json(self.claim, claim)

    def publish(self, out: pa.Table) -> dict | None:
        """Write `out` (token shard rows) as a new shard and list it, without the rows that another run
        listed meanwhile; returns its manifest entry, or None when another run listed every row."""
        manifest = self.manifest()
        while True:
            out = _without(out, self.done(manifest))
            if not out.num_rows:
                return None
            data = parquet_bytes(out)
            digest = hashlib.sha256(data).hexdigest()
            rel = shard_file(SHARDS_DIR, len(manifest["shards"]), digest, writer=self.writer)
            entry = {"path": rel, "rows": out.num_rows, "sha256": digest}
            uids = frozenset(out.column("uid").to_pylist())
            self._claim_file(rel)  # before the file exists, so that no other run's clean-up takes it
            self.storage.write_bytes(rel, data)
            manifest = self.manifest()
            if not uids.isdisjoint(self.done(manifest)):
                continue  # another run listed some of these rows while this file was written
            self._uids[(rel, digest)] = uids
            manifest["shards"].append(entry)
            manifest["rows"] = sum(s["rows"] for s in manifest["shards"])
            self.storage.write_json(SHARDS_MANIFEST, manifest)  # after the shard: it lists only whole shards
            manifest = self.manifest()
            if entry in manifest["shards"]:
                return entry
            # Another run read the manifest before this write and wrote it after: list the shard again.

    def finish(self) -> dict:
        """Write an empty manifest when there is none yet; returns the manifest as it is now."""
        if not self.storage.exists(SHARDS_MANIFEST):
            self.storage.write_json(SHARDS_MANIFEST, self._read())
        return self.manifest()

    def release(self) -> None:
        """Delete this run's shard files that the manifest does not list, then its claim."""
        if not self.written:
            return
        listed = {entry["path"] for entry in self._read()["shards"]}
        for rel in dict.fromkeys(self.written):
            if rel not in listed:
                self.storage.delete(rel)
        self.storage.delete(self.claim)


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
    curated = read_manifest(storage, CURATED_DIR)["shards"]
    dvae_cfg = dvae.cfg
    grid = dvae_cfg.grid
    device = next(dvae.parameters()).device if hasattr(dvae, "parameters") else torch.device("cpu")
    tokenizer = tokenizer_for_run(storage, cfg.tokenizer, curated_captions(storage))
    expected = _expected_manifest_keys(dvae_identity, tokenizer.identity, cfg, grid)
    publisher = _ShardPublisher(storage, expected, cfg.orchestration.tokenize_timeout_s, log)
    done = publisher.done(publisher.manifest())
    publisher.remove_unlisted()

    schema = token_shard_schema(grid * grid)
    to_images = ImageBatch(dvae_cfg.image_size)
    rows_per_shard = cfg.tokenize.rows_per_shard
    pending: list[pa.Table] = []
    pending_rows = 0
    new_rows = 0

    def write_shard(table: pa.Table) -> None:
        nonlocal new_rows
        table = _without(table, publisher.done(publisher.manifest()))  # what another run did meanwhile
        if not table.num_rows:
            return
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
        entry = publisher.publish(out)
        if entry is not None:
            new_rows += entry["rows"]
            log(f"tokenize: {storage.uri(entry['path'])} ({entry['rows']} rows)")

    try:
        for index, shard in enumerate(curated):
            if on_progress is not None:
                on_progress(index, len(curated))
            table = read_listed_shard(
                storage, CURATED_DIR, shard, columns=["uid", "caption", "image", "clip_score"]
            )
            table = _without(table, done)
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
        manifest = publisher.finish()
    except BaseException:
        try:
            publisher.release()
        except Exception as err:  # noqa: BLE001 - the first error is the one to report
            log(f"tokenize: this run's unlisted shard files stay until its claim expires ({err})")
        raise
    publisher.release()
    return {
        "uri": storage.uri(SHARDS_DIR),
        "shards": len(manifest["shards"]),
        "rows": manifest["rows"],
        "new_rows": new_rows,
        "dvae": dvae_identity["uri"],
        "tokenizer": tokenizer.identity,
    }
