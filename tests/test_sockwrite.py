"""exposr.sockwrite: write_now on real sockets, the read size of relayed sockets."""

import os

from twisted.internet import defer
from twisted.test.proto_helpers import StringTransport
from twisted.trial import unittest

from exposr import sockwrite
from tests.e2e_support import within
from tests.test_compat import _Recorder, _tcp_pair

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
    writer, receiver = yield _tcp_pair(case, _Recorder(), _Until())
    return writer.transport, receiver


def _count_sends(transport):
    sends = []
    real = transport.writeSomeData

    def counted(data):
        sends.append(bytes(data))
        return real(data)

    transport.writeSomeData = counted
    return sends


class WriteNowTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_write_now_sends_at_once(self):
        transport, receiver = yield _pair(self)
        sends = _count_sends(transport)
        sockwrite.write_now(transport, b"now")
        self.assertEqual(sends, [b"now"])
        self.assertEqual((yield receiver.wait(3)), b"now")

    @defer.inlineCallbacks
    def test_write_now_after_an_abort_sends_nothing(self):
        transport, receiver = yield _pair(self)
        transport.abortConnection()
        sockwrite.write_now(transport, b"too late")
        yield within(receiver.lost, TIMEOUT)
        self.assertEqual(receiver.received, [])

    @defer.inlineCallbacks
    def test_write_now_of_a_frame_buffer_larger_than_the_socket_takes_keeps_every_byte(self):
        # a frame built in a bytearray (or a view of one): what the socket
        # does not take at once is buffered as bytes, in order, and follows
        transport, receiver = yield _pair(self)
        first = bytearray(os.urandom(8 * 1024 * 1024))
        second = memoryview(bytearray(os.urandom(1024 * 1024)))[1:]
        sockwrite.write_now(transport, first)
        self.assertTrue(transport._tempDataLen or transport.dataBuffer, "the socket took 8 MiB at once")
        sockwrite.write_now(transport, second)
        got = yield receiver.wait(len(first) + len(second))
        self.assertEqual(got, bytes(first) + bytes(second))


class RelayReadTests(unittest.TestCase):
    def test_one_read_makes_one_frame_that_fits_one_read_of_the_other_end(self):
        from exposr.transport import multiplex, wsframes

        data = b"x" * sockwrite.RELAY_READ_SIZE
        message = multiplex._pack(multiplex.VERSION, multiplex.DATA, 1, 2, len(data)) + data
        self.assertEqual(len(wsframes.masked_binary_frame(message)), 65536)  # client -> server
        self.assertLessEqual(len(wsframes.binary_frame(message)), 65536)  # server -> client
        # the same frames built from the message's two parts (`Multiplexer(send_parts=...)`)
        head = message[:multiplex.HEADER_SIZE]
        self.assertEqual(len(wsframes.masked_binary_frame(data, head)), 65536)
        self.assertEqual(wsframes.binary_frame_parts(head, memoryview(data)), wsframes.binary_frame(message))

    @defer.inlineCallbacks
    def test_relay_reads_sets_the_read_size_of_a_tcp_transport_only(self):
        transport, _ = yield _pair(self)
        sockwrite.relay_reads(transport)
        self.assertEqual(transport.bufferSize, sockwrite.RELAY_READ_SIZE)
        other = StringTransport()
        sockwrite.relay_reads(other)
        self.assertFalse(hasattr(other, "bufferSize"))
