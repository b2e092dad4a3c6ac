"""The install is sound: img2dataset's `dataclasses` backport is gone and Prefect's
ephemeral API server starts and runs a flow (it dies at start-up when the backport
shadows the standard library)."""

import importlib.util
import os
import subprocess
import sys
import sysconfig

FLOW = """
from prefect import flow, task

@task
def double(x):
    return 2 * x

@flow
def smoke(x: int) -> int:
    return double(x) + 1

print("RESULT", smoke(20))
"""


def test_dataclasses_is_the_standard_library():
    origin = importlib.util.find_spec("dataclasses").origin
    assert os.path.dirname(origin) == sysconfig.get_paths()["stdlib"], (
        f"dataclasses comes from {origin}: the backport shadows the standard library; "
        "run `pip uninstall -y dataclasses` (the Makefile does)"
    )


def test_flow_runs_on_ephemeral_api(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    done = subprocess.run(
        [sys.executable, "-c", FLOW],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert "RESULT 41" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert "unexpected keyword argument 'slots'" not in done.stderr
