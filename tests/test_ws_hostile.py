"""Hostile tunnel clients over real sockets: the server's memory stays bounded.

Each test authorises a real WebSocket on an in-process server, then writes
raw frames (masked with the all-zero key, so the payload is written as is) and
reads the server's own accounting: the bytes its TCP transport holds for the
client, the multiplexer's channel table, autobahn's message buffer.
"""

import re
import socket
import struct

from twisted.internet import defer, reactor
from twisted.trial import unittest

from exposr.transport import multiplex, ws as wsmod, wsframes
from tests import e2e_support as e2e
from tests.e2e_support import within

TID = "hostile"
MiB = 1024 * 1024


def frame(opcode, payload=b"", fin=True):
    """A client frame (masked with key 0: the payload as is)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", b0, 0xFE, n)
    else:
        head = struct.pack("!BBQ", b0, 0xFF, n)
    return head + b"\0\0\0\0" + payload


def buffered(transport):
    """Bytes a Twisted TCP transport holds for its peer (not yet in the kernel)."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class _Base(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.addCleanup(e2e.autobahn_settled)
        self.server = yield e2e.Server(transport_max_connections=1).start()
        self.addCleanup(self.server.stop)

    def raw_ws(self):
        """A bare autobahn client authorised on the endpoint (no multiplexer of its own), and its connection."""
        return e2e.raw_ws(self, self.server, TID)

    def count_bytes(self, ws):
        """From now on the client only counts what it receives (no parsing)."""
        got = [0]

        def data_received(data):
            got[0] += len(data)

        ws.dataReceived = data_received
        return got


class NonReadingClientTests(_Base):
    """A client that never reads, while sending messages the server answers."""

    @defer.inlineCallbacks
    def test_outgoing_buffer_bounded_then_drained(self):
        ws, conn = yield self.raw_ws()
        # the client stops reading, with a small receive buffer (as a client
        # that stops reading for good would have it filled)
        ws.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        ws.transport.pauseProducing()
        unknown = frame(2, multiplex.encode(multiplex.DATA, 99, 7, b"x"))  # answered: CLOSE(7, not open)
        ping = frame(9)  # answered: pong
        units = 200_000
        ws.transport.write((unknown + ping) * units)  # 5.6 MB
        answer = 2 + 16 + len(multiplex.ERR_WSM_CHANNEL_NOT_OPEN) + 2  # CLOSE frame + pong frame
        server_side = conn.transport
        peak = [0]

        def stalled():
            peak[0] = max(peak[0], buffered(server_side))
            return peak[0] > 4 * MiB or server_side not in reactor.getReaders()

        yield e2e.wait_until(stalled, 30, 0.002)
        self.assertLessEqual(peak[0], wsmod.MAX_OUTGOING + 4 * 64 * 1024,
                             f"the server buffered {peak[0] / MiB:.1f} MB for a client that does not read")
        self.assertTrue(self.server.service.registry.is_connected(TID))
        # the client reads again: every answer arrives, the tunnel stays up
        got = self.count_bytes(ws)
        ws.transport.resumeProducing()
        yield e2e.wait_until(lambda: got[0] >= units * answer, 30)
        # (plus the server's own pings, 2 bytes every 10 s)
        self.assertIn(got[0] - units * answer, range(0, 64, 2))
        self.assertTrue(self.server.service.registry.is_connected(TID))

    @defer.inlineCallbacks
    def test_open_flood_closes_with_1008(self):
        ws, conn = yield self.raw_ws()
        got = []  # reads everything: only the channel table can grow
        ws.dataReceived = got.append
        opens = 20_000
        ws.transport.write(b"".join(frame(2, multiplex.encode(multiplex.OPEN, 0, i)) for i in range(1, opens + 1)))
        mux = conn.mux
        peak = [0]

        def done():
            peak[0] = max(peak[0], mux.channel_count)
            return peak[0] >= opens or mux.closed

        yield e2e.wait_until(done, 30, 0.002)
        self.assertLessEqual(peak[0], multiplex.MAX_REFUSED_OPENS,
                             f"{peak[0]} refused channels held awaiting the client's ACK")
        yield e2e.wait_until(lambda: not self.server.service.registry.is_connected(TID))
        # the last frame the client received: a close with 1008
        yield e2e.wait_until(lambda: re.search(rb"\x88[\x02-\x7d]\x03\xf0[^\x88]*$", b"".join(got)))


class FragmentTests(_Base):
    """Messages sent as many tiny fragments."""

    @defer.inlineCallbacks
    def _flood(self, fragment_payload):
        ws, conn = yield self.raw_ws()
        start = frame(2, multiplex.encode(multiplex.DATA, 99, 7), fin=False)
        count = 100_000
        ws.transport.write(start + frame(0, fragment_payload, fin=False) * count)
        peak = [0]

        def done():
            peak[0] = max(peak[0], len(conn.message_data or ()) if conn.inside_message else 0)
            return peak[0] >= count or ws.closed.called

        yield e2e.wait_until(done, 30, 0.002)
        self.assertTrue(ws.closed.called, f"{peak[0]} fragments of one message buffered; still open")
        self.assertEqual(ws.remoteCloseCode, 1009)
        self.assertLessEqual(peak[0], wsframes.MAX_FRAGMENTS)
        yield e2e.wait_until(lambda: not self.server.service.registry.is_connected(TID))

    def test_empty_fragments_close_with_1009(self):
        return self._flood(b"")

    def test_one_byte_fragments_close_with_1009(self):
        return self._flood(b"x")

    @defer.inlineCallbacks
    def test_fragment_rate_closes_with_1008(self):
        self.patch(wsframes, "MAX_FRAGMENTS_PER_SECOND", 500)
        ws, conn = yield self.raw_ws()
        # messages of two frames each (as the Node client sends them), fast
        message = frame(2, multiplex.encode(multiplex.DATA, 99, 0), fin=False) + frame(0, b"")
        ws.transport.write(message * 5000)
        yield within(ws.closed, 20)
        self.assertEqual(ws.remoteCloseCode, 1008)

    @defer.inlineCallbacks
    def test_fragmented_messages_within_the_limits_are_delivered(self):
        ws, conn = yield self.raw_ws()
        # OPEN in 16 one-byte fragments plus an empty one: refused (ACK + CLOSE)
        message = multiplex.encode(multiplex.OPEN, 0, 1)
        frames = [frame(2, message[:1], fin=False)]
        frames += [frame(0, message[i:i + 1], fin=False) for i in range(1, 16)]
        frames.append(frame(0, b""))
        ws.transport.write(b"".join(frames))
        ack = yield ws.next_message()
        self.assertEqual(multiplex.decode(ack).type, multiplex.ACK)


class CloseFrameTests(_Base):
    """An invalid close frame is answered with 1002, not a reset."""

    @defer.inlineCallbacks
    def _bad_close(self, payload):
        ws, conn = yield self.raw_ws()
        got = []  # the raw bytes the client receives
        ws.dataReceived = got.append
        lost = defer.Deferred()
        ws.connectionLost = lambda reason: lost.callback(reason.value)
        ws.transport.write(frame(8, payload))
        reason = yield within(lost)
        data = b"".join(got)
        self.assertEqual(data[:1], b"\x88", f"no close frame before the end ({reason!r})")
        self.assertEqual(struct.unpack("!H", data[2:4])[0], 1002)

    def test_close_code_999_gets_1002(self):
        return self._bad_close(struct.pack("!H", 999))

    def test_close_with_one_byte_payload_gets_1002(self):
        return self._bad_close(b"\x03")
