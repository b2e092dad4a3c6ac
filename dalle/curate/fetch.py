"""How img2dataset's worker processes fetch one image: through the address guard, capped, polite.

img2dataset (pinned in pyproject.toml) builds its `Downloader` in the calling process and runs it in
spawned workers, where each URL goes through the module function `downloader.download_image`.
`use_guard_in_img2dataset` swaps in `GuardedDownloader`, which, in the worker, replaces that function
with an `ImageFetcher` and guards every connection of the process (`netguard.guard_connections`), so a
call form that skips our opener is still held. The fetcher:

- opens http(s) only, through `guarded_opener` (every redirect hop checked, no proxies; names of the
  static host map `crawl.resolve` get their mapped address, checked like a DNS answer);
- stops a body past `max_image_bytes` (announced or streamed), and a response that takes longer than
  `max_download_s` in all (a server that drips a byte at a time never trips the per-read timeout);
- spaces requests to one host by `host_interval_s`, and after HTTP 429 or 503 with `Retry-After`
  holds back that host's next requests until then (up to `max_retry_after_s`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import functools
import importlib
import inspect
import io
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence

# img2dataset imports albumentations, which otherwise asks pypi.org for a newer version on import, in
# this process and in every spawned worker: a crawler that promises to reach only what it is allowed to
# must not phone home. The variable is inherited by the workers.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# img2dataset also imports Ray where it is installed, and Ray reads these when it is imported: it reports
# usage statistics to its makers unless told not to (the crawler phones no one), colours its log for a
# terminal, and folds lines that several workers print alike into one "[repeated Nx across cluster]",
# where every worker's "shard N finished" line should reach the log (the stall watchdog and the operator
# read it).
for _name in ("RAY_USAGE_STATS_ENABLED", "RAY_COLOR_PREFIX", "RAY_DEDUP_LOGS"):
    os.environ.setdefault(_name, "0")

import img2dataset.downloader as _img2dataset_downloader
from img2dataset.downloader import Downloader

from dalle.curate.netguard import (
    AddressPolicy,
    crawler_user_agent,
    guard_connections,
    guarded_opener,
)

# The module, not the `main` function that img2dataset/__init__.py exports under the same name.
_img2dataset_main = importlib.import_module("img2dataset.main")

TOO_LARGE_MARKER = "response_too_large:"
DEADLINE_MARKER = "download timed out:"
X_ROBOTS_MESSAGE = "Use of image disallowed by X-Robots-Tag directive"  # img2dataset's own wording
_READ_CHUNK = 64 * 1024
_RETRY_AFTER_STATUSES = (429, 503)
# What ImageFetcher stands in for: img2dataset 1.47's download_image(row, timeout, user_agent_token,
# disallowed_header_directives), called by name from download_image_with_retry.
_PATCHED_PARAMETERS = ("row", "timeout", "user_agent_token", "disallowed_header_directives")


@dataclasses.dataclass(frozen=True)
class FetchLimits:
    """What one worker process allows a response (from `crawl.*`; plain values, so it pickles)."""

    max_image_bytes: int
    max_download_s: float
    host_interval_s: float = 0.0
    max_retry_after_s: float = 60.0


class HostGate:
    """Per-host pacing shared by a worker's download threads: the earliest time of the next request."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}

    def wait_turn(self, host: str) -> None:
        with self._lock:
            now = time.monotonic()
            turn = max(now, self._next.get(host, now))
            self._next[host] = turn + self.interval_s
        if turn > now:
            time.sleep(turn - now)

    def hold(self, host: str, seconds: float) -> None:
        with self._lock:
            self._next[host] = max(self._next.get(host, 0.0), time.monotonic() + seconds)


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds asked for by a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class ImageFetcher:
    """One worker process's fetching state: the guarded opener and the host gate."""

    def __init__(self, policy: AddressPolicy, limits: FetchLimits) -> None:
        self.limits = limits
        self.opener = guarded_opener(policy)
        self.gate = HostGate(limits.host_interval_s)

    def __call__(self, row, timeout, user_agent_token, disallowed_header_directives):
        key, url = row
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
        self.gate.wait_turn(host)
        request = urllib.request.Request(url, headers={"User-Agent": crawler_user_agent(user_agent_token)})
        deadline = time.monotonic() + self.limits.max_download_s
        try:
            with self.opener.open(request, timeout=timeout) as response:
                if disallowed_header_directives and _img2dataset_downloader.is_disallowed(
                    response.headers, user_agent_token, disallowed_header_directives
                ):
                    return key, None, X_ROBOTS_MESSAGE
                return key, io.BytesIO(self._read_body(response, url, deadline)), None
        except urllib.error.HTTPError as err:
            with contextlib.closing(err):
                if err.code in _RETRY_AFTER_STATUSES:
                    wait = retry_after_seconds(err.headers.get("Retry-After") if err.headers else None)
                    if wait is not None:
                        self.gate.hold(host, min(wait, self.limits.max_retry_after_s))
                return key, None, str(err)
        except Exception as err:  # noqa: BLE001 - img2dataset records the message as the sample's error
            return key, None, str(err)

    def _read_body(self, response, url: str, deadline: float) -> bytes:
        cap = self.limits.max_image_bytes
        announced = response.headers.get("Content-Length")
        if announced and announced.strip().isdigit() and int(announced) > cap:
            raise ValueError(
                f"{TOO_LARGE_MARKER} {url} announces {int(announced)} bytes, more than crawl.max_image_bytes={cap}"
            )
        body = bytearray()
        while True:
            # read1: whatever has arrived (a plain read waits for the whole chunk, past any deadline).
            chunk = response.read1(min(_READ_CHUNK, cap + 1 - len(body)))
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > cap:
                raise ValueError(f"{TOO_LARGE_MARKER} {url} sent more than crawl.max_image_bytes={cap} bytes")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{DEADLINE_MARKER} {url} took longer than crawl.max_download_s="
                    f"{self.limits.max_download_s:g} s for the whole response"
                )


def storage_endpoints() -> list[str]:
    """The S3 endpoints the environment names (img2dataset's workers write their shards there)."""
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
    return [os.environ[name] for name in names if os.environ.get(name)]


def check_patch_point() -> None:
    """Refuse to crawl with an img2dataset whose downloader no longer calls what GuardedDownloader replaces."""
    function = getattr(_img2dataset_downloader, "download_image", None)
    caller = getattr(_img2dataset_downloader, "download_image_with_retry", None)
    if (
        function is None
        or caller is None
        or tuple(inspect.signature(function).parameters) != _PATCHED_PARAMETERS
        or "download_image" not in caller.__code__.co_names
    ):
        raise RuntimeError(
            "this img2dataset's downloader differs from the one the crawler's network guard replaces; "
            "install the version pyproject.toml pins (pip install -c constraints.txt -e .)"
        )


class GuardedDownloader(Downloader):
    """img2dataset's Downloader that, in whichever process runs it, guards every connection and fetches
    with `ImageFetcher`'s limits."""

    def __init__(
        self,
        *args,
        allow_networks: Sequence[str] = (),
        limits: FetchLimits | None = None,
        resolve: Mapping[str, str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        # Plain values, so the instance pickles into img2dataset's spawned workers.
        self.allow_networks = tuple(allow_networks)
        self.resolve = dict(resolve or {})
        self.limits = limits or FetchLimits(max_image_bytes=16 * 2**20, max_download_s=60.0)
        self.exempt_endpoints = tuple(storage_endpoints())

    def __call__(self, row):
        policy = AddressPolicy(self.allow_networks, self.resolve)
        guard_connections(policy, self.exempt_endpoints)
        if not isinstance(_img2dataset_downloader.download_image, ImageFetcher):
            check_patch_point()
            _img2dataset_downloader.download_image = ImageFetcher(policy, self.limits)
        status, done = super().__call__(row)
        # A line per shard, from the worker: Ray's and Spark's distributors print no progress of their
        # own, and the crawl's watcher stops a process that prints nothing for crawl.stall_s.
        # One write of the whole line, so that workers sharing a pipe do not split each other's lines.
        print(
            f"shard {row[0]} {'finished' if status else 'failed'} (pid {os.getpid()})\n", end="", flush=True
        )
        return status, done


@contextlib.contextmanager
def use_guard_in_img2dataset(
    allow_networks: Sequence[str],
    limits: FetchLimits | None = None,
    resolve: Mapping[str, str] | None = None,
) -> Iterator[None]:
    """Within the block, `img2dataset.download` builds `GuardedDownloader`s (which run in its workers);
    `resolve` is the static host map (crawl.resolve) their guard consults before DNS."""
    check_patch_point()
    policy = AddressPolicy(allow_networks, resolve)  # bad CIDRs or map entries fail here, not in a worker
    original = _img2dataset_main.Downloader
    # A partial of a module-level class pickles by reference; a class made here would not.
    _img2dataset_main.Downloader = functools.partial(
        GuardedDownloader, allow_networks=policy.allow_networks, limits=limits, resolve=policy.resolve
    )
    try:
        yield
    finally:
        _img2dataset_main.Downloader = original
