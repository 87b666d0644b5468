"""The domain router (`exposr.router.Router`): local and cross-node routes, checks, record cache."""

from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from exposr.cluster.envelope import Message
from exposr.cluster.forward import PeerEndpoint, PeerEndpoints
from exposr.cluster.nodes import STALE_AFTER, Membership
from exposr.connections import ConnectionRegistry, new_connection_id
from exposr.endpoint import TunnelEndpoint
from exposr.node import Node
from exposr.router import RECORD_TTL, STALE_GRACE, Reason, Refusal, Router
from tests.support import FakeConnection, make_config

SELF = Node(id="a" * 40, host="100@node-a", ip="10.0.0.1")
NODE_B = Node(id="b" * 40, host="200@node-b", ip="10.0.0.2")
NODE_C = Node(id="c" * 40, host="300@node-c", ip="10.0.0.3")
START = 1707560000.0
HTTP_PORT = 8080
SNI_PORT = 4430


def record(http=True, sni=False, passthrough=False):
    return {"id": "my-tunnel", "ingress": {"http": {"enabled": http},
                                           "sni": {"enabled": sni, "passthrough": passthrough}}}


class FakeTunnels:
    """Tunnel records by id; counts the lookups."""

    def __init__(self):
        self.records = {}
        self.gets = 0
        self._observers = []

    def get(self, tunnel_id):
        self.gets += 1
        return defer.succeed(self.records.get(tunnel_id))

    def on_change(self, callback):
        self._observers.append(callback)

    def changed(self, tunnel_id):
        for callback in self._observers:
            callback(tunnel_id)


def heartbeat(node, seq=0):
    return Message("cluster:heartbeat", {}, node.id, node.host, node.ip, int(START * 1000), seq)


class RouterTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(START)
        self.reactor = MemoryReactorClock()
        self.registry = ConnectionRegistry(make_config(), SELF.id, self.clock)
        self.tunnels = FakeTunnels()
        self.membership = Membership(SELF, self.clock)
        self.addCleanup(self.membership.stop)
        self.peers = PeerEndpoints(self.reactor, self.membership, http_port=lambda: HTTP_PORT,
                                   sni_port=lambda: SNI_PORT)
        self.router = Router(self.tunnels, self.registry, self.clock, peers=self.peers)

    def remote(self, node, tunnel_id="my-tunnel", connected=True):
        """``node`` announces one connection of the tunnel, and heartbeats."""
        self.membership.heard(heartbeat(node))
        self.registry.learn(node.id, tunnel_id, [{
            "connection_id": new_connection_id(node.id), "node": node.id, "peer": "192.0.2.9",
            "connected": connected, "connected_at": int(START * 1000),
        }])

    def local(self, tunnel_id="my-tunnel"):
        conn = FakeConnection(tunnel_id, connection_id=new_connection_id(SELF.id), registry=self.registry)
        self.assertTrue(self.registry.add(conn))
        return conn

    # -- access rules across the cluster ---------------------------------------------

    def test_allow_list_is_applied_by_the_node_that_receives_the_request(self):
        tunnel = dict(record(), access={"allow": ["203.0.113.0/24"]})
        self.local()
        self.router.check_http(tunnel, "my-tunnel", "203.0.113.7", "203.0.113.7")
        f = self.assertRaises(Refusal, self.router.check_http, tunnel, "my-tunnel", "198.51.100.1", "198.51.100.1")
        self.assertIs(f.reason, Reason.ACCESS_DENIED)
        # relayed by another node (not a trusted proxy here): it applied the list already
        self.membership.heard(heartbeat(NODE_B))
        self.router.check_http(tunnel, "my-tunnel", NODE_B.ip, NODE_B.ip)
        self.router._sni_route(dict(tunnel, ingress={"sni": {"enabled": True}}), "my-tunnel", NODE_B.ip)
        # a stale node is not believed
        self.clock.advance(31)
        self.assertRaises(Refusal, self.router.check_http, tunnel, "my-tunnel", NODE_B.ip, NODE_B.ip)

    # -- routes ------------------------------------------------------------------

    def test_local_connection_preferred(self):
        self.remote(NODE_B)
        self.local()
        for _ in range(3):
            route = self.router.route("my-tunnel")
            self.assertIsInstance(route.endpoint, TunnelEndpoint)
            self.assertEqual((route.key, route.remote, route.passthrough), ("my-tunnel", False, False))
            self.assertEqual(route.endpoint.tunnel_id, "my-tunnel")

    def test_local_route_opens_a_stream_on_the_local_connection(self):
        conn = self.local()
        factory = protocol.Factory()
        self.router.route("my-tunnel").endpoint.connect(factory)
        self.assertEqual(conn.streams, [factory])

    def test_remote_round_robin(self):
        self.remote(NODE_C)
        self.remote(NODE_B)
        routes = [self.router.route("my-tunnel") for _ in range(4)]
        self.assertEqual([r.key for r in routes],
                         [("node", NODE_B.id), ("node", NODE_C.id), ("node", NODE_B.id), ("node", NODE_C.id)])
        for route in routes:
            self.assertTrue(route.remote)
            self.assertFalse(route.passthrough)
            self.assertIsInstance(route.endpoint, PeerEndpoint)
        self.assertEqual([(r.endpoint.ip, r.endpoint.port) for r in routes[:2]],
                         [(NODE_B.ip, HTTP_PORT), (NODE_C.ip, HTTP_PORT)])

    def test_remote_endpoint_connects_to_the_peer(self):
        self.remote(NODE_B)
        self.router.route("my-tunnel").endpoint.connect(protocol.Factory())
        host, port = self.reactor.tcpClients[-1][:2]
        self.assertEqual((host, port), (NODE_B.ip, HTTP_PORT))

    def test_local_connection_gone_goes_remote(self):
        conn = self.local()
        self.remote(NODE_B)
        self.assertFalse(self.router.route("my-tunnel").remote)
        self.registry.unregister(conn)
        route = self.router.route("my-tunnel")
        self.assertEqual(route.key, ("node", NODE_B.id))

    def test_disconnected_remote_connections_not_used(self):
        self.remote(NODE_B, connected=False)
        self.remote(NODE_C)
        self.assertEqual({self.router.route("my-tunnel").key for _ in range(3)}, {("node", NODE_C.id)})

    def test_stale_node_skipped(self):
        self.remote(NODE_B)
        self.remote(NODE_C)
        self.clock.advance(STALE_AFTER - 1)
        self.membership.heard(heartbeat(NODE_C, 1))
        self.clock.advance(1)
        self.assertEqual({self.router.route("my-tunnel").key for _ in range(4)}, {("node", NODE_C.id)})
        # fresh again with its next heartbeat
        self.membership.heard(heartbeat(NODE_B, 1))
        self.assertEqual({self.router.route("my-tunnel").key for _ in range(4)},
                         {("node", NODE_B.id), ("node", NODE_C.id)})

    def test_unreachable_node_skipped(self):
        self.remote(NODE_B)
        self.remote(NODE_C)
        self.membership.unreachable(NODE_B.id)
        self.assertEqual({self.router.route("my-tunnel").key for _ in range(4)}, {("node", NODE_C.id)})

    def test_no_usable_node(self):
        self.remote(NODE_B)
        self.remote(NODE_C)
        self.membership.unreachable(NODE_B.id)
        self.membership.unreachable(NODE_C.id)
        e = self.assertRaises(Refusal, self.router.route, "my-tunnel")
        self.assertEqual((e.reason, e.tunnel_id), (Reason.UNREACHABLE, "my-tunnel"))

    def test_unknown_node_unusable(self):
        self.registry.learn(NODE_B.id, "my-tunnel", [{"connection_id": "x", "connected": True}])
        e = self.assertRaises(Refusal, self.router.route, "my-tunnel")
        self.assertEqual(e.reason, Reason.UNREACHABLE)

    def test_without_a_cluster_remote_connections_are_unreachable(self):
        router = Router(self.tunnels, self.registry, self.clock, peers=None)
        self.remote(NODE_B)
        e = self.assertRaises(Refusal, router.route, "my-tunnel")
        self.assertEqual(e.reason, Reason.UNREACHABLE)

    def test_node_without_the_ingress_port(self):
        peers = PeerEndpoints(self.reactor, self.membership, http_port=lambda: None, sni_port=lambda: None)
        router = Router(self.tunnels, self.registry, self.clock, peers=peers)
        self.remote(NODE_B)
        self.assertRaises(Refusal, router.route, "my-tunnel")

    def test_sni_remote_route_is_passthrough(self):
        self.tunnels.records["my-tunnel"] = record(sni=True)
        self.remote(NODE_B)
        route = self.successResultOf(self.router.sni_route("my-tunnel"))
        self.assertEqual((route.key, route.remote, route.passthrough), (("node", NODE_B.id), True, True))
        self.assertEqual((route.endpoint.ip, route.endpoint.port), (NODE_B.ip, SNI_PORT))
        # a local SNI route terminates TLS unless the tunnel asks for passthrough
        self.local()
        route = self.successResultOf(self.router.sni_route("my-tunnel"))
        self.assertEqual((route.key, route.remote, route.passthrough), ("my-tunnel", False, False))
        self.tunnels.records["my-tunnel"] = record(sni=True, passthrough=True)
        self.tunnels.changed("my-tunnel")
        route = self.successResultOf(self.router.sni_route("my-tunnel"))
        self.assertEqual((route.key, route.passthrough), ("my-tunnel", True))

    def test_sni_route_refusals_in_order(self):
        def reason():
            return self.failureResultOf(self.router.sni_route("my-tunnel"), Refusal).value.reason

        self.assertEqual(reason(), Reason.NOT_FOUND)
        self.tunnels.records["my-tunnel"] = record(sni=False)
        self.tunnels.changed("my-tunnel")
        self.assertEqual(reason(), Reason.SNI_DISABLED)
        self.tunnels.records["my-tunnel"] = record(sni=True)
        self.tunnels.changed("my-tunnel")
        self.assertEqual(reason(), Reason.NOT_CONNECTED)
        self.remote(NODE_B)
        self.membership.unreachable(NODE_B.id)
        self.assertEqual(reason(), Reason.UNREACHABLE)

    # -- checks --------------------------------------------------------------------

    def test_check_http_order(self):
        def reason(tunnel):
            return self.assertRaises(Refusal, self.router.check_http, tunnel, "my-tunnel").reason

        self.assertEqual(reason(None), Reason.NOT_FOUND)
        self.assertEqual(reason(record(http=False)), Reason.NOT_CONNECTED)
        self.remote(NODE_B)
        self.assertEqual(reason(record(http=False)), Reason.HTTP_DISABLED)
        self.assertIsNone(self.router.check_http(record(http=True), "my-tunnel"))

    # -- the record cache --------------------------------------------------------------

    def test_record_cache_ttl(self):
        self.tunnels.records["my-tunnel"] = record()
        d = self.router.record("my-tunnel")
        self.assertIsInstance(d, defer.Deferred)
        self.assertEqual(self.successResultOf(d), record())
        self.clock.advance(RECORD_TTL - 0.001)
        self.assertEqual(self.router.record("my-tunnel"), record())  # a record, no Deferred
        self.assertEqual(self.tunnels.gets, 1)
        self.clock.advance(0.001)
        self.assertIsInstance(self.router.record("my-tunnel"), defer.Deferred)
        self.assertEqual(self.tunnels.gets, 2)

    def test_record_cache_sees_other_nodes_changes_within_the_ttl(self):
        self.tunnels.records["my-tunnel"] = record(http=True)
        self.successResultOf(self.router.record("my-tunnel"))
        self.tunnels.records["my-tunnel"] = record(http=False)  # written by another node
        self.assertEqual(self.router.record("my-tunnel"), record(http=True))
        self.clock.advance(RECORD_TTL)
        self.assertEqual(self.successResultOf(self.router.record("my-tunnel")), record(http=False))

    def test_record_cache_invalidated_by_this_nodes_change(self):
        self.tunnels.records["my-tunnel"] = record(http=True)
        self.successResultOf(self.router.record("my-tunnel"))
        self.tunnels.records["my-tunnel"] = record(http=False)
        self.tunnels.changed("my-tunnel")
        self.assertEqual(self.successResultOf(self.router.record("my-tunnel")), record(http=False))

    def test_record_cache_invalidated_by_a_connection_change(self):
        self.tunnels.records["my-tunnel"] = record()
        self.successResultOf(self.router.record("my-tunnel"))
        changes = []
        self.router.on_change(changes.append)
        self.local()
        self.assertEqual(changes, ["my-tunnel"])
        self.assertIsInstance(self.router.record("my-tunnel"), defer.Deferred)
        self.assertEqual(self.tunnels.gets, 2)

    def test_absent_tunnel_not_cached(self):
        self.assertIsNone(self.successResultOf(self.router.record("my-tunnel")))
        self.tunnels.records["my-tunnel"] = record()
        self.assertEqual(self.successResultOf(self.router.record("my-tunnel")), record())

    def test_storage_failure_is_a_refusal_not_absence(self):
        # a live tunnel must never be reported missing because storage is down
        self.tunnels.get = lambda tunnel_id: defer.fail(RuntimeError("down"))
        f = self.failureResultOf(self.router.record("my-tunnel"), Refusal)
        self.assertIs(f.value.reason, Reason.STORAGE_UNAVAILABLE)

    def test_storage_failure_serves_the_last_known_record_for_a_while(self):
        self.tunnels.records["my-tunnel"] = record()
        self.assertEqual(self.successResultOf(self.router.record("my-tunnel")), record())
        self.tunnels.get = lambda tunnel_id: defer.fail(RuntimeError("down"))
        self.clock.advance(RECORD_TTL + STALE_GRACE - 1)
        self.assertEqual(self.successResultOf(self.router.record("my-tunnel")), record())
        self.clock.advance(2)
        self.failureResultOf(self.router.record("my-tunnel"), Refusal)


class PeerEndpointTests(unittest.TestCase):
    """A real connection to a closed port on 127.0.0.1."""

    @defer.inlineCallbacks
    def test_refused_connection_marks_the_node_unreachable(self):
        clock = task.Clock()
        clock.advance(START)
        membership = Membership(SELF, clock)
        self.addCleanup(membership.stop)
        membership.heard(Message("cluster:heartbeat", {}, NODE_B.id, NODE_B.host, "127.0.0.1", 1, 0))
        port = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        peers = PeerEndpoints(reactor, membership, http_port=lambda: number, sni_port=lambda: None)
        endpoint = peers.http_endpoint(NODE_B.id)
        self.assertEqual((endpoint.ip, endpoint.port), ("127.0.0.1", number))
        d = endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
        yield self.assertFailure(d.addTimeout(10, reactor), error.ConnectionRefusedError)
        self.assertIsNone(membership.address(NODE_B.id))
        self.assertIsNone(peers.http_endpoint(NODE_B.id))
        # its next heartbeat makes it usable again
        membership.heard(Message("cluster:heartbeat", {}, NODE_B.id, NODE_B.host, "127.0.0.1", 2, 1))
        self.assertIs(peers.http_endpoint(NODE_B.id), endpoint)
