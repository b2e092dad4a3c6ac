"""SIGKILL a `dalle` command at a random moment and run it again.

The command runs as `python -m flows.cli ...` in its own process group (its Prefect engine, worker
processes and torchrun children with it), and the whole group gets SIGKILL. The moments are drawn
from a seeded RNG: `KILL_SEED` replays a failure (the seed is printed on every run, pytest shows it
with the failure), `KILL_POINTS` sets how many kill points each stage gets (default 1).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kill_seed() -> int:
    """`KILL_SEED` if set, else a fresh one; printed so that a failure can be replayed."""
    seed = (
        int(os.environ["KILL_SEED"])
        if os.environ.get("KILL_SEED")
        else random.SystemRandom().randrange(2**31)
    )
    print(f"kill seed: KILL_SEED={seed}", flush=True)
    return seed


def kill_points() -> int:
    return max(1, int(os.environ.get("KILL_POINTS") or 1))


def cli_env() -> dict[str, str]:
    """The environment of a `dalle` child: this one, pointed at the session's Prefect test server."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value() or "", "PYTHONPATH": REPO}


@dataclass
class Outcome:
    returncode: int
    seconds: float
    killed: bool
    stderr: str = field(repr=False, default="")


def run_cli(args: list[str], kill_after: float | None = None, timeout: float = 600) -> Outcome:
    """`dalle args...` in its own process group; with `kill_after`, SIGKILL the group after that many
    seconds unless it finished first (then `killed` is False)."""
    started = time.monotonic()
    with open(os.devnull, "wb") as devnull:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=REPO,
            env=cli_env(),
            stdout=devnull,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own session and process group: the kill reaches every child
        )
    try:
        try:
            _, err = process.communicate(timeout=kill_after if kill_after is not None else timeout)
            return Outcome(
                process.returncode, time.monotonic() - started, False, err.decode(errors="replace")
            )
        except subprocess.TimeoutExpired:
            if kill_after is None:
                raise
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, err = process.communicate()
        return Outcome(process.returncode, time.monotonic() - started, True, err.decode(errors="replace"))
    finally:
        if process.poll() is None:  # a failed assertion or KeyboardInterrupt above
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


def kill_moments(rng: random.Random, duration: float, points: int) -> list[float]:
    """`points` moments spread over an uninterrupted run of `duration` seconds: one drawn from each
    of `points` equal slices of [30 %, 95 %] of it (the first seconds are Python and Prefect starting)."""
    low, high = 0.3 * duration, 0.95 * duration
    width = (high - low) / points
    return sorted(round(low + width * (i + rng.random()), 3) for i in range(points))


def kill_then_finish(args: list[str], at: float) -> tuple[Outcome, Outcome]:
    """Run `args`, SIGKILL its group after `at` seconds, then run it again to the end."""
    first = run_cli(args, kill_after=at)
    if first.killed:
        free_trainer_slots()
    print(f"  killed {args[0]} at {at:.2f}s: {'yes' if first.killed else 'no, it had finished'}", flush=True)
    again = run_cli(args)
    assert again.returncode == 0, f"the run after a kill at {at:.2f}s failed:\n{again.stderr[-4000:]}"
    return first, again


def free_trainer_slots() -> None:
    """Free the trainer slots a killed command held, as an operator does in the Prefect UI: the
    server would free them only when their lease (orchestration.trainer_lease_s, at least 60 s) ends,
    and until then the re-run is refused with TrainerBusy."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        for limit in client.read_global_concurrency_limits(limit=200):
            if limit.name.startswith("dalle-trainer-") and limit.active_slots:
                client.update_global_concurrency_limit(
                    limit.name, GlobalConcurrencyLimitUpdate(active_slots=0)
                )
