"""HTTP ingress: virtual hosts on the shared port (docs/protocol.rst, "HTTP ingress").

A request whose ``Host`` is ``<tunnel>.<ingress domain>`` (or a registered alt
name) is proxied to the tunnel. Only request and response *heads* are parsed
(`httphead`); bodies are spliced as they arrive, both ways, with producers
registered so that a slow side pauses the other instead of filling memory.

Where a request goes is the domain router's decision (`exposr.router`): it
answers with a route whose endpoint opens upstream streams; idle streams are
kept per route in a keep-alive pool. The ingress never knows which transport
carries a stream.
"""

import json
import time
from bisect import bisect_left

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from exposr import errors, httpauth
from exposr.log import AccessLog
from exposr.router import Reason, Refusal
from exposr.ingress import errorpage, forwarding, httphead
from exposr.sockwrite import no_delay, relay_reads, write_now
from exposr.ingress.httphead import Body, End, Head, HeadError, Raw

log = Logger(namespace="exposr.ingress.http")
_default_access_log = AccessLog("exposr.ingress.http.access")

HEAD_TIMEOUT = 30.0  # the default of --http-head-timeout
BODY_TIMEOUT = 60.0  # the default of --http-body-timeout
BODY_MIN_RATE = 10  # the default of --http-body-min-rate (bytes/s)
TUNNEL_IDLE_TIMEOUT = 300.0  # the default of --ingress-http-tunnel-idle-timeout
ROUTE_INFO_MAX = 10000  # memoised (host, client address, base URL) entries per cache

# refusals of the router as the ingress answers them (docs/protocol.rst, "Ingress errors")
_REFUSALS = {
    Reason.NOT_FOUND: (404, "TUNNEL_NOT_FOUND"),
    Reason.HTTP_DISABLED: (403, "TUNNEL_HTTP_INGRESS_DISABLED"),
    Reason.UNREACHABLE: (502, "TUNNEL_TARGET_CON_FAILED"),
    Reason.STORAGE_UNAVAILABLE: (503, "TUNNEL_LOOKUP_UNAVAILABLE"),
    Reason.ACCESS_DENIED: (403, "TUNNEL_ACCESS_DENIED"),
}

_REASONS = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    408: b"Request Timeout",
    421: b"Misdirected Request",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
    508: b"Loop Detected",
}


def json_response(status, body, version=b"HTTP/1.1", close=False, extra=b""):
    """``extra``: more header lines (each ending in CRLF)."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    return b"".join(
        (
            version, b" %d " % status, _REASONS.get(status, b"Error"), b"\r\n", extra,
            b"Content-Type: application/json; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % len(payload),
            b"Connection: close\r\n" if close else b"Connection: keep-alive\r\n",
            b"\r\n", payload,
        )
    )


def html_response(status, page, version=b"HTTP/1.1", close=False, extra=b""):
    return b"".join(
        (
            version, b" %d " % status, _REASONS.get(status, b"Error"), b"\r\n", extra,
            b"Content-Type: text/html; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % len(page),
            b"Connection: close\r\n" if close else b"Connection: keep-alive\r\n",
            b"\r\n", page,
        )
    )


def error_response(status, code, head, upgrade, tunnel_id=None, version=b"HTTP/1.1", close=False, extra=b""):
    """An ingress error: an HTML page to a browser (`errorpage.prefers_html`),
    else the JSON body; an upgrade request always gets JSON."""
    if head is not None and not upgrade and errorpage.prefers_html(head.headers):
        return html_response(status, errorpage.html_page(status, code, tunnel_id), version=version, close=close,
                             extra=extra)
    return json_response(status, {"error": code}, version=version, close=close, extra=extra)


def raw_error(status, code, version=b"HTTP/1.1"):
    """The raw answer to an upgrade request: status line, JSON body, close (no 101)."""
    return json_response(status, {"error": code}, version=version, close=True)


class IngressError(Exception):
    def __init__(self, status, code, extra=b""):
        super().__init__(code)
        self.status = status
        self.code = code
        self.extra = extra  # more header lines of the answer


def _auth_refused(verdict, tunnel_id):
    """The answer to a request that basic auth (`exposr.httpauth`) refused."""
    if verdict == httpauth.LIMITED:
        return IngressError(429, "TUNNEL_HTTP_AUTH_RATE_LIMITED", b"Retry-After: 1\r\n")
    challenge = b'WWW-Authenticate: Basic realm="%s", charset="UTF-8"\r\n' % tunnel_id.encode()
    code = "TUNNEL_HTTP_AUTH_REQUIRED" if verdict == httpauth.MISSING else "TUNNEL_HTTP_AUTH_FAILED"
    return IngressError(401, code, challenge)


def _refused(refusal, upgrade):
    """The answer to a refusal of the router."""
    if refusal.reason is Reason.NOT_CONNECTED:
        return IngressError(502 if upgrade else 503, "TUNNEL_NOT_CONNECTED")
    return IngressError(*_REFUSALS[refusal.reason])


def _stream_error(failure):
    """Map a failure to open an upstream stream: 429 at the channel limit, else 502."""
    if failure.check(errors.ChannelLimitError):
        return IngressError(429, "TUNNEL_TRANSPORT_REQUEST_LIMIT")
    return IngressError(502, "TUNNEL_TARGET_CON_FAILED")


# -- upstream side -----------------------------------------------------------


class Upstream(protocol.Protocol):
    """One upstream stream: sequential requests, responses framed by `ResponseParser`."""

    # a large response body read arrives as a view of the unmasked frame
    # (`StreamTransport.attach`): the parser passes body bytes on as they
    # are, and they go to the public socket with no copy
    takes_views = True

    def __init__(self, pool):
        self.pool = pool
        self.parser = httphead.ResponseParser()
        self.session = None
        self.used = 0
        self.idle_timer = None
        self.idle_since = None  # set while the stream waits in its pool
        self.lost = False

    def dataReceived(self, data):
        session = self.session
        if session is None:
            # bytes nobody asked for: the stream is not reusable
            self.transport.loseConnection()
            return
        if self.parser is None:  # an upgraded stream: raw both ways
            session.raw_out += len(data)  # activity, for the idle timeout (and bytes out)
            session.transport.write(data if data.__class__ is bytes else bytes(data))
            return
        try:
            events = self.parser.feed(data)
        except HeadError as e:
            session.upstream_failed(self, "malformed response: " + e.reason, "TUNNEL_TARGET_CON_FAILED")
            return
        session.response_events(self, events)

    def connectionLost(self, reason):
        self.lost = True
        self.pool.forget(self)
        session = self.session
        if session is not None and self.parser is None:
            session.upstream_failed(self, "closed")
        elif session is not None:
            try:
                events = self.parser.feed_eof()
            except HeadError as e:
                events = None
                why = e.reason
            if events is None:
                session.upstream_failed(self, why, "TUNNEL_TARGET_CON_FAILED")
            else:
                session.response_events(self, events)
                if self.session is session:
                    session.upstream_failed(self, "upstream closed")


class _UpstreamFactory(protocol.Factory):
    def __init__(self, pool):
        self.pool = pool

    def buildProtocol(self, addr):
        return Upstream(self.pool)


class UpstreamPool:
    """Idle keep-alive upstream streams of one route: a tunnel, on this node."""

    def __init__(self, ingress, key, endpoint, idle_timeout):
        self.ingress = ingress
        self.key = key
        self.endpoint = endpoint
        self.idle_timeout = idle_timeout
        self.idle = []
        self.factory = _UpstreamFactory(self)

    def take_idle(self):
        """An idle stream to reuse, or None.

        Its idle timer is left running (cancelling and re-creating a
        DelayedCall per request costs more than a timer that fires, sees
        the stream busy and goes away).
        """
        idle = self.idle
        while idle:
            up = idle.pop()
            up.idle_since = None
            if not up.lost:
                return up
        return None

    def acquire(self):
        """A Deferred of (Upstream, reused: bool)."""
        up = self.take_idle()
        if up is not None:
            return defer.succeed((up, True))
        return self.open().addCallback(lambda up: (up, False))

    def open(self):
        d = self.endpoint.connect(self.factory)
        d.addErrback(lambda f: defer.fail(_stream_error(f)))
        return d

    def release(self, up):
        if up.lost:
            return
        up.session = None
        ingress = self.ingress
        up.idle_since = ingress.clock.seconds()
        if up.idle_timer is None:
            up.idle_timer = ingress.clock.callLater(self.idle_timeout, self._expire, up)
        self.idle.append(up)

    def _expire(self, up):
        up.idle_timer = None
        if up.idle_since is None or up.lost:
            return  # in use (or gone): release() arms a new timer
        left = up.idle_since + self.idle_timeout - self.ingress.clock.seconds()
        if left > 0:
            up.idle_timer = self.ingress.clock.callLater(left, self._expire, up)
            return
        self.forget(up)
        up.transport.loseConnection()

    def forget(self, up):
        if up.idle_timer is not None:
            if up.idle_timer.active():
                up.idle_timer.cancel()
            up.idle_timer = None
        if up.idle_since is not None:
            up.idle_since = None
            if up in self.idle:
                self.idle.remove(up)
        if not self.idle:
            self.ingress.pools.pop(self.key, None) if self.ingress.pools.get(self.key) is self else None

    def close(self):
        for up in list(self.idle):
            self.forget(up)
            up.transport.loseConnection()


# -- the ingress as a whole ----------------------------------------------------


class HTTPIngress:
    """Routing by Host through the domain router, and this node's upstream pools.

    ``HTTPIngress(config, router, node_id, clock, access_log=None, stats=None)``:
    the router (`exposr.router.Router`) decides where a tunnel's requests go;
    ``access_log`` writes one record per request (`exposr.log.AccessLog`);
    ``stats`` (`exposr.stats.RequestStats`, or None to count nothing) counts
    requests, durations and bytes for the metrics.
    """

    def __init__(self, config, router, node_id, clock, access_log=None, stats=None):
        from urllib.parse import urlsplit

        self.config = config
        # every read from a public client is bounded in time (docs/reliability.rst):
        # a request head must be complete head_timeout after the connection
        # opened or the previous response ended (this bounds an idle
        # kept-alive connection too); a request body must bring at least
        # body_min_rate bytes/s over each body_timeout window (and at least
        # one byte), unless the ingress itself paused reading; an upgraded
        # stream with no byte either way for tunnel_idle_timeout is closed
        self.head_timeout = config.http_head_timeout
        self.body_timeout = config.http_body_timeout
        self.body_min_rate = config.http_body_min_rate
        self.tunnel_idle_timeout = config.ingress_http_tunnel_idle_timeout
        self.router = router
        self.node_id = node_id
        self.clock = clock
        self.access_log = access_log if access_log is not None else _default_access_log
        self.stats = stats
        self.domain = (urlsplit(config.ingress_http_url).hostname or "").lower()
        self.trusted = forwarding.parse_networks(config.ingress_http_trusted_proxies)
        self.rewriter = forwarding.Rewriter(node_id)
        self.authorizer = httpauth.Authorizer(clock)
        self.idle_timeout = config.ingress_http_agent_idle_timeout
        self.pools = {}
        self.sessions = set()  # open client connections
        self.draining = False
        self._drained = []
        self._trusted_info = {}
        self._untrusted_info = {}
        router.on_change(self._connection_changed)

    def _connection_changed(self, tunnel_id):
        # pooled streams of a tunnel that lost its last connection are dropped, not reused
        if not self.router.is_connected(tunnel_id):
            pool = self.pools.pop(tunnel_id, None)
            if pool is not None:
                pool.close()

    def claim(self, host):
        """The tunnel id a Host belongs to: str, None, or a Deferred of either."""
        if not host:
            return None
        label, dot, parent = host.partition(".")
        if dot and label and parent == self.domain:
            return label
        if "." in host:
            return self.router.tunnel_for_altname(host)
        return None

    def pool(self, route):
        pool = self.pools.get(route.key)
        if pool is None:
            timeout = self.idle_timeout
            if route.remote:
                # another node's ingress closes a kept-alive connection that
                # waited its head timeout for a request: reuse it well before that
                timeout = min(timeout, self.head_timeout / 2)
            pool = self.pools[route.key] = UpstreamPool(self, route.key, route.endpoint, timeout)
        return pool

    def route(self, tunnel, tunnel_id, head, upgrade=False, client_ip=None, peer_ip=None):
        """The router's `Route` for a request from ``client_ip``, or IngressError (docs/protocol.rst, "Ingress errors", in order)."""
        router = self.router
        try:
            router.check_http(tunnel, tunnel_id, client_ip, peer_ip)
            if forwarding.is_loop(head, self.node_id):
                raise IngressError(508, "HTTP_INGRESS_REQUEST_LOOP")
            return router.route(tunnel_id)
        except Refusal as refusal:
            raise _refused(refusal, upgrade)

    def route_info(self, head, peer_ip, trusted):
        """(host for `claim`, client address, base URL) of a request head.

        The client address is None for an untrusted peer (it is the peer's
        own). All three depend on the peer and a few headers only: memoised,
        a keep-alive client (or a load balancer) repeats them.
        """
        if trusted:
            cache = self._trusted_info
            key = (peer_ip, *[(lname, v) for n, v in head.headers if (lname := n.lower()) in _ROUTE_NAMES])
        else:
            cache = self._untrusted_info
            key = tuple([v for n, v in head.headers if n.lower() == b"host"])
        info = cache.get(key)
        if info is None:
            if len(cache) >= ROUTE_INFO_MAX:
                cache.clear()
            if trusted:
                ip = forwarding.client_ip(peer_ip, head, self.trusted, True)
            else:
                ip = None
            info = cache[key] = (httphead.host_of(head), ip, forwarding.base_url(head, trusted))
        return info

    def session(self):
        return IngressSession(self)

    def drain(self):
        """Shutting down: close idle client connections now and busy ones once
        their response is complete. A Deferred firing when none is left."""
        self.draining = True
        for session in list(self.sessions):
            if session.state == IDLE and not session.pending:
                session._close()
        if not self.sessions:
            return defer.succeed(None)
        d = defer.Deferred()
        self._drained.append(d)
        return d

    def _session_closed(self, session):
        if session in self.sessions:
            self.sessions.discard(session)
            stats = self.stats
            if stats is not None:
                # the bytes of open sessions are counted at scrape time, of closed ones here
                stats.bytes_in += session.received
                stats.bytes_out += session.raw_out + session.other_out
        if self.draining and not self.sessions:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)


@implementer(IPushProducer)
class _Gate:
    """Pauses a transport's reading while any reason to do so holds."""

    def __init__(self, transport):
        self.transport = transport
        self.reasons = set()
        self.held = False  # paused since the last progress check (the client is not to blame)

    def hold(self, reason):
        if not self.reasons:
            self.transport.pauseProducing()
            self.held = True
        self.reasons.add(reason)

    def release(self, reason):
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons:
                self.transport.resumeProducing()


@implementer(IPushProducer)
class _ReasonProducer:
    """A producer facade: pausing it holds one reason of a gate."""

    def __init__(self, gate, reason):
        self.gate = gate
        self.reason = reason

    def pauseProducing(self):
        self.gate.hold(self.reason)

    def resumeProducing(self):
        self.gate.release(self.reason)

    def stopProducing(self):
        pass


# the headers `forwarding.client_ip` and `forwarding.base_url` read from a trusted peer
_ROUTE_NAMES = frozenset((b"host", b"forwarded", b"x-forwarded-proto", b"x-scheme", b"x-forwarded-port", b"x-forwarded-for"))

IDLE, ROUTING, FORWARD, AWAIT, TUNNEL, CLOSED = range(6)


class IngressSession(protocol.Protocol):
    """One public client connection whose requests go to tunnels."""

    def __init__(self, ingress):
        self.ingress = ingress
        self.parser = httphead.RequestParser()
        self.state = IDLE
        self.pending = []
        self.up = None
        self.request = None
        self.timer = None
        self.deadline = None  # when the head timer expires; None while a request runs
        self.close_after = False
        self.response_started = False
        # progress of the body / upgraded stream: `received` counts client
        # bytes, `raw_out` the target's bytes once upgraded; checked by the
        # one connection timer at the end of each window
        self.received = 0
        self.raw_out = 0
        self.mark = 0
        self.window_start = None
        # bytes out besides `raw_out`: response heads, the ingress's own
        # answers, and (once a request ends, with stats) its response body
        self.other_out = 0
        self.auth_ok = None  # (rule, Authorization value) that basic auth last let through

    def connectionMade(self):
        # Twisted's bufferSize (64 KiB, less the frame overhead: `relay_reads`) is kept: it is both the size
        # of every recv() (a larger one costs an mmap per read: measured 10%
        # of the server's CPU at 100-byte responses) and the user-space
        # backlog that pauses the stream. Responses are written straight to
        # the socket (`write_now`), so the backlog only grows once the
        # kernel's send buffer is full, and pausing then is what a slow
        # reader must get.
        # Responses are relayed as they come (a head, then its body): Nagle
        # would hold the second write for the client's delayed ACK (40 ms)
        no_delay(self.transport)
        # (a request body read goes on as one ws-multiplex frame that fits one read of the client)
        relay_reads(self.transport)
        self.ingress.sessions.add(self)
        if self.ingress.stats is not None:
            self.ingress.stats.connections += 1
        self.gate = _Gate(self.transport)
        self.upstream_reader = _ReasonProducer(self.gate, "upstream")
        self.peer_ip = getattr(self.transport.getPeer(), "host", "")
        self.peer_trusted = forwarding.is_trusted(self.peer_ip, self.ingress.trusted)
        # the client address of an untrusted peer is its socket address
        self.peer_client_ip = None if self.peer_trusted else forwarding.client_ip(self.peer_ip, None, (), False)
        self._arm_timer()

    def _arm_timer(self):
        # one timer per connection, moved lazily: a DelayedCall created and
        # cancelled per request costs more than one that fires and re-arms
        clock = self.ingress.clock
        self.window_start = None
        self.deadline = clock.seconds() + self.ingress.head_timeout
        if self.timer is None:
            self.timer = clock.callLater(self.ingress.head_timeout, self._head_timer)

    def _cancel_timer(self):
        self.deadline = None
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    def _head_timer(self):
        self.timer = None
        state = self.state
        if state == FORWARD or state == TUNNEL:
            self._check_progress()
            return
        if self.deadline is None or state == CLOSED:
            return  # a request is running: the next _arm_timer re-arms
        left = self.deadline - self.ingress.clock.seconds()
        if left > 0:
            self.timer = self.ingress.clock.callLater(left, self._head_timer)
            return
        self._head_timeout()

    def _watch_progress(self):
        """A request body starts coming, or the connection was upgraded: check its progress."""
        clock = self.ingress.clock
        self.window_start = clock.seconds()
        self.mark = self.received + self.raw_out
        self.gate.held = False
        window = self._window()
        if self.timer is None:
            self.timer = clock.callLater(window, self._head_timer)
        elif self.timer.getTime() > self.window_start + window:
            self.timer.reset(window)

    def _window(self):
        ingress = self.ingress
        return ingress.body_timeout if self.state == FORWARD else ingress.tunnel_idle_timeout

    def _check_progress(self):
        clock = self.ingress.clock
        if self.window_start is None:  # a request without a body: nothing to watch yet
            self._watch_progress()
            return
        window = self._window()
        now = clock.seconds()
        elapsed = now - self.window_start
        if elapsed < window:  # a timer armed for something else: a full window first
            self.timer = clock.callLater(window - elapsed, self._head_timer)
            return
        got = self.received + self.raw_out - self.mark
        if self.state == FORWARD:
            # bytes of the body; no blame while the ingress paused reading
            enough = got >= max(1, self.ingress.body_min_rate * elapsed) or self.gate.held or self.gate.reasons
            if not enough:
                log.info("tunnel {tunnel}: request body too slow ({n} bytes in {s:.0f} s): closed",
                         tunnel=getattr(self, "tunnel_id", None), n=got, s=elapsed)
        else:
            enough = got > 0
        if not enough:
            if self.status is None:
                self.status = 408
            self._access()
            self.transport.abortConnection()
            return
        self.window_start = now
        self.mark = self.received + self.raw_out
        self.gate.held = False
        self.timer = clock.callLater(window, self._head_timer)

    def _head_timeout(self):
        self.timer = None
        if self.state == IDLE:
            if self.parser.in_message:
                self._answer(json_response(408, {"error": "REQUEST_TIMEOUT"}, close=True))
            self._close()

    # -- client bytes ---------------------------------------------------------

    def dataReceived(self, data):
        if self.state == CLOSED:
            return
        self.received += len(data)
        try:
            events = self.parser.feed(data)
        except HeadError as e:
            self._client_error(e)
            return
        if self.pending or self.state in (ROUTING, AWAIT):
            self.pending.extend(events)
            if self.state == AWAIT:
                self.gate.hold("pipeline")
            return
        self._handle(events)

    def _handle(self, events):
        for i, ev in enumerate(events):
            state = self.state
            if state == FORWARD or state == TUNNEL:
                if type(ev) is Body or type(ev) is Raw:
                    self.up.transport.write(ev.data)
                elif type(ev) is End:
                    self.state = AWAIT
            elif state == IDLE and type(ev) is Head:
                self._start_request(ev.head)
            elif state == CLOSED:
                return
            if self.state in (ROUTING, AWAIT) and i + 1 < len(events):
                self.pending[:0] = events[i + 1:]
                if self.state == AWAIT:
                    self.gate.hold("pipeline")
                return

    def _client_error(self, e):
        if self.state in (IDLE, ROUTING) and not self.response_started:
            self._answer(json_response(e.status, {"error": "BAD_REQUEST", "detail": e.reason}, close=True))
        self._close()

    # -- a request -------------------------------------------------------------

    def _start_request(self, head):
        self.deadline = None  # the head timer waits while the request runs
        self.state = ROUTING
        self.request = head
        self.started = time.monotonic()
        self.status = None
        self.sent = 0
        self.response_started = False
        self.upgrade = head.method == b"CONNECT" or head.is_upgrade
        # as the client sent it: forwarding drops its Connection header
        self.request_persistent = head.keep_alive if head.persistent is None else head.persistent
        ingress = self.ingress
        # Synchronous when it can be (a cached tunnel record and an idle
        # pooled stream: the common keep-alive case): no Deferred at all.
        # Storage, alt-name lookups and new streams chain Deferreds.
        try:
            host, self.route_ip, self.base = ingress.route_info(head, self.peer_ip, self.peer_trusted)
            # (type checks, not isinstance(..., Deferred): Deferred is a
            # typing Generic, whose isinstance goes through ABCMeta)
            tunnel_id = ingress.claim(host)
            if tunnel_id is None or type(tunnel_id) is str:
                d = self._claimed(tunnel_id)
            else:
                d = tunnel_id.addCallback(self._claimed)
            if type(d) is dict:
                d = self._checked(d, head)
            else:
                d.addCallback(self._checked, head)
            if d is not None:
                d.addErrback(self._route_failed)
        except Exception:
            self._route_failed(Failure())
        if self.state == ROUTING and self.request is head:
            # waiting for storage or a stream: stop reading meanwhile
            self.gate.hold("routing")

    def _claimed(self, tunnel_id):
        """The record of the claimed tunnel, or a Deferred of it."""
        if tunnel_id is None:
            raise IngressError(421, "MISDIRECTED_REQUEST")
        self.tunnel_id = tunnel_id
        return self.ingress.router.record(tunnel_id)

    def _checked(self, tunnel, head):
        """Route to a pooled stream (returns None) or a new one (returns a Deferred)."""
        ingress = self.ingress
        ip = self.route_ip
        if ip is None:
            ip = self.peer_client_ip
        self.client_ip = ip
        route = ingress.route(tunnel, self.tunnel_id, head, self.upgrade, ip, self.peer_ip)
        if "access" in tunnel:
            rules = tunnel["access"]
            auth = rules.get("http_auth") if type(rules) is dict else None
            if auth:
                # the first Authorization is checked, every one is removed
                found = [pair for pair in head.headers if pair[0].lower() == b"authorization"]
                value = found[0][1] if found else None
                last = self.auth_ok
                if last is not None and last[0] is auth and last[1] == value:
                    verdict = httpauth.OK  # as for the previous request of this connection
                else:
                    verdict = ingress.authorizer.check(auth, value, ip)
                    if type(verdict) is not str:
                        return verdict.addCallback(self._authorized, route, tunnel, head, found, auth)
                return self._authorized(verdict, route, tunnel, head, found, auth)
        return self._forward(route, tunnel, head)

    def _authorized(self, verdict, route, tunnel, head, found, auth):
        if verdict != httpauth.OK:
            self.auth_ok = None
            raise _auth_refused(verdict, self.tunnel_id)
        self.auth_ok = (auth, found[0][1])
        if not route.remote:
            # the credentials are the tunnel's, not the target's (a cluster
            # node that holds the tunnel checks them again, and removes them)
            headers = head.headers
            for pair in found:
                headers.remove(pair)
        if self.state == CLOSED:
            return None
        return self._forward(route, tunnel, head)

    def _forward(self, route, tunnel, head):
        """Route to a pooled stream (returns None) or a new one (returns a Deferred)."""
        ingress = self.ingress
        ip = self.client_ip
        # self.upgrade is is_upgrade, or CONNECT (for which is_upgrade is not known)
        upgrade = self.upgrade and (None if head.method == b"CONNECT" else True)
        # to another node: only the headers every hop adds (the owner adds the rest)
        ingress.rewriter.rewrite(head, ip, self.base, (tunnel.get("target") or {}).get("url"),
                                 local=not route.remote, upgrade=upgrade)
        pool = ingress.pool(route)
        if not self.upgrade:
            up = pool.take_idle()
            if up is not None:
                self._acquired((up, True), head)
                return None
        d = pool.open()
        if route.remote:
            d.addErrback(self._reroute, route)
        return d.addCallback(self._opened, head)

    def _reroute(self, failure, route):
        """A node holding the tunnel could not be reached (it is now skipped):
        once, another node that holds it."""
        if self.state == CLOSED:
            return failure
        try:
            again = self.ingress.router.route(self.tunnel_id)
        except Refusal:
            return failure
        if not again.remote or again.key == route.key:
            return failure
        return self.ingress.pool(again).open()

    def _opened(self, up, head):
        self._acquired((up, False), head)

    def _acquired(self, result, head):
        up, reused = result
        if self.state == CLOSED:
            if self.upgrade:
                up.transport.loseConnection()
            else:
                up.pool.release(up)
            return
        self.up = up
        self.reused = reused
        up.session = self
        # an upgrade request is a request like any other until the target
        # answers 101 (or 2xx to CONNECT): only then are both sides spliced raw
        up.parser.expect(head.method)
        up.used += 1
        up.transport.write(head.serialize())
        # splice with back-pressure both ways
        up.transport.registerProducer(self.upstream_reader, True)
        self.transport.registerProducer(up.transport, True)
        self.state = FORWARD
        self.gate.release("routing")
        if head.has_body:  # (the parser framed it: no header is read again)
            self._watch_progress()
        self._drain_pending()

    def _drain_pending(self):
        if self.pending and self.state not in (ROUTING, AWAIT):
            events, self.pending = self.pending, []
            self._handle(events)

    def _route_failed(self, failure):
        if self.state == CLOSED:
            return
        err = failure.value
        if isinstance(err, Refusal):
            err = _refused(err, self.upgrade)
        elif not isinstance(err, IngressError):
            if failure.check(errors.StreamError):
                err = _stream_error(failure)
            else:
                log.failure("ingress routing failed", failure)
                err = IngressError(502, "TUNNEL_TARGET_CON_FAILED")
        head = self.request
        self.status = err.status
        # the request body (if any) was not read: the connection cannot continue
        body_pending = self.upgrade or head.chunked or bool(head.content_length)
        close = body_pending or not self.request_persistent or err.status == 421
        self._answer(error_response(err.status, err.code, head, self.upgrade,
                                    None if err.status == 421 else getattr(self, "tunnel_id", None),
                                    close=close, extra=getattr(err, "extra", b"")))
        self._access()
        if close or self.ingress.draining:
            self._close()
        else:
            self.state = IDLE
            self.request = None
            self.response_started = False
            self.gate.release("routing")
            self._arm_timer()
            self._drain_pending()

    # -- upstream events -----------------------------------------------------

    def response_events(self, up, events):
        if up is not self.up:
            return
        out = []
        done = False
        switched = False
        for ev in events:
            t = type(ev)
            if t is Body or t is Raw:
                self.sent += len(ev.data)
                out.append(ev.data)
            elif t is Head:
                head = ev.head
                status = head.status
                if status < 200 and status != 101:  # interim (1xx)
                    self.response_started = True
                    out.append(head.raw)
                    self.other_out += len(head.raw)
                    continue
                if up.parser.raw_mode:  # 101, or 2xx to CONNECT
                    if not self.upgrade or status == 101 and self.request.method == b"CONNECT":
                        up.parser = None
                        self.upstream_failed(up, "switched protocols unasked", "TUNNEL_TARGET_CON_FAILED")
                        return
                    switched = True
                self.response_started = True
                self.status = status
                self.response_keep_alive = head.persistent
                if head.persistent and not self.request_persistent and not self.upgrade:
                    # the client asked to close: the connection ends after
                    # this response, and the response must say so
                    head.set(b"connection", b"close")
                    out.append(head.serialize())
                else:
                    out.append(head.raw)
                self.other_out += len(out[-1])
            elif t is End:
                done = True
                break
        if out:
            self._write(out[0] if len(out) == 1 else b"".join(out))
        if switched:
            self._switch(up)
        elif done:
            self._response_done()

    def _switch(self, up):
        """The target accepted the upgrade: both sides are spliced raw from now on."""
        up.parser = None
        if self.state != AWAIT or not self.parser.awaiting_upgrade:
            # the request body was not complete: the splice cannot be exact
            self.upstream_failed(up, "upgraded before the request ended")
            return
        self.state = TUNNEL
        self._watch_progress()
        events = self.parser.upgraded() + self.pending
        self.pending = []
        self.gate.release("pipeline")
        if events:
            self._handle(events)

    def _write(self, data):
        write_now(self.transport, data)

    def _answer(self, data):
        """Write an answer of the ingress's own (an error)."""
        self.other_out += len(data)
        self.transport.write(data)

    def _response_done(self):
        up = self.up
        self._unsplice()
        self._access()
        reusable = (
            self.state == AWAIT
            and self.response_keep_alive
            and not up.lost
            and not self.upgrade
            and not up.parser.in_message
        )
        self.up = None
        if reusable:
            up.pool.release(up)
        else:
            up.session = None
            up.transport.loseConnection()
        if (self.state != AWAIT or not self.request_persistent or not self.response_keep_alive
                or self.ingress.draining):
            self._close()
            return
        self.state = IDLE
        self.request = None
        self.response_started = False
        if self.parser.awaiting_upgrade:
            # a refused upgrade: what the client sent since is HTTP again
            try:
                self.pending.extend(self.parser.refused())
            except HeadError as e:
                self._client_error(e)
                return
        self.gate.release("pipeline")
        self._arm_timer()
        self._drain_pending()

    def upstream_failed(self, up, why, code="TUNNEL_TARGET_CON_RESET"):
        if up is not self.up:
            return
        self._unsplice()
        self.up = None
        up.session = None
        up.transport.loseConnection()
        if self.state == TUNNEL and self.response_started:
            # an upgraded connection ends when either side ends
            self._access()
            self._close()
            return
        if self.response_started:
            # the response began: the client can only learn by the connection
            # being cut (never a JSON error appended to a body, as the original did)
            self._access()
            self.transport.abortConnection()
            self._closed()
            return
        log.info("tunnel {tunnel}: upstream failed before a response: {why}", tunnel=self.tunnel_id, why=why)
        self.status = 502
        self._answer(error_response(502, code, self.request, self.upgrade, self.tunnel_id,
                                    version=self.request.version, close=True))
        self._access()
        self._close()

    def _unsplice(self):
        up = self.up
        if up is not None and not up.lost:
            up.transport.unregisterProducer()
            # the public socket may have paused the stream; once unregistered
            # it will never resume it: a pooled stream must not stay paused
            up.transport.resumeProducing()
        self.transport.unregisterProducer()
        self.gate.release("upstream")

    def _access(self):
        head = self.request
        if head is None:
            return
        elapsed = time.monotonic() - self.started
        ingress = self.ingress
        stats = ingress.stats
        if stats is not None:
            # a few integer additions per request; the metrics read them at
            # scrape time (the bytes of open connections from the sessions)
            status = self.status
            stats.classes[status // 100 if status is not None else 0] += 1
            stats.duration_counts[bisect_left(stats.duration_bounds, elapsed)] += 1
            stats.duration_sum += elapsed
            self.other_out += self.sent
        ingress.access_log(
            head.method.decode("latin-1"),
            head.target.decode("latin-1"),
            self.status,
            getattr(self, "tunnel_id", None),
            getattr(self, "client_ip", self.peer_ip),
            self.sent,
            round(elapsed * 1000, 1),
        )

    # -- connection end --------------------------------------------------------

    def _close(self):
        if self.state != CLOSED:
            self.transport.loseConnection()
            self._closed()

    def _closed(self):
        self.state = CLOSED
        self._cancel_timer()
        self.ingress._session_closed(self)

    def connectionLost(self, reason):
        was = self.state
        self._closed()
        up, self.up = self.up, None
        if up is not None:
            up.session = None
            if was in (FORWARD, AWAIT, TUNNEL, ROUTING):
                up.transport.loseConnection()
            else:
                up.pool.release(up)
