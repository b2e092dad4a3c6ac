"""Training flows: the small CLIP, the dVAE and the transformer, each returning the URI it produced.

Training runs in this process, or under torchrun when the config asks for more than one
process; either way each new checkpoint becomes artifacts and a `dalle.checkpoint.saved` event.
"""

from __future__ import annotations

import contextvars
import threading
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dalle.config import Location, Steps
from dalle.runroot import (
    CLIP,
    DVAE,
    TRANSFORMER,
    checkpoint_dir,
    checkpoint_steps,
    latest_checkpoint,
    read_metrics,
    run_config,
)
from dalle.storage import Storage
from dalle.timings import timed_stage
from dalle.train.launch import launch, step_target, training_settings
from flows.common import Progress, announce_checkpoint, log, retry_unless_user_error, timeout, trainer_slot


class TrainingProgress:
    """A training run's progress: a log line per logged step (every log_every steps) and a progress
    artifact in the Prefect UI; at the end, the run's loss curve as a table and a sparkline."""

    def __init__(self, model: str, start: int, target: int, every_s: float):
        self.model, self.start, self.target = model, start, target
        self.records: list[dict[str, Any]] = []
        self.progress = Progress(f"{model}-training", f"{model}: steps {start} to {target}", every_s)

    def record(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        step = record["step"]
        line = (
            f"{self.model}: step {step}/{self.target} loss {record['loss']:.4f} lr {record['lr']:.2e} "
            f"{record['samples_per_s']:.1f} samples/s"
        )
        self.progress.update(step - self.start, self.target - self.start, line)

    def publish(self) -> None:
        if not self.records:
            return
        create_table_artifact(
            key=f"{self.model}-loss-curve",
            table=[
                {
                    "step": r["step"],
                    "loss": round(r["loss"], 6),
                    "lr": r["lr"],
                    "samples_per_s": r["samples_per_s"],
                }
                for r in self.records
            ],
            description=f"{self.model}: loss every log_every steps of this run",
        )
        create_markdown_artifact(
            key=f"{self.model}-loss",
            markdown=(
                f"### {self.model} loss, steps {self.records[0]['step']}-{self.records[-1]['step']}\n\n"
                f"`{sparkline([r['loss'] for r in self.records])}`\n\n"
                f"first {self.records[0]['loss']:.4f}, last {self.records[-1]['loss']:.4f}"
            ),
            description=f"{self.model} loss curve",
        )


def sparkline(values: list[float], width: int = 60) -> str:
    """A loss curve in block characters, for the artifact's markdown."""
    if len(values) > width:
        values = [values[i * len(values) // width] for i in range(width)]
    low, high = min(values), max(values)
    blocks = "▁▂▃▄▅▆▇█"
    return "".join(blocks[int((v - low) / (high - low) * 7) if high > low else 0] for v in values)


class _CheckpointWatcher:
    """Publishes checkpoints and progress that torchrun children write, by polling latest.json and
    reports/metrics/ (read_metrics)."""

    def __init__(self, storage: Storage, name: str, progress: TrainingProgress, interval_s: float = 2.0):
        self.storage, self.name, self.progress, self.interval_s = storage, name, progress, interval_s
        latest = latest_checkpoint(storage, name, damaged_as_none=True)
        self.seen = latest.step if latest else -1
        self.logged = progress.start
        self.stop = threading.Event()
        context = contextvars.copy_context()  # the flow run's context, so artifacts attach to it
        self.thread = threading.Thread(target=context.run, args=(self._loop,), daemon=True)

    def _poll(self) -> None:
        for record in read_metrics(self.storage, self.name):
            if record.get("step", 0) > self.logged:
                self.logged = record["step"]
                self.progress.record(record)
        latest = latest_checkpoint(self.storage, self.name, damaged_as_none=True)
        if latest is not None and latest.step > self.seen:
            self.seen = latest.step
            announce_checkpoint({"model": self.name, "step": latest.step, "uri": latest.uri})

    def _loop(self) -> None:
        while not self.stop.wait(self.interval_s):
            self._poll()
        self._poll()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_user_error)
def train_model(
    model: str, root: str, config: dict[str, Any] | str | None, max_steps: int | None, resume: bool
) -> str:
    """Train up to max_steps, holding the run root's trainer slot; a retry resumes from the last
    checkpoint, so it never repeats work."""
    storage = Storage(root)
    cfg = run_config(storage, config)
    settings = training_settings(model, cfg, max_steps)
    with (
        trainer_slot(root, cfg.orchestration.trainer_wait_s, cfg.orchestration.trainer_lease_s),
        timeout(cfg.orchestration.train_timeout_s, "orchestration.train_timeout_s"),
        timed_stage(storage, f"train_{model}"),  # once the slot is held: waiting for it is not training
    ):
        latest = latest_checkpoint(storage, model, damaged_as_none=True)  # the trainer warns and falls back
        progress = TrainingProgress(
            model, latest.step if latest else 0, settings.max_steps, cfg.orchestration.progress_every_s
        )
        try:
            if settings.nproc > 1 or settings.nnodes > 1:
                with _CheckpointWatcher(storage, model, progress):
                    return launch(model, root, cfg, max_steps, resume, log=log)
            return launch(
                model, root, cfg, max_steps, resume, on_checkpoint=announce_checkpoint, log=log,
                on_metrics=progress.record,
            )  # fmt: skip
        finally:
            progress.publish()


def _train(model: str, root: str, config, max_steps: int | None, resume: bool, more_steps: int | None) -> str:
    """The training task, to a step total fixed before it starts: `more_steps` counts from the newest
    checkpoint now, so a retry after a crash does not add them again."""
    return train_model(model, root, config, step_target(Storage(root), model, max_steps, more_steps), resume)


@flow(name="train-dvae")
def train_dvae_flow(
    root: Location,
    config: dict[str, Any] | str | None = None,
    max_steps: Steps | None = None,
    resume: bool = True,
    more_steps: Steps | None = None,
) -> str:
    """Train the dVAE on the curated images; returns the newest checkpoint's URI. `config`: a mapping,
    or a YAML path or s3:// URI (default: the run root's config.yaml)."""
    return _train(DVAE, root, config, max_steps, resume, more_steps)


@flow(name="train-transformer")
def train_transformer_flow(
    root: Location,
    config: dict[str, Any] | str | None = None,
    max_steps: Steps | None = None,
    resume: bool = True,
    galleries: bool = True,
    more_steps: Steps | None = None,
) -> str:
    """Train the transformer on every token shard in the manifest, to max_steps or `more_steps` past
    its newest checkpoint (a scheduled retrain), then publish a gallery for every checkpoint this run
    wrote, and for every earlier one whose gallery is missing (a run stopped before it) or was drawn
    with other gallery settings (`galleries=False` leaves that to the checkpoint event); returns the
    newest checkpoint's URI."""
    from dalle.sample.gallery import gallery_is_current
    from flows.gallery import gallery_flow

    storage = Storage(root)
    name = TRANSFORMER
    before = set(checkpoint_steps(storage, name))
    uri = _train(TRANSFORMER, root, config, max_steps, resume, more_steps)
    latest = latest_checkpoint(storage, name)
    if galleries and latest is not None:
        cfg = run_config(storage)
        for step in checkpoint_steps(storage, name):
            if step <= latest.step and (step not in before or not gallery_is_current(storage, cfg, step)):
                gallery_flow(root, checkpoint_dir(name, step))
    return uri


@flow(name="train-clip")
def train_clip_flow(
    root: Location,
    config: dict[str, Any] | str | None = None,
    max_steps: Steps | None = None,
    resume: bool = True,
    more_steps: Steps | None = None,
) -> str:
    """Train the small CLIP on the pairs that passed the rule filters (when no pretrained one is
    configured); returns the newest checkpoint's URI. Curation runs the same training."""
    return _train(CLIP, root, config, max_steps, resume, more_steps)
