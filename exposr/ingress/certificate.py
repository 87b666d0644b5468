"""The SNI ingress certificate: loading, wildcard rules, TLS options, live reload.

Rules: docs/protocol.rst, "Wildcard certificate".

* `load_certificate(cert_path, key_path, sni_host)` reads the PEM files
  (certificate chain, private key), checks that the key matches, collects the
  wildcard names (subject CN first, then the subjectAltName DNS names, in
  certificate order) and picks the ingress domain. Every failure is a
  `CertificateError("Failed to load certificate: <reason>")`.
* `sni_url(tunnel_id, domain, port, sni_host)` is the advertised
  ``tcps://<id>.<domain>:<port>``.
* `make_tls_options` builds the `CertificateOptions` (from cryptography
  objects) with an ALPN selector that never fails a handshake.
* `CertificateWatcher` polls the two files and swaps in a new certificate for
  new connections; it is an ``IOpenSSLServerConnectionCreator`` so it can be
  handed to ``TLSMemoryBIOFactory`` directly.
"""

import hashlib
import os
import time

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.application import service
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from zope.interface import implementer

from exposr.errors import ExposrError
from exposr.periodic import Periodic

log = Logger(namespace="exposr.ingress.certificate")

MAX_FILE_SIZE = 1 << 20  # a PEM chain is a few KiB; refuse to read a huge file


class CertificateError(ExposrError):
    """The SNI certificate or key cannot be used."""

    def __init__(self, reason):
        super().__init__(f"Failed to load certificate: {reason}")
        self.reason = reason


# -- wildcard rules ------------------------------------------------------------


def common_names(certificate):
    """The subject's CN values, in RDN order (parsed, not the text after "CN=")."""
    names = []
    for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attribute.value
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        names.append(value)
    return names


def san_dns_names(certificate):
    """The subjectAltName DNS entries, in certificate order."""
    try:
        ext = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.DNSName))


def wildcard_names(certificate):
    """The ``*.`` names: subject CN first, then SAN DNS names; no duplicates."""
    found = []
    for name in common_names(certificate) + san_dns_names(certificate):
        if name.startswith("*.") and len(name) > 2 and name not in found:
            found.append(name)
    return found


def parse_sni_host(value):
    """
    ``host``, ``host:port`` or ``scheme://host:port`` → ``(host, port or None)``.

    The scheme (and any path) is ignored; the host is lower-cased. Raises
    `ValueError` for an empty host or a bad port.
    """
    rest = value.strip()
    if "://" in rest:
        rest = rest.split("://", 1)[1]
    rest = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    rest = rest.rsplit("@", 1)[-1]
    port = None
    if rest.startswith("["):  # [v6]:port
        host, sep, tail = rest[1:].partition("]")
        if not sep:
            raise ValueError(f"invalid host {value!r}")
        if tail:
            if not tail.startswith(":"):
                raise ValueError(f"invalid host {value!r}")
            port = tail[1:]
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host = rest
    if port is not None:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"invalid port in {value!r}")
        port = int(port)
    host = host.rstrip(".").lower()
    if not host:
        raise ValueError(f"no host name in {value!r}")
    return host, port


def select_domain(wildcards, sni_host=None):
    """
    The ingress domain: after ``*.`` of the first wildcard, or of the first
    wildcard whose domain equals the host of ``sni_host``.
    """
    if not wildcards:
        raise CertificateError("no wildcard name (*.domain) in the certificate")
    if sni_host is None:
        return wildcards[0][2:]
    try:
        host, _ = parse_sni_host(sni_host)
    except ValueError as e:
        raise CertificateError(f"ingress-sni-host: {e}") from None
    for name in wildcards:
        if name[2:].rstrip(".").lower() == host:
            return name[2:]
    raise CertificateError(
        f"no wildcard for {host} in the certificate (has {', '.join(wildcards)})"
    )


def sni_url(tunnel_id, domain, sni_port=4430, sni_host=None):
    """The advertised SNI URL: ``tcps://<id>.<domain>:<port>`` (port of ``sni_host`` if any)."""
    port = sni_port
    if sni_host is not None:
        _, host_port = parse_sni_host(sni_host)
        if host_port is not None:
            port = host_port
    return f"tcps://{tunnel_id}.{domain}:{port}"


# -- loading -------------------------------------------------------------------


def _public_der(key):
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def parse_pem(cert_pem, key_pem):
    """``(leaf, chain, key)`` from PEM bytes, or `CertificateError`."""
    try:
        certificates = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise CertificateError("no PEM certificate in the certificate file") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CertificateError("the private key is encrypted") from None
    except Exception as e:  # ValueError, UnsupportedAlgorithm, ...
        reason = str(e).split(". See https")[0] or type(e).__name__
        raise CertificateError(f"cannot parse the private key ({reason})") from None
    leaf = certificates[0]
    try:
        matches = _public_der(leaf.public_key()) == _public_der(key.public_key())
    except Exception as e:
        raise CertificateError(f"unusable certificate public key ({e})") from None
    if not matches:
        raise CertificateError("the private key does not match the certificate")
    return leaf, tuple(certificates[1:]), key


def _alpn_selector(protocols):
    """
    Select the first of ``protocols`` the client offers, or none at all.

    Twisted's own selector answers an empty protocol when there is no overlap,
    which OpenSSL turns into an "internal error" alert for every client that
    offers ALPN (curl, browsers). Like the original (a Node TLS server with no
    ALPN list) we rather proceed without ALPN.
    """
    protocols = tuple(protocols)

    def select(connection, offered):
        for p in protocols:
            if p in offered:
                return p
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


def make_tls_options(certificate, key, chain=(), alpn=()):
    """
    Server `CertificateOptions` from cryptography objects.

    ``alpn``: protocols to select when offered (first match wins); with none
    (the default, as the original) no protocol is ever negotiated and the
    handshake proceeds whatever the client offers.
    """
    options = CertificateOptions(
        privateKey=key,
        certificate=certificate,
        extraCertChain=list(chain) or None,
        acceptableProtocols=list(alpn) or None,
    )
    # Build the (cached) context now: it validates the pair with OpenSSL and
    # lets us replace Twisted's ALPN selector (see _alpn_selector).
    context = options.getContext()
    context.set_alpn_select_callback(_alpn_selector(alpn))
    return options


@attrs.frozen
class LoadedCertificate:
    certificate: x509.Certificate
    chain: tuple
    key: object
    wildcards: tuple
    domain: str
    digest: str  # sha256 of the certificate file + key file contents
    options: CertificateOptions = attrs.field(repr=False)

    @property
    def primary(self):
        return "*." + self.domain

    def describe(self):
        subject = self.certificate.subject.rfc4514_string() or "(empty subject)"
        others = [w for w in self.wildcards if w != self.primary]
        text = (
            f"subject {subject}, primary wildcard {self.primary}, "
            f"expires {self.certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
        )
        if others:
            text += f" (also covers {', '.join(others)}, not used for URLs)"
        return text


def load_certificate_bytes(cert_pem, key_pem, sni_host=None, alpn=()):
    leaf, chain, key = parse_pem(cert_pem, key_pem)
    try:
        wildcards = tuple(wildcard_names(leaf))
    except Exception as e:  # a malformed extension is only parsed here
        raise CertificateError(f"cannot read the certificate names ({e})") from None
    domain = select_domain(wildcards, sni_host)
    try:
        options = make_tls_options(leaf, key, chain, alpn)
    except (SSL.Error, ValueError, TypeError) as e:
        raise CertificateError(f"OpenSSL rejected the certificate or key ({e})") from None
    digest = hashlib.sha256(
        hashlib.sha256(cert_pem).digest() + hashlib.sha256(key_pem).digest()
    ).hexdigest()
    return LoadedCertificate(leaf, chain, key, wildcards, domain, digest, options)


def _read(path, what):
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_SIZE + 1)
    except OSError as e:
        raise CertificateError(f"cannot read {what} file {path}: {e.strerror or e}") from None
    if len(data) > MAX_FILE_SIZE:
        raise CertificateError(f"{what} file {path} is larger than {MAX_FILE_SIZE} bytes")
    return data


def load_certificate(cert_path, key_path, sni_host=None, alpn=()):
    """Load and validate the pair of files; `CertificateError` on any problem."""
    if not cert_path or not key_path:
        raise CertificateError("ingress-sni-cert and ingress-sni-key are required")
    return load_certificate_bytes(
        _read(cert_path, "certificate"), _read(key_path, "key"), sni_host, alpn
    )


# -- live reload -----------------------------------------------------------------


def _stat_signature(path):
    try:
        st = os.stat(path)
    except OSError as e:
        return ("error", e.errno)
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


@implementer(IOpenSSLServerConnectionCreator)
class CertificateWatcher(service.MultiService):
    """
    The current SNI certificate, reloaded when its files change.

    Loads at construction (`CertificateError` if unusable: a startup error).
    While running, every ``interval`` seconds it stats both files (mtime,
    size, inode, device); when a signature changed, or a file was modified
    so recently that a same-size rewrite within the timestamp granularity
    could hide (the "racy git" window), both files are re-read and compared
    by content hash. A new content is fully validated; if valid it is used
    for new handshakes (`serverConnectionForTLS`, `current`), otherwise a
    warning is logged once per broken content and the previous certificate
    stays. A failing content gets one interval of grace before the warning,
    so a writer replacing the certificate and then the key is not reported.
    """

    name = "sni-certificate"

    def __init__(
        self,
        cert_path,
        key_path,
        clock,
        interval=2.0,
        sni_host=None,
        alpn=(),
        wallclock=time.time,
    ):
        super().__init__()
        self.cert_path = cert_path
        self.key_path = key_path
        self.clock = clock
        self.interval = interval
        self.sni_host = sni_host
        self.alpn = tuple(alpn)
        self._wallclock = wallclock
        self._listeners = []
        self._signature = self._signatures()
        self.current = load_certificate(cert_path, key_path, sni_host, self.alpn)
        self._pending = None  # digest/reason seen failing once (grace)
        self._reported = None  # digest/reason already warned about
        log.info("SNI certificate: {description}", description=self.current.describe())
        # polls while the watcher runs, first one interval after it starts
        Periodic(interval, self.check, clock, "SNI certificate check").setServiceParent(self)

    # -- IOpenSSLServerConnectionCreator

    def serverConnectionForTLS(self, tlsProtocol):
        return self.current.options.serverConnectionForTLS(tlsProtocol)

    @property
    def domain(self):
        return self.current.domain

    def url(self, tunnel_id, sni_port=4430):
        return sni_url(tunnel_id, self.current.domain, sni_port, self.sni_host)

    def add_listener(self, callback):
        """``callback(loaded_certificate)`` after every successful reload."""
        self._listeners.append(callback)

    # -- polling

    def _signatures(self):
        return (_stat_signature(self.cert_path), _stat_signature(self.key_path))

    def _racy(self, signature):
        now = self._wallclock()
        window = max(2 * self.interval, 2.0)
        for sig in signature:
            if sig[0] == "error":
                continue
            if now - sig[0] / 1e9 < window:
                return True
        return False

    def check(self):
        """One poll; returns True when a new certificate was swapped in."""
        try:
            return self._check()
        except Exception:  # never let the LoopingCall die
            log.failure("SNI certificate check failed")
            return False

    def _check(self):
        signature = self._signatures()
        if signature == self._signature and not self._racy(signature):
            return False
        self._signature = signature
        try:
            cert_pem = _read(self.cert_path, "certificate")
            key_pem = _read(self.key_path, "key")
        except CertificateError as e:
            return self._failed(("unreadable", e.reason), e.reason)
        digest = hashlib.sha256(
            hashlib.sha256(cert_pem).digest() + hashlib.sha256(key_pem).digest()
        ).hexdigest()
        if digest == self.current.digest:
            self._pending = self._reported = None
            return False
        if digest == self._reported:
            return False
        try:
            loaded = load_certificate_bytes(cert_pem, key_pem, self.sni_host, self.alpn)
        except CertificateError as e:
            return self._failed(digest, e.reason)
        self.current = loaded
        self._pending = self._reported = None
        log.info(
            "SNI certificate reloaded: {description}", description=loaded.describe()
        )
        for callback in list(self._listeners):
            try:
                callback(loaded)
            except Exception:
                log.failure("SNI certificate listener failed")
        return True

    def _failed(self, key, reason):
        if key == self._reported:
            return False
        if key != self._pending:
            self._pending = key
            # Look again next time even if nothing changes on disk.
            self._signature = None
            return False
        self._reported = key
        self._pending = None
        log.warn(
            "SNI certificate reload failed, keeping the previous certificate: {reason}",
            reason=reason,
        )
        return False
