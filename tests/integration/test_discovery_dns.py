"""Backends by DNS against a real (small, local) DNS server speaking UDP on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from pibl.config import BackendConfig
from pibl.discovery import DNSResolver, ResolveError, Watcher, expand

ZONE = "svc.pibl.test."


class TinyDNS:
    """Answers A and AAAA from ``records`` ({name: [addresses]}); other names: NXDOMAIN.

    ``silent = True`` makes it drop every query, like an unreachable server.
    """

    def __init__(self, ttl: int = 30) -> None:
        self.records: dict[str, list[str]] = {}
        self.ttl = ttl
        self.silent = False
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            question = query.question[0]
            name, rdtype = question.name.to_text().lower(), question.rdtype
            self.queries.append((name, dns.rdatatype.to_text(rdtype)))
            if self.silent:
                continue
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            if name not in self.records:
                response.set_rcode(dns.rcode.NXDOMAIN)
            else:
                family = socket.AF_INET if rdtype == dns.rdatatype.A else socket.AF_INET6
                wanted = [a for a in self.records[name] if _family(a) == family]
                if wanted and rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    response.answer.append(
                        dns.rrset.from_text_list(
                            question.name, self.ttl, dns.rdataclass.IN, rdtype, wanted
                        )
                    )
            self.sock.sendto(response.to_wire(), peer)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


@pytest.fixture
def tiny_dns() -> Iterator[TinyDNS]:
    server = TinyDNS()
    yield server
    server.stop()


def discovered(url: str, **fields: object) -> BackendConfig:
    return BackendConfig.model_validate({"url": url, **fields})


def every_backend(backend: BackendConfig) -> bool:
    return True


def test_resolves_a_and_aaaa(tiny_dns: TinyDNS) -> None:
    tiny_dns.records[ZONE] = ["10.0.0.2", "2001:db8::1", "10.0.0.1"]
    resolver = DNSResolver([tiny_dns.address], timeout=1.0)
    assert resolver.resolve("svc.pibl.test") == ["10.0.0.1", "10.0.0.2", "2001:db8::1"]
    assert ("svc.pibl.test.", "A") in tiny_dns.queries
    assert ("svc.pibl.test.", "AAAA") in tiny_dns.queries


def test_only_ipv4_or_only_ipv6(tiny_dns: TinyDNS) -> None:
    resolver = DNSResolver([tiny_dns.address], timeout=1.0)
    tiny_dns.records[ZONE] = ["10.0.0.1"]
    assert resolver.resolve("svc.pibl.test") == ["10.0.0.1"]
    tiny_dns.records[ZONE] = ["2001:db8::7"]
    assert resolver.resolve("svc.pibl.test") == ["2001:db8::7"]


def test_name_without_addresses_is_an_error(tiny_dns: TinyDNS) -> None:
    tiny_dns.records[ZONE] = []
    with pytest.raises(ResolveError, match="no address"):
        DNSResolver([tiny_dns.address], timeout=1.0).resolve("svc.pibl.test")


def test_nxdomain(tiny_dns: TinyDNS) -> None:
    with pytest.raises(ResolveError, match="NXDOMAIN"):
        DNSResolver([tiny_dns.address], timeout=1.0).resolve("missing.pibl.test")


def test_timeout_when_the_server_does_not_answer(tiny_dns: TinyDNS) -> None:
    tiny_dns.silent = True
    tiny_dns.records[ZONE] = ["10.0.0.1"]
    resolver = DNSResolver([tiny_dns.address], timeout=0.4)
    started = time.monotonic()
    with pytest.raises(ResolveError, match="timed out"):
        resolver.resolve("svc.pibl.test")
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 0.9
    assert tiny_dns.queries  # it did ask


def test_ttl_cache(tiny_dns: TinyDNS) -> None:
    tiny_dns.records[ZONE] = ["10.0.0.1"]
    cached = DNSResolver([tiny_dns.address], timeout=1.0, respect_ttl=True)
    fresh = DNSResolver([tiny_dns.address], timeout=1.0)
    assert cached.resolve("svc.pibl.test") == ["10.0.0.1"]
    asked = len(tiny_dns.queries)
    tiny_dns.records[ZONE] = ["10.0.0.2"]
    assert cached.resolve("svc.pibl.test") == ["10.0.0.1"]  # within the 30 s TTL
    assert len(tiny_dns.queries) == asked
    assert fresh.resolve("svc.pibl.test") == ["10.0.0.2"]


def test_expand_with_a_real_server(tiny_dns: TinyDNS) -> None:
    tiny_dns.records[ZONE] = ["10.0.0.1", "::1"]
    resolver = DNSResolver([tiny_dns.address], timeout=1.0)
    result = expand(
        [
            BackendConfig(url="http://127.0.0.1:9001", name="static"),
            discovered("https://svc.pibl.test:8443", name="svc", weight=4, tls_verify=False),
        ],
        resolver.resolve,
        enabled=lambda b: b.host.endswith(".pibl.test"),
    )
    assert [(b.label, b.url, b.weight) for b in result.backends] == [
        ("static", "http://127.0.0.1:9001", 1),
        ("svc@10.0.0.1", "https://10.0.0.1:8443", 4),
        ("svc@::1", "https://[::1]:8443", 4),
    ]
    assert all(not b.tls_verify for b in result.backends[1:])


def test_watcher_follows_the_record_set_without_restart(tiny_dns: TinyDNS) -> None:
    now = [0.0]
    resolver = DNSResolver([tiny_dns.address], timeout=1.0)
    watcher = Watcher(resolver.resolve, interval=5.0, clock=lambda: now[0])
    configured = [discovered("http://svc.pibl.test:8080", name="svc")]

    def check() -> list[str] | None:
        assert watcher.due()
        result = watcher.check(configured, every_backend)
        now[0] += 5.0
        return None if result is None else [b.url for b in result.backends]

    tiny_dns.records[ZONE] = ["10.0.0.1", "10.0.0.2"]
    assert check() == ["http://10.0.0.1:8080", "http://10.0.0.2:8080"]
    assert check() is None

    tiny_dns.records[ZONE] = ["10.0.0.2", "10.0.0.1", "2001:db8::3"]  # added
    assert check() == ["http://10.0.0.1:8080", "http://10.0.0.2:8080", "http://[2001:db8::3]:8080"]
    assert check() is None

    tiny_dns.records[ZONE] = ["2001:db8::3"]  # two removed
    assert check() == ["http://[2001:db8::3]:8080"]

    tiny_dns.silent = True  # the server stops answering: keep what we have
    watcher.resolve = DNSResolver([tiny_dns.address], timeout=0.2).resolve
    assert check() is None
    assert "svc.pibl.test" in watcher.errors
    assert watcher.addresses == {"svc.pibl.test": ["2001:db8::3"]}

    tiny_dns.silent = False
    del tiny_dns.records[ZONE]  # NXDOMAIN: still keep what we have
    assert check() is None
    assert "NXDOMAIN" in watcher.errors["svc.pibl.test"]

    tiny_dns.records[ZONE] = ["10.0.0.9"]
    assert check() == ["http://10.0.0.9:8080"]
    assert watcher.errors == {}
