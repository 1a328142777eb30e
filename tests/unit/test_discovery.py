"""Backends by DNS: expansion of a name into one backend per address, and change detection."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pibl.config import BackendConfig, validate
from pibl.discovery import (
    DNSResolver,
    Expansion,
    ResolveError,
    SystemResolver,
    Watcher,
    expand,
    expanded_config,
    is_ip_literal,
    make_resolver,
    needs_discovery,
    normalize_addresses,
    parse_nameserver,
)

HAS_DISCOVER = "discover" in BackendConfig.model_fields
HAS_SERVER_NAME = "server_name" in BackendConfig.model_fields


class Backend(BackendConfig):
    """BackendConfig with the discovery fields, whether or not the real one has them yet."""

    discover: bool = False
    server_name: str | None = None


def backend(url: str, **fields: Any) -> Backend:
    return Backend(url=url, **fields)


def discovered(url: str, **fields: Any) -> Backend:
    return Backend(url=url, discover=True, **fields)


class FakeDNS:
    """A mutable table of names; a missing name fails like NXDOMAIN. Counts lookups."""

    def __init__(self, table: dict[str, list[str]] | None = None) -> None:
        self.table = dict(table or {})
        self.lookups: list[str] = []

    def __call__(self, host: str) -> list[str]:
        self.lookups.append(host)
        if host not in self.table:
            raise ResolveError(f"cannot resolve {host}: no such name (NXDOMAIN)")
        return list(self.table[host])


def urls(expansion: Expansion) -> list[str]:
    return [b.url for b in expansion.backends]


def names(expansion: Expansion) -> list[str]:
    return [b.label for b in expansion.backends]


# -- needs_discovery and address helpers -----------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://svc.local:8080", True),
        ("https://api.example.com", True),
        ("http://localhost:80", True),
        ("http://10.0.0.1:8080", False),
        ("http://[::1]:8080", False),
        ("http://[2001:db8::5]", False),
    ],
)
def test_needs_discovery_only_for_names(url: str, expected: bool) -> None:
    assert needs_discovery(discovered(url)) is expected


def test_needs_discovery_only_when_asked() -> None:
    assert not needs_discovery(backend("http://svc.local:8080"))
    assert not needs_discovery(BackendConfig(url="http://svc.local:8080"))


def test_is_ip_literal() -> None:
    assert is_ip_literal("192.0.2.1")
    assert is_ip_literal("::1")
    assert is_ip_literal("fe80::1%eth0")
    assert not is_ip_literal("svc.local")
    assert not is_ip_literal("1.2.3")


def test_normalize_sorts_dedups_and_canonicalizes() -> None:
    assert normalize_addresses(
        ["10.0.0.10", "2001:DB8::1", "10.0.0.9", "10.0.0.10", "2001:db8:0::1", "::1"]
    ) == ["10.0.0.9", "10.0.0.10", "::1", "2001:db8::1"]
    with pytest.raises(ValueError):
        normalize_addresses(["not-an-ip"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("10.0.0.2", ("10.0.0.2", 53)),
        ("[::1]:53", ("::1", 53)),
        ("[::1]:5300", ("::1", 5300)),
        ("[::1]", ("::1", 53)),
        ("::1", ("::1", 53)),
        ("2001:db8::53", ("2001:db8::53", 53)),
    ],
)
def test_parse_nameserver(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize(
    "text", ["dns.example.com", "127.0.0.1:0", "127.0.0.1:99999", "[::1", "[::1]x", "1.2.3.4:a"]
)
def test_parse_nameserver_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="name server"):
        parse_nameserver(text)


# -- expand ---------------------------------------------------------------------------


def test_one_backend_per_address_in_order() -> None:
    dns = FakeDNS({"svc.local": ["10.0.0.7", "10.0.0.5", "10.0.0.6"]})
    result = expand([discovered("http://svc.local:8080")], dns)
    assert urls(result) == [
        "http://10.0.0.5:8080",
        "http://10.0.0.6:8080",
        "http://10.0.0.7:8080",
    ]
    assert names(result) == [
        "svc.local:8080@10.0.0.5",
        "svc.local:8080@10.0.0.6",
        "svc.local:8080@10.0.0.7",
    ]
    assert result.addresses == {"svc.local": ["10.0.0.5", "10.0.0.6", "10.0.0.7"]}
    assert result.errors == {}
    for b in result.backends:
        assert b.host.startswith("10.0.0.")
        assert b.port == 8080
        assert b.server_name == "svc.local"  # type: ignore[attr-defined]


def test_ipv6_addresses_in_brackets() -> None:
    dns = FakeDNS({"svc.local": ["2001:db8::2", "10.0.0.1", "2001:db8::1"]})
    result = expand([discovered("https://svc.local:8443", name="api")], dns)
    assert urls(result) == [
        "https://10.0.0.1:8443",
        "https://[2001:db8::1]:8443",
        "https://[2001:db8::2]:8443",
    ]
    assert names(result) == ["api@10.0.0.1", "api@2001:db8::1", "api@2001:db8::2"]
    assert [b.host for b in result.backends] == ["10.0.0.1", "2001:db8::1", "2001:db8::2"]
    assert all(b.port == 8443 and b.scheme == "https" for b in result.backends)


def test_duplicates_collapse() -> None:
    dns = FakeDNS({"svc.local": ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"]})
    result = expand([discovered("http://svc.local:80")], dns)
    assert urls(result) == ["http://10.0.0.1:80", "http://10.0.0.2:80"]


def test_url_without_port_keeps_default_port() -> None:
    dns = FakeDNS({"svc.local": ["10.0.0.1", "::1"]})
    result = expand([discovered("https://svc.local/")], dns)
    assert urls(result) == ["https://10.0.0.1/", "https://[::1]/"]
    assert [b.port for b in result.backends] == [443, 443]
    assert names(result) == ["svc.local:443@10.0.0.1", "svc.local:443@::1"]


def test_settings_are_preserved() -> None:
    original = discovered(
        "https://svc.local:8443",
        name="api",
        weight=7,
        health_check=False,
        health_path="/ready",
        ca_file="/etc/pibl/ca.pem",
        tls_verify=False,
        client_cert="/etc/pibl/client.pem",
        client_key="/etc/pibl/client.key",
    )
    result = expand([original], FakeDNS({"svc.local": ["10.0.0.1", "10.0.0.2"]}))
    assert len(result.backends) == 2
    for b in result.backends:
        assert isinstance(b, Backend)
        same = {k: v for k, v in b.model_dump().items() if k not in ("url", "name", "server_name")}
        expected = {
            k: v
            for k, v in original.model_dump().items()
            if k not in ("url", "name", "server_name")
        }
        assert same == expected
        assert b.server_name == "svc.local"


def test_explicit_server_name_is_kept() -> None:
    original = discovered("https://svc.internal:8443", server_name="api.example.com")
    result = expand([original], FakeDNS({"svc.internal": ["10.0.0.1"]}))
    assert result.backends[0].server_name == "api.example.com"  # type: ignore[attr-defined]


def test_mixed_static_and_discovered_keep_their_places() -> None:
    dns = FakeDNS({"svc.local": ["10.0.0.2", "10.0.0.1"], "static.local": ["10.9.9.9"]})
    configured = [
        backend("http://127.0.0.1:9001", name="first"),
        discovered("http://svc.local:8080"),
        backend("http://static.local:9002"),  # a name, but discovery not asked for
        discovered("http://10.1.1.1:9003"),  # asked for, but an IP literal
    ]
    result = expand(configured, dns)
    assert urls(result) == [
        "http://127.0.0.1:9001",
        "http://10.0.0.1:8080",
        "http://10.0.0.2:8080",
        "http://static.local:9002",
        "http://10.1.1.1:9003",
    ]
    assert result.backends[0] is configured[0]
    assert result.backends[3] is configured[2]
    assert result.backends[4] is configured[3]
    assert dns.lookups == ["svc.local"]
    assert result.addresses == {"svc.local": ["10.0.0.1", "10.0.0.2"]}


def test_each_name_is_resolved_once() -> None:
    dns = FakeDNS({"svc.local": ["10.0.0.1", "10.0.0.2"]})
    result = expand(
        [discovered("http://svc.local:80"), discovered("https://svc.local:443")],
        dns,
    )
    assert dns.lookups == ["svc.local"]
    assert names(result) == [
        "svc.local:80@10.0.0.1",
        "svc.local:80@10.0.0.2",
        "svc.local:443@10.0.0.1",
        "svc.local:443@10.0.0.2",
    ]


def test_names_are_unique_even_when_labels_collide() -> None:
    dns = FakeDNS({"a.local": ["10.0.0.1"], "b.local": ["10.0.0.1"]})
    configured = [
        discovered("http://a.local:80", name="web"),
        discovered("http://b.local:80", name="web"),  # the config validator forbids this
        backend("http://10.0.0.1:80", name="web@10.0.0.1~2"),
    ]
    result = expand(configured, dns)
    labels = names(result)
    assert len(set(labels)) == len(labels) == 3
    assert labels[0] == "web@10.0.0.1"
    assert labels[2] == "web@10.0.0.1~2"


def test_failure_without_previous_leaves_the_backend_out() -> None:
    dns = FakeDNS({"svc.local": ["10.0.0.1"]})
    configured = [discovered("http://svc.local:80"), discovered("http://gone.local:80")]
    result = expand(configured, dns)
    assert urls(result) == ["http://10.0.0.1:80"]
    assert result.addresses == {"svc.local": ["10.0.0.1"]}
    assert set(result.errors) == {"gone.local"}
    assert "NXDOMAIN" in result.errors["gone.local"]
    assert "gone.local" in result.summary()


def test_failure_with_previous_keeps_the_last_known_addresses() -> None:
    dns = FakeDNS({})
    result = expand(
        [discovered("http://svc.local:80")],
        dns,
        previous={"svc.local": ["10.0.0.2", "10.0.0.1"], "other.local": ["10.5.5.5"]},
    )
    assert urls(result) == ["http://10.0.0.1:80", "http://10.0.0.2:80"]
    assert result.addresses == {"svc.local": ["10.0.0.1", "10.0.0.2"]}
    assert set(result.errors) == {"svc.local"}
    assert "keeping the last known addresses" in result.summary()


def test_previous_is_ignored_when_resolution_works() -> None:
    dns = FakeDNS({"svc.local": ["10.0.0.3"]})
    result = expand([discovered("http://svc.local:80")], dns, previous={"svc.local": ["10.0.0.1"]})
    assert urls(result) == ["http://10.0.0.3:80"]


def test_everything_failing_keeps_the_configured_backends() -> None:
    configured = [discovered("http://svc.local:80"), discovered("http://db.local:81")]
    result = expand(configured, FakeDNS({}))
    assert result.backends == tuple(configured)
    assert result.addresses == {}
    assert set(result.errors) == {"svc.local", "db.local"}


def test_static_backends_alone_survive_a_failed_name() -> None:
    configured = [backend("http://127.0.0.1:9001"), discovered("http://svc.local:80")]
    result = expand(configured, FakeDNS({}))
    assert urls(result) == ["http://127.0.0.1:9001"]


def test_empty_answers_and_bad_addresses_count_as_failures() -> None:
    dns = FakeDNS({"empty.local": [], "bad.local": ["10.0.0.1", "garbage"]})
    result = expand(
        [
            backend("http://127.0.0.1:9001"),
            discovered("http://empty.local:80"),
            discovered("http://bad.local:80"),
        ],
        dns,
    )
    assert urls(result) == ["http://127.0.0.1:9001"]
    assert set(result.errors) == {"empty.local", "bad.local"}


def test_os_errors_from_the_resolver_are_contained() -> None:
    def broken(host: str) -> list[str]:
        raise OSError("network is unreachable")

    result = expand([discovered("http://svc.local:80")], broken)
    assert "unreachable" in result.errors["svc.local"]


def test_custom_enabled_predicate() -> None:
    dns = FakeDNS({"svc.local": ["10.0.0.1", "10.0.0.2"]})
    plain = BackendConfig(url="http://svc.local:80", weight=3)
    result = expand([plain], dns, enabled=lambda b: b.host.endswith(".local"))
    assert urls(result) == ["http://10.0.0.1:80", "http://10.0.0.2:80"]
    assert all(type(b) is BackendConfig and b.weight == 3 for b in result.backends)


def test_empty_input() -> None:
    assert expand([], FakeDNS({})) == Expansion(())


@given(
    st.lists(
        st.one_of(
            st.ip_addresses(v=4).map(str),
            st.ip_addresses(v=6).map(str),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_expansion_matches_the_address_set(addresses: list[str]) -> None:
    result = expand(
        [discovered("http://svc.local:8080", name="svc")],
        lambda host: addresses,
    )
    unique = set(normalize_addresses(addresses))
    assert {b.host for b in result.backends} == unique
    assert len(result.backends) == len(unique)
    assert len({b.label for b in result.backends}) == len(unique)
    for b in result.backends:
        assert b.port == 8080
        assert b.label == f"svc@{b.host}"
        assert BackendConfig(url=b.url).host == b.host  # the URL passes validation


# -- Watcher --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watcher(dns: Callable[[str], list[str]], clock: Clock, interval: float = 10.0) -> Watcher:
    return Watcher(dns, interval, clock=clock)


def test_watcher_schedule() -> None:
    clock = Clock()
    w = watcher(FakeDNS({"svc.local": ["10.0.0.1"]}), clock)
    assert w.due()  # the first check is due at once
    w.check([discovered("http://svc.local:80")])
    assert not w.due()
    clock.now += 9.9
    assert not w.due()
    clock.now += 0.1
    assert w.due()


def test_watcher_reports_only_changes() -> None:
    clock = Clock()
    dns = FakeDNS({"svc.local": ["10.0.0.1", "10.0.0.2"]})
    w = watcher(dns, clock)
    configured = [backend("http://127.0.0.1:9001"), discovered("http://svc.local:80")]

    first = w.check(configured)
    assert first is not None  # the first check always answers
    assert urls(first) == ["http://127.0.0.1:9001", "http://10.0.0.1:80", "http://10.0.0.2:80"]

    assert w.check(configured) is None  # nothing changed

    dns.table["svc.local"] = ["10.0.0.2", "10.0.0.1"]  # same set, other order
    assert w.check(configured) is None

    dns.table["svc.local"] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]  # scaled up
    grown = w.check(configured)
    assert grown is not None
    assert urls(grown)[1:] == ["http://10.0.0.1:80", "http://10.0.0.2:80", "http://10.0.0.3:80"]
    assert w.addresses == {"svc.local": ["10.0.0.1", "10.0.0.2", "10.0.0.3"]}

    dns.table["svc.local"] = ["10.0.0.3"]  # scaled down
    shrunk = w.check(configured)
    assert shrunk is not None
    assert urls(shrunk) == ["http://127.0.0.1:9001", "http://10.0.0.3:80"]
    assert w.check(configured) is None


def test_watcher_keeps_addresses_through_dns_failures() -> None:
    clock = Clock()
    dns = FakeDNS({"svc.local": ["10.0.0.1"]})
    w = watcher(dns, clock)
    configured = [discovered("http://svc.local:80")]
    assert w.check(configured) is not None

    del dns.table["svc.local"]  # the DNS server loses the name for a while
    assert w.check(configured) is None
    assert "svc.local" in w.errors
    assert w.addresses == {"svc.local": ["10.0.0.1"]}
    forced = w.check(configured, force=True)
    assert forced is not None
    assert urls(forced) == ["http://10.0.0.1:80"]  # still served from the last answer

    dns.table["svc.local"] = ["10.0.0.1"]
    assert w.check(configured) is None
    assert w.errors == {}


def test_watcher_name_appearing_later() -> None:
    clock = Clock()
    dns = FakeDNS({})
    w = watcher(dns, clock)
    configured = [discovered("http://svc.local:80")]
    first = w.check(configured)
    assert first is not None
    assert first.backends == tuple(configured)  # nothing resolved: run as configured
    assert w.check(configured) is None

    dns.table["svc.local"] = ["10.0.0.9"]
    later = w.check(configured)
    assert later is not None
    assert urls(later) == ["http://10.0.0.9:80"]


def test_watcher_force_and_changed_backends() -> None:
    clock = Clock()
    dns = FakeDNS({"svc.local": ["10.0.0.1"], "db.local": ["10.0.1.1"]})
    w = watcher(dns, clock)
    assert w.check([discovered("http://svc.local:80")]) is not None
    again = w.check([discovered("http://svc.local:80", weight=5)], force=True)
    assert again is not None and again.backends[0].weight == 5
    # a name added to the configuration is a change
    assert w.check([discovered("http://svc.local:80"), discovered("http://db.local:80")])


def test_watcher_rejects_bad_interval() -> None:
    with pytest.raises(ValueError):
        Watcher(FakeDNS(), 0)


# -- resolvers without a network ------------------------------------------------------


def test_system_resolver_localhost_and_literals() -> None:
    resolver = SystemResolver()
    assert resolver.resolve("127.0.0.1") == ["127.0.0.1"]
    assert resolver.resolve("::1") == ["::1"]
    assert "127.0.0.1" in resolver.resolve("localhost")
    assert SystemResolver(socket.AF_INET).resolve("localhost") == ["127.0.0.1"]


def test_system_resolver_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> object:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(ResolveError, match=r"svc\.local"):
        SystemResolver().resolve("svc.local")


def test_system_resolver_sorts_and_dedups(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(*args: object, **kwargs: object) -> list[tuple[Any, ...]]:
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", 0, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.2", 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.2", 0)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    assert SystemResolver().resolve("svc.local") == ["10.0.0.1", "10.0.0.2", "2001:db8::1"]


def test_make_resolver() -> None:
    assert isinstance(make_resolver(), SystemResolver)
    assert isinstance(make_resolver(["127.0.0.1:5353"], 1.0), DNSResolver)
    with pytest.raises(ValueError):
        make_resolver(["dns.example.com"])
    with pytest.raises(ValueError):
        DNSResolver(["127.0.0.1"], timeout=0)


# -- with the real configuration schema -----------------------------------------------


@pytest.mark.skipif(not HAS_DISCOVER, reason="BackendConfig has no discover field")
def test_expanded_config_from_validated_config() -> None:
    config = validate(
        {
            "backends": [
                {"url": "http://127.0.0.1:9001", "name": "static"},
                {"url": "http://svc.local:8080", "discover": True, "weight": 2},
            ]
        },
        "test",
    )
    expansion = expand(config.backends, FakeDNS({"svc.local": ["10.0.0.2", "10.0.0.1"]}))
    effective = expanded_config(config, expansion)
    assert [b.label for b in effective.backends] == [
        "static",
        "svc.local:8080@10.0.0.1",
        "svc.local:8080@10.0.0.2",
    ]
    assert [b.weight for b in effective.backends] == [1, 2, 2]
    assert effective.server == config.server
    # the effective configuration is itself valid
    again = validate(effective.model_dump(), "test")
    assert [b.url for b in again.backends] == [b.url for b in effective.backends]
    if HAS_SERVER_NAME:
        assert [getattr(b, "server_name", None) for b in effective.backends] == [
            None,
            "svc.local",
            "svc.local",
        ]
