"""Two cluster nodes (`ClusterService` + `ConnectionRegistry` each) on one `Clock`,
joined by an in-memory bus pair that delivers every envelope to both nodes."""

import gc

from twisted.internet import defer, task
from twisted.trial import unittest

from exposr.cluster import service as cluster_service
from exposr.cluster.bus import BusUnavailable, SignedBus
from exposr.cluster.envelope import decode
from exposr.cluster.service import ClusterService
from exposr.connections import ConnectionRegistry, new_connection_id
from exposr.node import Node
from tests.support import FakeConnection, make_config

KEY = "cluster-key"
NODE_A = Node(id="a" * 40, host="100@node-a", ip="10.0.0.1")
NODE_B = Node(id="b" * 40, host="200@node-b", ip="10.0.0.2")
START = 1707560000.0


class Network:
    """Delivers every published envelope to every running bus, on the next turn of the clock."""

    def __init__(self, clock):
        self.clock = clock
        self.buses = []
        self.log = []  # (time, Message) of everything sent
        self._queue = []
        self._call = None

    def send(self, data):
        self.log.append((self.clock.seconds(), decode(data, KEY)))
        self._queue.append(data)
        if self._call is None:
            self._call = self.clock.callLater(0, self._flush)

    def _flush(self):
        self._call = None
        batch, self._queue = self._queue, []
        for data in batch:
            for bus in self.buses:
                if bus.running:
                    bus._deliver(data)

    def sent(self, event, node=NODE_A):
        return [(t, m) for t, m in self.log if m.event == event and m.node_id == node.id]


def advance_to(clock, offset, step=0.5):
    """Move the clock to START + offset, stopping at every multiple of ``step`` on the way
    (so that every periodic call runs on time)."""
    while clock.seconds() < START + offset:
        now = clock.seconds() - START
        clock.advance(min((int(now / step + 1e-9) + 1) * step, offset) - now)


def run_until(clock, d, seconds, step=0.001):
    """Advance the clock in small steps until ``d`` fires; the seconds it took."""
    begin = clock.seconds()
    while not d.called and clock.seconds() - begin < seconds:
        clock.advance(step)
    return clock.seconds() - begin


class PairBus(SignedBus):
    def __init__(self, node, clock, network):
        SignedBus.__init__(self, node, KEY, clock)
        self.network = network
        network.buses.append(self)

    def _send(self, data):
        self.network.send(data)
        return defer.succeed(None)


class ClusterNode:
    def __init__(self, test, node, clock, network, config, discovery_wait=0.0, announce=True):
        self.node = node
        self.registry = ConnectionRegistry(config, node.id, clock)
        self.bus = PairBus(node, clock, network)
        self.cluster = ClusterService(self.bus, node, self.registry, clock, discovery_wait=discovery_wait,
                                      announce=announce)
        self.registry.startService()
        self.cluster.startService()
        test.addCleanup(self.stop)

    def stop(self):
        if self.cluster.running:
            self.cluster.stopService()
        if self.registry.running:
            self.registry.stopService()

    def connect(self, tunnel_id, peer="192.0.2.1"):
        conn = FakeConnection(tunnel_id, peer=peer, connection_id=new_connection_id(self.node.id),
                              registry=self.registry)
        added = self.registry.add(conn)
        return conn if added else None


class SingleNodeTests(unittest.TestCase):
    """A single node (announce=False): its bus reaches only itself, which ignores its own announcements."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(START)
        self.network = Network(self.clock)
        self.a = ClusterNode(self, NODE_A, self.clock, self.network, make_config(), announce=False)
        self.clock.advance(0)

    def test_tunnels_are_not_announced_but_heartbeats_go_on(self):
        conns = [self.a.connect("tunnel-%d" % i) for i in range(3)]
        advance_to(self.clock, 3 * cluster_service.ANNOUNCE_INTERVAL)
        self.a.registry.unregister(conns[0])
        self.clock.advance(0)
        self.assertEqual(self.network.sent("tunnel:announce"), [])
        self.assertGreaterEqual(len(self.network.sent("cluster:heartbeat")), 1)
        self.assertTrue(self.a.registry.is_connected("tunnel-1"))

    def test_disconnect_still_reaches_its_own_connections(self):
        conn = self.a.connect("my-tunnel")
        d = self.a.cluster.disconnect("my-tunnel")
        self.clock.advance(0)
        self.clock.advance(cluster_service.DISCONNECT_POLL)
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(conn.disconnected, ["disconnected"])


class TwoNodeTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(START)
        self.network = Network(self.clock)
        self.config = make_config()
        self.a = ClusterNode(self, NODE_A, self.clock, self.network, self.config)
        self.b = ClusterNode(self, NODE_B, self.clock, self.network, self.config)
        self.clock.advance(0)

    def advance_to(self, offset):
        """Move the clock to START + offset (in steps, as time passes)."""
        advance_to(self.clock, offset)

    def test_local_connection_announced_at_once(self):
        conn = self.a.connect("my-tunnel")
        announces = self.network.sent("tunnel:announce")
        self.assertEqual(len(announces), 1)
        self.assertFalse(self.b.registry.is_connected("my-tunnel"))
        self.clock.advance(0)
        state = self.b.registry.state("my-tunnel")
        self.assertTrue(state["connected"])
        self.assertEqual(state["alive_connections"], 1)
        [record] = state["connections"]
        self.assertEqual((record["connection_id"], record["node"], record["peer"], record["local"]),
                         (conn.connection_id, NODE_A.id, "192.0.2.1", False))
        self.assertEqual(self.b.registry.remote_nodes("my-tunnel"), [NODE_A.id])
        self.assertFalse(self.b.registry.has_local("my-tunnel"))
        # and A's own view is unchanged by its announcement
        self.assertTrue(self.a.registry.state("my-tunnel")["connections"][0]["local"])

    def test_disconnect_announced_at_once(self):
        conn = self.a.connect("my-tunnel")
        self.clock.advance(0)
        self.a.registry.unregister(conn)
        self.clock.advance(0)
        state = self.b.registry.state("my-tunnel")
        self.assertFalse(state["connected"])
        self.assertFalse(state["connections"][0]["connected"])

    def test_periodic_announce_in_batches(self):
        for i in range(120):
            self.a.connect("tunnel-%03d" % i)
        self.clock.advance(0)
        before = len(self.network.sent("tunnel:announce"))
        self.assertEqual(before, 120)
        self.advance_to(cluster_service.ANNOUNCE_INTERVAL - 0.001)
        self.assertEqual(len(self.network.sent("tunnel:announce")), before)
        self.advance_to(cluster_service.ANNOUNCE_INTERVAL)
        batches = [m.message for _, m in self.network.sent("tunnel:announce")[before:]]
        self.assertEqual([len(b) for b in batches], [50, 50, 20])
        tunnels = sorted(entry["tunnel_id"] for batch in batches for entry in batch)
        self.assertEqual(tunnels, ["tunnel-%03d" % i for i in range(120)])
        self.advance_to(2 * cluster_service.ANNOUNCE_INTERVAL)
        self.assertEqual(len(self.network.sent("tunnel:announce")), before + 6)
        # B has nothing local: it announces nothing
        self.assertEqual(self.network.sent("tunnel:announce", NODE_B), [])

    def test_remote_connections_expire_when_not_announced(self):
        self.a.connect("my-tunnel")
        self.advance_to(12)  # the last announcement of A was at 10
        self.a.cluster.stopService()
        self.assertTrue(self.b.registry.is_connected("my-tunnel"))
        self.advance_to(20)  # B's sweep: 10 s without announcement
        self.assertTrue(self.b.registry.is_connected("my-tunnel"))
        self.advance_to(29.999)
        self.assertTrue(self.b.registry.is_connected("my-tunnel"))
        self.advance_to(30)  # B's sweep: 20 s > 15 s
        state = self.b.registry.state("my-tunnel")
        self.assertFalse(state["connected"])
        self.assertEqual(state["connections"][0]["disconnected_at"], int((START + 30) * 1000))
        self.assertEqual(self.b.registry.remote_nodes("my-tunnel"), [])

    def test_periodic_announcements_keep_remote_connections(self):
        self.a.connect("my-tunnel")
        self.advance_to(120)
        self.assertTrue(self.b.registry.is_connected("my-tunnel"))

    def test_disconnect_from_another_node(self):
        conn = self.a.connect("my-tunnel")
        self.clock.advance(0)
        d = self.b.cluster.disconnect("my-tunnel")
        waited = run_until(self.clock, d, 1)
        self.assertTrue(self.successResultOf(d))
        self.assertLess(waited, cluster_service.DISCONNECT_WAIT)
        self.assertEqual(conn.disconnected, ["disconnected"])
        self.assertFalse(self.a.registry.is_connected("my-tunnel"))
        self.assertFalse(self.b.registry.is_connected("my-tunnel"))

    def test_disconnect_closes_the_senders_own_connections(self):
        conn = self.b.connect("my-tunnel")
        d = self.b.cluster.disconnect("my-tunnel")
        self.clock.advance(0)
        self.clock.advance(cluster_service.DISCONNECT_POLL)
        self.assertTrue(self.successResultOf(d))
        self.assertEqual(conn.disconnected, ["disconnected"])

    def test_disconnect_reports_false_when_a_node_does_not_answer(self):
        conn = self.a.connect("my-tunnel")
        self.clock.advance(0)
        self.a.cluster.stopService()  # A hears nothing any more
        d = self.b.cluster.disconnect("my-tunnel")
        waited = run_until(self.clock, d, 1)
        self.assertIs(self.successResultOf(d), False)
        # the wait is at most 500 ms
        self.assertApproximates(waited, cluster_service.DISCONNECT_WAIT, 0.01)
        self.assertEqual(conn.disconnected, [])

    def test_malformed_announcements_ignored(self):
        self.a.connect("other")
        self.clock.advance(0)
        bad = [
            {"tunnel_id": "my-tunnel"},
            "my-tunnel",
            None,
            [1, None, "x"],
            [{"connections": [{"connection_id": "x", "connected": True}]}],
            [{"tunnel_id": 5, "connections": []}],
            [{"tunnel_id": "my-tunnel", "connections": "x"}],
            [{"tunnel_id": "my-tunnel", "connections": {"connection_id": "x"}}],
            [{"tunnel_id": "my-tunnel", "connections": [1, "x", None, {"connected": True}]}],
        ]
        for payload in bad:
            self.a.bus.publish("tunnel:announce", payload)
        self.a.bus.publish("tunnel:disconnect", {"tunnel_id": 5})
        self.a.bus.publish("tunnel:disconnect", ["other"])
        self.clock.advance(0)
        self.assertFalse(self.b.registry.is_connected("my-tunnel"))
        self.assertEqual(self.b.registry.state("my-tunnel")["connections"], [])
        self.assertTrue(self.b.registry.is_connected("other"))
        self.assertTrue(self.a.registry.is_connected("other"))
        # a good entry in the same message as bad ones is still learnt
        self.a.bus.publish("tunnel:announce", [
            {"tunnel_id": 7},
            {"tunnel_id": "my-tunnel", "connections": [
                "junk", {"connection_id": "a:1", "node": NODE_A.id, "peer": "p", "connected": True,
                         "connected_at": 1}]},
        ])
        self.clock.advance(0)
        self.assertTrue(self.b.registry.is_connected("my-tunnel"))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_bad_timestamps_in_announcements(self):
        """Timestamps that are not numbers are treated as unknown; the state stays usable."""
        self.a.bus.publish("tunnel:announce", [
            {"tunnel_id": "my-tunnel", "connections": [
                {"connection_id": "a:1", "node": NODE_A.id, "peer": "p", "connected": True,
                 "connected_at": "yesterday"},
                {"connection_id": "a:2", "node": NODE_A.id, "peer": "p", "connected": False,
                 "connected_at": 1, "disconnected_at": [1]},
            ]},
        ])
        self.clock.advance(0)
        self.assertEqual(self.flushLoggedErrors(), [])
        state = self.b.registry.state("my-tunnel")
        self.assertEqual(state["alive_connections"], 1)
        self.assertEqual(state["connected_at"], int(START * 1000))  # none known: now
        self.assertEqual({c["connection_id"]: c.get("connected_at") for c in state["connections"]
                          if not c["local"]}, {"a:1": None, "a:2": 1})
        # disconnected at an unknown time: counted from when B learnt it
        self.assertEqual(state["connections"][1]["disconnected_at"], int(START * 1000))
        # the expiry sweeps keep working for every tunnel
        self.b.connect("other")
        self.a.cluster.stopService()
        self.advance_to(100)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual([c["connection_id"] for c in self.b.registry.state("my-tunnel")["connections"]
                          if not c["local"]], [])

    def test_heartbeats(self):
        times = lambda: [t - START for t, _ in self.network.sent("cluster:heartbeat")]
        self.assertEqual(times(), [0])
        self.assertEqual([m.message for _, m in self.network.sent("cluster:heartbeat")], [{}])
        self.advance_to(9.499)
        self.assertEqual(times(), [0])
        self.advance_to(30)
        self.assertEqual(times(), [0, 9.5, 19, 28.5])
        # B learnt A from them
        self.assertEqual([n["node_id"] for n in self.b.cluster.membership.view()], [NODE_B.id, NODE_A.id])
        self.assertEqual(self.b.cluster.membership.address(NODE_A.id), NODE_A.ip)

    def test_peers_stay_fresh_while_heartbeating(self):
        self.advance_to(300)
        view = self.b.cluster.membership.view()
        self.assertEqual([(n["node_id"], n["is_stale"]) for n in view],
                         [(NODE_B.id, False), (NODE_A.id, False)])

    def test_stopped_peer_goes_stale_then_away(self):
        self.a.cluster.stopService()
        self.advance_to(30)
        self.assertTrue(self.b.cluster.membership.view()[1]["is_stale"])
        self.advance_to(60)
        self.assertEqual(len(self.b.cluster.membership.view()), 1)

    def test_max_connections_counted_across_nodes(self):
        self.assertEqual(self.config.transport_max_connections, 2)
        first = self.a.connect("my-tunnel")
        self.assertIsNotNone(self.a.connect("my-tunnel"))
        self.clock.advance(0)
        self.assertEqual(self.b.registry.state("my-tunnel")["alive_connections"], 2)
        self.assertIsNone(self.b.connect("my-tunnel"))
        self.a.registry.unregister(first)
        self.clock.advance(0)
        self.assertIsNotNone(self.b.connect("my-tunnel"))
        self.clock.advance(0)
        self.assertIsNone(self.a.connect("my-tunnel"))


class DiscoveryTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(START)
        self.network = Network(self.clock)

    def heartbeat_times(self):
        return [round(t - START, 3) for t, _ in self.network.sent("cluster:heartbeat")]

    def test_discovery_wait(self):
        a = ClusterNode(self, NODE_A, self.clock, self.network, make_config(), discovery_wait=20)
        d = a.cluster.discovery_wait()
        advance_to(self.clock, 19.999)
        self.assertNoResult(d)
        self.assertEqual(self.heartbeat_times(), [0, 2, 4, 6, 8, 9.5, 10, 12, 14, 16, 18, 19])
        advance_to(self.clock, 20)
        self.assertIsNone(self.successResultOf(d))
        advance_to(self.clock, 40)
        self.assertEqual(self.heartbeat_times()[12:], [28.5, 38])

    def test_discovery_learns_peers(self):
        a = ClusterNode(self, NODE_A, self.clock, self.network, make_config(), discovery_wait=5)
        d = a.cluster.discovery_wait()
        advance_to(self.clock, 1)
        ClusterNode(self, NODE_B, self.clock, self.network, make_config())
        advance_to(self.clock, 5)
        self.successResultOf(d)
        self.assertEqual(a.cluster.membership.address(NODE_B.id), NODE_B.ip)

    def test_no_wait(self):
        a = ClusterNode(self, NODE_A, self.clock, self.network, make_config(), discovery_wait=0)
        self.assertIsNone(self.successResultOf(a.cluster.discovery_wait()))
        advance_to(self.clock, 9)
        self.assertEqual(self.heartbeat_times(), [0])

    def test_stop_during_discovery(self):
        a = ClusterNode(self, NODE_A, self.clock, self.network, make_config(), discovery_wait=20)
        a.cluster.discovery_wait()
        advance_to(self.clock, 3)
        a.stop()
        advance_to(self.clock, 9)
        self.assertEqual(self.heartbeat_times(), [0, 2])


class BusReadyTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(START)
        self.bus = PairBus(NODE_A, self.clock, Network(self.clock))
        self.registry = ConnectionRegistry(make_config(), NODE_A.id, self.clock)
        self.cluster = ClusterService(self.bus, NODE_A, self.registry, self.clock)

    def test_no_ready_attribute(self):
        self.assertIsNone(self.successResultOf(self.cluster.bus_ready()))

    def test_ready_fires(self):
        self.bus.ready = defer.Deferred()
        d = self.cluster.bus_ready(timeout=30)
        self.assertNoResult(d)
        self.bus.ready.callback(self.bus)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_never_ready(self):
        self.bus.ready = defer.Deferred()
        d = self.cluster.bus_ready(timeout=30)
        self.clock.advance(29.999)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        failure = self.failureResultOf(d, BusUnavailable)
        self.assertIn("30 s", failure.getErrorMessage())
        # a late connection changes nothing
        self.bus.ready.callback(self.bus)

    def test_ready_fails(self):
        self.bus.ready = defer.Deferred()
        d = self.cluster.bus_ready(timeout=30)
        self.bus.ready.errback(BusUnavailable("NOAUTH"))
        failure = self.failureResultOf(d, BusUnavailable)
        self.assertEqual(failure.getErrorMessage(), "NOAUTH")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # reported once, through bus_ready: no "Unhandled error in Deferred" later
        self.bus.ready = None
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(BusUnavailable), [])
