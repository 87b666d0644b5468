"""
The UDP cluster bus for real, in one process, on loopback only: several buses
on distinct loopback addresses (127.0.0.1/2/3) and the same port exchange
signed messages through multicast (outgoing interface 127.0.0.1-3, TTL 0: no
datagram leaves the host) and through Kubernetes discovery (unicast to the
addresses a test DNS server gives for the headless service). Garbage is
dropped before any JSON work and a flood does not stop the bus.
"""

import json
import random
import socket

from twisted.internet import defer, reactor, task
from twisted.names import client
from twisted.trial import unittest

from exposr.cluster import datagram
from exposr.cluster.bus import BusUnavailable
from exposr.cluster.discovery import KubernetesDiscovery, MulticastDiscovery
from exposr.cluster.envelope import MAX_SIZE, encode
from exposr.cluster.service import ANNOUNCE, ClusterService
from exposr.cluster.udpbus import MAX_READS, UDPBus
from exposr.node import Node
from tests.test_cluster_discovery import Broken, Known, Zone, start_dns

KEY = "udp-test-key"
HEADLESS = "exposr-headless.exposr.svc.cluster.local"


def node(n):
    return Node(id=("%d" % n) * 40, host="%d@node-%d" % (100 + n, n), ip="127.0.0.%d" % n)


def free_udp_port():
    """A UDP port free on 0.0.0.0 and [::] right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s4:
            s4.bind(("0.0.0.0", 0))
            port = s4.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s6:
                    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s6.bind(("::", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free UDP port")


def random_group():
    return "239.%d.%d.%d" % (random.randrange(1, 255), random.randrange(256), random.randrange(1, 255))


def within(d, seconds=10):
    return d.addTimeout(seconds, reactor)


class Collector:
    """Messages a bus delivered; ``wait(count)`` fires once that many arrived."""

    def __init__(self, bus):
        self.messages = []
        self._waiters = []
        bus.subscribe(self)

    def __call__(self, msg):
        self.messages.append(msg)
        for count, d in list(self._waiters):
            if len(self.messages) >= count:
                self._waiters.remove((count, d))
                d.callback(self.messages)

    def wait(self, count, seconds=10):
        if len(self.messages) >= count:
            return defer.succeed(self.messages)
        d = defer.Deferred()
        self._waiters.append((count, d))
        return within(d, seconds)

    def senders(self):
        return sorted((m.node_id, m.event) for m in self.messages)


class BusTestMixin:
    def start(self, bus):
        self.addCleanup(lambda: bus.stopService() if bus.running else None)
        return within(bus.startService())


class MulticastTests(BusTestMixin, unittest.TestCase):
    """Three buses, one port, one group, on 127.0.0.1-3 with TTL 0."""

    @defer.inlineCallbacks
    def setUp(self):
        self.port = free_udp_port()
        self.group = random_group()
        self.buses = [
            UDPBus(node(n), KEY, reactor, MulticastDiscovery(self.group), port=self.port,
                   multicast_group=self.group, multicast_ttl=0)
            for n in (1, 2, 3)
        ]
        self.got = [Collector(b) for b in self.buses]
        for bus in self.buses:
            yield self.start(bus)

    def test_sockets(self):
        bus = self.buses[0]
        self.assertEqual(bus._v4.getHost().host, "0.0.0.0")  # group datagrams need the wildcard bind
        self.assertEqual((bus._v4.getHost().port, bus._v6.getHost().port), (self.port, self.port))
        self.assertEqual(bus._v6.getHost().host, "::")
        self.assertEqual(bus._v4.getTTL(), 0)
        self.assertTrue(bus._v4.getLoopbackMode())
        self.assertEqual(bus._v4.getOutgoingInterface(), "127.0.0.1")  # the node's address

    @defer.inlineCallbacks
    def test_every_node_receives_every_message_its_own_included(self):
        for i, bus in enumerate(self.buses):
            yield bus.publish("cluster:heartbeat", {"n": i})
        for got in self.got:
            yield got.wait(3)
        expected = sorted((b.node.id, "cluster:heartbeat") for b in self.buses)
        for got in self.got:
            self.assertEqual(got.senders(), expected)
        m = [m for m in self.got[0].messages if m.node_id == self.buses[2].node.id][0]
        self.assertEqual((m.message, m.ip, m.host), ({"n": 2}, "127.0.0.3", "103@node-3"))
        self.assertEqual([b.sent for b in self.buses], [1, 1, 1])  # one datagram: the group
        self.assertEqual([b.rejected for b in self.buses], [{}, {}, {}])

    @defer.inlineCallbacks
    def test_another_key_is_rejected(self):
        stranger = UDPBus(node(4), "another key", reactor, MulticastDiscovery(self.group), port=self.port,
                          multicast_group=self.group, multicast_ttl=0)
        yield self.start(stranger)
        yield stranger.publish("cluster:heartbeat", {})
        yield self.buses[0].publish("cluster:heartbeat", {})
        yield self.got[1].wait(1)
        self.assertEqual(self.got[1].senders(), [(self.buses[0].node.id, "cluster:heartbeat")])
        self.assertEqual(self.buses[1].rejected, {"bad-signature": 1})


class KubernetesTests(BusTestMixin, unittest.TestCase):
    """Three buses bound to 127.0.0.1-3, one port; peers from a test DNS server."""

    @defer.inlineCallbacks
    def setUp(self):
        self.port = free_udp_port()
        self.zone = Zone()
        self.zone.set(HEADLESS, "127.0.0.1", "127.0.0.2", "127.0.0.3")
        resolver = client.Resolver(servers=[start_dns(self, self.zone)], reactor=reactor)
        self.buses, self.discoveries = [], []
        for n in (1, 2, 3):
            d = KubernetesDiscovery(resolver, "exposr-headless", "exposr", "cluster.local",
                                    Known("127.0.0.%d" % n), reactor)
            self.discoveries.append(d)
            self.buses.append(UDPBus(node(n), KEY, reactor, d, port=self.port, listen_address="127.0.0.%d" % n))
        self.got = [Collector(b) for b in self.buses]
        for bus in self.buses:
            yield self.start(bus)

    @defer.inlineCallbacks
    def test_unicast_to_every_address_of_the_service(self):
        self.assertEqual(self.buses[1]._v4.getHost().host, "127.0.0.2")
        for bus in self.buses:
            yield bus.publish("tunnel:disconnect", {"tunnel_id": "t-" + bus.node.host})
        for got in self.got:
            yield got.wait(3)
        expected = sorted((b.node.id, "tunnel:disconnect") for b in self.buses)
        for got in self.got:
            self.assertEqual(got.senders(), expected)
        self.assertEqual([b.sent for b in self.buses], [3, 3, 3])  # own address is in the service
        self.assertEqual([b.rejected for b in self.buses], [{}, {}, {}])

    @defer.inlineCallbacks
    def test_known_nodes_still_reached_when_dns_fails(self):
        """DNS down: the discovery falls back to this node and its known peers."""
        self.zone.broken.add(HEADLESS)
        self.discoveries[0].membership = Known("127.0.0.1", "127.0.0.3")
        yield self.buses[0].publish("cluster:heartbeat", {})
        yield self.got[2].wait(1)
        yield self.got[0].wait(1)
        self.assertEqual(self.got[1].messages, [])
        self.assertEqual(self.buses[0].sent, 2)
        self.flushLoggedErrors(Broken)  # the test server logs what it answered SERVFAIL for


class Sink:
    def __init__(self, *addresses):
        self.addresses = list(addresses)

    def peers(self):
        return defer.succeed(list(self.addresses))


class SingleBusTests(BusTestMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.port = free_udp_port()
        self.bus = UDPBus(node(1), KEY, reactor, Sink("127.0.0.1"), port=self.port, listen_address="127.0.0.1")
        self.got = Collector(self.bus)
        yield self.start(self.bus)
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.sender.close)

    def garbage(self, i):
        """Datagrams a bus must drop: foreign ones and ones with our header but no valid envelope."""
        kind = i % 4
        if kind == 0:
            return b"\xe0\x05\x00"  # too short
        if kind == 1:
            return b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"  # no magic
        if kind == 2:
            return b"\xe0\x05\x00\x00{not json"
        return datagram.pack(b'{"event":"x","message":{},"s":"' + b"0" * 64 + b'"}')

    def send(self, data, to=None):
        self.sender.sendto(data, to or ("127.0.0.1", self.port))

    @defer.inlineCallbacks
    def test_publish_and_receive_own_message(self):
        yield self.bus.publish("cluster:heartbeat", {"x": "é"})
        got = yield self.got.wait(1)
        self.assertEqual((got[0].event, got[0].message, got[0].seq), ("cluster:heartbeat", {"x": "é"}, 0))

    @defer.inlineCallbacks
    def test_ipv6_peers_go_through_the_ipv6_socket(self):
        self.bus.discovery = Sink("::1")
        self.assertEqual(self.bus._v6.getHost().host, "::")
        yield self.bus.publish("cluster:heartbeat", {})
        got = yield self.got.wait(1)  # the IPv4 socket cannot have received it
        self.assertEqual(got[0].node_id, self.bus.node.id)

    @defer.inlineCallbacks
    def test_datagrams_on_the_wire_carry_the_header(self):
        listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.5", self.port))
        listener.settimeout(5)
        self.bus.discovery = Sink("127.0.0.5")
        yield self.bus.publish("cluster:heartbeat", {})
        data, addr = listener.recvfrom(70000)
        self.assertEqual(data[:4], b"\xe0\x05\x00\x00")
        self.assertEqual(json.loads(data[4:])["event"], "cluster:heartbeat")
        self.assertEqual(addr, ("127.0.0.1", self.port))

    @defer.inlineCallbacks
    def test_reserved_bytes_are_ignored(self):
        text = encode("cluster:heartbeat", {}, node(2), 1, 0, KEY)
        self.send(b"\xe0\x05\x12\x34" + text)
        got = yield self.got.wait(1)
        self.assertEqual(got[0].node_id, node(2).id)

    @defer.inlineCallbacks
    def test_too_large_to_send(self):
        e = yield self.assertFailure(self.bus.publish("x", "y" * datagram.MAX_ENVELOPE), BusUnavailable)
        self.assertIn("one UDP datagram", str(e))
        self.assertLess(datagram.MAX_ENVELOPE, MAX_SIZE)

    @defer.inlineCallbacks
    def test_largest_message_fits(self):
        budget = self.bus.max_payload
        payload = ["y" * (budget - 4)]  # ["..."]: two quotes and two brackets
        self.assertEqual(len(json.dumps(payload)), budget)
        yield self.bus.publish("tunnel:announce", payload)
        got = yield self.got.wait(1)
        self.assertEqual(got[0].message, payload)

    @defer.inlineCallbacks
    def test_oversized_datagram_dropped_unparsed(self):
        """IPv6 carries up to 65527 bytes: more than a bus datagram may have."""
        v6 = UDPBus(node(1), KEY, reactor, Sink(), port=free_udp_port(), listen_address="::1")
        got = Collector(v6)
        yield self.start(v6)
        checked = self.spy(v6)
        sender = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.addCleanup(sender.close)
        data = datagram.HEADER + b"{" * (datagram.MAX_DATAGRAM - 3)
        self.assertEqual(len(data), datagram.MAX_DATAGRAM + 1)
        sender.sendto(data, ("::1", v6.port))
        sender.sendto(datagram.pack(encode("cluster:heartbeat", {}, node(2), 1, 0, KEY)), ("::1", v6.port))
        yield got.wait(1)
        self.assertEqual(v6.rejected, {"oversized": 1})
        self.assertEqual(len(checked), 1)  # the valid one only

    def spy(self, bus=None):
        """Record every envelope that reaches the JSON and signature check."""
        bus = bus or self.bus
        checked = []
        real = bus._verifier.check

        def check(data):
            checked.append(data)
            return real(data)

        bus._verifier.check = check
        return checked

    def test_reads_are_bounded_per_turn(self):
        """One read event takes at most MAX_READS datagrams; the rest wait for the next turn."""
        for i in range(200):
            self.send(b"junk %d" % i)
        self.bus._v4.doRead()
        self.assertEqual(self.bus.rejected, {"foreign": MAX_READS})
        self.bus._v4.doRead()
        self.assertEqual(self.bus.rejected, {"foreign": 2 * MAX_READS})

    @defer.inlineCallbacks
    def test_ten_thousand_garbage_datagrams_leave_the_bus_serving(self):
        checked = self.spy()
        ticks = []
        clock = task.LoopingCall(lambda: ticks.append(reactor.seconds()))
        clock.start(0.01)
        self.addCleanup(lambda: clock.running and clock.stop())
        started = reactor.seconds()
        sent = 0
        while sent < 10000:
            # a little faster than one read event takes them (MAX_READS a turn), so that
            # the bus is behind all along, and slow enough that the receive buffer never overflows
            for _ in range(MAX_READS + 2):
                if sent < 10000:
                    self.send(self.garbage(sent))
                    sent += 1
            yield task.deferLater(reactor, 0, lambda: None)
        self.send(datagram.pack(encode("cluster:heartbeat", {"after": "flood"}, node(2), 1, 0, KEY)))
        got = yield self.got.wait(1, seconds=20)
        took = reactor.seconds() - started
        self.assertEqual(got[-1].message, {"after": "flood"})
        self.assertEqual(self.bus.rejected, {"foreign": 5000, "malformed": 2500, "bad-signature": 2500})
        self.assertEqual(len(checked), 5001)  # foreign datagrams never reached the JSON
        self.assertLess(took, 20)
        self.assertGreater(len(ticks), 2, "the reactor's timers kept running during the flood")
        # and the bus still publishes and receives
        yield self.bus.publish("cluster:heartbeat", {})
        yield self.got.wait(2)

    @defer.inlineCallbacks
    def test_stop_closes_the_sockets(self):
        yield self.bus.stopService()
        self.assertIsNone(self.bus._v4)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", self.port))  # no reuse needed: nobody holds it
        yield self.assertFailure(self.bus.publish("cluster:heartbeat", {}), BusUnavailable)


class BindTests(BusTestMixin, unittest.TestCase):
    def hold(self, family, address, port):
        """A socket without address reuse on the port: a bus cannot bind next to it."""
        s = socket.socket(family, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((address, port))

    @defer.inlineCallbacks
    def test_start_fails_only_when_both_binds_fail(self):
        port = free_udp_port()
        self.hold(socket.AF_INET, "0.0.0.0", port)
        self.hold(socket.AF_INET6, "::", port)
        bus = UDPBus(node(1), KEY, reactor, Sink(), port=port)
        e = yield self.assertFailure(bus.startService(), BusUnavailable)
        self.assertIn("cannot bind the UDP cluster port", str(e))
        self.assertIn("0.0.0.0:%d" % port, str(e))
        self.assertIn("[::]:%d" % port, str(e))

    @defer.inlineCallbacks
    def test_one_bind_is_enough(self):
        port = free_udp_port()
        self.hold(socket.AF_INET6, "::", port)
        bus = UDPBus(node(1), KEY, reactor, Sink("127.0.0.1"), port=port)
        got = Collector(bus)
        yield self.start(bus)
        self.assertIsNone(bus._v6)
        yield bus.publish("cluster:heartbeat", {})
        yield got.wait(1)
        self.assertEqual(bus.sent, 1)

    @defer.inlineCallbacks
    def test_v6_peer_skipped_without_a_v6_socket(self):
        port = free_udp_port()
        self.hold(socket.AF_INET6, "::", port)
        bus = UDPBus(node(1), KEY, reactor, Sink("::1", "127.0.0.1"), port=port)
        yield self.start(bus)
        sent = yield bus.publish("cluster:heartbeat", {})
        self.assertEqual(sent, 1)


class RegistryStub:
    """Local tunnels with many recently closed connections each (a flapping client)."""

    def __init__(self, tunnels, connections):
        self.tunnels = ["tunnel-%03d-%s" % (i, "x" * 40) for i in range(tunnels)]
        self.connections = connections

    def local_tunnels(self):
        return list(self.tunnels)

    def announcement(self, tunnel_id):
        return {"tunnel_id": tunnel_id, "connections": [
            {"connection_id": "%s:%08d-aaaa-bbbb-cccc-dddddddddddd" % ("1" * 40, i), "node": "1" * 40,
             "peer": "2001:db8:ffff:ffff:ffff:ffff:ffff:%x" % i, "connected": False,
             "connected_at": 1707560000123 + i, "disconnected_at": 1707560100456 + i}
            for i in range(self.connections)
        ]}

    def on_change(self, callback):
        pass


class Recorder:
    """A bus that keeps what is published (with the UDP bus's size budget)."""

    def __init__(self, max_payload):
        self.max_payload = max_payload
        self.published = []

    def publish(self, event, message):
        self.published.append((event, message))
        return defer.succeed(None)

    def forget(self, node_id):
        pass

    def setServiceParent(self, parent):
        pass


class AnnouncementSizeTests(unittest.TestCase):
    def test_batches_that_would_not_fit_a_datagram_are_split(self):
        udp = UDPBus(node(1), KEY, reactor, Sink())
        bus = Recorder(udp.max_payload)
        registry = RegistryStub(tunnels=120, connections=40)
        service = ClusterService(bus, node(1), registry, task.Clock())
        service.announce_all()
        batches = [m for e, m in bus.published if e == ANNOUNCE]
        self.assertEqual([e["tunnel_id"] for b in batches for e in b], registry.tunnels)  # all, in order
        self.assertGreater(len(batches), 3)  # 50 + 50 + 20 would be 3
        self.assertTrue(all(len(b) <= 50 for b in batches))
        for i, batch in enumerate(batches):
            text = encode(ANNOUNCE, batch, node(1), 2**53 - 1, 2**53 - 1, KEY)
            self.assertLessEqual(len(datagram.pack(text)), datagram.MAX_DATAGRAM)
        # the batches are as full as they may be: the next entry would not have fitted
        first = json.dumps(batches[0] + [batches[1][0]], separators=(",", ":"))
        self.assertGreater(len(first), udp.max_payload)

    def test_small_batches_stay_by_fifty(self):
        bus = Recorder(UDPBus(node(1), KEY, reactor, Sink()).max_payload)
        registry = RegistryStub(tunnels=120, connections=1)
        ClusterService(bus, node(1), registry, task.Clock()).announce_all()
        self.assertEqual([len(m) for e, m in bus.published], [50, 50, 20])

    def test_a_bus_without_a_size_limit_gets_batches_of_fifty(self):
        bus = Recorder(None)
        registry = RegistryStub(tunnels=120, connections=40)
        ClusterService(bus, node(1), registry, task.Clock()).announce_all()
        self.assertEqual([len(m) for e, m in bus.published], [50, 50, 20])
