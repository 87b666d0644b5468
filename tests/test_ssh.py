"""The SSH transport against a real OpenSSH client (docs/protocol.rst, "SSH transport")."""

import hashlib
import os
import signal
import struct

from twisted.conch.error import ConchError
from twisted.conch.ssh import common, connection
from twisted.internet import defer, protocol, reactor, utils
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.trial import unittest

from exposr.errors import TransportClosedError
from exposr.transport import ssh as sshmod
from exposr.transport.ssh import LOCAL_WINDOW, fingerprint, load_host_key
from exposr.transport.ssh.target import forward_target, render_target

from tests.test_ssh_support import (
    SSHPASS,
    Collect,
    Event,
    OneShot,
    conch_client,
    http_target,
    spawn_ssh,
    spawn_sshpass,
    split_http,
    start_server,
)


class Base(unittest.TestCase):
    timeout = 60

    def mktemp_home(self):
        path = self.mktemp()
        os.makedirs(path)
        return path

    @defer.inlineCallbacks
    def connect(self, forward_args, target=None, tunnel_id="tun1", password=False, **server_kw):
        """Server + tunnel + connected ssh client; returns (service, tunnels, registry, proc, conn)."""
        service, tunnels, registry = yield start_server(self, **server_kw)
        token = tunnels.add(tunnel_id, target=target, http_url="http://%s.localhost:8080/" % tunnel_id)
        if password:
            proc = spawn_sshpass(self, service.port, tunnel_id, token, "-N", *forward_args)
        else:
            proc = spawn_ssh(self, service.port, "%s:%s" % (tunnel_id, token), "-N", *forward_args)
        conn = yield registry.wait_registered()
        yield conn.when_forwarded(forward_args.count("-R"))
        return service, tunnels, registry, proc, conn


class TargetTests(unittest.TestCase):
    """The original's ``tcpip-forward`` examples, plus ports 80/443 adopted (docs/protocol.rst, "Remote forwarding")."""

    def check(self, current, address, port, new, reply):
        d = forward_target(current, address, port)
        self.assertEqual((d.new_target, d.reply_port), (new, reply))

    def test_examples(self):
        self.check(None, "localhost", 20000, "tcp://localhost:20000", 20000)
        self.check("https://localhost:20001", "localhost", 20001, None, 20001)
        self.check("http://old.example", "example.com", 8080, "http://example.com:8080/", 8080)
        self.check("http://example.com", "example.com", 80, None, 80)
        self.check("http://example.com:10000", "example.com", 0, None, 10000)
        self.check("http://example.com", "localhost", 0, None, 80)
        self.check(None, "127.0.0.1", 8000, "tcp://127.0.0.1:8000", 8000)

    def test_default_ports_adopted(self):
        self.check(None, "example.com", 80, "http://example.com/", 80)
        self.check(None, "example.com", 443, "https://example.com/", 443)
        self.check(None, "example.com", 21, "tcp://example.com:21", 21)
        self.check("tcp://a.example:5000", "example.com", 80, "tcp://example.com:80", 80)

    def test_wildcards_never_replace_a_target(self):
        self.check("http://example.com", "localhost", 3000, None, 80)
        self.check("http://example.com", "0.0.0.0", 3000, None, 80)
        self.check("http://example.com", "", 3000, None, 80)
        self.check(None, "", 0, None, 0)

    def test_render(self):
        self.assertEqual(render_target(None), "tcp://")
        self.assertEqual(render_target("http://example.com"), "http://example.com/")
        self.assertEqual(render_target("http://Example.com:80"), "http://example.com/")
        self.assertEqual(render_target("tcp://localhost:20000"), "tcp://localhost:20000")


class KeyTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_configured_key_fingerprint_matches_ssh_keygen(self):
        path = os.path.join(self.mktemp())
        yield utils.getProcessOutput("/usr/bin/ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", path])
        out = yield utils.getProcessOutput("/usr/bin/ssh-keygen", ["-lf", path + ".pub"])
        with open(path) as f:
            key = load_host_key(f.read())
        self.assertEqual(fingerprint(key), out.split()[1].decode("ascii"))

    def test_bad_key(self):
        self.assertRaises(ValueError, load_host_key, "-----BEGIN OPENSSH PRIVATE KEY-----\nnope\n")

    @defer.inlineCallbacks
    def test_generated_key_served(self):
        service, _, _ = yield start_server(self)
        self.assertTrue(service.fingerprint.startswith("SHA256:"))
        self.assertNotIn("=", service.fingerprint)
        self.assertTrue(service.port > 0)


class StreamTests(Base):
    @defer.inlineCallbacks
    def http_roundtrip(self, conn, target_body):
        proto = Collect(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        got = yield conn.open_stream(OneShot(proto))
        self.assertIs(got, proto)
        response = yield proto.done
        head, body = split_http(response)
        self.assertTrue(head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head[:40])
        self.assertEqual(body, target_body)

        payload = os.urandom(1024 * 1024 + 7)
        proto = Collect(
            b"POST / HTTP/1.0\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
        )
        yield conn.open_stream(OneShot(proto))
        _, body = split_http((yield proto.done))
        self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(payload).digest())

    @defer.inlineCallbacks
    def test_forward_port_zero(self):
        body = os.urandom(300 * 1024)
        port = yield http_target(self, body)
        service, tunnels, registry, proc, conn = yield self.connect(["-R", "0:127.0.0.1:%d" % port])
        self.assertEqual(conn.tunnel_id, "tun1")
        self.assertEqual(conn.peer, "127.0.0.1")
        self.assertTrue(conn.connection_id.startswith("node1:"))
        # bind address `localhost` (OpenSSH's default), an allocated port announced
        [(address, requested, announced)] = conn.forwards
        self.assertEqual((address, requested), ("localhost", 0))
        self.assertTrue(announced > 0)
        # no target: nothing adopted; the token was rotated by the registry
        self.assertEqual(tunnels.updates, [])
        yield self.http_roundtrip(conn, body)

    @defer.inlineCallbacks
    def test_forward_bind_address_sets_target(self):
        body = os.urandom(1000)
        port = yield http_target(self, body)
        service, tunnels, registry, proc, conn = yield self.connect(
            ["-R", "127.0.0.1:%d:127.0.0.1:%d" % (port, port)]
        )
        self.assertEqual(conn.forwards, [("127.0.0.1", port, port)])
        self.assertEqual(tunnels.records["tun1"]["target"]["url"], "tcp://127.0.0.1:%d" % port)
        yield self.http_roundtrip(conn, body)

    @defer.inlineCallbacks
    def test_password_login(self):
        if SSHPASS is None:
            raise unittest.SkipTest("sshpass not installed")
        body = b"hello"
        port = yield http_target(self, body)
        service, tunnels, registry, proc, conn = yield self.connect(
            ["-R", "0:127.0.0.1:%d" % port], password=True
        )
        yield self.http_roundtrip(conn, body)

    @defer.inlineCallbacks
    def test_second_forward(self):
        port_a = yield http_target(self, b"A" * 10)
        port_b = yield http_target(self, b"B" * 10)
        service, tunnels, registry, proc, conn = yield self.connect(
            ["-R", "0:127.0.0.1:%d" % port_a, "-R", "0:127.0.0.1:%d" % port_b]
        )
        self.assertEqual(len(conn.forwards), 2)
        self.assertNotEqual(conn.forwards[0][2], conn.forwards[1][2])
        proto = Collect(b"GET / HTTP/1.0\r\n\r\n")
        yield conn.open_stream(OneShot(proto))
        _, body = split_http((yield proto.done))
        self.assertEqual(body, b"B" * 10)  # the latest forward carries new streams

    @defer.inlineCallbacks
    def test_closing_a_stream_closes_only_its_channel(self):
        port = yield http_target(self, b"x")
        service, tunnels, registry, proc, conn = yield self.connect(["-R", "0:127.0.0.1:%d" % port])
        idle = Collect()
        yield conn.open_stream(OneShot(idle))
        idle.transport.loseConnection()
        yield idle.done
        proto = Collect(b"GET / HTTP/1.0\r\n\r\n")
        yield conn.open_stream(OneShot(proto))
        _, body = split_http((yield proto.done))
        self.assertEqual(body, b"x")
        self.assertIn(conn, registry.conns)
        self.assertIsNone(proc.exit_code)


class LoginTests(Base):
    @defer.inlineCallbacks
    def test_reused_token_refused(self):
        service, tunnels, registry = yield start_server(self)
        token = tunnels.add("tun1")
        first = spawn_ssh(self, service.port, "tun1:" + token, "-N", "-R", "0:127.0.0.1:9")
        yield registry.wait_registered()
        second = spawn_ssh(self, service.port, "tun1:" + token, "-N", "-R", "0:127.0.0.1:9")
        code = yield second.ended
        self.assertNotEqual(code, 0)
        self.assertIn(b"Permission denied", second.stderr)
        self.assertEqual(len(registry.registered), 1)
        self.assertIsNone(first.exit_code)

    @defer.inlineCallbacks
    def test_wrong_token_and_unknown_tunnel(self):
        service, tunnels, registry = yield start_server(self)
        tunnels.add("tun1")
        for user in ("tun1:wrong", "nosuch:token", "tun1"):
            proc = spawn_ssh(self, service.port, user, "-N", "-R", "0:127.0.0.1:9")
            code = yield proc.ended
            self.assertNotEqual(code, 0)
            self.assertIn(b"Permission denied (password)", proc.stderr)
        self.assertEqual(registry.registered, [])

    @defer.inlineCallbacks
    def test_registration_refused_disconnects(self):
        service, tunnels, registry = yield start_server(self)
        token = tunnels.add("tun1")
        registry.refuse = True
        proc = spawn_ssh(self, service.port, "tun1:" + token, "-N", "-R", "0:127.0.0.1:9")
        code = yield proc.ended
        self.assertNotEqual(code, 0)
        self.assertEqual(service.protocols, set())


class DisconnectTests(Base):
    @defer.inlineCallbacks
    def test_client_exit_unregisters(self):
        service, tunnels, registry, proc, conn = yield self.connect(["-R", "0:127.0.0.1:9"])
        proc.transport.signalProcess("TERM")
        yield registry.wait_unregistered(conn)
        d = conn.open_stream(OneShot(Collect()))
        yield self.assertFailure(d, TransportClosedError)

    @defer.inlineCallbacks
    def test_server_disconnect(self):
        service, tunnels, registry, proc, conn = yield self.connect(["-R", "0:127.0.0.1:9"])
        conn.disconnect("tunnel disconnected")
        code = yield proc.ended
        self.assertNotEqual(code, None)
        yield registry.wait_unregistered(conn)

    @defer.inlineCallbacks
    def test_session_banner_and_eof(self):
        service, tunnels, registry = yield start_server(self)
        token = tunnels.add("tun1", target="http://example.com", http_url="http://tun1.localhost:8080/")
        proc = spawn_ssh(self, service.port, "tun1:" + token, "-T", "-R", "example.com:80:127.0.0.1:9")
        conn = yield registry.wait_registered()
        yield proc.wait_stdout(b"HTTP ingress")
        self.assertEqual(
            proc.stdout,
            b"Target URL: http://example.com/\r\nHTTP ingress: http://tun1.localhost:8080/\r\n",
        )
        proc.transport.closeStdin()  # EOF on the session: the whole connection ends
        yield registry.wait_unregistered(conn)
        yield proc.ended

    @defer.inlineCallbacks
    def test_keepalive(self):
        service, tunnels, registry, proc, conn = yield self.connect(["-R", "0:127.0.0.1:9"])
        ssh_conn = conn._conn
        replies = Event()
        count = [0]
        original = ssh_conn._pong

        def pong(r):
            count[0] += 1
            original(r)
            replies.fire()

        ssh_conn._pong = pong
        for i in range(1, 5):  # a live client answers (OpenSSH: with failure)
            service.clock.advance(15)
            yield replies.wait(lambda: count[0] >= i)
        self.assertIn(conn, registry.conns)
        os.kill(proc.transport.pid, signal.SIGSTOP)  # now it answers nothing
        try:
            for _ in range(4):
                service.clock.advance(15)
            yield registry.wait_unregistered(conn)
        finally:
            os.kill(proc.transport.pid, signal.SIGCONT)


class FlowControlTests(Base):
    @defer.inlineCallbacks
    def test_slow_reader_holds_the_window(self):
        blob = os.urandom(8 * 1024 * 1024)

        class Sender(protocol.Protocol):
            def connectionMade(self):
                self.transport.write(blob)
                self.transport.loseConnection()

        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(Sender)
        )
        self.addCleanup(port.stopListening)
        service, tunnels, registry, proc, conn = yield self.connect(
            ["-R", "0:127.0.0.1:%d" % port.getHost().port]
        )

        class Paused(Collect):
            def connectionMade(self):
                self.transport.pauseProducing()

        reader = Paused()
        yield conn.open_stream(OneShot(reader))
        yield reader.event.wait(lambda: reader.count >= LOCAL_WINDOW)
        [channel] = list(conn._streams)
        # exactly one window delivered, none reopened while the reader is paused
        self.assertEqual(reader.count, LOCAL_WINDOW)
        self.assertEqual(channel.localWindowLeft, 0)
        reader.transport.resumeProducing()
        data = yield reader.done
        self.assertEqual(len(data), len(blob))
        self.assertEqual(hashlib.sha256(data).digest(), hashlib.sha256(blob).digest())

    @defer.inlineCallbacks
    def test_exhausted_remote_window_pauses_the_writer(self):
        class Stalled(protocol.Protocol):
            def connectionMade(self):
                self.transport.pauseProducing()

        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(Stalled)
        )
        self.addCleanup(port.stopListening)
        service, tunnels, registry, proc, conn = yield self.connect(
            ["-R", "0:127.0.0.1:%d" % port.getHost().port]
        )
        paused = Event()
        chunk = b"z" * 65536
        limit = 256 * 1024 * 1024

        class Writer(protocol.Protocol):
            written = 0
            is_paused = False

            def connectionMade(self):
                self.transport.registerProducer(self, True)
                reactor.callLater(0, self.resumeProducing)

            def pauseProducing(self):
                self.is_paused = True
                paused.fire()

            def resumeProducing(self):
                self.is_paused = False
                while not self.is_paused and self.written < limit:
                    self.written += len(chunk)
                    self.transport.write(chunk)

            def stopProducing(self):
                pass

        writer = Writer()
        yield conn.open_stream(OneShot(writer))
        yield paused.wait(lambda: writer.is_paused)
        self.assertLess(writer.written, 64 * 1024 * 1024)
        writer.transport.abortConnection()


class BadInputTests(Base):
    @defer.inlineCallbacks
    def raw(self, port, data):
        class Raw(Collect):
            def connectionMade(self):
                self.transport.write(data)

        proto = Raw()
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(OneShot(proto))
        return proto

    @defer.inlineCallbacks
    def test_garbage(self):
        service, tunnels, registry = yield start_server(self)
        for garbage in (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(8192),
            b"SSH-2.0-evil\r\n" + os.urandom(65536),
            b"SSH-2.0-evil\r\n" + struct.pack(">LB", 12, 4) + b"\x14" + b"\x00" * 15,
            b"\x00" * 5000,
        ):
            proto = yield self.raw(service.port, garbage)
            yield proto.done
        self.assertEqual(service.protocols, set())
        # still serving
        token = tunnels.add("tun1")
        spawn_ssh(self, service.port, "tun1:" + token, "-N", "-R", "0:127.0.0.1:9")
        yield registry.wait_registered()

    @defer.inlineCallbacks
    def test_stalled_handshake(self):
        service, tunnels, registry = yield start_server(self, login_grace=30)
        quiet = yield self.raw(service.port, b"")
        stalled = yield self.raw(service.port, b"SSH-2.0-slow\r\n")
        for proto in (quiet, stalled):
            yield proto.event.wait(lambda p=proto: b"SSH-2.0-exposr/" in b"".join(p.received))
        self.assertEqual(len(service.protocols), 2)
        service.clock.advance(31)
        yield quiet.done
        yield stalled.done
        self.assertEqual(service.protocols, set())

    @defer.inlineCallbacks
    def test_logins_in_progress_from_one_address_cannot_lock_it_out(self):
        service, tunnels, registry = yield start_server(self, login_grace=30)
        service.max_unauthenticated_per_ip = 3
        pending = []
        for _ in range(3):
            proto = yield self.raw(service.port, b"")
            yield proto.event.wait(lambda p=proto: b"SSH-2.0-exposr/" in b"".join(p.received))
            pending.append(proto)
        # a fourth login from the address is served; the oldest in progress makes room
        fourth = yield self.raw(service.port, b"")
        yield fourth.event.wait(lambda: b"SSH-2.0-exposr/" in b"".join(fourth.received))
        yield pending[0].done
        self.assertEqual(len(service.protocols), 3)
        self.assertEqual(dict(service.unauthenticated), {"127.0.0.1": 3})
        # a real login from the same address works while the stalled ones hold every slot
        token = tunnels.add("tun1")
        spawn_ssh(self, service.port, "tun1:" + token, "-N", "-R", "0:127.0.0.1:9")
        yield registry.wait_registered()
        yield pending[1].done
        # logged-in connections do not count against the limit
        self.assertEqual(dict(service.unauthenticated), {"127.0.0.1": 2})

    @defer.inlineCallbacks
    def test_misbehaving_client(self):
        service, tunnels, registry = yield start_server(self)
        token = tunnels.add("tun1")
        proto, client = yield conch_client(self, service.port, "tun1:" + token)
        conn = yield registry.wait_registered()

        def request(name, data):
            return client.sendGlobalRequest(name, data, wantReply=1)

        # a port that cannot be forwarded: refused, connection goes on
        d = request(b"tcpip-forward", common.NS(b"localhost") + struct.pack(">L", 70000))
        yield self.assertFailure(d, ConchError)
        d = request(b"tcpip-forward", common.NS(b"bad host/name") + struct.pack(">L", 0))
        yield self.assertFailure(d, ConchError)
        d = request(b"x-unknown@example.com", b"")
        yield self.assertFailure(d, ConchError)
        # cancel of something never forwarded, then a good forward and its cancel
        yield self.assertFailure(
            request(b"cancel-tcpip-forward", common.NS(b"localhost") + struct.pack(">L", 5)), ConchError
        )
        reply = yield request(b"tcpip-forward", common.NS(b"localhost") + struct.pack(">L", 0))
        (allocated,) = struct.unpack(">L", reply)
        self.assertTrue(allocated > 0)
        yield request(b"cancel-tcpip-forward", common.NS(b"localhost") + struct.pack(">L", allocated))
        self.assertEqual(conn.forwards, [])
        # huge window and packet size: accepted, our packets capped
        kind, payload = yield client.open_raw(b"session", 0xFFFFFFFF, 0xFFFFFFFF)
        self.assertEqual(kind, "confirm")
        [session] = [c for c in conn._conn.channels.values() if c.name == b"session"]
        self.assertEqual(session.remoteMaxPacket, sshmod.MAX_REMOTE_PACKET)
        # window adjust overflow is capped
        (local_id,) = struct.unpack(">L", payload[4:8])
        client.transport.sendPacket(connection.MSG_CHANNEL_WINDOW_ADJUST, struct.pack(">2L", local_id, 0xFFFFFFFF))
        # channel types we do not serve
        for name in (b"direct-tcpip", b"x11", b"auth-agent@openssh.com"):
            kind, _ = yield client.open_raw(name, 1024, 1024)
            self.assertEqual(kind, "failure")
        # still alive: a global request is answered
        d = request(b"keepalive@openssh.com", b"")
        yield self.assertFailure(d, ConchError)
        self.assertLessEqual(session.remoteWindowLeft, 0xFFFFFFFF)
        self.assertIn(conn, registry.conns)
        # data for a channel that does not exist: protocol error, clean drop
        client.transport.sendPacket(connection.MSG_CHANNEL_DATA, struct.pack(">L", 4242) + common.NS(b"x"))
        yield registry.wait_unregistered(conn)


def _self_signed(hostname):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


class TLSTargetTests(Base):
    @defer.inlineCallbacks
    def start_tls_echo(self):
        from twisted.internet import ssl
        from twisted.protocols.tls import TLSMemoryBIOFactory

        key, cert = _self_signed("localhost")
        seen = []

        class Echo(protocol.Protocol):
            def dataReceived(self, data):
                name = self.transport.getHandle().get_servername()
                seen.append(name)
                self.transport.write(data)

        options = ssl.CertificateOptions(privateKey=key, certificate=cert)
        factory = TLSMemoryBIOFactory(options, False, protocol.Factory.forProtocol(Echo))
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port, seen

    @defer.inlineCallbacks
    def test_https_target_insecure_allowed(self):
        port, seen = yield self.start_tls_echo()
        service, tunnels, registry, proc, conn = yield self.connect(
            ["-R", "localhost:%d:127.0.0.1:%d" % (port, port)],
            target="https://localhost:%d" % port,
            config={"transport_ssh_allow_insecure_target": True},
        )

        class Echoed(Collect):
            def dataReceived(self, data):
                Collect.dataReceived(self, data)
                if self.count >= 5:
                    self.transport.loseConnection()

        proto = Echoed(b"hello")
        got = yield conn.open_stream(OneShot(proto))
        self.assertIs(got, proto)
        data = yield proto.done
        self.assertEqual(data, b"hello")
        self.assertEqual(seen[0], b"localhost")

    @defer.inlineCallbacks
    def test_https_target_verified(self):
        port, seen = yield self.start_tls_echo()
        service, tunnels, registry, proc, conn = yield self.connect(
            ["-R", "localhost:%d:127.0.0.1:%d" % (port, port)],
            target="https://localhost:%d" % port,
        )
        proto = Collect(b"hello")
        yield conn.open_stream(OneShot(proto))
        data = yield proto.done
        self.assertEqual(data, b"")  # self-signed: the handshake fails, the stream closes
        self.assertEqual(seen, [])


class RealDomainTests(Base):
    """Against the real tunnels service and connection registry (memory storage)."""

    @defer.inlineCallbacks
    def test_connect_adopt_target_stream_and_go(self):
        from tests.support import Stack

        stack = Stack()
        yield stack.open()
        account, tunnel = yield stack.account_and_tunnel("my-tunnel")
        token = tunnel["transport"]["token"]
        changed = Event()
        stack.registry.on_change(lambda tid: changed.fire())
        service, _, _ = yield start_server(self, tunnels=stack.tunnels, registry=stack.tunnels)
        port = yield http_target(self, b"real")
        proc = spawn_ssh(
            self, service.port, "my-tunnel:" + token, "-N", "-R", "example.com:80:127.0.0.1:%d" % port
        )
        yield changed.wait(lambda: stack.registry.is_connected("my-tunnel"))
        conn = stack.registry.connection_for("my-tunnel")
        self.assertIsInstance(conn, sshmod.SSHTunnelConnection)
        yield conn.when_forwarded()
        record = yield stack.tunnels.get("my-tunnel")
        self.assertEqual(record["target"]["url"], "http://example.com/")  # port 80 adopted
        self.assertNotEqual(record["transport"]["token"], token)  # rotated
        proto = Collect(b"GET / HTTP/1.0\r\n\r\n")
        yield conn.open_stream(OneShot(proto))
        _, body = split_http((yield proto.done))
        self.assertEqual(body, b"real")
        proc.transport.signalProcess("KILL")
        yield changed.wait(lambda: not stack.registry.is_connected("my-tunnel"))
