"""The pipeline as a service, against a real `prefect server start` on 127.0.0.1 (SQLite): the work
pools, `prefect deploy --all` from infra/prefect.yaml, schedules, triggers and concurrency limits read
back through the API, the retraining chain (new shards -> training -> gallery) run by `dalle serve`,
and one trainer per run root."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dalle.runroot import latest_pointer
from dalle.storage import Storage
from tests.conftest import free_port
from tests.test_train import SETTINGS, make_run

REPO = Path(__file__).resolve().parent.parent
SPECS = yaml.safe_load((REPO / "infra/prefect.yaml").read_text())["deployments"]

pytestmark = pytest.mark.slow
# Registers every deployment of the file, as docs/deploy.md says.
DEPLOY = (sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml")  # fmt: skip


class Server:
    def __init__(self, home: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
            "PREFECT_SERVER_UI_ENABLED": "false",
            # As infra/docker-compose.yml runs the server: concurrency leases on disk.
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
            "OMP_NUM_THREADS": "1",
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert self.process.poll() is None, "prefect server exited"
            assert time.monotonic() < deadline, "prefect server did not start in 120 s"
            time.sleep(1)

    def run(self, *command: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(command),
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def dalle(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "flows.cli", *args, timeout=timeout)

    def start(self, *args: str, log: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args],
            env=self.env,
            cwd=REPO,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def client(self):
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        class _Client:
            def __enter__(inner):
                inner.settings = temporary_settings({PREFECT_API_URL: self.url})
                inner.settings.__enter__()
                inner.client = get_client(sync_client=True)
                return inner.client.__enter__()

            def __exit__(inner, *exc):
                inner.client.__exit__(*exc)
                inner.settings.__exit__(*exc)

        return _Client()

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("prefect-home"))
    yield server
    server.stop()


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_pools_then_every_deployment_registers_with_its_schedule_triggers_and_limits(server):
    done = server.dalle("pools")
    assert done.returncode == 0, done.stderr[-3000:]
    again = server.dalle("pools")  # idempotent
    assert again.returncode == 0, again.stderr[-3000:]

    done = server.run(*DEPLOY)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]

    with server.client() as client:
        pools = {pool.name: pool.type for pool in client.read_work_pools()}
        assert pools == {"local-process": "process", "gpu": "process"}
        deployments = {d.name: d for d in client.read_deployments()}
        assert set(deployments) == {spec["name"] for spec in SPECS}
        for spec in SPECS:
            deployment = deployments[spec["name"]]
            assert deployment.work_pool_name == spec["work_pool"]["name"]
            assert deployment.parameters == spec.get("parameters", {})
            wanted = spec.get("concurrency_limit")
            if wanted:
                assert deployment.global_concurrency_limit.limit == wanted["limit"]
                assert deployment.concurrency_options.collision_strategy.value == wanted["collision_strategy"]
        ingest = deployments["ingest"]
        assert [s.active for s in ingest.schedules] == [True]
        assert ingest.schedules[0].schedule.cron == "0 2 * * *"
        automations = client.read_automations()
        expected = {
            (name, event)
            for name, event in (
                ("train-transformer", "dalle.shards.updated"),
                ("gallery", "dalle.checkpoint.saved"),
            )
        }
        found = set()
        for automation in automations:
            for action in automation.actions:
                for name, deployment in deployments.items():
                    if getattr(action, "deployment_id", None) == deployment.id:
                        found |= {(name, event) for event in automation.trigger.expect}
        assert expected <= found


def _runs_of(client, deployment_name: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name]))
    )


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(2)


def test_served_deployments_retrain_on_new_shards_and_draw_the_new_checkpoints_gallery(server, tmp_path):
    """New shards (from the ingest/tokenize deployment) -> dalle.shards.updated -> train-transformer
    resumes for orchestration.retrain_steps more steps -> dalle.checkpoint.saved -> gallery."""
    root = str(tmp_path / "run")
    storage, _ = make_run(
        root,
        orchestration={"retrain_steps": 2, "progress_every_s": 1},
        gallery={
            "samples_per_prompt": 2,
            "top": 1,
            "batch_size": 2,
            "validation_prompts": 1,
            "completions": 1,
            "completion_samples": 1,
        },
    )
    done = server.dalle("train", "dvae", "--out", root, "--max-steps", "3")
    assert done.returncode == 0, done.stderr[-3000:]

    # Registered for work pools (as the first test does), they are not taken over by `dalle serve`
    # unless it is told to replace them.
    assert server.dalle("pools").returncode == 0
    assert server.run(*DEPLOY).returncode == 0
    refused = server.dalle("serve", "--root", root, "--deployment", "tokenize", timeout=120)
    assert refused.returncode == 2 and "is registered for work pool 'local-process'" in refused.stderr
    log = tmp_path / "serve.log"
    serving = server.start(
        "serve", "--replace", "--root", root, "--deployment", "tokenize", "--deployment", "train-transformer",
        "--deployment", "gallery", log=log,
    )  # fmt: skip
    try:
        with server.client() as client:
            _wait_for(
                lambda: len(client.read_deployments()) >= 3 and "tokenize" in log.read_text(), 120, "serve"
            )
            from prefect.deployments import run_deployment
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings({PREFECT_API_URL: server.url}):
                first = run_deployment("tokenize/tokenize", timeout=240)
            assert first.state.is_completed(), log.read_text()[-3000:]

            def finished(name):
                runs = _runs_of(client, name)
                if any(r.state.is_final() and not r.state.is_completed() for r in runs):
                    raise AssertionError(f"{name} failed: {log.read_text()[-4000:]}")
                return [r for r in runs if r.state.is_completed()]

            _wait_for(lambda: finished("train-transformer"), 240, "the triggered training run")
            assert storage.read_json(latest_pointer("transformer"))["step"] == 2  # 0 + retrain_steps
            _wait_for(lambda: finished("gallery"), 300, "the triggered gallery run")
            assert storage.exists("galleries/step_00000002/index.html")
            keys = {a.key for a in client.read_artifacts()}
            assert {"transformer-training", "transformer-loss-curve", "gallery", "tokenize-progress"} <= keys
            progress = [a for a in client.read_artifacts() if a.type == "progress"]
            assert {a.key for a in progress} >= {
                "tokenize-progress",
                "transformer-training",
                "gallery-progress",
            }
            assert all(
                a.data == 100.0 for a in progress if a.key in ("tokenize-progress", "gallery-progress")
            )
    finally:
        stop(serving)


def test_a_second_trainer_on_the_same_root_is_refused(server, tmp_path):
    root = str(tmp_path / "run")
    settings = {**SETTINGS["train_dvae"], "max_steps": 100000, "checkpoint_every": 100000, "log_every": 50}
    make_run(root, train_dvae=settings, orchestration={"trainer_lease_s": 60})
    log = tmp_path / "first.log"
    first = server.start("train", "dvae", "--out", root, log=log)
    try:
        _wait_for(lambda: "dvae: step" in log.read_text(), 180, f"the first trainer's progress: {log}")
        second = server.dalle("train", "dvae", "--out", root, "--max-steps", "2")
        assert second.returncode == 2, second.stderr[-3000:]
        assert "another trainer is running on" in second.stderr
        other = str(tmp_path / "other")
        make_run(other)
        done = server.dalle("train", "dvae", "--out", other, "--max-steps", "1")
        assert done.returncode == 0, done.stderr[-3000:]  # the limit is per run root
        assert first.poll() is None
    finally:
        # Killed outright (no chance to release): the slot's lease runs out and the server takes it back.
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    killed_at = time.monotonic()
    storage = Storage(root)

    def next_trainer_runs():
        done = server.dalle("train", "dvae", "--out", root, "--max-steps", str(2 + _step(storage)))
        if done.returncode == 2 and "another trainer is running" in done.stderr:
            return False
        assert done.returncode == 0, done.stderr[-3000:]
        return True

    _wait_for(next_trainer_runs, 180, "the killed trainer's slot to be taken back")
    assert time.monotonic() - killed_at > 30  # not at once: the lease had to run out


def _step(storage: Storage) -> int:
    return storage.read_json(latest_pointer("dvae"))["step"] if storage.exists(latest_pointer("dvae")) else 0
