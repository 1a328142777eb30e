"""TLS contexts over real loopback sockets: an asyncio echo server, blocking clients in threads.

Clients are blocking ``ssl`` sockets run with ``asyncio.to_thread`` so that they can pass a
saved session, force protocol versions and inspect the peer certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from pibl import certs
from pibl.tls import (
    CertPair,
    ReloadableServerContext,
    TLSConfigError,
    client_context,
    server_context,
)

TIMEOUT = 5.0


@dataclass
class EchoServer:
    port: int
    seen: list[tuple[str | None, str | None]] = field(default_factory=list)  # (version, alpn)


@contextlib.asynccontextmanager
async def echo_server(ctx: ssl.SSLContext) -> AsyncIterator[EchoServer]:
    tasks: set[asyncio.Task[None]] = set()
    state = EchoServer(port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        obj = writer.get_extra_info("ssl_object")
        state.seen.append((obj.version(), obj.selected_alpn_protocol()))
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:  # ssl.SSLError, resets: the client went away
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            tasks.discard(task)

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Result:
    version: str | None
    alpn: str | None
    peer_der: bytes | None
    session: ssl.SSLSession | None
    session_reused: bool
    echoed: bytes


def connect(
    port: int,
    ctx: ssl.SSLContext,
    server_hostname: str | None = "localhost",
    session: ssl.SSLSession | None = None,
) -> Result:
    """Blocking: handshake, one echo round trip (which also delivers TLS 1.3 tickets).

    Raises ``ssl.SSLError`` for a failed handshake and ``ConnectionError`` when the server
    closes without echoing (asyncio closes a refused TLS 1.3 connection without an alert).
    """
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname, session=session) as tls,
    ):
        version, alpn = tls.version(), tls.selected_alpn_protocol()
        peer_der = tls.getpeercert(binary_form=True)
        tls.sendall(b"ping")
        echoed = b""
        while len(echoed) < 4:
            chunk = tls.recv(4 - len(echoed))
            if not chunk:
                raise ConnectionResetError(f"closed after {echoed!r} instead of an echo")
            echoed += chunk
        return Result(version, alpn, peer_der, tls.session, bool(tls.session_reused), echoed)


async def aconnect(
    port: int,
    ctx: ssl.SSLContext,
    server_hostname: str | None = "localhost",
    session: ssl.SSLSession | None = None,
) -> Result:
    return await asyncio.to_thread(connect, port, ctx, server_hostname, session)


def der(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


def write_pair(
    directory: Path, leaf: trustme.LeafCert, stem: str, names: tuple[str, ...] = ()
) -> CertPair:
    cert, key = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    return CertPair(cert, key, names)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def localhost(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("localhost", "127.0.0.1")


@pytest.fixture
def pair(tmp_path: Path, localhost: trustme.LeafCert) -> CertPair:
    return write_pair(tmp_path, localhost, "localhost")


# ------------------------------------------------------------------------- basic handshake


async def test_tls13_and_alpn_http11(pair: CertPair, ca_file: Path) -> None:
    async with echo_server(server_context([pair])) as server:
        result = await aconnect(server.port, client_context(ca_file=ca_file))
    assert result.echoed == b"ping"
    assert result.version == "TLSv1.3"
    assert result.alpn == "http/1.1"
    assert server.seen == [("TLSv1.3", "http/1.1")]


async def test_tls12_client_gets_a_modern_cipher(pair: CertPair, ca_file: Path) -> None:
    client = client_context(ca_file=ca_file)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    async with echo_server(server_context([pair])) as server:
        result = await aconnect(server.port, client)
    assert (result.version, result.alpn, result.echoed) == ("TLSv1.2", "http/1.1", b"ping")


async def test_tls11_client_is_refused(pair: CertPair, ca_file: Path) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(ca_file)
    # OpenSSL 3 offers TLS 1.0/1.1 only at security level 0; without it the client would give
    # up by itself ("no protocols available") and the test would prove nothing.
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    async with echo_server(server_context([pair])) as server:
        with pytest.raises(ssl.SSLError) as info:
            await aconnect(server.port, old)
    # refused by the server: its protocol_version alert, or a close (asyncio drops the alert)
    assert info.value.reason in {"TLSV1_ALERT_PROTOCOL_VERSION", "UNEXPECTED_EOF_WHILE_READING"}
    assert server.seen == []  # no connection got past the handshake


# ------------------------------------------------------------------------------------ SNI


async def test_sni_selects_certificate(
    tmp_path: Path, ca: trustme.CA, ca_file: Path, localhost: trustme.LeafCert
) -> None:
    leaf_a, leaf_b = ca.issue_cert("a.test"), ca.issue_cert("b.test")
    ctx = server_context(
        [
            write_pair(tmp_path, localhost, "default"),
            write_pair(tmp_path, leaf_a, "a", names=("a.test",)),
            write_pair(tmp_path, leaf_b, "b", names=("b.test",)),
        ]
    )
    client = client_context(ca_file=ca_file)
    lenient = client_context(ca_file=ca_file)
    lenient.check_hostname = False  # chain still verified; only the name is not
    async with echo_server(ctx) as server:
        a = await aconnect(server.port, client, server_hostname="a.test")
        b = await aconnect(server.port, client, server_hostname="b.test")
        unknown = await aconnect(server.port, lenient, server_hostname="c.test")
        no_sni = await aconnect(server.port, lenient, server_hostname=None)
    assert a.peer_der == der(leaf_a)
    assert b.peer_der == der(leaf_b)
    assert unknown.peer_der == der(localhost)
    assert no_sni.peer_der == der(localhost)
    # the swapped contexts keep ALPN and the protocol range
    assert {(r.version, r.alpn) for r in (a, b, unknown, no_sni)} == {("TLSv1.3", "http/1.1")}


async def test_two_pairs_first_is_default(tmp_path: Path, ca: trustme.CA, ca_file: Path) -> None:
    leaf_a, leaf_b = ca.issue_cert("a.test"), ca.issue_cert("b.test")
    ctx = server_context(
        [
            write_pair(tmp_path, leaf_a, "a", names=("a.test",)),
            write_pair(tmp_path, leaf_b, "b", names=("b.test",)),
        ]
    )
    lenient = client_context(ca_file=ca_file)
    lenient.check_hostname = False
    async with echo_server(ctx) as server:
        b = await aconnect(server.port, lenient, server_hostname="b.test")
        unknown = await aconnect(server.port, lenient, server_hostname="zzz.test")
    assert b.peer_der == der(leaf_b)
    assert unknown.peer_der == der(leaf_a)


# ---------------------------------------------------------------------- session resumption


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_session_resumption(pair: CertPair, ca_file: Path, version: ssl.TLSVersion) -> None:
    client = client_context(ca_file=ca_file)
    client.minimum_version = client.maximum_version = version
    async with echo_server(server_context([pair])) as server:
        first = await aconnect(server.port, client)
        assert not first.session_reused
        assert first.session is not None
        second = await aconnect(server.port, client, session=first.session)
    assert second.session_reused
    assert second.echoed == b"ping"


async def test_session_resumption_through_sni_and_reloadable(
    tmp_path: Path, ca: trustme.CA, ca_file: Path, pair: CertPair
) -> None:
    named = write_pair(tmp_path, ca.issue_cert("a.test"), "a", names=("a.test",))
    reloadable = ReloadableServerContext([pair, named])
    client = client_context(ca_file=ca_file)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    async with echo_server(reloadable.context) as server:
        for name in ("localhost", "a.test"):
            first = await aconnect(server.port, client, server_hostname=name)
            second = await aconnect(
                server.port, client, server_hostname=name, session=first.session
            )
            assert second.session_reused, name


# ------------------------------------------------------------------------------- backends


async def test_backend_with_wrong_name(ca: trustme.CA, ca_file: Path, tmp_path: Path) -> None:
    wrong = write_pair(tmp_path, ca.issue_cert("other.test"), "other")
    async with echo_server(server_context([wrong])) as server:
        with pytest.raises(ssl.SSLCertVerificationError, match=r"(?i)hostname mismatch"):
            await aconnect(server.port, client_context(ca_file=ca_file))
        relaxed = await aconnect(server.port, client_context(ca_file=ca_file, verify=False))
    assert relaxed.echoed == b"ping"


async def test_backend_with_unknown_ca(pair: CertPair, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    async with echo_server(server_context([pair])) as server:
        with pytest.raises(ssl.SSLCertVerificationError):
            await aconnect(server.port, client_context(ca_file=stranger))
        with pytest.raises(ssl.SSLCertVerificationError):  # system store: no test CA in it
            await aconnect(server.port, client_context(ca_file=None))


async def test_mutual_tls_towards_backend(
    pair: CertPair, ca: trustme.CA, ca_file: Path, tmp_path: Path
) -> None:
    backend = server_context([pair])
    backend.verify_mode = ssl.CERT_REQUIRED
    backend.load_verify_locations(ca_file)
    proxy_cert = write_pair(tmp_path, ca.issue_cert("pibl-proxy"), "proxy")
    with_cert = client_context(
        ca_file=ca_file, client_cert=proxy_cert.cert, client_key=proxy_cert.key
    )
    async with echo_server(backend) as server:
        accepted = await aconnect(server.port, with_cert)
        assert accepted.echoed == b"ping"
        # TLS 1.3: the client finishes its handshake first; the refusal arrives as an alert
        # (OpenSSL's "certificate required" alert, or a bare close: asyncio drops the alert)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await aconnect(server.port, client_context(ca_file=ca_file))
    assert len(server.seen) == 1  # only the connection with a certificate got through


async def test_mutual_tls_with_dev_certificates(tmp_path: Path) -> None:
    paths = certs.create_dev_ca_and_cert(tmp_path)
    backend = server_context([CertPair(paths["cert"], paths["key"])])
    backend.verify_mode = ssl.CERT_REQUIRED
    backend.load_verify_locations(paths["ca"])
    client = client_context(ca_file=paths["ca"], client_cert=paths["cert"], client_key=paths["key"])
    async with echo_server(backend) as server:
        for host in ("localhost", "127.0.0.1"):
            result = await aconnect(server.port, client, server_hostname=host)
            assert result.echoed == b"ping", host


# ------------------------------------------------------------------------------- reloading


async def test_reload_picks_up_new_files_and_keeps_old_on_error(
    tmp_path: Path, ca: trustme.CA, ca_file: Path
) -> None:
    old_leaf, new_leaf = ca.issue_cert("localhost"), ca.issue_cert("localhost")
    pair = write_pair(tmp_path, old_leaf, "live")
    reloadable = ReloadableServerContext([pair])
    client = client_context(ca_file=ca_file)
    async with echo_server(reloadable.context) as server:  # one listener throughout
        assert (await aconnect(server.port, client)).peer_der == der(old_leaf)

        write_pair(tmp_path, new_leaf, "live")
        reloadable.reload()
        assert (await aconnect(server.port, client)).peer_der == der(new_leaf)

        pair.cert.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        with pytest.raises(TLSConfigError) as info:
            reloadable.reload()
        assert info.value.path == pair.cert
        kept = await aconnect(server.port, client)
        assert kept.peer_der == der(new_leaf)
        assert kept.echoed == b"ping"
