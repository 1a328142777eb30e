"""TLS through the whole proxy: HTTPS towards clients, HTTPS (and mutual TLS) towards backends.

Certificates come from ``trustme`` (one trusted CA, one untrusted CA) and, for the last test,
from ``pibl.certs``. The TLS backends are ``http.server`` servers whose accepted sockets are
wrapped in the handler thread, so they can count TCP connections and completed handshakes
separately and record the client certificate PIBL presented.
"""

from __future__ import annotations

import contextlib
import http.server
import shutil
import socket
import ssl
import subprocess
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from pibl.certs import create_dev_ca_and_cert
from tests.support import Backend, ProxyThread, free_port, sized_body, wait_for

TIMEOUT = 5.0
HSTS_AGE = 31536000


# ------------------------------------------------------------------------ certificates


@dataclass(frozen=True)
class Pair:
    cert: Path  # chain, leaf first
    key: Path


@dataclass(frozen=True)
class PKI:
    ca_pem: Path  # the trusted CA
    server: Pair  # localhost, 127.0.0.1
    sni: Pair  # a.test, b.test
    client: Pair  # client certificate for mutual TLS
    wrong_name: Pair  # other.test only, from the trusted CA
    untrusted: Pair  # localhost, 127.0.0.1 from another CA


def _write_pair(directory: Path, name: str, leaf: trustme.LeafCert) -> Pair:
    cert = directory / f"{name}.pem"
    key = directory / f"{name}-key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return Pair(cert, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("tls-proxy-pki")
    ca = trustme.CA(organization_name="PIBL test CA")
    other_ca = trustme.CA(organization_name="Someone else's CA")
    ca_pem = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    sni_leaf = ca.issue_cert("a.test", "b.test")
    client_leaf = ca.issue_cert("client.pibl.test", common_name="pibl upstream client")
    wrong_leaf = ca.issue_cert("other.test")
    untrusted_leaf = other_ca.issue_cert("localhost", "127.0.0.1")
    return PKI(
        ca_pem=ca_pem,
        server=_write_pair(directory, "server", ca.issue_cert("localhost", "127.0.0.1")),
        sni=_write_pair(directory, "sni", sni_leaf),
        client=_write_pair(directory, "client", client_leaf),
        wrong_name=_write_pair(directory, "wrong-name", wrong_leaf),
        untrusted=_write_pair(directory, "untrusted", untrusted_leaf),
    )


def trusting(ca_pem: Path) -> ssl.SSLContext:
    """What a client that trusts only our CA uses (host names checked)."""
    return ssl.create_default_context(cafile=str(ca_pem))


def tls_section(pki: PKI, **extra: Any) -> dict[str, Any]:
    return {"port": free_port(), "cert": str(pki.server.cert), "key": str(pki.server.key), **extra}


def https_url(proxy: ProxyThread, host: str = "127.0.0.1") -> str:
    assert proxy.config.tls is not None
    return f"https://{host}:{proxy.config.tls.port}"


def seen_headers(backend: Backend) -> dict[str, str]:
    return {k.lower(): v for k, v in backend.seen[-1].headers}


# ------------------------------------------------------------------------ TLS backend


@dataclass
class TLSRequest:
    method: str
    path: str
    headers: dict[str, str]
    peer_cert: dict[str, Any] | None
    version: str | None
    alpn: str | None


class _TLSServer(http.server.ThreadingHTTPServer):
    """Plain TCP accept; the TLS handshake happens in the connection's own thread."""

    daemon_threads = True
    ctx: ssl.SSLContext
    state: TLSBackend

    def finish_request(self, request: Any, client_address: Any) -> None:
        state = self.state
        with state.lock:
            state.accepted += 1
        request.settimeout(TIMEOUT)
        try:
            conn = self.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            with state.lock:
                state.handshake_errors.append(exc)
            return
        with state.lock:
            state.handshakes += 1
            state.sockets.append(conn)
        handler: Any = self.RequestHandlerClass
        try:
            handler(conn, client_address, self)
        except (ssl.SSLError, OSError):
            pass  # the peer went away mid-request
        finally:
            with contextlib.suppress(OSError):
                conn.close()


class _TLSHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TLSServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        state = self.server.state
        conn = self.connection
        assert isinstance(conn, ssl.SSLSocket)
        state.requests.append(
            TLSRequest(
                self.command,
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                conn.getpeercert() or None,
                conn.version(),
                conn.selected_alpn_protocol(),
            )
        )
        body = f"{state.name} {self.command} {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@dataclass
class TLSBackend:
    name: str
    server: _TLSServer
    accepted: int = 0  # TCP connections
    handshakes: int = 0  # completed TLS handshakes
    handshake_errors: list[Exception] = field(default_factory=list)
    requests: list[TLSRequest] = field(default_factory=list)
    sockets: list[ssl.SSLSocket] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def url(self, host: str = "localhost") -> str:
        return f"https://{host}:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def start_tls_backend(name: str, pair: Pair, *, client_ca: Path | None = None) -> TLSBackend:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pair.cert, pair.key)
    ctx.set_alpn_protocols(["http/1.1"])
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(client_ca))
    server = _TLSServer(("127.0.0.1", 0), _TLSHandler)
    backend = TLSBackend(name, server)
    server.ctx = ctx
    server.state = backend
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    return backend


@pytest.fixture
def tls_backends() -> Iterator[Callable[..., TLSBackend]]:
    started: list[TLSBackend] = []

    def factory(name: str, pair: Pair, *, client_ca: Path | None = None) -> TLSBackend:
        backend = start_tls_backend(name, pair, client_ca=client_ca)
        started.append(backend)
        return backend

    yield factory
    for backend in started:
        backend.stop()


def get_through(proxy: ProxyThread, path: str, count: int = 1) -> list[httpx.Response]:
    with httpx.Client(base_url=proxy.url, timeout=TIMEOUT) as client:
        return [client.get(path) for _ in range(count)]


# ------------------------------------------------------------------------ raw TLS clients


@dataclass
class Handshake:
    version: str | None
    alpn: str | None
    san: tuple[tuple[str, str], ...]
    response: bytes


def tls_handshake(
    port: int,
    ctx: ssl.SSLContext,
    server_hostname: str | None,
    *,
    request: bytes | None = None,
) -> Handshake:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        cert = tls.getpeercert()
        san = tuple((str(e[0]), str(e[1])) for e in cert.get("subjectAltName", ())) if cert else ()
        response = b""
        if request is not None:
            tls.sendall(request)
            chunks = []
            while chunk := tls.recv(65536):
                chunks.append(chunk)
            response = b"".join(chunks)
        return Handshake(tls.version(), tls.selected_alpn_protocol(), san, response)


def old_protocol_client(ca_pem: Path) -> ssl.SSLContext:
    """A client that offers TLS 1.0 and 1.1 only, and really does (security level 0)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca_pem))
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    return ctx


def old_protocol_server_accepts(pki: PKI, client: ssl.SSLContext) -> str | None:
    """Control: the TLS version ``client`` gets from a server that still allows TLS 1.0/1.1.

    None when the local OpenSSL cannot speak those versions at all.
    """
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1
    server_ctx.load_cert_chain(pki.server.cert, pki.server.key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]

        def serve() -> None:
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                conn.settimeout(TIMEOUT)
                with contextlib.suppress(OSError), server_ctx.wrap_socket(conn, server_side=True):
                    pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            return tls_handshake(port, client, "localhost").version
        except (ssl.SSLError, OSError):
            return None
        finally:
            thread.join(TIMEOUT)


# ------------------------------------------------------------------------ HTTPS towards clients


def test_https_client_to_plain_backends(
    pki: PKI, backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, tls=tls_section(pki))
    with httpx.Client(verify=trusting(pki.ca_pem), timeout=TIMEOUT) as client:
        r = client.get(f"{https_url(proxy)}/secure?x=1", headers={"X-Forwarded-Proto": "http"})
        r2 = client.get(f"{https_url(proxy, 'localhost')}/by-name")
    assert r.status_code == 200
    assert r.text == "b1 GET /secure?x=1"
    assert r.extensions["http_version"] == b"HTTP/1.1"
    assert "strict-transport-security" not in r.headers  # hsts = 0: not sent
    headers = seen_headers(backends[0])
    assert headers["x-forwarded-proto"] == "https"  # the client's own value is replaced
    assert headers["x-forwarded-host"] == f"127.0.0.1:{proxy.config.tls.port}"  # type: ignore[union-attr]
    assert (r2.status_code, r2.text) == (200, "b2 GET /by-name")
    assert seen_headers(backends[1])["x-forwarded-proto"] == "https"
    # the plain listener still answers, and says so
    plain = get_through(proxy, "/plain")[0]
    assert (plain.status_code, plain.text) == (200, "b3 GET /plain")
    assert seen_headers(backends[2])["x-forwarded-proto"] == "http"


def test_https_client_must_trust_the_ca(
    pki: PKI, backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, tls=tls_section(pki))
    other_ca = trustme.CA()
    stranger = ssl.create_default_context()
    other_ca.configure_trust(stranger)
    with (
        httpx.Client(verify=stranger, timeout=TIMEOUT) as client,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        client.get(f"{https_url(proxy)}/nope")
    assert all(not b.seen for b in backends)


# ------------------------------------------------------------------------ HTTPS towards backends


def test_https_backend_and_pooled_tls_connections(
    pki: PKI, tls_backends: Callable[..., TLSBackend], make_proxy: Callable[..., ProxyThread]
) -> None:
    backend = tls_backends("tls1", pki.server)
    proxy = make_proxy([{"url": backend.url("localhost"), "ca_file": str(pki.ca_pem)}])
    responses = get_through(proxy, "/pooled", count=20)
    assert [r.status_code for r in responses] == [200] * 20
    assert responses[0].text == "tls1 GET /pooled"
    assert len(backend.requests) == 20
    first = backend.requests[0]
    assert first.version in ("TLSv1.2", "TLSv1.3")
    assert first.alpn == "http/1.1"
    assert first.headers["host"] == f"127.0.0.1:{proxy.port}"
    assert first.headers["x-forwarded-proto"] == "http"
    # upstream keep-alive: the TLS connection is reused, not one handshake per request
    assert 1 <= backend.accepted <= 2, backend.accepted
    assert backend.handshakes == backend.accepted
    assert backend.handshake_errors == []


BAD_BACKEND_CERTS = {
    # case -> (certificate the backend serves, host in the backend URL)
    "untrusted-ca": ("untrusted", "localhost"),
    "wrong-name": ("wrong_name", "127.0.0.1"),
}


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("case", sorted(BAD_BACKEND_CERTS))
def test_bad_backend_certificate_refused_unless_verify_off(
    pki: PKI,
    tls_backends: Callable[..., TLSBackend],
    make_proxy: Callable[..., ProxyThread],
    case: str,
    verify: bool,
) -> None:
    pair_name, host = BAD_BACKEND_CERTS[case]
    backend = tls_backends(case, getattr(pki, pair_name))
    entry = {"url": backend.url(host), "ca_file": str(pki.ca_pem), "tls_verify": verify}
    proxy = make_proxy([entry])
    r = get_through(proxy, f"/{case}")[0]
    if verify:
        # The request never reaches the backend and the client gets a gateway error.
        # (Exactly which one is checked by test_bad_backend_certificate_is_502.)
        assert r.status_code in (502, 503), r.text
        assert wait_for(lambda: backend.handshake_errors), "PIBL never tried the handshake"
        assert backend.handshakes == 0
        assert backend.requests == []
    else:
        assert (r.status_code, r.text) == (200, f"{case} GET /{case}")
        assert backend.handshakes == 1


@pytest.mark.parametrize("case", sorted(BAD_BACKEND_CERTS))
def test_bad_backend_certificate_is_502(
    pki: PKI,
    tls_backends: Callable[..., TLSBackend],
    make_proxy: Callable[..., ProxyThread],
    case: str,
) -> None:
    pair_name, host = BAD_BACKEND_CERTS[case]
    backend = tls_backends(case, getattr(pki, pair_name))
    proxy = make_proxy([{"url": backend.url(host), "ca_file": str(pki.ca_pem)}])
    r = get_through(proxy, f"/{case}")[0]
    assert r.status_code == 502, r.text
    assert "certificate" in proxy.log_lines()[-1].lower()


def test_backend_certificate_name_checked_against_url_host(
    pki: PKI, tls_backends: Callable[..., TLSBackend], make_proxy: Callable[..., ProxyThread]
) -> None:
    """Control for the test above: same CA, the name matches, so verification passes."""
    backend = tls_backends("named", pki.server)
    proxy = make_proxy([{"url": backend.url("127.0.0.1"), "ca_file": str(pki.ca_pem)}])
    r = get_through(proxy, "/right-name")[0]
    assert (r.status_code, r.text) == (200, "named GET /right-name")


@pytest.mark.parametrize("with_cert", [True, False], ids=["client-cert", "no-client-cert"])
def test_mutual_tls_backend(
    pki: PKI,
    tls_backends: Callable[..., TLSBackend],
    make_proxy: Callable[..., ProxyThread],
    with_cert: bool,
) -> None:
    backend = tls_backends("mtls", pki.server, client_ca=pki.ca_pem)
    entry: dict[str, Any] = {"url": backend.url("localhost"), "ca_file": str(pki.ca_pem)}
    if with_cert:
        entry |= {"client_cert": str(pki.client.cert), "client_key": str(pki.client.key)}
    proxy = make_proxy([entry])
    r = get_through(proxy, "/mtls")[0]
    if with_cert:
        assert (r.status_code, r.text) == (200, "mtls GET /mtls")
        peer = backend.requests[0].peer_cert
        assert peer is not None
        assert (("commonName", "pibl upstream client"),) in peer["subject"]
        assert ("DNS", "client.pibl.test") in peer["subjectAltName"]
    else:
        assert r.status_code == 502, r.text
        assert backend.requests == []
        # the backend refused the certificate-less client
        assert wait_for(lambda: backend.handshake_errors)
        assert "CERTIFICATE" in str(backend.handshake_errors[0]).upper()


# ------------------------------------------------------------------------ listener properties


def test_sni_selects_certificate(
    pki: PKI, backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    extra = {
        "certificates": [{"cert": str(pki.sni.cert), "key": str(pki.sni.key), "names": ["a.test"]}]
    }
    proxy = make_proxy(backends, tls=tls_section(pki, **extra))
    port = proxy.config.tls.port  # type: ignore[union-attr]
    a = tls_handshake(port, trusting(pki.ca_pem), "a.test")
    assert ("DNS", "a.test") in a.san and ("DNS", "b.test") in a.san
    default = tls_handshake(port, trusting(pki.ca_pem), "localhost")
    assert ("DNS", "localhost") in default.san and ("IP Address", "127.0.0.1") in default.san
    assert ("DNS", "a.test") not in default.san
    # only configured names select a pair: b.test is on the certificate, not in `names`
    lax = trusting(pki.ca_pem)
    lax.check_hostname = False
    b = tls_handshake(port, lax, "b.test")
    assert b.san == default.san
    no_sni = tls_handshake(port, lax, None)
    assert no_sni.san == default.san
    # and the request behind the SNI handshake is proxied normally
    request = b"GET /sni HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
    served = tls_handshake(port, trusting(pki.ca_pem), "a.test", request=request)
    assert served.response.startswith(b"HTTP/1.1 200 ")
    assert served.response.endswith(b"GET /sni")
    assert seen_headers(backends[0])["host"] == "a.test"


def test_old_tls_versions_refused(
    pki: PKI, backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    old = old_protocol_client(pki.ca_pem)
    control = old_protocol_server_accepts(pki, old)
    if control is None:
        pytest.skip("this OpenSSL cannot negotiate TLS 1.0/1.1 even at security level 0")
    assert control in ("TLSv1", "TLSv1.1")
    proxy = make_proxy(backends, tls=tls_section(pki))
    port = proxy.config.tls.port  # type: ignore[union-attr]
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_handshake(port, old, "localhost")
    assert all(not b.seen for b in backends)


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_modern_tls_versions_and_alpn(
    pki: PKI, backends: list[Backend], make_proxy: Callable[..., ProxyThread], version: str
) -> None:
    # HTTP/1.1 only on the listener ([tls] alpn): h2 is never selected (HTTP/2 clients are
    # tested in test_http2.py)
    proxy = make_proxy(backends, tls={**tls_section(pki), "alpn": ["http/1.1"]})
    ctx = trusting(pki.ca_pem)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion[version]
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    request = b"GET /v HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    result = tls_handshake(proxy.config.tls.port, ctx, "localhost", request=request)  # type: ignore[union-attr]
    assert result.version == version.replace("_", ".")
    assert result.alpn == "http/1.1"  # never h2 when the listener offers HTTP/1.1 only
    assert result.response.startswith(b"HTTP/1.1 200 ")
    assert result.response.endswith(b"b1 GET /v")


def test_redirect_http_to_https_with_hsts(
    pki: PKI, backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, tls=tls_section(pki, redirect_http=True, hsts=HSTS_AGE))
    tls_port = proxy.config.tls.port  # type: ignore[union-attr]
    with httpx.Client(timeout=TIMEOUT) as client:
        r = client.get(f"{proxy.url}/some/path?q=1")
        head = client.head(f"{proxy.url}/h")
    assert r.status_code == 308
    assert r.headers["location"] == f"https://127.0.0.1:{tls_port}/some/path?q=1"
    assert "strict-transport-security" not in r.headers  # never over plain HTTP
    assert head.status_code == 308
    assert head.headers["location"] == f"https://127.0.0.1:{tls_port}/h"
    assert all(not b.seen for b in backends)  # answered by PIBL itself
    with httpx.Client(
        verify=trusting(pki.ca_pem), timeout=TIMEOUT, follow_redirects=True
    ) as client:
        followed = client.get(f"{proxy.url}/some/path?q=1")
    assert (followed.status_code, followed.text) == (200, "b1 GET /some/path?q=1")
    assert str(followed.url) == f"https://127.0.0.1:{tls_port}/some/path?q=1"
    assert followed.headers["strict-transport-security"] == f"max-age={HSTS_AGE}"
    assert seen_headers(backends[0])["x-forwarded-proto"] == "https"


def test_hsts_only_on_https(
    pki: PKI, backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, tls=tls_section(pki, hsts=HSTS_AGE))
    with httpx.Client(verify=trusting(pki.ca_pem), timeout=TIMEOUT) as client:
        secure = client.get(f"{https_url(proxy)}/s")
        plain = client.get(f"{proxy.url}/p")
    assert (secure.status_code, secure.text) == (200, "b1 GET /s")
    assert secure.headers["strict-transport-security"] == f"max-age={HSTS_AGE}"
    assert (plain.status_code, plain.text) == (200, "b2 GET /p")  # no redirect configured
    assert "strict-transport-security" not in plain.headers


# ------------------------------------------------------------------------ pibl cert


def test_dev_certificates_from_pibl_cert(
    tmp_path: Path, backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    paths = create_dev_ca_and_cert(tmp_path / "certs")
    tls = {"port": free_port(), "cert": str(paths["cert"]), "key": str(paths["key"])}
    proxy = make_proxy(backends, tls=tls)
    with httpx.Client(verify=trusting(paths["ca"]), timeout=TIMEOUT) as client:
        by_ip = client.get(f"{https_url(proxy)}/dev")
        by_name = client.get(f"{https_url(proxy, 'localhost')}/dev")
    assert (by_ip.status_code, by_ip.text) == (200, "b1 GET /dev")
    assert (by_name.status_code, by_name.text) == (200, "b2 GET /dev")
    with httpx.Client(timeout=TIMEOUT) as client, pytest.raises(httpx.ConnectError):
        client.get(f"{https_url(proxy)}/system-store")  # the dev CA is not in the system store
    curl = shutil.which("curl")
    if curl is None:
        return
    url = f"{https_url(proxy, 'localhost')}/curl"
    ok = subprocess.run(
        [curl, "-sS", "--max-time", "5", "--cacert", str(paths["ca"]), url],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "b3 GET /curl"
    refused = subprocess.run(
        [curl, "-sS", "--max-time", "5", url], capture_output=True, text=True, timeout=10
    )
    assert refused.returncode == 60, refused.stderr  # peer certificate cannot be authenticated


# ------------------------------------------------------------------ large cache hits


def _slow_get(sock: socket.socket, path: str, pause_every: int = 1 << 20) -> tuple[bytes, bytes]:
    """GET ``path`` and read the answer slowly (a pause per MiB): head, body."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    data = bytearray()
    since_pause = 0
    while chunk := sock.recv(65536):
        data += chunk
        since_pause += len(chunk)
        if since_pause >= pause_every:
            since_pause = 0
            threading.Event().wait(0.05)
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_large_hits_reach_a_slow_reader_whole(
    pki: PKI,
    backends: list[Backend],
    make_proxy: Callable[..., ProxyThread],
    tmp_path: Path,
    scheme: str,
) -> None:
    """A 6 MiB entry: sendfile driven by writability (plain), pieces with flow control (TLS)."""
    size = 6 * 1024 * 1024
    proxy = make_proxy(
        backends[:1],
        tls=tls_section(pki),
        cache={"dir": str(tmp_path / "cache"), "ttl": 60},
    )
    path = f"/download?size={size}"
    expected = sized_body(size)
    port = proxy.port if scheme == "http" else proxy.config.tls.port  # type: ignore[union-attr]

    def connect() -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        if scheme == "https":
            return trusting(pki.ca_pem).wrap_socket(raw, server_hostname="localhost")
        return raw

    statuses = []
    for _ in range(4):  # a miss, then hits once it is stored
        with connect() as sock:
            head, body = _slow_get(sock, path)
        status = head.lower().split(b"cache-status: ", 1)[-1].split(b"\r\n", 1)[0]
        statuses.append(status)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert body == expected
        threading.Event().wait(0.2)  # the entry is committed just after the miss's response
    assert statuses[-1].startswith(b"pibl; hit"), statuses
    assert len(backends[0].seen) < 4


def test_a_client_leaving_mid_hit_is_logged_with_what_went(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread], tmp_path: Path
) -> None:
    size = 8 * 1024 * 1024
    proxy = make_proxy(backends[:1], cache={"dir": str(tmp_path / "cache"), "ttl": 60})
    path = f"/download?size={size}"
    assert len(httpx.get(proxy.url + path, timeout=TIMEOUT).content) == size
    assert wait_for(
        lambda: (
            httpx.get(proxy.url + path, timeout=TIMEOUT)
            .headers["cache-status"]
            .startswith("pibl; hit")
        ),
        5,
    )
    with socket.socket() as sock:
        # a small receive window set before connecting, so the body cannot all fit in
        # the kernel's buffers before the client goes away
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", proxy.port))
        # the Host the hits above were stored under (it is part of the cache key)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    # PIBL keeps serving, and logged the cut hit with fewer bytes than the body
    assert httpx.get(proxy.url + path, timeout=TIMEOUT).content == sized_body(size)

    def cut_short() -> bool:
        # the hit the client left: what went (the body bytes the kernel took, possibly none
        # yet), and why it stopped
        return any(
            "cache=HIT" in line
            and 'detail="client closed the connection"' in line
            and int(line.split('" ', 1)[1].split()[1]) < size
            for line in proxy.log_lines()
        )

    assert wait_for(cut_short, 5), proxy.log_lines()
    assert proxy.record_loop_errors() == []
