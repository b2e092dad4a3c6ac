import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main


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
