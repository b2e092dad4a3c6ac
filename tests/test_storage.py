import os

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


def test_credentials_never_in_repr_or_uri(s3_bucket):
    storage = Storage(f"{s3_bucket}/run")
    text = repr(storage) + storage.uri("x")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text
    assert os.environ["AWS_ACCESS_KEY_ID"] not in text


def test_layout_helpers():
    assert checkpoint_dir("clip", 42) == "models/clip/step_00000042"
    assert latest_pointer("dvae") == "models/dvae/latest.json"


def test_unsupported_scheme():
    with pytest.raises(StorageError, match="local folder or s3://"):
        Storage("gs://bucket/x")
