"""The contract of `exposr.interfaces.ITunnelConnection`, independent of the transport.

Every transport that carries tunnel streams (the WebSocket, SSH, a cluster hop)
must behave the same towards the ingress. `ConnectionContractMixin` holds the
tests; a concrete test case mixes it into a ``twisted.trial.unittest.TestCase``
and provides ``make_harness()``::

    class WSConnectionContract(ConnectionContractMixin, unittest.TestCase):
        def make_harness(self):
            return WSHarness(self)   # register cleanups with self.addCleanup

Every test calls ``make_harness()`` once, with a fresh connection that is up
(registered, handshake done) and has no stream yet. No test waits in real
time: everything moves through ``harness.pump()``.

The harness interface
---------------------

``harness.conn``
    The server-side `ITunnelConnection` under test.

``harness.pump()``
    Move every pending byte and event both ways until nothing moves any more
    (``twisted.test.iosim.IOPump.flush()`` for a real transport over
    in-memory connections, including ``clock.advance(0)`` so that
    ``callLater(0, ...)`` calls run). After ``pump()`` returns, whatever the
    tests caused has arrived at the other end: opens acknowledged, data
    delivered, PAUSE/RESUME/close applied. It must not advance time by
    more than a few milliseconds (no open or close timeouts may fire).

``harness.far_streams``
    A list of the far-end stream handles (the tunnel client's side of each
    stream), in the order the client accepted the streams. A handle is
    appended when the client accepts the stream (at the latest by the end of
    the ``pump()`` that completes ``open_stream``). Each handle has:

    ``.received``
        bytes: everything the server side wrote on the stream so far, in
        order (the client's view of its target connection).
    ``.write(data)``
        the far end sends ``data`` (bytes) towards the server side.
    ``.close()``
        the far end closes the stream cleanly (the client's target ended
        the connection with a FIN).
    ``.closed``
        bool: the far end saw the stream end (closed by the server side,
        by itself, or by the connection going away).
    ``.pause()`` / ``.resume()``
        the far end stops / starts consuming what the server side sends
        (its target's socket is backed up / drained). This must reach the
        server side as back-pressure: the producer registered on the server
        side's stream transport gets ``pauseProducing()`` /
        ``resumeProducing()``.
    ``.producer_paused``
        bool: whether the far end's own producer (what feeds the stream
        towards the server: the client's target socket) is currently paused
        by back-pressure from the server side (after the server side called
        ``pauseProducing()`` on its stream transport).

``harness.disconnect_far()``
    The tunnel client drops its whole connection (TCP reset: no close
    handshake of any protocol layer).

Back-pressure by credit
-----------------------

The three back-pressure tests expect a pause to reach the other side while
the stream is idle, which needs an explicit PAUSE message (ws-multiplex).
A transport whose back-pressure is a window of credit (SSH) can only tell the
writer once it has used up the window it was granted; its test case
overrides those three tests with their window form (``tests.test_ssh_contract``).

What the tests require of ``conn``
----------------------------------

* ``open_stream(factory)`` fires (after a pump) with the protocol built by
  ``factory.buildProtocol``, whose ``connectionMade`` has run, on a transport
  providing ``ITransport``, ``IConsumer`` and ``IPushProducer``.
* Bytes go both ways unchanged, in order; concurrent streams stay separate.
* Back-pressure both ways, as described for ``pause()``/``producer_paused``;
  a producer registered while the far end is paused is paused at once.
* The server side's ``loseConnection()``: the far end sees every byte
  written before it, then the end; the server protocol then gets
  ``connectionLost``. The far end's ``close()``: the server protocol gets
  every byte sent before it, then ``connectionLost(ConnectionDone)``.
* ``conn.disconnect(reason)`` and ``harness.disconnect_far()``: every open
  stream's protocol gets ``connectionLost`` (any reason), every far end is
  closed, and a later ``open_stream`` fails with `TransportClosedError` or
  `NoConnectionError` (a `StreamError`), never anything else.
"""

import random

from twisted.internet import error
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer
from zope.interface.verify import verifyObject

from exposr import errors
from exposr.interfaces import ITunnelConnection

MiB = 1024 * 1024


class Recorder(Protocol):
    """The server-side protocol of a stream: records what the ingress would see."""

    def __init__(self):
        self.chunks = []
        self.made = False
        self.lost = None

    def connectionMade(self):
        self.made = True

    def dataReceived(self, data):
        self.chunks.append(bytes(data))

    def connectionLost(self, reason):
        self.lost = reason

    @property
    def received(self):
        return b"".join(self.chunks)


@implementer(IPushProducer)
class RecordingProducer:
    """A producer for the server side's stream transport (the ingress socket)."""

    def __init__(self):
        self.events = []

    @property
    def paused(self):
        return bool(self.events) and self.events[-1] == "pause"

    def pauseProducing(self):
        self.events.append("pause")

    def resumeProducing(self):
        self.events.append("resume")

    def stopProducing(self):
        self.events.append("stop")


class ConnectionContractMixin:
    """Contract tests of `ITunnelConnection`; see the module docstring for ``make_harness``."""

    def make_harness(self):
        raise NotImplementedError

    # -- helpers --------------------------------------------------------------

    def open(self, h):
        """Open one stream: (server-side Recorder, far-end handle)."""
        before = len(h.far_streams)
        d = h.conn.open_stream(Factory.forProtocol(Recorder))
        h.pump()
        proto = self.successResultOf(d)
        self.assertEqual(len(h.far_streams), before + 1)
        return proto, h.far_streams[-1]

    # -- the tests ------------------------------------------------------------

    def test_provides_the_interface(self):
        h = self.make_harness()
        self.assertTrue(verifyObject(ITunnelConnection, h.conn))
        self.assertIsInstance(h.conn.connection_id, str)
        self.assertIsInstance(h.conn.peer, str)
        self.assertIsInstance(h.conn.tunnel_id, str)

    def test_open_stream_gives_the_factorys_connected_protocol(self):
        h = self.make_harness()
        built = []

        class Factory_(Factory):
            def buildProtocol(self, addr):
                p = Recorder()
                built.append(p)
                return p

        d = h.conn.open_stream(Factory_())
        h.pump()
        proto = self.successResultOf(d)
        self.assertEqual(built, [proto])
        self.assertTrue(proto.made)
        self.assertIsNone(proto.lost)
        for iface in (ITransport, IConsumer, IPushProducer):
            self.assertTrue(iface.providedBy(proto.transport), iface)
        self.assertEqual(len(h.far_streams), 1)
        self.assertFalse(h.far_streams[0].closed)

    def test_small_data_both_ways(self):
        h = self.make_harness()
        proto, far = self.open(h)
        proto.transport.write(b"GET / HTTP/1.1\r\n\r\n")
        far.write(b"HTTP/1.1 200 OK\r\n")
        far.write(b"\r\n")
        h.pump()
        self.assertEqual(far.received, b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(proto.received, b"HTTP/1.1 200 OK\r\n\r\n")

    def test_one_mebibyte_both_ways_byte_exact(self):
        h = self.make_harness()
        proto, far = self.open(h)
        rnd = random.Random(11)
        up, down = rnd.randbytes(MiB), rnd.randbytes(MiB)
        proto.transport.write(up)
        far.write(down)
        h.pump()
        self.assertEqual(len(far.received), MiB)
        self.assertTrue(far.received == up, "server -> far end bytes differ")
        self.assertEqual(len(proto.received), MiB)
        self.assertTrue(proto.received == down, "far end -> server bytes differ")

    def test_concurrent_streams_stay_separate(self):
        h = self.make_harness()
        pairs = [self.open(h) for _ in range(3)]
        for i, (proto, far) in enumerate(pairs):
            proto.transport.write(b"to far %d" % i)
            far.write(b"to server %d" % i)
        # interleave a second round in the opposite order
        for i, (proto, far) in reversed(list(enumerate(pairs))):
            proto.transport.write(b"/again %d" % i)
            far.write(b"/again %d" % i)
        h.pump()
        for i, (proto, far) in enumerate(pairs):
            self.assertEqual(far.received, b"to far %d/again %d" % (i, i))
            self.assertEqual(proto.received, b"to server %d/again %d" % (i, i))
        # closing one leaves the others working
        pairs[0][0].transport.loseConnection()
        h.pump()
        pairs[1][0].transport.write(b"!")
        pairs[2][1].write(b"?")
        h.pump()
        self.assertTrue(pairs[0][1].closed)
        self.assertFalse(pairs[1][1].closed)
        self.assertIsNone(pairs[1][0].lost)
        self.assertTrue(pairs[1][1].received.endswith(b"!"))
        self.assertTrue(pairs[2][0].received.endswith(b"?"))

    def test_far_end_pause_pauses_the_registered_producer(self):
        h = self.make_harness()
        proto, far = self.open(h)
        producer = RecordingProducer()
        proto.transport.registerProducer(producer, True)
        h.pump()
        self.assertEqual(producer.events, [])
        far.pause()
        h.pump()
        self.assertEqual(producer.events, ["pause"])
        far.resume()
        h.pump()
        self.assertEqual(producer.events, ["pause", "resume"])
        # data still flows after the resume
        proto.transport.write(b"after")
        h.pump()
        self.assertEqual(far.received, b"after")

    def test_producer_registered_while_far_end_paused_is_paused(self):
        h = self.make_harness()
        proto, far = self.open(h)
        far.pause()
        h.pump()
        producer = RecordingProducer()
        proto.transport.registerProducer(producer, True)
        self.assertTrue(producer.paused)
        far.resume()
        h.pump()
        self.assertFalse(producer.paused)

    def test_server_side_pause_pauses_the_far_producer(self):
        h = self.make_harness()
        proto, far = self.open(h)
        self.assertFalse(far.producer_paused)
        proto.transport.pauseProducing()
        h.pump()
        self.assertTrue(far.producer_paused)
        proto.transport.resumeProducing()
        h.pump()
        self.assertFalse(far.producer_paused)
        far.write(b"flowing")
        h.pump()
        self.assertEqual(proto.received, b"flowing")

    def test_server_side_close_after_pending_data(self):
        h = self.make_harness()
        proto, far = self.open(h)
        proto.transport.write(b"last ")
        proto.transport.write(b"words")
        proto.transport.loseConnection()
        h.pump()
        self.assertEqual(far.received, b"last words")
        self.assertTrue(far.closed)
        self.assertIsNotNone(proto.lost, "no connectionLost after loseConnection")

    def test_far_side_close_after_pending_data(self):
        h = self.make_harness()
        proto, far = self.open(h)
        far.write(b"bye")
        far.close()
        h.pump()
        self.assertEqual(proto.received, b"bye")
        self.assertIsNotNone(proto.lost)
        self.assertTrue(proto.lost.check(error.ConnectionDone), proto.lost)
        self.assertTrue(far.closed)

    def _assert_all_ended(self, h, pairs):
        for proto, far in pairs:
            self.assertIsNotNone(proto.lost, "a stream's protocol did not get connectionLost")
            self.assertTrue(far.closed, "a far end was not closed")
        d = h.conn.open_stream(Factory.forProtocol(Recorder))
        h.pump()
        failure = self.failureResultOf(d)
        self.assertTrue(failure.check(errors.TransportClosedError, errors.NoConnectionError), failure)

    def test_server_disconnect_ends_every_stream(self):
        h = self.make_harness()
        pairs = [self.open(h) for _ in range(2)]
        pairs[0][0].transport.write(b"in flight")
        h.conn.disconnect("tunnel disconnected")
        h.pump()
        self._assert_all_ended(h, pairs)

    def test_far_disconnect_ends_every_stream(self):
        h = self.make_harness()
        pairs = [self.open(h) for _ in range(2)]
        h.disconnect_far()
        h.pump()
        self._assert_all_ended(h, pairs)
