"""Untrusted text in Prefect artifacts: crawled captions and URLs, error details and users' paths are
shown as the text they are. Both Prefect UIs render artifacts, their descriptions and (the v1 UI)
the string cells of tables as Markdown, so a caption must not become an image that calls out, a
link, raw HTML, a heading or a table cell of its own. Rendered here with markdown-it (CommonMark and
GFM tables), which comes with rich, a dependency of Prefect."""

from __future__ import annotations

import json
import re
import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from markdown_it import MarkdownIt

from dalle.runroot import SAMPLES_REPORT
from dalle.storage import Storage
from flows.common import link_target, literal_markdown
from tests.test_cli import run_cli
from tests.test_curate_nothing_kept import loopback  # noqa: F401 - a fixture used below

MARKDOWN = MarkdownIt("commonmark").enable("table")
# Text that a GFM renderer (the v2 UI's remark-gfm, the v1 UI's marked) would turn into a link
# outside a code span, though CommonMark does not.
AUTOLINKED = re.compile(r"(?i)https?:|ftp:|www\.|javascript:|data:|mailto:|@")
FORBIDDEN_TOKENS = {"image", "link_open", "html_inline", "html_block"}

HOSTILE = {
    "image": "![](http://tracker.example/pixel.png)",
    "img_tag": "<img src=http://tracker.example/i.png onerror=alert(1)>",
    "js_link": "[click](javascript:alert(document.cookie))",
    "reference_link": "[click][1]\n\n[1]: http://evil.example/",
    "script": "<script>alert(1)</script><iframe src=//evil.example></iframe>",
    "raw_html_block": "<div>\n<a href=http://evil.example>x</a>\n</div>",
    "autolink": "<http://autolink.example/x> <someone@evil.example>",
    "bare_url": "see http://bare.example/x and www.bare.example",
    "heading": "# heading\n## another",
    "emphasis": "*em* __strong__ ~~gone~~",
    "backticks": "a `tick` b ``two`` c ```three``` ``",
    "only_backtick": "`",
    "edge_backticks": "`leading and trailing`",
    "controls": "a\x00b\x07c\x1b[31mred\x7fd\x85e",
    "bidi": "\u202eevil\u202c and \u2066isolate\u2069 \u200b\ufeff",
    "newlines": "line one\nline two\r\n\r\n| a | b |\n|---|---|\n| c | d |",
    "line_separators": "one\u2028two\u2029three",
    "entities": "&lt;img src=x&gt; &#60;script&#62; &amp;",
    "pipes": "a | b \\| c \\\\| d",
    "breakout": "\\|![](http://tracker.example/breakout.png)",
    "backslash_end": "ends in a backslash\\",
    "surrogate": "lone \udcff surrogate",
    "enormous": "x" * 100_000 + "![](http://tracker.example/late.png)",
    "spaces": "   ",
}


def _render(markdown: str, table_cells: int | None = None) -> tuple[list[str], str]:
    """Render `markdown` and fail on any image, link, raw HTML, would-be autolink or hidden character;
    return the contents of its code spans and the text outside them. `table_cells`: every row of its
    tables must have that many cells."""
    tokens = MARKDOWN.parse(markdown)
    html = MARKDOWN.renderer.render(tokens, MARKDOWN.options, {})
    for tag in ("<img", "<a ", "<script", "<iframe", "<div"):
        assert tag not in html, (tag, markdown, html)
    spans, outside, cells = [], [], 0
    for token in tokens:
        assert token.type not in FORBIDDEN_TOKENS, (token.type, markdown)
        if token.type == "tr_open":
            cells = 0
        elif token.type in ("td_open", "th_open"):
            cells += 1
        elif token.type == "tr_close" and table_cells is not None:
            assert cells == table_cells, (markdown, html)
        for child in token.children or []:
            assert child.type not in FORBIDDEN_TOKENS, (child.type, markdown)
            if child.type == "code_inline":
                spans.append(child.content)
            elif child.type == "text":
                outside.append(child.content)
    assert not AUTOLINKED.search(" ".join(outside)), (outside, markdown)
    hidden = [c for c in markdown if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Cs")]
    assert not hidden, (hidden, markdown)
    return spans, " ".join(outside)


def _expected(text: str, max_chars: int = 200) -> str:
    """What a code span must show of `text`: line breaks as spaces, control, format and surrogate
    characters as escapes; as many whole characters as fit in `max_chars`, then "…" if any is left."""
    shown = ""
    for char in re.sub("[\r\n\t\x85\u2028\u2029]", " ", text):
        if unicodedata.category(char) in ("Cc", "Cf", "Cs"):
            char = f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
        if len(shown) + len(char) > max_chars:
            return shown + "…"
        shown += char
    return shown


@pytest.mark.parametrize("name", HOSTILE)
def test_untrusted_text_renders_as_one_code_span_that_shows_it(name):
    text = HOSTILE[name]
    shown = literal_markdown(text)
    assert len(shown) < 260
    assert _render(shown) == ([_expected(text)], "")
    assert MARKDOWN.render(shown).startswith("<p><code>")


@pytest.mark.parametrize("name", HOSTILE)
def test_untrusted_text_stays_in_its_table_cell(name):
    text = HOSTILE[name]
    row = " | ".join(literal_markdown(v, 60, table_cell=True) for v in ("blocked", text, "x"))
    spans, outside = _render(f"| fate | caption | detail |\n| --- | --- | --- |\n| {row} |\n", table_cells=3)
    assert outside == "fate caption detail"
    assert len(spans) == 3 and spans[0] == "blocked" and spans[2] == "x"
    if "\\|" not in text:  # a pipe behind a backslash may show one backslash more
        assert spans[1] == _expected(text, 60)


def test_the_escapes_are_visible_and_the_text_is_capped():
    assert _render(literal_markdown("a\u202eb\x00c\nd"))[0] == ["a\\u202eb\\x00c d"]
    assert _render(literal_markdown("x" * 10_000, max_chars=50))[0] == ["x" * 50 + "…"]
    assert _render(literal_markdown("\u202e" * 10, max_chars=14))[0] == ["\\u202e\\u202e…"]
    assert _render(literal_markdown("a `b` ``c``"))[0] == ["a `b` ``c``"]
    assert _render(literal_markdown("a | b"))[0] == ["a | b"]
    cell = literal_markdown("a | b", table_cell=True)
    assert _render(f"| h |\n| --- |\n| {cell} |\n", table_cells=1)[0] == ["a | b"]
    assert literal_markdown("") == ""


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        " JavaScript:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        "vbscript:x",
        "x",
    ],
)
def test_a_link_artifact_links_only_to_web_pages_and_files(url):
    with pytest.raises(ValueError, match="refusing to link"):
        link_target(url)


def test_a_link_target_cannot_end_its_markdown_link():
    assert link_target("file:///runs/a b (c)/page.html") == "file:///runs/a%20b%20%28c%29/page.html"
    target = link_target("https://s3.example/runs/a b (c)/<d>/page.html?X-Amz-Signature=ab&x=1")
    assert target == "https://s3.example/runs/a%20b%20%28c%29/%3Cd%3E/page.html?X-Amz-Signature=ab&x=1"
    tokens = MARKDOWN.parseInline(f"[gallery]({target})")[0].children
    assert [t.type for t in tokens] == ["link_open", "text", "link_close"]
    assert tokens[0].attrGet("href") == target


# ----- a curation run whose list is hostile, read back from Prefect --------------------------


def _hostile_list(path, server) -> list[str]:
    """Rows refused for four reasons (two examples of each reach the summary), each with a hostile
    caption; returns the captions."""
    captions = [
        HOSTILE["image"],
        HOSTILE["img_tag"],
        HOSTILE["js_link"] + " " + HOSTILE["autolink"] + " " + HOSTILE["bare_url"],
        HOSTILE["script"],
        HOSTILE["heading"] + "\n" + HOSTILE["emphasis"] + " " + HOSTILE["backticks"] + " " + HOSTILE["pipes"],
        HOSTILE["bidi"] + HOSTILE["controls"],
        "x" * 10_000 + HOSTILE["image"],
        HOSTILE["breakout"],
    ]
    urls = [
        server.url("/a.png"),  # blocked_address: the default policy refuses loopback
        server.url("/b.png"),
        "javascript:alert(document.cookie)",  # scheme_not_allowed
        "data:text/html,<script>alert(1)</script>",
        "![](http://tracker.example/url.png)",  # malformed_url
        "<img src=http://tracker.example/url.png>",
        server.url("/a.png"),  # repeated_url
        server.url("/b.png"),
    ]
    pq.write_table(pa.table({"url": urls, "caption": captions}), path)
    return captions


def _run_artifacts(root: str) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowFilter,
        FlowFilterName,
    )

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["curate"])), limit=200)
        (run,) = [r for r in runs if r.parameters.get("root") == root]
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )


def test_a_curation_of_hostile_rows_publishes_only_inert_artifacts(tmp_path, prefect_server, loopback):  # noqa: F811
    # The user's paths are text of the artifacts too.
    folder = tmp_path / "lists <img src=http:tracker.example> `tick`"
    folder.mkdir()
    urls = folder / "urls <b>bold.parquet"
    captions = _hostile_list(urls, loopback)
    root = str(tmp_path / "run <img src=x onerror=alert(1)> ~~(x)~~")

    done = run_cli("curate", "--urls", str(urls), "--out", root)

    assert done.returncode == 2, done.stderr[-3000:]  # every row refused: the ledger, then one line
    assert loopback.connections == 0
    artifacts = {a.key: a for a in _run_artifacts(root)}
    assert {"curation-summary", "curation-funnel", "curation-progress"} <= set(artifacts)
    shown, outside = [], []
    for artifact in artifacts.values():
        texts = [artifact.description or ""]
        if artifact.type == "markdown":
            texts.append(artifact.data)
        if artifact.type == "table":  # the v1 UI renders each string cell as Markdown
            rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
            texts += [value for row in rows for value in row.values() if isinstance(value, str)]
        for text in texts:
            spans, text_outside = _render(text, table_cells=5 if artifact.key == "curation-summary" else None)
            shown += spans
            outside.append(text_outside)
    # Outside code spans only the flows' own words: nothing of the hostile text.
    assert not re.search(
        r"(?i)tracker|evil|alert|click|heading|script|img|bold|tick|onerror|~~", " ".join(outside)
    )
    # Non-vacuous: every hostile caption, URL and detail is there, as text.
    for caption in captions:
        assert any(s.startswith(_expected(caption)[:30]) for s in shown) or "\\|" in caption, caption
    assert any("![](http://tracker.example/breakout.png)" in s for s in shown)
    assert "javascript:alert(document.cookie)" in shown
    assert any("![](http://tracker.example/url.png)" in s for s in shown)  # in the URL and the detail
    assert any(s.startswith("x" * 40) and s.endswith("…") for s in shown)
    assert Storage(root).uri(SAMPLES_REPORT) in shown
    assert str(urls) in shown and root in shown  # the progress's and the summary's paths
