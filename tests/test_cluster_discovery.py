"""Peer discovery of the UDP bus: multicast, and Kubernetes against a real DNS
server started in the test (twisted.names, 127.0.0.1, port 0) answering the
headless service name."""

from twisted.internet import defer, reactor, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.names import authority, client, common, dns, server
from twisted.trial import unittest

from exposr.cluster.discovery import (
    DEFAULT_NAMESPACE, DEFAULT_SERVICE, KubernetesDiscovery, MulticastDiscovery,
    kubernetes_eligible, kubernetes_names,
)
from exposr.config import Config

HEADLESS = "exposr-headless.exposr.svc.cluster.local"
SOA = dns.Record_SOA(mname=b"ns.cluster.local", rname=b"root.cluster.local",
                     serial=1, refresh=1, retry=1, expire=1, minimum=1, ttl=1)


class Broken(Exception):
    """Makes the test server answer SERVFAIL."""


class Zone(authority.FileAuthority):
    """
    An in-memory ``cluster.local``: ``set(name, *ips)`` gives a name A and
    AAAA records; names in ``broken`` answer SERVFAIL, names in ``silent``
    are never answered. ``queries`` lists (name, type) as asked.
    """

    def __init__(self):
        common.ResolverBase.__init__(self)
        self.soa = (b"cluster.local", SOA)
        self.records = {b"cluster.local": [SOA]}
        self.broken = set()
        self.silent = set()
        self.queries = []

    def set(self, name, *ips):
        self.records[name.encode("ascii")] = [
            dns.Record_AAAA(ip, ttl=1) if ":" in ip else dns.Record_A(ip, ttl=1) for ip in ips
        ]

    def _lookup(self, name, cls, type, timeout=None):
        self.queries.append((name.decode("ascii"), dns.QUERY_TYPES.get(type, type)))
        if name.decode("ascii") in self.silent:
            return defer.Deferred()
        if name.decode("ascii") in self.broken:
            return defer.fail(Broken(name))
        return authority.FileAuthority._lookup(self, name, cls, type, timeout)


def start_dns(test, zone):
    """Serve ``zone`` on 127.0.0.1, UDP, port 0: ``(host, port)``."""
    factory = server.DNSServerFactory(authorities=[zone])
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return ("127.0.0.1", port.getHost().port)


class Known:
    """A stand-in for `Membership`: this node and its fresh peers."""

    def __init__(self, *ips):
        self.ips = list(ips)

    def fresh_ips(self):
        return list(self.ips)


def within(d, seconds=10):
    return d.addTimeout(seconds, reactor)


class MulticastDiscoveryTests(unittest.TestCase):
    def test_peers_are_the_group(self):
        discovery = MulticastDiscovery("239.1.2.3")
        self.assertEqual(self.successResultOf(discovery.peers()), ["239.1.2.3"])
        self.assertEqual(discovery.name, "multicast")


class KubernetesNamesTests(unittest.TestCase):
    def test_options_first(self):
        config = Config(cluster_udp_discovery_kubernetes_service="svc",
                        cluster_udp_discovery_kubernetes_namespace="ns")
        self.assertEqual(kubernetes_names(config, {"SERVICE_NAME": "x", "POD_NAMESPACE": "y"}), ("svc", "ns"))

    def test_then_the_environment_as_the_helm_chart_sets_it(self):
        env = {"SERVICE_NAME": "exposr-x-headless", "POD_NAMESPACE": "prod"}
        self.assertEqual(kubernetes_names(Config(), env), ("exposr-x-headless", "prod"))

    def test_env_names_are_options(self):
        config = Config(cluster_udp_discovery_kubernetes_service_env="SVC",
                        cluster_udp_discovery_kubernetes_namespace_env="NS")
        env = {"SVC": "a", "NS": "b", "SERVICE_NAME": "x", "POD_NAMESPACE": "y"}
        self.assertEqual(kubernetes_names(config, env), ("a", "b"))

    def test_defaults(self):
        self.assertEqual(kubernetes_names(Config(), {"SERVICE_NAME": ""}), (DEFAULT_SERVICE, DEFAULT_NAMESPACE))
        self.assertEqual((DEFAULT_SERVICE, DEFAULT_NAMESPACE), ("exposr-headless", "default"))

    def test_eligible_when_the_namespace_file_exists(self):
        path = self.mktemp()
        self.assertFalse(kubernetes_eligible(path))
        with open(path, "w") as f:
            f.write("exposr")
        self.assertTrue(kubernetes_eligible(path))
        self.assertEqual(Config().cluster_udp_discovery_kubernetes_namespace_file,
                         "/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class KubernetesDiscoveryTests(unittest.TestCase):
    def setUp(self):
        self.zone = Zone()
        self.zone.set(HEADLESS, "10.1.0.1", "10.1.0.2", "10.1.0.3")
        self.resolver = client.Resolver(servers=[start_dns(self, self.zone)], reactor=reactor)
        self.clock = task.Clock()
        self.known = Known("10.1.0.2", "10.1.0.9")
        self.discovery = self.make()

    def make(self, timeout=(1, 2)):
        return KubernetesDiscovery(self.resolver, "exposr-headless", "exposr", "cluster.local",
                                   self.known, self.clock, timeout=timeout)

    @defer.inlineCallbacks
    def test_a_records_then_known_nodes_without_duplicates(self):
        self.assertEqual(self.discovery.hostname, HEADLESS)
        peers = yield within(self.discovery.peers())
        self.assertEqual(peers, ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.9"])
        self.assertEqual(self.zone.queries, [(HEADLESS, "A")])

    @defer.inlineCallbacks
    def test_aaaa_records_when_there_is_no_a_record(self):
        self.zone.set(HEADLESS, "fd00::1", "fd00::2")
        peers = yield within(self.discovery.peers())
        self.assertEqual(peers, ["fd00::1", "fd00::2", "10.1.0.2", "10.1.0.9"])
        self.assertEqual(self.zone.queries, [(HEADLESS, "A"), (HEADLESS, "AAAA")])

    @defer.inlineCallbacks
    def test_answers_are_cached_for_one_second(self):
        yield within(self.discovery.peers())
        self.zone.set(HEADLESS, "10.1.0.4")
        self.known.ips.append("10.1.0.5")  # the known nodes are not cached
        self.clock.advance(0.9)
        peers = yield within(self.discovery.peers())
        self.assertEqual(peers, ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.9", "10.1.0.5"])
        self.assertEqual(self.discovery.lookups, 1)
        self.clock.advance(0.1)
        peers = yield within(self.discovery.peers())
        self.assertEqual(peers, ["10.1.0.4", "10.1.0.2", "10.1.0.9", "10.1.0.5"])
        self.assertEqual(self.discovery.lookups, 2)

    @defer.inlineCallbacks
    def test_concurrent_callers_share_one_lookup(self):
        results = yield within(defer.gatherResults([self.discovery.peers() for _ in range(5)]))
        self.assertEqual(results, [["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.9"]] * 5)
        self.assertEqual(self.discovery.lookups, 1)
        self.assertEqual(self.zone.queries, [(HEADLESS, "A")])

    @defer.inlineCallbacks
    def test_failure_gives_the_known_nodes_and_is_not_cached(self):
        self.zone.broken.add(HEADLESS)
        peers = yield within(self.discovery.peers())
        self.assertEqual(peers, ["10.1.0.2", "10.1.0.9"])
        self.zone.broken.clear()
        peers = yield within(self.discovery.peers())  # at once: nothing was cached
        self.assertEqual(peers, ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.9"])
        self.assertEqual(self.discovery.lookups, 2)
        self.flushLoggedErrors(Broken)  # the test server logs what it answered SERVFAIL for

    @defer.inlineCallbacks
    def test_failures_are_logged_once_until_the_name_answers_again(self):
        logged = []
        observer = lambda e: logged.append(e) if e.get("log_namespace") == "exposr.cluster.discovery" else None
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.zone.broken.add(HEADLESS)
        yield within(self.discovery.peers())
        yield within(self.discovery.peers())
        self.zone.broken.clear()
        yield within(self.discovery.peers())
        self.assertEqual([(e["log_level"], formatEvent(e).split(" (")[0]) for e in logged], [
            (LogLevel.warn, "Kubernetes peer discovery: lookup of %s failed" % HEADLESS),
            (LogLevel.info, "Kubernetes peer discovery: %s answers again" % HEADLESS),
        ])
        self.flushLoggedErrors(Broken)

    @defer.inlineCallbacks
    def test_unknown_name_gives_the_known_nodes(self):
        del self.zone.records[HEADLESS.encode()]
        peers = yield within(self.discovery.peers())
        self.assertEqual(peers, ["10.1.0.2", "10.1.0.9"])

    @defer.inlineCallbacks
    def test_no_known_node_and_no_answer_is_an_empty_list(self):
        self.discovery.membership = None
        self.zone.broken.add(HEADLESS)
        self.assertEqual((yield within(self.discovery.peers())), [])
        self.flushLoggedErrors(Broken)

    @defer.inlineCallbacks
    def test_a_server_that_does_not_answer_is_asked_once(self):
        self.zone.silent.add(HEADLESS)
        discovery = self.make(timeout=(0.2,))
        peers = yield within(discovery.peers())
        self.assertEqual(peers, ["10.1.0.2", "10.1.0.9"])
        self.assertEqual(self.zone.queries, [(HEADLESS, "A")])  # no AAAA after a timeout

