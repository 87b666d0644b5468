"""
``--cluster udp`` wired into the server:

* which bus and discovery `--cluster-udp-discovery` selects, and the start-up
  log line that says why (in-process, through `components._cluster`);
* three real ``exposrd`` processes on 127.0.0.1/2/3 (same ports on each),
  configured as the Helm chart does (``EXPOSR_CLUSTER=udp``,
  ``EXPOSR_CLUSTER_UDP_DISCOVERY=kubernetes``, ``SERVICE_NAME``,
  ``POD_NAMESPACE``), the namespace file present through the hidden option,
  Kubernetes discovery against a DNS server of the test answering the headless
  service with the three addresses, storage on the real Redis: they become
  ready and list each other in ``GET /v1/admin/cluster``;
* forcing Kubernetes discovery outside Kubernetes fails start-up;
* three real nodes on the UDP bus through the multi-node harness
  (`tests.cluster_support.Cluster` with ``bus="udp-multicast"`` and
  ``bus="udp-kubernetes"``, shared Redis storage): a tunnel held by A is served
  byte exact through B and C; after a SIGKILL of C the others mark it stale
  (30 s without heartbeat, in real time);
* stale, then removed, on the reference's timers (30 s, 60 s) with two real
  UDP buses in this process on 127.0.0.1/2 (multicast, TTL 0) and a `Clock`
  for the membership timers.

The nodes only open the Redis storage (127.0.0.1:6379, the db
test_storage_cluster.py uses for this worker): they SELECT and PING, write
nothing, so nothing is flushed (a FLUSHDB would also hit other runs on this
machine that share the db).
"""

import base64
import json
import os
import re
import signal
import socket

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from exposr.cluster.bus import LocalBus
from exposr.cluster.nodes import REMOVE_AFTER, STALE_AFTER
from exposr.cluster.service import ClusterService
from exposr.cluster.discovery import KubernetesDiscovery, MulticastDiscovery
from exposr.cluster.udpbus import UDPBus
from exposr.components import _cluster
from exposr.connections import ConnectionRegistry
from exposr.node import Node
from exposr.options import parse_config
from tests import procs
from tests import test_cluster_e2e as ce
from tests.cluster_support import Cluster, poll_until
from tests.test_cluster_discovery import Zone, start_dns
from tests.test_cluster_udp import RegistryStub, free_udp_port, node, random_group
from tests.test_storage_cluster import REDIS_DB

URL = "http://example.test"
ADMIN_KEY = "admin-key"
ADMIN_AUTH = {"Authorization": "Bearer " + base64.b64encode(ADMIN_KEY.encode()).decode()}  # as the original
CLUSTER_KEY = "udp-e2e-cluster-key"


class Logged:
    """The text of every log event of one namespace."""

    def __init__(self, test, namespace):
        self.namespace = namespace
        self.lines = []
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event):
        if event.get("log_namespace") == self.namespace:
            from twisted.logger import formatEvent

            self.lines.append(formatEvent(event))


class WiringTests(unittest.TestCase):
    def build(self, *argv, environ=None, **env):
        config = parse_config(["--ingress-http-url", URL, *argv], env)
        node = Node(id="a" * 40, host="1@a", ip="127.0.0.1")
        registry = ConnectionRegistry(config, node.id, reactor)
        self.log = Logged(self, "exposr.cluster")
        return _cluster(config, reactor, node, registry, environ or {})

    def namespace_file(self):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("exposr")
        return path

    def test_auto_outside_kubernetes_is_multicast(self):
        missing = os.path.abspath(self.mktemp())
        cluster, multi, problem = self.build("--cluster", "udp",
                                             "--cluster-udp-discovery-kubernetes-namespace-file", missing)
        self.assertIsNone(problem)
        self.assertTrue(multi)
        self.assertIsInstance(cluster.bus, UDPBus)
        self.assertIsInstance(cluster.bus.discovery, MulticastDiscovery)
        self.assertEqual((cluster.bus.multicast_group, cluster.bus.multicast_ttl, cluster.bus.port),
                         ("239.0.0.1", 1, 1025))
        self.assertIn(f"Cluster mode udp (--cluster udp): UDP port 1025, multicast discovery "
                      f"(auto: {missing} does not exist): group 239.0.0.1 on 127.0.0.1, TTL 1", self.log.lines)

    def test_auto_in_kubernetes_is_kubernetes(self):
        path = self.namespace_file()
        cluster, multi, problem = self.build(
            "--cluster-udp-discovery-kubernetes-namespace-file", path, "--cluster-udp-port", "7946",
            "--dns-server", "127.0.0.1:5353", "--storage-url", "postgres://127.0.0.1/test",
            environ={"SERVICE_NAME": "exposr-headless", "POD_NAMESPACE": "prod"},
        )
        discovery = cluster.bus.discovery
        self.assertIsInstance(discovery, KubernetesDiscovery)
        self.assertEqual(discovery.hostname, "exposr-headless.prod.svc.cluster.local")
        self.assertIs(discovery.membership, cluster.membership)
        self.assertEqual(discovery.resolver.servers, [("127.0.0.1", 5353)])
        self.assertIsNone(cluster.bus.multicast_group)
        self.assertIn(
            "Cluster mode udp (--cluster auto: the postgres: storage can be shared by several nodes): "
            f"UDP port 7946, kubernetes discovery (auto: {path} exists): "
            "exposr-headless.prod.svc.cluster.local via DNS server 127.0.0.1:5353", self.log.lines)

    def test_multicast_can_be_forced_in_kubernetes(self):
        cluster, _, _ = self.build("--cluster", "udp", "--cluster-udp-discovery", "multicast",
                                   "--cluster-udp-discovery-kubernetes-namespace-file", self.namespace_file(),
                                   "--cluster-udp-discovery-multicast-group", "239.5.5.5",
                                   "--cluster-udp-discovery-multicast-ttl", "0")
        self.assertEqual((cluster.bus.multicast_group, cluster.bus.multicast_ttl), ("239.5.5.5", 0))
        self.assertTrue(any("multicast discovery (forced)" in line for line in self.log.lines))

    def test_kubernetes_forced_outside_kubernetes_is_a_start_up_problem(self):
        cluster, _, problem = self.build("--cluster", "udp", "--cluster-udp-discovery", "kubernetes",
                                         "--cluster-udp-discovery-kubernetes-namespace-file", "/nonexistent/ns")
        self.assertEqual(str(problem), "Selected peer discovery method kubernetes could not be used")
        self.assertIsInstance(cluster.bus, LocalBus)  # nothing bound for a server that will not start

    def test_auto_resolution_is_logged(self):
        self.build()
        self.assertIn("Cluster mode single-node (--cluster auto: the memory: storage belongs to this "
                      "process alone): in-process bus", self.log.lines)
        self.build("--cluster", "single-node")
        self.assertIn("Cluster mode single-node (--cluster single-node): in-process bus", self.log.lines)

    def test_udp_with_memory_storage_warns(self):
        self.build("--cluster", "udp", "--cluster-udp-discovery", "multicast")
        self.assertTrue(any(line.startswith("memory:// storage belongs to one process") for line in self.log.lines))


def free_tcp_port():
    """A TCP port free on every address (checked on the wildcard)."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


class ThreeProcessTests(unittest.TestCase):
    timeout = 120

    def spawn(self, n, ports, dns_server, namespace_file, **extra_env):
        ip = "127.0.0.%d" % n
        environ = procs.env(
            EXPOSR_CLUSTER="udp", EXPOSR_CLUSTER_UDP_DISCOVERY="kubernetes",
            EXPOSR_CLUSTER_UDP_DISCOVERY_KUBERNETES_NAMESPACE_FILE=namespace_file,
            SERVICE_NAME="exposr-e2e-headless", POD_NAMESPACE="e2e", EXPOSR_CLUSTER_KEY=CLUSTER_KEY,
            **extra_env,
        )
        proto, transport = procs.exposrd(
            "--ingress-http-url", "http://example.test:%d" % ports["api"],
            "--api-port", str(ports["api"]), "--ingress-http-port", str(ports["api"]),
            "--admin-api-enable", "--admin-api-port", str(ports["admin"]), "--admin-api-key", ADMIN_KEY,
            "--listen-address", ip, "--cluster-node-ip", ip,
            "--cluster-udp-port", str(ports["udp"]), "--cluster-discovery-wait", "0",
            "--dns-server", dns_server, "--storage-url", "redis://127.0.0.1:6379/%d" % REDIS_DB,
            "--log-level", "info",
            environ=environ,
        )
        self.addCleanup(self.stop, proto, transport)
        return proto

    @defer.inlineCallbacks
    def stop(self, proto, transport):
        procs.stop(transport, signal.SIGTERM)
        try:
            yield proto.ended.addTimeout(30, reactor)
        except defer.TimeoutError:
            procs.stop(transport, signal.SIGKILL)

    @defer.inlineCallbacks
    def test_three_nodes_find_each_other_through_the_headless_service(self):
        zone = Zone()
        zone.set("exposr-e2e-headless.e2e.svc.cluster.local", "127.0.0.1", "127.0.0.2", "127.0.0.3")
        host, port = start_dns(self, zone)
        namespace_file = os.path.abspath(self.mktemp())
        with open(namespace_file, "w") as f:
            f.write("e2e")
        ports = {"api": free_tcp_port(), "admin": free_tcp_port(), "udp": free_udp_port()}

        nodes = [self.spawn(n, ports, "%s:%d" % (host, port), namespace_file) for n in (1, 2, 3)]
        for proto in nodes:
            yield proto.wait_for(b"exposrd ready", timeout=60)
        ids = [re.search(rb"node ([0-9a-f]{40})", proto.output).group(1).decode() for proto in nodes]
        self.assertEqual(len(set(ids)), 3)
        for proto in nodes:
            self.assertIn(b"kubernetes discovery (forced)", proto.output)
            self.assertIn(b"exposr-e2e-headless.e2e.svc.cluster.local", proto.output)
        # every node learns the others from their heartbeats ("Cluster node <id> ... joined")
        for i, proto in enumerate(nodes):
            for j, other in enumerate(ids):
                if i != j:
                    yield proto.wait_for(other.encode(), timeout=30)

        for n, own in zip((1, 2, 3), ids):
            status, body = yield procs.http("GET", "http://127.0.0.%d:%d/v1/admin/cluster" % (n, ports["admin"]),
                                            headers=ADMIN_AUTH)
            self.assertEqual(status, 200)
            listed = json.loads(body)["nodes"]
            self.assertEqual(sorted((e["node_id"], e["ip"], e["is_stale"]) for e in listed),
                             sorted(zip(ids, ("127.0.0.1", "127.0.0.2", "127.0.0.3"), (False,) * 3)))
            self.assertEqual(listed[0]["node_id"], own)  # this node first
        for proto in nodes:
            self.assertNotIn(b"Traceback", proto.output)
            self.assertNotIn(b"Dropped", proto.output)  # no message rejected

    @defer.inlineCallbacks
    def test_kubernetes_discovery_outside_kubernetes_fails_start_up(self):
        proto, transport = procs.exposrd(
            "--ingress-http-url", URL, "--api-port", "0", "--listen-address", "127.0.0.1",
            "--storage-url", "redis://127.0.0.1:6379/%d" % REDIS_DB, "--cluster-udp-port", str(free_udp_port()),
            "--cluster-udp-discovery-kubernetes-namespace-file", os.path.abspath(self.mktemp()),
            environ=procs.env(EXPOSR_CLUSTER="udp", EXPOSR_CLUSTER_UDP_DISCOVERY="kubernetes"),
        )
        self.addCleanup(procs.stop, transport, signal.SIGKILL)
        code = yield proto.ended.addTimeout(60, reactor)
        self.assertEqual(code, 255)
        self.assertIn(b"Failed to start up: Selected peer discovery method kubernetes could not be used",
                      proto.output)
        self.assertNotIn(b"Traceback", proto.output)


class _ThroughPeers:
    """A tunnel held by node A, used through B and C, on the UDP bus (``bus``)."""

    bus = None

    @defer.inlineCallbacks
    def setUp(self):
        yield ce._Base.setUp(self)
        self.c = yield self.cluster(bus=self.bus)
        self.a, self.b, self.c_ = self.c.nodes

    @defer.inlineCallbacks
    def test_tunnel_on_a_served_through_b_and_c(self):
        tunnel_id, _, _ = yield self.tunnel_on(self.c, self.a, "web")
        for n in (self.b, self.c_):
            yield self.reachable(n, tunnel_id)
            yield self.assertGetExact(n, tunnel_id, 300_000)
        # B and C forwarded: every connection of the tunnel (the client opens two) is A's, as every node sees it
        seen = yield self.c.wait_alive(self.c.nodes, tunnel_id, 2)
        self.assertEqual(seen, {"A": 2, "B": 2, "C": 2})
        for n in self.c.nodes:
            held_by = {c["node_id"] for c in (yield n.alive_connections(tunnel_id))}
            self.assertEqual(held_by, {self.a.node_id}, n)
        for n in self.c.nodes:
            self.assertIn(b"Cluster mode udp", n.proc.output)
            self.assertNotIn(b"Traceback", n.proc.output)


class MulticastThroughPeersTests(_ThroughPeers, ce._Base):
    bus = "udp-multicast"

    @defer.inlineCallbacks
    def test_a_killed_node_is_marked_stale_by_the_others(self):
        for n in self.c.nodes:
            self.assertIn(b"multicast discovery (forced): group %s" % self.c.group.encode(), n.proc.output)
        yield self.c_.kill()
        started = reactor.seconds()

        @defer.inlineCallbacks
        def views():
            out = []
            for n in (self.a, self.b):
                listed = yield n.cluster_view()
                out.append({e["node_id"]: e["is_stale"] for e in listed})
            return out

        # stale once 30 s passed without its heartbeat (heartbeats every 9.5 s): 20.5 to 30 s after the kill
        last = yield poll_until(views, lambda vs: all(v.get(self.c_.node_id) for v in vs), STALE_AFTER + 15,
                                interval=0.5, what="C stale on A and B")
        self.assertGreaterEqual(reactor.seconds() - started, STALE_AFTER - 9.5 - 1)
        for v in last:  # still listed, A and B fresh
            self.assertEqual(v, {self.a.node_id: False, self.b.node_id: False, self.c_.node_id: True})


class KubernetesThroughPeersTests(_ThroughPeers, ce._Base):
    bus = "udp-kubernetes"

    @defer.inlineCallbacks
    def test_tunnel_on_a_served_through_b_and_c(self):
        yield _ThroughPeers.test_tunnel_on_a_served_through_b_and_c(self)
        for n in self.c.nodes:
            self.assertIn(b"kubernetes discovery (forced): " + self.c.headless.encode(), n.proc.output)
        self.assertIn((self.c.headless, "A"), self.c.zone.queries)


class StaleThenRemovedTests(unittest.TestCase):
    """
    Two `ClusterService` nodes on real UDP buses (multicast on loopback, TTL 0),
    their membership timers on a `Clock`: the bus I/O is real, the 30 s and
    60 s are the Clock's.
    """

    @defer.inlineCallbacks
    def setUp(self):
        port, group = free_udp_port(), random_group()
        self.clock = task.Clock()
        self.services = []
        for n in (1, 2):
            bus = UDPBus(node(n), CLUSTER_KEY, reactor, MulticastDiscovery(group), port=port,
                         multicast_group=group, multicast_ttl=0)
            service = ClusterService(bus, node(n), RegistryStub(0, 0), self.clock)
            service.startService()
            self.addCleanup(lambda s=service: s.stopService() if s.running else None)
            yield service.bus_ready().addTimeout(10, reactor)
            self.services.append(service)

    def listed(self, service):
        return {e["node_id"]: e["is_stale"] for e in service.membership.view()}

    @defer.inlineCallbacks
    def test_stopped_node_is_stale_after_30_s_and_removed_after_60_s(self):
        one, two = self.services
        for service in (one, two):  # the start-up heartbeats cross
            service.heartbeat()
        yield poll_until(lambda: defer.succeed((self.listed(one), self.listed(two))),
                         lambda v: len(v[0]) == 2 and len(v[1]) == 2, 10, interval=0.05,
                         what="both nodes listing each other")
        yield two.stopService()
        self.assertEqual(self.listed(one), {node(1).id: False, node(2).id: False})

        self.clock.advance(STALE_AFTER - 0.1)
        self.assertEqual(self.listed(one), {node(1).id: False, node(2).id: False})
        self.assertEqual(one.membership.address(node(2).id), "127.0.0.2")
        self.clock.advance(0.1)
        self.assertEqual(self.listed(one), {node(1).id: False, node(2).id: True})
        self.assertIsNone(one.membership.address(node(2).id))  # nothing forwarded to a stale node
        self.assertEqual(one.membership.fresh_ips(), ["127.0.0.1"])

        self.clock.advance(REMOVE_AFTER - STALE_AFTER - 0.1)
        self.assertIn(node(2).id, self.listed(one))
        self.clock.advance(0.1)
        self.assertEqual(self.listed(one), {node(1).id: False})

    @defer.inlineCallbacks
    def test_a_heartbeat_makes_a_stale_node_fresh(self):
        one, two = self.services
        yield poll_until(lambda: defer.succeed(self.listed(one)), lambda v: len(v) == 2, 10, interval=0.05,
                         what="node 1 listing node 2")
        self.clock.advance(STALE_AFTER)
        self.assertTrue(self.listed(one)[node(2).id])
        two.heartbeat()  # real datagram
        yield poll_until(lambda: defer.succeed(self.listed(one)), lambda v: v.get(node(2).id) is False, 10,
                         interval=0.05, what="node 2 fresh again")
        self.clock.advance(REMOVE_AFTER - STALE_AFTER)
        self.assertIn(node(2).id, self.listed(one))  # the heartbeat re-armed the removal timer
