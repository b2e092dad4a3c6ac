"""The crawler's network guard, against real HTTP servers on two loopback addresses.

127.0.0.1 plays the allow-listed network and 127.0.0.2 the network the crawler must never reach; each
server counts the connections it accepts, so "refused" means "not one byte was sent to it".
Nothing here talks to any address outside 127.0.0.0/8: public addresses are only given to the pure
`AddressPolicy.refusal`, and host names are answered by a fake resolver.
"""

from __future__ import annotations

import datetime
import http.server
import importlib
import io
import pickle
import random
import socket
import socketserver
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dalle.curate.fetch import GuardedDownloader, use_guard_in_img2dataset
from dalle.curate.netguard import (
    BLOCKED_MARKER,
    ROBOTS_MAX_BYTES,
    AddressPolicy,
    BlockedAddress,
    RobotsChecker,
    guarded_opener,
    install_guard,
    url_refusal,
)

# Imported after dalle.curate.fetch, which turns off albumentations' update check (a request to pypi.org) first.
# The module, not the `main` function that img2dataset exports under the same name.
IMG2DATASET_MAIN = importlib.import_module("img2dataset.main")
ALLOW_FIRST = AddressPolicy(["127.0.0.1/32"])


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: CountingServer

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.paths.append(self.path)
            self.server.host_headers.append(self.headers.get("Host"))
        if self.path == "/robots.txt" and self.server.robots_redirect_to:
            self.send_response(302)
            self.send_header("Location", self.server.robots_redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/robots.txt" and self.server.robots_stall_s:
            time.sleep(self.server.robots_stall_s)
            self._answer(200, b"User-agent: *\nDisallow:\n", "text/plain")
        elif self.path == "/robots.txt" and self.server.robots is not None:
            status, body = self.server.robots
            self._answer(status, body if isinstance(body, bytes) else body.encode(), "text/plain")
        elif self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.split("=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path.startswith(("/img/", "/private/")):
            self._answer(200, PNG, "image/png")
        else:
            self._answer(404, b"not found", "text/plain")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class CountingServer(http.server.ThreadingHTTPServer):
    """A loopback web server that counts accepted connections and records request paths."""

    daemon_threads = True

    def __init__(self, host: str, scheme: str = "http", handler: type = _Handler) -> None:
        super().__init__((host, 0), handler)
        self.scheme = scheme
        self.lock = threading.Lock()
        self.connections = 0
        self.paths: list[str] = []
        self.host_headers: list[str | None] = []
        self.robots: tuple[int, str | bytes] | None = None  # (status, body) for /robots.txt; None: 404
        self.robots_stall_s = 0.0  # > 0: /robots.txt answers only after that long
        self.robots_redirect_to = ""  # set: /robots.txt redirects there

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn, a reverse DNS query that could leave the machine.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def verify_request(self, request, client_address) -> bool:
        with self.lock:
            self.connections += 1
        return True

    def handle_error(self, request, client_address) -> None:
        pass

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.server_address[0]}:{self.port}{path}"


def _running(server: CountingServer):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def first():
    """The allow-listed server, on 127.0.0.1."""
    yield from _running(CountingServer("127.0.0.1"))


@pytest.fixture
def second():
    """The server the crawler must never reach, on 127.0.0.2."""
    yield from _running(CountingServer("127.0.0.2"))


@pytest.fixture
def fake_dns(monkeypatch):
    """A resolver that answers the names put in `answers`; other names fail, so no query leaves the machine."""
    answers: dict[str, list[str]] = {}
    lookups: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        lookups.append(host)
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers[host]]
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in str(host) else socket.AF_INET, host)
        except (OSError, TypeError):
            raise socket.gaierror(socket.EAI_NONAME, f"the test resolver has no answer for {host}") from None
        return real_getaddrinfo(host, port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers, lookups


def _open(opener: urllib.request.OpenerDirector | None, url: str) -> bytes:
    """GET through `opener`; None means the process-wide opener, as img2dataset uses it."""
    with opener.open(url, timeout=5) if opener else urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


# --- which addresses are public: pure functions, no traffic ---------------------------------------


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("::ffff:192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("fec0::1", "private"),  # deprecated site-local
        ("169.254.169.254", "link_local"),
        ("fe80::1", "link_local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("100.64.0.1", "non_public"),
        ("64:ff9b::a00:1", "private"),  # NAT64 spelling of 10.0.0.1
        ("2002:7f00:1::", "loopback"),  # 6to4 spelling of 127.0.0.1
    ],
)
def test_default_policy_refuses_non_public_addresses(ip, reason):
    assert AddressPolicy().refusal(ip) == reason


@pytest.mark.parametrize("ip", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "64:ff9b::5db8:d822"])
def test_default_policy_accepts_public_addresses(ip):
    assert AddressPolicy().refusal(ip) is None


def test_allow_list_opens_exactly_its_networks():
    assert ALLOW_FIRST.refusal("127.0.0.1") is None
    assert ALLOW_FIRST.refusal("::ffff:127.0.0.1") is None
    assert ALLOW_FIRST.refusal("127.0.0.2") == "loopback"
    assert ALLOW_FIRST.refusal("::1") == "loopback"
    assert AddressPolicy(["127.0.0.0/8"]).refusal("127.0.0.2") is None
    assert AddressPolicy(["::1/128"]).refusal("::1") is None
    assert AddressPolicy(["10.0.0.0/8"]).refusal("10.1.2.3") is None


def test_policy_rejects_what_is_not_a_list_of_cidrs():
    with pytest.raises(ValueError, match="'10.0.0.0/33' is not a CIDR"):
        AddressPolicy(["10.0.0.0/33"])
    with pytest.raises(TypeError, match="list of CIDRs"):
        AddressPolicy("127.0.0.0/8")


def test_policy_and_refusal_survive_pickling():
    policy = pickle.loads(pickle.dumps(ALLOW_FIRST))
    assert policy == ALLOW_FIRST
    assert policy.refusal("127.0.0.1") is None and policy.refusal("127.0.0.2") == "loopback"
    error = pickle.loads(pickle.dumps(BlockedAddress("127.0.0.2", "loopback", "example.test")))
    assert str(error) == (
        "blocked_address: 127.0.0.2 is a loopback address (host example.test); "
        "allow its network with crawl.allow_networks or --allow-network"
    )
    assert str(error).startswith(BLOCKED_MARKER)


# --- the guarded opener against real servers ----------------------------------------------------


def test_fetches_from_an_allowed_network(first):
    assert _open(guarded_opener(ALLOW_FIRST), first.url("/img/a.png")) == PNG
    assert first.paths == ["/img/a.png"]


def test_refuses_a_blocked_network_without_contacting_it(second):
    with pytest.raises(urllib.error.URLError) as refused:
        _open(guarded_opener(ALLOW_FIRST), second.url("/img/a.png"))
    assert BLOCKED_MARKER in str(refused.value)
    assert isinstance(refused.value.reason, BlockedAddress)
    assert second.connections == 0


def test_redirect_into_a_blocked_network_is_refused(first, second):
    with pytest.raises(urllib.error.URLError, match=BLOCKED_MARKER):
        _open(guarded_opener(ALLOW_FIRST), first.url("/redirect?to=" + second.url("/img/a.png")))
    assert first.paths == ["/redirect?to=" + second.url("/img/a.png")]
    assert second.connections == 0


def test_default_policy_refuses_loopback_before_connecting(first):
    with pytest.raises(urllib.error.URLError, match=f"{BLOCKED_MARKER} 127.0.0.1 is a loopback address"):
        _open(guarded_opener(AddressPolicy()), first.url("/img/a.png"))
    assert first.connections == 0


def test_opens_only_http_and_https(tmp_path):
    local_file = tmp_path / "secret.txt"
    local_file.write_text("not for the crawler")
    opener = guarded_opener(ALLOW_FIRST)
    for url in (local_file.as_uri(), "data:,hello", "ftp://127.0.0.1/x.png"):
        with pytest.raises(urllib.error.URLError, match="unknown url type"):
            _open(opener, url)


def test_ignores_proxy_environment_variables(first, second, monkeypatch):
    # urllib's default opener would send the request to the proxy, here the forbidden server.
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, second.url(""))
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert _open(guarded_opener(ALLOW_FIRST), first.url("/img/a.png")) == PNG
    assert second.connections == 0


def test_host_with_any_blocked_address_is_refused(first, second, fake_dns):
    answers, _ = fake_dns
    answers["mixed.test"] = ["127.0.0.1", "127.0.0.2"]
    with pytest.raises(urllib.error.URLError, match=f"{BLOCKED_MARKER} 127.0.0.2 .*host mixed.test"):
        _open(guarded_opener(ALLOW_FIRST), f"http://mixed.test:{first.port}/img/a.png")
    assert first.connections == 0 and second.connections == 0


def test_connects_to_the_checked_address_without_resolving_again(first, fake_dns):
    answers, lookups = fake_dns
    answers["site.test"] = ["127.0.0.1"]
    assert _open(guarded_opener(ALLOW_FIRST), f"http://site.test:{first.port}/img/a.png") == PNG
    assert lookups == ["site.test"]
    assert first.host_headers == [f"site.test:{first.port}"]


def test_keeps_the_timeout_given_to_open():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the TCP handshake, never answers
    previous_default = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5)  # an ignored timeout shows up as a 5 s wait instead of a hang
    try:
        started = time.monotonic()
        with pytest.raises((urllib.error.URLError, TimeoutError)):
            guarded_opener(ALLOW_FIRST).open(f"http://127.0.0.1:{listener.getsockname()[1]}/", timeout=0.3)
        assert time.monotonic() - started < 2
    finally:
        socket.setdefaulttimeout(previous_default)
        listener.close()


def _tls_contexts(folder: Path, host: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts: a throwaway CA, and a certificate for `host` that it signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "netguard test CA")])
    unused_usages = dict.fromkeys(
        [
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "encipher_only",
            "decipher_only",
        ],
        False,
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **unused_usages),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (folder / "leaf.key").write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(folder / "leaf.pem", folder / "leaf.key")
    return server_context, ssl.create_default_context(cafile=str(folder / "ca.pem"))


def test_https_connects_to_the_checked_address_and_verifies_the_host_name(tmp_path, fake_dns, second):
    server_context, client_context = _tls_contexts(tmp_path, "example.test")
    answers, lookups = fake_dns
    answers["example.test"] = ["127.0.0.1"]
    answers["evil.test"] = ["127.0.0.2"]
    server = CountingServer("127.0.0.1", scheme="https")
    server.socket = server_context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    opener = guarded_opener(ALLOW_FIRST, context=client_context)
    for tls_server in _running(server):
        # The certificate names example.test, not 127.0.0.1: this only succeeds when TLS is told the host name.
        assert _open(opener, tls_server.url("/img/a.png", host="example.test")) == PNG
        assert lookups == ["example.test"]
        with pytest.raises(urllib.error.URLError, match="certificate verify failed"):
            _open(opener, tls_server.url("/img/a.png"))
    with pytest.raises(urllib.error.URLError, match=f"{BLOCKED_MARKER} 127.0.0.2"):
        _open(opener, f"https://evil.test:{second.port}/img/a.png")
    assert second.connections == 0


def test_install_guard_routes_urlopen_through_the_guard(first, second):
    try:
        install_guard(ALLOW_FIRST)
        installed = urllib.request._opener
        install_guard(AddressPolicy(["127.0.0.1/32"]))
        assert urllib.request._opener is installed  # a second call changes nothing
        assert _open(None, first.url("/img/a.png")) == PNG
        with pytest.raises(urllib.error.URLError, match=BLOCKED_MARKER):
            _open(None, second.url("/img/a.png"))
        assert second.connections == 0
    finally:
        urllib.request.install_opener(None)


def test_use_guard_in_img2dataset_builds_picklable_guarded_downloaders_and_restores(second):
    original = IMG2DATASET_MAIN.Downloader
    before = urllib.request._opener
    fields = dict.fromkeys(
        [
            "sample_writer_class",
            "resizer",
            "save_caption",
            "extract_exif",
            "output_folder",
            "column_list",
            "compute_hash",
            "verify_hash_type",
            "encode_format",
            "user_agent_token",
            "disallowed_header_directives",
        ]
    )
    fields.update(thread_count=1, timeout=1, number_sample_per_shard=1, oom_shard_count=1, retries=0)
    with use_guard_in_img2dataset(["127.0.0.1/32"]):
        downloader = pickle.loads(pickle.dumps(IMG2DATASET_MAIN.Downloader(**fields)))
    assert type(downloader) is GuardedDownloader
    assert downloader.allow_networks == ("127.0.0.1/32",)
    assert IMG2DATASET_MAIN.Downloader is original
    # The guard is installed by the downloader in its worker, never in the calling process.
    assert urllib.request._opener is before
    assert second.connections == 0


# --- URLs refused before any request ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (None, "malformed_url"),
        ("", "malformed_url"),
        ("   ", "malformed_url"),
        ("http:///a.png", "malformed_url"),
        ("http://[::1/a.png", "malformed_url"),
        ("http://example.test:99999/a.png", "malformed_url"),
        ("ftp://example.test/a.png", "scheme_not_allowed"),
        ("file:///etc/passwd", "scheme_not_allowed"),
        ("javascript:alert(1)", "scheme_not_allowed"),
        ("example.test/a.png", "malformed_url"),
        ("http://user:***@example.test/a.png", "credentials_in_url"),
    ],
)
def test_url_refusal_names_urls_that_are_never_fetched(url, reason):
    refusal = url_refusal(url)
    assert refusal is not None and refusal[0] == reason and refusal[1]


@pytest.mark.parametrize(
    "url", ["http://example.test/a.png", "HTTPS://Example.test:8443/a.png", " http://127.0.0.2/x "]
)
def test_url_refusal_leaves_addresses_to_the_guard(url):
    assert url_refusal(url) is None


# --- robots.txt -----------------------------------------------------------------------------------


def test_robots_txt_disallows_paths_and_is_fetched_once_per_origin(first):
    first.robots = (200, "User-agent: *\nDisallow: /private/\n")
    urls = [first.url(f"/img/{i}.png") for i in range(20)] + [first.url("/private/x.png")]
    refused = RobotsChecker(ALLOW_FIRST, "dalle-test", timeout=5).disallowed(urls)
    assert list(refused) == [20]
    assert refused[20][0] == "robots_txt"
    assert first.paths.count("/robots.txt") == 1


def test_robots_txt_group_for_our_token_applies(first):
    first.robots = (200, "User-agent: dalle-test\nDisallow: /\n\nUser-agent: *\nDisallow:\n")
    urls = [first.url("/img/a.png")]
    assert RobotsChecker(ALLOW_FIRST, "dalle-test", timeout=5).disallowed(urls) == {
        0: ("robots_txt", f"{first.url('/robots.txt')} disallows this URL for user agent 'dalle-test'")
    }
    assert RobotsChecker(ALLOW_FIRST, "someone-else", timeout=5).disallowed(urls) == {}


def _robots_refused(server: CountingServer, paths: list[str], token: str = "dalle-test") -> list[str]:
    """The paths of `paths` that `server`'s robots.txt keeps `token` from, read over HTTP by RobotsChecker."""
    refused = RobotsChecker(ALLOW_FIRST, token, timeout=5).disallowed([server.url(p) for p in paths])
    assert {reason for reason, _ in refused.values()} <= {"robots_txt"}
    return [paths[index] for index in sorted(refused)]


def test_robots_txt_longest_match_wins_and_a_tie_goes_to_allow(first):
    # The standard library's parser takes the first rule that matches, in file order.
    first.robots = (200, "User-agent: *\nDisallow: /a\nAllow: /a/b\nDisallow: /t\nAllow: /t\n")
    paths = ["/a/b/c.png", "/a/x.png", "/a", "/t/1.png", "/img/1.png"]
    assert _robots_refused(first, paths) == ["/a/x.png", "/a"]


def test_robots_txt_star_matches_any_characters_inside_a_rule(first):
    first.robots = (200, "User-agent: *\nDisallow: /img/*/private/\nDisallow: /*?session=\n")
    paths = [
        "/img/2024/private/a.png",
        "/img/a/b/private/c.png",
        "/img/2024/public/a.png",
        "/img/private/a.png",  # `*` may be empty, but the rule still asks for /img/ and /private/
        "/img/a.png?session=1",
        "/img/a.png?lang=en",
    ]
    assert _robots_refused(first, paths) == [
        "/img/2024/private/a.png",
        "/img/a/b/private/c.png",
        "/img/a.png?session=1",
    ]


def test_robots_txt_dollar_anchors_a_rule_at_the_end_of_the_url(first):
    first.robots = (200, "User-agent: *\nDisallow: /*.png$\nAllow: /img/ok.png$\nDisallow: /exact$\n")
    paths = ["/img/a.png", "/img/a.png?x=1", "/img/a.pngx", "/img/a.jpg", "/img/ok.png", "/exact", "/exact/x"]
    assert _robots_refused(first, paths) == ["/img/a.png", "/exact"]


def test_robots_txt_groups_naming_our_token_override_star_and_are_merged(first):
    robots = (
        "User-agent: *\nDisallow: /\n\n"
        "User-agent: DALLE-Test\nDisallow: /a/\n\n"
        "User-agent: test\nDisallow: /img/\n\n"  # another agent's token, not a part of ours
        "User-agent: other-bot\nUser-agent: dalle-test\nDisallow: /b/\n"
    )
    first.robots = (200, robots)
    paths = ["/a/1.png", "/b/1.png", "/img/1.png", "/c/1.png"]
    assert _robots_refused(first, paths) == ["/a/1.png", "/b/1.png"]
    assert _robots_refused(first, paths, token="someone-else") == paths
    assert _robots_refused(first, paths, token="other-bot") == ["/b/1.png"]


def test_an_over_large_robots_txt_is_parsed_up_to_the_cap(first):
    head = "User-agent: *\nDisallow: /a\nDisallow: /*.gif$\n"
    padding = "# " + "x" * 97 + "\n"
    body = head + padding * ((ROBOTS_MAX_BYTES - len(head)) // len(padding) - 1)
    cut = "Allow: /a"  # the cap falls right after these bytes of the next line
    body += "#" * (ROBOTS_MAX_BYTES - len(body) - len(cut) - 1) + "\n"
    body += cut + "/b/c\n" + "Disallow: /img/\n" + padding * 1000
    assert len(body.encode()) > ROBOTS_MAX_BYTES + 90_000 and body.encode()[:ROBOTS_MAX_BYTES].endswith(
        b"\nAllow: /a"
    )
    first.robots = (200, body)
    # Read: the rules before the cap. Not read: the line the cap cuts (as "Allow: /a" it would allow
    # /a/x.png) and everything after it.
    paths = ["/x.gif", "/a/x.png", "/a/b/c.png", "/img/1.png"]
    assert _robots_refused(first, paths) == ["/x.gif", "/a/x.png", "/a/b/c.png"]
    assert first.paths == ["/robots.txt"]


def test_a_robots_txt_that_is_not_utf8_or_is_garbage_does_not_crash(first):
    noise = random.Random(9309).randbytes(64 * 1024)
    first.robots = (
        200,
        b"\xef\xbb\xbfUser-agent: *\nDisallow: /private/\n\xff\xfe\x00\x80Disallow\xc3(: /img/\n"
        + noise
        + b"\nDisallow: /caf\xe9/\n",
    )
    # The byte order mark does not hide the first line; the broken line is no rule.
    paths = ["/private/x.png", "/img/a.png", "/cafe/a.png"]
    assert _robots_refused(first, paths) == ["/private/x.png"]
    first.robots = (200, noise)
    assert _robots_refused(first, paths) == []


def test_missing_robots_txt_allows_everything(first):
    first.robots = None  # 404
    assert RobotsChecker(ALLOW_FIRST, "dalle-test", timeout=5).disallowed([first.url("/private/x.png")]) == {}
    assert first.paths == ["/robots.txt"]


def test_robots_txt_server_error_disallows_the_whole_origin(first):
    first.robots = (500, "oops")
    urls = [first.url("/img/a.png"), first.url("/img/b.png")]
    refused = RobotsChecker(ALLOW_FIRST, "dalle-test", timeout=5).disallowed(urls)
    assert sorted(refused) == [0, 1]
    assert {reason for reason, _ in refused.values()} == {"robots_txt_unavailable"}


def test_robots_of_a_blocked_origin_refuses_its_urls_without_contacting_it(first, second):
    first.robots = (200, "User-agent: *\nDisallow:\n")
    second.robots = (200, "User-agent: *\nDisallow:\n")
    urls = [second.url("/img/a.png"), first.url("/img/a.png"), "ftp://127.0.0.2/x.png", ""]
    refused = RobotsChecker(ALLOW_FIRST, "dalle-test", timeout=5).disallowed(urls)
    assert list(refused) == [0]
    reason, detail = refused[0]
    assert reason == "blocked_address" and detail.startswith(
        f"{BLOCKED_MARKER} 127.0.0.2 is a loopback address"
    )
    assert second.connections == 0
    assert first.paths == ["/robots.txt"]


def test_a_host_that_refuses_connections_is_left_to_the_download_attempt():
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused, the download fails the same way
    checker = RobotsChecker(ALLOW_FIRST, "dalle-test", timeout=5)
    assert checker.disallowed([f"http://127.0.0.1:{port}/img/a.png"]) == {}


def test_a_robots_txt_that_stalls_disallows_the_origin(first):
    """RFC 9309 2.3.1.4: a robots.txt unreachable for a network error means complete disallow; the
    site answers, so its images could be taken against rules we never read."""
    first.robots_stall_s = 2.0
    urls = [first.url("/img/a.png"), first.url("/img/b.png")]
    refused = RobotsChecker(ALLOW_FIRST, "dalle-test", timeout=0.5).disallowed(urls)
    assert sorted(refused) == [0, 1]
    reason, detail = refused[0]
    assert reason == "robots_txt_unavailable" and "could not be read" in detail
    assert first.paths == ["/robots.txt"]


def test_a_robots_txt_redirected_into_a_blocked_network_disallows_the_origin(first, second):
    first.robots_redirect_to = second.url("/robots.txt")
    second.robots = (200, "User-agent: *\nDisallow:\n")
    refused = RobotsChecker(ALLOW_FIRST, "dalle-test", timeout=5).disallowed([first.url("/img/a.png")])
    assert refused[0][0] == "robots_txt_unavailable", refused
    assert "blocked_address" in refused[0][1]
    assert second.connections == 0


# --- the real img2dataset, with its spawned worker process --------------------------------------


def test_img2dataset_download_refuses_blocked_urls_in_its_workers(tmp_path, first, second):
    urls = [
        first.url("/img/a.png"),
        second.url("/img/b.png"),
        first.url("/redirect?to=" + second.url("/img/c.png")),
    ]
    pq.write_table(pa.table({"url": urls}), tmp_path / "urls.parquet")
    with use_guard_in_img2dataset(["127.0.0.1/32"]):
        IMG2DATASET_MAIN.download(
            url_list=str(tmp_path / "urls.parquet"),
            input_format="parquet",
            url_col="url",
            caption_col=None,
            output_format="parquet",
            output_folder=str(tmp_path / "raw"),
            processes_count=1,
            thread_count=2,
            timeout=5,
            disable_all_reencoding=True,
            user_agent_token="dalle-test",
        )
    rows = pq.read_table(next((tmp_path / "raw").glob("*.parquet"))).to_pylist()
    outcome = {row["url"]: (row["status"], row["error_message"]) for row in rows}
    assert outcome[urls[0]] == ("success", None)
    for url in urls[1:]:
        status, message = outcome[url]
        assert status == "failed_to_download" and BLOCKED_MARKER in message
    assert second.connections == 0
    assert first.paths.count("/img/a.png") == 1
