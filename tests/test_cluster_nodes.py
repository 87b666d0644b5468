"""Cluster membership (`exposr.cluster.nodes.Membership`) on a `Clock`."""

from twisted.internet import task
from twisted.trial import unittest

from exposr.cluster import nodes
from exposr.cluster.envelope import Message
from exposr.cluster.nodes import Membership
from exposr.node import Node

SELF = Node(id="a" * 40, host="100@node-a", ip="10.0.0.1")
START = 1707560000.123


def message(event="cluster:heartbeat", node_id="b" * 40, host="200@node-b", ip="10.0.0.2", ts=None, seq=0,
            payload=None):
    return Message(event, {} if payload is None else payload, node_id, host, ip,
                   ts if ts is not None else 1707560000000, seq)


class MembershipTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(START)
        self.removed = []
        self.members = Membership(SELF, self.clock, on_removed=self.removed.append)
        self.addCleanup(self.members.stop)

    def peer_view(self, node_id="b" * 40):
        return [n for n in self.members.view() if n["node_id"] == node_id][0]

    def test_learnt_from_any_message(self):
        self.members.heard(message("tunnel:announce", payload=[], ts=1707560000100))
        self.assertEqual(self.members.address("b" * 40), "10.0.0.2")
        view = self.peer_view()
        self.assertEqual((view["host"], view["ip"], view["is_stale"]), ("200@node-b", "10.0.0.2", False))
        self.assertEqual(view["alive_at"], "2024-02-10T10:13:20.100Z")

    def test_refreshed_only_by_heartbeats(self):
        self.members.heard(message(ts=1707560000100))
        self.clock.advance(5)
        self.members.heard(message("tunnel:announce", host="moved@x", ip="10.0.0.9", ts=1707560005000, seq=1))
        view = self.peer_view()
        self.assertEqual((view["host"], view["ip"], view["alive_at"]),
                         ("200@node-b", "10.0.0.2", "2024-02-10T10:13:20.100Z"))
        self.assertEqual(view["alive_age"], 5000)
        self.members.heard(message(host="moved@x", ip="10.0.0.9", ts=1707560005000, seq=2))
        view = self.peer_view()
        self.assertEqual((view["host"], view["ip"], view["alive_at"], view["alive_age"]),
                         ("moved@x", "10.0.0.9", "2024-02-10T10:13:25.000Z", 0))
        self.assertEqual(self.members.address("b" * 40), "10.0.0.9")

    def test_announcements_do_not_keep_a_node_fresh(self):
        self.members.heard(message())
        for i in range(6):
            self.clock.advance(5)
            self.members.heard(message("tunnel:announce", payload=[], seq=i + 1))
        self.assertTrue(self.peer_view()["is_stale"])
        self.assertIsNone(self.members.address("b" * 40))

    def test_stale_after_30_seconds_then_fresh_again(self):
        self.members.heard(message())
        self.clock.advance(nodes.STALE_AFTER - 0.001)
        self.assertFalse(self.peer_view()["is_stale"])
        self.assertEqual(self.members.address("b" * 40), "10.0.0.2")
        self.clock.advance(0.001)
        self.assertTrue(self.peer_view()["is_stale"])
        self.assertIsNone(self.members.address("b" * 40))
        self.assertEqual(self.members.fresh_ips(), ["10.0.0.1"])
        self.members.heard(message(seq=1))
        self.assertFalse(self.peer_view()["is_stale"])
        self.assertEqual(self.members.address("b" * 40), "10.0.0.2")
        self.assertEqual(self.members.fresh_ips(), ["10.0.0.1", "10.0.0.2"])
        # the heartbeat restarted both timers
        self.clock.advance(nodes.STALE_AFTER - 0.001)
        self.assertFalse(self.peer_view()["is_stale"])
        self.clock.advance(nodes.REMOVE_AFTER - nodes.STALE_AFTER)
        self.assertEqual(self.removed, [])
        self.assertEqual(len(self.members.view()), 2)

    def test_removed_after_60_seconds(self):
        self.members.heard(message())
        self.clock.advance(nodes.REMOVE_AFTER - 0.001)
        self.assertEqual(len(self.members.view()), 2)
        self.assertEqual(self.removed, [])
        self.clock.advance(0.001)
        self.assertEqual([n["node_id"] for n in self.members.view()], [SELF.id])
        self.assertEqual(self.removed, ["b" * 40])
        self.assertIsNone(self.members.address("b" * 40))
        # a later message makes it known again, as new
        self.members.heard(message("tunnel:announce", payload=[], seq=5))
        self.assertEqual(self.members.address("b" * 40), "10.0.0.2")

    def test_own_messages_ignored(self):
        self.members.heard(message(node_id=SELF.id, host=SELF.host, ip=SELF.ip))
        self.assertEqual(len(self.members.view()), 1)
        self.assertEqual(self.members.peers, {})

    def test_unreachable_until_next_heartbeat(self):
        self.members.heard(message())
        self.members.unreachable("b" * 40)
        self.assertIsNone(self.members.address("b" * 40))
        # still listed, not stale
        self.assertFalse(self.peer_view()["is_stale"])
        self.members.heard(message("tunnel:announce", payload=[], seq=1))
        self.assertIsNone(self.members.address("b" * 40))
        self.members.heard(message(seq=2))
        self.assertEqual(self.members.address("b" * 40), "10.0.0.2")

    def test_unreachable_unknown_node_is_harmless(self):
        self.members.unreachable("c" * 40)
        self.assertEqual(self.members.peers, {})

    def test_view_fields(self):
        self.members.heard(message(node_id="c" * 40, host="300@node-c", ip="10.0.0.3", ts=1707559999000))
        self.clock.advance(1.5)
        view = self.members.view()
        self.assertEqual(view[0], {
            "node_id": SELF.id,
            "host": SELF.host,
            "ip": SELF.ip,
            "alive_at": "2024-02-10T10:13:21.623Z",
            "alive_age": 0,
            "is_stale": False,
        })
        self.assertEqual(view[1], {
            "node_id": "c" * 40,
            "host": "300@node-c",
            "ip": "10.0.0.3",
            "alive_at": "2024-02-10T10:13:19.000Z",
            "alive_age": 1500,
            "is_stale": False,
        })

    def test_alive_age_never_negative(self):
        self.members.heard(message())
        self.clock.rightNow -= 10  # our clock stepped back
        self.assertEqual(self.peer_view()["alive_age"], 0)

    def test_max_nodes(self):
        self.patch(nodes, "MAX_NODES", 3)
        for i in range(5):
            self.members.heard(message(node_id="%040x" % (i + 1), ip="10.0.1.%d" % i))
        self.assertEqual(len(self.members.peers), 3)
        self.assertEqual(len(self.members.view()), 4)
        self.assertIsNone(self.members.address("%040x" % 5))
        # known ones are still refreshed
        self.clock.advance(20)
        self.members.heard(message(node_id="%040x" % 1, ip="10.0.1.0", seq=1))
        self.clock.advance(20)
        self.assertEqual(self.members.address("%040x" % 1), "10.0.1.0")
        self.assertIsNone(self.members.address("%040x" % 2))

    def test_stop_cancels_timers(self):
        self.members.heard(message())
        self.members.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
