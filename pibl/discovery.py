"""Backends by DNS: one configured URL, as many backends as its name has addresses.

A backend URL whose host name resolves to several addresses becomes several backends, and
the name is re-resolved periodically, like a Kubernetes headless service or Consul DNS: the
replicas of a service come and go, and the DNS answer follows them. ``discover = true`` on
a ``[[backends]]`` entry asks for this; a URL with an IP literal is never resolved.

The design keeps every moving part where it already is:

* **Expansion is plain data.** ``expand`` turns the configured backends into the effective
  ones: ``http://svc.local:8080`` resolving to 10.0.0.5 and 10.0.0.7 becomes
  ``http://10.0.0.5:8080`` named ``svc.local:8080@10.0.0.5`` and ``http://10.0.0.7:8080``
  named ``svc.local:8080@10.0.0.7``, with the same weight, health-check and TLS settings,
  and the original host name kept as the TLS server name (SNI and certificate check) and
  the default ``Host``. Names are stable from one resolution to the next, so metrics and
  sticky cookies keep following the same address.
* **A change is a reload.** The master owns a ``Watcher``; every ``interval`` seconds it
  resolves the names again. When the set of addresses changed (order does not matter), the
  master starts a new generation of workers with the expanded configuration, exactly as on
  SIGHUP. The old generation finishes its in-flight requests, so an address that
  disappeared is drained, not cut off, and a new one receives traffic once the new workers
  are ready. Workers never resolve anything themselves and all of them see the same set.
* **DNS trouble changes nothing.** A name that fails to resolve keeps its last known
  addresses (a flapping DNS server does not empty the pool or cause a reload). A name that
  never resolved is left out and reported. If nothing at all resolves, the configured
  backends are kept as they are, so PIBL still starts and the health checks show them down.

Resolution is synchronous and uses no thread, because the master forks its workers and
must stay single-threaded: ``SystemResolver`` asks the C library (``/etc/hosts``,
``resolv.conf``, search domains), ``DNSResolver`` asks given name servers directly with
dnspython (A and AAAA, a total time budget, optionally answering from a cache that honours
the records' TTL).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from pibl.config import BackendConfig, Config

DEFAULT_DNS_PORT = 53


class ResolveError(Exception):
    """A host name could not be resolved to at least one address."""


class Resolver(Protocol):
    def resolve(self, host: str) -> list[str]:
        """Addresses of ``host`` (IPv4 and IPv6 strings), sorted and deduplicated.

        Raises ``ResolveError`` when the name does not exist, has no address, or the
        lookup failed or timed out.
        """
        ...


# -- addresses ------------------------------------------------------------------------


def is_ip_literal(host: str) -> bool:
    """True for ``10.0.0.1``, ``::1`` or ``fe80::1%eth0``; False for a host name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def normalize_addresses(addresses: Sequence[str]) -> list[str]:
    """Canonical text form, duplicates removed, IPv4 first, then numeric order.

    Raises ``ValueError`` for a string that is not an IP address.
    """
    parsed = {ipaddress.ip_address(a.strip()) for a in addresses}
    ordered = sorted(parsed, key=lambda ip: (ip.version, int(ip), str(ip)))
    return [str(ip) for ip in ordered]


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"127.0.0.1:5353"`` -> ``("127.0.0.1", 5353)``.

    Accepted forms: ``1.2.3.4``, ``1.2.3.4:53``, ``::1``, ``[::1]``, ``[::1]:53``. The port
    defaults to 53. Raises ``ValueError`` with a readable message otherwise.
    """
    value = text.strip()
    host, port_text = value, ""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(f"invalid name server {text!r}: missing ']'")
        host, rest = value[1:end], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"invalid name server {text!r}")
            port_text = rest[1:]
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"invalid name server {text!r}: must be an IP address with an optional port, "
            'such as "10.0.0.2", "127.0.0.1:5353" or "[::1]:53"'
        ) from None
    port = DEFAULT_DNS_PORT
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"invalid name server {text!r}: bad port {port_text!r}")
        port = int(port_text)
    return str(address), port


# -- resolvers ------------------------------------------------------------------------


class SystemResolver:
    """``socket.getaddrinfo``: ``/etc/hosts``, ``resolv.conf`` and its search domains.

    There is no timeout of its own: the C library's (``options timeout:`` and
    ``attempts:`` in ``resolv.conf``) applies.
    """

    def __init__(self, family: int = socket.AF_UNSPEC) -> None:
        self.family = family

    def resolve(self, host: str) -> list[str]:
        try:
            infos = socket.getaddrinfo(host, None, self.family, socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
            raise ResolveError(f"cannot resolve {host}: {exc}") from None
        addresses = [
            str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)
        ]
        if not addresses:
            raise ResolveError(f"cannot resolve {host}: no address")
        return normalize_addresses(addresses)


class DNSResolver:
    """Asks the given name servers directly (dnspython), for A and AAAA records.

    ``nameservers`` are ``"host[:port]"`` strings (IPv6 in brackets when a port is given);
    an empty sequence means those of ``/etc/resolv.conf``. ``timeout`` is the budget for
    one ``resolve`` call, all record types and servers together. Names are taken as
    absolute: no search domain is appended. With ``respect_ttl`` the answers are cached
    for as long as their TTL allows, so checks more frequent than the TTL cost nothing.
    """

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        timeout: float = 2.0,
        *,
        respect_ttl: bool = False,
        record_types: Sequence[str] = ("A", "AAAA"),
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.timeout = timeout
        self.record_types = tuple(dns.rdatatype.from_text(t) for t in record_types)
        if not self.record_types:
            raise ValueError("at least one record type is needed")
        if nameservers:
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*parse_nameserver(ns)) for ns in nameservers
            ]
        else:
            self._resolver = dns.resolver.Resolver(configure=True)
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout
        self._resolver.cache = dns.resolver.Cache() if respect_ttl else None

    def resolve(self, host: str) -> list[str]:
        deadline = time.monotonic() + self.timeout
        addresses: list[str] = []
        for rdtype in self.record_types:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ResolveError(f"cannot resolve {host}: timed out after {self.timeout} s")
            try:
                answer = self._resolver.resolve(
                    host, rdtype, raise_on_no_answer=False, lifetime=remaining, search=False
                )
            except dns.resolver.NXDOMAIN:
                raise ResolveError(f"cannot resolve {host}: no such name (NXDOMAIN)") from None
            except dns.exception.Timeout:
                raise ResolveError(
                    f"cannot resolve {host}: timed out after {self.timeout} s"
                ) from None
            except dns.exception.DNSException as exc:
                raise ResolveError(f"cannot resolve {host}: {exc}") from None
            except OSError as exc:
                raise ResolveError(f"cannot resolve {host}: {exc}") from None
            if answer.rrset is not None:
                addresses.extend(rdata.to_text() for rdata in answer.rrset)
        if not addresses:
            raise ResolveError(f"cannot resolve {host}: no address records")
        return normalize_addresses(addresses)


def make_resolver(nameservers: Sequence[str] = (), timeout: float = 2.0) -> Resolver:
    """``DNSResolver`` for explicit name servers, else the system's resolver."""
    if nameservers:
        return DNSResolver(nameservers, timeout)
    return SystemResolver()


# -- expansion ------------------------------------------------------------------------


def needs_discovery(backend: BackendConfig) -> bool:
    """Whether ``backend`` asks to be expanded: ``discover = true`` and a host name."""
    return bool(getattr(backend, "discover", False)) and not is_ip_literal(backend.host)


@dataclass(frozen=True)
class Expansion:
    """The effective backends and how they came about.

    ``addresses`` maps every discovered host name that has addresses in use (fresh or
    kept from before) to them, sorted. ``errors`` maps each host name whose resolution
    failed this time to the reason, whether or not earlier addresses were kept for it.
    """

    backends: tuple[BackendConfig, ...]
    addresses: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the log: ``svc.local: 10.0.0.5, 10.0.0.7; db.local: failed (...)``."""
        parts = [f"{host}: {', '.join(addrs)}" for host, addrs in sorted(self.addresses.items())]
        for host, error in sorted(self.errors.items()):
            kept = " (keeping the last known addresses)" if host in self.addresses else ""
            parts.append(f"{host}: {error}{kept}")
        return "; ".join(parts)


def _url_with_address(url: str, address: str) -> str:
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at:
        netloc = f"{userinfo}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _for_address(backend: BackendConfig, address: str) -> BackendConfig:
    update: dict[str, object] = {
        "url": _url_with_address(backend.url, address),
        "name": f"{backend.label}@{address}",
    }
    if "server_name" in type(backend).model_fields:
        update["server_name"] = getattr(backend, "server_name", None) or backend.host
    return backend.model_copy(update=update)


def _unique_names(backends: list[BackendConfig]) -> tuple[BackendConfig, ...]:
    """Renames a generated backend whose name is already taken (``name~2``, ...)."""
    taken = {b.label for b in backends}
    seen: set[str] = set()
    out = []
    for backend in backends:
        if backend.label in seen:
            n = 2
            while f"{backend.label}~{n}" in taken:
                n += 1
            name = f"{backend.label}~{n}"
            taken.add(name)
            backend = backend.model_copy(update={"name": name})
        seen.add(backend.label)
        out.append(backend)
    return tuple(out)


def expand(
    backends: Sequence[BackendConfig],
    resolve: Callable[[str], list[str]],
    *,
    enabled: Callable[[BackendConfig], bool] = needs_discovery,
    previous: Mapping[str, Sequence[str]] | None = None,
) -> Expansion:
    """Replace each backend for which ``enabled`` is true by one backend per address.

    Each host name is resolved once, even when several backends use it. A name that fails
    keeps its addresses from ``previous`` when it has some there, otherwise its backends
    are left out. The result is never empty when ``backends`` is not: if no backend is
    left, the backends are returned as configured. The order of ``backends`` is kept, and
    a discovered backend's addresses come in ``normalize_addresses`` order.
    """
    previous = previous or {}
    addresses: dict[str, list[str]] = {}
    errors: dict[str, str] = {}
    out: list[BackendConfig] = []
    for backend in backends:
        if not enabled(backend):
            out.append(backend)
            continue
        host = backend.host
        if host not in addresses and host not in errors:
            try:
                found = normalize_addresses(resolve(host))
                if not found:
                    raise ResolveError(f"cannot resolve {host}: no address")
                addresses[host] = found
            except (ResolveError, OSError, ValueError) as exc:
                errors[host] = str(exc) or type(exc).__name__
                kept = normalize_addresses(previous.get(host, ()))
                if kept:
                    addresses[host] = kept
        out.extend(_for_address(backend, address) for address in addresses.get(host, ()))
    if not out and backends:
        out = list(backends)
    return Expansion(_unique_names(out), addresses, errors)


def expanded_config(config: Config, expansion: Expansion) -> Config:
    """``config`` with the expanded backends (names are unique: no validation needed)."""
    return config.model_copy(update={"backends": expansion.backends})


# -- periodic re-resolution -----------------------------------------------------------


def _address_sets(addresses: Mapping[str, Sequence[str]]) -> dict[str, frozenset[str]]:
    return {host: frozenset(addrs) for host, addrs in addresses.items()}


class Watcher:
    """Re-resolves the discovered names every ``interval`` seconds and reports changes.

    The master calls ``check(..., force=True)`` when it starts or reloads (the result is
    always an ``Expansion`` then), and otherwise calls ``check`` whenever ``due()``. A
    check returns ``None`` when every host has the same set of addresses as at the last
    check (order does not matter), so the master reloads only on a real change. A host
    that fails to resolve keeps its last known addresses, which is no change.
    """

    def __init__(
        self,
        resolve: Callable[[str], list[str]],
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.resolve = resolve
        self.interval = interval
        self.clock = clock
        self.next_check = clock()  # the first check is due at once
        self.addresses: dict[str, list[str]] = {}  # as of the last check
        self.errors: dict[str, str] = {}  # failures of the last check
        self.checked = False

    def due(self) -> bool:
        return self.clock() >= self.next_check

    def check(
        self,
        backends: Sequence[BackendConfig],
        enabled: Callable[[BackendConfig], bool] = needs_discovery,
        *,
        force: bool = False,
    ) -> Expansion | None:
        """Resolve now; the new ``Expansion`` if the addresses changed (or ``force``)."""
        expansion = expand(backends, self.resolve, enabled=enabled, previous=self.addresses)
        self.next_check = self.clock() + self.interval
        self.errors = dict(expansion.errors)
        changed = not self.checked or _address_sets(expansion.addresses) != _address_sets(
            self.addresses
        )
        self.checked = True
        self.addresses = {host: list(addrs) for host, addrs in expansion.addresses.items()}
        return expansion if changed or force else None
