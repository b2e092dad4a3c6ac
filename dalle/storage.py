"""One storage API for a local folder and `s3://bucket/prefix`.

Paths inside a run are relative to the run root and always use '/'. Which stage writes
where is `dalle.runroot`'s business.

A path that would leave the run root ('..' above it) is refused.

Writes are atomic: a local file is written under a temporary name in the same
folder, synced, renamed, and the folder synced, so a file written after another
(a manifest last) is never found without it, even after a power loss; an S3 object
is uploaded from a finished local temporary file, so it appears only once complete.
Endpoint and credentials for S3 come from the standard AWS environment variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), never from parameters, and are never printed.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import posixpath
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from dalle.errors import UserError


class StorageError(UserError, RuntimeError):
    """A storage location that cannot be used; the message says what to check."""


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as the Parquet file the run root stores (for writers that also need its sha256)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


# A local write's temporary file, in the target's folder until renamed: never listed, and removed by
# `Storage.remove_stale_temporaries` once a killed writer has left it behind.
TEMP_PREFIX = ".tmp-"
STALE_TEMPORARY_S = 3600.0  # far longer than any one write takes

# What a failed local write means for the user, by errno: what to do about it.
_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full; free space there (or use a larger volume) and run again",
    errno.EDQUOT: "the disk quota is used up; free space there (or raise the quota) and run again",
    errno.EACCES: "permission denied; fix the folder's permissions (or owner) and run again",
    errno.EPERM: "operation not permitted; fix the folder's permissions (or owner) and run again",
    errno.EROFS: "the file system is read-only; mount it read-write or choose another root",
}


def path_inside_root(rel: str, root: str = "the run root") -> str:
    """`rel` normalised ('a/./b/' -> 'a/b', the root itself -> ''); raises StorageError for a path that
    climbs out of the run root with '..', or holds a NUL or a backslash. A leading '/' means the root
    itself, as when a caller joins the root's own folder, '', with a file name."""
    norm = posixpath.normpath(rel.lstrip("/") or ".")
    if (
        "\x00" in rel
        or "\\" in rel  # a separator to Windows and to some S3 gateways, not to posixpath
        or norm == ".."
        or norm.startswith("../")
    ):
        raise StorageError(
            f"refused path {rel!r} under {root}: paths must stay inside the run root (with '/' as "
            "separator, no '..' above the root, no NUL)"
        )
    return "" if norm == "." else norm


def _fsync_folder(folder: str) -> None:
    """Make a folder's entries (a rename, a new file or subfolder) durable."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:
        # Some file systems (certain FUSE and network mounts) cannot sync a folder and say so.
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _make_folders(folder: str) -> None:
    """os.makedirs, then sync the parent of each folder it created, so the new path survives a power loss."""
    missing = []
    path = folder
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if not missing:
        return
    os.makedirs(folder, exist_ok=True)
    for created in reversed(missing):
        _fsync_folder(os.path.dirname(created))


# How the S3 client meets an endpoint that misbehaves (tests/test_s3_faults.py puts a proxy that injects
# each of these in front of moto):
# - 500 InternalError, 503 SlowDown, connection reset before or after the request: botocore's
#   standard retry mode retries them up to S3_MAX_ATTEMPTS attempts in all, backing off exponentially
#   with jitter; s3fs retries what botocore gives up on S3FS_RETRIES more times.
# - A stalled answer: S3_READ_TIMEOUT_S without a byte ends the attempt (a retried read timeout);
#   S3_CONNECT_TIMEOUT_S bounds a connection that is never accepted. An operator overrides the two
#   with DALLE_S3_READ_TIMEOUT_S and DALLE_S3_CONNECT_TIMEOUT_S (seconds, a positive number).
# - A body shorter than its Content-Length: aiobotocore's StreamingBody checks the length and raises
#   (aiohttp's ClientPayloadError), and s3fs retries the GET, so a read never returns short bytes.
# Every retried request is idempotent (whole-object PUT, GET, HEAD, LIST, DELETE), so a PUT whose
# answer was lost is simply sent again and the object is whole either way.
S3_MAX_ATTEMPTS = 8
S3FS_RETRIES = 5
S3_CONNECT_TIMEOUT_S = 10.0
S3_READ_TIMEOUT_S = 60.0
S3_CONNECT_TIMEOUT_ENV = "DALLE_S3_CONNECT_TIMEOUT_S"
S3_READ_TIMEOUT_ENV = "DALLE_S3_READ_TIMEOUT_S"


def s3_timeout(variable: str, default: float) -> float:
    """Seconds from the environment variable `variable` (unset or empty: `default`); anything but a
    positive finite number is a StorageError that names the variable and what to set."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):  # also refuses NaN
        raise StorageError(
            f"{variable}={text!r} is not a timeout: set it to a positive number of seconds "
            f"(e.g. {variable}={default:g}) or unset it for the default, {default:g} s"
        )
    return seconds


def _s3_filesystem() -> fsspec.AbstractFileSystem:
    # s3fs reads AWS_ENDPOINT_URL and the credential chain itself; skip its listing cache so
    # that a file another process just wrote is seen. Retries and timeouts: see the constants above.
    fs = fsspec.filesystem(
        "s3",
        skip_instance_cache=True,
        use_listings_cache=False,
        config_kwargs={
            "retries": {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
            "connect_timeout": s3_timeout(S3_CONNECT_TIMEOUT_ENV, S3_CONNECT_TIMEOUT_S),
            "read_timeout": s3_timeout(S3_READ_TIMEOUT_ENV, S3_READ_TIMEOUT_S),
        },
    )
    fs.retries = S3FS_RETRIES  # a class attribute in s3fs 2026.9, not an argument
    return fs


def filesystem_for(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path inside it for a local path or s3:// URI."""
    if is_s3(uri):
        return _s3_filesystem(), uri[len("s3://") :].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported location {uri!r}: use a local folder or s3://bucket/prefix")
    path = uri.removeprefix("file://")
    return fsspec.filesystem("file"), str(Path(path).expanduser().resolve())


class Storage:
    """A run root: read and write files relative to it, atomically."""

    def __init__(self, root: str | os.PathLike[str]):
        root = str(root)
        self.fs, self._base = filesystem_for(root)
        self.root = f"s3://{self._base}" if is_s3(root) else self._base
        self.is_s3 = is_s3(root)

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    # --- paths -----------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """Path of `rel` inside the filesystem (no scheme); a path that leaves the root is refused."""
        rel = path_inside_root(rel, self.root)
        return f"{self._base}/{rel}" if rel else self._base

    def uri(self, rel: str = "") -> str:
        """Full URI of `rel` (s3://... or an absolute local path), for img2dataset, logs and reports."""
        return f"s3://{self.path(rel)}" if self.is_s3 else self.path(rel)

    def browser_url(self, rel: str, expires_s: int = 7 * 24 * 3600) -> str:
        """A link a browser opens: file:// for a local root, a presigned HTTPS URL (valid `expires_s`
        seconds, at most 7 days) for S3, signed with the credentials of the environment."""
        if self.is_s3:
            return self.fs.url(self.path(rel), expires=min(expires_s, 7 * 24 * 3600))
        return Path(self.path(rel)).as_uri()

    def check_writable(self) -> None:
        """Fail early, with a clear message, when the root cannot be written (e.g. a missing bucket)."""
        probe = f"_probe/{uuid.uuid4().hex}"
        try:
            self.write_bytes(probe, b"ok")
            self.delete(probe)
        except StorageError:
            raise
        except Exception as err:  # noqa: BLE001 - the underlying client error names the cause
            hint = (
                "check that the bucket exists and that AWS_ENDPOINT_URL and the AWS credentials are set"
                if self.is_s3
                else "check that the folder can be created and written"
            )
            raise StorageError(f"cannot write to {self.root}: {type(err).__name__}: {err}; {hint}") from None

    # --- queries ---------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def list(self, rel_dir: str, suffix: str = "") -> list[str]:
        """Files directly under `rel_dir` whose name ends with `suffix`, relative to the root, sorted."""
        rel_dir = path_inside_root(rel_dir, self.root)
        base = self.path(rel_dir)
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return []
        names = []
        for entry in entries:
            if entry.get("type") == "directory":
                continue
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(suffix) and not name.startswith(TEMP_PREFIX):
                names.append(f"{rel_dir}/{name}" if rel_dir else name)
        return sorted(names)

    def subfolders(self, rel_dir: str) -> list[str]:
        """Names of the folders directly under `rel_dir`, sorted."""
        try:
            entries = self.fs.ls(self.path(rel_dir), detail=True)
        except FileNotFoundError:
            return []
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"
        )

    # --- reads -----------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            raise StorageError(f"{self.uri(rel)} does not exist") from None

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        # One whole GET (retried as a unit) rather than a file handle: a ranged read through a
        # handle whose size lookup was answered by a transient error came back empty.
        return pq.read_table(pa.BufferReader(self.read_bytes(rel)), columns=columns)

    def parquet_schema(self, rel: str) -> pa.Schema:
        """The Arrow schema of a Parquet file, from its footer (no data is read)."""
        with self._open_parquet(rel) as parquet:
            return parquet.schema_arrow

    def iter_batches(
        self, rel: str, batch_rows: int, columns: list[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """A Parquet file as record batches of at most `batch_rows` rows, read through a file handle
        (ranged reads on S3), so memory holds one row group and one batch, not the whole file."""
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
        with self._open_parquet(rel) as parquet:
            yield from parquet.iter_batches(batch_size=batch_rows, columns=columns)

    @contextlib.contextmanager
    def _open_parquet(self, rel: str) -> Iterator[pq.ParquetFile]:
        try:
            handle = self.fs.open(self.path(rel), "rb")
        except FileNotFoundError:
            raise StorageError(f"{self.uri(rel)} does not exist") from None
        with handle:
            if not handle.size:
                # A size lookup answered by a transient error reads as empty: say so, never yield nothing.
                raise StorageError(f"{self.uri(rel)} reads as empty; run again, or check the file")
            # pre_buffer off: on, pyarrow fetches the column chunks of every row group to be read up
            # front, which holds the whole file in memory.
            with pq.ParquetFile(handle, pre_buffer=False) as parquet:
                yield parquet

    def read_tables(self, rel_dir: str, columns: list[str] | None = None) -> pa.Table | None:
        """All `*.parquet` files under `rel_dir` concatenated, or None when there are none."""
        tables = [self.read_table(rel, columns) for rel in self.list(rel_dir, ".parquet")]
        if not tables:
            return None
        return pa.concat_tables(tables, promote_options="default")

    # --- atomic writes -----------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write a whole file atomically; returns its URI."""
        target = self.path(rel)
        if self.is_s3:
            # A single PUT of a finished local file: the object appears whole or not at all.
            with tempfile.NamedTemporaryFile(prefix="dalle-", delete=False) as tmp:
                tmp.write(data)
            try:
                self.fs.put_file(tmp.name, target)
            finally:
                os.unlink(tmp.name)
        else:
            try:
                self._write_local(target, data)
            except OSError as err:
                hint = _WRITE_HINTS.get(err.errno)
                if hint is None:
                    raise  # an I/O error of another kind may pass; the flows retry it
                raise StorageError(f"cannot write {target}: {hint} ({err.strerror})") from err
        return self.uri(rel)

    @staticmethod
    def _write_local(target: str, data: bytes) -> None:
        folder = os.path.dirname(target)
        _make_folders(folder)
        fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
            raise
        _fsync_folder(folder)  # the rename itself, so what is written next never lands before it

    def write_parquet(self, rel: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch | pa.Table]) -> str:
        """Write a Parquet file of `schema` from `batches` as they come (a row group for each non-empty
        one), atomically like write_bytes: memory holds a batch, never the file, and the file appears
        whole or not at all. Locally it is written under a temporary name in its folder, synced,
        renamed and the folder synced; on S3 it is written to a local temporary file and uploaded once
        finished. An error raised by `batches` leaves no file and passes as it is; returns the URI."""
        target = self.path(rel)
        from_batches: list[BaseException] = []

        def parts() -> Iterator[pa.RecordBatch | pa.Table]:
            iterator = iter(batches)
            while True:
                try:
                    part = next(iterator)
                except StopIteration:
                    return
                except BaseException as err:  # the caller's own failure, not the write's
                    from_batches.append(err)
                    raise
                yield part

        def write(sink) -> None:
            with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
                for part in parts():
                    if part.num_rows:
                        writer.write(part)

        if self.is_s3:
            # One upload of a finished local file: the object appears whole or not at all.
            with tempfile.NamedTemporaryFile(prefix="dalle-", suffix=".parquet", delete=False) as tmp:
                pass
            try:
                write(tmp.name)
                self.fs.put_file(tmp.name, target)
            finally:
                os.unlink(tmp.name)
            return self.uri(rel)
        folder = os.path.dirname(target)
        try:
            _make_folders(folder)
            fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
            try:
                with os.fdopen(fd, "wb") as handle:
                    write(handle)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp_name, target)
            except BaseException:
                if os.path.exists(tmp_name):
                    os.unlink(tmp_name)
                raise
            _fsync_folder(folder)
        except OSError as err:
            hint = _WRITE_HINTS.get(err.errno)
            if hint is None or any(err is failed for failed in from_batches):
                raise
            raise StorageError(f"cannot write {target}: {hint} ({err.strerror})") from err
        return self.uri(rel)

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

    def write_table(self, rel: str, table: pa.Table) -> str:
        """Write a Parquet file atomically; returns its URI."""
        return self.write_bytes(rel, parquet_bytes(table))

    def delete(self, rel: str) -> None:
        try:
            self.fs.rm(self.path(rel), recursive=True)
        except FileNotFoundError:
            pass

    def remove_stale_temporaries(self, rel_dir: str = "", older_than_s: float = STALE_TEMPORARY_S) -> int:
        """Remove the temporary files that killed local writers left under `rel_dir` (recursively), once
        unchanged for `older_than_s` seconds, so a write in progress elsewhere is never hit; returns
        how many. An S3 root has none: its temporaries are local files that each write removes."""
        if self.is_s3:
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for folder, _, names in os.walk(self.path(rel_dir)):
            for name in names:
                if not name.startswith(TEMP_PREFIX):
                    continue
                path = os.path.join(folder, name)
                try:
                    if os.lstat(path).st_mtime < cutoff:
                        os.unlink(path)
                        removed += 1
                except FileNotFoundError:  # renamed by its writer or removed by another cleaner
                    continue
        return removed
