"""TLS contexts: towards clients (``server_context``) and towards backends (``client_context``).

Choices, and why:

* **Protocols.** TLS 1.2 and 1.3 only (``minimum_version = TLSv1_2``). TLS 1.0/1.1 are
  deprecated (RFC 8996) and every client still in use speaks 1.2.
* **Ciphers.** TLS 1.3 suites are OpenSSL's defaults (all AEAD, all forward secret). For TLS
  1.2 the list is the ECDHE part of Mozilla's "intermediate" profile (``MODERN_CIPHERS``):
  ECDHE key exchange (forward secrecy) with AES-GCM or ChaCha20-Poly1305 (AEAD, no CBC
  padding oracles), for both ECDSA and RSA certificates. The DHE suites of that profile are
  left out: they need DH parameters and are slow. ``OP_CIPHER_SERVER_PREFERENCE`` makes the
  server's order win: AES-128-GCM first (fast with AES-NI), ChaCha20 for clients without it.
* **Other options.** ``OP_NO_COMPRESSION`` (CRIME), ``OP_NO_RENEGOTIATION`` (client-initiated
  renegotiation is a cheap CPU attack), ECDH curves left to OpenSSL (X25519, P-256, ...).
  Session tickets stay on (``OP_NO_TICKET`` not set) so returning clients resume without a
  full handshake; the ticket keys are random, per process and never written anywhere.
* **ALPN.** Toward backends ``http/1.1`` only: PIBL speaks HTTP/1.1 upstream, so a backend
  must never select h2. Server contexts offer the protocols they are given (``[tls] alpn``,
  ``h2`` and ``http/1.1`` by default; ``SERVER_ALPN`` without a list), every per-name
  context the same ones.
* **Several certificates.** The first ``CertPair`` is the default certificate (clients that
  send no SNI, or an unknown name, get it). The others are selected by the SNI name in the
  ClientHello: ``sni_callback`` swaps ``ssl_object.context`` for a context holding that
  pair. Names are exact (``api.example.com``) or a one-level wildcard (``*.example.com``
  matches ``a.example.com``, not ``example.com`` nor ``a.b.example.com``); exact beats
  wildcard. Every per-name context is configured exactly like the default one.
* **Reloading.** ``ReloadableServerContext.context`` is one context for the life of the
  listener; its SNI callback hands each handshake to the contexts of the latest successful
  ``reload()``, so new certificates (after SIGHUP) take effect without reopening the
  socket. Connections already established keep the certificate they were made with.
* **Errors.** Every file is checked on its own before OpenSSL sees it, so a problem is
  reported as ``TLSConfigError(path, problem)`` naming the file at fault ("file not found",
  "no PEM certificate found", "private key does not match the certificate in ...").
  Encrypted private keys are refused instead of letting OpenSSL prompt on a terminal.
* **Backends.** ``client_context`` verifies certificates and host names by default, against
  the system store or only the given CA file; ``verify=False`` turns both off (the caller
  logs a warning). An optional client certificate gives mutual TLS towards backends.
"""

from __future__ import annotations

import ipaddress
import ssl
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pibl.errors import ConfigError

__all__ = [
    "ALPN_PROTOCOLS",
    "MODERN_CIPHERS",
    "CertPair",
    "ReloadableServerContext",
    "TLSConfigError",
    "client_context",
    "describe",
    "server_context",
]

# Mozilla "intermediate" TLS 1.2 suites without the DHE ones, in server preference order.
MODERN_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)

ALPN_PROTOCOLS: tuple[str, ...] = ("http/1.1",)  # toward backends
SERVER_ALPN: tuple[str, ...] = ("h2", "http/1.1")  # to clients, unless configured


class TLSConfigError(ConfigError, ValueError):
    """A certificate, key or CA file (or a server name) cannot be used.

    ``str(error)`` is ``"<path>: <problem>"``; ``path`` is the file at fault.
    """

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[type[TLSConfigError], tuple[Path, str]]:
        return (type(self), (self.path, self.problem))


@dataclass(frozen=True, slots=True)
class CertPair:
    """A certificate chain file (leaf first, PEM) and its private key file (PEM, unencrypted).

    ``names`` are the SNI server names this pair serves; empty means it is only the default
    (allowed for the first pair of ``server_context`` only).
    """

    cert: Path
    key: Path
    names: tuple[str, ...] = ()


# ---------------------------------------------------------------------------- file checks


def _read_text(path: Path, what: str) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(path, f"cannot read {what}: file not found") from None
    except PermissionError:
        raise TLSConfigError(path, f"cannot read {what}: permission denied") from None
    except IsADirectoryError:
        raise TLSConfigError(path, f"cannot read {what}: is a directory") from None
    except OSError as exc:
        raise TLSConfigError(path, f"cannot read {what}: {exc.strerror or exc}") from None
    return data.decode("ascii", errors="replace")


def _ssl_reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc)


def _check_certificates(path: Path, what: str) -> None:
    """The file holds at least one PEM certificate and OpenSSL can parse all of them."""
    text = _read_text(path, what)
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise TLSConfigError(
            path,
            f"no PEM certificate found in {what} (expected '-----BEGIN CERTIFICATE-----'; "
            "convert DER with 'openssl x509 -inform der -in FILE -out FILE.pem')",
        )
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cadata=text)
    except ssl.SSLError as exc:
        raise TLSConfigError(path, f"cannot parse {what}: {_ssl_reason(exc)}") from None


def _check_private_key(path: Path) -> None:
    text = _read_text(path, "private key")
    if "PRIVATE KEY-----" not in text:
        raise TLSConfigError(
            path, "no PEM private key found (expected '-----BEGIN ... PRIVATE KEY-----')"
        )
    if "ENCRYPTED" in text:
        raise TLSConfigError(
            path,
            "private key is encrypted; use an unencrypted key readable only by the proxy "
            "user (mode 0600), e.g. 'openssl pkey -in FILE -out FILE.plain'",
        )


def _no_password() -> bytes:
    # Never let OpenSSL fall back to prompting on a terminal.
    raise ValueError("encrypted private keys are not supported")


_SECURITY_LEVEL_REASONS = frozenset({"EE_KEY_TOO_SMALL", "CA_KEY_TOO_SMALL", "CA_MD_TOO_WEAK"})


def _load_pair(ctx: ssl.SSLContext, cert: Path, key: Path | None, what: str) -> None:
    """``ctx.load_cert_chain`` with each failure attributed to the right file."""
    _check_certificates(cert, what)
    if key is not None:
        _check_private_key(key)
    key_path = key if key is not None else cert
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        reason = str(exc.reason or "")
        if reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(
                key_path, f"private key does not match the certificate in {cert}"
            ) from None
        if reason in _SECURITY_LEVEL_REASONS:
            raise TLSConfigError(
                cert, f"{what} refused by OpenSSL's security level: {_ssl_reason(exc)}"
            ) from None
        if key is None:
            raise TLSConfigError(
                cert, f"cannot load {what} with its private key: {_ssl_reason(exc)}"
            ) from None
        raise TLSConfigError(key, f"cannot load private key: {_ssl_reason(exc)}") from None
    except ValueError:
        raise TLSConfigError(key_path, "private key is encrypted") from None
    except OSError as exc:  # the file vanished between the checks and the load
        raise TLSConfigError(key_path, f"cannot load {what}: {exc.strerror or exc}") from None


# ----------------------------------------------------------------------------- server side


def _normalize_name(pair: CertPair, name: str) -> str:
    """Lower-case A-label form of a configured SNI name; ``*.`` prefix kept for wildcards."""
    raw = name.strip().rstrip(".").lower()
    wildcard = raw.startswith("*.")
    base = raw[2:] if wildcard else raw
    try:
        ipaddress.ip_address(base)
    except ValueError:
        pass
    else:
        raise TLSConfigError(
            pair.cert,
            f"server name {name!r} is an IP address; clients never send one in SNI, so put "
            "it in the default (first) certificate instead",
        )
    try:
        base = base.encode("idna").decode("ascii")
    except UnicodeError:
        raise TLSConfigError(pair.cert, f"invalid server name {name!r}") from None
    labels = base.split(".")
    if not base or "*" in base or any(not label for label in labels):
        raise TLSConfigError(
            pair.cert,
            f"invalid server name {name!r}: use 'host.example.com' or '*.example.com'",
        )
    return f"*.{base}" if wildcard else base


def _new_server_context(alpn: Sequence[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(MODERN_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.options &= ~ssl.OP_NO_TICKET
    ctx.set_alpn_protocols(list(alpn))
    return ctx


@dataclass(frozen=True, slots=True)
class _Selection:
    """The contexts built from one set of pairs and the SNI table choosing among them."""

    default: ssl.SSLContext
    exact: Mapping[str, ssl.SSLContext]
    wildcard: Mapping[str, ssl.SSLContext]  # "example.com" for "*.example.com"
    info: _Info

    def choose(self, server_name: str | None) -> ssl.SSLContext:
        if not server_name:
            return self.default
        name = server_name.rstrip(".").lower()
        found = self.exact.get(name)
        if found is None:
            first, _, rest = name.partition(".")
            if first and rest:
                found = self.wildcard.get(rest)
        return found if found is not None else self.default


def _build(pairs: Sequence[CertPair], alpn: Sequence[str] = SERVER_ALPN) -> _Selection:
    if not pairs:
        raise ValueError("server_context needs at least one certificate pair")
    exact: dict[str, ssl.SSLContext] = {}
    wildcard: dict[str, ssl.SSLContext] = {}
    owner: dict[str, Path] = {}
    contexts: list[ssl.SSLContext] = []
    for index, pair in enumerate(pairs):
        if index > 0 and not pair.names:
            raise TLSConfigError(
                pair.cert,
                "only the first certificate can be the default; give this one server names",
            )
        ctx = _new_server_context(alpn)
        _load_pair(ctx, pair.cert, pair.key, "certificate")
        contexts.append(ctx)
        for name in pair.names:
            key = _normalize_name(pair, name)
            if key in owner:
                raise TLSConfigError(
                    pair.cert, f"server name {key!r} is already served by {owner[key]}"
                )
            owner[key] = pair.cert
            if key.startswith("*."):
                wildcard[key[2:]] = ctx
            else:
                exact[key] = ctx
    info = _Info(
        role="server",
        alpn=tuple(alpn),
        certificates=len(pairs),
        default_cert=pairs[0].cert,
        names=tuple(owner),
    )
    for ctx in contexts:
        _INFO[ctx] = info
    return _Selection(default=contexts[0], exact=exact, wildcard=wildcard, info=info)


def _swap_to(ssl_object: ssl.SSLObject, chosen: ssl.SSLContext) -> None:
    if ssl_object.context is not chosen:
        ssl_object.context = chosen


def server_context(pairs: Sequence[CertPair], alpn: Sequence[str] = SERVER_ALPN) -> ssl.SSLContext:
    """A server-side context for the given certificates (first = default, others by SNI).

    Raises ``TLSConfigError`` naming the file when a certificate or key cannot be used, and
    ``ValueError`` when ``pairs`` is empty.
    """
    selection = _build(pairs, alpn)
    if selection.exact or selection.wildcard:

        def select(ssl_object: ssl.SSLObject, server_name: str | None, _: object) -> None:
            _swap_to(ssl_object, selection.choose(server_name))

        selection.default.sni_callback = select
    return selection.default


class ReloadableServerContext:
    """Server certificates that can be re-read from their files (on SIGHUP) while serving.

    Hand ``context`` to the listener once; it stays the same object. ``reload()`` re-reads
    the same files; on success new handshakes use the new certificates, on failure the old
    ones stay in use and ``TLSConfigError`` is raised. Keep this object alive as long as the
    listener: the context only holds a weak reference to it (without it, handshakes fall
    back to the certificates first loaded).
    """

    __slots__ = ("__weakref__", "_alpn", "_front", "_pairs", "_reloads", "_selection")

    def __init__(self, pairs: Sequence[CertPair], alpn: Sequence[str] = SERVER_ALPN) -> None:
        self._pairs = tuple(pairs)
        self._alpn = tuple(alpn)
        self._selection = _build(self._pairs, self._alpn)
        self._reloads = 0
        self._front = self._selection.default
        # A weak reference: the context must not keep this object (and old contexts) alive.
        ref = weakref.ref(self)

        def select(ssl_object: ssl.SSLObject, server_name: str | None, _: object) -> None:
            owner = ref()
            if owner is not None:
                _swap_to(ssl_object, owner._selection.choose(server_name))

        self._front.sni_callback = select

    @property
    def context(self) -> ssl.SSLContext:
        """The listener's context; the same object across reloads."""
        return self._front

    @property
    def pairs(self) -> tuple[CertPair, ...]:
        return self._pairs

    @property
    def reloads(self) -> int:
        """How many ``reload()`` calls succeeded."""
        return self._reloads

    def reload(self) -> None:
        """Re-read every certificate and key; keep the current ones if any file is invalid."""
        selection = _build(self._pairs, self._alpn)  # raises before anything changes
        self._selection = selection
        self._reloads += 1
        _INFO[self._front] = selection.info


# ----------------------------------------------------------------------------- client side


def client_context(
    *,
    ca_file: Path | None,
    verify: bool = True,
    client_cert: Path | None = None,
    client_key: Path | None = None,
) -> ssl.SSLContext:
    """A context for connections to backends.

    ``ca_file=None`` trusts the system store; otherwise only the CAs in ``ca_file``.
    ``verify=False`` disables certificate and host name checks (log a warning when using it).
    ``client_cert`` (with ``client_key``, or with the key in the same file) is presented to
    backends that ask for one (mutual TLS).
    """
    if client_key is not None and client_cert is None:
        raise TLSConfigError(client_key, "client key given without a client certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(MODERN_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(ALPN_PROTOCOLS)
    if ca_file is not None:
        _check_certificates(ca_file, "CA certificate")
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, OSError) as exc:
            problem = _ssl_reason(exc) if isinstance(exc, ssl.SSLError) else str(exc)
            raise TLSConfigError(ca_file, f"cannot load CA certificate: {problem}") from None
    elif verify:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if client_cert is not None:
        _load_pair(ctx, client_cert, client_key, "client certificate")
    _INFO[ctx] = _Info(
        role="client",
        alpn=ALPN_PROTOCOLS,
        certificates=1 if client_cert is not None else 0,
        default_cert=client_cert,
        ca_file=ca_file,
    )
    return ctx


# ---------------------------------------------------------------------------- description


@dataclass(frozen=True, slots=True)
class _Info:
    role: str
    alpn: tuple[str, ...]
    certificates: int
    default_cert: Path | None
    names: tuple[str, ...] = field(default=())
    ca_file: Path | None = None


_INFO: weakref.WeakKeyDictionary[ssl.SSLContext, _Info] = weakref.WeakKeyDictionary()

_VERSION_TEXT = {
    ssl.TLSVersion.SSLv3: "SSL 3.0",
    ssl.TLSVersion.TLSv1: "TLS 1.0",
    ssl.TLSVersion.TLSv1_1: "TLS 1.1",
    ssl.TLSVersion.TLSv1_2: "TLS 1.2",
    ssl.TLSVersion.TLSv1_3: "TLS 1.3",
}


def _protocols(ctx: ssl.SSLContext) -> str:
    low = ctx.minimum_version
    high = ctx.maximum_version
    low_text = "TLS 1.0" if low == ssl.TLSVersion.MINIMUM_SUPPORTED else _VERSION_TEXT[low]
    high_text = "TLS 1.3" if high == ssl.TLSVersion.MAXIMUM_SUPPORTED else _VERSION_TEXT[high]
    return low_text if low_text == high_text else f"{low_text}-{high_text[4:]}"


def _names_text(names: tuple[str, ...], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, +{len(names) - limit} more"


def describe(ctx: ssl.SSLContext) -> str:
    """One line for logs, e.g. ``TLS server: TLS 1.2-1.3, ALPN http/1.1, 2 certificates
    (default /etc/pibl/cert.pem; SNI a.example.com)``."""
    info = _INFO.get(ctx)
    parts = [_protocols(ctx)]
    if info is None:
        role = "server" if ctx.protocol == ssl.PROTOCOL_TLS_SERVER else "client"
        verify = "verify on" if ctx.verify_mode != ssl.CERT_NONE else "verify off"
        return f"TLS {role}: {', '.join([*parts, verify])}"
    parts.append(f"ALPN {','.join(info.alpn)}")
    if info.role == "server":
        plural = "s" if info.certificates != 1 else ""
        where = f"default {info.default_cert}"
        if info.names:
            where += f"; SNI {_names_text(info.names)}"
        parts.append(f"{info.certificates} certificate{plural} ({where})")
        if ctx.verify_mode == ssl.CERT_REQUIRED:
            parts.append("client certificates required")
    else:
        if ctx.verify_mode == ssl.CERT_NONE:
            parts.append("verify OFF")
        elif info.ca_file is not None:
            parts.append(f"verify on (CA {info.ca_file})")
        else:
            parts.append("verify on (system store)")
        if info.default_cert is not None:
            parts.append(f"client certificate {info.default_cert}")
    return f"TLS {info.role}: {', '.join(parts)}"
