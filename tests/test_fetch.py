"""How the crawl's workers fetch: every call form held by the guard, bodies capped, hosts paced.

Real servers on 127.0.0.1 (allow-listed) and 127.0.0.2 (never to be reached) count what they receive.
The call forms are tried in a freshly spawned process guarded as img2dataset's workers are, because the
guard changes its process for good.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dalle.curate import fetch
from dalle.curate.fetch import (
    DEADLINE_MARKER,
    TOO_LARGE_MARKER,
    X_ROBOTS_MESSAGE,
    FetchLimits,
    ImageFetcher,
    check_patch_point,
    retry_after_seconds,
)
from dalle.curate.netguard import BLOCKED_MARKER, AddressPolicy, guard_connections
from tests.test_netguard import PNG, CountingServer, _Handler, _running

ALLOW_FIRST = AddressPolicy(["127.0.0.1/32"])
CHUNK = b"\0" * 65536


class _HostileHandler(_Handler):
    """Adds bodies that never end, drip, lie about their length, or ask the client to slow down."""

    def do_GET(self) -> None:
        if self.path == "/endless":
            self._stream(lambda: CHUNK, pause=0)
        elif self.path == "/drip":
            self._stream(lambda: b"\0", pause=0.05)
        elif self.path == "/announced-huge":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path == "/busy":
            with self.server.lock:
                self.server.paths.append(self.path)
            self.send_response(429)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/noai":
            with self.server.lock:
                self.server.paths.append(self.path)
            self.send_response(200)
            self.send_header("X-Robots-Tag", "noai")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
        else:
            super().do_GET()

    def _stream(self, chunk, pause: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()  # no Content-Length: the body ends when the connection does
        try:
            while True:
                data = chunk()
                self.wfile.write(data)
                with self.server.lock:
                    self.server.bytes_sent += len(data)
                if pause:
                    time.sleep(pause)
        except OSError:
            pass  # the client hung up


class HostileServer(CountingServer):
    def __init__(self, host: str) -> None:
        super().__init__(host, handler=_HostileHandler)
        self.bytes_sent = 0


@pytest.fixture
def hostile():
    yield from _running(HostileServer("127.0.0.1"))


@pytest.fixture
def forbidden():
    yield from _running(HostileServer("127.0.0.2"))


def _fetcher(**limits) -> ImageFetcher:
    values = {"max_image_bytes": 1 << 20, "max_download_s": 5.0} | limits
    return ImageFetcher(ALLOW_FIRST, FetchLimits(**values))


def _get(fetcher: ImageFetcher, url: str, directives=None):
    return fetcher(
        (0, url), timeout=5, user_agent_token="dalle-test", disallowed_header_directives=directives
    )


# --- one response ---------------------------------------------------------------------------------


def test_fetches_an_image_within_the_limits(hostile):
    key, stream, error = _get(_fetcher(), hostile.url("/img/a.png"))
    assert (key, error) == (0, None) and stream.read() == PNG


def test_an_endless_body_stops_at_the_cap(hostile):
    started = time.monotonic()
    _, stream, error = _get(_fetcher(max_image_bytes=1 << 20), hostile.url("/endless"))
    assert stream is None and TOO_LARGE_MARKER in error and "crawl.max_image_bytes" in error
    assert time.monotonic() - started < 5
    time.sleep(0.2)  # the server notices the hang-up
    # What the server managed to push is the cap plus what the socket buffers held, not an endless stream.
    assert hostile.bytes_sent < (1 << 20) + (16 << 20)


def test_an_announced_huge_body_is_not_read(hostile):
    _, stream, error = _get(_fetcher(), hostile.url("/announced-huge"))
    assert stream is None and TOO_LARGE_MARKER in error and str(10**12) in error


def test_a_dripping_body_stops_at_the_deadline(hostile):
    started = time.monotonic()
    _, stream, error = _get(_fetcher(max_download_s=1.0), hostile.url("/drip"))
    assert stream is None and DEADLINE_MARKER in error and "crawl.max_download_s" in error
    assert time.monotonic() - started < 3


def test_opt_out_header_drops_the_image(hostile):
    _, stream, error = _get(_fetcher(), hostile.url("/noai"), directives={"noai"})
    assert stream is None and error == X_ROBOTS_MESSAGE


def test_a_blocked_address_is_not_contacted(forbidden):
    _, stream, error = _get(_fetcher(), forbidden.url("/img/a.png"))
    assert stream is None and BLOCKED_MARKER in error
    assert forbidden.connections == 0


# --- pacing per host --------------------------------------------------------------------------------


def test_retry_after_holds_back_that_host_only(hostile):
    fetcher = _fetcher()
    _, _, error = _get(fetcher, hostile.url("/busy"))
    assert "429" in error
    started = time.monotonic()
    _get(fetcher, hostile.url("/img/a.png", host="localhost"))  # another host name: not held
    assert time.monotonic() - started < 0.5
    _get(fetcher, hostile.url("/img/b.png"))
    assert time.monotonic() - started >= 0.9


def test_retry_after_is_capped_by_the_config(hostile):
    fetcher = _fetcher(max_retry_after_s=0.2)
    _get(fetcher, hostile.url("/busy"))  # asks for 1 s
    started = time.monotonic()
    _get(fetcher, hostile.url("/img/a.png"))
    assert 0.1 <= time.monotonic() - started < 0.8


def test_host_interval_spaces_requests_across_threads(hostile):
    fetcher = _fetcher(host_interval_s=0.3)
    started = time.monotonic()
    threads = [threading.Thread(target=_get, args=(fetcher, hostile.url(f"/img/{i}.png"))) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.monotonic() - started >= 0.85  # 4 requests, 3 intervals
    assert len(hostile.paths) == 4


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("7", 7.0), (" 0 ", 0.0), ("soon", None), ("", None), ("-3", None)],
)
def test_retry_after_header_forms(header, seconds):
    assert retry_after_seconds(header) == seconds


def test_retry_after_http_date():
    import email.utils

    assert 25 <= retry_after_seconds(email.utils.formatdate(time.time() + 30, usegmt=True)) <= 30


# --- the pinned patch point --------------------------------------------------------------------------


def test_a_changed_img2dataset_downloader_is_refused(monkeypatch):
    check_patch_point()  # the pinned version passes

    def download_image(row, timeout, user_agent_token, disallowed_header_directives, context=None):
        raise AssertionError("never called")

    monkeypatch.setattr(fetch._img2dataset_downloader, "download_image", download_image)
    with pytest.raises(RuntimeError, match="install the version pyproject.toml pins"):
        check_patch_point()


# --- every call form, in a process guarded like img2dataset's workers --------------------------------


def _call_forms(first: str, second: str, second_port: int, secret_file: str) -> dict[str, str]:
    """Guard this (fresh) process as a crawl worker is guarded, then try each way a library could fetch."""
    guard_connections(AddressPolicy(["127.0.0.1/32"]))
    context = ssl.create_default_context()
    forms = {
        "urlopen": lambda: urllib.request.urlopen(second + "/img/a.png", timeout=5),
        "urlopen_context": lambda: urllib.request.urlopen(second + "/img/a.png", context=context, timeout=5),
        "build_opener": lambda: urllib.request.build_opener().open(second + "/img/a.png", timeout=5),
        "redirect_to_blocked": lambda: urllib.request.urlopen(
            first + "/redirect?to=" + second + "/img/a.png", context=context, timeout=5
        ),
        "redirect_to_ftp": lambda: urllib.request.build_opener().open(
            first + f"/redirect?to=ftp://127.0.0.2:{second_port}/x.png", timeout=5
        ),
        "redirect_to_file": lambda: urllib.request.build_opener().open(
            first + "/redirect?to=file://" + secret_file, timeout=5
        ),
        "file": lambda: urllib.request.urlopen("file://" + secret_file, context=context),
        "ftp": lambda: urllib.request.build_opener().open(f"ftp://127.0.0.2:{second_port}/x.png", timeout=5),
        "via_proxy_variable": lambda: urllib.request.build_opener().open(second + "/img/a.png", timeout=5),
        "http_client": lambda: _http_client_get("127.0.0.2", second_port),
        "create_connection": lambda: socket.create_connection(("127.0.0.2", second_port), timeout=5),
    }
    outcomes = {}
    for name, call in forms.items():
        try:
            result = call()
            outcomes[name] = "opened: " + repr(result.read(200) if hasattr(result, "read") else result)
            result.close()
        except Exception as err:  # noqa: BLE001 - the outcome is the test's subject
            outcomes[name] = f"{type(err).__name__}: {err}"
    outcomes["allowed"] = repr(
        urllib.request.urlopen(first + "/img/a.png", context=context, timeout=5).read(4)
    )
    return outcomes


def _http_client_get(host: str, port: int):
    connection = http.client.HTTPConnection(host, port, timeout=5)
    connection.request("GET", "/img/a.png")
    return connection.getresponse()


def test_no_call_form_passes_the_worker_guard(tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("the crawler must never read this file")
    servers = [CountingServer("127.0.0.1"), CountingServer("127.0.0.2"), CountingServer("127.0.0.1")]
    running = [_running(server) for server in servers]
    first, second, proxy = (next(gen) for gen in running)
    # An allow-listed proxy would forward anything anywhere: the guarded process must ignore it.
    for name in ("http_proxy", "HTTPS_PROXY", "ftp_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy.url(""))
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            outcomes = pool.apply(_call_forms, (first.url(""), second.url(""), second.port, str(secret)))
    finally:
        for gen in running:
            gen.close()
    refused = {name: text for name, text in outcomes.items() if name != "allowed"}
    for name, text in refused.items():
        assert not text.startswith("opened"), f"{name} got through: {text}"
        assert "never read this file" not in text
        assert BLOCKED_MARKER in text or "unknown url type" in text or "not allowed" in text, (name, text)
    assert outcomes["allowed"] == repr(PNG[:4])
    assert second.connections == 0 and proxy.connections == 0


# --- img2dataset itself, with an endless body: memory stays bounded ------------------------------------

_CRAWL_SCRIPT = """
import json, resource, sys
import pyarrow.parquet as pq
from dalle.curate.fetch import FetchLimits, use_guard_in_img2dataset
import img2dataset
folder, urls = sys.argv[1], sys.argv[2]
with use_guard_in_img2dataset(["127.0.0.1/32"], FetchLimits(max_image_bytes=4 << 20, max_download_s=30)):
    img2dataset.download(
        url_list=urls, input_format="parquet", url_col="url", caption_col=None, output_format="parquet",
        output_folder=folder, processes_count=1, thread_count=8, timeout=10, disable_all_reencoding=True,
        user_agent_token="dalle-test",
    )
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"worker_peak_rss_mib": peak_kib / 1024}))
"""


def _crawl_peak_rss(folder: Path, urls: list[str]) -> float:
    """Crawl `urls` with img2dataset in a fresh process; the worker's peak RSS in MiB."""
    folder.mkdir()
    pq.write_table(pa.table({"url": urls}), folder / "urls.parquet")
    done = subprocess.run(  # noqa: PLW1510 - the return code is asserted with the output
        [sys.executable, "-c", _CRAWL_SCRIPT, str(folder / "raw"), str(folder / "urls.parquet")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["worker_peak_rss_mib"]


def test_img2dataset_workers_stay_bounded_on_endless_bodies(tmp_path, hostile):
    # The baseline: the same crawl of small images only, measured in this run.
    baseline = _crawl_peak_rss(tmp_path / "small", [hostile.url("/img/a.png") + f"#{i}" for i in range(9)])
    # Fragments are not sent: eight distinct URLs, all served by the endless route.
    urls = [hostile.url("/endless") + f"#{i}" for i in range(8)] + [hostile.url("/img/a.png")]
    peak = _crawl_peak_rss(tmp_path / "endless", urls)
    rows = pq.read_table(next((tmp_path / "endless" / "raw").glob("*.parquet"))).to_pylist()
    outcome = {row["url"]: (row["status"], row["error_message"]) for row in rows}
    assert outcome[hostile.url("/img/a.png")] == ("success", None)
    endless = [outcome[url] for url in urls[:8]]
    assert all(status == "failed_to_download" and TOO_LARGE_MARKER in message for status, message in endless)
    # 8 threads at a 4 MiB cap: a few tens of MiB of bodies on top of what the worker holds anyway.
    assert peak < baseline + 150, (
        f"worker peak RSS {peak:.0f} MiB against {baseline:.0f} MiB for small images"
    )
    assert hostile.bytes_sent < 8 * ((4 << 20) + (16 << 20))
