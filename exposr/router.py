"""The domain router: where a request for a tunnel goes, for every ingress.

Every ingress asks the router and nothing else: it owns the tunnel record
lookup and its cache, the checks (the tunnel exists, is connected, has the
ingress enabled) and the choice of connection. The answer is a `Route`: an
``IStreamClientEndpoint`` whose ``connect(factory)`` opens one stream to the
tunnel, whatever carries it (a WebSocket channel, an SSH channel, or, in a
cluster, a hop to the node holding the client). A refusal is a `Refusal` with
a `Reason` that the ingress turns into its own error (an HTTP status, a
refused TLS handshake).

Records are cached for `RECORD_TTL` seconds: a kept-alive client must not cost
a storage round trip per request. This node's own updates and connection
changes invalidate at once; another node's updates show within the TTL.
The lookups answer synchronously (a record, not a Deferred) when the cache
has the record, so a warm keep-alive request runs without Deferreds.
"""

import enum

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from exposr import access
from exposr.endpoint import TunnelEndpoint

log = Logger(namespace="exposr.router")

RECORD_TTL = 2.0  # seconds a tunnel record is reused
STALE_GRACE = 60.0  # seconds past its TTL a record still serves while storage fails
RECORD_CACHE_MAX = 10000  # records kept at most (the cache is cleared when full)


class Reason(enum.Enum):
    NOT_FOUND = "no such tunnel"
    NOT_CONNECTED = "not connected"
    UNREACHABLE = "connected only on nodes that cannot be reached"
    STORAGE_UNAVAILABLE = "tunnel records are unavailable (storage failing)"
    HTTP_DISABLED = "HTTP ingress not enabled"
    SNI_DISABLED = "SNI ingress not enabled"
    ACCESS_DENIED = "the client address is not on the tunnel's allow list"


class Refusal(Exception):
    """The tunnel cannot take this request; ``reason`` is a `Reason`."""

    def __init__(self, reason, tunnel_id):
        super().__init__(f"{reason.value}: {tunnel_id}")
        self.reason = reason
        self.tunnel_id = tunnel_id


@attrs.frozen
class Route:
    """Where the streams of one request go.

    ``endpoint`` opens them; ``key`` names the place they lead to, so an
    ingress may keep idle streams per key and reuse them; ``passthrough``
    (SNI) asks for the encrypted bytes to be passed on untouched; ``remote``
    says the streams lead to the ingress of the cluster node holding the
    tunnel (which then routes the request as its own), not to the tunnel.
    """

    endpoint: object
    key: object
    passthrough: bool = False
    remote: bool = False


class Router:
    """``Router(tunnels, registry, clock, altnames=None, peers=None)``.

    ``tunnels`` gives records (``get``) and tells of this node's changes
    (``on_change``); ``registry`` the connections (``is_connected``,
    ``has_local``, ``remote_nodes``, ``connection_for``, ``on_change``);
    ``altnames`` maps custom domains to tunnel ids (``lookup(host)``);
    ``peers`` (`exposr.cluster.forward.PeerEndpoints`) gives endpoints to the
    ingresses of other cluster nodes (``http_endpoint(node_id)``,
    ``sni_endpoint(node_id)``: None for a node that cannot be used).

    Connections held by this node are always preferred; otherwise the
    requests go round-robin to the nodes that hold the tunnel.
    """

    def __init__(self, tunnels, registry, clock, altnames=None, peers=None):
        self.tunnels = tunnels
        self.registry = registry
        self.clock = clock
        self.altnames = altnames
        self.peers = peers
        self._records = {}  # tunnel id -> (expiry, record)
        self._routes = {}  # tunnel id -> Route
        self._turns = {}  # tunnel id -> round-robin counter over remote nodes
        self._observers = []
        tunnels.on_change(self.forget)
        registry.on_change(self._connection_changed)

    # -- change notifications ---------------------------------------------------

    def on_change(self, callback):
        """``callback(tunnel_id)`` when a tunnel's connections changed on this node."""
        self._observers.append(callback)

    def _connection_changed(self, tunnel_id):
        self.forget(tunnel_id)
        for callback in list(self._observers):
            try:
                callback(tunnel_id)
            except Exception:
                log.failure("route change observer failed")

    def forget(self, tunnel_id):
        """Drop what is cached of a tunnel."""
        self._records.pop(tunnel_id, None)
        self._routes.pop(tunnel_id, None)

    def is_connected(self, tunnel_id):
        return self.registry.is_connected(tunnel_id)

    # -- records ------------------------------------------------------------------

    def cached(self, tunnel_id):
        """The cached record of a tunnel, or None."""
        cached = self._records.get(tunnel_id)
        if cached is not None and cached[0] > self.clock.seconds():
            return cached[1]
        return None

    def lookup(self, tunnel_id):
        """A Deferred of the tunnel record (None if absent), cached.

        When storage fails, the last known record answers for `STALE_GRACE`
        seconds past its TTL (connected tunnels keep being served through a
        short outage); without one the lookup fails with a `Refusal`
        (`Reason.STORAGE_UNAVAILABLE`), so that nobody is told a live tunnel
        does not exist.
        """
        d = defer.maybeDeferred(self.tunnels.get, tunnel_id)
        d.addCallbacks(self._remember, self._lookup_failed, callbackArgs=(tunnel_id,), errbackArgs=(tunnel_id,))
        return d

    def record(self, tunnel_id):
        """The tunnel record: from the cache (no Deferred), else a Deferred of it."""
        cached = self._records.get(tunnel_id)
        if cached is not None and cached[0] > self.clock.seconds():
            return cached[1]
        return self.lookup(tunnel_id)

    def tunnel_for_altname(self, host):
        """The tunnel id a custom domain belongs to: None, a str, or a Deferred of either."""
        if self.altnames is None:
            return None
        return self.altnames.lookup(host)

    def _remember(self, tunnel, tunnel_id):
        if tunnel is not None:
            if len(self._records) >= RECORD_CACHE_MAX:
                self._records.clear()
            self._records[tunnel_id] = (self.clock.seconds() + RECORD_TTL, tunnel)
        return tunnel

    def _lookup_failed(self, failure, tunnel_id):
        """Storage failed: the last known record for a while, else a refusal (never "not found")."""
        cached = self._records.get(tunnel_id)
        if cached is not None and self.clock.seconds() < cached[0] + STALE_GRACE:
            log.debug("tunnel {tunnel}: lookup failed ({err}); serving the last known record",
                      tunnel=tunnel_id, err=failure.getErrorMessage())
            return cached[1]
        log.warn("tunnel {tunnel}: lookup failed: {err}", tunnel=tunnel_id, err=failure.getErrorMessage())
        raise Refusal(Reason.STORAGE_UNAVAILABLE, tunnel_id)

    # -- decisions ------------------------------------------------------------------

    def route(self, tunnel_id, sni=False):
        """The `Route` to a connected tunnel's streams (no checks of the record).

        Refused with `Reason.UNREACHABLE` when only nodes that cannot be used
        (stale, unreachable, or no cluster) hold the tunnel.
        """
        if self.registry.has_local(tunnel_id):
            route = self._routes.get(tunnel_id)
            if route is None:
                if len(self._routes) >= RECORD_CACHE_MAX:
                    self._routes.clear()
                route = self._routes[tunnel_id] = Route(TunnelEndpoint(self.registry, tunnel_id), tunnel_id)
            return route
        return self._remote_route(tunnel_id, sni)

    def _remote_route(self, tunnel_id, sni):
        peers = self.peers
        if peers is not None:
            nodes = self.registry.remote_nodes(tunnel_id)
            if nodes:
                if len(self._turns) >= RECORD_CACHE_MAX:
                    self._turns.clear()
                turn = self._turns[tunnel_id] = self._turns.get(tunnel_id, -1) + 1
                for i in range(len(nodes)):
                    node_id = nodes[(turn + i) % len(nodes)]
                    endpoint = peers.sni_endpoint(node_id) if sni else peers.http_endpoint(node_id)
                    if endpoint is not None:
                        return Route(endpoint, ("node", node_id), passthrough=sni, remote=True)
        raise Refusal(Reason.UNREACHABLE, tunnel_id)

    def _allowed(self, tunnel, client_ip, peer_ip):
        """The tunnel's allow list lets ``client_ip`` in, or the connection is
        relayed by another node of the cluster (which applied the list to the
        client: rules are checked on the node that receives the request)."""
        if access.allowed(tunnel, client_ip):
            return True
        peers = self.peers
        return peers is not None and bool(peer_ip) and peers.is_node(peer_ip)

    def check_http(self, tunnel, tunnel_id, client_ip=None, peer_ip=None):
        """May an HTTP request from ``client_ip`` go to the tunnel of record ``tunnel``? Else a `Refusal`.

        Refused, in this order: no such tunnel, the client address not on
        the tunnel's allow list (`exposr.access`; before anything else is
        told of the tunnel), not connected, HTTP ingress not enabled. (The
        ingress checks its own rules next, then asks for the `route`.)
        """
        if tunnel is None:
            raise Refusal(Reason.NOT_FOUND, tunnel_id)
        if "access" in tunnel and not self._allowed(tunnel, client_ip, peer_ip):
            raise Refusal(Reason.ACCESS_DENIED, tunnel_id)
        if not self.registry.is_connected(tunnel_id):
            raise Refusal(Reason.NOT_CONNECTED, tunnel_id)
        if not tunnel.get("ingress", {}).get("http", {}).get("enabled"):
            raise Refusal(Reason.HTTP_DISABLED, tunnel_id)

    def sni_route(self, tunnel_id, client_ip=None):
        """A Deferred of the `Route` for a TLS connection by server name from ``client_ip``.

        Refused, in this order: no such tunnel, the client address not on
        the tunnel's allow list, SNI ingress not enabled, not connected. The route asks for passthrough when the tunnel does, and
        always to another node: the owner gets the client's TLS bytes as they
        came (its SNI port terminates or passes them on as it would its own).
        """
        record = self.record(tunnel_id)
        if type(record) is dict:
            try:
                return defer.succeed(self._sni_route(record, tunnel_id, client_ip))
            except Refusal as e:
                return defer.fail(e)
        return record.addCallback(self._sni_route, tunnel_id, client_ip)

    def _sni_route(self, tunnel, tunnel_id, client_ip=None):
        if tunnel is None:
            raise Refusal(Reason.NOT_FOUND, tunnel_id)
        if "access" in tunnel and not self._allowed(tunnel, client_ip, client_ip):
            raise Refusal(Reason.ACCESS_DENIED, tunnel_id)
        sni = tunnel.get("ingress", {}).get("sni", {})
        if not sni.get("enabled"):
            raise Refusal(Reason.SNI_DISABLED, tunnel_id)
        if not self.registry.is_connected(tunnel_id):
            raise Refusal(Reason.NOT_CONNECTED, tunnel_id)
        route = self.route(tunnel_id, sni=True)
        if sni.get("passthrough") and not route.passthrough:
            route = attrs.evolve(route, passthrough=True)
        return route
