"""HTTP/2 to clients with real clients (curl, nghttp) and with frames written by the test.

Backends stay HTTP/1.1: every assertion on what reached a backend reads its ``seen`` log.
Malformed requests are written with the ``h2`` library as a client whose own validation is
off, so the bytes on the wire are exactly the ones each rule is about.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
import trustme
from hyperframe.frame import ContinuationFrame, HeadersFrame

from tests.support import Backend, ProxyThread, free_port, pattern_sha256, wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("nghttp") is None,
    reason="needs curl with HTTP/2 and nghttp (nghttp2-client)",
)

H2C = {"h2c": True}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("h2-pki")
    ca = trustme.CA(organization_name="PIBL HTTP/2 test CA")
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    paths = {"ca": directory / "ca.pem", "cert": directory / "c.pem", "key": directory / "k.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    paths["cert"].write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    return paths


def curl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(timeout), *args],
        capture_output=True,
        text=True,
        timeout=timeout + 5,
    )


# ------------------------------------------------------------------ a client of frames


class Client:
    """An HTTP/2 client over a plain socket (h2c), validation off unless asked."""

    def __init__(self, port: int, *, validate: bool = False, window: int | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
            validate_inbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config=config)
        if window is not None:
            self.conn.local_settings = h2.settings.Settings(
                client=True,
                initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window},
            )
        self.conn.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.bodies: dict[int, bytearray] = {}
        self.heads: dict[int, dict[bytes, bytes]] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.ack = True
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(
        self, path: str = "/", *, extra: list[tuple[bytes, bytes]] | None = None, **kw: Any
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [
            (b":method", kw.get("method", b"GET")),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", b"localhost"),
            *(extra or []),
        ]
        if "fields" in kw:
            fields = kw["fields"]
        self.conn.send_headers(sid, fields, end_stream=kw.get("end_stream", True))
        self.flush()
        return sid

    def pump(self, until: Callable[[], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                return False
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return until()
            except OSError:
                return until()
            if not data:
                return until()
            for ev in self.conn.receive_data(data):
                self.events.append(ev)
                if isinstance(ev, h2.events.ResponseReceived):
                    self.heads[ev.stream_id] = dict(ev.headers or [])
                elif isinstance(ev, h2.events.DataReceived):
                    self.bodies.setdefault(ev.stream_id, bytearray()).extend(ev.data or b"")
                    if self.ack or ev.stream_id not in self.slow:
                        self.conn.acknowledge_received_data(
                            ev.flow_controlled_length or 0, ev.stream_id
                        )
                elif isinstance(ev, h2.events.StreamEnded):
                    self.ended.add(ev.stream_id)
                elif isinstance(ev, h2.events.StreamReset):
                    self.resets[ev.stream_id] = int(ev.error_code or 0)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    self.goaway = ev
            self.flush()
        return True

    slow: set[int] = set()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def h2c(backends: list[Backend], make_proxy: Callable[..., ProxyThread]) -> Iterator[ProxyThread]:
    yield make_proxy(backends, server=H2C)


# ------------------------------------------------------------------ real clients


def test_curl_prior_knowledge_on_h2c_and_the_access_log(
    h2c: ProxyThread, backends: list[Backend]
) -> None:
    r = curl("--http2-prior-knowledge", "-D", "-", "-w", "\n%{http_version}", h2c.url + "/x?y=1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("HTTP/2 200")
    assert r.stdout.endswith("\n2")
    assert "b1 GET /x?y=1" in r.stdout
    assert "via: 1.1 pibl" in r.stdout
    seen = backends[0].seen[0]
    assert seen.version == "HTTP/1.1"  # backends stay HTTP/1.1
    assert dict((k.lower(), v) for k, v in seen.headers)["host"] == f"127.0.0.1:{h2c.port}"
    assert any('"GET /x?y=1 HTTP/2.0" 200' in line for line in h2c.log_lines())


def test_h2c_is_off_by_default(backends: list[Backend], make_proxy: Callable[..., Any]) -> None:
    proxy = make_proxy(backends)
    r = curl("--http2-prior-knowledge", proxy.url + "/", timeout=5)
    assert r.returncode != 0
    assert not any(b.seen for b in backends)
    r = curl("-w", "%{http_version}", "-o", "/dev/null", proxy.url + "/")  # HTTP/1.1 as before
    assert r.stdout == "1.1"


def test_curl_http2_over_tls_and_alpn_config(
    pki: dict[str, Path], backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    tls = {"port": free_port(), "cert": str(pki["cert"]), "key": str(pki["key"])}
    proxy = make_proxy(backends, tls=tls)
    url = f"https://localhost:{tls['port']}"
    args = ("--cacert", str(pki["ca"]), "--http2", "-w", "\n%{http_version}")
    r = curl(*args, url + "/tls", "-H", "Cookie: a=1", "-H", "Cookie: b=2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("b1 GET /tls\n2")
    headers = {k.lower(): v for k, v in backends[0].seen[0].headers}
    assert headers["x-forwarded-proto"] == "https"
    assert headers["cookie"] == "a=1; b=2"  # joined with "; " for HTTP/1.1
    r = curl(*args, "-X", "POST", "--data-binary", "payload", url + "/post")
    assert r.stdout.endswith(" POST /post body=payload\n2")
    # [tls] alpn = ["http/1.1"]: the same client speaks HTTP/1.1
    tls11 = {**tls, "port": free_port(), "alpn": ["http/1.1"]}
    proxy11 = make_proxy(backends, tls=tls11)
    assert proxy11 is not proxy
    r = curl(*args, f"https://localhost:{tls11['port']}/")
    assert r.stdout.endswith("\n1.1")


def test_nghttp_many_streams_round_robin_strict(h2c: ProxyThread, backends: list[Backend]) -> None:
    paths = [f"{h2c.url}/s{i}" for i in range(60)]
    r = subprocess.run(
        ["nghttp", "-n", "-s", "-m", "1", *paths], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(" 200 ") == 60
    assert sorted(len(b.seen) for b in backends) == [20, 20, 20]  # strict round robin
    served = sorted(s.path for b in backends for s in b.seen)
    assert served == sorted(f"/s{i}" for i in range(60))
    r = subprocess.run(
        ["nghttp", "-n", "-s", "-m", "90", f"{h2c.url}/same"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(" 200 ") == 90  # 90 concurrent streams on one connection
    assert sorted(len(b.seen) for b in backends) == [50, 50, 50]


@pytest.mark.parametrize("query", ["size=1000000", "size=700000&chunked=1"])
def test_nghttp_response_bodies_are_correct(h2c: ProxyThread, query: str) -> None:
    r = subprocess.run(["nghttp", f"{h2c.url}/download?{query}"], capture_output=True, timeout=30)
    assert r.returncode == 0
    size = int(query.split("&")[0].split("=")[1])
    assert hashlib.sha256(r.stdout).hexdigest() == pattern_sha256(size)


def test_a_large_download_does_not_stall_other_streams(h2c: ProxyThread) -> None:
    client = Client(h2c.port, window=65535)
    client.conn.increment_flow_control_window(64 * 1024 * 1024)
    client.flush()
    big = client.request("/download?size=20000000")
    client.slow = {big}  # its window is never given back: the stream stalls
    client.ack = False
    assert client.pump(lambda: len(client.bodies.get(big, b"")) >= 65535)
    small = [client.request(f"/small{i}") for i in range(20)]
    assert client.pump(lambda: all(s in client.ended for s in small))
    assert all(client.heads[s][b":status"] == b"200" for s in small)
    assert big not in client.ended
    assert len(client.bodies[big]) == 65535
    # memory stays bounded: the backend was paused, PIBL holds about stream_buffer bytes
    assert h2c.worker is not None
    (conn,) = list(h2c.worker.proxy.connections)
    held = len(conn.streams[big]._pending)  # type: ignore[attr-defined]
    assert 0 < held <= h2c.config.http2.stream_buffer + 1024 * 1024
    # the slow stream resumes when its window comes back, and its body is intact
    client.slow = set()
    client.ack = True
    client.conn.acknowledge_received_data(65535, big)
    client.flush()
    assert client.pump(lambda: big in client.ended, timeout=60)
    assert len(client.bodies[big]) == 20000000
    assert hashlib.sha256(client.bodies[big]).hexdigest() == pattern_sha256(20000000)
    client.close()


def test_cache_hits_and_compression_over_http2(
    tmp_path: Path, backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(
        backends,
        server=H2C,
        cache={"enabled": True, "dir": str(tmp_path / "cache"), "ttl": 60},
    )
    url = proxy.url + "/cache?cc=max-age%3D60"
    args = ("--http2-prior-knowledge", "-D", "-")
    first, second = curl(*args, url), curl(*args, url)
    assert first.stdout.startswith("HTTP/2 200")
    assert "cache-status: pibl; fwd=" in first.stdout.lower()
    assert "cache-status: pibl; hit" in second.stdout.lower()
    assert sum(b.hits for b in backends) == 1
    # a large stored body (sent from the file, not from memory) over a stream
    big = proxy.url + "/cache?cc=max-age%3D60&size=3000000"
    for _ in range(2):
        r = subprocess.run(
            ["curl", "-sS", "--http2-prior-knowledge", big], capture_output=True, timeout=20
        )
        assert hashlib.sha256(r.stdout).hexdigest() == pattern_sha256(3000000)
    r = curl(
        "--http2-prior-knowledge",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-H",
        "Accept-Encoding: gzip",
        proxy.url + "/text?size=200000",
    )
    assert r.returncode == 0, r.stderr
    assert "content-encoding: gzip" in r.stdout.lower()
    r = subprocess.run(
        ["curl", "-sS", "--compressed", "--http2-prior-knowledge", proxy.url + "/text?size=200000"],
        capture_output=True,
        timeout=20,
    )
    assert len(r.stdout) == 200000
    lines = proxy.log_lines()
    assert sum(" HTTP/2.0" in line for line in lines) >= 6


# ------------------------------------------------------------------ malformed requests


BASE = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/m"), (b":authority", b"x")]
MALFORMED = {
    "connection": [*BASE, (b"connection", b"close")],
    "keep-alive": [*BASE, (b"keep-alive", b"1")],
    "transfer-encoding": [*BASE, (b"transfer-encoding", b"chunked")],
    "upgrade": [*BASE, (b"upgrade", b"websocket")],
    "proxy-connection": [*BASE, (b"proxy-connection", b"close")],
    "te": [*BASE, (b"te", b"gzip")],
    "uppercase": [*BASE, (b"X-Up", b"1")],
    "cr": [*BASE, (b"x", b"a\rb")],
    "lf": [*BASE, (b"x", b"a\nGET /smuggled HTTP/1.1")],
    "nul": [*BASE, (b"x", b"a\x00b")],
    "leading-ws": [*BASE, (b"x", b" a")],
    "trailing-ws": [*BASE, (b"x", b"a ")],
    "missing-method": BASE[1:],
    "missing-path": [*BASE[:2], BASE[3]],
    "missing-scheme": [BASE[0], *BASE[2:]],
    "duplicated-path": [*BASE, (b":path", b"/other")],
    "duplicated-method": [(b":method", b"POST"), *BASE],
}


def test_each_malformed_request_gets_a_stream_error_and_never_reaches_a_backend(
    h2c: ProxyThread, backends: list[Backend]
) -> None:
    client = Client(h2c.port)
    sids = {name: client.request(fields=fields) for name, fields in MALFORMED.items()}
    assert client.pump(lambda: all(s in client.resets for s in sids.values()))
    assert {name: client.resets[s] for name, s in sids.items()} == dict.fromkeys(MALFORMED, 1)
    # the connection is fine: a valid request on it is served
    ok = client.request("/fine")
    assert client.pump(lambda: ok in client.ended)
    assert client.heads[ok][b":status"] == b"200"
    assert [s.path for b in backends for s in b.seen] == ["/fine"]
    client.close()
    refused = [line for line in h2c.log_lines() if '"-" 400' in line]
    assert len(refused) == len(MALFORMED)  # one access line per refused stream


@pytest.mark.parametrize("sent", [b"12345", b"1234567890ab"])
def test_a_content_length_that_disagrees_with_data_is_refused(
    h2c: ProxyThread, backends: list[Backend], sent: bytes
) -> None:
    client = Client(h2c.port)
    sid = client.request(
        "/cl", method=b"POST", extra=[(b"content-length", b"10")], end_stream=False
    )
    client.conn.send_data(sid, sent, end_stream=True)
    client.flush()
    assert client.pump(lambda: sid in client.resets)
    assert client.resets[sid] == 1  # PROTOCOL_ERROR
    ok = client.request("/after")
    assert client.pump(lambda: ok in client.ended)
    assert [s.path for b in backends for s in b.seen] == ["/after"]
    client.close()
    lines = h2c.log_lines()
    assert sum('"POST /cl HTTP/2.0" 400' in line for line in lines) == 1, lines


def test_request_bodies_stream_upstream(h2c: ProxyThread, backends: list[Backend]) -> None:
    client = Client(h2c.port)
    sid = client.request("/upload", method=b"POST", end_stream=False)
    body = bytes(range(256)) * 4096  # 1 MiB, no content-length: chunked upstream
    sent = 0
    while sent < len(body):
        window = client.conn.local_flow_control_window(sid)
        if window == 0:
            client.pump(lambda: client.conn.local_flow_control_window(sid) > 0, timeout=5)
            continue
        n = min(window, 16384, len(body) - sent)
        client.conn.send_data(sid, body[sent : sent + n], end_stream=sent + n == len(body))
        sent += n
        client.flush()
    assert client.pump(lambda: sid in client.ended, timeout=20)
    expected = f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
    assert bytes(client.bodies[sid]) == expected
    client.close()


# ------------------------------------------------------------------ abuse and limits


def test_rapid_reset_gets_goaway_and_others_are_served(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, server=H2C, http2={"max_resets": 50, "reset_interval": 10})
    attacker = Client(proxy.port)
    conn = attacker.conn
    for _ in range(200):  # bounded flood: open a stream and cancel it at once
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [*BASE[:2], (b":path", b"/slow?s=0.2"), BASE[3]])
        conn.reset_stream(sid)
    with contextlib.suppress(OSError):  # PIBL may have hung up before the last frames
        attacker.flush()
    assert attacker.pump(lambda: attacker.goaway is not None)
    assert attacker.goaway is not None
    assert attacker.goaway.error_code == 11  # ENHANCE_YOUR_CALM
    attacker.close()
    r = curl("--http2-prior-knowledge", "-w", " %{http_version}", proxy.url + "/other")
    assert r.stdout.endswith("GET /other 2")
    metrics_ok = wait_for(
        lambda: (
            proxy.worker is not None
            and proxy.worker.proxy.metrics.h2_goaways.labels("rapid_reset")._value.get() == 1
        )
    )
    assert metrics_ok


def test_resets_a_client_provokes_count_toward_the_rapid_reset_cap(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    """Malformed requests PIBL resets (PROTOCOL_ERROR) count like the client's own resets:
    a flood of them gets GOAWAY ENHANCE_YOUR_CALM ("MadeYouReset", CVE-2025-8671)."""
    proxy = make_proxy(backends, server=H2C, http2={"max_resets": 20, "reset_interval": 10})
    attacker = Client(proxy.port)
    settled(attacker)
    for i in range(60):  # bounded: an uppercase field name is malformed (RFC 9113 §8.2.1)
        attacker.request(f"/bad{i}", extra=[(b"X-Upper", b"1")])
        with contextlib.suppress(OSError):
            attacker.flush()
    assert attacker.pump(lambda: attacker.goaway is not None)
    assert attacker.goaway is not None and attacker.goaway.error_code == 11
    attacker.close()
    assert not any(s.path.startswith("/bad") for b in backends for s in b.seen)
    r = curl("--http2-prior-knowledge", proxy.url + "/other")
    assert r.stdout.endswith("GET /other")
    under = Client(proxy.port)  # below the cap, malformed requests are only refused
    settled(under)
    bad = [under.request(f"/bad{i}", extra=[(b"X-Upper", b"1")]) for i in range(5)]
    good = under.request("/good")
    assert under.pump(lambda: good in under.ended and set(bad) <= set(under.resets))
    assert under.goaway is None
    under.close()


def test_stream_limit_idle_goaway_and_settings(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(
        backends, server=H2C, http2={"max_concurrent_streams": 7, "idle_timeout": 0.5}
    )
    client = Client(proxy.port)
    assert client.pump(
        lambda: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in client.events)
    )
    assert client.conn.remote_settings.max_concurrent_streams == 7
    sid = client.request("/x")
    assert client.pump(lambda: sid in client.ended)
    assert client.pump(lambda: client.goaway is not None, timeout=5)  # idle: GOAWAY
    assert client.goaway is not None and client.goaway.error_code == 0
    client.close()


def test_graceful_stop_lets_streams_finish(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, server=H2C)
    client = Client(proxy.port)
    sid = client.request("/slow?s=1")
    assert wait_for(lambda: any(b.seen for b in backends))
    assert proxy.worker is not None
    proxy.loop.call_soon_threadsafe(proxy.worker.request_stop)
    assert client.pump(lambda: sid in client.ended and client.goaway is not None, timeout=10)
    assert client.heads[sid][b":status"] == b"200"
    assert bytes(client.bodies[sid]).endswith(b"GET /slow?s=1")
    client.close()


def settled(client: Client) -> None:
    """Wait for PIBL's SETTINGS (they apply once acknowledged; pump sends the ACK)."""
    assert client.pump(
        lambda: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in client.events)
    )


def refused(proxy: ProxyThread, reason: str) -> float:
    assert proxy.worker is not None
    value: float = proxy.worker.proxy.metrics.h2_refused.labels(reason)._value.get()
    return value


def test_streams_beyond_the_limit_are_refused_and_the_connection_goes_on(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, server=H2C, http2={"max_concurrent_streams": 3})
    client = Client(proxy.port)
    settled(client)
    assert client.conn.remote_settings.max_concurrent_streams == 3
    # the client's own library would not open more: lift its copy of the limit
    client.conn.remote_settings.max_concurrent_streams = 100
    client.conn.remote_settings.acknowledge()
    conn = client.conn
    first = [client.request(f"/slow?s=0.5&n={i}") for i in range(3)]
    # two more while three are open, in the same write: each adds a field to the HPACK
    # dynamic table, which a later request refers to by index
    over = []
    for i in range(2):
        sid = conn.get_next_available_stream_id()
        fields = [*BASE[:2], (b":path", f"/over{i}".encode()), BASE[3], (b"x-token", b"t%d" % i)]
        conn.send_headers(sid, fields, end_stream=i == 0)
        over.append(sid)
    client.flush()
    assert client.pump(lambda: all(s in client.ended for s in first) and len(client.resets) == 2)
    assert client.resets == dict.fromkeys(over, 7)  # REFUSED_STREAM: the client may retry
    for i, sid in enumerate(first):
        assert client.heads[sid][b":status"] == b"200"
        assert bytes(client.bodies[sid]).endswith(f"GET /slow?s=0.5&n={i}".encode())
    # the connection goes on; the refused blocks were decoded (HPACK state in step)
    after = client.request("/after", extra=[(b"x-token", b"t1")])
    assert client.pump(lambda: after in client.ended)
    assert client.heads[after][b":status"] == b"200"
    assert client.goaway is None
    seen = [s for b in backends for s in b.seen]
    assert sorted(s.path for s in seen) == ["/after", *(f"/slow?s=0.5&n={i}" for i in range(3))]
    assert (
        dict((k.lower(), v) for k, v in seen_by_path(backends, "/after").headers)["x-token"] == "t1"
    )
    client.close()
    assert refused(proxy, "concurrency") == 2


def seen_by_path(backends: list[Backend], path: str) -> Any:
    return next(s for b in backends for s in b.seen if s.path == path)


def test_a_header_list_beyond_the_limit_gets_431_on_its_stream(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, server=H2C, http2={"max_header_list_size": 4096})
    client = Client(proxy.port)
    settled(client)
    slow = client.request("/slow?s=0.5")
    big = client.request("/big", extra=[(b"x-big", b"v" * 8000)])
    # with a body still to come: answered, then RST_STREAM NO_ERROR stops the upload
    upload = client.request(
        "/big-upload", method=b"POST", extra=[(b"x-big", b"v" * 8000)], end_stream=False
    )
    assert client.pump(lambda: {slow, big, upload} <= client.ended and upload in client.resets)
    for sid in (big, upload):
        assert client.heads[sid][b":status"] == b"431"
        assert bytes(client.bodies[sid]).startswith(b"431 Request Header Fields Too Large")
    assert client.resets[upload] == 0  # NO_ERROR
    assert big not in client.resets
    assert client.heads[slow][b":status"] == b"200"  # the other stream was not disturbed
    nxt = client.request("/next")
    assert client.pump(lambda: nxt in client.ended)
    assert client.heads[nxt][b":status"] == b"200"
    assert client.goaway is None
    client.close()
    assert sorted(s.path for b in backends for s in b.seen) == ["/next", "/slow?s=0.5"]
    assert sum('"-" 431' in line for line in proxy.log_lines()) == 2
    assert refused(proxy, "header_list") == 2
    # far beyond the limit (4 x max_header_list_size), decoding stops: the connection ends
    greedy = Client(proxy.port)
    settled(greedy)
    greedy.request("/huge", extra=[(b"x-big", b"v" * 20000)])
    assert greedy.pump(lambda: greedy.goaway is not None)
    assert greedy.goaway is not None and greedy.goaway.error_code == 11  # ENHANCE_YOUR_CALM
    greedy.close()
    r = curl("--http2-prior-knowledge", proxy.url + "/later")
    assert r.stdout.endswith("GET /later")


def test_more_header_fields_than_max_headers_get_431_on_their_stream(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, server=H2C, limits={"max_headers": 20})
    client = Client(proxy.port)
    settled(client)
    many = client.request("/many", extra=[(b"x-h%d" % i, b"v") for i in range(30)])
    crumbs = client.request("/crumbs", extra=[(b"cookie", b"c%d=1" % i) for i in range(60)])
    assert client.pump(lambda: {many, crumbs} <= client.ended)
    assert client.heads[many][b":status"] == b"431"
    assert client.heads[crumbs][b":status"] == b"200"  # the crumbs are one Cookie field
    assert client.goaway is None
    client.close()
    assert sorted(s.path for b in backends for s in b.seen) == ["/crumbs"]


def header_block_start(sid: int = 1) -> bytes:
    """A HEADERS frame of a valid request without END_HEADERS: a block left open."""
    frame = HeadersFrame(sid)
    frame.data = hpack.Encoder().encode(BASE)
    frame.flags.add("END_STREAM")
    return bytes(frame.serialize())


def continuation(data: bytes, sid: int = 1) -> bytes:
    frame = ContinuationFrame(sid)
    frame.data = data
    return bytes(frame.serialize())


def test_continuation_floods_end_the_connection_within_bounds(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    limit = 8192  # max_header_list_size: a header block may gather 4 x 8192 bytes
    proxy = make_proxy(
        backends, server=H2C, http2={"max_header_list_size": limit, "max_frame_size": 1 << 20}
    )
    # bytes: a block just under the bound is held, the next fragment ends the connection
    client = Client(proxy.port)
    settled(client)
    start = header_block_start()
    client.sock.sendall(start + continuation(b"\x00" * (4 * limit - (len(start) - 9))))
    assert client.pump(lambda: client.goaway is not None, timeout=0.5) is False
    client.sock.sendall(continuation(b"\x00"))
    assert client.pump(lambda: client.goaway is not None)
    assert client.goaway is not None and client.goaway.error_code == 11  # ENHANCE_YOUR_CALM
    client.close()
    # frames: 31 empty CONTINUATION frames are held, the 32nd without END_HEADERS is not
    client = Client(proxy.port)
    settled(client)
    client.sock.sendall(header_block_start() + continuation(b"") * 31)
    assert client.pump(lambda: client.goaway is not None, timeout=0.5) is False
    client.sock.sendall(continuation(b""))
    assert client.pump(lambda: client.goaway is not None)
    assert client.goaway is not None and client.goaway.error_code == 11
    client.close()
    # a flood of large frames (64 x 1 MiB offered; the library alone would gather it all)
    # while another client is served
    attacker = Client(proxy.port)
    settled(attacker)
    with contextlib.suppress(OSError):
        attacker.sock.sendall(header_block_start())
        for _ in range(64):
            attacker.sock.sendall(continuation(b"\x00" * (1 << 20)))
            r = curl("--http2-prior-knowledge", proxy.url + "/meanwhile", timeout=5)
            assert r.stdout.endswith("GET /meanwhile")
    assert attacker.pump(lambda: attacker.goaway is not None)
    assert attacker.goaway is not None and attacker.goaway.error_code == 11
    attacker.close()
    assert not any(s.path == "/" for b in backends for s in b.seen)
    assert proxy.worker is not None
    goaways = proxy.worker.proxy.metrics.h2_goaways.labels("header_block")._value.get()
    assert goaways == 3


def test_ping_on_a_silent_connection_and_its_timeout(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, server=H2C, http2={"ping_interval": 0.3, "ping_timeout": 0.3})
    client = Client(proxy.port)
    sid = client.request("/slow?s=1.2")
    # a client that answers PINGs (the library does) keeps its connection and gets its answer
    assert client.pump(lambda: sid in client.ended, timeout=10)
    assert any(isinstance(e, h2.events.PingReceived) for e in client.events)
    assert client.heads[sid][b":status"] == b"200"
    client.close()
    # one that reads nothing (so answers no PING) is closed after ping_timeout
    silent = Client(proxy.port)
    sid = silent.request("/slow?s=3")
    time.sleep(1.5)
    assert silent.pump(lambda: False, timeout=3) is False
    assert sid not in silent.ended
    assert wait_for(lambda: proxy.worker is not None and not proxy.worker.proxy.connections)
    silent.close()


def test_head_204_and_100_continue_over_http2(h2c: ProxyThread, backends: list[Backend]) -> None:
    r = curl("--http2-prior-knowledge", "-I", h2c.url + "/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("HTTP/2 200")
    r = curl("--http2-prior-knowledge", "-D", "-", h2c.url + "/status?code=204")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("HTTP/2 204")
    client = Client(h2c.port)
    extra = [(b"content-length", b"5"), (b"expect", b"100-continue")]
    sid = client.request("/cont", method=b"POST", extra=extra, end_stream=False)
    assert client.pump(
        lambda: any(isinstance(e, h2.events.InformationalResponseReceived) for e in client.events)
    )
    client.conn.send_data(sid, b"hello", end_stream=True)
    client.flush()
    assert client.pump(lambda: sid in client.ended)
    assert client.heads[sid][b":status"] == b"200"
    assert bytes(client.bodies[sid]).endswith(b"POST /cont body=hello")
    client.close()
