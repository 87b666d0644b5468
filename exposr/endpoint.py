"""The seam: a tunnel resolves to an endpoint, whatever carries it.

`TunnelEndpoint` is an ``IStreamClientEndpoint`` for one tunnel: each
``connect(factory)`` asks the connection registry for a connection (local ones
first, round-robin) and opens one stream on it. Ingress code that holds such an
endpoint never learns whether a WebSocket channel, an SSH channel or a hop to
another node carries the stream.
"""

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from exposr.errors import NoConnectionError


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    def __init__(self, registry, tunnel_id):
        self.registry = registry
        self.tunnel_id = tunnel_id

    def connect(self, protocolFactory):
        conn = self.registry.connection_for(self.tunnel_id)
        if conn is None:
            return defer.fail(NoConnectionError(f"tunnel {self.tunnel_id} is not connected"))
        return conn.open_stream(protocolFactory)
