"""TLS contexts and development certificates, without sockets (handshakes over memory BIOs)."""

from __future__ import annotations

import ipaddress
import pickle
import ssl
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from pibl import certs
from pibl.errors import ConfigError
from pibl.tls import (
    MODERN_CIPHERS,
    CertPair,
    ReloadableServerContext,
    TLSConfigError,
    client_context,
    describe,
    server_context,
)

# ------------------------------------------------------------------------------- helpers


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str | None = "localhost"
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Run a full handshake between two SSLObjects over memory BIOs; (client, server)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_side=False, server_hostname=server_hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    pending = [c, s]
    for _ in range(20):
        for obj in list(pending):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                continue
            pending.remove(obj)
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if not pending:
            return c, s
    raise AssertionError("handshake did not finish")


def der(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


def write_pair(
    tmp_path: Path, leaf: trustme.LeafCert, stem: str, names: tuple[str, ...] = ()
) -> CertPair:
    cert = tmp_path / f"{stem}.pem"
    key = tmp_path / f"{stem}-key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return CertPair(cert, key, names)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pair(tmp_path: Path, ca: trustme.CA) -> CertPair:
    return write_pair(tmp_path, ca.issue_cert("localhost"), "default")


@pytest.fixture
def trusting_client(ca: trustme.CA, tmp_path: Path) -> ssl.SSLContext:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return client_context(ca_file=ca_file)


# ------------------------------------------------------------------------- server_context


def test_server_context_refuses_old_protocols(pair: CertPair) -> None:
    ctx = server_context([pair])
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.minimum_version > ssl.TLSVersion.TLSv1_1
    assert ctx.maximum_version in (ssl.TLSVersion.MAXIMUM_SUPPORTED, ssl.TLSVersion.TLSv1_3)


def test_server_refuses_tls11_handshake(pair: CertPair, ca: trustme.CA) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(old)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 offers TLS 1.0/1.1 only at level 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError) as info:
        handshake(server_context([pair]), old)
    assert info.value.reason == "UNSUPPORTED_PROTOCOL"  # raised by the server side


def test_server_context_options(pair: CertPair) -> None:
    ctx = server_context([pair])
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert not ctx.options & ssl.OP_NO_TICKET
    assert ctx.verify_mode == ssl.CERT_NONE  # no client certificates asked


def test_server_cipher_list_is_ecdhe_aead_only(pair: CertPair) -> None:
    ciphers = server_context([pair]).get_ciphers()
    tls12 = [c for c in ciphers if c["protocol"] == "TLSv1.2"]
    assert [c["name"] for c in tls12] == MODERN_CIPHERS.split(":")
    for c in tls12:
        assert c["kea"] == "kx-ecdhe", c
        assert c["aead"], c
        assert c["symmetric"] in {"aes-128-gcm", "aes-256-gcm", "chacha20-poly1305"}, c
    # TLS 1.3 suites are OpenSSL's defaults, all AEAD
    assert all(c["aead"] for c in ciphers if c["protocol"] == "TLSv1.3")


def test_handshake_negotiates_alpn_http11_and_tls13(
    pair: CertPair, trusting_client: ssl.SSLContext
) -> None:
    c, s = handshake(server_context([pair]), trusting_client)
    assert c.selected_alpn_protocol() == "http/1.1"
    assert s.selected_alpn_protocol() == "http/1.1"
    assert c.version() == "TLSv1.3"


def test_handshake_never_selects_h2_when_only_http11_is_offered(
    pair: CertPair, ca: trustme.CA
) -> None:
    client = ssl.create_default_context()
    ca.configure_trust(client)
    client.set_alpn_protocols(["h2"])
    # [tls] alpn = ["http/1.1"]: no common protocol, no ALPN at all
    c, s = handshake(server_context([pair], ["http/1.1"]), client)
    assert c.selected_alpn_protocol() is None
    assert s.selected_alpn_protocol() is None


def test_handshake_selects_h2_by_default(pair: CertPair, ca: trustme.CA) -> None:
    client = ssl.create_default_context()
    ca.configure_trust(client)
    client.set_alpn_protocols(["h2", "http/1.1"])
    c, s = handshake(server_context([pair]), client)
    assert c.selected_alpn_protocol() == "h2"
    assert s.selected_alpn_protocol() == "h2"


def test_tls12_handshake_uses_a_listed_cipher(
    pair: CertPair, trusting_client: ssl.SSLContext
) -> None:
    trusting_client.maximum_version = ssl.TLSVersion.TLSv1_2
    c, _ = handshake(server_context([pair]), trusting_client)
    cipher = c.cipher()
    assert cipher is not None
    assert c.version() == "TLSv1.2"
    assert cipher[0] in MODERN_CIPHERS.split(":")


def test_sni_exact_wildcard_and_default(
    tmp_path: Path, ca: trustme.CA, trusting_client: ssl.SSLContext
) -> None:
    leaves = {
        "default": ca.issue_cert("localhost"),
        "exact": ca.issue_cert("api.example.test"),
        "wild": ca.issue_cert("*.example.test"),
    }
    ctx = server_context(
        [
            write_pair(tmp_path, leaves["default"], "d"),
            write_pair(tmp_path, leaves["exact"], "e", names=("API.Example.Test.",)),
            write_pair(tmp_path, leaves["wild"], "w", names=("*.example.test",)),
        ]
    )
    trusting_client.check_hostname = False

    def served(name: str | None) -> str:
        c, _ = handshake(ctx, trusting_client, server_hostname=name)
        got = c.getpeercert(binary_form=True)
        return next(k for k, leaf in leaves.items() if der(leaf) == got)

    assert served("api.example.test") == "exact"  # exact beats wildcard
    assert served("www.example.test") == "wild"
    assert served("a.b.example.test") == "default"  # wildcard covers one level only
    assert served("example.test") == "default"
    assert served("localhost") == "default"
    assert served("unknown.test") == "default"
    assert served(None) == "default"


def test_single_pair_has_no_sni_callback(pair: CertPair) -> None:
    assert server_context([pair]).sni_callback is None


def test_server_context_needs_a_pair() -> None:
    with pytest.raises(ValueError, match="at least one"):
        server_context([])


# ------------------------------------------------------------------------- TLSConfigError


def test_error_type_and_message(tmp_path: Path) -> None:
    err = TLSConfigError(tmp_path / "x.pem", "bad")
    assert isinstance(err, ValueError)
    assert isinstance(err, ConfigError)
    assert str(err) == f"{tmp_path / 'x.pem'}: bad"
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.problem) == (err.path, err.problem)


def test_missing_cert_names_the_file(pair: CertPair, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(TLSConfigError, match="file not found") as info:
        server_context([CertPair(missing, pair.key)])
    assert info.value.path == missing
    assert str(missing) in str(info.value)


def test_missing_key_names_the_file(pair: CertPair, tmp_path: Path) -> None:
    missing = tmp_path / "nokey.pem"
    with pytest.raises(TLSConfigError, match="file not found") as info:
        server_context([CertPair(pair.cert, missing)])
    assert info.value.path == missing


@pytest.mark.parametrize(
    "content",
    [
        b"not a certificate at all\n",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        b"",
    ],
)
def test_garbage_cert_names_the_file(pair: CertPair, tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    with pytest.raises(TLSConfigError, match="certificate") as info:
        server_context([CertPair(bad, pair.key)])
    assert info.value.path == bad
    assert str(bad) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [
        b"garbage\n",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ],
)
def test_garbage_key_names_the_file(pair: CertPair, tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "badkey.pem"
    bad.write_bytes(content)
    with pytest.raises(TLSConfigError, match="private key") as info:
        server_context([CertPair(pair.cert, bad)])
    assert info.value.path == bad


def test_mismatched_key_names_both_files(pair: CertPair, tmp_path: Path, ca: trustme.CA) -> None:
    other = write_pair(tmp_path, ca.issue_cert("other.test"), "other")
    with pytest.raises(TLSConfigError, match="does not match") as info:
        server_context([CertPair(pair.cert, other.key)])
    assert info.value.path == other.key
    assert str(pair.cert) in str(info.value)


def test_encrypted_key_is_refused_without_prompting(pair: CertPair, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(pair.key.read_bytes(), None)
    encrypted = tmp_path / "enc.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSConfigError, match="encrypted") as info:
        server_context([CertPair(pair.cert, encrypted)])
    assert info.value.path == encrypted


def test_directory_instead_of_file(pair: CertPair, tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match="directory"):
        server_context([CertPair(tmp_path, pair.key)])


@pytest.mark.parametrize(
    ("name", "problem"),
    [("127.0.0.1", "IP address"), ("a.*.test", "invalid"), ("a..test", "invalid"), ("", "invalid")],
)
def test_invalid_server_names(
    pair: CertPair, tmp_path: Path, ca: trustme.CA, name: str, problem: str
) -> None:
    other = write_pair(tmp_path, ca.issue_cert("b.test"), "b", names=(name,))
    with pytest.raises(TLSConfigError, match=problem) as info:
        server_context([pair, other])
    assert info.value.path == other.cert


def test_duplicate_names_and_unnamed_second_pair(
    pair: CertPair, tmp_path: Path, ca: trustme.CA
) -> None:
    a = write_pair(tmp_path, ca.issue_cert("a.test"), "a", names=("a.test",))
    b = write_pair(tmp_path, ca.issue_cert("a.test"), "b", names=("A.test",))
    with pytest.raises(TLSConfigError, match="already served by"):
        server_context([pair, a, b])
    with pytest.raises(TLSConfigError, match="only the first"):
        server_context([pair, CertPair(a.cert, a.key)])


# ------------------------------------------------------------------------- client_context


def test_client_context_verifies_by_default(tmp_path: Path, ca: trustme.CA) -> None:
    ctx = client_context(ca_file=None)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    only = client_context(ca_file=ca_file)
    assert only.verify_mode == ssl.CERT_REQUIRED
    assert only.check_hostname
    assert only.cert_store_stats()["x509_ca"] == 1  # only that CA, no system store


def test_client_context_verify_off() -> None:
    ctx = client_context(ca_file=None, verify=False)
    assert ctx.verify_mode == ssl.CERT_NONE
    assert not ctx.check_hostname


def test_client_context_rejects_untrusted_server(pair: CertPair) -> None:
    other_ca = trustme.CA()
    client = ssl.create_default_context()
    other_ca.configure_trust(client)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_context([pair]), client)


def test_client_context_file_errors(tmp_path: Path, pair: CertPair) -> None:
    missing = tmp_path / "ca-missing.pem"
    with pytest.raises(TLSConfigError, match="file not found") as info:
        client_context(ca_file=missing)
    assert info.value.path == missing
    with pytest.raises(TLSConfigError, match="no PEM certificate") as info:
        client_context(ca_file=pair.key)
    assert info.value.path == pair.key
    with pytest.raises(TLSConfigError, match="without a client certificate"):
        client_context(ca_file=None, client_key=pair.key)
    with pytest.raises(TLSConfigError) as info:
        client_context(ca_file=None, client_cert=pair.cert, client_key=missing)
    assert info.value.path == missing


def test_client_certificate_with_key_in_same_file(tmp_path: Path, ca: trustme.CA) -> None:
    combined = tmp_path / "client.pem"
    ca.issue_cert("client.test").private_key_and_cert_chain_pem.write_to_path(str(combined))
    ctx = client_context(ca_file=None, client_cert=combined)
    assert "client certificate" in describe(ctx)


# ------------------------------------------------------------------------------ reloading


def test_reloadable_keeps_context_object(pair: CertPair) -> None:
    rc = ReloadableServerContext([pair])
    first = rc.context
    rc.reload()
    assert rc.context is first
    assert rc.reloads == 1
    pair.cert.write_text("garbage")
    with pytest.raises(TLSConfigError):
        rc.reload()
    assert rc.reloads == 1


# ------------------------------------------------------------------------------- describe


def test_describe(pair: CertPair, tmp_path: Path, ca: trustme.CA) -> None:
    extra = write_pair(tmp_path, ca.issue_cert("a.test"), "a", names=("a.test",))
    text = describe(server_context([pair, extra]))
    assert "TLS 1.2-1.3" in text
    assert "2 certificates" in text
    assert "a.test" in text
    assert "http/1.1" in text
    assert "verify on (system store)" in describe(client_context(ca_file=None))
    assert "verify OFF" in describe(client_context(ca_file=None, verify=False))
    assert describe(ssl.create_default_context()).startswith("TLS client:")


# -------------------------------------------------------------------------------- certs


def load_chain(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def test_dev_certificates(tmp_path: Path) -> None:
    paths = certs.create_dev_ca_and_cert(tmp_path / "out", days=30)
    assert set(paths) == {"ca", "ca_key", "cert", "key"}
    assert {p.name for p in paths.values()} == {"ca.pem", "ca-key.pem", "cert.pem", "key.pem"}
    for name in ("ca_key", "key"):
        assert stat.S_IMODE(paths[name].stat().st_mode) == 0o600

    (ca_cert,) = load_chain(paths["ca"])
    leaf, chained_ca = load_chain(paths["cert"])
    assert chained_ca == ca_cert
    leaf.verify_directly_issued_by(ca_cert)

    ca_bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_bc.critical and ca_bc.value.ca and ca_bc.value.path_length == 0
    assert ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign

    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    days = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days
    assert 30 <= days <= 31

    for key_path, cert in ((paths["key"], leaf), (paths["ca_key"], ca_cert)):
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP256R1)
        assert key.public_key() == cert.public_key()


def test_dev_certificates_work_with_tls_module(tmp_path: Path) -> None:
    paths = certs.create_dev_ca_and_cert(tmp_path, ["localhost", "*.dev.test"])
    server = server_context([CertPair(paths["cert"], paths["key"])])
    client = client_context(ca_file=paths["ca"])
    c, _ = handshake(server, client, server_hostname="x.dev.test")
    assert c.version() == "TLSv1.3"
    # the same files act as a client certificate (EKU clientAuth)
    assert client_context(ca_file=paths["ca"], client_cert=paths["cert"], client_key=paths["key"])


def test_dev_certificates_refuse_overwrite(tmp_path: Path) -> None:
    paths = certs.create_dev_ca_and_cert(tmp_path)
    before = {k: p.read_bytes() for k, p in paths.items()}
    with pytest.raises(FileExistsError, match=r"ca\.pem"):
        certs.create_dev_ca_and_cert(tmp_path)
    assert {k: p.read_bytes() for k, p in paths.items()} == before
    # one existing file is enough to refuse, and nothing else is written
    other = tmp_path / "other"
    other.mkdir()
    (other / "key.pem").write_text("mine")
    with pytest.raises(FileExistsError):
        certs.create_dev_ca_and_cert(other)
    assert sorted(p.name for p in other.iterdir()) == ["key.pem"]
    again = certs.create_dev_ca_and_cert(tmp_path, overwrite=True)
    assert again["cert"].read_bytes() != before["cert"]
    assert stat.S_IMODE(again["key"].stat().st_mode) == 0o600


def test_dev_certificates_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        certs.create_dev_ca_and_cert(tmp_path, [])
    with pytest.raises(ValueError):
        certs.create_dev_ca_and_cert(tmp_path, ["  "])
    with pytest.raises(ValueError):
        certs.create_dev_ca_and_cert(tmp_path, days=0)


def test_cert_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "c"
    assert certs.main(["--dir", str(out_dir), "--name", "app.test", "--name", "10.0.0.1"]) == 0
    out = capsys.readouterr().out
    assert f"curl --cacert {out_dir / 'ca.pem'} https://app.test:8443/" in out
    leaf = load_chain(out_dir / "cert.pem")[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["app.test"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]

    assert certs.main(["--dir", str(out_dir)]) == 1
    assert "--force" in capsys.readouterr().err
    assert certs.main(["--dir", str(out_dir), "--force"]) == 0


def test_python_dash_m(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pibl.certs", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "--cacert" in done.stdout
    assert (tmp_path / "key.pem").exists()
