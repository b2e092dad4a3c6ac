"""Shared test set-up: one Prefect test server per session, an S3 endpoint on loopback (moto)."""

from __future__ import annotations

import os
import socket

import pytest

# Before anything imports torch, Prefect or open_clip: no telemetry, no model hub, two cores.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Two cores: one test at a time uses both; under pytest-xdist's two workers each uses one.
os.environ.setdefault("OMP_NUM_THREADS", "1" if "PYTEST_XDIST_WORKER" in os.environ else "2")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def pytest_addoption(parser):
    parser.addoption(
        "--learning-seed",
        type=int,
        default=0,
        help="seed of the tests marked 'learning' (they train a model and assert it learned); "
        "they must pass for every seed and kernel path (make test-paths runs the matrix)",
    )


def pytest_report_header(config):
    import torch

    knobs = " ".join(
        f"{k}={os.environ[k]}"
        for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")
        if k in os.environ
    )
    return (
        f"torch kernels: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
        f"{', ' + knobs if knobs else ''}; learning seed {config.getoption('--learning-seed')}"
    )


@pytest.fixture(scope="session")
def learning_seed(request) -> int:
    """The seed a learning test trains with; any seed must do."""
    return request.config.getoption("--learning-seed")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server():
    """Prefect's test harness: a temporary database and API server for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1, with the standard AWS variables pointing at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing-key-id",
        AWS_SECRET_ACCESS_KEY="testing-secret-value",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket on the moto server; yields its s3:// URI."""
    import boto3

    name = "dalle-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[
        :40
    ].strip("-")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(params=["local", "s3"])
def run_root(request, tmp_path):
    """A run root: a local folder, or a prefix in a fresh bucket on moto's S3 server."""
    if request.param == "local":
        return str(tmp_path / "run")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/runs/test"


class _FlakyProxy:
    """An HTTP proxy on 127.0.0.1 in front of the S3 endpoint that answers every `every`-th request
    with 503 SlowDown, as a busy S3 or MinIO does now and then."""

    def __init__(self, upstream: str, every: int = 4):
        import http.client
        import http.server
        import threading
        from urllib.parse import urlsplit

        target = urlsplit(upstream)
        proxy = self
        self.requests = 0
        self.failed = 0
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy.lock:
                    proxy.requests += 1
                    fail = proxy.requests % every == 0
                    proxy.failed += fail
                if fail:
                    payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD answer has headers only
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = target.netloc
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky_s3(s3_bucket, s3_endpoint):
    """`s3_bucket` reached through a proxy that fails every 4th request with 503; yields the proxy."""
    proxy = _FlakyProxy(s3_endpoint)
    os.environ["AWS_ENDPOINT_URL"] = proxy.url
    try:
        yield proxy
    finally:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
        proxy.close()
