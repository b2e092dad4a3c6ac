"""The static host map (`crawl.resolve`, like curl's --resolve HOST:IP): names such as
alpha.crawl.test reach loopback servers on 127.0.0.x without DNS, each with its own robots.txt,
and a mapped address passes the same address policy as a DNS answer.

Every test runs behind tests/loopback_fence.py, in this process and in the crawl's processes: a DNS
query, or a connection to anything but loopback, fails and is logged, so a map that is not consulted
(or an address that is not refused) shows up as a failed test, never as a packet leaving the machine.
"""

from __future__ import annotations

import hashlib
import os
import socket
import urllib.error

import pytest
from loopback_fence import install, sitecustomize_dir

from dalle.config import ConfigError, CrawlConfig, config_from_dict
from dalle.curate import netguard
from dalle.curate.crawl import classify_download_error, finished_shards, prepare_input, run_crawl
from dalle.curate.netguard import BLOCKED_MARKER, AddressPolicy, RobotsChecker, guarded_opener
from dalle.runroot import REFUSED_LIST
from dalle.storage import Storage
from demo.site import DemoServer, build_site
from demo.world import WorldConfig

MAPPED = "mapped by crawl.resolve"


@pytest.fixture
def fence(tmp_path, monkeypatch):
    """The loopback fence here and in every Python process started by the test; yields its log."""
    log = tmp_path / "fence.log"
    install(log, monkeypatch.setattr)
    folder = sitecustomize_dir(tmp_path / "fence", log)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    )
    yield log
    assert not log.exists(), f"the code under test asked DNS or left loopback:\n{log.read_text()}"


@pytest.fixture(scope="module")
def site():
    return build_site(WorldConfig(num_images=8, image_size=24, exact_duplicates=0, near_duplicates=0))


@pytest.fixture
def connects(monkeypatch):
    """The addresses this process's sockets connect to (after the fence's check)."""
    seen: list[tuple] = []
    connect = socket.socket.connect

    def recording(self, address):
        seen.append(address)
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", recording)
    return seen


def _url(server: DemoServer, name: str, path: str) -> str:
    return f"http://{name}:{server.port}/{path.lstrip('/')}"


# --- the configuration -------------------------------------------------------------------------


def test_config_normalises_a_host_map():
    cfg = CrawlConfig(resolve={"Site17.Crawl.Test.": " 127.0.0.5 ", "v6.crawl.test": "0:0::1"})
    assert cfg.resolve == {"site17.crawl.test": "127.0.0.5", "v6.crawl.test": "::1"}
    assert CrawlConfig().resolve == {}
    assert CrawlConfig(resolve=None).resolve == {}


@pytest.mark.parametrize(
    ("resolve", "message"),
    [
        ({"a.crawl.test": "b.crawl.test"}, "resolve['a.crawl.test'] = 'b.crawl.test' is not an IP address"),
        ({"a.crawl.test": "127.0.0.256"}, "is not an IP address like 127.0.0.5"),
        ({"a.crawl.test": 2130706433}, "is not an IP address"),
        ({"a_b.crawl.test": "127.0.0.1"}, "resolve key 'a_b.crawl.test' is not a host name"),
        ({"-a.crawl.test": "127.0.0.1"}, "is not a host name"),
        ({"a..test": "127.0.0.1"}, "is not a host name"),
        ({"": "127.0.0.1"}, "is not a host name"),
        ({"127.1": "127.0.0.1"}, "resolve key '127.1' is not a host name"),
        ({"10.0.0.1": "127.0.0.1"}, "resolve key '10.0.0.1' is an IP address"),
        ({"a.test": "127.0.0.1", "A.test": "127.0.0.2"}, "resolve maps 'a.test' twice"),
        (["a.crawl.test=127.0.0.1"], "resolve maps host names to IP addresses"),
    ],
)
def test_config_rejects_a_bad_host_map_and_names_the_entry(resolve, message):
    with pytest.raises(ConfigError) as refused:
        config_from_dict({"crawl": {"resolve": resolve}})
    assert "crawl.resolve" in str(refused.value)
    assert message in str(refused.value)


# --- the guard's resolver, in this process ---------------------------------------------------------


def test_a_mapped_name_is_fetched_at_its_address_and_keeps_its_name(fence, site, connects):
    path, _ = site.rows[0]
    with DemoServer(site, host="127.0.0.3") as server:
        policy = AddressPolicy(["127.0.0.3/32"], {"alpha.crawl.test": "127.0.0.3"})
        opener = guarded_opener(policy)
        with opener.open(_url(server, "Alpha.Crawl.Test", path), timeout=5) as response:
            assert response.read() == site.files[path][0]
        assert server.count(path) == 1
        # The socket went to the mapped address; the request still names the host as the URL does.
        assert connects == [("127.0.0.3", server.port)]
        assert server.host_headers == {f"Alpha.Crawl.Test:{server.port}": 1}
        # A name the map does not list is asked of DNS (here: the fence, which refuses and logs it).
        with pytest.raises(urllib.error.URLError, match="loopback fence"):
            opener.open(_url(server, "beta.crawl.test", path), timeout=5)
    assert fence.read_text().split()[1:] == ["dns", "'beta.crawl.test'"]
    fence.unlink()  # that lookup was the test's own; nothing else may be in the log


def test_a_name_mapped_into_a_blocked_network_is_refused_before_any_connect(fence, site, connects):
    with DemoServer(site, host="127.0.0.2") as forbidden:
        policy = AddressPolicy(
            ["127.0.0.1/32"], {"evil.crawl.test": "127.0.0.2", "inner.crawl.test": "10.0.0.1"}
        )
        opener = guarded_opener(policy)
        for name, ip, kind in [
            ("evil.crawl.test", "127.0.0.2", "loopback"),
            ("inner.crawl.test", "10.0.0.1", "private"),
        ]:
            with pytest.raises(urllib.error.URLError) as refused:
                opener.open(_url(forbidden, name, "img/a.png"), timeout=5)
            assert f"{BLOCKED_MARKER} {ip} is a {kind} address (host {name}, {MAPPED})" in str(refused.value)
        # robots.txt is read through the same resolver: the origin's URLs get the blocked fate.
        urls = [
            _url(forbidden, "evil.crawl.test", "img/a.png"),
            _url(forbidden, "inner.crawl.test", "img/b.png"),
        ]
        found = RobotsChecker(policy, "dalle-test", timeout=5).disallowed(urls)
        assert {index: reason for index, (reason, _) in found.items()} == {
            0: "blocked_address",
            1: "blocked_address",
        }
        assert MAPPED in found[1][1] and "10.0.0.1" in found[1][1]
        assert sum(forbidden.requests.values()) == 0
    assert connects == []  # not one socket was connected, to any address


def test_the_connection_guard_and_storage_endpoints_use_the_map(fence, monkeypatch):
    policy = AddressPolicy(
        ["127.0.0.1/32"], {"alpha.crawl.test": "127.0.0.1", "inner.crawl.test": "10.0.0.1"}
    )
    monkeypatch.setattr(netguard, "_connection_guard", (policy, frozenset()))
    with socket.socket() as sock:
        assert netguard._checked_peer(sock, ("alpha.crawl.test", 8080)) == ("127.0.0.1", 8080)
        with pytest.raises(netguard.BlockedAddress, match=f"10.0.0.1 is a private address .*{MAPPED}"):
            netguard._checked_peer(sock, ("inner.crawl.test", 8080))
    # A storage endpoint is exempt at the address its client finds with DNS, and at its mapped address
    # where the map names it (the fence's DNS answers no name: only the mapped address is left).
    assert netguard._endpoint_addresses(policy, "http://alpha.crawl.test:9000") == {("127.0.0.1", 9000)}
    assert fence.read_text().split()[1:] == ["dns", "'alpha.crawl.test'"]
    fence.unlink()  # the storage client's own lookup, not the crawler's
    assert netguard._endpoint_addresses(policy, "http://127.0.0.7:9000") == {("127.0.0.7", 9000)}


# --- the crawl stage, with img2dataset's worker processes -------------------------------------------


def _raw_rows(storage: Storage) -> dict[str, dict]:
    rows = {}
    for rel in finished_shards(storage):
        for row in storage.read_table(rel).select(["url", "status", "error_message", "sha256"]).to_pylist():
            rows[row["url"]] = row
    return rows


@pytest.mark.slow
def test_a_crawl_over_mapped_names_fetches_each_host_with_its_own_robots_txt(fence, site, tmp_path):
    paths = [path for path, _ in site.rows]
    disallowed = paths[:2]
    beta_robots = "User-agent: *\n" + "".join(f"Disallow: /{path}\n" for path in disallowed)
    with (
        DemoServer(site, host="127.0.0.1", robots_txt="User-agent: *\nDisallow: /private/\n") as alpha,
        DemoServer(site, host="127.0.0.3", robots_txt=beta_robots) as beta,
        DemoServer(site, host="127.0.0.2", robots_txt="User-agent: *\nDisallow:\n") as gamma,
    ):
        urls = {
            "alpha": [_url(alpha, "alpha.crawl.test", path) for path in paths],
            "beta": [_url(beta, "beta.crawl.test", path) for path in paths],
            "gamma": [_url(gamma, "gamma.crawl.test", path) for path in paths[:3]],
        }
        listed = [url for group in urls.values() for url in group]
        list_path = tmp_path / "urls.txt"
        list_path.write_text("".join(f"{url}\n" for url in listed))
        cfg = CrawlConfig(
            input_format="txt",
            allow_networks=["127.0.0.1/32", "127.0.0.3/32"],  # 127.0.0.2 (gamma) stays refused
            resolve={
                "alpha.crawl.test": "127.0.0.1",
                "beta.crawl.test": "127.0.0.3",
                "gamma.crawl.test": "127.0.0.2",
            },
            processes=1,
            threads=4,
            samples_per_shard=64,
            timeout_s=5,
        )
        storage = Storage(tmp_path / "run")
        prepared = prepare_input(str(list_path), storage, cfg)
        assert prepared.to_crawl == len(paths) * 2 - len(disallowed)
        assert prepared.refused == {"robots_txt": 2, "blocked_address": 3}
        run_crawl(storage, cfg, prepared, log=lambda line: None)

        # Each allowed host's robots.txt was read once, at its own address; gamma was never reached.
        assert alpha.count("/robots.txt") == 1 and beta.count("/robots.txt") == 1
        assert sum(gamma.requests.values()) == 0
        assert all(alpha.count(path) == 1 for path in paths)
        assert [beta.count(path) for path in paths] == [0] * len(disallowed) + [1] * (len(paths) - 2)
        assert set(alpha.host_headers) == {f"alpha.crawl.test:{alpha.port}"}
        assert set(beta.host_headers) == {f"beta.crawl.test:{beta.port}"}

    refused = {row["url"]: row for row in storage.read_table(REFUSED_LIST).to_pylist()}
    expected_refused = {url: "robots_txt" for url in urls["beta"][:2]} | dict.fromkeys(
        urls["gamma"], "blocked_address"
    )
    assert {url: (row["fate"], row["reason"]) for url, row in refused.items()} == {
        url: ("blocked", reason) for url, reason in expected_refused.items()
    }
    for url in urls["gamma"]:
        assert (
            "127.0.0.2 is a loopback address (host gamma.crawl.test, mapped by crawl.resolve)"
            in refused[url]["detail"]
        )
    assert "beta.crawl.test" in refused[urls["beta"][0]]["detail"]

    raw = _raw_rows(storage)
    assert set(raw) == set(listed) - set(expected_refused)
    for url, row in raw.items():
        path = url.split("/", 3)[3]
        assert (row["status"], row["error_message"]) == ("success", None), row
        assert row["sha256"] == hashlib.sha256(site.files[path][0]).hexdigest()


@pytest.mark.slow
def test_a_crawl_refuses_names_mapped_into_blocked_networks_in_its_workers(fence, site, tmp_path):
    """With robots.txt off, nothing is checked before img2dataset: its workers' guard refuses the
    mapped addresses, 127.0.0.2 and 10.0.0.1, before connecting (the fence logs any attempt)."""
    path = site.rows[0][0]
    with DemoServer(site, host="127.0.0.1") as alpha, DemoServer(site, host="127.0.0.2") as forbidden:
        allowed = _url(alpha, "alpha.crawl.test", path)
        blocked = {
            _url(forbidden, "evil.crawl.test", path): ("127.0.0.2", "loopback"),
            _url(forbidden, "inner.crawl.test", path): ("10.0.0.1", "private"),
        }
        list_path = tmp_path / "urls.txt"
        list_path.write_text("".join(f"{url}\n" for url in [allowed, *blocked]))
        cfg = CrawlConfig(
            input_format="txt",
            allow_networks=["127.0.0.1/32"],
            resolve={
                "alpha.crawl.test": "127.0.0.1",
                "evil.crawl.test": "127.0.0.2",
                "inner.crawl.test": "10.0.0.1",
            },
            respect_robots_txt=False,
            processes=1,
            threads=2,
            timeout_s=5,
        )
        storage = Storage(tmp_path / "run")
        run_crawl(storage, cfg, prepare_input(str(list_path), storage, cfg), log=lambda line: None)
        assert sum(forbidden.requests.values()) == 0
        assert alpha.count(path) == 1
    raw = _raw_rows(storage)
    assert raw[allowed]["status"] == "success"
    for url, (ip, kind) in blocked.items():
        message = raw[url]["error_message"]
        assert classify_download_error(message) == ("blocked", "blocked_address"), message
        assert f"{ip} is a {kind} address (host {url.split('/')[2].split(':')[0]}, {MAPPED})" in message
