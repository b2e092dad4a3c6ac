"""Arrow schemas of every table the pipeline writes, with a version number.

A reader checks the version with `check_schema` and refuses a table written by an
incompatible release instead of misreading it. img2dataset's own output under
`{root}/raw/` is img2dataset's schema, not ours; `RAW_COLUMNS` lists what we read.
"""

from __future__ import annotations

import pyarrow as pa

from dalle.errors import UserError

SCHEMA_VERSION = 1

_VERSION_KEY = b"dalle.schema_version"
_NAME_KEY = b"dalle.schema"


def _versioned(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={_NAME_KEY: name.encode(), _VERSION_KEY: str(SCHEMA_VERSION).encode()})


class SchemaError(UserError, ValueError):
    """A table whose schema or version this release cannot read."""


# Columns of img2dataset's parquet output that the pipeline relies on.
RAW_COLUMNS = ["key", "url", "caption", "status", "error_message", "sha256", "input_row", "jpg"]

# The normalised URL list handed to img2dataset: one row per input row that passed the
# pre-crawl checks, in input order. `input_row` traces a sample back to its input line.
URL_LIST_SCHEMA = _versioned(
    "url_list",
    [
        pa.field("input_row", pa.int64(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("caption_utf8", pa.bool_(), nullable=False),
    ],
)

# Per-sample fate, one row per input row: the ledger behind reports/curate.json.
# fate is one of FATES; reason is a short machine-readable word, detail a sentence.
FATES = ("kept", "blocked", "download_failed", "filtered", "duplicate_exact", "duplicate_near")
SAMPLES_SCHEMA = _versioned(
    "samples",
    [
        pa.field("input_row", pa.int64(), nullable=False),
        pa.field("uid", pa.string()),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("raw_key", pa.string()),
        pa.field("fate", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("value", pa.float64()),
        pa.field("threshold", pa.float64()),
        pa.field("sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("clip_score", pa.float32()),
        pa.field("dup_of", pa.string()),
        pa.field("similarity", pa.float32()),
    ],
)


def embeddings_schema(dim: int) -> pa.Schema:
    """CLIP vectors keyed by uid, L2-normalised, float32."""
    return _versioned(
        "embeddings",
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("image_embedding", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("text_embedding", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("clip_score", pa.float32(), nullable=False),
        ],
    )


PROVENANCE = pa.struct(
    [
        pa.field("input_row", pa.int64()),
        pa.field("raw_key", pa.string()),
        pa.field("raw_shard", pa.string()),
        pa.field("clip_model", pa.string()),
    ]
)

# The kept, deduplicated pairs: what later stages (dVAE, tokenizer) read.
CURATED_SCHEMA = _versioned(
    "curated",
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("clip_score", pa.float32()),
        pa.field("provenance", PROVENANCE),
    ],
)


def token_shard_schema(num_codes: int) -> pa.Schema:
    """A token shard row, the unit the transformer trains on; num_codes = grid * grid of the dVAE."""
    return _versioned(
        "token_shard",
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("caption", pa.string(), nullable=False),
            pa.field("text_tokens", pa.list_(pa.int32()), nullable=False),
            pa.field("image_codes", pa.list_(pa.int16(), num_codes), nullable=False),
            pa.field("clip_score", pa.float32()),
        ],
    )


_DECISION_FIELDS = [
    pa.field("uid", pa.string()),
    pa.field("fate", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("detail", pa.string()),
    pa.field("value", pa.float64()),
    pa.field("threshold", pa.float64()),
]
# The curation stages' per-sample decisions under curated/_stages/ (joined into the ledger).
FILTER_DECISIONS_SCHEMA = pa.schema(
    [
        pa.field("input_row", pa.int64()),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("raw_shard", pa.string()),
        pa.field("raw_key", pa.string()),
        *_DECISION_FIELDS,
        pa.field("sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ]
)
SCORE_DECISIONS_SCHEMA = pa.schema([*_DECISION_FIELDS, pa.field("clip_score", pa.float32())])
DEDUP_DECISIONS_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string()),
        pa.field("fate", pa.string()),
        pa.field("dup_of", pa.string()),
        pa.field("similarity", pa.float32()),
    ]
)


def check_schema(table: pa.Table | pa.Schema, expected: pa.Schema, origin: str) -> None:
    """Raise SchemaError unless `table` was written with `expected`'s name and version and has its columns."""
    schema = table.schema if isinstance(table, pa.Table) else table
    meta = schema.metadata or {}
    want_name = (expected.metadata or {}).get(_NAME_KEY)
    name, version = meta.get(_NAME_KEY), meta.get(_VERSION_KEY)
    if name != want_name or version is None:
        raise SchemaError(f"{origin} is not a dalle {want_name.decode()} table (no schema tag); rebuild it")
    if int(version) != SCHEMA_VERSION:
        raise SchemaError(
            f"{origin} has schema version {int(version)}, this release reads {SCHEMA_VERSION}; "
            "re-run the stage that wrote it"
        )
    missing = [f.name for f in expected if f.name not in schema.names]
    if missing:
        raise SchemaError(f"{origin} lacks columns {missing}; columns are {schema.names}")
