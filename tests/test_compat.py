"""Canaries for the uses of dependencies' internals (exposr.compat): a fast path silently skipped fails here.

Each test drives the real dependency (a TCP connection on port 0, an autobahn
handshake, a Redis connection) and checks that the path exposr relies on was
taken, not merely that the result was right (the fallbacks give the same
result, only slower).
"""

import random

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from exposr.compat import autobahn as compat_autobahn
from exposr.compat import twisted as compat_twisted
from exposr.compat import txredisapi as compat_txredisapi
from exposr.sockwrite import write_now
from exposr.transport import wsframes
from tests.e2e_support import within

TIMEOUT = 10


class _Recorder(protocol.Protocol):
    def __init__(self):
        self.received = []
        self.got = defer.Deferred()
        self.made = defer.Deferred()
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.made.callback(self)

    def dataReceived(self, data):
        self.received.append(data)
        if not self.got.called:
            self.got.callback(data)

    def connectionLost(self, reason):
        self.lost.callback(None)


@defer.inlineCallbacks
def _tcp_pair(case, server, client=None):
    """A real TCP connection on 127.0.0.1: (server protocol, client protocol, a `_Recorder` by default)."""
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: server), interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    client = client if client is not None else _Recorder()
    yield within(protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port.getHost().port),
                 TIMEOUT)
    case.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
    yield within(server.made, TIMEOUT)
    return server, client


class TwistedTests(unittest.TestCase):
    def test_write_now_is_the_compat_function_and_its_internals_are_there(self):
        self.assertIs(write_now, compat_twisted.write_now)
        self.assertTrue(compat_twisted.WRITE_NOW_DIRECT, "Twisted's TCP buffer state changed: check exposr.compat.twisted")

    @defer.inlineCallbacks
    def test_write_now_sends_at_once_on_a_real_tcp_connection(self):
        server, client = yield _tcp_pair(self, _Recorder())
        buffered = []
        server.transport.write = buffered.append  # the ordinary path would call this
        write_now(server.transport, b"now")
        self.assertEqual(buffered, [], "write_now fell back to transport.write")
        data = yield within(client.got, TIMEOUT)
        self.assertEqual(data, b"now")

    @defer.inlineCallbacks
    def test_swap_protocol_hands_reads_and_the_end_to_the_new_protocol(self):
        old, client = yield _tcp_pair(self, _Recorder())
        new = _Recorder()
        new.makeConnection(old.transport)
        self.assertTrue(compat_twisted.swap_protocol(old.transport, old, new))
        client.transport.write(b"after the swap")
        data = yield within(new.got, TIMEOUT)
        self.assertEqual((data, old.received), (b"after the swap", []))
        client.transport.loseConnection()
        yield within(new.lost, TIMEOUT)
        self.assertFalse(old.lost.called)

    def test_swap_protocol_leaves_other_transports_alone(self):
        t = StringTransport()
        t.protocol = p = _Recorder()
        self.assertFalse(compat_twisted.swap_protocol(t, p, _Recorder()))
        self.assertIs(t.protocol, p)

    def test_the_exit_signal_twistd_reraises_is_where_clear_exit_signal_looks(self):
        # twistd reads reactor._exitSignal after the reactor stops; if the
        # attribute moved, a graceful SIGTERM would end with the signal again
        self.assertTrue(hasattr(type(reactor), "_exitSignal"))

        class Signalled:
            _exitSignal = 15

        signalled = Signalled()
        compat_twisted.clear_exit_signal(signalled)
        self.assertIsNone(signalled._exitSignal)

    def test_the_installed_exposr_reactor_has_the_epoll_internals_it_uses(self):
        from exposr import reactor as exposr_reactor

        if exposr_reactor.Reactor is None or not isinstance(reactor, exposr_reactor.Reactor):
            raise unittest.SkipTest("not running on exposr's epoll reactor")
        missing = [a for a in compat_twisted.EPOLL_INTERNALS if not hasattr(reactor, a)]
        self.assertEqual(missing, [])


class _Server(wsframes.FastReceive, WebSocketServerProtocol):
    def __init__(self):
        super().__init__()
        self.slow = []

    def onMessage(self, payload, isBinary):  # autobahn's path
        self.slow.append((bytes(payload), isBinary))


class _Mux:
    def __init__(self):
        self.got = []

    def receive(self, message):
        self.got.append(bytes(message))


def _open_websocket():
    factory = WebSocketServerFactory("ws://localhost:8080")
    factory.protocol = _Server
    factory.reactor = task.Clock()
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0, autoPingInterval=0)
    p = factory.buildProtocol(None)
    p.makeConnection(StringTransport())
    p.dataReceived(b"GET / HTTP/1.1\r\nHost: localhost:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    return p


class AutobahnTests(unittest.TestCase):
    def test_xor_large_is_autobahns_masking_through_nvx(self):
        self.assertTrue(compat_autobahn.NVX_DIRECT, "autobahn's NVX masker changed: check exposr.compat.autobahn")
        rnd = random.Random(5)
        for n in (1, 3, 4, 15, 16, 17, 1025, 4099, 65512, 65536, 100003):
            payload = rnd.randbytes(n)
            mask = rnd.randbytes(4)
            want = compat_autobahn.create_xor_masker(mask, n).process(payload)
            self.assertEqual(compat_autobahn.xor_large(payload, mask), want, n)
            self.assertEqual(compat_autobahn.xor_large(memoryview(payload), mask), want, n)
            self.assertEqual(compat_autobahn.xor_large(want, mask), payload, n)  # unmasks
            # the buffer it masked in is the result: no copy back to bytes
            self.assertIs(type(compat_autobahn.xor_large(payload, mask)), bytearray)
            head = rnd.randbytes(rnd.choice((2, 8, 14)))
            self.assertEqual(compat_autobahn.prefixed_xor_large(head, payload, mask), head + want, n)
            # a ws-multiplex header masked with its payload, in the same buffer
            lead = rnd.randbytes(16)
            whole = compat_autobahn.create_xor_masker(mask, n + 16).process(lead + payload)
            self.assertEqual(compat_autobahn.prefixed_xor_large(head, memoryview(payload), mask, lead),
                             head + whole, n)

    def test_the_per_connection_attributes_the_ws_transport_compacts_are_autobahns(self):
        # a renamed or dropped attribute would leave a copy in every connection (or,
        # in INITIAL_STATE, a class value autobahn no longer starts with); a few of
        # INITIAL_STATE are the transport's own
        import inspect
        import re

        import autobahn.twisted.websocket
        import autobahn.util
        import autobahn.websocket.protocol

        from exposr.transport import ws

        autobahn_source = "".join(inspect.getsource(m) for m in (
            autobahn.websocket.protocol, autobahn.twisted.websocket, autobahn.util))  # (util: the event mixin)
        used = set(re.findall(r"self\.(\w+)", autobahn_source))
        own = set(re.findall(r"self\.(\w+)\s*=(?!=)", inspect.getsource(ws)))
        names = compat_autobahn.HANDSHAKE_ONLY | set(compat_autobahn.INITIAL_STATE) | set(compat_autobahn.EQUAL_VALUES)
        self.assertEqual(sorted(names - used - own), [], "autobahn no longer has these: check exposr.compat.autobahn")

    def test_the_receive_internals_are_there(self):
        p = _open_websocket()
        self.assertEqual(p.state, p.STATE_OPEN)
        missing = [a for a in compat_autobahn.RECEIVE_STATE if not hasattr(p, a)]
        self.assertEqual(missing, [])
        self.assertIsNone(compat_autobahn.compression(p))

    def test_a_binary_frame_takes_the_fast_path(self):
        p = _open_websocket()
        p.mux = _Mux()
        p.dataReceived(wsframes.masked_binary_frame(b"fast") + wsframes.masked_binary_frame(b"x" * 300))
        self.assertEqual((p.mux.got, p.slow), ([b"fast", b"x" * 300], []))

    def test_what_the_fast_path_leaves_reaches_autobahn(self):
        p = _open_websocket()
        p.mux = _Mux()
        text = bytearray(wsframes.masked_binary_frame(b"slow"))
        text[0] = 0x81  # a text frame: autobahn's
        # a complete frame it does not take is autobahn's alone; then the fast
        # path goes on with the next frame of the same read
        p.dataReceived(bytes(text) + wsframes.masked_binary_frame(b"fast too"))
        self.assertEqual((p.slow, p.mux.got), ([(b"slow", False)], [b"fast too"]))
        # autobahn holds nothing now: the next read is the fast path's again
        p.dataReceived(wsframes.masked_binary_frame(b"fast again"))
        self.assertEqual(p.mux.got, [b"fast too", b"fast again"])


    def test_debug_arguments_are_formatted_only_when_written(self):
        """autobahn's eager pformat of its debug arguments is lazy, and reads as before."""
        import pprint

        from autobahn.websocket import protocol as autobahn_protocol
        from twisted.logger import formatEvent

        self.assertIs(autobahn_protocol.pformat, compat_autobahn.LazyPformat)
        attrs = [("openHandshakeTimeout", 5, "WebSocketServerFactory"), ("maxFramePayloadSize", 0, "x")]
        lazy = autobahn_protocol.pformat(attrs)
        self.assertEqual(formatEvent({"log_format": "\n{attrs}", "attrs": lazy}), "\n" + pprint.pformat(attrs))
        self.assertEqual(str(lazy), pprint.pformat(attrs))
        # Timings, the module's other pformat user, still gives a str
        timings = autobahn_protocol.Timings()
        timings.track("a")
        self.assertIsInstance(str(timings), str)
        self.assertIn("'a'", str(timings))


class TxredisapiTests(unittest.TestCase):
    def test_a_fresh_connection_has_the_ready_flag(self):
        import txredisapi

        self.assertIs(getattr(txredisapi.BaseRedisProtocol(), compat_txredisapi.READY_ATTR), False)

    @defer.inlineCallbacks
    def test_an_open_pool_has_usable_connections(self):
        from exposr.storage.redis import RedisStorage
        from tests.test_storage import REDIS_DB

        s = RedisStorage("127.0.0.1", 6379, db=REDIS_DB, reactor=reactor, pool_size=2, connect_timeout=5)
        yield within(s.open(), TIMEOUT)
        self.addCleanup(s.close)
        self.assertEqual(len(compat_txredisapi.usable(s._factory)), 2)
