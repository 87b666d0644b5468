"""The `ITunnelConnection` contract over each connection (see `tests.connection_contract`).

* the WebSocket transport: a real `exposr.transport.ws.TunnelWebSocket` on the
  server side, the client's own `exposr.client.connect.TunnelWebSocket` (the
  ws-multiplex acceptor that splices channels to its target) on the far end,
  connected through `twisted.test.iosim` (no sockets, no waiting); the far
  end's "target" connections are `StringTransport`s;
* the in-memory reference implementation `tests.fake_connection`.
"""

import txaio
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial import unittest

from exposr.client import connect
from exposr.transport.ws import WSTransport
from tests.connection_contract import ConnectionContractMixin
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

    def __init__(self, test):
        self.clock = MemoryReactorClock()
        # autobahn's own timers (handshake, close) go through txaio's loop
        saved = txaio.config.loop
        txaio.config.loop = self.clock
        test.addCleanup(setattr, txaio.config, "loop", saved)
        self.registry = FakeRegistry()
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
