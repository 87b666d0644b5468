"""Peer discovery of the UDP cluster bus: the addresses every datagram goes to.

A discovery has ``name`` (for logs) and ``peers()``: a Deferred firing with a
list of IP address strings (never failing). The bus sends one datagram to each.

* `MulticastDiscovery`: the multicast group alone; the kernel delivers to every
  node that joined it.
* `KubernetesDiscovery`: the A records of the headless service
  ``<service>.<namespace>.svc.<cluster domain>`` (its AAAA records when there
  are no A records), then the addresses of this node and of every non-stale
  known peer, without duplicates. An answer is reused for `CACHE_TTL` seconds;
  a failed lookup is not cached and the known nodes alone are used. Lookups
  asked for while one is running wait for that one.

Kubernetes discovery is eligible only where the service-account namespace file
exists (`kubernetes_eligible`).
"""

import os
import socket

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns

log = Logger(namespace="exposr.cluster.discovery")

NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
DEFAULT_SERVICE = "exposr-headless"
DEFAULT_NAMESPACE = "default"
CACHE_TTL = 1.0  # seconds a DNS answer is reused
DNS_TIMEOUT = (1, 2)  # seconds per try of one lookup: messages wait at most 3 s for it


class DiscoveryUnavailable(Exception):
    """The discovery method chosen cannot be used here."""


class MulticastDiscovery:
    """``MulticastDiscovery(group)``: every datagram goes to the group."""

    name = "multicast"

    def __init__(self, group):
        self.group = group
        self._peers = [group]

    def peers(self):
        return defer.succeed(list(self._peers))


def kubernetes_eligible(namespace_file=NAMESPACE_FILE):
    """Whether this process runs in a Kubernetes pod (its service-account namespace file exists)."""
    return os.path.exists(namespace_file)


def kubernetes_names(config, environ):
    """
    ``(service, namespace)`` of the headless service: the options, else the
    environment variables they name (``SERVICE_NAME`` and ``POD_NAMESPACE`` by
    default, as the Helm chart sets them), else `DEFAULT_SERVICE` and
    `DEFAULT_NAMESPACE`.
    """
    service = (config.cluster_udp_discovery_kubernetes_service
               or environ.get(config.cluster_udp_discovery_kubernetes_service_env or "")
               or DEFAULT_SERVICE)
    namespace = (config.cluster_udp_discovery_kubernetes_namespace
                 or environ.get(config.cluster_udp_discovery_kubernetes_namespace_env or "")
                 or DEFAULT_NAMESPACE)
    return service, namespace


def _a_records(answers):
    return [rr.payload.dottedQuad() for rr in answers if rr.type == dns.A]


def _aaaa_records(answers):
    return [socket.inet_ntop(socket.AF_INET6, rr.payload.address) for rr in answers if rr.type == dns.AAAA]


class KubernetesDiscovery:
    """
    ``KubernetesDiscovery(resolver, service, namespace, cluster_domain,
    membership, clock)``: ``resolver`` an `IResolver`; ``membership`` the
    cluster's `Membership` (its ``fresh_ips()``), which may be set after
    construction (the cluster service that owns it is built on the bus).
    """

    name = "kubernetes"

    def __init__(self, resolver, service, namespace, cluster_domain, membership, clock,
                 cache_ttl=CACHE_TTL, timeout=DNS_TIMEOUT):
        self.resolver = resolver
        self.hostname = "%s.%s.svc.%s" % (service, namespace, cluster_domain.strip("."))
        self.membership = membership
        self.clock = clock
        self.cache_ttl = cache_ttl
        self.timeout = tuple(timeout)
        self.lookups = 0  # DNS lookups started (for tests and metrics)
        self._cached = None  # addresses of the last answer
        self._expires = 0.0
        self._waiting = None  # Deferreds of peers() while a lookup runs
        self._failing = False

    def peers(self):
        if self._cached is not None and self.clock.seconds() < self._expires:
            return defer.succeed(self._merge(self._cached))
        d = defer.Deferred()
        if self._waiting is None:
            self._waiting = [d]
            self.lookups += 1
            self._lookup().addBoth(self._looked_up)
        else:
            self._waiting.append(d)
        return d

    def _known(self):
        return self.membership.fresh_ips() if self.membership is not None else []

    def _merge(self, found):
        return list(dict.fromkeys(found + self._known()))

    @defer.inlineCallbacks
    def _lookup(self):
        name = self.hostname
        try:
            answers, _, _ = yield self.resolver.lookupAddress(name, self.timeout)
            found = _a_records(answers)
        except defer.TimeoutError:
            raise  # the server does not answer: no second wait for AAAA
        except Exception:
            found = []  # no such name or a server error: AAAA records may still be there
        if not found:
            answers, _, _ = yield self.resolver.lookupIPV6Address(name, self.timeout)
            found = _aaaa_records(answers)
        return found

    def _looked_up(self, result):
        waiting, self._waiting = self._waiting, None
        if isinstance(result, list):
            self._cached = result
            self._expires = self.clock.seconds() + self.cache_ttl
            if self._failing:
                log.info("Kubernetes peer discovery: {name} answers again", name=self.hostname)
                self._failing = False
            peers = self._merge(result)
        else:
            if not self._failing:
                log.warn("Kubernetes peer discovery: lookup of {name} failed ({reason}); "
                         "sending to the known nodes only", name=self.hostname,
                         reason=result.getErrorMessage() or result.type.__name__)
                self._failing = True
            peers = self._merge([])
        for d in waiting:
            d.callback(list(peers))
