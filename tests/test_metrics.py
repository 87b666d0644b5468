"""``/metrics`` on the admin port: Prometheus text that moves with the traffic.

End to end over real sockets (an in-process server, the real client, a real
target), plus the counters of the parts the end-to-end runs do not reach
(the storage guard, the SNI ingress, the cluster bus).
"""

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from exposr.cluster.envelope import Message
from exposr.connections import ConnectionRegistry
from exposr.errors import StorageUnavailable
from exposr.ingress.sni import SNIIngressFactory
from exposr.metrics import BusReceived, ServerCollector, metrics_registry
from exposr.storage.guard import GuardedStorage
from tests import e2e_support as e2e
from tests.e2e_support import within
from tests.support import make_config

TID = "metricsprobe"


def samples(text):
    """{(sample name, frozenset of labels): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(parsed, name, **labels):
    return parsed.get((name, frozenset(labels.items())), 0.0)


@defer.inlineCallbacks
def scrape(port, path=b"/metrics", headers=()):
    """(response head, body text) of a GET on the admin port."""
    conn = yield e2e.raw_connect(port)
    conn.request(e2e.request(b"GET", path, f"127.0.0.1:{port}", headers=headers))
    head, body, _ = yield conn.response()
    conn.transport.loseConnection()
    return head, body.decode("utf-8")


class _E2EBase(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.addCleanup(e2e.autobahn_settled)
        self.target = yield e2e.HTTPTarget().start()
        self.addCleanup(self.target.stop)

    @defer.inlineCallbacks
    def server(self, **options):
        server = yield e2e.Server(admin_enable=True, admin_port=0, **options).start()
        self.addCleanup(server.stop)
        listeners = server.service.listeners
        server.admin_port = listeners["admin"].address.port
        return server

    @defer.inlineCallbacks
    def serve(self, server, tunnel_id=TID):
        connector = yield e2e.connect_client(server, tunnel_id, self.target.url)
        self.addCleanup(lambda: within(connector.stop()))
        return connector

    @defer.inlineCallbacks
    def traffic(self, server, tunnel_id=TID, n=3, size=1000):
        """``n`` requests of ``size`` body bytes on one kept-alive connection, then one to an
        unknown tunnel; (bytes sent, bytes received) by the public client."""
        conn = yield e2e.raw_connect(server.port)
        sent = 0
        for _ in range(n):
            data = e2e.request(b"GET", b"/bytes/%d" % size, server.host(tunnel_id))
            sent += len(data)
            conn.request(data)
            head, body, _ = yield conn.response()
            self.assertEqual((head.status, len(body)), (200, size))
        data = e2e.request(b"GET", b"/", server.host("nosuchtunnel"))
        sent += len(data)
        conn.request(data)
        head, _, _ = yield conn.response()
        self.assertEqual(head.status, 404)
        conn.transport.loseConnection()
        yield within(conn.closed)
        return sent, len(conn.data)


class MetricsEndToEnd(_E2EBase):
    @defer.inlineCallbacks
    def test_counters_move_with_traffic(self):
        server = yield self.server()
        yield self.serve(server)
        head, before_text = yield scrape(server.admin_port)
        self.assertEqual(head.status, 200)
        self.assertTrue(head.get(b"content-type").startswith(b"text/plain; version="))
        before = samples(before_text)

        sent, received = yield self.traffic(server, n=3, size=1000)
        # the ingress counts a connection's last bytes once it is gone
        yield e2e.wait_until(lambda: not server.ingress.sessions)
        _, text = yield scrape(server.admin_port)
        after = samples(text)

        def moved(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        self.assertEqual(moved("exposr_ingress_requests_total", ingress="http", status_class="2xx"), 3)
        self.assertEqual(moved("exposr_ingress_requests_total", ingress="http", status_class="4xx"), 1)
        self.assertEqual(moved("exposr_ingress_request_duration_seconds_count", ingress="http"), 4)
        self.assertEqual(moved("exposr_ingress_request_duration_seconds_bucket", ingress="http", le="+Inf"), 4)
        self.assertGreater(moved("exposr_ingress_request_duration_seconds_sum", ingress="http"), 0)
        self.assertEqual(moved("exposr_ingress_bytes_total", ingress="http", direction="in"), sent)
        self.assertEqual(moved("exposr_ingress_bytes_total", ingress="http", direction="out"), received)
        self.assertEqual(moved("exposr_ingress_connections_total", ingress="http"), 1)
        self.assertEqual(value(after, "exposr_ingress_connections_open", ingress="http"), 0)

        # the tunnel, its two WebSockets, the stream kept alive in the ingress's pool
        self.assertEqual(value(after, "exposr_tunnels_connected", scope="local"), 1)
        self.assertEqual(value(after, "exposr_tunnels_connected", scope="cluster"), 1)
        self.assertEqual(value(after, "exposr_transport_connections", kind="ws"), 2)
        self.assertEqual(value(after, "exposr_transport_connections", kind="ssh"), 0)
        self.assertGreaterEqual(value(after, "exposr_transport_streams_open", kind="ws"), 1)

        self.assertGreaterEqual(value(after, "exposr_cluster_messages_sent_total", event="cluster:heartbeat"), 1)
        # a single node tells nobody where its tunnels are (its bus only reaches itself)
        self.assertEqual(value(after, "exposr_cluster_messages_sent_total", event="tunnel:announce"), 0)
        self.assertEqual(value(after, "exposr_cluster_nodes"), 1)
        self.assertEqual(value(after, "exposr_cluster_nodes_stale"), 0)
        self.assertIn(("exposr_ratelimit_refused_total", frozenset({("what", "connection token")})), after)
        self.assertIn(("process_cpu_seconds_total", frozenset()), after)

        # no label names a tunnel, a host or a path
        self.assertNotIn(TID, text)
        self.assertNotIn("nosuchtunnel", text)
        self.assertNotIn("/bytes", text)

    @defer.inlineCallbacks
    def test_metrics_need_no_admin_key_beside_the_admin_api(self):
        server = yield self.server(admin_api_enable=True, admin_api_port=0, admin_api_key="s3cret-key")
        head, text = yield scrape(server.admin_port)
        self.assertEqual(head.status, 200)
        self.assertIn("exposr_tunnels_connected", text)
        head, _ = yield scrape(server.admin_port, b"/v1/admin/tunnel")
        self.assertEqual(head.status, 403)  # the admin API still asks for its key

    @defer.inlineCallbacks
    def test_two_servers_in_one_process_count_apart(self):
        a = yield self.server()
        b = yield self.server()
        yield self.serve(a)
        yield self.traffic(a, n=2)
        _, text_a = yield scrape(a.admin_port)
        _, text_b = yield scrape(b.admin_port)
        parsed_a, parsed_b = samples(text_a), samples(text_b)
        self.assertEqual(value(parsed_a, "exposr_ingress_requests_total", ingress="http", status_class="2xx"), 2)
        self.assertEqual(value(parsed_b, "exposr_ingress_requests_total", ingress="http", status_class="2xx"), 0)
        self.assertEqual(value(parsed_a, "exposr_tunnels_connected", scope="local"), 1)
        self.assertEqual(value(parsed_b, "exposr_tunnels_connected", scope="local"), 0)
        self.assertIsNot(a.service.parts.metrics, b.service.parts.metrics)
        # nothing of ours in the process-wide default registry
        self.assertIsNone(REGISTRY.get_sample_value("exposr_tunnels_connected", {"scope": "local"}))

    @defer.inlineCallbacks
    def test_no_admin_interface_no_metrics_and_no_counting(self):
        server = yield e2e.Server().start()
        self.addCleanup(server.stop)
        self.assertIsNone(server.service.parts.metrics)
        self.assertNotIn("admin", server.service.listeners)
        self.assertIsNone(server.ingress.stats)


# -- the parts the end-to-end runs do not reach ------------------------------------


class _Backend:
    """A storage whose ``get`` answers what the test says."""

    def __init__(self):
        self.answers = []

    def get(self, ns, key):
        return self.answers.pop(0)

    get_multi = create = put = delete = list_keys = update = get


def _collector(**kw):
    registry = ConnectionRegistry(make_config(), "node", task.Clock())
    return ServerCollector(registry, **kw)


def _families(collector):
    return {s.name if not s.labels else (s.name, frozenset(s.labels.items())): s.value
            for family in collector.collect() for s in family.samples}


class StorageMetrics(unittest.TestCase):
    def test_latency_errors_and_short_circuits(self):
        clock = task.Clock()
        backend = _Backend()
        guard = GuardedStorage(backend, clock, timeout=5.0, threshold=2, cooldown=10.0)
        backend.answers = [defer.succeed({"x": 1}), defer.fail(StorageUnavailable("down")), defer.Deferred()]
        self.successResultOf(guard.get("ns", "a"))
        self.failureResultOf(guard.get("ns", "b"), StorageUnavailable)
        late = guard.get("ns", "c")
        clock.advance(5.0)  # the deadline: the second consecutive failure opens the circuit
        self.failureResultOf(late, StorageUnavailable)
        self.failureResultOf(guard.put("ns", "d", {}), StorageUnavailable)  # refused at once

        got = _families(_collector(storage=guard))
        self.assertEqual(got[("exposr_storage_operation_duration_seconds_count",
                              frozenset({("operation", "get")}))], 2)
        self.assertEqual(got[("exposr_storage_operation_duration_seconds_count",
                              frozenset({("operation", "put")}))], 0)
        self.assertEqual(got[("exposr_storage_errors_total", frozenset({("reason", "unavailable")}))], 1)
        self.assertEqual(got[("exposr_storage_errors_total", frozenset({("reason", "timeout")}))], 1)
        self.assertEqual(got[("exposr_storage_errors_total", frozenset({("reason", "circuit_open")}))], 1)
        self.assertEqual(got["exposr_storage_circuit_open"], 1)

    def test_memory_storage_has_no_storage_metrics(self):
        got = _families(_collector(storage=object()))
        self.assertFalse([k for k in got if "storage" in str(k)])


@implementer(IOpenSSLServerConnectionCreator)
class _NoCertificates:
    def serverConnectionForTLS(self, tlsProtocol):
        raise AssertionError("no handshake expected")


class SNIMetrics(unittest.TestCase):
    def test_refused_connections_are_counted(self):
        factory = SNIIngressFactory(lambda tid: None, _NoCertificates(), task.Clock())
        for data in (b"\x16\x03\x01\x00\x05hello", b"GET / HTTP/1.1\r\n\r\n"):
            proto = factory.buildProtocol(None)
            proto.makeConnection(StringTransport())
            proto.dataReceived(data)
        got = _families(_collector(sni=factory))
        self.assertEqual(got[("exposr_ingress_connections_total", frozenset({("ingress", "sni")}))], 2)
        self.assertEqual(got["exposr_ingress_sni_refused_total"], 2)


class ClusterMetrics(unittest.TestCase):
    def test_received_by_event_from_other_nodes_only(self):
        received = BusReceived("me")

        def message(node_id, event):
            return Message(event=event, message={}, node_id=node_id, host="h", ip="10.0.0.1", ts=0, seq=0)

        for node_id, event in (("peer", "cluster:heartbeat"), ("peer", "tunnel:announce"),
                               ("peer", "something:new"), ("me", "cluster:heartbeat")):
            received(message(node_id, event))
        self.assertEqual(received.by_event, {"cluster:heartbeat": 1, "tunnel:announce": 1,
                                             "tunnel:disconnect": 0, "other": 1})

    def test_registry_of_its_own_subscribes_to_the_bus(self):
        class Bus:
            rejected = {"replayed": 2}
            subscribers = []

            def subscribe(self, callback):
                self.subscribers.append(callback)

        class Cluster:
            bus = Bus()
            published = {"cluster:heartbeat": 4}

            class membership:
                peers = {}

        registry = ConnectionRegistry(make_config(), "node", task.Clock())
        metrics = metrics_registry(registry, cluster=Cluster, node_id="node")
        self.assertEqual(len(Cluster.bus.subscribers), 1)
        self.assertEqual(metrics.get_sample_value("exposr_cluster_messages_rejected_total",
                                                  {"reason": "replayed"}), 2)
        self.assertEqual(metrics.get_sample_value("exposr_cluster_messages_sent_total",
                                                  {"event": "cluster:heartbeat"}), 4)
        self.assertIsNone(REGISTRY.get_sample_value("exposr_cluster_messages_sent_total",
                                                    {"event": "cluster:heartbeat"}))
