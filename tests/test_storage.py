import logging
import os
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pytest

from dalle.runroot import checkpoint_dir, latest_pointer
from dalle.storage import Storage, StorageError


def test_write_read_roundtrip(run_root):
    storage = Storage(run_root)
    uri = storage.write_bytes("reports/a.bin", b"\x00\x01payload")
    assert uri.endswith("reports/a.bin")
    assert storage.read_bytes("reports/a.bin") == b"\x00\x01payload"
    storage.write_json("reports/b.json", {"k": [1, 2]})
    assert storage.read_json("reports/b.json") == {"k": [1, 2]}
    table = pa.table({"uid": ["a", "b"], "n": [1, 2]})
    storage.write_table("curated/00000.parquet", table)
    assert storage.read_table("curated/00000.parquet").equals(table)
    assert storage.list("curated", ".parquet") == ["curated/00000.parquet"]
    assert storage.read_tables("curated").num_rows == 2
    storage.delete("reports/a.bin")
    assert not storage.exists("reports/a.bin")


def test_overwrite_replaces_whole_file(run_root):
    storage = Storage(run_root)
    storage.write_bytes("x.txt", b"first version, long" * 100)
    storage.write_bytes("x.txt", b"second")
    assert storage.read_bytes("x.txt") == b"second"


def test_missing_file_is_a_clear_error(run_root):
    with pytest.raises(StorageError, match="does not exist"):
        Storage(run_root).read_bytes("nope.json")


def test_local_write_leaves_no_partial_file_on_failure(tmp_path, monkeypatch):
    storage = Storage(tmp_path)
    storage.write_bytes("a.bin", b"old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes("a.bin", b"new content that never lands")
    monkeypatch.undo()
    assert storage.read_bytes("a.bin") == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_missing_bucket_fails_early_with_hint(s3_endpoint):
    with pytest.raises(StorageError, match="bucket exists"):
        Storage("s3://no-such-bucket-here/run").check_writable()


def _messages(err: BaseException | None) -> list[str]:
    """An exception's message and those of its causes and contexts, shown or suppressed."""
    seen = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return [f"{type(e).__name__}: {e}" for e in seen]


def test_credentials_appear_in_no_message_link_or_log(s3_bucket, monkeypatch, caplog):
    key_id, secret = "AKIDRECOGNISABLE0001", "secret-that-must-never-show-7f3a9c"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    caplog.set_level(logging.DEBUG)  # everything botocore, aiobotocore, s3fs and fsspec log
    storage = Storage(f"{s3_bucket}/run")
    storage.write_bytes("reports/a.json", b"{}")
    assert storage.read_bytes("reports/a.json") == b"{}"
    assert storage.list("reports") == ["reports/a.json"]
    with pytest.raises(StorageError) as missing:
        storage.read_bytes("reports/missing.json")
    with pytest.raises(StorageError, match="bucket exists") as no_bucket:
        Storage("s3://no-such-bucket-for-secrets/run").check_writable()
    link = storage.browser_url("reports/a.json")
    assert key_id in link  # a presigned URL names the key id by design, never the secret

    # The logs were captured: botocore's DEBUG records of each signed request are among them.
    assert any(
        r.name.startswith(("botocore", "aiobotocore")) and r.levelno == logging.DEBUG for r in caplog.records
    )
    texts = [repr(storage), storage.uri("reports/a.json"), link, caplog.text]
    texts += _messages(missing.value) + _messages(no_bucket.value)
    for text in texts:
        assert secret not in text


# --- paths stay inside the run root ---------------------------------------------------------------
@pytest.mark.parametrize("root", ["local", "s3://bucket/run"])
@pytest.mark.parametrize(
    "rel",
    [
        "../../etc/x",
        "..",
        "checkpoints/../../other-root/x",
        "a/b/../../../x",
        "/../x",
        "//../../etc/passwd",
        "..\\..\\x",
        "reports\\a.json",
        "reports/a\x00.json",
    ],
)
def test_a_path_that_leaves_the_root_is_refused(tmp_path, root, rel):
    # Deep enough that each escape, had it been written, would land inside tmp_path.
    storage = Storage(tmp_path / "a/b/c/run" if root == "local" else root)
    with pytest.raises(StorageError, match="paths must stay inside the run root") as refused:
        storage.path(rel)
    assert repr(rel) in str(refused.value)
    with pytest.raises(StorageError, match="paths must stay inside the run root"):
        storage.write_bytes(rel, b"x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("rel", "inside"),
    [
        ("a/./b", "a/b"),
        ("/model.json", "model.json"),  # what joining the root's own folder '' with a name gives
        ("//etc/passwd", "etc/passwd"),
        ("reports/", "reports"),
        ("a//b", "a/b"),
        ("models/x/../transformer/step_00000001", "models/transformer/step_00000001"),
        ("", ""),
        (".", ""),
        ("a/..", ""),
        ("..a/b..", "..a/b.."),
    ],
)
def test_a_path_inside_the_root_is_normalised(tmp_path, rel, inside):
    storage = Storage(tmp_path)
    assert storage.path(rel) == (f"{tmp_path}/{inside}" if inside else str(tmp_path))


def test_listing_the_root_itself_gives_paths_relative_to_it(tmp_path):
    storage = Storage(tmp_path)
    storage.write_bytes("config.yaml", b"{}")
    assert storage.list("") == ["config.yaml"]
    assert storage.read_bytes(storage.list("")[0]) == b"{}"


# --- durable local writes ------------------------------------------------------------------------
def test_a_local_write_syncs_the_file_then_its_folder_and_each_new_folders_parent(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        info = os.fstat(fd)
        synced.append(("folder" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino))
        real_fsync(fd)

    def inode(path):
        return os.stat(path).st_ino

    monkeypatch.setattr(os, "fsync", recording_fsync)
    storage = Storage(tmp_path / "run")
    storage.write_bytes("a/b/c.bin", b"payload")
    run = tmp_path / "run"
    assert synced == [
        ("folder", inode(tmp_path)),  # run/ was created in it
        ("folder", inode(run)),  # run/a/
        ("folder", inode(run / "a")),  # run/a/b/
        ("file", inode(run / "a/b/c.bin")),  # the data, before the rename
        ("folder", inode(run / "a/b")),  # the rename
    ]
    synced.clear()
    storage.write_bytes("a/b/c.bin", b"again")
    assert synced == [("file", inode(run / "a/b/c.bin")), ("folder", inode(run / "a/b"))]


# --- temporaries a killed writer left -----------------------------------------------------------
def test_stale_temporaries_are_removed_and_fresh_ones_and_real_files_kept(tmp_path):
    storage = Storage(tmp_path)
    storage.write_bytes("curated/00000.parquet", b"data")
    storage.write_bytes("reports/old.json", b"{}")
    killed = tmp_path / "curated/.tmp-killed"
    killed_deep = tmp_path / "models/transformer/step_00000001/.tmp-weights"
    in_progress = tmp_path / "reports/.tmp-writing"
    for path in (killed, killed_deep, in_progress):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    two_hours_ago = time.time() - 2 * 3600
    for path in (killed, killed_deep, tmp_path / "reports/old.json"):
        os.utime(path, (two_hours_ago, two_hours_ago))

    assert storage.remove_stale_temporaries() == 2
    assert not killed.exists() and not killed_deep.exists()
    assert in_progress.exists()  # another process may be writing it right now
    assert storage.read_bytes("reports/old.json") == b"{}"
    assert storage.read_bytes("curated/00000.parquet") == b"data"
    assert storage.remove_stale_temporaries() == 0
    assert storage.remove_stale_temporaries("reports", older_than_s=0) == 1
    assert sorted(os.listdir(tmp_path / "reports")) == ["old.json"]


# --- a full disk, a folder the user may not write -------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs mounted for the test (needs root or CAP_SYS_ADMIN): a real disk that fills up."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_file(tiny_disk):
    storage = Storage(tiny_disk)
    storage.write_bytes("reports/a.json", b"old")
    with pytest.raises(StorageError, match=r"cannot write .*/reports/a\.json: the disk is full; free space"):
        storage.write_bytes("reports/a.json", b"x" * 256 * 1024)
    assert storage.read_bytes("reports/a.json") == b"old"
    assert os.listdir(tiny_disk / "reports") == ["a.json"]


def _as_unprivileged(work) -> str:
    """`work()` (which returns a string) as a user that file permissions bind: in this process when it
    is not root's, else in a forked child that becomes `nobody`. Skips when neither can be had."""
    if os.geteuid() != 0:
        return work()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            signal.alarm(60)
            os.close(read_end)
            try:
                os.setgid(65534)
                os.setuid(65534)
            except PermissionError as err:
                answer, code = f"cannot become nobody: {err}", 3
            else:
                try:
                    answer = work()
                except BaseException as err:  # noqa: BLE001 - reported to the parent, which fails on it
                    answer, code = f"{type(err).__name__}: {err}", 1
            os.write(write_end, answer.encode())
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    while select.select([read_end], [], [], 90)[0] and (chunk := os.read(read_end, 65536)):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    answer = b"".join(chunks).decode()
    if os.waitstatus_to_exitcode(status) == 3:
        pytest.skip(answer)
    assert os.waitstatus_to_exitcode(status) == 0, answer
    return answer


def test_a_read_only_folder_is_a_clear_error_and_keeps_the_previous_file():
    # Outside pytest's own tmp folder, which only root may enter.
    folder = Path(tempfile.mkdtemp(prefix="dalle-read-only-"))
    try:
        folder.chmod(0o755)
        storage = Storage(folder)
        storage.write_bytes("a.json", b"old")
        folder.chmod(0o555)

        def write_both() -> str:
            answers = []
            for rel in ("a.json", "new/b.json"):
                try:
                    storage.write_bytes(rel, b"new")
                    answers.append(f"{rel} written")
                except StorageError as err:
                    answers.append(str(err))
            return "\n".join(answers)

        replaced, created = _as_unprivileged(write_both).splitlines()
        assert replaced == (
            f"cannot write {folder}/a.json: permission denied; fix the folder's permissions (or owner) "
            "and run again (Permission denied)"
        )
        assert created.startswith(f"cannot write {folder}/new/b.json: permission denied; fix the folder's")
        assert storage.read_bytes("a.json") == b"old"
        assert os.listdir(folder) == ["a.json"]
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)


def test_layout_helpers():
    assert checkpoint_dir("clip", 42) == "models/clip/step_00000042"
    assert latest_pointer("dvae") == "models/dvae/latest.json"


def test_unsupported_scheme():
    with pytest.raises(StorageError, match="local folder or s3://"):
        Storage("gs://bucket/x")
