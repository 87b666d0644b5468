"""`TunnelEndpoint`: a tunnel as an ``IStreamClientEndpoint`` over the connection registry."""

from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from exposr import errors
from exposr.endpoint import TunnelEndpoint
from tests.connection_contract import Recorder
from tests.fake_connection import FakeRegistry, FakeTunnelConnection


class TunnelEndpointTests(unittest.TestCase):
    def setUp(self):
        self.registry = FakeRegistry()
        self.endpoint = TunnelEndpoint(self.registry, "t1")

    def test_is_a_client_endpoint(self):
        self.assertTrue(verifyObject(IStreamClientEndpoint, self.endpoint))

    def test_no_connection(self):
        self.failureResultOf(self.endpoint.connect(Factory.forProtocol(Recorder)), errors.NoConnectionError)

    def test_opens_a_stream_on_the_tunnels_connection(self):
        other = self.registry.add(FakeTunnelConnection(tunnel_id="t2"))
        conn = self.registry.add(FakeTunnelConnection(tunnel_id="t1"))
        d = self.endpoint.connect(Factory.forProtocol(Recorder))
        conn.pump()
        proto = self.successResultOf(d)
        self.assertTrue(proto.made)
        self.assertEqual((conn.opened, other.opened), (1, 0))
        proto.transport.write(b"hi")
        conn.pump()
        self.assertEqual(conn.far_streams[0].received, b"hi")

    def test_stream_errors_pass_through(self):
        conn = self.registry.add(FakeTunnelConnection(tunnel_id="t1"))
        conn.open_error = errors.StreamRefusedError("ECONNREFUSED")
        self.failureResultOf(self.endpoint.connect(Factory.forProtocol(Recorder)), errors.StreamRefusedError)
        conn.disconnect("gone")
        self.failureResultOf(self.endpoint.connect(Factory.forProtocol(Recorder)), errors.StreamError)
