"""Wiring: the one place that knows every wing (transports, ingresses, APIs).

`build(config, reactor, node, readiness)` creates storage, the domain
services, the router, the transports, ingresses, APIs and listeners for a
`Config`, each given its collaborators in its constructor, and returns them as
`Parts` (the services in start-up order); the root service adds them.
"""

import os
from urllib.parse import urlsplit

import attrs
from twisted.application.service import MultiService
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site
from zope.interface import implementer

from exposr.accounts import AccountService
from exposr.api.admin import AdminAPI, AdminInterface, admin_resource
from exposr.api.common import MAX_BODY
from exposr.api.public import PublicAPI
from exposr.cluster.bus import LocalBus
from exposr.cluster.forward import PeerEndpoints
from exposr.cluster.service import DISCOVERY_WAIT, ClusterService
from exposr.connections import ConnectionRegistry
from exposr.listen import Listener, tcp_endpoint
from exposr.listener import Door
from exposr.log import AccessLog
from exposr.ratelimit import FailureLimiter
from exposr.router import Router
from exposr.stats import RequestStats
from exposr.config import Config
from exposr.storage import storage_from_url
from exposr.storage.guard import GuardedStorage
from exposr.tunnels import TunnelService


class BoundedRequest(Request):
    """A request whose body is kept only up to what the API accepts.

    twisted.web would otherwise store any body (in memory, then a temporary
    file) before a resource sees it. Bytes past the limit are read and
    dropped; one byte over is kept so the API answers its "request entity too
    large" error.
    """

    max_body = MAX_BODY

    def gotLength(self, length):
        super().gotLength(None if length is None or length > self.max_body else length)

    def handleContentChunk(self, data):
        room = self.max_body + 1 - self.content.tell()
        if room > 0:
            self.content.write(data[:room])


_TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class BoundedChannel(HTTPChannel):
    """An HTTP channel whose every read from the client is bounded in time.

    Its site gives the limits: a request head must be complete within
    ``head_timeout`` of its first byte (408, closed); a request body must
    bring at least ``body_min_rate`` bytes/s, and a byte, over each
    ``body_timeout`` window (closed); silence at any other time (an idle
    kept-alive connection) is twisted.web's own inactivity timeout, the
    site's ``timeout`` (``head_timeout``).
    """

    _head_call = None
    _body_call = None
    _idle = None

    def dataReceived(self, data):
        if self._body_call is not None:
            self._body_got += len(data)
        elif self._head_call is None and self.line_mode and not self._handlingRequest:
            self._head_call = self.callLater(self.site.head_timeout, self._head_too_slow)
        super().dataReceived(data)

    def _head_too_slow(self):
        self._head_call = None
        self._log.info("request head too slow from {peer}: closed", peer=str(self.transport.getPeer()))
        self.transport.write(_TIMEOUT_408)
        self.transport.loseConnection()

    def allHeadersReceived(self):
        self._cancel_head()
        super().allHeadersReceived()
        if self.length != 0 and self.transport is not None:
            # the body's own window replaces the inactivity timeout meanwhile
            self._idle = self.setTimeout(None)
            self._body_got = 0
            self._body_since = self.site.clock.seconds()
            self._body_call = self.callLater(self.site.body_timeout, self._body_check)

    def _body_check(self):
        self._body_call = None
        clock = self.site.clock
        elapsed = clock.seconds() - self._body_since
        if self._body_got < max(1, self.site.body_min_rate * elapsed):
            self._log.info("request body too slow from {peer} ({n} bytes in {s:.0f} s): closed",
                           peer=str(self.transport.getPeer()), n=self._body_got, s=elapsed)
            self.transport.abortConnection()
            return
        self._body_got = 0
        self._body_since = clock.seconds()
        self._body_call = self.callLater(self.site.body_timeout, self._body_check)

    def allContentReceived(self):
        if self._body_call is not None:
            self._cancel_body()
            self.setTimeout(self._idle)
        super().allContentReceived()

    def _cancel_head(self):
        if self._head_call is not None:
            if self._head_call.active():
                self._head_call.cancel()
            self._head_call = None

    def _cancel_body(self):
        if self._body_call is not None:
            if self._body_call.active():
                self._body_call.cancel()
            self._body_call = None

    def connectionLost(self, reason):
        self._cancel_head()
        self._cancel_body()
        super().connectionLost(reason)


class _QuietSite(Site):
    noisy = False
    requestFactory = BoundedRequest
    protocol = BoundedChannel

    def __init__(self, resource, reactor, head_timeout=30.0, body_timeout=60.0, body_min_rate=10):
        # twisted.web's inactivity timeout covers idle kept-alive connections
        Site.__init__(self, resource, timeout=head_timeout, reactor=reactor)
        self.clock = reactor
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self.body_min_rate = body_min_rate


    def log(self, request):
        pass


@attrs.define(eq=False)
class Parts:
    """What `build` makes: every part of one server, and the order of its life.

    ``services`` are the root's children in start-up order (storage first,
    so that it stops last); ``start_hooks`` run once storage is open and
    before anything listens; ``ready_hooks`` once everything listens, before
    the node is ready. At shutdown ``drain_hooks`` (Deferreds firing once
    in-flight work is done) are awaited once the listeners are closed, then
    ``stop_hooks`` run, then the services stop.
    """

    storage: object
    accounts: object
    tunnels: object
    registry: object
    router: object
    cluster: object
    http_ingress: object = None
    ssh: object = None
    metrics: object = None  # the prometheus_client registry served on /metrics (with the admin interface)
    listeners: dict = attrs.Factory(dict)
    services: list = attrs.Factory(list)
    start_hooks: list = attrs.Factory(list)
    ready_hooks: list = attrs.Factory(list)
    stop_hooks: list = attrs.Factory(list)
    drain_hooks: list = attrs.Factory(list)

    def add_listener(self, listener):
        self.listeners[listener.name] = listener
        self.services.append(listener)


DEFAULT_CLUSTER_KEY = attrs.fields(Config).cluster_key.default


def build(config, reactor, node, readiness):
    """Every part of the server for a `Config`, wired through constructors."""
    storage = storage_from_url(config.storage_url, reactor, pool_size=config.storage_pgsql_connection_pool_size)
    if not config.storage_url.startswith("memory:"):
        # every call answered within a bounded time, and at once while the store is down
        storage = GuardedStorage(storage, reactor, timeout=config.storage_timeout)
    listeners = {}
    # the metrics (/metrics of the admin interface) exist when the admin interface does
    metrics = config.admin_enable
    limiters = []

    def limiter(what):
        limiters.append(FailureLimiter(reactor, what))
        return limiters[-1]

    sni = SNICertificates(config, reactor, listeners) if config.sni_ingress_enabled else None

    accounts = AccountService(storage, reactor)
    altnames = _altnames(config, storage, reactor)
    registry = ConnectionRegistry(config, node.id, reactor)
    cluster, multi, problem = _cluster(config, reactor, node, registry)
    tunnels = TunnelService(
        config, storage, accounts, registry, reactor, altnames=altnames,
        sni_url_for=sni.url if sni is not None else None, cluster=cluster,
    )
    peers = None
    if multi:
        peers = PeerEndpoints(
            reactor, cluster.membership,
            http_port=lambda: _bound_port(config.ingress_http_port, listeners, "ingress-http", "api")
            if config.http_ingress_enabled else None,
            sni_port=lambda: _bound_port(config.ingress_sni_port, listeners, "ingress-sni")
            if config.sni_ingress_enabled else None,
        )
    router = Router(tunnels, registry, reactor, altnames=altnames, peers=peers)
    parts = Parts(storage, accounts, tunnels, registry, router, cluster, listeners=listeners)
    # the cluster bus stops after the registry has announced its last disconnects
    parts.services += [storage, cluster, registry]
    if problem is not None:
        parts.start_hooks.append(lambda: _fail(problem))
    parts.start_hooks.append(cluster.bus_ready)
    parts.ready_hooks.append(cluster.discovery_wait)
    parts.stop_hooks.append(registry.stop)

    ssh = None
    if config.ssh_transport_enabled:
        from exposr.transport.ssh import SSHTransportService

        ssh = SSHTransportService(config, tunnels, tunnels, node.id, reactor,
                                  limiter=limiter("SSH login"))
        parts.services.append(ssh)
        parts.start_hooks.append(ssh.listen)
    parts.ssh = ssh
    fingerprint = (lambda: ssh.fingerprint) if ssh is not None else None
    ssh_port = (lambda: ssh.port) if ssh is not None else None

    public = PublicAPI(config, accounts, tunnels, registry, ssh_fingerprint=fingerprint, ssh_port=ssh_port,
                       limiter=limiter("account number"))
    site = _site(public.resource(), config, reactor)

    ws = None
    if config.ws_transport_enabled:
        from exposr.transport.ws import WSTransport

        ws = WSTransport(reactor, tunnels, node.id)

    ingress = None
    if config.http_ingress_enabled:
        from exposr.ingress.http import HTTPIngress

        ingress = HTTPIngress(config, router, node.id, reactor, access_log=AccessLog("exposr.ingress.http.access"),
                              stats=RequestStats() if metrics else None)
    parts.http_ingress = ingress
    if ingress is not None:
        parts.drain_hooks.append(ingress.drain)

    address = config.listen_address
    shared = config.ingress_http_port == config.api_port
    door = Door(config, reactor, site, ingress=ingress if shared else None, ws=ws, tunnels=tunnels,
                limiter=limiter("connection token"))
    parts.add_listener(Listener("api", tcp_endpoint(reactor, config.api_port, address), door))
    if ingress is not None and not shared:
        ingress_door = Door(config, reactor, None, ingress=ingress, ws=None, tunnels=tunnels)
        parts.add_listener(
            Listener("ingress-http", tcp_endpoint(reactor, config.ingress_http_port, address), ingress_door)
        )

    sni_factory = None
    if sni is not None:
        from exposr.ingress.sni import SNIIngressFactory, router_resolver

        factory = sni_factory = SNIIngressFactory(router_resolver(router), sni, reactor)
        parts.services.append(sni)
        parts.start_hooks.append(sni.load)
        parts.drain_hooks.append(factory.drain)
        parts.stop_hooks.append(lambda: [c.shut_down() for c in list(factory.connections)])
        parts.add_listener(Listener("ingress-sni", tcp_endpoint(reactor, config.ingress_sni_port, address), factory))

    if metrics:
        from exposr.metrics import metrics_registry

        parts.metrics = metrics_registry(
            registry, http_stats=ingress.stats if ingress is not None else None, sni=sni_factory,
            http_ingress=ingress, storage=storage, cluster=cluster, node_id=node.id, limiters=limiters,
        )
    interface = AdminInterface(readiness, metrics=parts.metrics) if config.admin_enable else None
    admin_api = None
    if config.admin_api_enable:
        admin_api = AdminAPI(
            config, accounts, tunnels, registry,
            nodes=cluster.membership.view,
            ssh_fingerprint=fingerprint, ssh_port=ssh_port,
            limiter=limiter("admin API key"),
        )
    if interface is not None and admin_api is not None and config.admin_port == config.admin_api_port:
        parts.add_listener(
            Listener("admin", tcp_endpoint(reactor, config.admin_port, address),
                     _site(admin_resource(interface, admin_api), config, reactor))
        )
    else:
        if interface is not None:
            parts.add_listener(
                Listener("admin", tcp_endpoint(reactor, config.admin_port, address),
                         _site(admin_resource(interface, None), config, reactor))
            )
        if admin_api is not None:
            parts.add_listener(
                Listener("admin-api", tcp_endpoint(reactor, config.admin_api_port, address),
                         _site(admin_resource(None, admin_api), config, reactor))
            )
    return parts


@implementer(IOpenSSLServerConnectionCreator)
class SNICertificates(MultiService):
    """The SNI ingress's wildcard certificate and the URLs it gives tunnels.

    The certificate is loaded by `load` (a start hook, so a bad one fails
    start-up with one line) and watched for changes by a child service.
    ``url(tunnel_id)`` is the ``ingress.sni.url`` of a tunnel (None before the
    certificate is loaded); its port is the configured one, or the bound one
    of the ``ingress-sni`` listener in ``listeners`` for port 0.
    """

    def __init__(self, config, reactor, listeners):
        MultiService.__init__(self)
        self.config = config
        self.reactor = reactor
        self.listeners = listeners
        self.watcher = None

    def load(self):
        from exposr.ingress.certificate import CertificateWatcher

        config = self.config
        self.watcher = CertificateWatcher(
            config.ingress_sni_cert, config.ingress_sni_key, self.reactor, sni_host=config.ingress_sni_host
        )
        self.watcher.setServiceParent(self)

    def url(self, tunnel_id):
        if self.watcher is None:
            return None
        return self.watcher.url(tunnel_id, self.port())

    def port(self):
        """The advertised SNI port: the configured one, or the bound one for port 0."""
        port = self.config.ingress_sni_port
        listener = self.listeners.get("ingress-sni")
        if port == 0 and listener is not None and listener.address is not None:
            port = listener.address.port
        return port

    def serverConnectionForTLS(self, tlsProtocol):
        return self.watcher.serverConnectionForTLS(tlsProtocol)


def _cluster(config, reactor, node, registry, environ=None):
    """
    The cluster service on the bus of the configured mode: (service, multi-node?,
    start-up problem or None). A problem (the discovery method forced by the
    options cannot be used here) fails start-up with its message.
    """
    from twisted.logger import Logger

    log = Logger(namespace="exposr.cluster")
    mode = config.cluster
    why = f"--cluster auto: {config.cluster_why}" if config.cluster_why else f"--cluster {mode}"
    discovery = problem = None
    if mode == "redis":
        from exposr.cluster.redisbus import RedisBus

        bus = RedisBus(node, config.cluster_key, config.cluster_redis_url, reactor,
                       channel=config.cluster_redis_channel)
        log.info("Cluster mode redis ({why}): Redis pub/sub at {where}, channel {channel}", why=why,
                 where=bus.address.describe(), channel=config.cluster_redis_channel)
    elif mode == "udp":
        bus, discovery, problem = _udp_bus(config, reactor, node, why, log,
                                           os.environ if environ is None else environ)
    else:
        log.info("Cluster mode single-node ({why}): in-process bus", why=why)
        bus = LocalBus(node, config.cluster_key, reactor)
    multi = not isinstance(bus, LocalBus)
    if multi and config.cluster_key == DEFAULT_CLUSTER_KEY:
        log.warn("--cluster-key is the default key: set the same secret key on every node "
                 "(EXPOSR_CLUSTER_KEY), or anyone who can reach the bus can speak for a node")
    if multi and urlsplit(config.storage_url).scheme == "memory":
        log.warn("memory:// storage belongs to one process: the nodes of this cluster share no "
                 "accounts or tunnels (set --storage-url to a postgres:// or redis:// URL)")
    wait = config.cluster_discovery_wait
    if wait is None:
        wait = DISCOVERY_WAIT if multi else 0.0
    # (a single node's bus delivers only to itself: nobody to tell where its tunnels are)
    cluster = ClusterService(bus, node, registry, reactor, discovery_wait=wait, announce=multi)
    if discovery is not None and hasattr(discovery, "membership"):
        discovery.membership = cluster.membership  # the known nodes are peers too
    return cluster, multi, problem


def _udp_bus(config, reactor, node, why, log, environ):
    """(UDPBus, its discovery, problem): the discovery ``--cluster-udp-discovery`` selects."""
    from exposr.cluster import discovery as discoveries
    from exposr.cluster.udpbus import UDPBus

    choice = config.cluster_udp_discovery
    namespace_file = config.cluster_udp_discovery_kubernetes_namespace_file
    eligible = discoveries.kubernetes_eligible(namespace_file)
    if choice == "kubernetes" and not eligible:
        log.error("Kubernetes peer discovery needs {path}, which does not exist", path=namespace_file)
        problem = discoveries.DiscoveryUnavailable("Selected peer discovery method kubernetes could not be used")
        return LocalBus(node, config.cluster_key, reactor), None, problem
    if choice == "kubernetes" or (choice == "auto" and eligible):
        service, namespace = discoveries.kubernetes_names(config, environ)
        discovery = discoveries.KubernetesDiscovery(
            _resolver(config, reactor), service, namespace,
            config.cluster_udp_discovery_kubernetes_cluster_domain, None, reactor,
        )
        because = "forced" if choice == "kubernetes" else f"auto: {namespace_file} exists"
        target = discovery.hostname + (f" via DNS server {config.dns_server}" if config.dns_server else "")
        bus = UDPBus(node, config.cluster_key, reactor, discovery, port=config.cluster_udp_port,
                     listen_address=config.listen_address)
    else:
        group = config.cluster_udp_discovery_multicast_group
        discovery = discoveries.MulticastDiscovery(group)
        because = "forced" if choice == "multicast" else f"auto: {namespace_file} does not exist"
        bus = UDPBus(node, config.cluster_key, reactor, discovery, port=config.cluster_udp_port,
                     listen_address=config.listen_address, multicast_group=group,
                     multicast_ttl=config.cluster_udp_discovery_multicast_ttl)
        target = "group %s on %s, TTL %d" % (group, bus.multicast_interface() or "the default interface",
                                            config.cluster_udp_discovery_multicast_ttl)
    log.info("Cluster mode udp ({why}): UDP port {port}, {method} discovery ({because}): {target}",
             why=why, port=config.cluster_udp_port, method=discovery.name, because=because, target=target)
    return bus, discovery, None


def _resolver(config, reactor):
    """The DNS resolver of Kubernetes discovery: ``--dns-server`` alone, else the system's servers."""
    from twisted.names import client

    if config.dns_server:
        from exposr.altnames import parse_dns_server

        return client.Resolver(servers=[parse_dns_server(config.dns_server)], reactor=reactor)
    return client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)


def _fail(problem):
    raise problem


def _site(resource, config, reactor):
    """A twisted.web site with the configured time limits of client reads."""
    return _QuietSite(resource, reactor, head_timeout=config.http_head_timeout,
                      body_timeout=config.http_body_timeout, body_min_rate=config.http_body_min_rate)


def _bound_port(port, listeners, *names):
    """A configured port, or for port 0 the port the first listener of ``names`` bound."""
    if port:
        return port
    for name in names:
        listener = listeners.get(name)
        if listener is not None and listener.address is not None:
            return listener.address.port
    return None


def _altnames(config, storage, reactor):
    try:
        from exposr.altnames import AltNames
    except ImportError:
        return None
    return AltNames(config, storage, reactor)
