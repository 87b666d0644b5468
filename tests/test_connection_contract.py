"""The `ITunnelConnection` contract over each connection (see `tests.connection_contract`).

* the WebSocket transport: a real `exposr.transport.ws.TunnelWebSocket` on the
  server side, the client's own `exposr.client.connect.TunnelWebSocket` (the
  ws-multiplex acceptor that splices channels to its target) on the far end,
  connected through `twisted.test.iosim` (no sockets, no waiting); the far
  end's "target" connections are `StringTransport`s;
* the in-memory reference implementation `tests.fake_connection`.
"""

from types import SimpleNamespace

import txaio
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial import unittest

from exposr import errors
from exposr.client import connect
from exposr.transport.ws import WSTransport
from tests.connection_contract import ConnectionContractMixin, Recorder, RecordingProducer
from tests.fake_connection import FakeRegistry, FakeTunnelConnection


class _TargetStream:
    """The far end of one WebSocket channel: the client's connection to its target."""

    def __init__(self, protocol, transport):
        self.protocol = protocol  # the client's _Target
        self.transport = transport
        self._closed = False

    @property
    def received(self):
        return self.transport.value()

    @property
    def closed(self):
        return self._closed or self.transport.disconnecting

    @property
    def producer_paused(self):
        return self.transport.producerState == "paused"

    def write(self, data):
        self.protocol.dataReceived(data)

    def close(self):
        self._closed = True
        self.protocol.connectionLost(Failure(error.ConnectionDone()))

    def pause(self):
        # the target socket's send buffer is full: Twisted pauses its producer
        self.transport.producer.pauseProducing()

    def resume(self):
        self.transport.producer.resumeProducing()


class _TargetEndpoint:
    """What ``connector.target()`` returns: connects at the next clock turn, as a socket would."""

    def __init__(self, harness):
        self.harness = harness

    def connect(self, factory):
        d = defer.Deferred()

        def connected():
            protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 3000))
            transport = StringTransport(lenient=True)
            self.harness.far_streams.append(_TargetStream(protocol, transport))
            protocol.makeConnection(transport)
            d.callback(protocol)

        self.harness.clock.callLater(0, connected)
        return d


class _Connector:
    """The part of `connect.TunnelConnector` a client `TunnelWebSocket` uses."""

    def __init__(self, harness):
        self.clock = harness.clock
        self.harness = harness

    def target(self):
        return _TargetEndpoint(self.harness)


class WSHarness:
    """A server `TunnelWebSocket` and a client `TunnelWebSocket` over an iosim pump."""

    def __init__(self, test, registry=None):
        self.clock = MemoryReactorClock()
        # autobahn's own timers (handshake, close) go through txaio's loop
        saved = txaio.config.loop
        txaio.config.loop = self.clock
        test.addCleanup(setattr, txaio.config, "loop", saved)
        self.registry = registry if registry is not None else FakeRegistry()
        self.far_streams = []
        service = WSTransport(self.clock, self.registry, "node-a", clock=self.clock)
        self.conn = service.protocol_for("t1", "acct-1", "192.0.2.7")
        self.far = connect.TunnelWebSocket(_Connector(self))
        self.far.factory = connect.ws_factory("ws://relay.test/v1/tunnel/t1/ws-endpoint?t=token")
        server_io = iosim.FakeTransport(self.conn, True, IPv4Address("TCP", "127.0.0.1", 8080),
                                        IPv4Address("TCP", "192.0.2.7", 50000))
        client_io = iosim.FakeTransport(self.far, False, IPv4Address("TCP", "192.0.2.7", 50000),
                                        IPv4Address("TCP", "127.0.0.1", 8080))
        self.io = iosim.connect(self.conn, server_io, self.far, client_io, clock=self.clock)
        if not self.registry.refuse:
            test.assertTrue(self.conn.registered, "the server did not register the connection")
            test.assertTrue(self.far.opened.called)

    def pump(self):
        self.io.flush()

    def disconnect_far(self):
        self.far.transport.abortConnection()


class WebSocketConnectionContract(ConnectionContractMixin, unittest.TestCase):
    def make_harness(self):
        return WSHarness(self)

    def test_gone_connection_unregisters(self):
        h = self.make_harness()
        self.assertEqual(h.registry.connections["t1"], [h.conn])
        h.disconnect_far()
        h.pump()
        self.assertEqual(h.registry.unregistered, [h.conn])
        self.assertFalse(h.registry.is_connected("t1"))


class FakeHarness:
    def __init__(self):
        self.conn = FakeTunnelConnection(tunnel_id="t1")
        self.far_streams = self.conn.far_streams
        self.pump = self.conn.pump
        self.disconnect_far = self.conn.drop


class FakeConnectionContract(ConnectionContractMixin, unittest.TestCase):
    def make_harness(self):
        return FakeHarness()


class WebSocketConnectionTests(unittest.TestCase):
    """What only the WebSocket transport does: open timeout, channel limit, carrier, close codes."""

    def setUp(self):
        self.h = WSHarness(self)

    def test_open_not_acknowledged_in_time(self):
        from exposr.transport import multiplex

        d = self.h.conn.open_stream(Factory.forProtocol(Recorder))
        self.h.clock.advance(multiplex.OPEN_TIMEOUT)  # the OPEN never left
        self.failureResultOf(d, errors.StreamOpenTimeoutError)
        self.h.pump()  # the late ACK is answered; the connection carries on
        proto, far = ConnectionContractMixin.open(self, self.h)
        proto.transport.write(b"still fine")
        self.h.pump()
        self.assertEqual(far.received, b"still fine")

    def test_channel_limit(self):
        self.h.conn.mux.max_channels = 1
        d1 = self.h.conn.open_stream(Factory.forProtocol(Recorder))
        d2 = self.h.conn.open_stream(Factory.forProtocol(Recorder))
        self.failureResultOf(d2, errors.ChannelLimitError)
        self.h.pump()
        self.successResultOf(d1)

    def test_target_refused_ends_the_stream_with_an_error(self):
        def refused(factory):
            return defer.fail(error.ConnectionRefusedError())

        self.h.far.connector.target = lambda: SimpleNamespace(connect=refused)
        d = self.h.conn.open_stream(Factory.forProtocol(Recorder))
        self.h.pump()
        proto = self.successResultOf(d)
        self.assertTrue(proto.lost.check(error.ConnectionLost), proto.lost)
        self.assertIn("ECONNREFUSED", proto.lost.getErrorMessage())

    def test_backed_up_websocket_pauses_every_stream(self):
        pairs = [ConnectionContractMixin.open(self, self.h) for _ in range(2)]
        producers = []
        for proto, far in pairs:
            producers.append(RecordingProducer())
            proto.transport.registerProducer(producers[-1], True)
        carrier = self.h.conn.transport.producer  # what Twisted pauses when the socket is full
        carrier.pauseProducing()
        self.assertEqual([p.events for p in producers], [["pause"], ["pause"]])
        # a stream opened meanwhile starts paused
        d = self.h.conn.open_stream(Factory.forProtocol(Recorder))
        self.h.pump()
        late = RecordingProducer()
        self.successResultOf(d).transport.registerProducer(late, True)
        self.assertTrue(late.paused)
        carrier.resumeProducing()
        self.assertEqual([p.events for p in producers], [["pause", "resume"]] * 2)
        self.assertFalse(late.paused)

    def test_shutdown_closes_with_1001_and_unregisters(self):
        self.h.conn.disconnect("Server shutting down")
        self.h.pump()
        self.assertEqual(self.h.far.remoteCloseCode, 1001)
        self.assertEqual(self.h.registry.unregistered, [self.h.conn])

    def test_refused_registration_closes_with_1008(self):
        registry = FakeRegistry()
        registry.refuse = True
        h = WSHarness(self, registry)
        self.assertEqual(h.far.remoteCloseCode, 1008)
        self.assertFalse(h.conn.registered)
        self.failureResultOf(h.conn.open_stream(Factory.forProtocol(Recorder)), errors.TransportClosedError)


class ClientSpliceTests(unittest.TestCase):
    def test_target_connected_synchronously_is_closed_with_its_channel(self):
        # An endpoint that connects before connect() returns (target_up has
        # run already) must not leave the splice holding the fired Deferred:
        # closing the channel then closes the target, instead of "cancelling"
        # a connection attempt that is over and leaking the target.
        h = WSHarness(self)
        real_connect = _TargetEndpoint.connect

        def connect_now(endpoint, factory):
            d = real_connect(endpoint, factory)
            h.clock.advance(0)
            return d

        self.patch(_TargetEndpoint, "connect", connect_now)
        d = h.conn.open_stream(Factory.forProtocol(Recorder))
        h.pump()
        proto = self.successResultOf(d)
        proto.transport.loseConnection()
        h.pump()
        self.assertTrue(h.far_streams[0].closed)
