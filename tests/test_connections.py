"""The connection registry (docs/protocol.rst, "Connection state")."""

from twisted.internet import defer
from twisted.trial import unittest

from exposr.connections import ConnectionRegistry, RemoteConnection
from exposr.errors import NoConnectionError
from exposr.model import epoch_ms
from tests.support import NODE_ID, FakeConnection, Stack, make_config

PEER_A = "b" * 40
PEER_B = "c" * 40


class RegistryTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.stack = Stack()
        yield self.stack.open()
        self.registry = self.stack.registry
        self.clock = self.stack.clock
        self.account, self.tunnel = yield self.stack.account_and_tunnel("my-tunnel")
        self.changes = []
        self.registry.on_change(self.changes.append)

    def now(self):
        return epoch_ms(self.clock.seconds())

    def conn(self, n=None, tunnel_id="my-tunnel"):
        cid = "%s:%08d" % (NODE_ID, n) if n is not None else None
        return FakeConnection(tunnel_id, peer="203.0.113.9", connection_id=cid,
                              registry=self.registry)

    def test_default_state(self):
        self.assertEqual(self.registry.state("my-tunnel"),
                         {"connected": False, "alive_connections": 0, "connections": []})
        self.assertIsNone(self.registry.connection_for("my-tunnel"))

    @defer.inlineCallbacks
    def test_register(self):
        conn = self.conn(1)
        ok = yield self.stack.tunnels.register(conn, self.account["id"])
        self.assertTrue(ok)
        self.assertEqual(self.changes, ["my-tunnel"])
        now = self.now()
        self.assertEqual(
            self.registry.state("my-tunnel"),
            {
                "connected": True,
                "alive_connections": 1,
                "connected_at": now,
                "alive_at": now,
                "connections": [
                    {"connection_id": conn.connection_id, "node": NODE_ID, "peer": "203.0.113.9",
                     "local": True, "connected": True, "connected_at": now, "alive_at": now}
                ],
            },
        )
        self.assertIs(self.registry.connection_for("my-tunnel"), conn)
        self.assertEqual(self.registry.announcement("my-tunnel"), {
            "tunnel_id": "my-tunnel",
            "connections": [{"connection_id": conn.connection_id, "node": NODE_ID,
                             "peer": "203.0.113.9", "connected": True, "connected_at": now}],
        })

    @defer.inlineCallbacks
    def test_register_refusals(self):
        other = yield self.stack.accounts.create()
        ok = yield self.stack.tunnels.register(self.conn(), other["id"])
        self.assertFalse(ok)
        ok = yield self.stack.tunnels.register(self.conn(tunnel_id="nope-nope"), self.account["id"])
        self.assertFalse(ok)
        self.assertEqual(self.changes, [])
        tunnel = yield self.stack.tunnels.get("my-tunnel")
        self.assertEqual(tunnel["transport"]["token"], self.tunnel["transport"]["token"])

    @defer.inlineCallbacks
    def test_limit(self):
        results = []
        for n in range(3):
            ok = yield self.stack.tunnels.register(self.conn(n), self.account["id"])
            results.append(ok)
        self.assertEqual(results, [True, True, False])
        self.assertEqual(self.registry.state("my-tunnel")["alive_connections"], 2)

    @defer.inlineCallbacks
    def test_limit_concurrent(self):
        ds = [self.stack.tunnels.register(self.conn(n), self.account["id"]) for n in range(3)]
        results = yield defer.gatherResults(ds)
        self.assertEqual(sorted(results), [False, True, True])

    @defer.inlineCallbacks
    def test_limit_counts_remote(self):
        self.registry.learn(PEER_A, "my-tunnel", [
            {"connection_id": PEER_A + ":1", "node": PEER_A, "peer": "198.51.100.1",
             "connected": True, "connected_at": self.now()},
            {"connection_id": PEER_A + ":2", "node": PEER_A, "peer": "198.51.100.1",
             "connected": True, "connected_at": self.now()},
        ])
        ok = yield self.stack.tunnels.register(self.conn(1), self.account["id"])
        self.assertFalse(ok)

    @defer.inlineCallbacks
    def test_round_robin(self):
        a, b = self.conn(1), self.conn(2)
        yield self.stack.tunnels.register(b, self.account["id"])
        yield self.stack.tunnels.register(a, self.account["id"])
        chosen = [self.registry.connection_for("my-tunnel") for _ in range(5)]
        self.assertEqual(chosen, [a, b, a, b, a])

    @defer.inlineCallbacks
    def test_unregister(self):
        conn = self.conn(1)
        yield self.stack.tunnels.register(conn, self.account["id"])
        connected_at = self.now()
        self.clock.advance(3)
        self.assertTrue(self.registry.unregister(conn))
        self.assertFalse(self.registry.unregister(conn))
        state = self.registry.state("my-tunnel")
        self.assertFalse(state["connected"])
        self.assertEqual(state["alive_connections"], 0)
        self.assertEqual(state["connected_at"], connected_at)
        self.assertEqual(state["disconnected_at"], self.now())
        self.assertEqual(state["connections"][0]["connected"], False)
        self.assertEqual(state["connections"][0]["disconnected_at"], self.now())
        self.assertEqual(self.changes, ["my-tunnel", "my-tunnel"])
        self.assertIsNone(self.registry.connection_for("my-tunnel"))

    @defer.inlineCallbacks
    def test_disconnect(self):
        a, b = self.conn(1), self.conn(2)
        yield self.stack.tunnels.register(a, self.account["id"])
        yield self.stack.tunnels.register(b, self.account["id"])
        self.assertEqual(self.registry.state("my-tunnel")["alive_connections"], 2)
        result = yield self.registry.disconnect("my-tunnel")
        self.assertTrue(result)
        self.assertEqual(len(a.disconnected), 1)
        self.assertEqual(len(b.disconnected), 1)
        state = self.registry.state("my-tunnel")
        self.assertEqual([c["connected"] for c in state["connections"]], [False, False])
        result = yield self.registry.disconnect("unknown")
        self.assertTrue(result)

    @defer.inlineCallbacks
    def test_disconnect_with_remote_left(self):
        yield self.stack.tunnels.register(self.conn(1), self.account["id"])
        self.registry.learn(PEER_A, "my-tunnel", [
            {"connection_id": PEER_A + ":1", "node": PEER_A, "peer": "198.51.100.1",
             "connected": True, "connected_at": self.now()}])
        result = yield self.registry.disconnect("my-tunnel")
        self.assertFalse(result)

    @defer.inlineCallbacks
    def test_stop(self):
        a = self.conn(1)
        yield self.stack.tunnels.register(a, self.account["id"])
        yield self.registry.stop()
        self.assertEqual(len(a.disconnected), 1)
        self.assertFalse(self.registry.state("my-tunnel")["connected"])
        ok = yield self.stack.tunnels.register(self.conn(2), self.account["id"])
        self.assertFalse(ok)

    @defer.inlineCallbacks
    def test_service(self):
        self.registry.startService()
        a = self.conn(1)
        yield self.stack.tunnels.register(a, self.account["id"])
        yield self.registry.stopService()
        self.assertEqual(len(a.disconnected), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @defer.inlineCallbacks
    def test_expiry(self):
        conn = self.conn(1)
        yield self.stack.tunnels.register(conn, self.account["id"])
        self.registry.unregister(conn)
        self.clock.advance(59)
        self.registry.expire()
        self.assertEqual(len(self.registry.state("my-tunnel")["connections"]), 1)
        self.clock.advance(1)
        self.registry.expire()
        state = self.registry.state("my-tunnel")
        self.assertEqual(state["connections"], [])
        self.assertIn("disconnected_at", state)  # state kept
        self.clock.advance(239)
        self.registry.expire()
        self.assertIn("disconnected_at", self.registry.state("my-tunnel"))
        self.clock.advance(1)
        self.registry.expire()
        self.assertEqual(self.registry.state("my-tunnel"),
                         {"connected": False, "alive_connections": 0, "connections": []})

    @defer.inlineCallbacks
    def test_expiry_keeps_connected(self):
        conn = self.conn(1)
        yield self.stack.tunnels.register(conn, self.account["id"])
        self.clock.advance(1000)
        self.registry.expire()
        state = self.registry.state("my-tunnel")
        self.assertTrue(state["connected"])
        self.assertEqual(state["alive_at"], self.now())

    def test_sweep_timer(self):
        self.registry.startService()
        self.registry.learn(PEER_A, "t", [{"connection_id": PEER_A + ":1", "node": PEER_A,
                                          "peer": "x", "connected": True, "connected_at": 1}])
        self.clock.advance(10)
        self.assertTrue(self.registry.state("t")["connected"])
        self.clock.advance(10)  # 20 s > 15 s without announcement
        self.assertFalse(self.registry.state("t")["connected"])
        return self.registry.stopService()


class ClusterStateTests(unittest.TestCase):
    """Cluster-wide state from announcements of two nodes, and remote selection."""

    def setUp(self):
        self.stack = Stack()
        self.registry = self.stack.registry
        self.clock = self.stack.clock

    def rec(self, node, n, connected=True, connected_at=None, disconnected_at=None):
        entry = {"connection_id": "%s:con-%d" % (node, n), "node": node, "peer": "198.51.100.%d" % n,
                 "connected": connected, "connected_at": connected_at}
        if disconnected_at is not None:
            entry["disconnected_at"] = disconnected_at
        return entry

    def test_vector(self):
        t = epoch_ms(self.clock.seconds())
        r = self.registry
        r.learn(PEER_A, "x", [self.rec(PEER_A, 1, connected_at=t - 1000),
                              self.rec(PEER_A, 2, connected_at=t - 2000)])
        s = r.state("x")
        self.assertEqual((s["connected"], s["connected_at"], s["alive_connections"]),
                         (True, t - 2000, 2))
        r.learn(PEER_B, "x", [self.rec(PEER_B, 3, connected_at=t)])
        s = r.state("x")
        self.assertEqual((s["alive_connections"], s["connected_at"]), (3, t - 2000))
        d = t + 5000
        r.learn(PEER_A, "x", [self.rec(PEER_A, 1, False, t - 1000, d),
                              self.rec(PEER_A, 2, connected_at=t - 2000)])
        self.assertEqual(r.state("x")["alive_connections"], 2)
        r.learn(PEER_A, "x", [self.rec(PEER_A, 1, False, t - 1000, d),
                              self.rec(PEER_A, 2, False, t - 2000, d)])
        r.learn(PEER_B, "x", [self.rec(PEER_B, 3, False, t, d + 1500)])
        s = r.state("x")
        self.assertEqual((s["connected"], s["alive_connections"], s["disconnected_at"],
                          s["connected_at"]), (False, 0, d + 1500, t - 2000))

    def test_own_announcements_ignored(self):
        self.registry.learn(NODE_ID, "x", [self.rec(NODE_ID, 1)])
        self.assertFalse(self.registry.state("x")["connected"])

    def test_remote_round_robin_and_open(self):
        self.registry.learn(PEER_A, "x", [self.rec(PEER_A, 2), self.rec(PEER_A, 1)])
        chosen = [self.registry.connection_for("x") for _ in range(3)]
        self.assertTrue(all(isinstance(c, RemoteConnection) for c in chosen))
        self.assertEqual([c.connection_id for c in chosen],
                         [PEER_A + ":con-1", PEER_A + ":con-2", PEER_A + ":con-1"])
        self.assertFalse(chosen[0].local)
        self.assertEqual(chosen[0].node, PEER_A)
        self.failureResultOf(chosen[0].open_stream(object()), NoConnectionError)
        opened = []
        self.registry.remote_opener = lambda conn, factory: opened.append((conn.node, factory))
        chosen[0].open_stream("factory")
        self.assertEqual(opened, [(PEER_A, "factory")])

    @defer.inlineCallbacks
    def test_local_preferred(self):
        yield self.stack.open()
        account, _ = yield self.stack.account_and_tunnel("x-tunnel")
        local = FakeConnection("x-tunnel", connection_id="z" * 40 + ":1")
        yield self.stack.tunnels.register(local, account["id"])
        self.registry.learn(PEER_A, "x-tunnel", [self.rec(PEER_A, 1)])
        for _ in range(3):
            self.assertIs(self.registry.connection_for("x-tunnel"), local)

    def test_remote_replaced_per_node(self):
        self.registry.learn(PEER_A, "x", [self.rec(PEER_A, 1), self.rec(PEER_A, 2)])
        self.registry.learn(PEER_A, "x", [self.rec(PEER_A, 2)])
        ids = [c["connection_id"] for c in self.registry.state("x")["connections"]]
        self.assertEqual(ids, [PEER_A + ":con-2"])
        self.assertFalse(self.registry.state("x")["connections"][0]["local"])

    def test_remote_expiry(self):
        self.registry.learn(PEER_A, "x", [self.rec(PEER_A, 1, connected_at=1)])
        self.clock.advance(15)
        self.registry.expire()
        self.assertTrue(self.registry.state("x")["connected"])
        self.clock.advance(1)
        self.registry.expire()
        s = self.registry.state("x")
        self.assertFalse(s["connected"])
        self.assertEqual(s["disconnected_at"], epoch_ms(self.clock.seconds()))

    def test_max_connections_config(self):
        registry = ConnectionRegistry(make_config(transport_max_connections=5), NODE_ID,
                                      self.clock)
        self.assertEqual(registry.config.transport_max_connections, 5)
