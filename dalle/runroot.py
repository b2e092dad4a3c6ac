"""The layout of a run root: every path a stage reads or writes, the run's configuration, and
where each model's checkpoints are. Stages name these constants, never string literals.

    config.yaml                      the configuration the run was made with
    source/                          a URL list served for this run by a plug-in (the demo)
    raw/_input/                      the crawl's input: accepted URLs, refused URLs, manifest
    raw/NNNNN.parquet                img2dataset's shards (every URL's download status)
    curated/_stages/                 each curation stage's per-sample decisions
    curated/_stages/dedup_clusters/  dedup's clusters while Dask workers search them (orchestration.dask_address)
    curated/NNNNN-<sha12>.parquet    the curated pairs, with _manifest.json written last (see shard_file)
    embeddings/                      CLIP vectors, cached by sample uid and CLIP identity
    shards/NNNNN-<run>-<sha12>.parquet  token shards for the transformer, with _manifest.json
    shards/_writers/                 one claim per running tokenize: the shard files it is writing
    models/tokenizer/                the run's text tokenizer
    models/<model>/step_XXXXXXXX/    checkpoints of clip, dvae and transformer
    models/<model>/latest.json       the newest complete checkpoint (written last)
    galleries/step_XXXXXXXX/         a transformer checkpoint's gallery; galleries/index.html
    reports/                         samples.parquet, curate.json, dedup.json, eval.json, eval_prompts.jsonl, timings.json
    reports/metrics/<model>/         the training metrics: one file per trainer run (see metrics_file)
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import yaml

from dalle.config import ConfigError, RunConfig, as_config, config_from_dict, dump_config
from dalle.errors import UserError
from dalle.storage import Storage, StorageError, path_inside_root

MANIFEST = "_manifest.json"  # written last in a shard folder: the folder is complete when it exists
RUN_CONFIG = "config.yaml"

SOURCE_DIR = "source"

RAW_DIR = "raw"
# A URL list that changes after the first crawl adds a batch: raw/batch_0001/ holds its own _input/
# (the rows not crawled before) and its shards. The first list's batch is raw/ itself.
BATCH_PREFIX = "batch_"
INPUT_NAME, REFUSED_NAME = "urls.parquet", "refused.parquet"  # in each batch's _input/


def batch_dir(number: int) -> str:
    return RAW_DIR if number == 0 else f"{RAW_DIR}/{BATCH_PREFIX}{number:04d}"


def batch_input(batch: str, name: str) -> str:
    """A file of a batch's _input/ folder: urls.parquet, refused.parquet or _manifest.json."""
    return f"{batch}/_input/{name}"


INPUT_LIST = batch_input(RAW_DIR, INPUT_NAME)
REFUSED_LIST = batch_input(RAW_DIR, REFUSED_NAME)
INPUT_MANIFEST = batch_input(RAW_DIR, MANIFEST)

CURATED_DIR = "curated"
CURATED_MANIFEST = f"{CURATED_DIR}/{MANIFEST}"
CURATE_WORK_DIR = f"{CURATED_DIR}/_stages"  # joined into reports/samples.parquet
FILTER_TABLE = f"{CURATE_WORK_DIR}/filter.parquet"
SCORES_TABLE = f"{CURATE_WORK_DIR}/clip.parquet"
DEDUP_TABLE = f"{CURATE_WORK_DIR}/dedup.parquet"
# Dedup's clusters stored for the workers that search them (orchestration.dask_address), while they do.
DEDUP_BATCHES_DIR = f"{CURATE_WORK_DIR}/dedup_clusters"

EMBEDDINGS_DIR = "embeddings"

SHARDS_DIR = "shards"
SHARDS_MANIFEST = f"{SHARDS_DIR}/{MANIFEST}"
# A running tokenize names here the shard files it writes before listing them, so that another
# run's clean-up leaves them alone.
SHARD_WRITERS_DIR = f"{SHARDS_DIR}/_writers"


def shard_file(shard_dir: str, index: int, sha256: str, writer: str | None = None) -> str:
    """Path of a shard of curated/ or shards/: its position and the first 12 hex digits of its
    content's sha256, so a new publication never overwrites a file a manifest lists and identical
    content keeps its name (re-publishing the same shards is idempotent). `writer`, a tokenize
    run's id, keeps two runs that make the same shard at once from sharing one file."""
    tag = f"-{writer}" if writer else ""
    return f"{shard_dir}/{index:05d}{tag}-{sha256[:12]}.parquet"


MODELS_DIR = "models"
TOKENIZER_DIR = f"{MODELS_DIR}/tokenizer"
TOKENIZER_FILE = f"{TOKENIZER_DIR}/tokenizer.json"
TOKENIZER_META = f"{TOKENIZER_DIR}/tokenizer_meta.json"

# The models a run trains, by the name of their folder under models/ (and in metrics and events).
CLIP = "clip"
DVAE = "dvae"
TRANSFORMER = "transformer"
MODEL_NAMES = (CLIP, DVAE, TRANSFORMER)

# The files of one checkpoint folder.
CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_META = "model.json"
CHECKPOINT_TRAIN_STATE = "train_state.pt"
CHECKPOINT_CONFIG = RUN_CONFIG

GALLERIES_DIR = "galleries"
GALLERY_INDEX = f"{GALLERIES_DIR}/index.html"
GALLERY_SUMMARY = "summary.json"  # inside each gallery folder

REPORTS_DIR = "reports"
METRICS = f"{REPORTS_DIR}/metrics.jsonl"  # the one file of every trainer, as older releases wrote it
METRICS_DIR = f"{REPORTS_DIR}/metrics"  # one file per trainer run: metrics_file()
SAMPLES_REPORT = f"{REPORTS_DIR}/samples.parquet"
CURATE_REPORT = f"{REPORTS_DIR}/curate.json"
DEDUP_REPORT = f"{REPORTS_DIR}/dedup.json"
EVAL_REPORT = f"{REPORTS_DIR}/eval.json"
EVAL_PROMPTS = f"{REPORTS_DIR}/eval_prompts.jsonl"  # the evaluator's prompts, one JSON object per line
TIMINGS_REPORT = f"{REPORTS_DIR}/timings.json"  # wall time per stage, from TIMINGS_DIR (dalle/timings.py)
TIMINGS_DIR = f"{REPORTS_DIR}/timings"  # one file per stage, its runs

# Run roots made before the transformer had one name kept its checkpoints here.
_OLD_TRANSFORMER = "dalle"


# --- checkpoints ------------------------------------------------------------------------------
def checkpoint_dir(model: str, step: int) -> str:
    """Relative folder of a model checkpoint: models/<model>/step_XXXXXXXX."""
    return f"{MODELS_DIR}/{model}/step_{step:08d}"


def checkpoint_step(checkpoint: str) -> int:
    """The step of a checkpoint folder (relative path or URI ending in step_XXXXXXXX)."""
    name = checkpoint.rstrip("/").rsplit("/", 1)[-1]
    if not name.startswith("step_"):
        raise ValueError(f"{checkpoint} is not a checkpoint folder (models/<model>/step_XXXXXXXX)")
    return int(name[len("step_") :])


class NotACheckpoint(UserError, ValueError):
    """A path given as a model's checkpoint folder that is not one."""


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint that cannot be resumed or loaded with the current configuration."""


class CorruptCheckpoint(CheckpointMismatch):
    """A checkpoint (or latest.json) whose files are missing, truncated or changed since they were written."""


def checkpoint_rel(location: str, model: str, root: str = "the run root", given: str | None = None) -> str:
    """`location`, relative to the run root, as the checkpoint folder of `model` it names (normalised);
    raises NotACheckpoint, naming `given` (what the user passed) or `location`, for any other path,
    such as one outside the root or of another model."""
    try:
        rel = path_inside_root(location, root)
    except StorageError:
        rel = ""
    _, _, name = rel.rpartition("/")
    digits = name.removeprefix("step_")
    if not (digits.isascii() and digits.isdigit() and rel == checkpoint_dir(model, int(digits))):
        raise NotACheckpoint(
            f"{given or location!r} is not a {model} checkpoint of {root}: expected a folder "
            f"{MODELS_DIR}/{model}/step_XXXXXXXX inside the root (its URI, or its path relative to the root)"
        )
    return rel


def latest_pointer(model: str) -> str:
    """Relative path of models/<model>/latest.json, which names the newest checkpoint."""
    return f"{MODELS_DIR}/{model}/latest.json"


def gallery_dir(step: int) -> str:
    """Relative folder of the gallery of the transformer checkpoint at `step`."""
    return f"{GALLERIES_DIR}/step_{step:08d}"


def split_checkpoint_uri(uri: str) -> tuple[str, str]:
    """(run root, checkpoint folder relative to it) of a URI like ROOT/models/transformer/step_00001000."""
    marker = f"/{MODELS_DIR}/"
    if marker not in uri:
        raise ValueError(f"{uri} is not a checkpoint folder (ROOT/models/transformer/step_XXXXXXXX)")
    root, _, rel = uri.rstrip("/").rpartition(marker)
    rel = f"{MODELS_DIR}/{rel}"
    old = f"{MODELS_DIR}/{_OLD_TRANSFORMER}/"
    if rel.startswith(old):  # a URI copied from an older run root's logs
        rel = f"{MODELS_DIR}/{TRANSFORMER}/{rel[len(old) :]}"
    return root, rel


@dataclass
class Checkpoint:
    """A complete checkpoint found through latest.json."""

    model: str
    step: int
    rel_dir: str
    uri: str


def checkpoint_steps(storage: Storage, model: str) -> list[int]:
    """Steps of every checkpoint folder of `model`, complete or not, ascending."""
    folders = storage.subfolders(f"{MODELS_DIR}/{model}")
    return sorted(checkpoint_step(folder) for folder in folders if folder.startswith("step_"))


def latest_checkpoint(storage: Storage, model: str, damaged_as_none: bool = False) -> Checkpoint | None:
    """The checkpoint latest.json names, or None when the model has none yet; raises CorruptCheckpoint
    when latest.json cannot be read (`damaged_as_none`: None then, for callers that only report
    progress; the trainer falls back and warns). It is not checked that the folder is intact: loading
    does that (dalle.models.weights.newest_intact falls back to an earlier checkpoint)."""
    pointer = latest_pointer(model)
    if not storage.exists(pointer):
        return None
    try:
        step = int(storage.read_json(pointer)["step"])
    except (ValueError, KeyError, TypeError, StorageError) as err:
        if damaged_as_none:
            return None
        raise CorruptCheckpoint(
            f"{storage.uri(pointer)} is damaged ({type(err).__name__}: {str(err)[:80]}); "
            'write it again as {"step": N} naming the newest intact checkpoint folder'
        ) from None
    rel = checkpoint_dir(model, step)
    return Checkpoint(model=model, step=step, rel_dir=rel, uri=storage.uri(rel))


def set_latest(storage: Storage, model: str, step: int, **extra) -> str:
    """Point latest.json at the checkpoint of `step`: the last write of a checkpoint. Returns its URI."""
    uri = storage.uri(checkpoint_dir(model, step))
    storage.write_json(latest_pointer(model), {"step": step, "uri": uri, **extra})
    return uri


# --- the run's configuration ------------------------------------------------------------------
def run_config(storage: Storage, config: str | dict | RunConfig | None = None) -> RunConfig:
    """The configuration for a command on `storage`: the given one (a YAML path, a mapping or a
    RunConfig), then saved as the run's config.yaml; without one, the run's own config.yaml."""
    storage.remove_stale_temporaries()  # left by a killed writer; fresh ones (another writer's) stay
    if config is not None:
        cfg = as_config(config)
        storage.check_writable()  # a missing bucket is named here, before any work
        migrate(storage)
        storage.write_bytes(RUN_CONFIG, dump_config(cfg).encode())
        return cfg
    if not storage.exists(RUN_CONFIG):
        raise ConfigError(
            f"{storage.uri()} has no {RUN_CONFIG} (not a run root yet); pass --config YAML, e.g. demo/config.yaml"
        )
    migrate(storage)
    data = yaml.safe_load(storage.read_bytes(RUN_CONFIG))
    return config_from_dict(data, origin=storage.uri(RUN_CONFIG))


def migrate(storage: Storage) -> list[str]:
    """Bring a run root made by an older release to this layout, once; returns what was changed.

    The transformer's checkpoints move from models/dalle/ to models/transformer/ (latest.json
    last, so an interrupted move is finished by the next call), and its metrics lines are renamed.
    """
    done: list[str] = []
    old_dir, new_dir = f"{MODELS_DIR}/{_OLD_TRANSFORMER}", f"{MODELS_DIR}/{TRANSFORMER}"
    if storage.subfolders(old_dir) or storage.exists(latest_pointer(_OLD_TRANSFORMER)):
        for folder in storage.subfolders(old_dir):
            for rel in _files_under(storage, f"{old_dir}/{folder}"):
                target = new_dir + rel[len(old_dir) :]
                if not storage.exists(target):
                    storage.write_bytes(target, storage.read_bytes(rel))
            done.append(f"{storage.uri(old_dir)}/{folder} -> {storage.uri(new_dir)}/{folder}")
        if storage.exists(latest_pointer(_OLD_TRANSFORMER)):
            step = int(storage.read_json(latest_pointer(_OLD_TRANSFORMER))["step"])
            set_latest(storage, TRANSFORMER, step)
        storage.delete(old_dir)
    if storage.exists(METRICS):
        text = storage.read_bytes(METRICS).decode()
        old = f'"model": "{_OLD_TRANSFORMER}"'
        if old in text:
            storage.write_bytes(METRICS, text.replace(old, f'"model": "{TRANSFORMER}"').encode())
            done.append(f"{storage.uri(METRICS)}: model {_OLD_TRANSFORMER!r} -> {TRANSFORMER!r}")
    return done


def _files_under(storage: Storage, rel_dir: str) -> list[str]:
    files = storage.list(rel_dir)
    for folder in storage.subfolders(rel_dir):
        files += _files_under(storage, f"{rel_dir}/{folder}")
    return files


# --- training metrics -------------------------------------------------------------------------
# Every trainer run writes its own files, reports/metrics/<model>/<started>-<token>-from_<step>-<part>.jsonl,
# and only it writes them (rewritten whole, atomically: S3 has no append). Two trainers on one root
# never touch each other's lines. <started> (UTC, microseconds) orders the runs of a model, <step> is
# the checkpoint the run resumed from: the lines an earlier run of that model wrote past it were
# made by a run that stopped (or whose checkpoint was damaged) and are superseded by the new run's.
# A run starts a new <part> every METRICS_PART_LINES lines, so a flush rewrites a bounded file.
METRICS_PART_LINES = 2000
_METRICS_NAME = re.compile(r"^(?P<run>\d{8}T\d{12}Z-[0-9a-f]+)-from_(?P<step>\d+)-(?P<part>\d+)\.jsonl$")


def new_metrics_run() -> str:
    """The name of a trainer run's metrics files: its start time (UTC) and a random token."""
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}-{secrets.token_hex(4)}"


def metrics_file(model: str, run: str, from_step: int, part: int = 0) -> str:
    """Relative path of part `part` of the metrics of trainer run `run` of `model`, resumed from `from_step`."""
    return f"{METRICS_DIR}/{model}/{run}-from_{from_step:08d}-{part:04d}.jsonl"


def _metric_records(text: str, model: str | None) -> list[dict]:
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and (model is None or record.get("model") == model):
            records.append(record)
    return records


def _step(record: dict) -> float:
    step = record.get("step", 0)
    return step if isinstance(step, int | float) else 0


def read_metrics(storage: Storage, model: str | None = None) -> list[dict]:
    """The training metrics of the run root (of one model when given): the records of the older single
    reports/metrics.jsonl, then of every trainer run's files under reports/metrics/, oldest run first,
    each run's lines in order. A run resumed from step S supersedes the lines of that model's earlier
    runs past S, so a resumed run's steps appear once. Across models, records are ordered by time.
    A torn or foreign line is skipped."""
    per_model: dict[str, list[dict]] = {}
    if storage.exists(METRICS):
        for record in _metric_records(storage.read_bytes(METRICS).decode("utf-8", "replace"), model):
            per_model.setdefault(str(record.get("model")), []).append(record)
    names = [model] if model is not None else storage.subfolders(METRICS_DIR)
    for name in names:
        runs: dict[str, tuple[int, list[tuple[int, str]]]] = {}
        for rel in storage.list(f"{METRICS_DIR}/{name}", ".jsonl"):
            match = _METRICS_NAME.match(rel.rsplit("/", 1)[-1])
            if match is None:
                continue
            _, parts = runs.setdefault(match["run"], (int(match["step"]), []))
            parts.append((int(match["part"]), rel))
        kept = per_model.setdefault(name, [])
        for run in sorted(runs):
            from_step, parts = runs[run]
            kept[:] = [record for record in kept if _step(record) <= from_step]
            for _, rel in sorted(parts):
                try:
                    text = storage.read_bytes(rel).decode("utf-8", "replace")
                except StorageError:  # removed since it was listed
                    continue
                kept += _metric_records(text, name)
    if model is not None:
        return per_model.get(model, [])
    merged = [record for records in per_model.values() for record in records]
    if len(per_model) > 1:
        merged.sort(key=lambda r: r["time"] if isinstance(r.get("time"), int | float) else 0.0)
    return merged
