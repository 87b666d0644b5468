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

    @defer.inlineCallbacks
    def raw_ws(self):
        """A bare autobahn client authorised on the endpoint (no multiplexer of its own)."""
        api = yield e2e.make_tunnel(self.server, TID, "http://127.0.0.1:1")
        info = yield api.read_tunnel(TID)
        ws = yield e2e.ws_connect(self.server.port, info["transport"]["ws"]["url"])
        self.addCleanup(ws.transport.abortConnection)
        yield within(ws.opened)
        yield e2e.wait_until(lambda: self.server.local_connections(TID))
        return ws, self.server.local_connections(TID)[0]


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
