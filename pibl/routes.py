"""Routes: which pool (or redirect, or fixed answer) a request gets, and its policies (pure).

``[[routes]]`` are matched in order and the first match wins, as nginx's ``location``
blocks with a prefix are not (nginx takes the longest prefix) but HAProxy's ``use_backend``
rules, Caddy's ``route`` and Traefik's priorities are: order is what a reader of the file
sees, so order decides. A file without ``[[routes]]`` has one catch-all route to the pool
of its top-level ``[[backends]]``.

Everything a route decides is compiled once per configuration (and on reload): host
patterns into a table indexed by host, header edits into lower-case byte strings, CIDR
lists into ``ipaddress`` networks. Per request, :meth:`Router.match` looks up the host's
candidate list (built once per host name seen, kept in a bounded table) and checks the
cheap conditions of each candidate in order; with fifty routes and a common host it costs a
dictionary lookup and a few ``startswith`` calls.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from pibl.config import DEFAULT_POOL, Config, LimitConfig, RouteConfig, UpstreamTimeouts
from pibl.http.message import HeaderList, RequestHead

HOST_CACHE_MAX = 4096  # host names whose candidate lists are kept (per worker)
ACCESS_CACHE_MAX = 65536  # client addresses whose allow/deny verdict is kept, per route

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class HeaderPlan:
    """Fields to remove (lower-case) and to set, decided once per configuration."""

    remove: frozenset[bytes] = frozenset()
    add: tuple[tuple[bytes, bytes], ...] = ()

    def apply(self, headers: HeaderList) -> HeaderList:
        if not self.remove and not self.add:
            return headers
        drop = self.remove | {name.lower() for name, _ in self.add}
        out = [(k, v) for k, v in headers if k.lower() not in drop]
        out.extend(self.add)
        return out


NO_EDITS = HeaderPlan()


@dataclass(slots=True)
class Route:
    """A compiled [[routes]] entry."""

    index: int
    name: str
    hosts: tuple[str, ...] = ()  # exact, lower-case; "*.example.com" for wildcards
    prefix: bytes | None = None
    regex: re.Pattern[bytes] | None = None
    methods: frozenset[bytes] | None = None
    headers: tuple[bytes, ...] = ()  # lower-case names that must be present
    pool: str | None = None
    redirect: tuple[int, bytes] | None = None  # (status, target with $path)
    respond: tuple[int, bytes, bytes] | None = None  # (status, body, content type)
    cache: bool | None = None
    cache_ttl: float | None = None
    compression: bool | None = None
    timeouts: UpstreamTimeouts | None = None
    max_body_bytes: int | None = None
    request_edits: HeaderPlan = NO_EDITS
    response_edits: HeaderPlan = NO_EDITS
    rewrite: tuple[bytes, bytes] | None = None  # (prefix, replacement)
    allow: tuple[Network, ...] | None = None
    deny: tuple[Network, ...] = ()
    limit: LimitConfig | None = None
    mirror: tuple[str, float] | None = None  # (pool, share)
    plain: bool = False  # see is_plain()
    _access: OrderedDict[str, bool] = field(default_factory=OrderedDict)

    def __repr__(self) -> str:
        target = self.pool or ("redirect" if self.redirect else "respond")
        return f"<Route {self.index} {self.name} -> {target}>"

    def is_plain(self) -> bool:
        """Only a pool to go to: nothing the fast path would have to apply (computed once,
        into ``plain``)."""
        return (
            self.pool is not None
            and self.allow is None
            and not self.deny
            and self.limit is None
            and self.mirror is None
            and self.rewrite is None
            and self.request_edits is NO_EDITS
            and self.response_edits is NO_EDITS
            and self.timeouts is None
            and self.max_body_bytes is None
            and self.compression is not False
        )

    # -- matching --------------------------------------------------------------------

    def matches(self, path: bytes, method: bytes, headers: HeaderList) -> bool:
        """The conditions besides the host (checked by the router's table)."""
        if self.prefix is not None and not path.startswith(self.prefix):
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if self.regex is not None and self.regex.search(path) is None:
            return False
        if self.headers:
            present = {k.lower() for k, _ in headers}
            if any(name not in present for name in self.headers):
                return False
        return True

    def host_matches(self, host: str) -> bool:
        if not self.hosts:
            return True
        for pattern in self.hosts:
            if pattern.startswith("*."):
                if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                    return True
            elif host == pattern:
                return True
        return False

    # -- policies --------------------------------------------------------------------

    def allowed(self, client_ip: str) -> bool:
        """Whether a client address may use this route (deny first, then allow)."""
        if self.allow is None and not self.deny:
            return True
        cache = self._access
        verdict = cache.get(client_ip)
        if verdict is None:
            verdict = self._decide(client_ip)
            cache[client_ip] = verdict
            if len(cache) > ACCESS_CACHE_MAX:
                cache.popitem(last=False)
        return verdict

    def _decide(self, client_ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(client_ip.partition("%")[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if any(addr in net for net in self.deny):
            return False
        return self.allow is None or any(addr in net for net in self.allow)

    def rewrite_target(self, target: bytes) -> bytes:
        """The request target sent to the backend (prefix stripped or replaced)."""
        if self.rewrite is None:
            return target
        prefix, replacement = self.rewrite
        path, mark, query = target.partition(b"?")
        path = normalize_path(path)  # as it was matched
        if not path.startswith(prefix):
            return target
        rest = path[len(prefix) :] + mark + query
        if rest.startswith(b"/") and replacement.endswith(b"/"):
            rest = rest[1:]
        out = replacement + rest
        if not out.startswith(b"/"):
            out = b"/" + out
        return out

    def upstream_head(self, head: RequestHead) -> RequestHead:
        """The request as the pool's backend gets it: target rewritten, fields edited
        (a Host set by the route is the one the backend gets)."""
        if self.rewrite is None and self.request_edits is NO_EDITS:
            return head
        headers = self.request_edits.apply(head.headers)
        host = next((v for k, v in self.request_edits.add if k.lower() == b"host"), head.host)
        return dataclasses.replace(
            head,
            target=self.rewrite_target(head.target),
            headers=headers,
            host=host,
            names=None,  # (those of the fields as received)
        )

    def redirect_location(self, target: bytes) -> bytes:
        assert self.redirect is not None
        return self.redirect[1].replace(b"$path", target)


class TrustedProxies:
    """Which peers may tell PIBL the client's address, and the address they tell."""

    def __init__(self, networks: Sequence[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        self._cache: OrderedDict[str, bool] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusted(self, address: str) -> bool:
        verdict = self._cache.get(address)
        if verdict is None:
            try:
                addr = ipaddress.ip_address(address.strip().partition("%")[0])
            except ValueError:
                verdict = False
            else:
                if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                    addr = addr.ipv4_mapped
                verdict = any(addr in net for net in self.networks)
            self._cache[address] = verdict
            if len(self._cache) > ACCESS_CACHE_MAX:
                self._cache.popitem(last=False)
        return verdict

    def client(self, peer: str, headers: HeaderList) -> str:
        """The client's address: the peer's, or, from a trusted peer, the rightmost
        X-Forwarded-For address that is not itself a trusted proxy (nginx's realip with
        ``real_ip_recursive on``)."""
        if not self.networks or not self.trusted(peer):
            return peer
        chain = [
            part.strip()
            for name, value in headers
            if name.lower() == b"x-forwarded-for"
            for part in value.decode("latin-1").split(",")
        ]
        for address in reversed(chain):
            if not self.trusted(address):
                return address if _is_address(address) else peer
        return chain[0] if chain and _is_address(chain[0]) else peer


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return False
    return True


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = b"0123456789abcdefABCDEF"


def normalize_path(target: bytes) -> bytes:
    """The path of a request target as routes compare it (RFC 3986 sections 6.2.2-6.2.3).

    The query is dropped; ``%XX`` of an unreserved character is decoded (a reserved one,
    ``%2F`` say, stays encoded: it is data, not a separator); ``.`` and ``..`` segments
    are removed; runs of slashes are merged.
    """
    path = target.partition(b"?")[0]
    if b"%" in path:
        out = bytearray()
        i = 0
        while i < len(path):
            c = path[i]
            if c == 0x25 and i + 2 < len(path) and path[i + 1] in _HEX and path[i + 2] in _HEX:
                value = int(path[i + 1 : i + 3], 16)
                if value in _UNRESERVED:
                    out.append(value)
                else:
                    out += path[i : i + 3].upper()
                i += 3
                continue
            out.append(c)
            i += 1
        path = bytes(out)
    if b"//" not in path and b"/." not in path:
        return path or b"/"
    segments: list[bytes] = []
    for segment in path.split(b"/"):
        if segment in (b"", b"."):
            continue
        if segment == b"..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    trailing = path.endswith((b"/", b"/.", b"/..")) and bool(segments)
    return b"/" + b"/".join(segments) + (b"/" if trailing else b"")


def normalize_host(host: bytes) -> str:
    """Host header -> lower-case name without port or trailing dot."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        end = text.find("]")
        return text[: end + 1] if end > 0 else text
    name, _, _ = text.partition(":")
    return name.rstrip(".")


def _compile(index: int, cfg: RouteConfig) -> Route:
    hosts = (cfg.host,) if isinstance(cfg.host, str) else (cfg.host or ())
    route = Route(index=index, name=cfg.name or f"route{index}")
    route.hosts = tuple(h.lower().rstrip(".") for h in hosts)
    route.prefix = cfg.path_prefix.encode() if cfg.path_prefix is not None else None
    route.regex = re.compile(cfg.path_regex.encode()) if cfg.path_regex is not None else None
    route.methods = frozenset(m.encode() for m in cfg.methods) if cfg.methods else None
    route.headers = tuple(h.lower().encode() for h in cfg.headers or ())
    route.pool = cfg.pool
    if cfg.redirect is not None:
        route.redirect = (cfg.redirect.status, cfg.redirect.to.encode())
    if cfg.respond is not None:
        r = cfg.respond
        route.respond = (r.status, r.body.encode(), r.content_type.encode())
    route.cache = cfg.cache
    route.cache_ttl = cfg.cache_ttl
    route.compression = cfg.compression
    route.timeouts = cfg.timeouts
    route.max_body_bytes = cfg.max_body_bytes
    for attr, edits in (
        ("request_edits", cfg.request_headers),
        ("response_edits", cfg.response_headers),
    ):
        if edits is not None:
            setattr(
                route,
                attr,
                HeaderPlan(
                    remove=frozenset(n.lower().encode() for n in edits.remove),
                    add=tuple((k.encode(), v.encode()) for k, v in edits.add.items()),
                ),
            )
    if cfg.path_prefix is not None and (cfg.strip_prefix or cfg.replace_prefix is not None):
        prefix = cfg.path_prefix.encode()
        replacement = (cfg.replace_prefix or "/").encode()
        if prefix.endswith(b"/") and not replacement.endswith(b"/"):
            replacement += b"/"
        route.rewrite = (prefix, replacement)
    if cfg.allow is not None:
        route.allow = tuple(ipaddress.ip_network(n, strict=False) for n in cfg.allow)
    route.deny = tuple(ipaddress.ip_network(n, strict=False) for n in cfg.deny)
    route.limit = cfg.limit
    if cfg.mirror is not None:
        route.mirror = (cfg.mirror.pool, cfg.mirror.share)
    route.plain = route.is_plain()
    return route


def compile_routes(config: Config) -> list[Route]:
    """The routes of a configuration, with the implicit catch-all when it has none."""
    if config.routes:
        return [_compile(i, r) for i, r in enumerate(config.routes)]
    pool = DEFAULT_POOL if config.backends else next(iter(config.pools))
    return [Route(index=0, name="default", pool=pool, plain=True)]


class Router:
    """First-match routing with a per-host table of candidate routes."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = list(routes)
        self._by_host: OrderedDict[str, tuple[Route, ...]] = OrderedDict()
        # the usual single catch-all route needs no table at all
        only = self.routes[0] if len(self.routes) == 1 else None
        self._only = only if only is not None and not only.hosts else None

    def __repr__(self) -> str:
        return f"<Router {len(self.routes)} routes>"

    def candidates(self, host: str) -> tuple[Route, ...]:
        found = self._by_host.get(host)
        if found is None:
            found = tuple(r for r in self.routes if r.host_matches(host))
            self._by_host[host] = found
            if len(self._by_host) > HOST_CACHE_MAX:
                self._by_host.popitem(last=False)
        return found

    def match(self, host: bytes, target: bytes, method: bytes, headers: HeaderList) -> Route | None:
        """The first route this request matches; None when none does (a 404).

        Paths are compared as the backend will understand them (``normalize_path``: no
        query, percent-encoded unreserved characters decoded, dot segments removed, slashes
        merged), as nginx matches ``$uri``: ``/%61dmin``, ``//admin`` and ``/x/../admin``
        are ``/admin`` for an ``allow`` rule too.
        """
        only = self._only
        if only is not None and only.prefix is None and only.regex is None:
            return only if only.matches(b"/", method, headers) else None
        path = normalize_path(target)
        if only is not None:
            return only if only.matches(path, method, headers) else None
        for route in self.candidates(normalize_host(host)):
            if route.matches(path, method, headers):
                return route
        return None


def route_warnings(config: Config) -> list[str]:
    """What deserves a warning at start and in check-config: routes that can never match
    (a broader route before them), and optional packages a setting needs but lacks."""
    out: list[str] = []
    compression = config.compression
    chosen = "encodings" in compression.model_fields_set  # (the default list is a wish list)
    if chosen and "zstd" in compression.encodings and compression.enabled:
        from pibl.compress import available_encodings

        if "zstd" not in available_encodings():
            out.append(
                "compression.encodings lists zstd, but the zstandard package is not installed"
                ' (pip install "pibl[zstd]"): zstd is not offered'
            )
    routes = compile_routes(config)
    for later in routes:
        for earlier in routes[: later.index]:
            if _covers(earlier, later):
                out.append(
                    f"routes[{later.index}] ({later.name}) is never reached: "
                    f"routes[{earlier.index}] ({earlier.name}) matches everything it does"
                )
                break
    return out


def _covers(a: Route, b: Route) -> bool:
    """Whether every request ``b`` matches is matched by ``a`` (conservatively)."""
    if a.regex is not None or a.headers:
        return False
    if a.hosts and not (b.hosts and all(_host_covered(a, h) for h in b.hosts)):
        return False
    if a.prefix is not None and (b.prefix is None or not b.prefix.startswith(a.prefix)):
        return False
    return a.methods is None or (b.methods is not None and b.methods <= a.methods)


def _host_covered(a: Route, pattern: str) -> bool:
    """Whether every host ``pattern`` (exact or ``*.domain``) matches is one ``a`` takes."""
    if not pattern.startswith("*."):
        return a.host_matches(pattern)
    return any(p.startswith("*.") and pattern.endswith(p[1:]) for p in a.hosts)
