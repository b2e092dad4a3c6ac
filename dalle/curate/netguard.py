"""The crawler's network guard: connect only to public addresses unless a network is allow-listed.

A URL list is untrusted input. Without a guard, a row such as http://169.254.169.254/ or a public
host that redirects (or resolves) to 10.0.0.5 makes the crawler fetch from the machine's own
network. The guard sits where urllib opens sockets, so every redirect hop is checked too: each host
is resolved once, refused if any of its addresses is non-public, and otherwise connected to by the
address that was checked (never resolved a second time).

Two layers: `guarded_opener` is the one way this project fetches a URL (http and https only, no
proxies, every hop checked); `guard_connections` makes every Python-level socket connect of a
process pass the same policy, so a library that builds its own opener (`urlopen(..., context=)`,
`build_opener().open`, a redirect to ftp:, a proxy from the environment) is still held. The crawl's
worker processes get both (`dalle.curate.fetch`). `RobotsChecker` reads each site's robots.txt
through the opener.

A static host map (`crawl.resolve`, like curl's `--resolve HOST:IP`) gives some names a fixed address:
`AddressPolicy.getaddrinfo`, the guard's one resolver, answers those names from the map without a DNS
query, and the address is then checked like any DNS answer. URLs and Host headers keep the name (TLS
too: SNI and the certificate check use it); only the address lookup changes.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import os
import socket
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from protego import Protego

from dalle.config import host_key, host_map

BLOCKED_MARKER = "blocked_address:"
"""Prefix of every refusal message; urllib wraps it ("<urlopen error blocked_address: ...>"), so match with `in`."""

ROBOTS_MAX_BYTES = 512 * 1024
"""Bytes of a robots.txt that are read and parsed; RFC 9309 asks crawlers to parse at least 500 KiB.
A longer file is cut at its last line break before the cap (a cut rule could mean something else)."""

_FETCHED_SCHEMES = ("http", "https")

_REASON_PHRASES = {
    "loopback": "a loopback",
    "private": "a private",
    "link_local": "a link-local",
    "multicast": "a multicast",
    "reserved": "a reserved",
    "unspecified": "an unspecified",
    "non_public": "a non-public",
}

# NAT64's well-known prefix: 64:ff9b::a.b.c.d is a.b.c.d, reached through a translator.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class AddressPolicy:
    """Which IP addresses the crawler may connect to: public ones, plus the allow-listed networks; and
    which address a name of the static host map `resolve` stands for (no DNS for those names)."""

    def __init__(self, allow_networks: Sequence[str] = (), resolve: Mapping[str, str] | None = None) -> None:
        if isinstance(allow_networks, str):
            raise TypeError(f"allow_networks must be a list of CIDRs, not the string {allow_networks!r}")
        networks = []
        for cidr in allow_networks:
            try:
                networks.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError as err:
                raise ValueError(
                    f"allow_networks entry {cidr!r} is not a CIDR like 127.0.0.0/8: {err}"
                ) from None
        self.allow_networks = tuple(str(network) for network in networks)
        self._networks = tuple(networks)
        self.resolve = host_map(resolve)

    def mapped(self, host: object) -> str | None:
        """The address the host map gives `host`; None for a name it does not list (DNS answers it)."""
        return self.resolve.get(host_key(host) or "") if self.resolve else None

    def getaddrinfo(self, host, port, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0):
        """socket.getaddrinfo, except that a name of the host map gets its mapped address, with no DNS
        query (AI_NUMERICHOST). The answer is not checked here: callers check every address."""
        mapped = self.mapped(host)
        if mapped is None:
            return socket.getaddrinfo(host, port, family, type, proto, flags)
        return socket.getaddrinfo(mapped, port, family, type, proto, flags | socket.AI_NUMERICHOST)

    def refusal(self, ip: str) -> str | None:
        """None when `ip` may be connected to; otherwise why not, as one word ("loopback", "private", ...)."""
        address = _effective_address(ipaddress.ip_address(ip))
        if any(address.version == net.version and address in net for net in self._networks):
            return None
        # Categories before is_global: Python 3.11 calls multicast addresses "global".
        if address.is_unspecified:
            return "unspecified"
        if address.is_loopback:
            return "loopback"
        if address.is_link_local:
            return "link_local"
        if address.is_multicast:
            return "multicast"
        if address.is_private or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local):
            # fec0::/10 (site-local) is deprecated but still routed inside some networks.
            return "private"
        if address.is_reserved:
            return "reserved"
        if isinstance(address, ipaddress.IPv6Address) and address.sixtofour is not None:
            # 6to4 delivers to the embedded IPv4 address, so that one must be acceptable too.
            embedded = self.refusal(str(address.sixtofour))
            if embedded is not None:
                return embedded
        if not address.is_global:
            return "non_public"
        return None

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, AddressPolicy)
            and self._networks == other._networks
            and self.resolve == other.resolve
        )

    def __hash__(self) -> int:
        return hash((self._networks, tuple(self.resolve.items())))

    def __repr__(self) -> str:
        shown = f", resolve={self.resolve!r}" if self.resolve else ""
        return f"AddressPolicy(allow_networks={list(self.allow_networks)!r}{shown})"


def _effective_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address):
    """The address packets actually reach: ::ffff:a.b.c.d and 64:ff9b::a.b.c.d (NAT64) mean a.b.c.d."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


class BlockedAddress(OSError):
    """A connection the guard refused; str() starts with BLOCKED_MARKER and says how to allow it."""

    def __init__(self, ip: str, reason: str, host: str, mapped: bool = False) -> None:
        self.ip = ip
        self.reason = reason
        self.host = host
        self.mapped = mapped  # the address came from the host map (crawl.resolve), not from DNS
        source = ", mapped by crawl.resolve" if mapped else ""
        super().__init__(
            f"{BLOCKED_MARKER} {ip} is {_REASON_PHRASES.get(reason, 'a refused')} address (host {host}{source}); "
            "allow its network with crawl.allow_networks or --allow-network"
        )

    def __reduce__(self):
        return type(self), (self.ip, self.reason, self.host, self.mapped)


def _connect_checked(
    policy: AddressPolicy, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None
):
    """Resolve the host once, refuse it if any address is refused, else connect to a checked address."""
    host, port = address[0], address[1]
    infos = policy.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # One bad address refuses the host: a resolver could hand out a public and a private address and
    # let the connection fall through to the private one.
    for *_, sockaddr in infos:
        reason = policy.refusal(sockaddr[0])
        if reason is not None:
            raise BlockedAddress(sockaddr[0], reason, host, mapped=policy.mapped(host) is not None)
    last_error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            sock.close()
            last_error = err
    raise last_error if last_error is not None else OSError(f"no address found for host {host}")


class _GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, policy: AddressPolicy, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # connect() opens its socket through this attribute with (self.host, self.port).
        self._create_connection = functools.partial(_connect_checked, policy)


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, policy: AddressPolicy, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # The socket goes to the checked IP; connect() then wraps it with server_hostname=self.host,
        # so SNI and certificate checks still use the name the URL asked for.
        self._create_connection = functools.partial(_connect_checked, policy)


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: AddressPolicy) -> None:
        super().__init__()
        self._policy = policy

    def do_open(self, http_class, req, **http_conn_args):
        return super().do_open(
            functools.partial(_GuardedHTTPConnection, policy=self._policy), req, **http_conn_args
        )


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: AddressPolicy, context: ssl.SSLContext | None = None) -> None:
        super().__init__(context=context)
        self._policy = policy

    def do_open(self, http_class, req, **http_conn_args):
        return super().do_open(
            functools.partial(_GuardedHTTPSConnection, policy=self._policy), req, **http_conn_args
        )


def guarded_opener(
    policy: AddressPolicy, context: ssl.SSLContext | None = None
) -> urllib.request.OpenerDirector:
    """An opener for http and https only, without proxies, whose every connection (redirects too) is guarded."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler({}),  # proxy environment variables would bypass the address check
        urllib.request.UnknownHandler(),  # file:, ftp:, data: ... fail with "unknown url type"
        _GuardedHTTPHandler(policy),
        _GuardedHTTPSHandler(policy, context),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


_install_lock = threading.Lock()
_installed: tuple[AddressPolicy, urllib.request.OpenerDirector] | None = None


def _current_opener() -> urllib.request.OpenerDirector | None:
    # urllib keeps the installed opener in a module global and offers no getter.
    return getattr(urllib.request, "_opener", None)


def install_guard(policy: AddressPolicy) -> None:
    """Make urllib.request.urlopen in this process go through `guarded_opener(policy)`; a repeat call is a no-op."""
    global _installed
    with _install_lock:
        if _installed is not None and _installed[0] == policy and _current_opener() is _installed[1]:
            return
        opener = guarded_opener(policy)
        urllib.request.install_opener(opener)
        _installed = (policy, opener)


def _restore_opener(opener: urllib.request.OpenerDirector | None) -> None:
    global _installed
    with _install_lock:
        urllib.request.install_opener(opener)
        _installed = None


_PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy"})
_INET_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_unguarded_connect = socket.socket.connect
_unguarded_connect_ex = socket.socket.connect_ex
# (policy, exempt (ip, port) pairs) once guard_connections ran in this process.
_connection_guard: tuple[AddressPolicy, frozenset[tuple[str, int]]] | None = None


def _checked_peer(sock: socket.socket, address):
    """`address` with its host resolved once and checked; the resolved address is the one connected to."""
    guard = _connection_guard
    if guard is None or sock.family not in _INET_FAMILIES or not isinstance(address, tuple):
        return address
    policy, exempt = guard
    host, port = address[0], address[1]
    try:
        ipaddress.ip_address(host)
        candidates = [address]
    except ValueError:  # a name: resolve it here, so that what is checked is what is connected to
        candidates = [info[4] for info in policy.getaddrinfo(host, port, sock.family, sock.type)]
    for candidate in candidates:
        if (candidate[0], port) in exempt:
            continue
        reason = policy.refusal(candidate[0])
        if reason is not None:
            raise BlockedAddress(candidate[0], reason, str(host), mapped=policy.mapped(host) is not None)
    return candidates[0]


def _guarded_connect(self: socket.socket, address) -> None:
    return _unguarded_connect(self, _checked_peer(self, address))


def _guarded_connect_ex(self: socket.socket, address) -> int:
    return _unguarded_connect_ex(self, _checked_peer(self, address))


def _scheme_refused(self, req):
    raise urllib.error.URLError(f"unknown url type: {req.type} (the crawler fetches http and https only)")


def _endpoint_addresses(policy: AddressPolicy, endpoint: str) -> set[tuple[str, int]]:
    parts = urllib.parse.urlsplit(endpoint)
    if not parts.hostname:
        return set()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses: set[tuple[str, int]] = set()
    # The storage client resolves its endpoint itself, with DNS; a connection by a name of the host
    # map goes to the mapped address. Either is the operator's endpoint.
    lookups = [socket.getaddrinfo]
    if policy.mapped(parts.hostname) is not None:
        lookups.append(policy.getaddrinfo)
    for lookup in lookups:
        try:
            infos = lookup(parts.hostname, port, type=socket.SOCK_STREAM)
        except OSError:
            continue  # an endpoint that does not resolve is not reached either way
        addresses |= {(info[4][0], port) for info in infos}
    return addresses


def guard_connections(policy: AddressPolicy, exempt_endpoints: Sequence[str] = ()) -> None:
    """From now on, in this process: every Python-level TCP connect passes `policy` (except to the
    storage endpoints in `exempt_endpoints`, URLs set by the operator), urllib opens no file:, ftp: or
    data: URL whoever builds the opener, and proxy variables are dropped. For the crawl's worker
    processes, which do nothing else; there is no undo."""
    global _connection_guard
    exempt: set[tuple[str, int]] = set()
    for endpoint in exempt_endpoints:
        exempt |= _endpoint_addresses(policy, endpoint)
    for name in list(os.environ):
        if name.lower() in _PROXY_VARIABLES:
            del os.environ[name]
    _connection_guard = (policy, frozenset(exempt))
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex
    urllib.request.FileHandler.file_open = _scheme_refused
    urllib.request.FTPHandler.ftp_open = _scheme_refused
    urllib.request.DataHandler.data_open = _scheme_refused
    install_guard(policy)


def _short(url: str, limit: int = 200) -> str:
    return url if len(url) <= limit else url[:limit] + "..."


def url_refusal(url: object) -> tuple[str, str] | None:
    """(reason, detail) when `url` must never be fetched (not an http(s) URL with a host); None otherwise."""
    if not isinstance(url, str):
        return "malformed_url", f"url is {type(url).__name__}, not text"
    text = url.strip()
    if not text:
        return "malformed_url", "url is empty"
    try:
        parts = urllib.parse.urlsplit(text)
        host = parts.hostname
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as err:
        return "malformed_url", f"{_short(text)!r} cannot be parsed: {err}"
    scheme = parts.scheme.lower()
    if not scheme:
        return "malformed_url", f"{_short(text)!r} is not an absolute URL (no scheme)"
    if scheme not in _FETCHED_SCHEMES:
        shown = repr(scheme) if scheme else "no scheme"
        return "scheme_not_allowed", f"{_short(text)!r} has {shown}; only http and https URLs are fetched"
    if not host:
        return "malformed_url", f"{_short(text)!r} has no host"
    if parts.username is not None or parts.password is not None:
        # read_url_list has already replaced the user info; it would never be sent anyway.
        return "credentials_in_url", f"{_short(text)!r} has user info, which the crawler never sends"
    return None


def _origin(url: object) -> tuple[str, str] | None:
    """(origin, host) of an http(s) URL, with default ports dropped so equal origins compare equal."""
    if url_refusal(url) is not None:
        return None
    parts = urllib.parse.urlsplit(url.strip())  # type: ignore[union-attr]
    scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != {"http": 80, "https": 443}[scheme]:
        netloc += f":{port}"
    return f"{scheme}://{netloc}", host


def _blocked_cause(err: BaseException) -> BlockedAddress | None:
    if isinstance(err, BlockedAddress):
        return err
    if isinstance(err, urllib.error.URLError) and isinstance(err.reason, BlockedAddress):
        return err.reason
    return None


def crawler_user_agent(user_agent_token: str) -> str:
    """The User-Agent img2dataset sends for `user_agent_token`, so robots.txt requests look like the crawl's."""
    agent = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
    if user_agent_token:
        agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    return agent


# What one origin's robots.txt says: a parser to ask, a verdict for all its URLs, or None (all allowed).
_OriginRules = Protego | tuple[str, str] | None


def parse_robots_txt(body: bytes) -> Protego:
    """The rules of a robots.txt body as RFC 9309 reads them (Protego): the group naming our product
    token, case-insensitively, else `*` (groups naming the same agent are merged; a name is not
    matched inside another word, so `test` is not `dalle-test`, but Protego also takes a group whose
    name starts our token, `dalle` for `dalle-pipeline`); the longest matching rule wins; `*` and a
    final `$` are wildcards; an Allow as long as the Disallow wins. Bytes past ROBOTS_MAX_BYTES are
    dropped with the line the cap cuts; bytes that are not UTF-8 become U+FFFD and a leading byte
    order mark is dropped, so garbage gives rules that match nothing, never an error."""
    if len(body) > ROBOTS_MAX_BYTES:
        body = body[:ROBOTS_MAX_BYTES]
        # A rule cut short can say something else ("Allow: /a/b/c" -> "Allow: /a"): drop it.
        body = body[: max(body.rfind(b"\n"), body.rfind(b"\r")) + 1]
    return Protego.parse(body.decode("utf-8-sig", errors="replace"))


class RobotsChecker:
    """Finds the URLs that robots.txt (RFC 9309, read by Protego) or the address guard rule out, one
    robots.txt per origin."""

    def __init__(
        self,
        policy: AddressPolicy,
        user_agent_token: str,
        timeout: float,
        max_workers: int = 16,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.user_agent_token = user_agent_token
        self.timeout = timeout
        self.max_workers = max(1, max_workers)
        self._opener = guarded_opener(policy, context)
        self._user_agent = crawler_user_agent(user_agent_token)

    def disallowed(self, urls: Sequence[str]) -> dict[int, tuple[str, str]]:
        """Index -> (reason, detail) for each http(s) URL that must not be fetched; other URLs are not looked at."""
        by_origin: dict[tuple[str, str], list[int]] = {}
        for index, url in enumerate(urls):
            origin = _origin(url)
            if origin is not None:
                by_origin.setdefault(origin, []).append(index)
        if not by_origin:
            return {}
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(by_origin))) as pool:
            rules = dict(zip(by_origin, pool.map(self._rules_for, by_origin)))
        refused: dict[int, tuple[str, str]] = {}
        for origin, indices in by_origin.items():
            origin_rules = rules[origin]
            for index in indices:
                if isinstance(origin_rules, tuple):
                    refused[index] = origin_rules
                elif origin_rules is not None and not origin_rules.can_fetch(
                    urls[index].strip(), self.user_agent_token
                ):
                    refused[index] = (
                        "robots_txt",
                        f"{origin[0]}/robots.txt disallows this URL for user agent {self.user_agent_token!r}",
                    )
        return refused

    def _rules_for(self, origin: tuple[str, str]) -> _OriginRules:
        origin_url, host = origin
        robots_url = origin_url + "/robots.txt"
        request = urllib.request.Request(robots_url, headers={"User-Agent": self._user_agent})
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                body = response.read(ROBOTS_MAX_BYTES + 1)  # one more: parse_robots_txt sees the cut
        except urllib.error.HTTPError as err:
            err.close()
            # RFC 9309 2.3.1.4: a server error means "assume complete disallow". 429 is read the same way:
            # a site asking us to slow down is not inviting a crawl.
            if err.code >= 500 or err.code == 429:
                return (
                    "robots_txt_unavailable",
                    f"{robots_url} answered HTTP {err.code}; the site is skipped until its robots.txt can be read",
                )
            # 4xx (and redirects past the limit) mean there is no robots.txt: everything is allowed.
            return None
        except (OSError, http.client.HTTPException, ValueError) as err:
            blocked = _blocked_cause(err)
            if blocked is not None and blocked.host.lower() == host:
                return "blocked_address", str(blocked)
            reason = getattr(err, "reason", err)  # urllib wraps the socket's error
            if isinstance(reason, (ConnectionRefusedError, socket.gaierror)):
                # Nothing answers at that host: the download attempt meets the same obstacle and
                # records its own error (no content can be taken against the site's rules).
                return None
            # It answered but its robots.txt could not be read (timeout, reset, broken HTTP, a redirect
            # into a blocked network): RFC 9309 2.3.1.4, unreachable means "assume complete disallow".
            return (
                "robots_txt_unavailable",
                (
                    f"{robots_url} could not be read ({type(reason).__name__}: {_short(str(reason))}); "
                    "the site is skipped until its robots.txt can be read"
                ),
            )
        return parse_robots_txt(body)
