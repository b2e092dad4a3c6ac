"""Curation after the crawl, and the per-sample ledger it keeps: rule filters, CLIP scores,
deduplication, then the curated shards.

Each stage is a plain function over a run root that reads what the previous stage
wrote and writes its own decisions under `curated/_stages/`; `publish_stage` joins
them into the per-sample ledger `reports/samples.parquet`, the curated shards and
`reports/curate.json`. Every stage recomputes from its inputs, so a re-run gives
the same result and never duplicates rows; the costly parts (downloads, embeddings)
are reused when their inputs have not changed. The CLIP these stages score with is
given to them: a pretrained one, or the small CLIP that dalle/train/clip.py trains
on the pairs that passed the rule filters.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
from PIL import Image

from dalle.config import DedupConfig, RunConfig
from dalle.curate.crawl import RAW_IMAGE_COLUMN, classify_download_error, finished_shards, read_raw_shard
from dalle.curate.dedup import deduplicate
from dalle.curate.embed import ClipEncoder, embed_stage
from dalle.curate.embed import vectors as embedding_matrix
from dalle.curate.filters import caption_decision, clip_decision, clip_score_cutoff, inspect_image
from dalle.runroot import (
    CURATE_REPORT,
    CURATED_DIR,
    CURATED_MANIFEST,
    DEDUP_REPORT,
    DEDUP_TABLE,
    FILTER_TABLE,
    INPUT_MANIFEST,
    REFUSED_LIST,
    SAMPLES_REPORT,
    SCORES_TABLE,
)
from dalle.schemas import (
    CURATED_SCHEMA,
    DEDUP_DECISIONS_SCHEMA,
    FILTER_DECISIONS_SCHEMA,
    SAMPLES_SCHEMA,
    SCHEMA_VERSION,
    SCORE_DECISIONS_SCHEMA,
)
from dalle.storage import Storage, parquet_bytes

CURATED_ROWS_PER_SHARD = 10_000

PASS = "pass"  # interim fate of a sample that a stage let through
Log = Callable[[str], None]

def sample_uid(url: str, image_sha256: str | None) -> str:
    """Stable id of a sample: its URL and, once downloaded, the hash of its bytes."""
    digest = hashlib.sha256(url.encode("utf-8", errors="surrogatepass"))
    if image_sha256:
        digest.update(b"\n" + image_sha256.encode())
    return digest.hexdigest()[:24]


def _decision(
    fate: str, reason: str | None = None, detail: str | None = None, value=None, threshold=None
) -> dict:
    return {"fate": fate, "reason": reason, "detail": detail, "value": value, "threshold": threshold}


# --- 1. rule filters -------------------------------------------------------------------
def filter_stage(storage: Storage, cfg: RunConfig) -> dict[str, int]:
    """Record every crawled sample's fate so far: refused, failed download, filtered by a rule, or passed."""
    rows: list[dict] = []
    for refused in storage.read_table(REFUSED_LIST).to_pylist():
        rows.append(
            {
                "input_row": refused["input_row"],
                "url": refused["url"],
                "caption": refused["caption"],
                "uid": sample_uid(refused["url"], None),
                **_decision(refused["fate"], refused["reason"], refused["detail"]),
            }
        )
    for rel in finished_shards(storage):
        shard = read_raw_shard(storage, rel)
        for raw in shard.to_pylist():
            row = {
                "input_row": raw["input_row"],
                "url": raw["url"],
                "caption": raw["caption"],
                "raw_shard": rel,
                "raw_key": raw["key"],
                "sha256": raw["sha256"],
            }
            if raw["status"] != "success":
                message = raw["error_message"] or raw["status"]
                fate, reason = classify_download_error(message)
                rows.append({**row, "uid": sample_uid(raw["url"], None), **_decision(fate, reason, message)})
                continue
            row["uid"] = sample_uid(raw["url"], raw["sha256"])
            decision = caption_decision(raw["caption"], raw["caption_utf8"], cfg.filter)
            info, image_decision = inspect_image(raw[RAW_IMAGE_COLUMN], cfg.filter)
            if info is not None:
                row["width"], row["height"] = info.width, info.height
            decision = decision or image_decision
            if decision is not None:
                rows.append(
                    {
                        **row,
                        **_decision(
                            "filtered", decision.reason, decision.detail, decision.value, decision.threshold
                        ),
                    }
                )
            else:
                rows.append({**row, **_decision(PASS)})
    rows.sort(key=lambda r: r["input_row"])
    storage.write_table(FILTER_TABLE, pa.Table.from_pylist(rows, schema=FILTER_DECISIONS_SCHEMA))
    return dict(Counter(r["fate"] for r in rows))


def _passing(storage: Storage) -> list[dict]:
    return [r for r in storage.read_table(FILTER_TABLE).to_pylist() if r["fate"] == PASS]


def _images_for(storage: Storage, rows: list[dict]) -> list[bytes]:
    """Image bytes of the given filter rows, read shard by shard from raw/."""
    by_shard: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_shard[row["raw_shard"]].append(index)
    images: list[bytes | None] = [None] * len(rows)
    for rel, indices in by_shard.items():
        shard = read_raw_shard(storage, rel)
        by_key = dict(zip(shard.column("key").to_pylist(), shard.column(RAW_IMAGE_COLUMN).to_pylist()))
        for index in indices:
            images[index] = by_key[rows[index]["raw_key"]]
    return images  # type: ignore[return-value]


def passing_pairs(storage: Storage) -> tuple[list[bytes], list[str]]:
    """Image bytes and captions of the pairs that passed the rule filters (what the small CLIP learns from)."""
    rows = _passing(storage)
    return _images_for(storage, rows), [r["caption"] for r in rows]


def _decode_rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


# --- 2. CLIP scores and the CLIP-score filter ---------------------------------------------------
def score_stage(storage: Storage, cfg: RunConfig, clip: ClipEncoder) -> dict[str, int]:
    """Embed the passing pairs (cached by uid under embeddings/) and apply the CLIP-score filter."""
    rows = _passing(storage)
    images = _images_for(storage, rows)
    table = embed_stage(
        storage, [r["uid"] for r in rows], images, [r["caption"] for r in rows], clip, cfg.clip.batch_size
    )
    scores = table.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float32)
    cutoff = clip_score_cutoff(scores, cfg.filter)
    out = []
    for row, score in zip(rows, scores):
        decision = clip_decision(float(score), cutoff)
        fate = (
            _decision(PASS)
            if decision is None
            else _decision("filtered", decision.reason, decision.detail, decision.value, decision.threshold)
        )
        out.append({"uid": row["uid"], **fate, "clip_score": float(score)})
    storage.write_table(SCORES_TABLE, pa.Table.from_pylist(out, schema=SCORE_DECISIONS_SCHEMA))
    return dict(Counter(r["fate"] for r in out))


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
    return cfg.dedup.model_copy(update={"near_threshold": DEFAULT_NEAR_THRESHOLD[dedup_vectors(cfg)]})


def _token_vectors(clip: ClipEncoder, images: list[bytes], batch_size: int) -> np.ndarray:
    """Patch-token vectors, centred on their mean over the set so that the shared background
    does not make every pair look alike, then L2-normalised."""
    tokens = clip.encode_image_tokens([_decode_rgb(b) for b in images], batch_size)
    if len(tokens) == 0:
        return np.zeros((0, clip.embed_dim), dtype=np.float32)
    tokens -= tokens.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(tokens, axis=1, keepdims=True)
    return (tokens / np.maximum(norms, 1e-12)).astype(np.float32)


# --- 3. deduplication ---------------------------------------------------------------------
def dedup_stage(storage: Storage, cfg: RunConfig, clip: ClipEncoder) -> dict:
    """Exact (sha256) then near (CLIP image vectors, FAISS) duplicates among the scored survivors."""
    scored = {r["uid"]: r for r in storage.read_table(SCORES_TABLE).to_pylist() if r["fate"] == PASS}
    rows = [r for r in _passing(storage) if r["uid"] in scored]
    uids = [r["uid"] for r in rows]
    if dedup_vectors(cfg) == "clip_tokens":
        vectors = _token_vectors(clip, _images_for(storage, rows), cfg.clip.batch_size)
    else:
        # Everything needed is cached by now, so embed_stage only reads.
        stored = embed_stage(storage, uids, [None] * len(uids), [r["caption"] for r in rows], clip, 1)
        vectors = embedding_matrix(stored, "image_embedding")
    scores = np.asarray([scored[u]["clip_score"] for u in uids], dtype=np.float32)
    result = deduplicate(uids, [r["sha256"] for r in rows], vectors, scores, dedup_settings(cfg))
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


# --- 4. the curated shards --------------------------------------------------------------------------
def _ledger(storage: Storage) -> list[dict]:
    scores = {r["uid"]: r for r in storage.read_table(SCORES_TABLE).to_pylist()}
    dedup = {r["uid"]: r for r in storage.read_table(DEDUP_TABLE).to_pylist()}
    ledger = []
    for row in storage.read_table(FILTER_TABLE).to_pylist():
        entry = {name: row.get(name) for name in SAMPLES_SCHEMA.names}
        entry["raw_key"] = row["raw_key"]
        score = scores.get(row["uid"]) if row["fate"] == PASS else None
        if score is not None:
            entry["clip_score"] = score["clip_score"]
            if score["fate"] != PASS:
                entry.update({k: score[k] for k in ("fate", "reason", "detail", "value", "threshold")})
        dup = dedup.get(row["uid"]) if entry["fate"] == PASS else None
        if dup is not None and dup["fate"] != PASS:
            entry.update(
                fate=dup["fate"],
                reason=dup["fate"],
                dup_of=dup["dup_of"],
                similarity=dup["similarity"],
                detail=f"duplicate of {dup['dup_of']} (cosine {dup['similarity']:.4f})",
            )
        if entry["fate"] == PASS:
            entry["fate"] = "kept"
        ledger.append(entry)
    return ledger


def curate_report(storage: Storage, ledger: Iterable[dict]) -> dict:
    """reports/curate.json: the funnel, with exactly the keys the issue names."""
    ledger = list(ledger)
    by_fate: dict[str, Counter] = defaultdict(Counter)
    downloaded = 0
    for entry in ledger:
        by_fate[entry["fate"]][entry["reason"]] += 1
        if entry["sha256"] is not None and entry["fate"] not in ("blocked", "download_failed"):
            downloaded += 1
    return {
        "input_rows": storage.read_json(INPUT_MANIFEST)["input_rows"],
        "downloaded": downloaded,
        "download_failed": dict(sorted(by_fate["download_failed"].items())),
        "blocked": dict(sorted(by_fate["blocked"].items())),
        "filtered": dict(sorted(by_fate["filtered"].items())),
        "duplicates_exact": sum(by_fate["duplicate_exact"].values()),
        "duplicates_near": sum(by_fate["duplicate_near"].values()),
        "kept": sum(by_fate["kept"].values()),
    }


def write_curated(storage: Storage, cfg: RunConfig, clip_identity: str) -> dict:
    """Write the ledger, the curated shards (manifest last) and reports/curate.json."""
    ledger = _ledger(storage)
    storage.write_table(SAMPLES_REPORT, pa.Table.from_pylist(ledger, schema=SAMPLES_SCHEMA))
    filter_rows = {r["uid"]: r for r in _passing(storage)}
    kept = [e for e in ledger if e["fate"] == "kept"]
    shards = []
    for start in range(0, max(len(kept), 1), CURATED_ROWS_PER_SHARD):
        chunk = kept[start : start + CURATED_ROWS_PER_SHARD]
        if not chunk:
            break
        sources = [filter_rows[e["uid"]] for e in chunk]
        images = _images_for(storage, sources)
        table = pa.Table.from_pylist(
            [
                {
                    "uid": e["uid"],
                    "url": e["url"],
                    "caption": e["caption"].strip(),
                    "image": image,
                    "sha256": e["sha256"],
                    "width": e["width"],
                    "height": e["height"],
                    "clip_score": e["clip_score"],
                    "provenance": {
                        "input_row": e["input_row"],
                        "raw_key": src["raw_key"],
                        "raw_shard": src["raw_shard"],
                        "clip_model": clip_identity,
                    },
                }
                for e, src, image in zip(chunk, sources, images)
            ],
            schema=CURATED_SCHEMA,
        )
        rel = f"{CURATED_DIR}/{len(shards):05d}.parquet"
        data = parquet_bytes(table)
        storage.write_bytes(rel, data)
        shards.append({"path": rel, "rows": table.num_rows, "sha256": hashlib.sha256(data).hexdigest()})
    # Shards of an earlier, larger result are dropped only after the new manifest is in place.
    storage.write_json(
        CURATED_MANIFEST,
        {
            "schema_version": SCHEMA_VERSION,
            "rows": len(kept),
            "shards": shards,
            "clip_model": clip_identity,
            "config_fingerprint": cfg.fingerprint("crawl", "filter", "clip", "dedup"),
        },
    )
    current = {s["path"] for s in shards}
    for rel in storage.list(CURATED_DIR, ".parquet"):
        if rel not in current:
            storage.delete(rel)
    report = curate_report(storage, ledger)
    storage.write_json(CURATE_REPORT, report)
    return report


def examples_of_removals(storage: Storage, per_reason: int = 2) -> list[dict]:
    """A few removed samples per (fate, reason), for the flow's summary."""
    seen: Counter = Counter()
    examples = []
    for entry in storage.read_table(SAMPLES_REPORT).to_pylist():
        key = (entry["fate"], entry["reason"])
        if entry["fate"] == "kept" or seen[key] >= per_reason:
            continue
        seen[key] += 1
        examples.append(entry)
    return examples
