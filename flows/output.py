"""What the `dalle` command line shows: a command's result (with --json, one JSON document on stdout and
all prose on stderr), a failure as one line, and Prefect's terminal logs without tracebacks unless
--debug. Prefect's API logs (the UI) keep their tracebacks."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from dalle.errors import USER_ERRORS

DEBUG_HINT = "rerun with --debug for the traceback"


@dataclass
class _Command:
    """How the running command shows its result."""

    as_json: bool = False
    debug: bool = False
    stdout: TextIO | None = None  # under --json: the real stdout, while prints go to stderr
    shown: bool = False


_command = _Command()


def show_result(document: Any, text: str | None = None) -> None:
    """Show what the command made: with --json `document` as one JSON line on stdout, else `text`
    (default: `document` as indented JSON). Once per command; a server shows it when ready."""
    if not _command.as_json:
        print(json.dumps(document, indent=2, default=str) if text is None else text, flush=True)
        return
    if _command.shown:
        raise RuntimeError("a command shows one result under --json")
    _command.shown = True
    print(json.dumps(document, default=str), file=_command.stdout, flush=True)


def show_error(err: Exception) -> int:
    """Report a failed command as one line on stderr (after its traceback under --debug), and with
    --json as {"error", "kind"} on stdout; returns the exit status: 2 for a user error, 1 otherwise."""
    user = isinstance(err, USER_ERRORS)
    message = str(err) if user else f"{type(err).__name__}: {err}".removesuffix(": ")
    if _command.debug:
        traceback.print_exception(err)
    print(f"error: {message}", file=sys.stderr)
    if not user and not _command.debug:
        print(DEBUG_HINT, file=sys.stderr)
    if _command.as_json and not _command.shown:
        _command.shown = True
        print(json.dumps({"error": message, "kind": "user" if user else "internal"}), file=_command.stdout)
    return 2 if user else 1


@contextlib.contextmanager
def command_output(*, as_json: bool, debug: bool) -> Iterator[None]:
    """The terminal set up for one command: Prefect's console without tracebacks unless `debug`;
    with `as_json`, everything written to stdout goes to stderr but the one result (`null` if none)."""
    global _command
    quiet_prefect_console(not debug)
    if not as_json:
        _command = _Command(debug=debug)
        try:
            yield
        finally:
            _command = _Command()
        return
    with _stdout_to_stderr() as stdout:
        _command = _Command(as_json=True, debug=debug, stdout=stdout)
        try:
            yield
            if not _command.shown:
                show_result(None)
        finally:
            _command = _Command()


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[TextIO]:
    """Everything written to stdout, by Python or (where stdout is a file descriptor) by libraries and
    child processes, goes to stderr; yields a stream to the real stdout."""
    sys.stdout.flush()
    try:
        out_fd, err_fd = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # e.g. a test's captured output
        real = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            yield real
        return
    saved = os.dup(out_fd)
    os.dup2(err_fd, out_fd)
    try:
        with (
            open(saved, "w", encoding=sys.stdout.encoding, closefd=False) as real,
            contextlib.redirect_stdout(sys.stderr),
        ):
            yield real
    finally:
        sys.stdout.flush()
        os.dup2(saved, out_fd)
        os.close(saved)


class _WithoutTraceback(logging.Formatter):
    """`formatter`'s line for a record, without the record's traceback. It formats a copy: the
    record other handlers see (Prefect's API handler) keeps it."""

    def __init__(self, formatter: logging.Formatter | None):
        super().__init__()
        self.formatter = formatter or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            record = copy.copy(record)
            record.exc_info = record.exc_text = record.stack_info = None
        return self.formatter.format(record)


def quiet_prefect_console(quiet: bool = True) -> None:
    """Prefect's terminal handlers (its console and its internal debug stream) without tracebacks
    (`quiet`), or with them again."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # Prefect sets its logging up when flows are first imported; now, here
    for handler in _prefect_terminal_handlers():
        wrapped = isinstance(handler.formatter, _WithoutTraceback)
        if quiet and not wrapped:
            handler.setFormatter(_WithoutTraceback(handler.formatter))
        elif not quiet and wrapped:
            handler.setFormatter(handler.formatter.formatter)


def _prefect_terminal_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    handlers = {h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers}
    return [
        h
        for h in handlers
        if isinstance(h, logging.StreamHandler)
        and not isinstance(h, logging.FileHandler)
        and type(h).__module__.startswith("prefect.")
    ]
