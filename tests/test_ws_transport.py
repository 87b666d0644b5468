"""The WebSocket transport over real sockets: framing, close codes, hostile clients."""

from twisted.internet import defer
from twisted.trial import unittest

from exposr.transport import multiplex
from tests import e2e_support as e2e
from tests.e2e_support import within

TID = "ws-tunnel"


class _Base(unittest.TestCase):
    timeout = 30
    server_options = {"transport_max_connections": 1}

    @defer.inlineCallbacks
    def setUp(self):
        self.addCleanup(e2e.autobahn_settled)
        self.server = yield e2e.Server(**self.server_options).start()
        self.addCleanup(self.server.stop)

    def raw_ws(self):
        """A bare autobahn client authorised on the endpoint (no multiplexer of its own), and its connection."""
        return e2e.raw_ws(self, self.server, TID)


class FramingTests(_Base):
    @defer.inlineCallbacks
    def test_messages_of_every_length_class(self):
        ws, conn = yield self.raw_ws()
        self.assertEqual(conn.peer, "127.0.0.1")
        sizes = [0, 1, 125, 126, 127, 65535, 65536, 70000, 1 << 20]
        for n in sizes:
            conn._send(b"\x07" * n)
        yield e2e.wait_until(lambda: len(ws.messages) == len(sizes))
        self.assertEqual([len(m) for m in ws.messages], sizes)
        self.assertTrue(all(set(m) <= {7} for m in ws.messages))

    @defer.inlineCallbacks
    def test_unknown_channel_answered_and_bad_version_closes(self):
        ws, conn = yield self.raw_ws()
        ws.sendMessage(multiplex.encode(multiplex.DATA, 42, 7, b"hello"), isBinary=True)
        reply = yield ws.next_message()
        self.assertEqual(reply[:16], multiplex.encode(multiplex.CLOSE, 7, 0, b"ERR_WSM_CHANNEL_NOT_OPEN")[:16])
        ws.sendMessage(b"text is ignored", isBinary=False)
        ws.sendMessage(b"short", isBinary=True)
        ws.sendMessage(b"\x00\x03" + b"\x00" * 14, isBinary=True)  # version 3: teardown
        yield within(ws.closed)
        self.assertEqual(ws.remoteCloseCode, 1000)
        yield e2e.wait_until(lambda: not self.server.service.registry.is_connected(TID))

    @defer.inlineCallbacks
    def test_peer_open_is_refused(self):
        ws, conn = yield self.raw_ws()
        ws.sendMessage(multiplex.encode(multiplex.OPEN, 0, 1), isBinary=True)
        ack = yield ws.next_message()
        close = yield ws.next_message()
        self.assertEqual(multiplex.decode(ack).type, multiplex.ACK)
        self.assertEqual(multiplex.decode(close).type, multiplex.CLOSE)


class CloseTests(_Base):
    @defer.inlineCallbacks
    def test_shutdown_closes_with_1001(self):
        ws, conn = yield self.raw_ws()
        yield self.server.service.registry.stop()
        yield within(ws.closed)
        self.assertEqual((ws.remoteCloseCode, ws.remoteCloseReason), (1001, "Server shutting down"))

    @defer.inlineCallbacks
    def test_disconnect_closes_with_1000(self):
        ws, conn = yield self.raw_ws()
        yield self.server.service.tunnels.disconnect(TID)
        code, reason = yield within(ws.closed)
        self.assertEqual(ws.remoteCloseCode, 1000)
        self.assertFalse(self.server.service.registry.is_connected(TID))

    @defer.inlineCallbacks
    def test_client_going_away_unregisters(self):
        ws, conn = yield self.raw_ws()
        ws.transport.abortConnection()
        yield e2e.wait_until(lambda: not self.server.service.registry.is_connected(TID))
        # opening a stream on the dead connection fails cleanly
        yield self.assertFailure(conn.open_stream(None), Exception)


def _client_frame(opcode, payload=b"", fin=True):
    """A small client frame, masked with key 0 (the payload as is)."""
    assert len(payload) < 126
    return bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


class OpenStateTests(_Base):
    """Once open, the server keeps less per connection (docs/architecture.rst,
    "Memory"); what autobahn does with what it left out is unchanged."""

    @defer.inlineCallbacks
    def unknown_channel_round_trip(self, ws):
        """DATA for an unknown channel: answered (the connection is up, and
        everything sent before it has been taken)."""
        ws.sendMessage(multiplex.encode(multiplex.DATA, 42, 7, b"x"), isBinary=True)
        reply = yield ws.next_message()
        self.assertEqual(multiplex.decode(reply).type, multiplex.CLOSE)

    @defer.inlineCallbacks
    def test_text_messages_are_still_validated(self):
        ws, conn = yield self.raw_ws()
        # valid text, whole and in two fragments splitting a character: ignored
        ws.transport.write(_client_frame(1, "héllo".encode()))
        ws.transport.write(_client_frame(1, b"h\xc3", fin=False) + _client_frame(0, b"\xa9llo"))
        yield self.unknown_channel_round_trip(ws)
        self.assertTrue(self.server.service.registry.is_connected(TID))
        # invalid UTF-8: closed with 1007, as before
        ws.transport.write(_client_frame(1, b"ok \xc3\x28"))
        yield within(ws.closed)
        self.assertEqual(ws.remoteCloseCode, 1007)
        yield e2e.wait_until(lambda: not self.server.service.registry.is_connected(TID))

    @defer.inlineCallbacks
    def test_the_size_limit_still_applies(self):
        import struct

        ws, conn = yield self.raw_ws()
        yield self.unknown_channel_round_trip(ws)
        # a binary frame announcing more than the limit (the factory's option, read after the handshake)
        ws.transport.write(struct.pack("!BBQ", 0x82, 0xFF, multiplex.DEFAULT_MAX_PAYLOAD + 65) + b"\0\0\0\0")
        yield within(ws.closed)
        self.assertEqual(ws.remoteCloseCode, 1009)

    @defer.inlineCallbacks
    def test_pings_go_on_while_the_client_answers(self):
        from twisted.internet import task

        clock = task.Clock()
        self.server.ws.clock = clock
        ws, conn = yield self.raw_ws()
        pings = []
        answer = ws.onPing

        def on_ping(payload):
            pings.append(payload)
            answer(payload)

        ws.onPing = on_ping
        for n in range(1, 6):
            clock.advance(multiplex.PING_INTERVAL)
            yield e2e.wait_until(lambda: len(pings) == n)
            # the pong went out before this: the server has taken it once this is answered
            yield self.unknown_channel_round_trip(ws)
        self.assertEqual(len(pings), 5)
        self.assertTrue(self.server.service.registry.is_connected(TID))
        # the client stops answering: dropped after the ping timeout
        ws.transport.pauseProducing()
        for _ in range(3):
            clock.advance(multiplex.PING_INTERVAL)
        yield e2e.wait_until(lambda: not self.server.service.registry.is_connected(TID))


class FramePathHelpers:
    """A server `TunnelWebSocket` on a StringTransport, fed through the fast
    path or through autobahn's own parser (`_feed_both`)."""

    frames_masked = True  # how the peer's frames are (client -> server: masked)

    def _make(self, fast):
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from exposr.transport import ws as wsmod

        class Service:
            node_id = "n"
            clock = Clock()
            registry = None

        transport = wsmod.WSTransport(None, None, "n", clock=object())
        p = wsmod.TunnelWebSocket(Service(), "t", "a", "1.2.3.4")
        p.factory = transport.factory
        p.makeConnection(StringTransport())
        p.transport.registerProducer(wsmod._CarrierProducer(p), True)  # as onOpen does
        return self._opened(p, fast)

    @staticmethod
    def _opened(p, fast):
        """``p`` as once open, its messages recorded (``p.mux.got``), fed through the fast path or autobahn's."""

        class Mux:
            def __init__(self):
                self.got = []

            def receive(self, message):
                self.got.append((bytes(message), True))

        p.state = p.STATE_OPEN
        p.inside_message = False
        p.current_frame = None
        p.websocket_version = 13
        p._perMessageCompress = None
        p.mux = Mux()
        p.pongs = []
        p.onPong = p.pongs.append
        p.onMessage = lambda payload, isBinary: p.mux.got.append((bytes(payload), isBinary))
        if not fast:
            p.dataReceived = p._dataReceived
        return p

    @staticmethod
    def _frame(rnd, opcode, payload, fin=True, masked=True):
        import struct

        b0 = (0x80 if fin else 0) | opcode
        n = len(payload)
        bit = 0x80 if masked else 0
        if n < 126:
            head = bytes((b0, bit | n))
        elif n < 65536:
            head = struct.pack("!BBH", b0, bit | 126, n)
        else:
            head = struct.pack("!BBQ", b0, bit | 127, n)
        if not masked:
            return head + payload
        mask = rnd.randbytes(4)
        return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    def _feed_both(self, pieces):
        import random

        from twisted.internet import reactor

        before = set(reactor.getDelayedCalls())
        self.addCleanup(random.setstate, random.getstate())  # seeded below
        # autobahn arms its own handshake/close timers on the global reactor
        self.addCleanup(lambda: [c.cancel() for c in reactor.getDelayedCalls() if c not in before and c.active()])
        out = []
        for fast in (True, False):
            p = self._make(fast)
            random.seed(7)  # masking keys of the client's replies (pongs, closes)
            for piece in pieces:
                p.dataReceived(piece)
            out.append((p.mux.got, p.pongs, p.transport.value(), p.state))
        return out

    def settle_reactor(self):
        """Cancel, at cleanup, the timers autobahn arms on the global reactor from now on."""
        from twisted.internet import reactor

        before = set(reactor.getDelayedCalls())
        self.addCleanup(lambda: [c.cancel() for c in reactor.getDelayedCalls() if c not in before and c.active()])


class FastReceivePathTests(FramePathHelpers, unittest.TestCase):
    """The server's own frame receive path must behave exactly as autobahn's.

    Random streams of masked binary frames, pings, pongs, fragmented
    messages and text frames, cut at random points, are fed once through
    `TunnelWebSocket.dataReceived` (fast path) and once through autobahn's
    own `_dataReceived`; messages, pongs, bytes written and state must match.
    """

    def test_random_streams_match_autobahn(self):
        import functools
        import random

        rnd = random.Random(1)
        frame = functools.partial(self._frame, masked=self.frames_masked)
        sizes = [0, 1, 5, 16, 100, 125, 126, 127, 1000, 1024, 1025, 5000, 65535, 65536, 70000]
        for trial in range(120):
            frames = []
            for _ in range(rnd.randint(1, 10)):
                r = rnd.random()
                payload = rnd.randbytes(rnd.choice(sizes))
                if r < 0.7:
                    frames.append(frame(rnd, 2, payload))
                elif r < 0.8:
                    frames.append(frame(rnd, 9, payload[:50]))
                elif r < 0.85:
                    frames.append(frame(rnd, 10, payload[:50]))
                elif r < 0.95:
                    a = rnd.randint(0, len(payload))
                    frames.append(frame(rnd, 2, payload[:a], fin=False)
                                  + frame(rnd, 9, b"x") + frame(rnd, 0, payload[a:]))
                else:
                    frames.append(frame(rnd, 1, b"text"))
            stream = b"".join(frames)
            cuts = sorted(rnd.sample(range(1, len(stream)), min(len(stream) - 1, rnd.randint(0, 8))))
            pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
            fast, slow = self._feed_both(pieces)
            self.assertEqual(fast, slow, f"stream {trial} differs")

    def test_protocol_violations_match_autobahn(self):
        import random

        rnd = random.Random(2)
        for bad in (
            self._frame(rnd, 2, b"abc", masked=False),
            bytes((0xC2, 0x81)) + b"\0\0\0\0x",
            self._frame(rnd, 2, b"x" * 10) + self._frame(rnd, 2, b"y", masked=False),
        ):
            fast, slow = self._feed_both([bad])
            self.assertEqual(fast, slow)

    def test_a_large_payload_is_not_copied_from_the_read(self):
        # the server unmasks into a bytearray; the client hands on a view of its read
        import random

        self.settle_reactor()
        rnd = random.Random(3)
        p = self._make(True)
        got = []
        p.mux.receive = got.append
        small, large = rnd.randbytes(1000), rnd.randbytes(5000)
        read = (self._frame(rnd, 2, small, masked=self.frames_masked)
                + self._frame(rnd, 2, large, masked=self.frames_masked))
        p.dataReceived(read)
        self.assertEqual([bytes(m) for m in got], [small, large])
        if self.frames_masked:
            self.assertEqual([type(m) for m in got], [bytearray, bytearray])
        else:
            self.assertEqual([type(m) for m in got], [bytes, memoryview])
            self.assertIs(got[1].obj, read)


    def test_send_parts_frames_header_and_payload_as_one_message(self):
        from exposr.transport import wsframes

        self.settle_reactor()
        p = self._make(True)
        p.transport.clear()
        header, payload = b"h" * 16, memoryview(bytearray(b"x" * 2000))
        p._send_parts(header, payload)
        frame = p.transport.value()
        if self.frames_masked:  # (the server sends unmasked frames)
            self.assertEqual(frame, wsframes.binary_frame(header + bytes(payload)))
        else:  # the client masks with a fresh key: head, key, then the masked message
            self.assertEqual(frame[:4], b"\x82\xfe\x07\xe0")  # FIN+binary, masked, 2016 bytes
            self.assertEqual(wsframes.xor_mask(frame[8:], frame[4:8]), header + bytes(payload))
        # with a message of autobahn's own under way, the message goes through autobahn, joined
        sent = []
        p.sendMessage = lambda data, isBinary: sent.append((data, isBinary))
        p.send_queue.append(object())
        p._send_parts(header, payload)
        self.assertEqual(sent, [(header + bytes(payload), True)])


class ClientFastReceivePathTests(FastReceivePathTests):
    """The same for the client: the server's frames are unmasked, a masked one is a violation.

    Also: the client's own send path writes exactly what autobahn's
    sendMessage writes (same masking keys from the same random state).
    """

    frames_masked = False

    def _make(self, fast):
        from twisted.internet.testing import StringTransport

        from exposr.client import connect

        class Connector:
            clock = object()

        p = connect.TunnelWebSocket(Connector())
        p.factory = connect.ws_factory("ws://127.0.0.1:9/v1/tunnel/t/ws-endpoint?t=x")
        p.makeConnection(StringTransport())
        p.transport.clear()  # the opening handshake
        p.transport.registerProducer(connect._Carrier(p), True)  # as onOpen does
        return self._opened(p, fast)

    def test_protocol_violations_match_autobahn(self):
        import random

        rnd = random.Random(2)
        for bad in (
            self._frame(rnd, 2, b"abc", masked=True),
            bytes((0xC2, 0x01)) + b"x",
            self._frame(rnd, 2, b"x" * 10, masked=False) + self._frame(rnd, 2, b"y", masked=True),
            self._frame(rnd, 2, b"z" * 300, masked=False)[:2] + b"\x00\x05" + b"short",  # non-minimal length
        ):
            fast, slow = self._feed_both([bad])
            self.assertEqual(fast, slow)
            self.assertNotEqual(fast[3], 1)  # not OPEN any more: the violation failed the connection

    def test_send_matches_autobahn(self):
        import random

        from exposr.transport import wsframes

        self.addCleanup(random.setstate, random.getstate())  # seeded below
        for n in (0, 1, 3, 4, 5, 125, 126, 127, 1000, 1024, 1025, 4099, 65535, 65536, 70000):
            data = random.Random(n).randbytes(n)
            out = []
            for fast in (True, False):
                p = self._make(fast)
                random.seed(n)
                for _ in range(3):
                    if fast:
                        p._send(data)
                    else:
                        p.sendMessage(data, isBinary=True)
                out.append(p.transport.value())
            self.assertEqual(out[0], out[1], f"{n} bytes")
            # a fresh key per frame
            frames = out[0]
            self.assertEqual(len(frames) % 3, 0)
            size = len(frames) // 3
            keys = {frames[i * size + size - n - 4:i * size + size - n] for i in range(3)}
            self.assertEqual(len(keys), 3)
            if n:
                key = frames[size - n - 4:size - n]
                self.assertEqual(wsframes.xor_mask(frames[size - n:size], key), data)


class StreamTransportViewTests(unittest.TestCase):
    """What a stream's protocol receives: bytes, unless it takes views."""

    def _received(self, protocol):
        from twisted.internet.address import IPv4Address

        from exposr.transport.stream import StreamTransport

        got = []
        protocol.dataReceived = got.append
        stream = StreamTransport(object(), IPv4Address("TCP", "127.0.0.1", 1), IPv4Address("TCP", "127.0.0.1", 2))
        stream.attach(protocol)
        frame = bytearray(b"0123456789")
        stream.data_received(memoryview(frame)[2:])
        stream.data_received(b"plain")
        return got

    def test_a_protocol_gets_bytes(self):
        from twisted.internet.protocol import Protocol

        got = self._received(Protocol())
        self.assertEqual(got, [b"23456789", b"plain"])
        self.assertEqual([type(d) for d in got], [bytes, bytes])

    def test_a_protocol_that_takes_views_gets_the_view(self):
        from twisted.internet.protocol import Protocol

        class Viewer(Protocol):
            takes_views = True

        got = self._received(Viewer())
        self.assertIsInstance(got[0], memoryview)
        self.assertEqual(bytes(got[0]), b"23456789")
        self.assertIs(got[1].__class__, bytes)
