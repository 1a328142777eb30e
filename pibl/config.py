"""Typed, frozen configuration: TOML file -> validated ``Config``.

The schema is declared once with pydantic models (``extra="forbid"`` makes a typo an error
instead of a silently ignored key). ``load_config`` reads the file, applies command-line
overrides and turns every validation problem into a ``ConfigError`` whose message names the
file, the key path (``backends[1].url``) and the problem, so ``pibl check-config`` and
``pibl run`` can print it and exit 2.

The resulting objects are immutable and passed down explicitly; nothing in PIBL reads
configuration from a global.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pibl import DEFAULT_CONFIG_FILE as DEFAULT_CONFIG_FILE
from pibl.errors import ConfigError

DEFAULT_POOL = "default"  # the pool of the top-level [[backends]]

PositiveFloat = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=1, le=65535)
    # Name used in the Via header (RFC 9110 section 7.6.3).
    via: str = "pibl"
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256)
    # "auto": use uvloop for the workers' event loops when it is installed
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    # listen backlog of every listener (HTTP, HTTPS, admin); unset: the system's somaxconn,
    # as newer nginx versions use (a short queue drops connection bursts into SYN retries)
    backlog: int | None = Field(default=None, ge=1, le=65535)
    # proxies in front of PIBL (CIDR): from them the client address is taken from
    # X-Forwarded-For (the rightmost address not itself trusted), or from a PROXY protocol
    # v1 header with proxy_protocol = true (plain HTTP listener), for access rules, rate
    # limits, logs and the X-Forwarded-For sent on
    trusted_proxies: tuple[str, ...] = ()
    proxy_protocol: bool = False
    # HTTP/2 with prior knowledge (h2c) on the plain listener: a connection that starts
    # with the HTTP/2 preface speaks HTTP/2 ([http2] sets its limits)
    h2c: bool = False

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        import ipaddress

        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not an address or network (CIDR)") from None
        return value

    @property
    def listen_backlog(self) -> int:
        return self.backlog if self.backlog is not None else system_somaxconn()


def system_somaxconn() -> int:
    """The kernel's cap on listen backlogs (``net.core.somaxconn``)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return max(1, int(f.read().strip()))
    except (OSError, ValueError):
        return socket.SOMAXCONN


class TimeoutsConfig(_Section):
    """Seconds. Defaults follow nginx where it has an equivalent."""

    client_header: PositiveFloat = 10.0  # nginx client_header_timeout is 60 s; slowloris wants less
    client_body: PositiveFloat = 60.0  # nginx client_body_timeout: between two body reads
    client_idle: PositiveFloat = 75.0  # nginx keepalive_timeout
    upstream_connect: PositiveFloat = 5.0  # nginx proxy_connect_timeout is 60 s
    upstream_response: PositiveFloat = 60.0  # nginx proxy_read_timeout: between two reads
    upstream_idle: PositiveFloat = 60.0  # how long an idle pooled connection is kept
    shutdown: PositiveFloat = 30.0  # graceful stop deadline for in-flight requests


class LimitsConfig(_Section):
    max_head_bytes: int = Field(default=32 * 1024, ge=1024)  # nginx: 4 x 8 KiB buffers
    max_headers: int = Field(default=100, ge=8)  # Go, Node and h2o use about 100
    max_target_bytes: int = Field(default=8 * 1024, ge=256)  # nginx: 8 KiB request line
    max_body_bytes: int = Field(default=1024**3, ge=0)  # 0 means unlimited
    max_pipelined: int = Field(default=16, ge=1)  # queued requests before reading pauses
    # bodies up to this size are read whole before a backend is chosen (nginx's
    # proxy_request_buffering); larger ones stream; 0 streams every body
    request_buffer: int = Field(default=64 * 1024, ge=0)


class UpstreamConfig(_Section):
    pool_idle_max: int = Field(default=32, ge=0)  # idle keep-alive connections per backend
    retry_reused: bool = True  # retry once when a reused idle connection was closed under us
    # serve the common exchange (an idle pooled connection at hand, nothing to stream in or
    # compress) in protocol callbacks; false sends every request through the coroutine path
    fast_path: bool = True


class BackendConfig(_Section):
    url: str
    name: str | None = None
    weight: int = Field(default=1, ge=1, le=1000)
    # per-backend overrides of [health]
    health_check: bool | None = None
    health_path: str | None = None
    # https:// backends (re-encryption): verified against the system store or ca_file
    ca_file: str | None = None
    tls_verify: bool = True
    client_cert: str | None = None  # mutual TLS towards the backend
    client_key: str | None = None
    # service discovery: a host name resolving to several addresses becomes several backends
    discover: bool = False
    server_name: str | None = None  # TLS SNI/verification name (set for discovered addresses)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https"):
            raise ValueError("must start with http:// or https://")
        if not parts.hostname:
            raise ValueError("has no host")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"has an invalid port ({exc})") from None
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("must not have a path, query or fragment")
        return value

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def host(self) -> str:
        host = urlsplit(self.url).hostname
        assert host is not None
        return host

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        return port if port is not None else (443 if self.scheme == "https" else 80)

    @property
    def label(self) -> str:
        return self.name or f"{self.host}:{self.port}"


def parse_size(value: object) -> int:
    """Bytes from an int or a string with a unit: "512M", "1 GiB", "64k"."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if not isinstance(value, str):
        raise ValueError('must be a number of bytes or a size such as "512M"')
    text = value.strip().upper().removesuffix("B").removesuffix("I").strip()
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    factor = 1
    if text and text[-1] in units:
        factor = units[text[-1]]
        text = text[:-1].strip()
    if not text.isdigit():
        raise ValueError(f"invalid size {value!r} (use bytes or a unit: K, M, G)")
    return int(text) * factor


class CacheConfig(_Section):
    enabled: bool = True
    dir: str = "cache"  # relative to the directory PIBL runs in
    ttl: float = Field(default=60.0, ge=0)  # default lifetime; 0 = strict RFC 9111
    store: Literal["disk", "redis"] = "disk"  # redis: local disk tier + shared Redis tier
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "pibl:"
    redis_timeout: PositiveFloat = 0.5
    max_size: int = 1024**3
    max_entry_size: int = 256 * 1024**2  # larger responses are passed through, not stored
    memory_max: int = 32 * 1024**2  # memory tier for hot entries
    # a body read to be served (below the 1 MiB sent with sendfile) is kept in memory up to this
    memory_entry_max: int = 1024**2
    fsync: bool = True  # fsync entries before making them visible
    max_stale_on_error: float = Field(default=3600.0, ge=0)  # serve stale when backends fail
    lock_timeout: float = Field(default=5.0, gt=0)  # how long concurrent misses wait (coalescing)
    # RFC 9213 targeted fields, obeyed over Cache-Control and Expires (and passed on
    # untouched): PIBL's own first ("" for none), then CDN-Cache-Control when enabled
    targeted_field: str = "PIBL-Cache-Control"
    cdn_cache_control: bool = True

    @field_validator("targeted_field")
    @classmethod
    def _targeted(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", value):
            raise ValueError("must be a header field name such as PIBL-Cache-Control")
        return value

    @functools.cached_property
    def targeted_fields(self) -> tuple[bytes, ...]:
        own = (self.targeted_field.lower().encode(),) if self.targeted_field else ()
        return own + ((b"cdn-cache-control",) if self.cdn_cache_control else ())

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("has no host")
        return value

    @field_validator("max_size", "max_entry_size", "memory_max", "memory_entry_max", mode="before")
    @classmethod
    def _sizes(cls, value: object) -> int:
        return parse_size(value)


class HealthConfig(_Section):
    """Active checks (HAProxy style) and passive checks (nginx max_fails style)."""

    enabled: bool = True
    # None: the probe is a TCP connect (plus the TLS handshake for https backends), as
    # HAProxy's plain `check`; a path makes it `GET <path>` expecting status_min..status_max
    path: str | None = None
    interval: PositiveFloat = 2.0
    timeout: PositiveFloat = 1.0
    status_min: int = Field(default=200, ge=100, le=599)
    status_max: int = Field(default=399, ge=100, le=599)
    rise: int = Field(default=2, ge=1)
    fall: int = Field(default=2, ge=1)
    max_fails: int = Field(default=3, ge=1)  # passive: failures within `window` eject it
    window: PositiveFloat = 10.0
    cooldown: PositiveFloat = 10.0  # how long an ejected backend rests
    # probe interval while a backend is down, ejected or changing state (HAProxy's
    # downinter/fastinter): a restarted backend is back within rise x down_interval
    down_interval: PositiveFloat = 0.5
    # below this share of backends available, passive ejections are ignored (Envoy's panic
    # threshold): one bad URL can never take the whole service out; 0 disables it
    panic_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    fail_statuses: tuple[int, ...] = ()  # backend statuses counted as failures, e.g. [502, 503]

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith("/") or any(c.isspace() for c in value):
            raise ValueError("must be an origin-form path such as /health")
        return value


class BalanceConfig(_Section):
    policy: Literal["round_robin", "least_conn"] = "round_robin"
    sticky: bool = False  # pin a client to a backend with a cookie
    sticky_cookie: str = Field(default="pibl_backend", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    slow_start: float = Field(default=0.0, ge=0)  # seconds to ramp a recovered backend up


class RetriesConfig(_Section):
    tries: int = Field(default=3, ge=1, le=20)  # attempts per request, the first included
    budget: PositiveFloat = 10.0  # seconds after which no new attempt starts


class CompressionConfig(_Section):
    enabled: bool = True
    encodings: tuple[Literal["br", "zstd", "gzip"], ...] = ("br", "zstd", "gzip")
    min_size: int = Field(default=1024, ge=0)
    types: tuple[str, ...] | None = None  # None: text, JSON, XML, JavaScript, SVG, ...
    gzip_level: int = Field(default=6, ge=1, le=9)
    brotli_quality: int = Field(default=4, ge=0, le=11)
    zstd_level: int = Field(default=3, ge=1, le=19)


class CertificateConfig(_Section):
    cert: str
    key: str
    names: tuple[str, ...] = ()  # SNI names served by this pair


class TLSConfig(_Section):
    """HTTPS listener. Absent section or ``enabled = false``: plain HTTP only."""

    enabled: bool = True
    port: int = Field(default=8443, ge=1, le=65535)
    cert: str  # certificate chain (PEM), the default certificate
    key: str
    certificates: tuple[CertificateConfig, ...] = ()  # more pairs, chosen by SNI
    redirect_http: bool = False  # answer plain HTTP with 308 to https://
    hsts: int = Field(default=0, ge=0)  # Strict-Transport-Security max-age; 0 = not sent
    # protocols offered in the TLS handshake (ALPN), in order of preference; without "h2"
    # HTTPS clients speak HTTP/1.1 only
    alpn: tuple[Literal["h2", "http/1.1"], ...] = ("h2", "http/1.1")

    @field_validator("alpn")
    @classmethod
    def _alpn(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError('list "h2" and/or "http/1.1", each once')
        return value


class Http2Config(_Section):
    """HTTP/2 to clients (TLS with ALPN h2, h2c with ``[server] h2c``): limits per connection.

    Memory per connection is bounded by about max_concurrent_streams x (stream_window +
    stream_buffer) plus one header block being received: at most 4 x max_header_list_size
    (beyond, GOAWAY), the decoded lists of the streams open.
    """

    max_concurrent_streams: int = Field(default=128, ge=1, le=10000)
    # request body bytes a client may send on one stream before PIBL reads them (the
    # stream's flow-control window), and on the whole connection
    stream_window: int = Field(default=256 * 1024, ge=65535, le=2**31 - 1)
    connection_window: int = Field(default=1024 * 1024, ge=65535, le=2**31 - 1)
    # response bytes buffered per stream beyond the client's window before PIBL stops
    # reading that stream's backend
    stream_buffer: int = Field(default=256 * 1024, ge=16 * 1024)
    max_frame_size: int = Field(default=16384, ge=16384, le=16777215)
    max_header_list_size: int = Field(default=32 * 1024, ge=1024)  # decoded, per request
    header_table_size: int = Field(default=4096, ge=0, le=65536)  # HPACK dynamic table
    # streams a client may cancel (RST_STREAM) per reset_interval seconds; beyond it the
    # connection ends with GOAWAY ENHANCE_YOUR_CALM (rapid reset, CVE-2023-44487)
    max_resets: int = Field(default=200, ge=1)
    reset_interval: PositiveFloat = 10.0
    # an HTTP/2 connection without open streams is closed (GOAWAY) after idle_timeout
    # seconds; a silent one with open streams gets a PING every ping_interval seconds and
    # is closed when the answer takes longer than ping_timeout
    idle_timeout: PositiveFloat = 75.0
    ping_interval: PositiveFloat = 30.0
    ping_timeout: PositiveFloat = 10.0


class DiscoveryConfig(_Section):
    """Re-resolution of ``discover = true`` backends (Kubernetes headless services, Consul)."""

    interval: PositiveFloat = 10.0
    timeout: PositiveFloat = 2.0
    nameservers: tuple[str, ...] = ()  # "10.0.0.2", "127.0.0.1:8600"; empty: the system's

    @field_validator("nameservers")
    @classmethod
    def _nameservers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from pibl.discovery import parse_nameserver

        for item in value:
            parse_nameserver(item)
        return value


# Response fields that differ between identical replicas (per-response times, ids,
# connection management, file-system validators): never compared, even with headers = ["*"].
VOLATILE_FIELDS = (
    "Date",
    "Age",
    "Expires",
    "Last-Modified",
    "ETag",
    "Set-Cookie",
    "X-Request-ID",
    "Server",
    "Via",
    "Connection",
    "Keep-Alive",
    "Transfer-Encoding",
    "Content-Length",
)
_FIELD_NAME = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"


class ConsistencyConfig(_Section):
    """Shadow comparison of the replicas (see pibl/balance/consistency.py).

    On when ``sample`` > 0 or ``version_path`` is set; off (the default), the request path
    pays one check.
    """

    sample: float = Field(default=0.0, ge=0.0, le=1.0)  # share of eligible requests shadowed
    on_divergence: Literal["report", "eject"] = "report"
    methods: tuple[Literal["GET", "HEAD", "OPTIONS"], ...] = ("GET", "HEAD")
    credentials: bool = False  # also shadow requests with Authorization or Cookie
    headers: tuple[str, ...] = ("Content-Type",)  # response fields compared; "*" = all
    ignore_headers: tuple[str, ...] = VOLATILE_FIELDS  # never compared
    skip_paths: tuple[str, ...] = ()  # path prefixes never shadowed
    # applied to text bodies (text/*, JSON, XML, JavaScript without Content-Encoding) before
    # hashing: every match is removed (timestamps, CSRF tokens)
    ignore_body: str | None = None
    max_body: int = 1024 * 1024  # larger responses are not compared
    max_concurrent: int = Field(default=4, ge=1, le=1024)  # shadow requests at once, per worker
    rate: PositiveFloat = 20.0  # shadow requests per second, for the node
    window: PositiveFloat = 300.0  # seconds an answer counts in the per-URL majority vote
    timeout: PositiveFloat = 5.0  # for one shadow, replayed or version request
    version_path: str | None = None  # read from every replica at each [health] interval
    # before a returning backend (health checks pass again, added by a reload) is put back
    # in rotation, replay recent requests against it; unset: on when the feature is on
    verify_return: bool | None = None
    replay: int = Field(default=8, ge=1, le=64)  # recent requests replayed to verify
    recheck: PositiveFloat = 10.0  # seconds between verifications of a backend held out

    @field_validator("headers", "ignore_headers")
    @classmethod
    def _fields(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        for name in value:
            if name == "*" and info.field_name == "headers":
                continue
            if not re.fullmatch(_FIELD_NAME, name):
                raise ValueError(f"{name!r} is not a header field name")
        return value

    @field_validator("skip_paths")
    @classmethod
    def _paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            if not path.startswith("/"):
                raise ValueError(f"{path!r} must start with /")
        return value

    @field_validator("version_path")
    @classmethod
    def _version_path(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or any(c.isspace() for c in value)):
            raise ValueError("must be an origin-form path such as /version")
        return value

    @field_validator("ignore_body")
    @classmethod
    def _ignore_body(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value.encode())
            except re.error as exc:
                raise ValueError(f"is not a valid regular expression ({exc})") from None
        return value

    @field_validator("max_body", mode="before")
    @classmethod
    def _size(cls, value: object) -> int:
        return parse_size(value)

    @property
    def enabled(self) -> bool:
        return self.sample > 0 or self.version_path is not None

    @property
    def verifies_return(self) -> bool:
        return self.enabled if self.verify_return is None else self.verify_return


class AdminConfig(_Section):
    """The admin listener: /metrics, /api/status, the dashboard, and token-guarded actions."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9090, ge=1, le=65535)
    token: str | None = None  # bearer token required for actions; without one they are refused


class LogConfig(_Section):
    file: str | None = "pibl.log"  # empty string or null disables the file
    stdout: bool = True
    format: Literal["combined", "json"] = "combined"
    verbose: bool = False


class UpstreamTimeouts(_Section):
    """Per pool or route: the upstream timeouts of [timeouts] (unset: the file's)."""

    upstream_connect: PositiveFloat | None = None
    upstream_response: PositiveFloat | None = None


class PoolConfig(_Section):
    """A named group of backends with its own policies; unset sections inherit the file's."""

    backends: tuple[BackendConfig, ...] = Field(min_length=1)
    balance: BalanceConfig | None = None
    health: HealthConfig | None = None
    retries: RetriesConfig | None = None
    upstream: UpstreamConfig | None = None
    timeouts: UpstreamTimeouts | None = None
    # HAProxy's maxconn/maxqueue: at most this many requests in flight per backend (0 =
    # unlimited), then up to `maxqueue` wait (for `queue_timeout` s) and the rest get 503
    maxconn: int = Field(default=0, ge=0)
    maxqueue: int = Field(default=0, ge=0)
    queue_timeout: PositiveFloat = 5.0


# Fields a route may not edit: message framing and connection management (hop-by-hop),
# and what PIBL sets itself on every request and response.
PIBL_OWNED_FIELDS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "via",
    }
)


class HeaderEdits(_Section):
    add: dict[str, str] = {}  # set (replacing any field of that name)
    remove: tuple[str, ...] = ()

    @field_validator("add", "remove")
    @classmethod
    def _names(cls, value: Any) -> Any:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
                raise ValueError(f"{name!r} is not a header field name")
            if name.lower() in PIBL_OWNED_FIELDS:
                raise ValueError(f"{name} is set by PIBL itself (framing, forwarding, ids)")
        if isinstance(value, dict):
            for name, v in value.items():
                if any(c in v for c in "\r\n\0"):
                    raise ValueError(f"the value of {name} has a line break or NUL")
        return value


class RedirectConfig(_Section):
    to: str  # a URL or a path; "$path" stands for the request's path and query
    status: Literal[301, 302, 303, 307, 308] = 302


class RespondConfig(_Section):
    status: int = Field(default=200, ge=200, le=599)
    body: str = ""
    content_type: str = "text/plain; charset=utf-8"


class LimitConfig(_Section):
    """nginx's limit_req: a leaky bucket of `rate` requests/s with room for `burst`."""

    rate: float = Field(gt=0)
    burst: int = Field(default=0, ge=0)
    key: str = "client"  # "client" (address), "route" (one bucket), or "header:NAME"
    delay: bool = False  # within the burst, delay to the rate instead of answering at once
    shared: Literal["node", "fleet"] = "node"  # fleet: through the Redis cache tier

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if value in ("client", "route"):
            return value
        kind, _, name = value.partition(":")
        if kind != "header" or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
            raise ValueError('must be "client", "route" or "header:NAME"')
        return value


class MirrorConfig(_Section):
    pool: str
    share: float = Field(default=1.0, gt=0, le=1.0)  # of the route's requests


class RouteConfig(_Section):
    """One [[routes]] entry: matched in order, the first match wins."""

    name: str | None = None
    host: str | tuple[str, ...] | None = None  # exact or "*.example.com"
    path_prefix: str | None = None
    path_regex: str | None = None
    methods: tuple[str, ...] | None = None
    headers: tuple[str, ...] | None = None  # fields that must be present
    # what to do: one of pool, redirect, respond
    pool: str | None = None
    redirect: RedirectConfig | None = None
    respond: RespondConfig | None = None
    # per-route policies
    cache: bool | None = None
    cache_ttl: float | None = Field(default=None, ge=0)
    compression: bool | None = None
    timeouts: UpstreamTimeouts | None = None
    max_body_bytes: int | None = Field(default=None, ge=0)
    request_headers: HeaderEdits | None = None
    response_headers: HeaderEdits | None = None
    strip_prefix: bool = False  # remove path_prefix before forwarding
    replace_prefix: str | None = None  # or replace it with this
    allow: tuple[str, ...] | None = None  # client networks (CIDR); others get 403
    deny: tuple[str, ...] = ()
    limit: LimitConfig | None = None
    mirror: MirrorConfig | None = None

    @field_validator("path_prefix", "replace_prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must start with /")
        return value

    @field_validator("path_regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"is not a valid regular expression ({exc})") from None
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        for host in (value,) if isinstance(value, str) else value or ():
            bare = host.removeprefix("*.")
            if not bare or "*" in bare or not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+", bare):
                raise ValueError(f"{host!r} is not a host name or *.domain")
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            for m in value:
                if not re.fullmatch(r"[A-Z]+", m):
                    raise ValueError(f"{m!r} is not an upper-case method name")
        return value

    @field_validator("allow", "deny")
    @classmethod
    def _networks(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        import ipaddress

        for net in value or ():
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not an address or network (CIDR)") from None
        return value

    @model_validator(mode="after")
    def _one_action(self) -> RouteConfig:
        actions = [a for a in ("pool", "redirect", "respond") if getattr(self, a) is not None]
        if len(actions) > 1:
            raise ValueError(f"has both {actions[0]} and {actions[1]}: choose one")
        if (self.strip_prefix or self.replace_prefix) and self.path_prefix is None:
            raise ValueError("strip_prefix and replace_prefix need a path_prefix")
        return self


class Config(_Section):
    server: ServerConfig = ServerConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    limits: LimitsConfig = LimitsConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    log: LogConfig = LogConfig()
    cache: CacheConfig = CacheConfig()
    health: HealthConfig = HealthConfig()
    balance: BalanceConfig = BalanceConfig()
    retries: RetriesConfig = RetriesConfig()
    compression: CompressionConfig = CompressionConfig()
    tls: TLSConfig | None = None
    http2: Http2Config = Http2Config()
    admin: AdminConfig | None = None
    discovery: DiscoveryConfig = DiscoveryConfig()
    consistency: ConsistencyConfig = ConsistencyConfig()
    pools: dict[str, PoolConfig] = {}
    # the default pool; with [pools.NAME] and [[routes]] it may be left out
    backends: tuple[BackendConfig, ...] = Field(default=(), validate_default=True)
    routes: tuple[RouteConfig, ...] = ()

    @field_validator("backends")
    @classmethod
    def _some_backends(
        cls, value: tuple[BackendConfig, ...], info: ValidationInfo
    ) -> tuple[BackendConfig, ...]:
        if not value and not info.data.get("pools"):
            raise ValueError("required: at least one backend ([[backends]] or [pools.NAME])")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        seen: set[str] = set()
        for backend in self.all_backends:
            if backend.label in seen:
                raise ValueError(f"backend name {backend.label!r} is used twice")
            seen.add(backend.label)
        if DEFAULT_POOL in self.pools:
            raise ValueError(f"pool name {DEFAULT_POOL!r} is the top-level [[backends]]")
        for name in self.pools:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
                raise ValueError(f"pool name {name!r}: letters, digits, _ . - only")
        names = set(self.pools) | ({DEFAULT_POOL} if self.backends else set())
        for i, route in enumerate(self.routes):
            for pool in (route.pool, route.mirror.pool if route.mirror else None):
                if pool is not None and pool not in names:
                    raise ValueError(f"routes[{i}]: no pool named {pool!r}")
        fleet = [i for i, r in enumerate(self.routes) if r.limit and r.limit.shared == "fleet"]
        if fleet and not (self.cache.enabled and self.cache.store == "redis"):
            raise ValueError(
                f'routes[{fleet[0]}].limit.shared: "fleet" needs the Redis tier '
                '([cache] store = "redis")'
            )
        for pool_name, pool_config in self.pools.items():
            if any(b.discover for b in pool_config.backends):
                raise ValueError(
                    f"pools.{pool_name}: discover = true works for the top-level [[backends]] only"
                )
        for i, route in enumerate(self.routes):
            if not self.backends and not (route.pool or route.redirect or route.respond):
                raise ValueError(
                    f"routes[{i}]: needs pool, redirect or respond (there is no default pool)"
                )
        if not self.backends and self.pools and not self.routes and len(self.pools) > 1:
            raise ValueError("several [pools] and no [[routes]]: add routes that name them")
        return self

    @property
    def all_backends(self) -> tuple[BackendConfig, ...]:
        """Every backend of every pool, the default pool first."""
        out = self.backends
        for pool in self.pools.values():
            out += pool.backends
        return out


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _describe(exc: ValidationError, source: str) -> str:
    lines = []
    errors = exc.errors()
    for err in errors:
        loc = err["loc"]
        if err["type"] == "too_short" and any(
            len(other["loc"]) > len(loc) and other["loc"][: len(loc)] == loc for other in errors
        ):
            continue  # "at least 1 item" only because the items themselves were invalid
        path = _key_path(loc)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"{source}: {path}: {msg}")
    return "\n".join(lines)


def validate(data: dict[str, Any], source: str) -> Config:
    """Validate a mapping (as read from TOML, overrides applied) into a ``Config``."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Config:
    """Read ``path`` and apply ``overrides`` given as ``{"server.port": 8081}``."""
    return validate(read_config(path, overrides), str(path))


def read_config(
    path: str | os.PathLike[str], overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The file's TOML as a mapping, ``overrides`` applied, not validated yet."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {section}: must be a table")
        table[key] = value
    return data


def resolve_path(path: str, base: Path | None = None) -> Path:
    """Relative paths in the config are relative to the directory PIBL runs in."""
    p = Path(path)
    return p if p.is_absolute() else (base or Path.cwd()) / p
