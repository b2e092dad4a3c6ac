import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dalle.config import CrawlConfig
from dalle.curate.urls import UrlListError, read_url_list

ROWS = [("http://a.test/1.png", "a red circle"), ("http://a.test/2.png", "a blue square, big")]


def write(tmp_path, fmt):
    path = tmp_path / f"urls.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"url": [u for u, _ in ROWS], "caption": [c for _, c in ROWS]}), path)
    elif fmt == "csv":
        path.write_text("url,caption\n" + "".join(f'{u},"{c}"\n' for u, c in ROWS))
    elif fmt == "tsv":
        path.write_text("url\tcaption\n" + "".join(f"{u}\t{c}\n" for u, c in ROWS))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"url": u, "caption": c}) + "\n" for u, c in ROWS))
    else:
        path.write_text("".join(u + "\n" for u, _ in ROWS))
    return path


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_formats_with_captions(tmp_path, fmt):
    table = read_url_list(str(write(tmp_path, fmt)), CrawlConfig())
    assert table.column("url").to_pylist() == [u for u, _ in ROWS]
    assert table.column("caption").to_pylist() == [c for _, c in ROWS]
    assert table.column("input_row").to_pylist() == [0, 1]
    assert all(table.column("caption_utf8").to_pylist())


def test_headerless_tsv_takes_its_column_names_from_the_config(tmp_path):
    """CC3M's layout: caption, then URL, and no header row, so the first row is data."""
    path = tmp_path / "Train_GCC-training.tsv"
    path.write_text("".join(f"{c}\t{u}\n" for u, c in ROWS))
    table = read_url_list(str(path), CrawlConfig(input_format="tsv", column_names=["caption", "url"]))
    assert table.column("url").to_pylist() == [u for u, _ in ROWS]
    assert table.column("caption").to_pylist() == [c for _, c in ROWS]


def test_column_names_that_do_not_fit_the_file_are_named(tmp_path):
    path = tmp_path / "urls.tsv"
    path.write_text("".join(f"{c}\t{u}\n" for u, c in ROWS))
    with pytest.raises(UrlListError, match="column_names"):
        read_url_list(str(path), CrawlConfig(column_names=["caption", "url", "key"]))


def test_txt_has_no_captions(tmp_path):
    table = read_url_list(str(write(tmp_path, "txt")), CrawlConfig())
    assert table.column("url").to_pylist() == [u for u, _ in ROWS]
    assert table.column("caption").to_pylist() == [None, None]


def test_missing_column_lists_the_columns(tmp_path):
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://a.test/x"], "alt": ["x"]}), path)
    with pytest.raises(
        UrlListError, match=r"caption column 'text' not found in urls.parquet; columns are: url, alt"
    ):
        read_url_list(str(path), CrawlConfig(caption_col="text"))


def test_non_utf8_caption_is_flagged_not_fatal(tmp_path):
    path = tmp_path / "urls.csv"
    path.write_bytes(b"url,caption\nhttp://a.test/1.png,caf\xe9 au lait\nhttp://a.test/2.png,fine\n")
    table = read_url_list(str(path), CrawlConfig())
    assert table.column("caption_utf8").to_pylist() == [False, True]


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "urls.jsonl"
    path.write_text('{"url": "http://a.test/1", "caption": "x"}\n{"url": broken\n')
    with pytest.raises(UrlListError, match="line 2 is not valid JSON"):
        read_url_list(str(path), CrawlConfig())


def test_unknown_extension_and_missing_file(tmp_path):
    odd = tmp_path / "urls.xlsx"
    odd.write_text("x")
    with pytest.raises(UrlListError, match="set crawl.input_format"):
        read_url_list(str(odd), CrawlConfig())
    with pytest.raises(UrlListError, match="does not exist"):
        read_url_list(str(tmp_path / "none.parquet"), CrawlConfig())


def test_not_parquet(tmp_path):
    path = tmp_path / "urls.parquet"
    path.write_text("this is not parquet")
    with pytest.raises(UrlListError, match="not a readable Parquet"):
        read_url_list(str(path), CrawlConfig())


def test_read_from_s3(s3_bucket):
    from dalle.storage import Storage

    storage = Storage(s3_bucket)
    storage.write_bytes("lists/urls.tsv", b"url\tcaption\nhttp://a.test/1.png\ta red circle\n")
    table = read_url_list(f"{s3_bucket}/lists/urls.tsv", CrawlConfig())
    assert table.column("caption").to_pylist() == ["a red circle"]


# --- hostile lists: a bad list fails with a UrlListError that says where; a bad value is its row's fate


def write_bytes(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_lone_surrogates_are_replaced_and_flagged_like_invalid_utf8(tmp_path):
    # "\ud800" is valid JSON but cannot be stored as UTF-8; a raw \xe9 is not UTF-8 at all.
    uri = write_bytes(
        tmp_path,
        "urls.jsonl",
        b'{"url": "http://a.test/1.png", "caption": "lone \\ud800 surrogate"}\n'
        b'{"url": "http://a.test/2.png", "caption": "caf\xe9"}\n'
        b'{"url": "http://a.test/\\udc80.png", "caption": "a fine \\ud83d\\ude00 pair"}\n',
    )
    table = read_url_list(uri, CrawlConfig())
    assert table.column("caption").to_pylist() == [
        "lone \ufffd surrogate",
        "caf\ufffd",
        "a fine \U0001f600 pair",
    ]
    assert table.column("caption_utf8").to_pylist() == [False, False, True]
    # The URL keeps its row, as text with a replacement character, for the pre-crawl refusal.
    assert table.column("url").to_pylist()[2] == "http://a.test/\ufffd.png"


def test_invalid_utf8_in_a_parquet_string_column_is_flagged_not_fatal(tmp_path):
    path = tmp_path / "urls.parquet"
    captions = pa.array([b"caf\xe9", b"a red circle"], pa.binary()).view(pa.string())  # unchecked bytes
    pq.write_table(
        pa.table({"url": ["http://a.test/1.png", "http://a.test/2.png"], "caption": captions}), path
    )
    table = read_url_list(str(path), CrawlConfig())
    assert table.column("caption").to_pylist() == ["caf\ufffd", "a red circle"]
    assert table.column("caption_utf8").to_pylist() == [False, True]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"url": 12, "caption": "x"}', r"line 2: 'url' is a number, not a string"),
        (b'{"url": ["http://a.test/x"], "caption": "x"}', r"line 2: 'url' is a list, not a string"),
        (b'{"url": "http://a.test/x", "caption": {"en": "x"}}', r"line 2: 'caption' is an object"),
        (b'{"url": "http://a.test/x", "caption": true}', r"line 2: 'caption' is a boolean"),
        (b'["http://a.test/x", "x"]', r"line 2 must be a JSON object with 'url' and 'caption', got a list"),
        (b'"http://a.test/x"', r"line 2 must be a JSON object .* got a string"),
        (
            b'{"link": "http://a.test/x"}',
            r"URL column 'url' not found in urls.jsonl line 2; columns are: link",
        ),
        (b"null", r"line 2 must be a JSON object .* got null"),
        (b"[" * 100_000, r"line 2 is JSON nested too deeply"),
    ],
)
def test_a_jsonl_line_of_the_wrong_shape_names_its_line(tmp_path, line, message):
    uri = write_bytes(
        tmp_path, "urls.jsonl", b'{"url": "http://a.test/1.png", "caption": "x"}\n' + line + b"\n"
    )
    with pytest.raises(UrlListError, match=message):
        read_url_list(uri, CrawlConfig())


def test_jsonl_null_values_are_row_fates_and_a_caption_key_in_no_line_is_an_error(tmp_path):
    uri = write_bytes(
        tmp_path, "urls.jsonl", b'{"url": null, "caption": "x"}\n{"url": "http://a.test/2.png"}\n'
    )
    table = read_url_list(uri, CrawlConfig())
    assert table.column("url").to_pylist() == ["", "http://a.test/2.png"]  # "" is refused as malformed_url
    assert table.column("caption").to_pylist() == ["x", None]
    uncaptioned = write_bytes(tmp_path, "bare.jsonl", b'{"url": "http://a.test/1.png", "alt": "x"}\n')
    with pytest.raises(UrlListError, match=r"caption key 'caption' is in no line of bare.jsonl"):
        read_url_list(uncaptioned, CrawlConfig())


def test_a_parquet_column_that_is_not_text_is_named(tmp_path):
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [1, 2], "caption": ["a", "b"]}), path)
    with pytest.raises(UrlListError, match=r"URL column 'url' of urls.parquet holds int64 values, not text"):
        read_url_list(str(path), CrawlConfig())
    pq.write_table(pa.table({"url": ["http://a.test/1"], "caption": [[1.0, 2.0]]}), path)
    with pytest.raises(UrlListError, match=r"caption column 'caption' of urls.parquet holds list<"):
        read_url_list(str(path), CrawlConfig())


def test_categorical_and_all_null_parquet_columns_are_read(tmp_path):
    path = tmp_path / "urls.parquet"
    urls = pa.array(["http://a.test/1.png", "http://a.test/1.png"]).dictionary_encode()
    pq.write_table(pa.table({"url": urls, "caption": pa.nulls(2)}), path)
    table = read_url_list(str(path), CrawlConfig())
    assert table.column("url").to_pylist() == ["http://a.test/1.png"] * 2
    assert table.column("caption").to_pylist() == [None, None]


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("urls.csv", b"", r"urls.csv is empty, not a readable CSV file"),
        ("urls.jsonl", b"\n \n", r"urls.jsonl is empty, not a readable JSONL file"),
        ("urls.csv", b"url,caption\n", r"urls.csv has no rows"),
        ("urls.csv", b"url,url,caption\nhttp://a.test/1,http://a.test/2,x\n", r"2 columns named 'url'"),
        ("urls.csv", b"PAR1\x00\x01\x02", r"urls.csv is a Parquet file, not a CSV file; name it .parquet"),
        ("urls.tsv", b"\x1f\x8b\x08\x00", r"urls.tsv is gzip-compressed, not a TSV file; decompress it"),
        ("urls.csv", "url,caption\nhttp://a.test/1,x\n".encode("utf-16"), r"UTF-16 text.*save it as UTF-8"),
        ("urls.jsonl", b"url,caption\nhttp://a.test/1,x\n", r"line 1 is not valid JSON"),
        ("urls.parquet", b"url,caption\nhttp://a.test/1,x\n", r"not a readable Parquet.*is it CSV"),
        ("urls.txt", b"http://a.test/1.png\ta red circle\n", r"line 1 holds a tab.*name the file .tsv"),
        ("urls.csv", b"url," + b"x" * (2 << 20) + b"\n", r"urls.csv: its first row is longer than 1 MiB"),
    ],
)
def test_a_list_that_is_empty_or_not_its_format_says_so(tmp_path, name, data, message):
    with pytest.raises(UrlListError, match=message):
        read_url_list(write_bytes(tmp_path, name, data), CrawlConfig())


def test_a_folder_is_not_a_list(tmp_path):
    (tmp_path / "urls.csv").mkdir()
    with pytest.raises(UrlListError, match="is a folder"):
        read_url_list(str(tmp_path / "urls.csv"), CrawlConfig())


SECRET = "S3cr3t-Pa55w0rd"


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "txt", "parquet"])
def test_credentials_in_urls_are_redacted_where_the_list_enters(tmp_path, fmt):
    urls = [
        f"http://alice:{SECRET}@a.test/1.png",
        f"https://{SECRET}@a.test/2.png",  # a token as the user name
        f"http://alice:{SECRET}@with@at@a.test/3.png?from=me@b.test",
        f"//alice:{SECRET}@a.test/4.png",
        f"http://alice:{SECRET}@[::1/5.png",  # unparseable: its refusal message would quote it
    ]
    path = tmp_path / f"urls.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"url": urls, "caption": ["a red circle"] * len(urls)}), path)
    elif fmt == "csv":
        path.write_text("url,caption\n" + "".join(f"{u},a red circle\n" for u in urls))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"url": u, "caption": "a red circle"}) + "\n" for u in urls))
    else:
        path.write_text("".join(u + "\n" for u in urls))
    table = read_url_list(str(path), CrawlConfig())
    assert SECRET not in json.dumps(table.to_pylist())
    assert table.column("url").to_pylist() == [
        "http://***@a.test/1.png",
        "https://***@a.test/2.png",
        "http://***@a.test/3.png?from=me@b.test",
        "//***@a.test/4.png",
        "http://***@[::1/5.png",
    ]


def test_an_error_that_quotes_a_row_does_not_quote_its_credentials(tmp_path):
    uri = write_bytes(tmp_path, "urls.csv", f"url,caption\nhttp://alice:{SECRET}@a.test/1,x,extra\n".encode())
    with pytest.raises(UrlListError) as raised:
        read_url_list(uri, CrawlConfig())
    assert "http://***@a.test/1" in str(raised.value) and SECRET not in str(raised.value)
