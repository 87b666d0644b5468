"""Tests of exposr.ingress.certificate (SNI certificate rules and reload)."""

import datetime
import os
import ssl
import warnings

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.filepath import FilePath
from twisted.trial import unittest

from exposr.ingress.certificate import (
    CertificateError,
    CertificateWatcher,
    load_certificate,
    load_certificate_bytes,
    make_tls_options,
    parse_sni_host,
    select_domain,
    sni_url,
    wildcard_names,
)

# -- certificate factory (also used by tests.test_sni) ---------------------------


def make_key(kind="ec"):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def make_cert(cn="*.example.test", sans=(), key=None, issuer=None, extra_rdns=(), ca=False):
    """
    ``(certificate, key)``; self-signed unless ``issuer=(cert, key)``.

    ``cn=None`` leaves the subject without a CN; ``extra_rdns`` are appended
    after the CN (so CN is not the last RDN).
    """
    key = key or make_key()
    attrs = []
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    attrs += [x509.NameAttribute(oid, value) for oid, value in extra_rdns]
    subject = x509.Name(attrs)
    issuer_name, signing_key = subject, key
    if issuer is not None:
        issuer_name, signing_key = issuer[0].subject, issuer[1]
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), critical=False
        )
    return builder.sign(signing_key, hashes.SHA256()), key


def cert_pem(*certs):
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key, password=None):
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def write_pair(directory, cert, key, chain=(), name="tls"):
    """Write ``<name>.crt`` / ``<name>.key`` in ``directory``; return the paths."""
    cert_path = os.path.join(directory, name + ".crt")
    key_path = os.path.join(directory, name + ".key")
    with open(cert_path, "wb") as f:
        f.write(cert_pem(cert, *chain))
    with open(key_path, "wb") as f:
        f.write(key_pem(key))
    return cert_path, key_path


def replace_atomically(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def rewrite_in_place(path, data):
    with open(path, "r+b") as f:
        f.seek(0)
        f.write(data)
        f.truncate()


class LogCapture:
    def __init__(self, testcase):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def warnings(self):
        return [e for e in self.events if e.get("log_level") and e["log_level"].name == "warn"]


# -- in-memory TLS handshake with Python's ssl module --------------------------


class Collect(Protocol):
    def connectionMade(self):
        self.received = b""

    def dataReceived(self, data):
        self.received += data
        self.transport.write(data.upper())


def handshake(creator, server_name="t1.example.test", alpn=("h2", "http/1.1"), cafile=None):
    """
    Run a TLS handshake between ``creator`` (server side, in a
    TLSMemoryBIOProtocol) and an ``ssl.SSLObject`` client; exchange one
    message. Returns ``(sslobject, peer certificate DER, echoed bytes)``.
    """
    clock = Clock()  # TLS writes are aggregated until the next reactor turn
    factory = TLSMemoryBIOFactory(creator, False, Factory.forProtocol(Collect), clock=clock)
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    transport = StringTransport()
    proto.makeConnection(transport)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cadata=cafile)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)

    def pump():
        for _ in range(20):
            out = outgoing.read()
            if out:
                proto.dataReceived(out)
            clock.advance(0)
            back = transport.value()
            transport.clear()
            if back:
                incoming.write(back)
            if not out and not back:
                return

    for _ in range(10):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            pump()
    client.write(b"hello")
    pump()
    echoed = b""
    try:
        echoed = client.read(100)
    except ssl.SSLWantReadError:
        pass
    return client, client.getpeercert(binary_form=True), echoed


# -- tests ----------------------------------------------------------------------


class WildcardRuleTests(unittest.TestCase):
    """Wildcard selection (docs/protocol.rst, "Wildcard certificate")."""

    def load(self, cert, key, sni_host=None):
        return load_certificate_bytes(cert_pem(cert), key_pem(key), sni_host)

    def test_cn_only(self):
        loaded = self.load(*make_cert("*.example.com"))
        self.assertEqual(loaded.wildcards, ("*.example.com",))
        self.assertEqual(loaded.domain, "example.com")

    def test_cn_localhost_with_san(self):
        loaded = self.load(*make_cert("localhost", ["*.example.com", "*.localhost"]))
        self.assertEqual(loaded.wildcards, ("*.example.com", "*.localhost"))
        self.assertEqual(loaded.domain, "example.com")
        self.assertIn("also covers *.localhost", loaded.describe())

    def test_no_wildcard(self):
        with self.assertRaises(CertificateError) as cm:
            self.load(*make_cert("localhost"))
        self.assertTrue(str(cm.exception).startswith("Failed to load certificate: "))
        self.assertIn("no wildcard", str(cm.exception))

    def test_no_cn(self):
        loaded = self.load(*make_cert(None, ["plain.example.test", "*.example.test"]))
        self.assertEqual(loaded.domain, "example.test")

    def test_cn_before_san(self):
        cert, _ = make_cert("*.cn.test", ["*.san1.test", "*.san2.test"])
        self.assertEqual(wildcard_names(cert), ["*.cn.test", "*.san1.test", "*.san2.test"])

    def test_san_order(self):
        cert, _ = make_cert("host", ["*.b.test", "a.test", "*.a.test"])
        self.assertEqual(wildcard_names(cert), ["*.b.test", "*.a.test"])

    def test_duplicates_collapsed(self):
        cert, _ = make_cert("*.example.test", ["*.example.test", "*.other.test"])
        self.assertEqual(wildcard_names(cert), ["*.example.test", "*.other.test"])

    def test_cn_not_last_rdn(self):
        """The CN value is parsed, not "everything after CN=" of a string."""
        cert, key = make_cert(
            "*.example.test", extra_rdns=[(NameOID.ORGANIZATION_NAME, "Org, Inc.")]
        )
        self.assertEqual(self.load(cert, key).domain, "example.test")

    def test_sni_host_selects_wildcard(self):
        cert, key = make_cert("localhost", ["*.example.com", "*.localhost"])
        self.assertEqual(self.load(cert, key, "localhost").domain, "localhost")
        self.assertEqual(self.load(cert, key, "tcp://LOCALHOST:443").domain, "localhost")
        with self.assertRaises(CertificateError) as cm:
            self.load(cert, key, "other.test:443")
        self.assertIn("no wildcard for other.test", str(cm.exception))

    def test_select_domain(self):
        self.assertEqual(select_domain(["*.a.test", "*.b.test"], "b.test:1"), "b.test")
        self.assertRaises(CertificateError, select_domain, [])


class UrlTests(unittest.TestCase):
    """The advertised ``tcps://<id>.<domain>:<port>`` URL."""

    def test_table(self):
        self.assertEqual(sni_url("test", "example.com"), "tcps://test.example.com:4430")
        self.assertEqual(sni_url("test", "example.com", 44300), "tcps://test.example.com:44300")
        self.assertEqual(
            sni_url("test", "example.com", 4430, "example.com:443"),
            "tcps://test.example.com:443",
        )
        self.assertEqual(
            sni_url("test", "example.com", 4430, "tcp://example.com:443"),
            "tcps://test.example.com:443",
        )
        self.assertEqual(
            sni_url("test", "example.com", 44300, "example.com"),
            "tcps://test.example.com:44300",
        )

    def test_parse_sni_host(self):
        self.assertEqual(parse_sni_host("example.com"), ("example.com", None))
        self.assertEqual(parse_sni_host("Example.COM:443"), ("example.com", 443))
        self.assertEqual(parse_sni_host("https://example.com:8443/x"), ("example.com", 8443))
        self.assertEqual(parse_sni_host("tcp://example.com"), ("example.com", None))
        self.assertEqual(parse_sni_host("[::1]:443"), ("::1", 443))
        for bad in ("", "example.com:x", "example.com:70000", "tcp://:443", "[::1"):
            self.assertRaises(ValueError, parse_sni_host, bad)


class LoadTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def assertFails(self, cert_path, key_path, fragment):
        with self.assertRaises(CertificateError) as cm:
            load_certificate(cert_path, key_path)
        message = str(cm.exception)
        self.assertTrue(message.startswith("Failed to load certificate: "), message)
        self.assertIn(fragment, message)
        self.assertNotIn("\n", message)

    def test_chain(self):
        ca, ca_key = make_cert("Test CA", ca=True)
        leaf, key = make_cert("*.example.test", issuer=(ca, ca_key))
        cert_path, key_path = write_pair(self.dir, leaf, key, chain=[ca])
        loaded = load_certificate(cert_path, key_path)
        self.assertEqual(loaded.certificate, leaf)
        self.assertEqual(loaded.chain, (ca,))
        # The client verifying against the CA only needs the chain to be served.
        _, der, echoed = handshake(loaded.options, cafile=cert_pem(ca).decode())
        self.assertEqual(der, leaf.public_bytes(serialization.Encoding.DER))
        self.assertEqual(echoed, b"HELLO")

    def test_rsa(self):
        cert, key = make_cert("*.example.test", key=make_key("rsa"))
        loaded = load_certificate(*write_pair(self.dir, cert, key))
        self.assertEqual(loaded.domain, "example.test")

    def test_combined_key_file(self):
        """A key file that also holds the certificate (a common bundle)."""
        cert, key = make_cert()
        cert_path, key_path = write_pair(self.dir, cert, key)
        with open(key_path, "wb") as f:
            f.write(cert_pem(cert) + key_pem(key))
        self.assertEqual(load_certificate(cert_path, key_path).domain, "example.test")

    def test_mismatched_key(self):
        cert, _ = make_cert()
        cert_path, key_path = write_pair(self.dir, cert, make_key())
        self.assertFails(cert_path, key_path, "does not match")

    def test_garbage_certificate(self):
        cert_path, key_path = write_pair(self.dir, *make_cert())
        with open(cert_path, "wb") as f:
            f.write(b"garbage\n")
        self.assertFails(cert_path, key_path, "no PEM certificate")
        with open(cert_path, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        self.assertFails(cert_path, key_path, "no PEM certificate")

    def test_garbage_key(self):
        cert_path, key_path = write_pair(self.dir, *make_cert())
        with open(key_path, "wb") as f:
            f.write(os.urandom(300))
        self.assertFails(cert_path, key_path, "cannot parse the private key")

    def test_encrypted_key(self):
        cert, key = make_cert()
        cert_path, key_path = write_pair(self.dir, cert, key)
        with open(key_path, "wb") as f:
            f.write(key_pem(key, b"secret"))
        self.assertFails(cert_path, key_path, "encrypted")

    def test_missing_and_unreadable(self):
        cert_path, key_path = write_pair(self.dir, *make_cert())
        self.assertFails(cert_path + ".nope", key_path, "cannot read certificate file")
        self.assertFails(cert_path, self.dir, "cannot read key file")
        self.assertFails(None, key_path, "required")


class TLSOptionsTests(unittest.TestCase):
    def test_alpn_offering_clients_are_served(self):
        """The ALPN pitfall: curl-like clients must complete the handshake."""
        cert, key = make_cert()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no pyOpenSSL deprecation warnings
            options = make_tls_options(cert, key)
        client, der, echoed = handshake(options, alpn=("h2", "http/1.1"))
        self.assertEqual(echoed, b"HELLO")
        self.assertIsNone(client.selected_alpn_protocol())
        client, _, echoed = handshake(options, alpn=None)
        self.assertEqual(echoed, b"HELLO")

    def test_alpn_list(self):
        cert, key = make_cert()
        options = make_tls_options(cert, key, alpn=[b"http/1.1"])
        client, _, echoed = handshake(options, alpn=("h2", "http/1.1"))
        self.assertEqual(client.selected_alpn_protocol(), "http/1.1")
        client, _, echoed = handshake(options, alpn=("h2",))  # no overlap: no ALPN
        self.assertEqual(echoed, b"HELLO")
        self.assertIsNone(client.selected_alpn_protocol())

    def test_no_deprecation_warnings(self):
        cert, key = make_cert()
        make_tls_options(cert, key)
        self.assertEqual(self.flushWarnings(), [])


class WatcherTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.cert, self.key = make_cert("*.example.test")
        self.cert_path, self.key_path = write_pair(self.dir, self.cert, self.key)
        self.clock = Clock()
        self.logs = LogCapture(self)

    def watcher(self, **kw):
        w = CertificateWatcher(self.cert_path, self.key_path, self.clock, **kw)
        w.startService()
        self.addCleanup(w.stopService)
        return w

    def served(self, watcher):
        _, der, echoed = handshake(watcher)
        self.assertEqual(echoed, b"HELLO")
        return x509.load_der_x509_certificate(der)

    def test_startup_failure(self):
        with open(self.key_path, "wb") as f:
            f.write(key_pem(make_key()))
        with self.assertRaises(CertificateError) as cm:
            CertificateWatcher(self.cert_path, self.key_path, self.clock)
        self.assertEqual(
            str(cm.exception),
            "Failed to load certificate: the private key does not match the certificate",
        )

    def test_serves_current(self):
        w = self.watcher()
        self.assertEqual(self.served(w), self.cert)
        self.assertEqual(w.domain, "example.test")
        self.assertEqual(w.url("t1", 4430), "tcps://t1.example.test:4430")

    def test_no_change_no_reload(self):
        w = self.watcher()
        before = w.current
        self.clock.advance(2)
        self.clock.advance(2)
        self.assertIs(w.current, before)
        # Touching the file (same content) does not reload either (content, not metadata, counts).
        os.utime(self.cert_path, None)
        self.assertFalse(w.check())
        self.assertIs(w.current, before)

    def test_atomic_replace(self):
        w = self.watcher()
        seen = []
        w.add_listener(seen.append)
        cert2, key2 = make_cert("localhost", ["*.other.test"])
        replace_atomically(self.key_path, key_pem(key2))
        replace_atomically(self.cert_path, cert_pem(cert2))
        self.clock.advance(2)
        self.assertEqual(w.domain, "other.test")
        self.assertEqual(self.served(w), cert2)
        self.assertEqual([c.domain for c in seen], ["other.test"])
        self.assertEqual(self.logs.warnings(), [])

    def test_atomic_replace_outside_racy_window(self):
        """Old files: only the stat signature (inode here) reveals the change."""
        w = self.watcher(wallclock=lambda: 2e9 * 10)
        cert2, key2 = make_cert("*.new.test", key=self.key)
        replace_atomically(self.cert_path, cert_pem(cert2))
        self.clock.advance(2)
        self.assertEqual(w.domain, "new.test")

    def test_in_place_rewrite(self):
        w = self.watcher()
        cert2, _ = make_cert("*.inplace.test", key=self.key)
        rewrite_in_place(self.cert_path, cert_pem(cert2))
        self.clock.advance(2)
        self.assertEqual(w.domain, "inplace.test")
        self.assertEqual(self.served(w), cert2)

    def test_same_size_same_mtime_rewrite(self):
        """A rewrite the stat signature cannot see is caught by the content hash."""
        w = self.watcher()
        st = os.stat(self.cert_path)
        for _ in range(200):  # ECDSA signatures vary in length: find a same-size one
            cert2, _ = make_cert("*.example.test", key=self.key)
            data = cert_pem(cert2)
            if len(data) == st.st_size:
                break
        self.assertEqual(len(data), st.st_size)
        rewrite_in_place(self.cert_path, data)
        os.utime(self.cert_path, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.clock.advance(2)
        self.assertEqual(w.current.certificate, cert2)

    def test_broken_reload_keeps_old(self):
        w = self.watcher()
        before = w.current
        replace_atomically(self.cert_path, b"-----BEGIN CERTIFICATE-----\nbroken\n")
        self.clock.advance(2)  # grace: a writer may still be busy
        self.assertEqual(self.logs.warnings(), [])
        self.clock.advance(2)
        self.clock.advance(2)
        self.assertIs(w.current, before)
        self.assertEqual(self.served(w), self.cert)
        warned = self.logs.warnings()
        self.assertEqual(len(warned), 1)  # once per broken content
        from twisted.logger import formatEvent

        text = formatEvent(warned[0])
        self.assertIn("keeping the previous certificate", text)
        self.assertIn("no PEM certificate", text)
        self.assertNotIn("\n", text)
        # Fixed: taken up.
        cert2, _ = make_cert("*.fixed.test", key=self.key)
        replace_atomically(self.cert_path, cert_pem(cert2))
        self.clock.advance(2)
        self.assertEqual(w.domain, "fixed.test")

    def test_mismatch_then_key(self):
        """Certificate replaced first, key one poll later: no warning, new pair used."""
        w = self.watcher()
        cert2, key2 = make_cert("*.rotated.test")
        replace_atomically(self.cert_path, cert_pem(cert2))
        self.clock.advance(2)
        self.assertEqual(w.domain, "example.test")
        replace_atomically(self.key_path, key_pem(key2))
        self.clock.advance(2)
        self.assertEqual(w.domain, "rotated.test")
        self.assertEqual(self.logs.warnings(), [])

    def test_file_removed(self):
        w = self.watcher()
        os.remove(self.key_path)
        for _ in range(3):
            self.clock.advance(2)
        self.assertEqual(w.domain, "example.test")
        self.assertEqual(len(self.logs.warnings()), 1)
        FilePath(self.key_path).setContent(key_pem(self.key))
        self.clock.advance(2)
        self.assertEqual(w.domain, "example.test")

    def test_stop(self):
        w = self.watcher()
        w.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
