"""Development certificates: a private CA and a server certificate signed by it.

``pibl cert`` (or ``python -m pibl.certs``) writes four PEM files into a directory:

* ``ca.pem``      the CA certificate; clients trust it (``curl --cacert ca.pem ...``)
* ``ca-key.pem``  the CA private key (mode 0600); whoever holds it can mint certificates
  that clients trusting ``ca.pem`` accept, so keep it private or delete it
* ``cert.pem``    the server certificate followed by the CA certificate (the chain to serve)
* ``key.pem``     the server private key (mode 0600)

Keys are ECDSA P-256, signatures SHA-256. The CA is limited to signing end certificates
(``basicConstraints CA:true, pathlen:0``; ``keyUsage keyCertSign, cRLSign``). The server
certificate is not a CA, carries every name as a subjectAltName (DNS names, and IP
addresses detected as such), and is valid for ``serverAuth`` and ``clientAuth``, so the
same files also work as a client certificate for mutual TLS towards backends. The default
lifetime, 825 days, is the longest some clients (Apple platforms) accept for a server
certificate.

This needs the ``cryptography`` package, which the proxy itself does not.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import secrets
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DEFAULT_NAMES", "FILE_NAMES", "create_dev_ca_and_cert", "main"]

DEFAULT_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

# key in the returned mapping -> file name
FILE_NAMES: dict[str, str] = {
    "ca": "ca.pem",
    "ca_key": "ca-key.pem",
    "cert": "cert.pem",
    "key": "key.pem",
}

_PRIVATE = 0o600
_PUBLIC = 0o644
_CLOCK_SKEW = dt.timedelta(hours=1)


def _general_names(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in names:
        name = raw.strip().rstrip(".")
        if not name:
            raise ValueError(f"empty name in {list(names)!r}")
        try:
            ip = ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            try:
                dns = name.lower().encode("idna").decode("ascii")
            except UnicodeError:
                # "idna" refuses the "*" label; encode the rest and put it back.
                if not name.startswith("*."):
                    raise ValueError(f"invalid DNS name {raw!r}") from None
                dns = "*." + name[2:].lower().encode("idna").decode("ascii")
            if dns in seen:
                continue
            seen.add(dns)
            out.append(x509.DNSName(dns))
        else:
            if str(ip) in seen:
                continue
            seen.add(str(ip))
            out.append(x509.IPAddress(ip))
    if not out:
        raise ValueError("at least one name is needed")
    return out


def _common_name(general: Sequence[x509.GeneralName]) -> str:
    for item in general:
        if isinstance(item, x509.DNSName) and len(item.value) <= 64:
            return item.value
    return "PIBL development certificate"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (temporary file + rename) with exactly ``mode``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # mkstemp creates 0600; a key is never readable by others
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_dev_ca_and_cert(
    directory: Path,
    names: Sequence[str] = DEFAULT_NAMES,
    *,
    days: int = 825,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Create a CA and a server certificate for ``names`` in ``directory``.

    Returns ``{"ca": ..., "ca_key": ..., "cert": ..., "key": ...}``. Raises
    ``FileExistsError`` if any of the four files exists and ``overwrite`` is false (nothing
    is written then), ``ValueError`` for an invalid name or ``days < 1``.
    """
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    general = _general_names(names)
    directory = Path(directory)
    paths = {key: directory / name for key, name in FILE_NAMES.items()}
    existing = [str(p) for p in paths.values() if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)}")
    directory.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.UTC)
    not_before = now - _CLOCK_SKEW
    not_after = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PIBL development"),
            x509.NameAttribute(
                NameOID.COMMON_NAME,
                f"PIBL development CA {now:%Y-%m-%d} {secrets.token_hex(4)}",
            ),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PIBL development"),
                    x509.NameAttribute(NameOID.COMMON_NAME, _common_name(general)),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(general), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    # Keys first: a certificate file without its key is useless, the reverse is harmless.
    _write(paths["ca_key"], _key_pem(ca_key), _PRIVATE)
    _write(paths["key"], _key_pem(leaf_key), _PRIVATE)
    _write(paths["ca"], _cert_pem(ca_cert), _PUBLIC)
    _write(paths["cert"], _cert_pem(leaf_cert) + _cert_pem(ca_cert), _PUBLIC)
    return paths


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pibl cert",
        description="Create a development CA and a server certificate signed by it.",
    )
    parser.add_argument(
        "--dir", default="certs", type=Path, help="output directory (default ./certs)"
    )
    parser.add_argument(
        "--name",
        action="append",
        dest="names",
        metavar="NAME",
        help="DNS name or IP address for the certificate; repeatable "
        f"(default: {' '.join(DEFAULT_NAMES)})",
    )
    parser.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``pibl cert [--dir DIR] [--name NAME ...] [--days N] [--force]``; returns the exit code."""
    args = _parser().parse_args(argv)
    names: list[str] = args.names or list(DEFAULT_NAMES)
    try:
        paths = create_dev_ca_and_cert(args.dir, names, days=args.days, overwrite=args.force)
    except FileExistsError as exc:
        print(f"pibl cert: {exc} (use --force to replace them)", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"pibl cert: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pibl cert: {exc}", file=sys.stderr)
        return 1
    host = _url_host(names)
    print(
        f"Created a development CA and a certificate for {', '.join(names)} "
        f"(valid {args.days} days):\n"
        f"  CA certificate   {paths['ca']}\n"
        f"  CA private key   {paths['ca_key']}  (keep private, or delete it)\n"
        f"  certificate      {paths['cert']}  (server certificate + CA)\n"
        f"  private key      {paths['key']}\n"
        f"Serve {paths['cert']} with {paths['key']}. Clients must trust {paths['ca']}, e.g.:\n"
        f"  curl --cacert {paths['ca']} https://{host}:8443/\n"
        "Browsers and system stores: import it as a trusted authority (development only)."
    )
    return 0


def _url_host(names: Sequence[str]) -> str:
    """A host for the example URL: the first plain DNS name, else the first IP address."""
    for name in names:
        name = name.strip().strip("[]")
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            if not name.startswith("*"):
                return name
        else:
            if ip.version == 4:
                return str(ip)
    first = names[0].strip().strip("[]")
    return f"[{first}]" if ":" in first else first


if __name__ == "__main__":
    sys.exit(main())
