"""What every flow shares: the retry rule, logging, progress in the UI, untrusted text made inert for
the UI's Markdown, the one-trainer-per-root guard, and announcing checkpoints and new shards as events
that other deployments react to."""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
import unicodedata
import urllib.parse
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


# Both Prefect UIs render artifacts' Markdown (and their descriptions, and the v1 UI every string cell
# of a table artifact) with images, links, GitHub autolinks and sanitised HTML. A crawled caption or
# URL, an error detail or a user's path must show as the text it is, so it goes into a code span.
_FLATTENED = frozenset("\r\n\t\v\f\x85\u2028\u2029")
# Control and format characters (bidi overrides and isolates, zero-width ones), surrogates, private
# and unassigned code points: shown as escapes, so nothing reorders or hides what is around them.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _visible(char: str) -> str:
    if char in _FLATTENED:
        return " "
    if unicodedata.category(char) not in _ESCAPED_CATEGORIES:
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _escape_pipes(text: str) -> str:
    """Every `|` escaped for a Markdown table row, behind an odd number of backslashes: a row splits
    at a pipe behind an even number (GFM, marked), or behind none (markdown-it)."""
    return re.sub(
        r"(\\*)\|", lambda m: m.group(1) + ("\\" if len(m.group(1)) % 2 == 0 else "\\\\") + "|", text
    )


def literal_markdown(value: object, max_chars: int = 200, table_cell: bool = False) -> str:
    """`value` (untrusted text) as Markdown that shows it literally and does nothing: one inline code
    span, line breaks flattened, control and bidi characters as escapes (\\u202e), at most `max_chars`
    characters then "…". `table_cell`: for a cell of a Markdown table, with its pipes escaped."""
    pieces: list[str] = []
    length = 0
    for char in str(value):
        piece = _visible(char)
        if length + len(piece) > max_chars:
            pieces.append("…")
            break
        pieces.append(piece)
        length += len(piece)
    text = "".join(pieces)
    if not text:
        return ""
    if table_cell:
        text = _escape_pipes(text)
    # A code span ends at the first backtick run as long as its opening one (CommonMark 6.1). The
    # renderer strips one space inside each fence, which lets the text start or end with a backtick,
    # unless the text is all spaces: then it is shown as it is, and needs none.
    fence = "`" * (1 + max((len(run) for run in re.findall("`+", text)), default=0))
    pad = "" if text.strip(" ") == "" else " "
    return f"{fence}{pad}{text}{pad}{fence}"


_LINK_SCHEMES = ("http", "https", "file")


def link_target(url: str) -> str:
    """`url` for a link artifact (a Markdown link): http(s) or file only, never javascript: or data:,
    with the characters that would end a Markdown link destination percent-encoded."""
    scheme = urllib.parse.urlsplit(url.strip()).scheme.lower()
    if scheme not in _LINK_SCHEMES:
        raise ValueError(f"refusing to link to {url[:80]!r}: only {', '.join(_LINK_SCHEMES)} URLs are linked")
    return "".join(
        urllib.parse.quote(char)
        if char in "()<>\\ " or unicodedata.category(char) in _ESCAPED_CATEGORIES
        else char
        for char in url.strip()
    )


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
        markdown=(
            f"### {model} checkpoint, step {step}\n\n{literal_markdown(uri)}\n\n"
            f"loss: {metrics.get('loss', 'n/a')}"
        ),
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


def timed(stage: str):
    """Decorate a task that has a `root` parameter (the run root): its wall time becomes a run of
    `stage` in reports/timings.json (dalle/timings.py). Put it under @task, so each retry is timed too."""
    import functools
    import inspect

    from dalle.timings import timed_stage

    def wrap(fn):
        signature = inspect.signature(fn)
        if "root" not in signature.parameters:
            raise TypeError(f"@timed needs a task with a `root` parameter; {fn.__name__} has none")

        @functools.wraps(fn)
        def timed_fn(*args, **kwargs):
            root = signature.bind(*args, **kwargs).arguments["root"]
            with timed_stage(Storage(root), stage):
                return fn(*args, **kwargs)

        return timed_fn

    return wrap
