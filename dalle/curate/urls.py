"""Reading URL lists: Parquet, CSV, TSV, TXT or JSONL, local or on S3.

Whatever the input format, the result is one table of `input_row`, `url`, `caption` and
`caption_utf8` (False where the caption was not valid text and was decoded with replacement
characters). What a list may hold, and what becomes of it:

- The list as a whole: it must be readable as its format (crawl.input_format, or its extension), have
  the URL column and the caption column (TXT has none; in JSONL, every line is a JSON object with the
  URL key, and at least one line has the caption key), and at least one row. A URL or caption is text or missing: a number,
  list or object in a JSONL line, or a Parquet column of another type, means the list was written
  wrong or the wrong column is named. Any of these raises a UrlListError that names the file, the
  line or column and what to change, before anything is crawled (and Prefect does not retry it).
- One row: a value that is text but not usable is that row's fate and the rest is crawled. A caption
  whose bytes are not UTF-8 (or a JSON string with a lone surrogate escape such as "\\ud800") keeps
  replacement characters and `caption_utf8` False, which the filters record as caption_not_utf8; a
  missing or null caption is None. A URL that is missing, null or not valid text (replacement
  characters, likewise) stays in the table as text, and `netguard.url_refusal` refuses what must not
  be fetched before the crawl (fate blocked, reason malformed_url and the like).
- Credentials: a URL's userinfo (`user:password@`) is replaced by `***` here, where the list enters,
  so no password or token reaches the ledger, the shards, the logs or an artifact; such a URL is never
  fetched (`url_refusal` refuses it). Error messages that quote the file are redacted the same way.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dalle.config import CrawlConfig
from dalle.errors import UserError
from dalle.storage import filesystem_for

FORMATS = ("parquet", "csv", "tsv", "txt", "jsonl")
_EXTENSIONS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "txt",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
}
_LABELS = {"parquet": "Parquet", "csv": "CSV", "tsv": "TSV", "txt": "TXT", "jsonl": "JSONL"}

# First bytes of files that are not text, for the lists whose format is text.
_BINARY_MAGIC = {
    b"PAR1": "a Parquet file",
    b"\x1f\x8b": "gzip-compressed",
    b"PK\x03\x04": "a zip archive",
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ\x00": "xz-compressed",
    b"\x28\xb5\x2f\xfd": "zstd-compressed",
    codecs.BOM_UTF16_LE: "UTF-16 text",
    codecs.BOM_UTF16_BE: "UTF-16 text",
}

REDACTED = "***"
# The authority's userinfo as urllib.parse.urlsplit reads it: after "scheme://" (or "//"), up to
# the last "@" before the path, query or fragment.
_USERINFO = re.compile(r"^(\s*(?:[A-Za-z][A-Za-z0-9+.\-]*:)?//)[^/?#]*@")
_USERINFO_ANYWHERE = re.compile(r"//[^/?#\s]*@")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class UrlListError(UserError, ValueError):
    """A URL list that cannot be read; the message says what is wrong and how to fix it."""


def redact_credentials(url: str) -> str:
    """`url` with the userinfo of its authority (`user:password@`) replaced by `***@`."""
    return _USERINFO.sub(rf"\g<1>{REDACTED}@", url, count=1)


def _redacted_message(text: str) -> str:
    """An error message that may quote rows of the list, without the credentials of any URL in it."""
    return _USERINFO_ANYWHERE.sub(f"//{REDACTED}@", text)


def detect_format(uri: str, configured: str) -> str:
    if configured != "auto":
        return configured
    suffix = PurePosixPath(uri).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise UrlListError(
            f"cannot tell the format of {uri} from its extension {suffix!r}; "
            f"set crawl.input_format to one of {', '.join(FORMATS)}"
        )
    return _EXTENSIONS[suffix]


def _text(value: bytes | str | None) -> tuple[str | None, bool]:
    """The value as text, and whether it was valid: invalid UTF-8 bytes and lone surrogates (which
    cannot be stored as UTF-8) become replacement characters."""
    if value is None:
        return None, True
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), True
        except UnicodeDecodeError:
            return value.decode("utf-8", errors="replace"), False
    if _SURROGATE.search(value):
        return _SURROGATE.sub("\ufffd", value), False
    return value, True


def _missing_column(kind: str, name: str, uri: str, columns: list[str], setting: str) -> UrlListError:
    return UrlListError(
        f"{kind} column {name!r} not found in {PurePosixPath(uri).name}; columns are: "
        f"{', '.join(columns) or '(none)'}. Set crawl.{setting} to the right column."
    )


def _is_text_type(kind: pa.DataType) -> bool:
    checks = (
        pa.types.is_string,
        pa.types.is_large_string,
        pa.types.is_string_view,
        pa.types.is_binary,
        pa.types.is_large_binary,
        pa.types.is_binary_view,
    )
    return any(check(kind) for check in checks)


def _text_column(table: pa.Table, name: str, kind: str, uri: str, setting: str) -> list:
    """A column's values as bytes (None where missing); a column that does not hold text is refused."""
    column = table.column(name)
    if pa.types.is_dictionary(column.type):  # e.g. a pandas category column
        column = column.cast(column.type.value_type)
    if pa.types.is_null(column.type):
        return [None] * table.num_rows
    if not _is_text_type(column.type):
        raise UrlListError(
            f"{kind} column {name!r} of {PurePosixPath(uri).name} holds {column.type} values, not text; "
            f"columns are: {', '.join(table.column_names)}. Set crawl.{setting} to the column of "
            f"{kind} texts, or write that column as strings."
        )
    return column.cast(pa.large_binary()).to_pylist()


def _check_columns(columns: list[str], uri: str, cfg: CrawlConfig) -> None:
    if cfg.url_col not in columns:
        raise _missing_column("URL", cfg.url_col, uri, columns, "url_col")
    for name in (cfg.url_col, cfg.caption_col):
        if columns.count(name) > 1:
            raise UrlListError(
                f"{PurePosixPath(uri).name} has {columns.count(name)} columns named {name!r}; give each "
                "column its own name (or set crawl.column_names)"
            )
    if cfg.caption_col not in columns:
        raise _missing_column("caption", cfg.caption_col, uri, columns, "caption_col")


def _pick(table: pa.Table, uri: str, cfg: CrawlConfig) -> tuple[list, list]:
    return (
        _text_column(table, cfg.url_col, "URL", uri, "url_col"),
        _text_column(table, cfg.caption_col, "caption", uri, "caption_col"),
    )


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {list: "a list", dict: "an object", str: "a string"}.get(type(value), "null")


# Rows of the list normalised at once: the list is read in batches of this many rows (and the
# file in blocks), so reading it holds one batch of Python values, not the whole file's.
URL_BATCH_ROWS = 16_384
_HEAD_BYTES = 1 << 16  # what the format checks look at before parsing


def _parquet_batches(handle, uri: str, cfg: CrawlConfig, batch_rows: int) -> Iterator[tuple[list, list]]:
    head = handle.read(4)
    handle.seek(0)
    try:
        parquet = pq.ParquetFile(handle)
    except (pa.ArrowException, OSError) as err:
        hint = (
            ""
            if head == b"PAR1"
            else "; it does not start like one (is it CSV, TSV or JSONL? name it so, or set crawl.input_format)"
        )
        raise UrlListError(f"{uri} is not a readable Parquet file: {err}{hint}") from None
    _check_columns(parquet.schema_arrow.names, uri, cfg)
    try:
        for batch in parquet.iter_batches(
            batch_size=batch_rows, columns=list(dict.fromkeys([cfg.url_col, cfg.caption_col]))
        ):
            yield _pick(pa.Table.from_batches([batch]), uri, cfg)
    except (pa.ArrowException, OSError) as err:
        raise UrlListError(f"{uri} is not a readable Parquet file: {err}") from None


_HEADER_PROBE_BYTES = 1 << 16  # the head of a delimited list whose header is parsed first
_LONGEST_FIRST_ROW = 1 << 20


def _has_newline(data: bytes) -> bool:
    return b"\n" in data or b"\r" in data


def _delimited_batches(handle, uri: str, cfg: CrawlConfig, delimiter: str) -> Iterator[tuple[list, list]]:
    label = "TSV" if delimiter == "\t" else "CSV"
    # The header is parsed from a copy of the file's head, never from `handle`: arrow's CSV reader reads
    # blocks ahead on a background thread, so a probe on the handle could move it after the seek below
    # and the main reader would start in the middle of a row.
    head = handle.read(_HEADER_PROBE_BYTES)
    while (
        not _has_newline(head)
        and len(head) < _LONGEST_FIRST_ROW
        and (more := handle.read(_HEADER_PROBE_BYTES))
    ):
        head += more
    if (more := handle.read(1)) and not _has_newline(head):
        raise UrlListError(
            f"{uri}: its first row is longer than {_LONGEST_FIRST_ROW >> 20} MiB; is it a {label} file?"
        )
    if more:  # the file goes on: keep whole rows only
        head = head[: max(head.rfind(b"\n"), head.rfind(b"\r")) + 1]
    try:
        header = pacsv.open_csv(
            pa.BufferReader(head),
            read_options=pacsv.ReadOptions(block_size=max(len(head), 1), column_names=cfg.column_names),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(include_columns=[], include_missing_columns=False),
        ).schema.names
    except pa.ArrowException as err:
        raise UrlListError(_redacted_message(f"{uri} is not a valid {label} file: {err}")) from None
    handle.seek(0)
    _check_columns(header, uri, cfg)
    # Read URL and caption as raw bytes, so a caption with invalid UTF-8 is recorded, not fatal.
    types = {name: pa.binary() for name in (cfg.url_col, cfg.caption_col)}

    def failed(err: Exception) -> UrlListError:
        hint = (
            f"; crawl.column_names names {len(cfg.column_names)} columns: give one name per column of the "
            "file, or unset it when the first row is a header"
            if cfg.column_names
            else ""
        )
        return UrlListError(
            _redacted_message(f"{uri} could not be parsed as {label} (columns {header}): {err}{hint}")
        )

    try:
        reader = pacsv.open_csv(
            handle,
            read_options=pacsv.ReadOptions(column_names=cfg.column_names, block_size=1 << 20),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter, newlines_in_values=True, quote_char='"' if delimiter == "," else False
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=types,
                strings_can_be_null=False,
                include_columns=list(dict.fromkeys([cfg.url_col, cfg.caption_col])),
            ),
        )
        for batch in reader:
            yield _pick(pa.Table.from_batches([batch]), uri, cfg)
    except pa.ArrowException as err:
        raise failed(err) from None


def _lines(handle) -> Iterator[tuple[int, bytes]]:
    """Numbered lines of a text file as bytes.splitlines numbers them, read a line at a time."""
    number = 0
    first = True
    for chunk in handle:
        if first:
            chunk = chunk.removeprefix(codecs.BOM_UTF8)
            first = False
        for line in chunk.splitlines():
            number += 1
            yield number, line


def _jsonl_batches(handle, uri: str, cfg: CrawlConfig, batch_rows: int) -> Iterator[tuple[list, list]]:
    urls, captions = [], []
    any_caption = False
    rows = 0
    for number, line in _lines(handle):
        if not line.strip():
            continue
        where = f"{uri} line {number}"
        try:
            # Bytes that are not UTF-8 survive as lone surrogates, which _text replaces and flags.
            record = json.loads(line.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError as err:
            raise UrlListError(
                f"{where} is not valid JSON ({err.msg} at column {err.colno}); a JSONL list has one "
                'object per line, like {"url": "https://...", "caption": "..."}'
            ) from None
        except RecursionError:
            raise UrlListError(f"{where} is JSON nested too deeply to be a URL list row") from None
        if not isinstance(record, dict):
            raise UrlListError(
                f"{where} must be a JSON object with {cfg.url_col!r} and {cfg.caption_col!r}, "
                f"got {_json_kind(record)}"
            )
        if cfg.url_col not in record:
            raise _missing_column("URL", cfg.url_col, where, sorted(record), "url_col")
        for key, setting in ((cfg.url_col, "url_col"), (cfg.caption_col, "caption_col")):
            value = record.get(key)
            if value is not None and not isinstance(value, str):
                raise UrlListError(
                    f"{where}: {key!r} is {_json_kind(value)}, not a string; write it as a JSON string "
                    f"(or null), or set crawl.{setting} to the key that holds it"
                )
        any_caption = any_caption or cfg.caption_col in record
        urls.append(record[cfg.url_col])
        captions.append(record.get(cfg.caption_col))
        rows += 1
        if len(urls) >= batch_rows:
            yield urls, captions
            urls, captions = [], []
    if urls:
        yield urls, captions
    # Known only at the end: a caller that consumed the batches before gets the error all the same.
    if rows and not any_caption:
        raise UrlListError(
            f"caption key {cfg.caption_col!r} is in no line of {PurePosixPath(uri).name}; set "
            "crawl.caption_col to the key of the captions"
        )


def _txt_batches(handle, uri: str, batch_rows: int) -> Iterator[tuple[list, list]]:
    urls = []
    for number, line in _lines(handle):
        if b"\t" in line.strip():
            raise UrlListError(
                f"{uri} line {number} holds a tab, but a TXT list is one URL per line; for URL and "
                "caption columns name the file .tsv or set crawl.input_format: tsv"
            )
        if line.strip():
            urls.append(line.strip())
            if len(urls) >= batch_rows:
                yield urls, [None] * len(urls)
                urls = []
    if urls:
        yield urls, [None] * len(urls)


def _check_looks_like(data: bytes, uri: str, fmt: str) -> None:
    """From the file's first bytes: refuse an empty file, and a binary or UTF-16 file where text is expected, before parsing it."""
    label = _LABELS[fmt]
    if len(data) < _HEAD_BYTES and not data.strip():
        raise UrlListError(f"{uri} is empty, not a readable {label} file; a URL list needs at least one row")
    if fmt == "parquet":
        return
    for magic, what in _BINARY_MAGIC.items():
        if data.startswith(magic):
            fix = (
                "name it .parquet or set crawl.input_format: parquet"
                if magic == b"PAR1"
                else "save it as UTF-8 text"
                if what == "UTF-16 text"
                else "decompress it first"
            )
            raise UrlListError(f"{uri} is {what}, not a {label} file; {fix}")


def iter_url_list(uri: str, cfg: CrawlConfig, batch_rows: int = URL_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """A URL list as record batches of `input_row, url, caption, caption_utf8` (at most `batch_rows`
    rows each), read from the file as it streams: memory holds a batch, not the list. A malformed list
    fails fast, a bad value is its row's fate (see the module docstring); credentials in URLs are
    redacted. A fault found late in the file (a JSONL caption key in no line) is raised after the
    batches before it."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    fmt = detect_format(uri, cfg.input_format)
    fs, path = filesystem_for(uri)
    try:
        handle = fs.open(path, "rb")
    except FileNotFoundError:
        raise UrlListError(f"URL list {uri} does not exist") from None
    except IsADirectoryError:
        raise UrlListError(f"URL list {uri} is a folder; name the list file itself") from None
    with handle:
        _check_looks_like(handle.read(_HEAD_BYTES), uri, fmt)
        handle.seek(0)
        if fmt == "parquet":
            parts = _parquet_batches(handle, uri, cfg, batch_rows)
        elif fmt in ("csv", "tsv"):
            parts = _delimited_batches(handle, uri, cfg, "," if fmt == "csv" else "\t")
        elif fmt == "jsonl":
            parts = _jsonl_batches(handle, uri, cfg, batch_rows)
        else:  # txt: one URL per line, no captions
            parts = _txt_batches(handle, uri, batch_rows)
        offset = 0
        for urls, captions in parts:
            # A CSV block can hold more rows than batch_rows: cut it.
            for start in range(0, len(urls), batch_rows):
                batch = _normalised(
                    urls[start : start + batch_rows], captions[start : start + batch_rows], offset
                )
                offset += batch.num_rows
                yield batch
    if not offset:
        raise UrlListError(f"{uri} has no rows; a URL list needs at least one")


def _normalised(urls: list, captions: list, offset: int) -> pa.RecordBatch:
    url_texts = [redact_credentials(text or "") for text, _ in map(_text, urls)]
    caption_texts, caption_ok = (list(values) for values in zip(*map(_text, captions), strict=True))
    return pa.record_batch(
        {
            "input_row": pa.array(range(offset, offset + len(url_texts)), pa.int64()),
            "url": pa.array(url_texts, pa.string()),
            "caption": pa.array(caption_texts, pa.string()),
            "caption_utf8": pa.array(caption_ok, pa.bool_()),
        }
    )


def read_url_list(uri: str, cfg: CrawlConfig, batch_rows: int = URL_BATCH_ROWS) -> pa.Table:
    """The whole URL list as one table of `input_row, url, caption, caption_utf8`, read batch by
    batch (`iter_url_list`): memory holds the compact Arrow table and one batch of Python values."""
    batches = list(iter_url_list(uri, cfg, batch_rows))
    return pa.Table.from_batches(batches)
