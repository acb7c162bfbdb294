"""TLS: the proxy listener's certificates (``[server.tls]``) and the proxy's
connections to ``https://`` instances (``[services.<name>]``).

Every file is read and checked when the config is loaded (``lucid serve`` and each
SIGHUP reload), so a missing, unreadable or mismatched certificate or key is a
config error naming the file, the key and what was expected: at start it exits 2,
on reload the running certificates stay and the log says why.

**Termination.** The listener gets one :class:`ssl.SSLContext` for its whole life
(``loop.create_server`` on the fast engine, Hypercorn's ``create_ssl_context`` on the
other). Its ``sni_callback`` runs for every handshake, with or without a server name,
and hands the connection the context of the certificate chosen for that name from the
*current* :class:`Certificates`; a reload swaps that object, so new connections get
new certificates without a restart while established ones keep theirs.

**Upstreams.** Verification is on by default (the system's CAs, or ``tls_ca`` only);
``tls_verify = false`` is allowed and logged as a warning at every load; a client
certificate (``tls_cert``/``tls_key``) makes mutual TLS. One :class:`UpstreamTLS` per
configured service; the pool keeps its connections apart per object.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lucid.config import ConfigError, ServerTLS, ServiceConfig

log = logging.getLogger("lucid.tls")

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# ALPN per engine: the fast engine speaks HTTP/1.1 only; Hypercorn HTTP/2 as well.
ALPN = {"fast": ["http/1.1"], "hypercorn": ["h2", "http/1.1"]}
UPSTREAM_ALPN = ["http/1.1"]  # the upstream pool speaks HTTP/1.1


def _resolve(path: str, base: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or base is None else base / p


def _read(key: str, path: str, base: Path | None, expected: str,
          problems: list[str]) -> bytes | None:
    resolved = _resolve(path, base)
    try:
        return resolved.read_bytes()
    except OSError as exc:
        problems.append(f"{key} = {path!r}: cannot read {resolved} "
                        f"({exc.strerror or exc}); expected {expected}")
        return None


def _load_pair(ctx: ssl.SSLContext, cert_key: str, cert: str, key_key: str, key: str,
               base: Path | None, problems: list[str]) -> list[x509.Certificate]:
    """Check a certificate chain and its key, and load them into ``ctx``; the chain's
    certificates, or [] with ``problems`` said."""
    cert_pem = _read(cert_key, cert, base, "a PEM certificate chain", problems)
    key_pem = _read(key_key, key, base, "a PEM private key", problems)
    chain: list[x509.Certificate] = []
    private: Any = None
    if cert_pem is not None:
        try:
            chain = x509.load_pem_x509_certificates(cert_pem)
        except ValueError:
            problems.append(f"{cert_key} = {cert!r}: no PEM certificate in "
                            f"{_resolve(cert, base)}; expected a PEM certificate chain")
    if key_pem is not None:
        try:
            private = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:  # "password was not given but private key is encrypted"
            problems.append(f"{key_key} = {key!r}: the private key in "
                            f"{_resolve(key, base)} is encrypted (passphrase-protected) "
                            "and Lucid has no passphrase option; expected a PEM private "
                            "key without a passphrase (openssl pkey -in KEY -out "
                            "PLAIN_KEY writes one)")
        except ValueError:
            problems.append(f"{key_key} = {key!r}: no PEM private key in "
                            f"{_resolve(key, base)}; expected a PEM private key")
    if not chain or private is None:
        return []
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(*raw) != private.public_key().public_bytes(*raw):
        problems.append(f"{key_key} = {key!r}: does not match {cert_key} ({cert!r}); "
                        "expected the private key of that certificate")
        return []
    try:
        # never OpenSSL's passphrase prompt on the terminal, should the key have been
        # replaced by an encrypted one since it was checked: it fails instead
        ctx.load_cert_chain(_resolve(cert, base), _resolve(key, base),
                            password=_no_passphrase)
    except (OSError, ssl.SSLError, ValueError) as exc:  # changed since it was read
        problems.append(f"{cert_key} = {cert!r}: cannot be loaded ({exc})")
        return []
    return chain


def _no_passphrase() -> bytes:
    raise ValueError("the private key is encrypted")


def _dns_names(certificate: x509.Certificate) -> list[str]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [name.lower() for name in san.value.get_values_for_type(x509.DNSName)]


# -- termination ----------------------------------------------------------------


@dataclass
class Certificates:
    """One load of ``[server.tls]``: a context per certificate, and which serves
    which SNI name."""

    default: ssl.SSLContext
    minimum_version: ssl.TLSVersion
    alpn: list[str]
    exact: dict[str, ssl.SSLContext] = field(default_factory=dict)
    wildcard: dict[str, ssl.SSLContext] = field(default_factory=dict)  # by the suffix

    def choose(self, server_name: str | None) -> ssl.SSLContext:
        """The context for ``server_name`` (the default one when none matches)."""
        if server_name:
            name = server_name.lower().rstrip(".")
            found = self.exact.get(name)
            if found is not None:
                return found
            _, dot, parent = name.partition(".")
            if dot:
                found = self.wildcard.get(parent)
                if found is not None:
                    return found
        return self.default


def server_context(minimum: ssl.TLSVersion, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = minimum
    ctx.options |= ssl.OP_NO_COMPRESSION  # CRIME; and RFC 7540 9.2.1 for h2
    ctx.set_alpn_protocols(alpn)
    return ctx


def load_certificates(tls: ServerTLS, base: Path | None, engine: str) -> Certificates:
    """Read and check every certificate of ``[server.tls]``; ConfigError problems."""
    problems: list[str] = []
    minimum = _VERSIONS[tls.min_version]
    alpn = ALPN[engine]
    default = server_context(minimum, alpn)
    _load_pair(default, "server.tls.cert", tls.cert, "server.tls.key", tls.key, base, problems)
    certificates = Certificates(default, minimum, alpn)
    for index, extra in enumerate(tls.certificates):
        where = f"server.tls.certificates[{index}]"
        ctx = server_context(minimum, alpn)
        chain = _load_pair(ctx, f"{where}.cert", extra.cert, f"{where}.key", extra.key,
                           base, problems)
        if not chain:
            continue
        names = [n.lower().rstrip(".") for n in extra.server_names] or _dns_names(chain[0])
        if not names:
            problems.append(f"{where}.cert = {extra.cert!r}: the certificate names no DNS "
                            "host (subjectAltName); expected server_names to be given")
        for name in names:
            if name.startswith("*."):
                certificates.wildcard.setdefault(name[2:], ctx)
            else:
                certificates.exact.setdefault(name, ctx)
    if problems:
        raise ConfigError("", problems)
    return certificates


class Termination:
    """The proxy listener's TLS: one listening context whose SNI callback picks from
    the current :class:`Certificates` (swapped by :meth:`swap` on reload)."""

    def __init__(self, certificates: Certificates):
        self.certificates = certificates
        # The listening context itself holds no certificate: the callback, which
        # OpenSSL runs for every ClientHello (server name or None), hands over one.
        # The protocol versions are the listening context's (fixed before the
        # callback runs), so a reload sets them here.
        self.context = server_context(certificates.minimum_version, certificates.alpn)
        self.context.sni_callback = self._choose

    def _choose(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                _: ssl.SSLContext) -> None:
        connection.context = self.certificates.choose(server_name)

    def swap(self, certificates: Certificates) -> None:
        """New connections get ``certificates`` from now on."""
        self.certificates = certificates
        self.context.minimum_version = certificates.minimum_version


# -- upstreams ------------------------------------------------------------------


class UpstreamTLS:
    """How to make TLS connections to one service's instances. The pool keeps
    connections made with different settings apart; two made from the same settings
    and the same file contents (``fingerprint``) are equal, so a reload that changes
    nothing keeps the pooled connections. Without a fingerprint, compared by identity."""

    __slots__ = ("context", "server_name", "fingerprint")

    def __init__(self, context: ssl.SSLContext, server_name: str | None = None,
                 fingerprint: Hashable | None = None):
        self.context = context
        self.server_name = server_name
        self.fingerprint = object() if fingerprint is None else fingerprint

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UpstreamTLS) and self.fingerprint == other.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)


def upstream_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """A client context that verifies (``ca_file``'s CAs only, else the system's)."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.set_alpn_protocols(UPSTREAM_ALPN)
    return ctx


def load_upstream(name: str, service: ServiceConfig, base: Path | None,
                  problems: list[str], warn: bool = True) -> UpstreamTLS | None:
    where = f"services.{name}"
    ca: Path | None = None
    if service.tls_ca is not None:
        pem = _read(f"{where}.tls_ca", service.tls_ca, base, "PEM CA certificates", problems)
        if pem is None:
            return None
        try:
            x509.load_pem_x509_certificates(pem)
        except ValueError:
            problems.append(f"{where}.tls_ca = {service.tls_ca!r}: no PEM certificate in "
                            f"{_resolve(service.tls_ca, base)}; expected PEM CA certificates")
            return None
        ca = _resolve(service.tls_ca, base)
    ctx = upstream_context(ca)
    if not service.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if not service.tls_verify and warn:
        log.warning("%s.tls_verify = false: the certificates of the instances of service "
                    "%r are not checked; anyone on the path can pose as them", where, name)
    if service.tls_cert is not None and service.tls_key is not None:
        if not _load_pair(ctx, f"{where}.tls_cert", service.tls_cert, f"{where}.tls_key",
                          service.tls_key, base, problems):
            return None
    files = [f for f in (service.tls_ca, service.tls_cert, service.tls_key) if f is not None]
    try:
        digests = tuple(hashlib.sha256(_resolve(f, base).read_bytes()).hexdigest()
                        for f in files)
    except OSError:
        digests = None  # read a moment ago; if it is gone now, this load stands alone
    fingerprint = None if digests is None else (
        service.tls_verify, service.tls_server_name, service.tls_ca, service.tls_cert,
        service.tls_key, digests)
    return UpstreamTLS(ctx, service.tls_server_name, fingerprint)


def warn_unmatched(names: Iterable[str], known: Callable[[str], bool]) -> list[str]:
    """Log a warning for each ``[services.<name>]`` table that names no service
    ``known`` (to the config or the registry): its settings would apply to nothing,
    most likely a misspelt name. The names warned about."""
    unmatched = [name for name in names if not known(name)]
    for name in unmatched:
        log.warning("services.%s: no service %r is in the config or the registry, so "
                    "these TLS settings apply to nothing yet; is the name misspelt?",
                    name, name)
    return unmatched


# -- both, per config load --------------------------------------------------------


@dataclass
class TLSSettings:
    """What one config load says about TLS."""

    certificates: Certificates | None = None  # [server.tls]
    upstreams: dict[str, UpstreamTLS] = field(default_factory=dict)


def load_tls(config: Any, config_path: Path | None, warn: bool = True) -> TLSSettings:
    """Read every certificate and key the config names (paths relative to the config
    file's folder); ConfigError naming each problem. ``warn``: log what is allowed
    but unsafe (``tls_verify = false``); off for a check whose result is discarded."""
    base = config_path.parent if config_path is not None else None
    source = str(config_path) if config_path is not None else "(built-in defaults)"
    problems: list[str] = []
    settings = TLSSettings()
    tls = config.server.tls
    if tls is not None:
        try:
            settings.certificates = load_certificates(tls, base, config.server.engine)
        except ConfigError as exc:
            problems += exc.problems
    for name, service in config.services.items():
        upstream = load_upstream(name, service, base, problems, warn)
        if upstream is not None:
            settings.upstreams[name] = upstream
    if problems:
        raise ConfigError(source, problems)
    return settings
