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
