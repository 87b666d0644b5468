"""Endpoints to the ingresses of other cluster nodes: the remote hop behind the router.

A request for a tunnel whose client is connected to another node goes to that
node's own ingress, on the same port number as this node's (every node of a
cluster listens on the same ports), at the address the node advertises: HTTP
requests and upgrades as HTTP to its HTTP ingress port, TLS connections as the
client's own bytes to its SNI port. Nothing else passes between nodes for
this: the owner serves the request as if it had come to it directly, and
`exposr-via` catches loops.

A connection to a node that fails (refused, unreachable) marks the node
unreachable in the membership until its next heartbeat, so that the next
requests use the other nodes holding the tunnel.
"""

from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

CONNECT_TIMEOUT = 5.0  # seconds to reach a peer node


@implementer(IStreamClientEndpoint)
class PeerEndpoint:
    """A TCP endpoint to one port of one peer node; failures mark the node unreachable."""

    def __init__(self, reactor, membership, node_id, ip, port, timeout=CONNECT_TIMEOUT):
        self.membership = membership
        self.node_id = node_id
        self.ip = ip
        self.port = port
        cls = TCP6ClientEndpoint if ":" in ip else TCP4ClientEndpoint
        self._endpoint = cls(reactor, ip, port, timeout=timeout)

    def connect(self, protocolFactory):
        d = self._endpoint.connect(protocolFactory)
        d.addErrback(self._failed)
        return d

    def _failed(self, failure):
        self.membership.unreachable(self.node_id)
        return failure

    def __repr__(self):
        return f"<PeerEndpoint {self.node_id[:8]} {self.ip}:{self.port}>"


class PeerEndpoints:
    """``PeerEndpoints(reactor, membership, http_port, sni_port)``: endpoints by node id.

    The ports are callables giving this node's own HTTP and SNI ingress port
    (None when it has no such ingress). ``None`` for a node that cannot be
    used (unknown, stale, unreachable) or a port this node does not serve. Endpoints are kept per node and
    address, so that an ingress can pool connections to each peer.
    """

    def __init__(self, reactor, membership, http_port, sni_port):
        self.reactor = reactor
        self.membership = membership
        self.http_port = http_port
        self.sni_port = sni_port
        self._cache = {}

    def is_node(self, ip):
        """True when a connection from ``ip`` comes from another node of the cluster."""
        return self.membership.is_node(ip)

    def http_endpoint(self, node_id):
        return self._endpoint(node_id, self.http_port())

    def sni_endpoint(self, node_id):
        return self._endpoint(node_id, self.sni_port())

    def _endpoint(self, node_id, port):
        if port is None:
            return None
        ip = self.membership.address(node_id)
        if ip is None:
            return None
        key = (node_id, ip, port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            if len(self._cache) >= 4096:
                self._cache.clear()
            endpoint = self._cache[key] = PeerEndpoint(self.reactor, self.membership, node_id, ip, port)
        return endpoint
