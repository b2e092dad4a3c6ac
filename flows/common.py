"""What every flow shares: the retry rule, logging, progress in the UI, the one-trainer-per-root
guard, and announcing checkpoints and new shards as events that other deployments react to."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from typing import Any

from prefect import get_client, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.concurrency.sync import concurrency
from prefect.events import emit_event

from dalle.errors import USER_ERRORS, UserError
from dalle.runroot import split_checkpoint_uri
from dalle.storage import Storage

CHECKPOINT_EVENT = "dalle.checkpoint.saved"
SHARDS_EVENT = "dalle.shards.updated"


def retry_unless_user_error(task, task_run, state) -> bool:
    """Retry I/O hiccups, never a bad input or setting: those fail the same way every time."""
    try:
        state.result()
    except USER_ERRORS:
        return False
    except Exception:  # noqa: BLE001 - anything else may be a passing I/O failure
        return True
    return False


def log(message: str) -> None:
    get_run_logger().info(message)


def announce_checkpoint(info: dict[str, Any]) -> None:
    """A table and a summary artifact for a new checkpoint, and the `dalle.checkpoint.saved` event
    (resource id: the checkpoint's URI) that galleries and automations react to."""
    model, step, uri = info["model"], info["step"], info["uri"]
    metrics = {k: v for k, v in (info.get("metrics") or {}).items() if isinstance(v, (int, float))}
    create_table_artifact(
        key=f"{model}-checkpoint-metrics",
        table=[{"metric": k, "value": round(float(v), 6)} for k, v in sorted(metrics.items())],
        description=f"{model} at step {step}",
    )
    create_markdown_artifact(
        key=f"{model}-checkpoint",
        markdown=f"### {model} checkpoint, step {step}\n\n`{uri}`\n\nloss: {metrics.get('loss', 'n/a')}",
        description=f"{model} step {step}",
    )
    emit_event(
        event=CHECKPOINT_EVENT,
        resource={
            "prefect.resource.id": uri,
            "dalle.model": model,
            "dalle.step": str(step),
            "dalle.root": split_checkpoint_uri(uri)[0],
        },
        payload={"model": model, "step": step, "uri": uri, "metrics": metrics},
    )


class StageTimeout(UserError, TimeoutError):
    """A stage ran past its time limit from the config (not retried: it would run out again)."""


@contextlib.contextmanager
def timeout(seconds: float, setting: str) -> Iterator[None]:
    """Stop the enclosed work after `seconds` (Prefect's timeout), naming the setting that limits it."""
    from prefect.utilities.timeout import timeout as prefect_timeout

    class _Expired(StageTimeout):
        def __init__(self, *args):
            super().__init__(
                f"stopped after {seconds:g} s ({setting}); finished work is kept and a re-run resumes it"
            )

    with prefect_timeout(seconds, timeout_exc_type=_Expired):
        yield


class TrainerBusy(UserError, RuntimeError):
    """Another trainer holds the run root."""


def trainer_limit_name(root: str) -> str:
    """The global concurrency limit that admits one trainer per run root (names cannot hold '/')."""
    return "dalle-trainer-" + hashlib.sha256(Storage(root).uri().encode()).hexdigest()[:16]


@contextlib.contextmanager
def trainer_slot(root: str, wait_s: float, lease_s: float = 300.0) -> Iterator[None]:
    """Hold the run root's trainer slot (a Prefect global concurrency limit of 1, made on first use)
    while training; another trainer of the same root waits up to `wait_s` seconds, then is refused.
    The slot is leased for `lease_s` seconds and renewed while training runs, so a trainer that dies
    without releasing it loses it after that long. Only against a Prefect server (PREFECT_API_URL):
    Prefect's ephemeral in-process server never takes an expired lease back, so a killed trainer
    would lock its root for good; there nothing is guarded."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        yield
        return
    name = trainer_limit_name(root)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except Exception:  # noqa: BLE001 - another trainer made it first (SQLite answers 500, not 409)
                client.read_global_concurrency_limit_by_name(name)
    slot = concurrency(
        name,
        occupy=1,
        timeout_seconds=wait_s or None,
        max_retries=0 if wait_s == 0 else None,
        lease_duration=lease_s,
        strict=True,
    )
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(slot)
        except (TimeoutError, ConcurrencySlotAcquisitionError) as err:
            if not (isinstance(err, TimeoutError) or "423" in str(err)):
                raise
            raise TrainerBusy(
                f"another trainer is running on {Storage(root).uri()} (concurrency limit {name}); this one "
                f"is refused after waiting {wait_s:g} s (orchestration.trainer_wait_s). Let it finish, or "
                f"stop it in the Prefect UI; a trainer that died frees the slot within "
                f"orchestration.trainer_lease_s ({lease_s:g} s)"
            ) from None
        yield  # an error of the training itself passes through the slot's exit, not the except above


class Progress:
    """A stage's progress, in the Prefect UI (a progress artifact, updated at most every `every_s`
    seconds) and in the flow run's log."""

    def __init__(self, key: str, description: str, every_s: float = 10.0):
        self.description, self.every_s, self.last, self.shown = description, every_s, 0.0, 0.0
        self.artifact = create_progress_artifact(progress=0.0, key=key, description=description)

    def update(self, done: float, total: float, line: str | None = None) -> None:
        now = time.monotonic()
        percent = 100.0 * min(1.0, done / total) if total else 100.0
        if line:
            log(line)
        # At most every `every_s` seconds, except for a jump of 10 points or more (a finished stage).
        if now - self.last >= self.every_s or percent >= min(100.0, self.shown + 10.0):
            update_progress_artifact(self.artifact, progress=percent)
            self.last, self.shown = now, percent


def announce_shards(root: str, summary: dict[str, Any]) -> None:
    """The `dalle.shards.updated` event (resource id: the run root): new token shards to train on."""
    uri = Storage(root).uri()
    emit_event(
        event=SHARDS_EVENT,
        resource={"prefect.resource.id": uri, "dalle.root": uri},
        payload={k: v for k, v in summary.items() if isinstance(v, (int, float, str))},
    )
