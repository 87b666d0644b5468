"""Prometheus metrics of one server, read at scrape time (``/metrics`` on the admin port).

`metrics_registry(...)` builds a ``prometheus_client`` `CollectorRegistry` of
its own per server (never the global default one: several servers in one
process do not collide) holding the process collector and one `ServerCollector`
that turns the counters the server keeps anyway (`exposr.stats`, the
connection registry, the storage guard, the cluster service and bus, the rate
limiters) into metric families when scraped. Nothing is counted on a hot path
for the metrics' sake beyond the ingress's few integer additions per request.

No label carries a tunnel id, a host, a path or anything else a client
chooses: every label has a fixed, small set of values.
"""

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from exposr.cluster.envelope import EnvelopeError

#: the labels of `exposr.stats.RequestStats.classes` by index
_CLASSES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx", "other", "other", "other", "other")

#: why the cluster bus drops a message (`exposr.cluster.envelope.EnvelopeError` reasons)
_REJECT_REASONS = tuple(sorted({cls.reason for cls in (EnvelopeError, *EnvelopeError.__subclasses__())}))

#: the cluster events this server sends; anything else received counts as "other"
_EVENTS = ("cluster:heartbeat", "tunnel:announce", "tunnel:disconnect")


def transport_kind(conn):
    """``ws``, ``ssh`` or ``other``: which transport carries a local connection."""
    module = type(conn).__module__
    if module.startswith("exposr.transport.ssh"):
        return "ssh"
    if module.startswith("exposr.transport.ws"):
        return "ws"
    return "other"


def open_streams(conn):
    """Streams open on a local connection (the transports keep them in ``_streams``)."""
    return len(getattr(conn, "_streams", ()))


class BusReceived:
    """A bus subscriber counting the verified messages of other nodes, by event."""

    def __init__(self, node_id):
        self.node_id = node_id
        self.by_event = dict.fromkeys((*_EVENTS, "other"), 0)

    def __call__(self, message):
        if message.node_id != self.node_id:
            event = message.event if message.event in _EVENTS else "other"
            self.by_event[event] += 1


class ServerCollector:
    """The server's own metrics, from its parts' counters and state at scrape time.

    Every argument but ``registry`` may be None (that part is not running):
    its metrics are then left out.
    """

    def __init__(self, registry, http_stats=None, sni=None, http_ingress=None, storage=None,
                 cluster=None, received=None, limiters=()):
        self.registry = registry
        self.http_stats = http_stats
        self.sni = sni
        self.http_ingress = http_ingress
        self.storage = storage
        self.cluster = cluster
        self.received = received
        self.limiters = list(limiters)

    def describe(self):
        return []  # not checked for name clashes at registration: the names are ours alone

    def collect(self):
        yield from self._tunnels()
        yield from self._ingress()
        if self.storage is not None and hasattr(self.storage, "durations"):
            yield from self._storage()
        if self.cluster is not None:
            yield from self._cluster()
        if self.limiters:
            refused = CounterMetricFamily("exposr_ratelimit_refused", "Attempts refused by a failure rate limit",
                                          labels=["what"])
            totals = {}
            for limiter in self.limiters:
                totals[limiter.what] = totals.get(limiter.what, 0) + limiter.refused
            for what, value in sorted(totals.items()):
                refused.add_metric([what], value)
            yield refused

    def _tunnels(self):
        local, cluster = self.registry.connected_counts()
        tunnels = GaugeMetricFamily("exposr_tunnels_connected",
                                    "Tunnels connected: held by this node (local), anywhere in the cluster (cluster)",
                                    labels=["scope"])
        tunnels.add_metric(["local"], local)
        tunnels.add_metric(["cluster"], cluster)
        yield tunnels
        conns = dict.fromkeys(("ws", "ssh"), 0)
        streams = dict.fromkeys(("ws", "ssh"), 0)
        for conn in self.registry.alive_local_connections():
            kind = transport_kind(conn)
            conns[kind] = conns.get(kind, 0) + 1
            streams[kind] = streams.get(kind, 0) + open_streams(conn)
        family = GaugeMetricFamily("exposr_transport_connections", "Tunnel client connections held by this node",
                                   labels=["kind"])
        for kind, value in conns.items():
            family.add_metric([kind], value)
        yield family
        family = GaugeMetricFamily("exposr_transport_streams_open",
                                   "Streams open on this node's tunnel client connections", labels=["kind"])
        for kind, value in streams.items():
            family.add_metric([kind], value)
        yield family

    def _ingress(self):
        accepted = CounterMetricFamily("exposr_ingress_connections", "Public client connections accepted",
                                       labels=["ingress"])
        open_ = GaugeMetricFamily("exposr_ingress_connections_open", "Public client connections open",
                                  labels=["ingress"])
        stats = self.http_stats
        if stats is not None:
            accepted.add_metric(["http"], stats.connections)
            if self.http_ingress is not None:
                open_.add_metric(["http"], len(self.http_ingress.sessions))
        if self.sni is not None:
            accepted.add_metric(["sni"], self.sni.accepted)
            open_.add_metric(["sni"], len(self.sni.connections))
        yield accepted
        yield open_
        if self.sni is not None:
            yield CounterMetricFamily("exposr_ingress_sni_refused",
                                      "SNI connections closed before the TLS handshake (no or unknown "
                                      "server name, bad ClientHello, tunnel refused)", value=self.sni.refused)
        if stats is None:
            return
        requests = CounterMetricFamily("exposr_ingress_requests", "Requests through the ingress by status class",
                                       labels=["ingress", "status_class"])
        counts = {}
        for index, value in enumerate(stats.classes):
            label = _CLASSES[index]
            counts[label] = counts.get(label, 0) + value
        for label, value in counts.items():
            requests.add_metric(["http", label], value)
        yield requests
        family = HistogramMetricFamily("exposr_ingress_request_duration_seconds",
                                       "From a request's head to the end of its response", labels=["ingress"])
        durations = stats.durations
        family.add_metric(["http"], durations.cumulative(), durations.total)
        yield family
        family = CounterMetricFamily("exposr_ingress_bytes", "Bytes from (in) and to (out) public clients",
                                     labels=["ingress", "direction"])
        sessions = self.http_ingress.sessions if self.http_ingress is not None else ()
        bytes_in, bytes_out = stats.bytes(list(sessions))
        family.add_metric(["http", "in"], bytes_in)
        family.add_metric(["http", "out"], bytes_out)
        yield family

    def _storage(self):
        storage = self.storage
        family = HistogramMetricFamily("exposr_storage_operation_duration_seconds",
                                       "Storage calls that finished within the deadline", labels=["operation"])
        for name, durations in sorted(storage.durations.items()):
            family.add_metric([name], durations.cumulative(), durations.total)
        yield family
        family = CounterMetricFamily("exposr_storage_errors", "Storage calls failed as unavailable",
                                     labels=["reason"])
        family.add_metric(["unavailable"], storage.unavailable)
        family.add_metric(["timeout"], storage.timeouts)
        family.add_metric(["circuit_open"], storage.short_circuited)
        yield family
        yield GaugeMetricFamily("exposr_storage_circuit_open",
                                "1 while storage calls are refused at once after repeated failures",
                                value=1 if storage.circuit_open else 0)

    def _cluster(self):
        cluster = self.cluster
        peers = list(cluster.membership.peers.values())
        yield GaugeMetricFamily("exposr_cluster_nodes", "Cluster nodes known, this one included",
                                value=1 + len(peers))
        yield GaugeMetricFamily("exposr_cluster_nodes_stale", "Known cluster nodes not heard from lately",
                                value=sum(1 for p in peers if p.stale))
        family = CounterMetricFamily("exposr_cluster_messages_sent", "Cluster bus messages published",
                                     labels=["event"])
        published = cluster.published
        for event in _EVENTS:
            family.add_metric([event], published.get(event, 0))
        yield family
        if self.received is not None:
            family = CounterMetricFamily("exposr_cluster_messages_received",
                                         "Verified cluster bus messages from other nodes", labels=["event"])
            for event, value in self.received.by_event.items():
                family.add_metric([event], value)
            yield family
        rejected = getattr(cluster.bus, "rejected", None)
        if rejected is not None:
            family = CounterMetricFamily("exposr_cluster_messages_rejected",
                                         "Cluster bus messages dropped (failed verification or replay check)",
                                         labels=["reason"])
            for reason in sorted(set(_REJECT_REASONS) | set(rejected)):
                family.add_metric([reason], rejected.get(reason, 0))
            yield family


def metrics_registry(connections, http_stats=None, sni=None, http_ingress=None, storage=None, cluster=None,
                     node_id=None, limiters=()):
    """A registry of its own for one server: the process collector and a `ServerCollector`.

    With a ``cluster``, a subscriber counting received messages is added to its bus.
    """
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    received = None
    if cluster is not None:
        received = BusReceived(node_id)
        cluster.bus.subscribe(received)
    registry.register(ServerCollector(connections, http_stats=http_stats, sni=sni, http_ingress=http_ingress,
                                      storage=storage, cluster=cluster, received=received, limiters=limiters))
    return registry
