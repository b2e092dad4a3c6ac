"""The per-sample ledger of curation, and the curated shards.

Each stage is a plain function over a run root that reads what the previous stage
wrote and writes its own decisions under `curated/_stages/`; `write_curated` joins
them into the per-sample ledger `reports/samples.parquet`, the curated shards and
`reports/curate.json`. Every stage recomputes from its inputs, so a re-run gives
the same result and never duplicates rows; the costly parts (downloads, embeddings)
are reused when their inputs have not changed. The CLIP these stages score with is
given to them: a pretrained one, or the small CLIP that dalle/train/clip.py trains
on the pairs that passed the rule filters.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable

import pyarrow as pa

from dalle.config import RunConfig
from dalle.curate.crawl import batch_manifests
from dalle.curate.fates import PASS, iter_images, passing_rows
from dalle.runroot import (
    CURATE_REPORT,
    CURATED_DIR,
    CURATED_MANIFEST,
    DEDUP_TABLE,
    FILTER_TABLE,
    SAMPLES_REPORT,
    SCORES_TABLE,
    shard_file,
)
from dalle.schemas import CURATED_SCHEMA, SAMPLES_SCHEMA, SCHEMA_VERSION
from dalle.storage import Storage, parquet_bytes

CURATED_ROWS_PER_SHARD = 10_000


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
        "input_rows": sum(m["input_rows"] for m in batch_manifests(storage).values()),
        "downloaded": downloaded,
        "download_failed": dict(sorted(by_fate["download_failed"].items())),
        "blocked": dict(sorted(by_fate["blocked"].items())),
        "filtered": dict(sorted(by_fate["filtered"].items())),
        "duplicates_exact": sum(by_fate["duplicate_exact"].values()),
        "duplicates_near": sum(by_fate["duplicate_near"].values()),
        "kept": sum(by_fate["kept"].values()),
    }


def write_curated(storage: Storage, cfg: RunConfig, clip_identity: str) -> dict:
    """Write the ledger, the curated shards (new files, then the manifest, then the old files
    deleted) and reports/curate.json."""
    ledger = _ledger(storage)
    storage.write_table(SAMPLES_REPORT, pa.Table.from_pylist(ledger, schema=SAMPLES_SCHEMA))
    filter_rows = {r["uid"]: r for r in passing_rows(storage)}
    kept = [e for e in ledger if e["fate"] == "kept"]
    shards = []
    for start in range(0, max(len(kept), 1), CURATED_ROWS_PER_SHARD):
        chunk = kept[start : start + CURATED_ROWS_PER_SHARD]
        if not chunk:
            break
        sources = [filter_rows[e["uid"]] for e in chunk]
        images = [image for _, part in iter_images(storage, sources) for image in part]
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
        data = parquet_bytes(table)
        digest = hashlib.sha256(data).hexdigest()
        # A name of its own per content: the shards the current manifest lists stay as they are until
        # the new manifest replaces it (a shard whose content did not change keeps its name).
        rel = shard_file(CURATED_DIR, len(shards), digest)
        storage.write_bytes(rel, data)
        shards.append({"path": rel, "rows": table.num_rows, "sha256": digest})
    # The switch: readers see the old publication or the new one, never a mix. Files of the old one
    # are deleted only after it, so a crash leaves at worst unlisted files, removed by the next run.
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
