import argparse
import json
import os
import select
import signal
import subprocess
import sys
from importlib.metadata import version

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.logging.configuration import ensure_logging_setup

from flows.cli import build_parser, main

# main() sets Prefect's logging up; done here, before a test captures stderr, Prefect's console does
# not write to a captured stream that later tests find closed.
ensure_logging_setup()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`dalle ...` in a child process, against the session's Prefect test server."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def task_attempts(flow_name: str, root: str) -> dict[str, int]:
    """Attempts of each task (by task name) of the newest `flow_name` run on `root`, counted from the
    Running states the Prefect server recorded: a retry is a second one."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=50,
        )
        (run,) = [r for r in runs if r.parameters.get("root") == root][:1]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        return {
            task.task_key.rsplit("-", 1)[0].rsplit(".", 1)[-1]: sum(
                state.type.value == "RUNNING" for state in client.read_task_run_states(task.id)
            )
            for task in tasks
        }


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("curate", "demo", "serve-demo"):
        assert command in out.stdout


def test_bad_allow_network_is_a_clear_error(tmp_path, capsys):
    code = main(
        [
            "curate",
            "--urls",
            str(tmp_path / "u.parquet"),
            "--out",
            str(tmp_path / "run"),
            "--allow-network",
            "lan",
        ]
    )
    assert code == 2
    assert "not a CIDR" in capsys.readouterr().err


def test_unknown_config_key_fails_before_anything_runs(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("dedup:\n  threshold: 0.9\n")
    code = main(["curate", "--urls", "x.parquet", "--out", str(tmp_path / "run"), "--config", str(config)])
    assert code == 2
    assert "unknown key 'dedup.threshold'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_column_fails_fast_and_names_columns(tmp_path, prefect_server):
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"link": ["http://127.0.0.1:9/x.png"], "alt": ["a red circle"]}), urls)
    done = run_cli("curate", "--urls", str(urls), "--out", str(tmp_path / "run"))
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr
    assert "URL column 'url' not found in urls.parquet; columns are: link, alt" in err
    # prepare_input is retried after a passing failure, never after a user error: it ran once.
    assert task_attempts("curate", str(tmp_path / "run")) == {"prepare_input": 1}


@pytest.mark.parametrize("payload", [b"", b"\x00\x01garbage"])
def test_malformed_url_list_fails_fast(tmp_path, prefect_server, payload):
    urls = tmp_path / "urls.parquet"
    urls.write_bytes(payload)
    done = run_cli("curate", "--urls", str(urls), "--out", str(tmp_path / "run"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "not a readable Parquet file" in done.stderr
    assert "Traceback" not in done.stderr.split("error:")[-1]


def test_without_the_demo_plugin_the_command_line_still_works():
    # As if demo/ were deleted: `import demo` fails, the plug-in's commands are gone, the rest stays.
    code = (
        "import sys; sys.modules['demo'] = None\n"
        "import flows.cli, flows.pipeline, dalle.sample.gallery\n"
        "sys.exit(flows.cli.main(['--help']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pipeline" in out.stdout and "train" in out.stdout
    assert "serve-demo" not in out.stdout and "  demo " not in out.stdout


def test_train_takes_the_model_to_train(tmp_path, prefect_server):
    # In a child process: a flow run inside the test process would bind Prefect's console logger to
    # pytest's captured output, which later tests find closed.
    done = run_cli("train", "dvae", "--out", str(tmp_path / "nothing-here"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "has no config.yaml" in done.stderr
    wrong = run_cli("train", "vae", "--out", str(tmp_path / "nothing-here"))
    assert wrong.returncode == 2 and "invalid choice: 'vae'" in wrong.stderr


def test_an_error_inside_a_flow_is_one_line(tmp_path, prefect_server):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_cli("train", "--out", str(empty))
    shown = done.stdout + done.stderr
    assert done.returncode == 2, shown[-3000:]
    assert "Traceback" not in shown, shown[-3000:]
    errors = [line for line in shown.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "has no config.yaml" in errors[0], shown[-3000:]
    assert task_attempts("train-transformer", str(empty)) == {"train_model": 1}  # a user error: no retry
    # Only the terminal is spared the traceback: Prefect's API (the UI) has it.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterLevel
    from prefect.client.schemas.sorting import LogSort

    with get_client(sync_client=True) as client:
        errors_logged = client.read_logs(
            LogFilter(level=LogFilterLevel(ge_=40)), limit=200, sort=LogSort.TIMESTAMP_DESC
        )  # the newest errors: other tests' runs log to the same server
        logged = [log.message for log in errors_logged if str(empty) in log.message]
    assert any("Traceback" in message for message in logged), logged

    debug = run_cli("--debug", "train", "--out", str(empty))
    assert debug.returncode == 2 and "Traceback" in debug.stderr

    as_json = run_cli("--json", "train", "--out", str(empty))
    assert as_json.returncode == 2
    document = json.loads(as_json.stdout)
    assert document["kind"] == "user" and "has no config.yaml" in document["error"]
    assert "error: " in as_json.stderr and "Traceback" not in as_json.stderr


def test_json_result_alone_on_stdout(tmp_path, capsys, monkeypatch):
    import flows.tokens

    def tokenize_flow(root, config):
        print("tokenizing")  # prose: stderr under --json
        return f"{root}/tokens"

    monkeypatch.setattr(flows.tokens, "tokenize_flow", tokenize_flow)
    assert main(["--json", "tokenize", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"uri": f"{tmp_path}/tokens"} and out.count("\n") == 1
    assert "tokenizing" in err
    assert main(["tokenize", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"tokenizing\n{tmp_path}/tokens\n"


def test_unexpected_error_is_one_line_with_a_hint(tmp_path, capsys, monkeypatch):
    import flows.tokens

    def tokenize_flow(root, config):
        raise KeyError("shard")

    monkeypatch.setattr(flows.tokens, "tokenize_flow", tokenize_flow)
    assert main(["tokenize", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == "error: KeyError: 'shard'\nrerun with --debug for the traceback\n"
    assert main(["--json", "tokenize", "--out", str(tmp_path)]) == 1
    assert json.loads(capsys.readouterr().out) == {"error": "KeyError: 'shard'", "kind": "internal"}
    assert main(["--debug", "tokenize", "--out", str(tmp_path)]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_json_usage_error(capsys):
    assert main(["--json", "train", "vae", "--out", "x"]) == 2
    out, err = capsys.readouterr()
    document = json.loads(out)
    assert document["kind"] == "user" and "invalid choice: 'vae'" in document["error"]
    assert "usage: dalle train" in err


def test_json_serve_demo_prints_its_address_then_serves(tmp_path):
    command = [sys.executable, "-m", "flows.cli", "--json", "serve-demo", "--out", str(tmp_path)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        try:
            assert select.select([child.stdout], [], [], 120)[0], "no result within 2 minutes"
            served = json.loads(child.stdout.readline())
        finally:
            child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err[-2000:]
    assert out == ""
    assert served["base_url"].startswith("http://127.0.0.1:")
    assert pq.read_table(served["urls"]).num_rows == served["images"] > 0


def test_version(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out == f"dalle {version('dalle-pipeline')}\n"


def test_every_command_has_a_description_and_examples():
    parser = build_parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    assert {"curate", "train", "demo", "serve-demo"} <= set(commands.choices)
    for name, command in commands.choices.items():
        shown = command.format_help()
        assert command.description and command.description.splitlines()[0] in shown, name
        assert "\nexamples:\n  dalle " in shown, name


SAMPLE = ["sample", "--checkpoint", "runs/x/models/transformer/step_00000001", "--prompt", "a", "--out", "o"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--out", "x", "--max-steps", "0"], "--max-steps: must be a positive integer, not '0'"),
        (["serve-demo", "--out", "x", "--port", "70000"], "--port: must be a port from 0"),
        (["serve-demo", "--out", "x", "--host", "0.0.0.0"], "--host: must be a loopback address"),
        (["serve-demo", "--out", "x", "--port", "-1"], "--port: must be a port from 0"),
        (["serve-demo", "--out", "x", "--host", "8.8.8.8"], "--host: must be a loopback address"),
        (["train", "--out", "x", "--max-steps", "-5"], "--max-steps: must be a positive integer, not '-5'"),
        (["train", "--out", "x", "--max-steps", "1.5"], "--max-steps: must be a positive integer, not '1.5'"),
        (["train", "--out", "x", "--more-steps", "0"], "--more-steps: must be a positive integer, not '0'"),
        (["train", "--out", " "], "--out: must be a local path or an s3:// URI, not ' '"),
        (["demo", "--out", ""], "--out: must be a local path or an s3:// URI, not ''"),
        (["serve-demo", "--out", "\t"], "--out: must be a local path or an s3:// URI"),
        (["curate", "--urls", "", "--out", "x"], "--urls: must be a local path or an s3:// URI, not ''"),
        (["tokenize", "--out", "x", "--config", ""], "--config: must be a local path or an s3:// URI"),
        (["serve", "--limit", "0"], "--limit: must be a positive integer, not '0'"),
        (["serve", "--prefect-file", ""], "--prefect-file: must be a local path or an s3:// URI"),
        (SAMPLE + ["--temperature", "nan"], "--temperature: must be a finite number, not 'nan'"),
        (SAMPLE + ["--top-p", "inf"], "--top-p: must be a finite number, not 'inf'"),
        (SAMPLE + ["--cond-scale=-inf"], "--cond-scale: must be a finite number, not '-inf'"),
        (SAMPLE + ["--cond-scale", "strong"], "--cond-scale: must be a finite number, not 'strong'"),
        (SAMPLE + ["--top-k", "0"], "--top-k: must be a positive integer, not '0'"),
        (SAMPLE + ["-n", "-3"], "-n: must be a positive integer, not '-3'"),
        (SAMPLE + ["--top", "0"], "--top: must be a positive integer, not '0'"),
        (SAMPLE + ["--seed", "x"], "--seed: invalid int value: 'x'"),
    ],
)
def test_bad_numbers_and_hosts_are_usage_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert [line for line in err.splitlines() if "error:" in line] == [line for line in err.splitlines()][-1:]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("deployments: [unclosed\n", "is not valid YAML"),
        ("name: dalle-pipeline\n", "has no list of deployments"),
        ("deployments:\n  - entrypoint: flows/train.py:train_dvae_flow\n", "deployment 1 of .* has no name"),
        ("deployments:\n  - name: train\n    entrypoint: flows/train.py\n", "'train' .* needs an entrypoint"),
    ],
)
def test_a_broken_deployments_file_is_one_line(tmp_path, capsys, text, message):
    import re

    path = tmp_path / "prefect.yaml"
    path.write_text(text)
    assert main(["serve", "--prefect-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.startswith("error: ") and len(err.splitlines()) == 1, err
