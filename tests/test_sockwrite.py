"""exposr.sockwrite.write_soon: a poll round's writes to one connection leave in one send, in order."""

from twisted.internet import defer, protocol, reactor
from twisted.test.proto_helpers import StringTransport
from twisted.trial import unittest

from exposr import sockwrite
from exposr.reactor import Reactor
from exposr.sockwrite import begin_round, end_round, write_soon
from tests.e2e_support import within
from tests.test_compat import _Recorder

TIMEOUT = 10


class _Until(_Recorder):
    """Records what arrives; ``wait(n)`` fires once ``n`` bytes have."""

    def __init__(self):
        super().__init__()
        self._want = None

    def wait(self, n):
        self._want = (n, defer.Deferred())
        self._check()
        return within(self._want[1], TIMEOUT)

    def dataReceived(self, data):
        super().dataReceived(data)
        self._check()

    def _check(self):
        if self._want is not None and len(b"".join(self.received)) >= self._want[0] and not self._want[1].called:
            self._want[1].callback(b"".join(self.received))


@defer.inlineCallbacks
def _pair(case):
    """A real TCP connection on 127.0.0.1: (the writing end, the receiving end, an `_Until`)."""
    writer = _Recorder()
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: writer), interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    receiver = _Until()
    yield within(protocol.ClientCreator(reactor, lambda: receiver).connectTCP("127.0.0.1", port.getHost().port),
                 TIMEOUT)
    case.addCleanup(lambda: receiver.transport.abortConnection() if receiver.transport.connected else None)
    yield within(writer.made, TIMEOUT)
    return writer.transport, receiver


def _count_sends(transport):
    sends = []
    real = transport.writeSomeData

    def counted(data):
        sends.append(bytes(data))
        return real(data)

    transport.writeSomeData = counted
    return sends


class RoundTests(unittest.TestCase):
    def setUp(self):
        self.addCleanup(self._no_round_left)

    def _no_round_left(self):
        if sockwrite._batch is not None:
            end_round()
            self.fail("a round was left open")

    def test_the_suite_runs_on_the_reactor_that_makes_rounds(self):
        # the real-socket tests of the transports exercise write_soon only on it
        self.assertIsInstance(reactor, Reactor)

    @defer.inlineCallbacks
    def test_frames_of_one_round_leave_in_one_send_in_order(self):
        transport, receiver = yield _pair(self)
        sends = _count_sends(transport)
        begin_round()
        for part in (b"one ", b"two ", b"three"):
            write_soon(transport, part)
        self.assertEqual(sends, [], "sent before the round ended")
        end_round()
        self.assertEqual(sends, [b"one two three"])
        self.assertEqual((yield receiver.wait(13)), b"one two three")

    @defer.inlineCallbacks
    def test_outside_a_round_a_write_leaves_at_once(self):
        transport, receiver = yield _pair(self)
        sends = _count_sends(transport)
        write_soon(transport, b"now")
        self.assertEqual(sends, [b"now"])
        self.assertEqual((yield receiver.wait(3)), b"now")

    @defer.inlineCallbacks
    def test_an_ordinary_write_in_the_round_comes_after_the_gathered_ones(self):
        transport, receiver = yield _pair(self)
        begin_round()
        write_soon(transport, b"framed ")
        transport.write(b"autobahn's ")  # (a ping, a close: autobahn writes to the transport itself)
        write_soon(transport, b"framed again")
        end_round()
        self.assertEqual((yield receiver.wait(30)), b"framed autobahn's framed again")

    @defer.inlineCallbacks
    def test_lose_connection_in_the_round_still_sends_what_was_gathered(self):
        transport, receiver = yield _pair(self)
        begin_round()
        write_soon(transport, b"last words")
        transport.loseConnection()
        end_round()
        yield within(receiver.lost, TIMEOUT)
        self.assertEqual(b"".join(receiver.received), b"last words")

    @defer.inlineCallbacks
    def test_abort_in_the_round_drops_what_was_gathered_without_error(self):
        transport, receiver = yield _pair(self)
        begin_round()
        write_soon(transport, b"never sent")
        transport.abortConnection()
        end_round()
        yield within(receiver.lost, TIMEOUT)
        self.assertEqual(receiver.received, [])

    @defer.inlineCallbacks
    def test_a_large_round_is_sent_in_full_through_the_buffer(self):
        transport, receiver = yield _pair(self)
        block = bytes(range(256)) * 4096  # 1 MiB: more than the socket takes at once
        begin_round()
        for _ in range(8):
            write_soon(transport, block)
        end_round()
        data = yield receiver.wait(8 * len(block))
        self.assertEqual(data, block * 8)

    def test_other_transports_are_written_at_once(self):
        t = StringTransport()
        begin_round()
        write_soon(t, b"now")
        self.assertEqual(t.value(), b"now")
        end_round()

    @defer.inlineCallbacks
    def test_write_now_after_an_abort_sends_nothing(self):
        transport, receiver = yield _pair(self)
        transport.abortConnection()
        sockwrite.write_now(transport, b"too late")
        yield within(receiver.lost, TIMEOUT)
        self.assertEqual(receiver.received, [])


class RelayReadTests(unittest.TestCase):
    def test_one_read_makes_one_frame_that_fits_one_read_of_the_other_end(self):
        from exposr.transport import multiplex, wsframes

        data = b"x" * sockwrite.RELAY_READ_SIZE
        message = multiplex._pack(multiplex.VERSION, multiplex.DATA, 1, 2, len(data)) + data
        self.assertEqual(len(wsframes.masked_binary_frame(message)), 65536)  # client -> server
        self.assertLessEqual(len(wsframes.binary_frame(message)), 65536)  # server -> client

    @defer.inlineCallbacks
    def test_relay_reads_sets_the_read_size_of_a_tcp_transport_only(self):
        transport, _ = yield _pair(self)
        sockwrite.relay_reads(transport)
        self.assertEqual(transport.bufferSize, sockwrite.RELAY_READ_SIZE)
        other = StringTransport()
        sockwrite.relay_reads(other)
        self.assertFalse(hasattr(other, "bufferSize"))
