"""Tests of exposr.ingress.sni: real sockets on port 0, real TLS clients."""

import functools
import os
import shutil
import socket
import ssl

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer, protocol, reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import resource, server
from zope.interface import implementer

from exposr.ingress.certificate import CertificateWatcher, make_tls_options
from exposr.ingress.clienthello import ClientHelloParser
from exposr.ingress.sni import Route, SNIIngressFactory, SNIRefused, tunnel_id_from_server_name
from tests import procs
from tests.test_certificate import LogCapture, cert_pem, make_cert, replace_atomically, write_pair
from tests.test_clienthello import python_hello, records, unwrap

_DER = Encoding.DER

# -- targets --------------------------------------------------------------------


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        return b"hello from target " + request.uri + b"\n"


class Echo(protocol.Protocol):
    def connectionMade(self):
        self.factory.connections.append(self)
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.transport.write(data)

    def connectionLost(self, reason):
        self.lost.callback(None)


@implementer(IPushProducer)
class Pusher(protocol.Protocol):
    """Sends ``factory.limit`` bytes as fast as its transport accepts them."""

    chunk = b"x" * 65536

    def connectionMade(self):
        self.sent = 0
        self.paused = False
        self.factory.connections.append(self)
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        while not self.paused and self.sent < self.factory.limit:
            self.transport.write(self.chunk)
            self.sent += len(self.chunk)
        if self.sent >= self.factory.limit:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def stopProducing(self):
        self.paused = True


class TargetFactory(protocol.Factory):
    def __init__(self, proto, **kw):
        self.protocol = proto
        self.connections = []
        self.__dict__.update(kw)


# -- helpers -----------------------------------------------------------------------


def blocking_tls_client(port, server_name, payload=b"", cafile=None, read=True, timeout=10):
    """Connect with Python's ssl module (in a thread); return (peer cert DER, data)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile:
        ctx.load_verify_locations(cafile)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with ctx.wrap_socket(sock, server_hostname=server_name) as tls:
        der = tls.getpeercert(binary_form=True)
        if payload:
            tls.sendall(payload)
        data = b""
        if read:
            while len(data) < len(payload) or not payload:
                try:
                    chunk = tls.recv(65536)
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ConnectionResetError):
                    break
                if not chunk:
                    break
                data += chunk
        return der, data


def raw_client(port, data, timeout=10):
    """Send raw bytes; return what came back before the server closed."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        if data:
            sock.sendall(data)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return received, "reset"
            if not chunk:
                return received, "eof"
            received += chunk
    finally:
        sock.close()


run = functools.partial(procs.run, timeout=15)  # (exit code, stdout, stderr), bounded


# -- tests -------------------------------------------------------------------------


class SNITestBase(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.cert, self.key = make_cert("*.example.test", ["*.example.test"])
        self.cert_path, self.key_path = write_pair(self.dir, self.cert, self.key)
        self.watcher = CertificateWatcher(self.cert_path, self.key_path, reactor)
        self.logs = LogCapture(self)
        self.routes = {}
        self.resolved = []

        web = reactor.listenTCP(0, server.Site(Hello()), interface="127.0.0.1")
        self.addCleanup(web.stopListening)
        self.web_port = web.getHost().port
        self.echo = TargetFactory(Echo)
        echo = reactor.listenTCP(0, self.echo, interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        self.echo_port = echo.getHost().port

        self.routes["t1"] = TCP4ClientEndpoint(reactor, "127.0.0.1", self.web_port)
        self.routes["echo"] = TCP4ClientEndpoint(reactor, "127.0.0.1", self.echo_port)
        self.factory = self.make_factory()
        listening = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port

    def make_factory(self, **kw):
        return SNIIngressFactory(self.resolve, self.watcher, reactor, **kw)

    def resolve(self, tunnel_id):
        self.resolved.append(tunnel_id)
        route = self.routes.get(tunnel_id)
        if route is None:
            raise SNIRefused(f"unknown tunnel {tunnel_id}")
        if isinstance(route, Exception):
            return defer.fail(route)
        # Answer asynchronously, as a storage lookup would.
        return task.deferLater(reactor, 0, lambda: route)

    def sni_lines(self):
        return [
            formatEvent(e)
            for e in self.logs.events
            if e.get("log_namespace") == "exposr.ingress.sni"
        ]

    @defer.inlineCallbacks
    def wait_closed(self):
        """Until the ingress has no connection left (bounded)."""
        for _ in range(200):
            if not self.factory.connections:
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail(f"connections left open: {self.factory.connections}")


class RealClientTests(SNITestBase):
    @defer.inlineCallbacks
    def test_curl(self):
        """curl offers ALPN (h2, http/1.1) and verifies the wildcard certificate."""
        if shutil.which("curl") is None:
            raise unittest.SkipTest("curl not installed")
        out, err, code = yield getProcessOutputAndValue(
            "curl",
            [
                "-sS", "--max-time", "10",
                "--resolve", f"t1.example.test:{self.port}:127.0.0.1",
                "--cacert", self.cert_path,
                f"https://t1.example.test:{self.port}/path?q=1",
            ],
            env=os.environ,
            reactor=reactor,
        )
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(out, b"hello from target /path?q=1\n")
        self.assertEqual(self.resolved, ["t1"])
        yield self.wait_closed()
        self.assertEqual(self.sni_lines(), [])

    @defer.inlineCallbacks
    def test_curl_keepalive_two_requests(self):
        if shutil.which("curl") is None:
            raise unittest.SkipTest("curl not installed")
        url = f"https://t1.example.test:{self.port}/"
        out, err, code = yield getProcessOutputAndValue(
            "curl",
            ["-sS", "--max-time", "10", "--resolve", f"t1.example.test:{self.port}:127.0.0.1",
             "--cacert", self.cert_path, url + "a", url + "b"],
            env=os.environ,
            reactor=reactor,
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"hello from target /a\nhello from target /b\n")
        self.assertEqual(self.resolved, ["t1"])  # one TLS connection

    @defer.inlineCallbacks
    def test_openssl_s_client(self):
        if shutil.which("openssl") is None:
            raise unittest.SkipTest("openssl not installed")
        request = b"GET /s_client HTTP/1.0\r\nHost: t1.example.test\r\n\r\n"
        code, out, err = yield run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{self.port}",
             "-servername", "t1.example.test", "-CAfile", self.cert_path,
             "-verify_return_error", "-quiet", "-ign_eof"],
            stdin=request,
        )
        self.assertIn(b"HTTP/1.0 200 OK", out)
        self.assertIn(b"hello from target /s_client", out)
        self.assertEqual(code, 0, err)

    @defer.inlineCallbacks
    def test_openssl_s_client_unknown_tunnel(self):
        if shutil.which("openssl") is None:
            raise unittest.SkipTest("openssl not installed")
        code, out, err = yield run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{self.port}",
             "-servername", "nope.example.test", "-ign_eof"],
        )
        self.assertNotEqual(code, 0)
        self.assertNotIn(b"BEGIN CERTIFICATE", out)  # no handshake happened
        yield self.wait_closed()
        lines = self.sni_lines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("refused tunnel nope: SNIRefused: unknown tunnel nope", lines[0])

    @defer.inlineCallbacks
    def test_python_client_echo_large(self):
        payload = os.urandom(4 * 1024 * 1024)
        der, data = yield threads.deferToThread(
            blocking_tls_client, self.port, "echo.example.test", payload, self.cert_path
        )
        self.assertEqual(len(data), len(payload))
        self.assertEqual(data, payload)
        self.assertEqual(der, self.cert.public_bytes(_DER))
        yield self.wait_closed()
        # The client closing closed the upstream connection too.
        yield self.echo.connections[0].lost

    @defer.inlineCallbacks
    def test_hello_across_records_and_bytes(self):
        """A ClientHello split over three records, sent byte by byte, is replayed intact."""
        parser = ClientHelloParser()
        hello = python_hello("echo.example.test", None)
        self.assertIsNotNone(parser.feed(hello))
        # The TLS library on our side must accept the re-recorded hello as is;
        # re-recording is transparent to the handshake transcript.
        hs = unwrap(hello)
        split = records(hs, [40, 100])

        def go():
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            try:
                for i in range(len(split)):
                    sock.send(split[i : i + 1])
                first = sock.recv(5)
                return first
            finally:
                sock.close()

        first = yield threads.deferToThread(go)
        self.assertEqual(first[:1], b"\x16")  # a ServerHello record came back

    @defer.inlineCallbacks
    def test_certificate_reload_new_connections(self):
        cert2, _ = make_cert("*.example.test", ["*.example.test"], key=self.key)
        der1, _ = yield threads.deferToThread(blocking_tls_client, self.port, "echo.example.test", b"x")
        replace_atomically(self.cert_path, cert_pem(cert2))
        self.watcher.check()  # what the running watcher does on its own
        der2, _ = yield threads.deferToThread(blocking_tls_client, self.port, "echo.example.test", b"x")
        self.assertEqual(der1, self.cert.public_bytes(_DER))
        self.assertEqual(der2, cert2.public_bytes(_DER))



class RefusalTests(SNITestBase):
    def assertOneLine(self, fragment):
        lines = self.sni_lines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(fragment, lines[0])
        self.assertNotIn("Traceback", lines[0])
        return lines[0]

    @defer.inlineCallbacks
    def assertHandshakeRefused(self, server_name):
        try:
            yield threads.deferToThread(blocking_tls_client, self.port, server_name, b"x")
        except (ssl.SSLError, ConnectionError, OSError):
            pass
        else:
            self.fail("handshake completed")
        yield self.wait_closed()

    @defer.inlineCallbacks
    def test_unknown_tunnel(self):
        yield self.assertHandshakeRefused("nope.example.test")
        self.assertOneLine("refused tunnel nope: SNIRefused: unknown tunnel nope")

    @defer.inlineCallbacks
    def test_no_sni(self):
        yield self.assertHandshakeRefused(None)
        self.assertOneLine("no SNI server name")
        self.assertEqual(self.resolved, [])

    @defer.inlineCallbacks
    def test_sni_disabled_async_failure(self):
        self.routes["off"] = SNIRefused("SNI ingress disabled for tunnel off")
        yield self.assertHandshakeRefused("off.example.test")
        self.assertOneLine("SNI ingress disabled for tunnel off")

    @defer.inlineCallbacks
    def test_resolver_raises_anything(self):
        def boom(tunnel_id):
            raise KeyError(tunnel_id)

        self.factory.resolve = boom
        yield self.assertHandshakeRefused("x.example.test")
        self.assertOneLine("KeyError")

    @defer.inlineCallbacks
    def test_domain_not_checked(self):
        """Only the first label counts; the rest of the name is not checked."""
        _, data = yield threads.deferToThread(
            blocking_tls_client, self.port, "ECHO.elsewhere.invalid", b"ping"
        )
        self.assertEqual(data, b"ping")
        self.assertEqual(self.resolved, ["echo"])

    @defer.inlineCallbacks
    def test_upstream_connect_fails(self):
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        self.routes["down"] = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        _, data = yield threads.deferToThread(blocking_tls_client, self.port, "down.example.test", b"ping")
        self.assertEqual(data, b"")  # handshake done, then closed
        yield self.wait_closed()
        self.assertOneLine("cannot open a stream to tunnel down: ConnectionRefusedError")

    @defer.inlineCallbacks
    def test_plain_http(self):
        received, how = yield threads.deferToThread(
            raw_client, self.port, b"GET / HTTP/1.1\r\nHost: t1.example.test\r\n\r\n"
        )
        self.assertEqual(received, b"")
        yield self.wait_closed()
        self.assertOneLine("bad ClientHello: not a TLS handshake record (plain HTTP?)")

    @defer.inlineCallbacks
    def test_garbage_and_sslv2(self):
        yield threads.deferToThread(raw_client, self.port, b"\x00" * 11)
        yield threads.deferToThread(raw_client, self.port, b"\x80\x2e\x01\x03\x01" + b"\x00" * 46)
        yield self.wait_closed()
        lines = self.sni_lines()
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("SSLv2", lines[1])

    @defer.inlineCallbacks
    def test_hello_timeout(self):
        self.factory.hello_timeout = 0.3
        hello = python_hello("echo.example.test")
        received, how = yield threads.deferToThread(raw_client, self.port, hello[:20])
        self.assertEqual(received, b"")
        yield self.wait_closed()
        self.assertOneLine("no complete ClientHello within 0.3 s")
        self.assertEqual(self.resolved, [])

    @defer.inlineCallbacks
    def test_handshake_stalls(self):
        """A client that sends its hello and nothing else is cut at setup_timeout."""
        self.factory.setup_timeout = 0.5
        hello = python_hello("echo.example.test")

        def stall():
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            sock.sendall(hello)
            data = b""
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except ConnectionResetError:
                pass
            sock.close()
            return data

        data = yield threads.deferToThread(stall)
        self.assertTrue(data.startswith(b"\x16\x03"))  # the ServerHello flight
        yield self.wait_closed()
        self.assertOneLine("connection not established within 0.5 s")
        self.assertEqual(self.echo.connections, [])

    @defer.inlineCallbacks
    def test_too_large_hello(self):
        self.factory.max_hello_size = 100
        yield self.assertHandshakeRefused("echo.example.test")
        self.assertOneLine("too large")

    @defer.inlineCallbacks
    def test_client_rejects_certificate(self):
        """A client that does not trust the certificate: one line, no upstream stream."""
        try:
            yield threads.deferToThread(
                blocking_tls_client, self.port, "echo.example.test", b"x", "/etc/ssl/certs/ca-certificates.crt"
            )
        except ssl.SSLError:
            pass
        yield self.wait_closed()
        self.assertOneLine("TLS handshake failed")
        self.assertEqual(self.echo.connections, [])

    @defer.inlineCallbacks
    def test_target_closes(self):
        """The upstream closing closes the TLS connection (close_notify then EOF)."""
        closing = TargetFactory(_SayAndClose)
        p = reactor.listenTCP(0, closing, interface="127.0.0.1")
        self.addCleanup(p.stopListening)
        self.routes["bye"] = TCP4ClientEndpoint(reactor, "127.0.0.1", p.getHost().port)

        def go():
            return blocking_tls_client(self.port, "bye.example.test", b"", None, read=True)

        _, data = yield threads.deferToThread(go)
        self.assertEqual(data, b"bye" * 100000)
        yield self.wait_closed()
        self.assertEqual(self.sni_lines(), [])


class _SayAndClose(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"bye" * 100000)
        self.transport.loseConnection()


class BackpressureTests(SNITestBase):
    @defer.inlineCallbacks
    def test_slow_reader_pauses_target(self):
        """A client that stops reading stops the target; nothing piles up in the relay."""
        pusher = TargetFactory(Pusher, limit=512 * 1024 * 1024)
        p = reactor.listenTCP(0, pusher, interface="127.0.0.1")
        self.addCleanup(p.stopListening)
        self.routes["push"] = TCP4ClientEndpoint(reactor, "127.0.0.1", p.getHost().port)

        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        tls = yield threads.deferToThread(ctx.wrap_socket, sock, server_hostname="push.example.test")
        self.addCleanup(tls.close)
        first = yield threads.deferToThread(tls.recv, 1024)
        self.assertTrue(first)
        # Stop reading. The relay must stop reading the target.
        yield task.deferLater(reactor, 1.0, lambda: None)
        sent1 = pusher.connections[0].sent
        yield task.deferLater(reactor, 1.0, lambda: None)
        sent2 = pusher.connections[0].sent
        self.assertEqual(sent1, sent2)
        self.assertLess(sent2, 64 * 1024 * 1024)
        (conn,) = self.factory.connections
        buffered = len(conn.transport.dataBuffer) + conn.transport._tempDataLen
        self.assertLess(buffered, 4 * 1024 * 1024)
        # Reading again resumes the flow.
        def drain(n):
            got = 0
            while got < n:
                got += len(tls.recv(1 << 20))
            return got

        yield threads.deferToThread(drain, sent2 + 10 * 1024 * 1024 - len(first))
        self.assertGreater(pusher.connections[0].sent, sent2)


    @defer.inlineCallbacks
    def test_target_not_reading_pauses_client(self):
        """A target that stops reading stops the relay reading the client."""
        deaf = TargetFactory(_Deaf)
        p = reactor.listenTCP(0, deaf, interface="127.0.0.1")
        self.addCleanup(p.stopListening)
        self.routes["deaf"] = TCP4ClientEndpoint(reactor, "127.0.0.1", p.getHost().port)
        limit = 256 * 1024 * 1024

        def flood():
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            tls = ctx.wrap_socket(sock, server_hostname="deaf.example.test")
            tls.settimeout(1.5)
            sent = 0
            chunk = b"y" * 65536
            try:
                while sent < limit:
                    tls.sendall(chunk)
                    sent += len(chunk)
            except (socket.timeout, ssl.SSLError, OSError):
                pass
            return tls, sent

        tls, sent = yield threads.deferToThread(flood)
        try:
            self.assertLess(sent, 64 * 1024 * 1024)
            (conn,) = self.factory.connections
            upstream = conn._upstream.transport
            self.assertLess(len(upstream.dataBuffer) + upstream._tempDataLen, 4 * 1024 * 1024)
        finally:
            tls.close()
        # (A paused client socket cannot see the client leave: the target
        # going away is what ends this one.)
        deaf.connections[0].transport.abortConnection()
        yield self.wait_closed()
        self.assertTrue(upstream.disconnected)


class _Deaf(protocol.Protocol):
    def connectionMade(self):
        self.factory.connections.append(self)
        self.transport.pauseProducing()


class PassthroughTests(SNITestBase):
    @defer.inlineCallbacks
    def test_passthrough(self):
        """The raw TLS bytes reach a TLS target untouched (its own certificate)."""
        target_cert, target_key = make_cert("*.other.test", ["*.other.test"])
        tls_target = TLSMemoryBIOFactory(make_tls_options(target_cert, target_key), False, self.echo)
        p = reactor.listenTCP(0, tls_target, interface="127.0.0.1")
        self.addCleanup(p.stopListening)
        self.routes["raw"] = Route(TCP4ClientEndpoint(reactor, "127.0.0.1", p.getHost().port), passthrough=True)
        self.routes["raw2"] = (TCP4ClientEndpoint(reactor, "127.0.0.1", p.getHost().port), True)
        payload = os.urandom(300000)
        for name in ("raw", "raw2"):
            der, data = yield threads.deferToThread(
                blocking_tls_client, self.port, f"{name}.example.test", payload
            )
            self.assertEqual(der, target_cert.public_bytes(_DER))
            self.assertEqual(data, payload)
        yield self.wait_closed()
        self.assertEqual(self.sni_lines(), [])

    @defer.inlineCallbacks
    def test_passthrough_connect_fails(self):
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        self.routes["gone"] = (TCP4ClientEndpoint(reactor, "127.0.0.1", port), True)
        try:
            yield threads.deferToThread(blocking_tls_client, self.port, "gone.example.test", b"x")
        except (ssl.SSLError, OSError):
            pass
        else:
            self.fail("handshake completed")
        yield self.wait_closed()
        lines = self.sni_lines()
        self.assertEqual(len(lines), 1, lines)


class HelperTests(unittest.TestCase):
    def test_tunnel_id(self):
        self.assertEqual(tunnel_id_from_server_name("Abc.example.com"), "abc")
        self.assertEqual(tunnel_id_from_server_name("abc"), "abc")
        self.assertIsNone(tunnel_id_from_server_name(None))
        self.assertIsNone(tunnel_id_from_server_name(".example.com"))


# -- in memory, with a Clock ---------------------------------------------------------


class FakeEndpoint:
    """connect() → a Deferred we fire by hand; the protocol gets a StringTransport."""

    def __init__(self):
        self.attempts = []

    def connect(self, factory):
        d = defer.Deferred(lambda d: self.attempts.remove((factory, d)))
        self.attempts.append((factory, d))
        return d

    def complete(self):
        factory, d = self.attempts.pop(0)
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        proto.makeConnection(transport)
        d.callback(proto)
        return proto, transport


class InMemoryTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.endpoint = FakeEndpoint()
        self.answers = {}
        d = self.mktemp()
        os.makedirs(d)
        cert, key = make_cert("*.example.test")
        watcher = CertificateWatcher(*write_pair(d, cert, key), self.clock)
        self.factory = SNIIngressFactory(self.resolve, watcher, self.clock, close_timeout=5)
        self.logs = LogCapture(self)

    def resolve(self, tunnel_id):
        answer = self.answers.get(tunnel_id)
        if answer is None:
            return defer.fail(SNIRefused("unknown"))
        return answer

    def connect(self):
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
        raw = StringTransport()
        proto.makeConnection(raw)
        return proto, raw

    def lines(self):
        return [formatEvent(e) for e in self.logs.events if e.get("log_namespace") == "exposr.ingress.sni"]

    def test_passthrough_splice_and_linger(self):
        self.answers["p"] = (self.endpoint, True)
        proto, raw = self.connect()
        hello = python_hello("p.example.test")
        proto.dataReceived(hello[:10])
        proto.dataReceived(hello[10:] + b"early")
        self.assertEqual(raw.producerState, "paused")  # nothing read while routing
        upstream, ut = self.endpoint.complete()
        self.assertEqual(ut.value(), hello + b"early")
        self.assertEqual(raw.producerState, "producing")
        self.assertIsNotNone(ut.producer)
        self.assertIsNotNone(raw.producer)
        proto.dataReceived(b"more")
        upstream.dataReceived(b"back")
        self.assertEqual(ut.value(), hello + b"earlymore")
        self.assertEqual(raw.value(), b"back")
        # Back-pressure proxies: pausing one side's consumer pauses the other.
        ut.producer.pauseProducing()  # the upstream is full: stop reading the client
        self.assertEqual(raw.producerState, "paused")
        ut.producer.resumeProducing()
        self.assertEqual(raw.producerState, "producing")
        raw.producer.pauseProducing()  # the client is full: stop reading the upstream
        self.assertEqual(ut.producerState, "paused")
        raw.producer.stopProducing()  # never closes the other side by itself
        self.assertFalse(ut.disconnecting)
        # Client goes; the upstream is closed, and aborted if it cannot flush.
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(ut.disconnecting)
        self.assertFalse(ut.disconnected)
        self.clock.advance(5)
        self.assertTrue(ut.disconnected)
        self.assertEqual(self.lines(), [])

    def test_client_leaves_while_resolving(self):
        later = defer.Deferred()
        self.answers["slow"] = later
        proto, raw = self.connect()
        proto.dataReceived(python_hello("slow.example.test"))
        proto.connectionLost(Failure(ConnectionDone()))
        later.callback(self.endpoint)
        self.assertEqual(self.endpoint.attempts, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_client_leaves_while_connecting(self):
        self.answers["c"] = Route(self.endpoint, passthrough=True)
        proto, raw = self.connect()
        proto.dataReceived(python_hello("c.example.test"))
        self.assertEqual(len(self.endpoint.attempts), 1)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.endpoint.attempts, [])  # cancelled
        self.assertEqual(self.lines(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_hello_timeout(self):
        proto, raw = self.connect()
        proto.dataReceived(b"\x16\x03\x01")
        self.clock.advance(9.9)
        self.assertFalse(raw.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(raw.disconnected)  # aborted
        proto.connectionLost(Failure(ConnectionDone()))
        (line,) = self.lines()
        self.assertIn("no complete ClientHello within 10 s", line)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_setup_timeout_while_connecting(self):
        self.answers["c"] = Route(self.endpoint, passthrough=True)
        proto, raw = self.connect()
        proto.dataReceived(python_hello("c.example.test"))
        self.clock.advance(30)
        self.assertTrue(raw.disconnected)
        self.assertEqual(self.endpoint.attempts, [])
        self.assertIn("not established within 30 s", self.lines()[0])

    def test_refusal_closes_cleanly(self):
        proto, raw = self.connect()
        proto.dataReceived(python_hello("nope.example.test"))
        self.assertTrue(raw.disconnecting)
        self.assertEqual(raw.value(), b"")  # no TLS bytes sent at all
        (line,) = self.lines()
        peer = raw.getPeer()
        self.assertIn(f"{peer.host}:{peer.port} -> nope.example.test: refused tunnel nope", line)
