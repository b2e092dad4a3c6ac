"""What every flow shares: the retry rule, logging, and announcing a checkpoint to the dashboard."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from dalle.errors import USER_ERRORS
from dalle.runroot import split_checkpoint_uri

CHECKPOINT_EVENT = "dalle.checkpoint.saved"


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
