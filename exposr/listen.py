"""Listeners as services: an endpoint and a factory, started when asked.

Unlike `StreamServerEndpointService`, listening is not begun by
``startService`` but by `Listener.listen`, which returns a Deferred: the
server's start-up sequence awaits it, so a port that cannot be bound fails the
start-up with a clear message instead of a log line nobody reads. The bound
port is readable afterwards (tests listen on port 0).
"""

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint


def tcp_endpoint(reactor, port, interface=""):
    """A TCP server endpoint; an IPv6 `interface` gets a TCP6 endpoint."""
    if ":" in interface:
        return TCP6ServerEndpoint(reactor, port, interface=interface)
    return TCP4ServerEndpoint(reactor, port, interface=interface)


class Listener(Service):
    def __init__(self, name, endpoint, factory):
        self.setName(name)
        self.endpoint = endpoint
        self.factory = factory
        self.port = None

    @defer.inlineCallbacks
    def listen(self):
        self.port = yield self.endpoint.listen(self.factory)
        return self.port

    @property
    def address(self):
        return self.port.getHost() if self.port is not None else None

    def stopService(self):
        Service.stopService(self)
        port, self.port = self.port, None
        if port is not None:
            return defer.maybeDeferred(port.stopListening)
        return defer.succeed(None)
