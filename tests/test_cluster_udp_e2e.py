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
* forcing Kubernetes discovery outside Kubernetes fails start-up.

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

from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from exposr.cluster.bus import LocalBus
from exposr.cluster.discovery import KubernetesDiscovery, MulticastDiscovery
from exposr.cluster.udpbus import UDPBus
from exposr.components import _cluster
from exposr.connections import ConnectionRegistry
from exposr.node import Node
from exposr.options import parse_config
from tests import procs
from tests.test_cluster_discovery import Zone, start_dns
from tests.test_cluster_udp import free_udp_port
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
