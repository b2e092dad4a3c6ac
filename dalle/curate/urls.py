"""Reading URL lists: Parquet, CSV, TSV, TXT or JSONL, local or on S3.

Whatever the input format, the result is one table of `input_row`, `url`,
`caption` and `caption_utf8` (False where the caption's bytes were not valid
UTF-8 and had to be decoded with replacement characters).
"""

from __future__ import annotations

import io
import json
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


class UrlListError(UserError, ValueError):
    """A URL list that cannot be read; the message says what is wrong and how to fix it."""


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


def _decode(values: list[bytes | str | None]) -> tuple[list[str | None], list[bool]]:
    texts, ok = [], []
    for value in values:
        if value is None:
            texts.append(None)
            ok.append(True)
        elif isinstance(value, str):
            texts.append(value)
            ok.append(True)
        elif not isinstance(value, bytes):
            texts.append(str(value))
            ok.append(True)
        else:
            try:
                texts.append(value.decode("utf-8"))
                ok.append(True)
            except UnicodeDecodeError:
                texts.append(value.decode("utf-8", errors="replace"))
                ok.append(False)
    return texts, ok


def _missing_column(kind: str, name: str, uri: str, columns: list[str], setting: str) -> UrlListError:
    return UrlListError(
        f"{kind} column {name!r} not found in {PurePosixPath(uri).name}; columns are: "
        f"{', '.join(columns) or '(none)'}. Set crawl.{setting} to the right column."
    )


def _pick(table: pa.Table, uri: str, cfg: CrawlConfig, caption_required: bool) -> tuple[list, list]:
    columns = table.column_names
    if cfg.url_col not in columns:
        raise _missing_column("URL", cfg.url_col, uri, columns, "url_col")
    urls = table.column(cfg.url_col).to_pylist()
    if cfg.caption_col in columns:
        captions = table.column(cfg.caption_col).to_pylist()
    elif caption_required:
        raise _missing_column("caption", cfg.caption_col, uri, columns, "caption_col")
    else:
        captions = [None] * len(urls)
    return urls, captions


def _read_delimited(data: bytes, uri: str, cfg: CrawlConfig, delimiter: str) -> pa.Table:
    try:
        header = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(block_size=1 << 16, column_names=cfg.column_names),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(include_columns=[], include_missing_columns=False),
        ).schema.names
    except pa.ArrowInvalid as err:
        raise UrlListError(
            f"{uri} is not a valid {'TSV' if delimiter == chr(9) else 'CSV'} file: {err}"
        ) from None
    # Read URL and caption as raw bytes, so a caption with invalid UTF-8 is recorded, not fatal.
    types = {name: pa.binary() for name in (cfg.url_col, cfg.caption_col)}
    try:
        return pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=cfg.column_names),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter, newlines_in_values=True, quote_char='"' if delimiter == "," else False
            ),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
        )
    except pa.ArrowInvalid as err:
        hint = (
            f"; crawl.column_names names {len(cfg.column_names)} columns: give one name per column of the "
            "file, or unset it when the first row is a header"
            if cfg.column_names
            else ""
        )
        raise UrlListError(f"{uri} could not be parsed (columns {header}): {err}{hint}") from None


def _read_jsonl(data: bytes, uri: str, cfg: CrawlConfig) -> tuple[list, list]:
    urls, captions = [], []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError as err:
            raise UrlListError(f"{uri} line {number} is not valid JSON: {err.msg}") from None
        if not isinstance(record, dict):
            raise UrlListError(f"{uri} line {number} must be a JSON object, got {type(record).__name__}")
        if cfg.url_col not in record:
            raise _missing_column("URL", cfg.url_col, f"{uri} line {number}", sorted(record), "url_col")
        urls.append(record[cfg.url_col])
        caption = record.get(cfg.caption_col)
        if isinstance(caption, str):
            # Undecodable bytes survived as lone surrogates; turn them back into bytes so
            # _decode records them exactly as for CSV input.
            caption = caption.encode("utf-8", errors="surrogateescape")
        captions.append(caption)
    return urls, captions


def read_url_list(uri: str, cfg: CrawlConfig) -> pa.Table:
    """Read a URL list into `input_row, url, caption, caption_utf8`; a malformed list fails fast."""
    fmt = detect_format(uri, cfg.input_format)
    fs, path = filesystem_for(uri)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise UrlListError(f"URL list {uri} does not exist") from None
    if fmt == "parquet":
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowInvalid, OSError) as err:
            raise UrlListError(f"{uri} is not a readable Parquet file: {err}") from None
        urls, captions = _pick(table, uri, cfg, caption_required=True)
    elif fmt in ("csv", "tsv"):
        table = _read_delimited(data, uri, cfg, "," if fmt == "csv" else "\t")
        urls, captions = _pick(table, uri, cfg, caption_required=True)
    elif fmt == "jsonl":
        urls, captions = _read_jsonl(data, uri, cfg)
    else:  # txt: one URL per line, no captions
        urls = [line.strip() for line in data.splitlines() if line.strip()]
        captions = [None] * len(urls)
    url_texts, _ = _decode(urls)
    caption_texts, caption_ok = _decode(captions)
    return pa.table(
        {
            "input_row": pa.array(range(len(url_texts)), pa.int64()),
            "url": pa.array([u if u is not None else "" for u in url_texts], pa.string()),
            "caption": pa.array(caption_texts, pa.string()),
            "caption_utf8": pa.array(caption_ok, pa.bool_()),
        }
    )
