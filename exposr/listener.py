"""The front door of the shared HTTP port: API, WebSocket endpoint or HTTP ingress.

Every connection starts here. The first request head decides who owns the
connection (see docs/protocol.rst, "The shared HTTP port"):

1. the HTTP ingress, when its ``Host`` is ``<tunnel>.<ingress domain>`` or a
   registered alt name;
2. for an upgrade to ``/v1/tunnel/<id>/ws-endpoint?t=<token>``: the WebSocket
   transport, once the token is authorised (refusals answered here with the
   JSON answers of docs/protocol.rst, "WebSocket endpoint");
3. otherwise the REST API (a twisted.web ``Site``), subject to ``--api-url``.

The owner gets the connection with every byte read so far. Reading is paused
while the decision waits for storage.
"""

import json
import re
from urllib.parse import parse_qs, urlsplit

from twisted.internet import defer, protocol
from twisted.logger import Logger

from exposr.compat.twisted import swap_protocol
from exposr.ingress import forwarding, httphead
from exposr.ingress.http import raw_error

log = Logger(namespace="exposr.listener")

WS_PATH = re.compile(r"^/v1/tunnel/([^/]+)/ws-endpoint$")
FIRST_HEAD_TIMEOUT = 30.0


def _raw(status, reason, body=b"", version=b"HTTP/1.1", content_type=b"application/json"):
    head = [version, b" %d " % status, reason, b"\r\n"]
    if body:
        head += [b"Content-Type: ", content_type, b"\r\nContent-Length: %d\r\n" % len(body)]
    head += [b"Connection: close\r\n\r\n", body]
    return b"".join(head)


class FrontDoor(protocol.Protocol):
    """Reads the first request head, then hands the connection to its owner."""

    def __init__(self, door):
        self.door = door
        self.inner = None
        self.buffered = []
        self.parser = httphead.RequestParser()
        self.timer = None
        self.lost = False

    def connectionMade(self):
        self.timer = self.door.clock.callLater(self.door.first_head_timeout, self._timeout)

    def _timeout(self):
        self.timer = None
        self.transport.abortConnection()

    def dataReceived(self, data):
        inner = self.inner
        if inner is not None:
            inner.dataReceived(data)
            return
        if self.buffered is None:  # deciding: reading is paused, keep what came
            self.pending_after.append(data)
            return
        self.buffered.append(data)
        try:
            events = self.parser.feed(data)
        except httphead.HeadError as e:
            reason = httphead.REASONS.get(e.status, "Bad Request").encode()
            self._refuse(_raw(e.status, reason, json.dumps({"error": "BAD_REQUEST", "detail": e.reason}).encode()))
            return
        for ev in events:
            if type(ev) is httphead.Head:
                self._decide(ev.head)
                return

    def _decide(self, head):
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.transport.pauseProducing()
        data, self.buffered = b"".join(self.buffered), None
        self.pending_after = []
        d = defer.maybeDeferred(self.door.dispatch, head, self)
        d.addCallback(self._hand_over, data)
        d.addErrback(self._dispatch_failed)

    def _hand_over(self, owner, data):
        if owner is None or self.lost:
            return
        self.inner = owner
        transport = self.transport
        owner.makeConnection(transport)
        # from now on the reactor talks to the owner directly: one call less
        # per read (neither the owner nor we are half-closeable, so reads and
        # the connection's end reach the owner as through us)
        swap_protocol(transport, self, owner)
        transport.resumeProducing()
        owner.dataReceived(data + b"".join(self.pending_after))
        self.pending_after = None

    def _dispatch_failed(self, failure):
        log.failure("dispatching a request failed", failure)
        self._refuse(_raw(500, b"Internal Server Error"))

    def _refuse(self, response):
        if not self.lost:
            self.transport.write(response)
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.lost = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if self.inner is not None:
            self.inner.connectionLost(reason)


class Door(protocol.Factory):
    """Decides the owner of each connection on the shared port."""

    noisy = False
    first_head_timeout = FIRST_HEAD_TIMEOUT

    def __init__(self, config, clock, site, ingress=None, ws=None, tunnels=None, limiter=None):
        self.config = config
        self.clock = clock
        self.site = site
        self.ingress = ingress
        self.ws = ws
        self.tunnels = tunnels
        self.limiter = limiter  # failed connection tokens per client address
        self.first_head_timeout = getattr(config, "http_head_timeout", FIRST_HEAD_TIMEOUT)
        self.trusted = forwarding.parse_networks(config.ingress_http_trusted_proxies)
        self.api_host = None
        if config.api_url:
            u = urlsplit(config.api_url)
            default = {"http": 80, "https": 443}.get(u.scheme)
            host = (u.hostname or "").lower()
            self.api_host = host if u.port in (None, default) else f"{host}:{u.port}"

    def buildProtocol(self, addr):
        p = FrontDoor(self)
        p.factory = self
        return p

    @defer.inlineCallbacks
    def dispatch(self, head, door):
        host = httphead.host_of(head)
        if host is None:
            door._refuse(_raw(400, b"Bad Request"))
            return None
        if self.ingress is not None:
            try:
                tunnel_id = yield self.ingress.claim(host)
            except Exception as e:  # an alt-name lookup: storage trouble
                log.warn("ingress lookup of {host} failed: {err}", host=host, err=str(e) or type(e).__name__)
                tunnel_id = None
            if tunnel_id is not None:
                return self.ingress.session()
        if head.is_upgrade:
            path = urlsplit(head.target.decode("latin-1")).path
            m = WS_PATH.match(path) if self.ws is not None else None
            if m is None:
                door._refuse(b"HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\n\r\n")
                return None
            return (yield self._authorize_ws(head, door, m.group(1)))
        if self.api_host is not None:
            peer = getattr(door.transport.getPeer(), "host", "")
            base = forwarding.base_url(head, forwarding.is_trusted(peer, self.trusted))
            hostport = None
            if base is not None:
                hostport = base[1] if base[2] is None else f"{base[1]}:{base[2]}"
            if hostport != self.api_host:
                door._refuse(_raw(404, b"Not Found", b"Not Found", content_type=b"text/plain; charset=utf-8"))
                return None
        if self.site is None:  # a port that serves only the ingress
            door._refuse(_raw(404, b"Not Found", b'{"error":"TUNNEL_NOT_FOUND"}'))
            return None
        return self.site.buildProtocol(door.transport.getPeer())

    @defer.inlineCallbacks
    def _authorize_ws(self, head, door, tunnel_id):
        query = parse_qs(urlsplit(head.target.decode("latin-1")).query)
        token = (query.get("t") or [""])[0]
        version = head.version
        result = None
        peer = getattr(door.transport.getPeer(), "host", "")
        ip = forwarding.client_ip(peer, head, self.trusted)
        if self.limiter is not None and self.limiter.blocked(ip):
            door._refuse(_raw(429, b"Too Many Requests", b'{"error":"TOO_MANY_REQUESTS"}', version=version))
            return None
        if tunnel_id and token:
            try:
                result = yield self.tunnels.authorize(tunnel_id, token)
            except Exception as e:  # storage trouble: refuse, the client retries
                log.warn("authorizing a WebSocket transport of {tunnel} failed: {err}",
                         tunnel=tunnel_id, err=str(e) or type(e).__name__)
                result = None
        if not result:
            if self.limiter is not None:
                self.limiter.failed(ip)
            door._refuse(_raw(401, b"Unauthorized", b'{"error":"PERMISSION_DENIED"}', version=version))
            return None
        tunnel, account = result
        return self.ws.protocol_for(tunnel_id, account["id"], ip)


__all__ = ["Door", "FrontDoor", "raw_error"]
