"""Training flows: the small CLIP, the dVAE and the transformer, each returning the URI it produced.

Training runs in this process, or under torchrun when the config asks for more than one
process; either way each new checkpoint becomes artifacts and a `dalle.checkpoint.saved` event.
"""

from __future__ import annotations

import contextvars
import threading
from typing import Any

from prefect import flow, task

from dalle.runroot import (
    CLIP,
    DVAE,
    TRANSFORMER,
    checkpoint_dir,
    checkpoint_steps,
    latest_checkpoint,
    run_config,
)
from dalle.storage import Storage
from dalle.train.launch import launch, training_settings
from flows.common import announce_checkpoint, log, retry_unless_user_error


class _CheckpointWatcher:
    """Publishes checkpoints that torchrun children write, by polling latest.json."""

    def __init__(self, storage: Storage, name: str, interval_s: float = 2.0):
        self.storage, self.name, self.interval_s = storage, name, interval_s
        latest = latest_checkpoint(storage, name)
        self.seen = latest.step if latest else -1
        self.stop = threading.Event()
        context = contextvars.copy_context()  # the flow run's context, so artifacts attach to it
        self.thread = threading.Thread(target=context.run, args=(self._loop,), daemon=True)

    def _poll(self) -> None:
        latest = latest_checkpoint(self.storage, self.name)
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
    model: str, root: str, config: dict[str, Any] | None, max_steps: int | None, resume: bool
) -> str:
    """Train up to max_steps; a retry resumes from the last checkpoint, so it never repeats work."""
    storage = Storage(root)
    cfg = run_config(storage, config)
    if training_settings(model, cfg).nproc > 1:
        with _CheckpointWatcher(storage, model):
            return launch(model, root, cfg, max_steps, resume, log=log)
    return launch(model, root, cfg, max_steps, resume, on_checkpoint=announce_checkpoint, log=log)


@flow(name="train-dvae")
def train_dvae_flow(
    root: str, config: dict[str, Any] | None = None, max_steps: int | None = None, resume: bool = True
) -> str:
    """Train the dVAE on the curated images; returns the newest checkpoint's URI."""
    return train_model(DVAE, root, config, max_steps, resume)


@flow(name="train-transformer")
def train_transformer_flow(
    root: str,
    config: dict[str, Any] | None = None,
    max_steps: int | None = None,
    resume: bool = True,
    galleries: bool = True,
) -> str:
    """Train the transformer on the token shards, then publish a gallery for every checkpoint this run
    wrote, and for every earlier one whose gallery is missing (a run stopped before it) or was drawn
    with other gallery settings (`galleries=False` leaves that to the checkpoint event); returns the
    newest checkpoint's URI."""
    from dalle.sample.gallery import gallery_is_current
    from flows.gallery import gallery_flow

    storage = Storage(root)
    name = TRANSFORMER
    before = set(checkpoint_steps(storage, name))
    uri = train_model(TRANSFORMER, root, config, max_steps, resume)
    latest = latest_checkpoint(storage, name)
    if galleries and latest is not None:
        cfg = run_config(storage)
        for step in checkpoint_steps(storage, name):
            if step <= latest.step and (step not in before or not gallery_is_current(storage, cfg, step)):
                gallery_flow(root, checkpoint_dir(name, step))
    return uri


@flow(name="train-clip")
def train_clip_flow(
    root: str, config: dict[str, Any] | None = None, max_steps: int | None = None, resume: bool = True
) -> str:
    """Train the small CLIP on the pairs that passed the rule filters (when no pretrained one is
    configured); returns the newest checkpoint's URI. Curation runs the same training."""
    return train_model(CLIP, root, config, max_steps, resume)
