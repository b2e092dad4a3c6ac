"""Child processes that the pipeline starts (img2dataset's crawl, torchrun): their output goes to the
caller's log, and they are stopped, with every process they started, past a time limit, when they
hang without output, or when the caller is interrupted."""

from __future__ import annotations

import math
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable

PROGRESS_LOG_EVERY_S = 10.0


def run_watched(
    command: list[str],
    log: Callable[[str], None],
    max_s: float = math.inf,
    stall_s: float = math.inf,
    env: dict[str, str] | None = None,
) -> tuple[int, str | None]:
    """Run `command`, passing its output lines to `log` (progress-bar updates at most every
    PROGRESS_LOG_EVERY_S); stop its whole process group past `max_s` seconds, after `stall_s`
    seconds without output, or when this process is interrupted (Ctrl-C, a flow's time limit).
    Returns (exit status, why it was stopped or None)."""
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,  # its own process group: stopping it stops img2dataset's workers too
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in process.stdout:  # universal newlines: a progress bar's \r updates come as lines
            lines.put(line.rstrip())
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        return _watch(process, lines, log, max_s, stall_s)
    except BaseException:
        stop_group(process)
        raise


def _watch(process, lines, log, max_s, stall_s) -> tuple[int, str | None]:
    start = last_output = time.monotonic()
    last_progress, pending_progress, stopped = 0.0, None, None
    while True:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            line = ""
        now = time.monotonic()
        if line is None:
            break
        if line:
            last_output = now
            if "it/s" in line or "s/it" in line or "%|" in line:  # a progress-bar update
                pending_progress = line
                if now - last_progress >= PROGRESS_LOG_EVERY_S:
                    log(line)
                    last_progress, pending_progress = now, None
            else:
                log(line)
        if now - start > max_s:
            stopped = f"it ran past crawl.max_crawl_s ({max_s:g} s)"
        elif now - last_output > stall_s:
            stopped = f"img2dataset printed nothing for crawl.stall_s ({stall_s:g} s)"
        if stopped:
            stop_group(process)
            break
    if pending_progress:
        log(pending_progress)
    return process.wait(), stopped


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process's group, then SIGKILL if it is still there after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
