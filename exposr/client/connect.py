"""``exposr tunnel connect``: hold the tunnel's WebSockets and splice channels to the target.

`TunnelConnector(reactor, api, tunnel_id, target_url=None, insecure=False)`:

* ``start()`` reads the tunnel (GET token + GET tunnel; it needs
  ``transport.ws.url`` and ``target.url``), then
  runs ``transport.max_connections`` slots. Each slot connects one WebSocket
  (fresh GET token + GET tunnel before every attempt, ``transport.ws.url``
  verbatim; attempts of all slots are serialised so tokens never race) and
  reconnects it with back-off (1 s, x1.12 per failure, at most 5 s) except
  after close code 1008. The Deferred fires with the tunnel info once the first
  WebSocket is up; it fails on fatal API errors (no endpoint/target, 401/403/404).
* ``on_event`` (None, or a callable ``(name, text, **fields)``) is told of
  every connection event instead of the log: ``connected``, ``failed``,
  ``disconnected``, ``reconnecting`` (with ``delay``), ``refused``.
* ``http_mode`` (``{"rewrite": names, "replace": {...}}``, see `httpmode`) parses
  each request locally and rewrites its headers toward the target; every
  request is then reported as a ``request`` event (method, path, status, ms).
  With ``capture`` (an `exposr.client.inspector.Capture`) set, each request and
  response is also captured for the inspector.
* ``stop()`` closes everything; ``finished`` fires (None) when the connector
  ends: after ``stop()``, or with a failure when it gives up (every slot
  refused with 1008, or a fatal API error after start).

Each WebSocket runs `exposr.transport.multiplex` as the acceptor: every channel
the server opens becomes one TCP/TLS connection to the target, spliced both
ways with back-pressure (docs/protocol.rst, "Flow control"): the server's PAUSE/RESUME stop
and restart reading the target; a backed-up target socket makes us PAUSE the
channel; a backed-up WebSocket stops reading every target of that WebSocket.
"""

from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, error, task, tcp
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from exposr.client import httpmode
from exposr.client._tls import client_creator
from exposr.client.rest import ApiError
from exposr.sockwrite import no_delay, relay_reads, write_now
from exposr.transport import multiplex, wsframes

log = Logger(namespace="exposr.client")

BACKOFF_INITIAL = 1.0
BACKOFF_FACTOR = 1.12
BACKOFF_MAX = 5.0
HANDSHAKE_TIMEOUT = 5.0
TARGET_CONNECT_TIMEOUT = 10.0
PENDING_HIGH_WATER = 64 * 1024
CLOSE_REFUSED = 1008
FATAL_CODES = {"AUTH_NO_TOKEN", "PERMISSION_DENIED", "TUNNEL_NOT_FOUND",
               "NO_TUNNEL_ENDPOINT", "NO_TUNNEL_TARGET", "NO_ACCOUNT", "NO_TUNNEL"}

_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "tcp": None, "tls": None,
          "tcps": None}
_TLS = {"https", "wss", "tls", "tcps"}


class TunnelClosed(Exception):
    """The connector gave up (or was stopped before the first connection)."""


def target_endpoint(reactor, url, insecure=False):
    """A client endpoint for a target URL (tcp/http -> TCP; https/tls/tcps/wss -> TLS)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _PORTS:
        raise ValueError(f"Unsupported target URL scheme: {scheme or url}")
    host = parts.hostname
    port = parts.port or _PORTS[scheme]
    if not host or not port:
        raise ValueError(f"Target URL needs a host and a port: {url}")
    endpoint = HostnameEndpoint(reactor, host, port, timeout=TARGET_CONNECT_TIMEOUT)
    if scheme in _TLS:
        endpoint = wrapClientTLS(client_creator(host, insecure), endpoint)
    return endpoint


# -- one channel <-> one target connection ------------------------------------------


class _Target(Protocol):
    def __init__(self, splice):
        self.splice = splice

    def connectionMade(self):
        # requests are relayed as they come (a head, then its body): Nagle
        # would hold the second write for the target's delayed ACK (40 ms)
        no_delay(self.transport)
        # each read: one DATA message whose frame fits one read of the server
        relay_reads(self.transport)
        self.splice.target_up(self)

    def dataReceived(self, data):
        self.splice.channel.write(data)

    def connectionLost(self, reason):
        self.splice.target_down(reason)


class _HttpTarget(_Target):
    """HTTP mode: responses are watched (not changed) to report each request."""

    def dataReceived(self, data):
        self.splice.watcher.feed(data)
        self.splice.channel.write(data)

    def connectionLost(self, reason):
        closed = getattr(self.splice.watcher, "closed", None)  # the inspector's watcher
        if closed is not None:
            closed()
        super().connectionLost(reason)


@implementer(IPushProducer)
class _Splice:
    """Registered as the producer of the target socket (its write side)."""

    def __init__(self, ws, channel, endpoint):
        self.ws = ws
        self.channel = channel
        self.target = None
        self._direct = None  # the target's plain TCP transport (tcp.Connection), written directly
        self.closed = False
        self._pending = []
        self._pending_size = 0
        self._hold = set()   # why the channel is PAUSEd: 'pending', 'target'
        self._stall = set()  # why the target is not read: 'peer', 'carrier'
        channel.on_data = self._data
        target_protocol = _Target
        rules = getattr(ws.connector, "http_rules", None)
        if rules is not None:
            # HTTP mode only: the plain path above stays as it is
            capture = ws.connector.capture
            if capture is None:
                self.rewriter = httpmode.RequestRewriter(rules, self._request_seen)
                self.watcher = httpmode.ResponseWatcher(self._response_seen)
            else:  # the inspector keeps references to the bytes passing
                self.rewriter, self.watcher = capture.taps(rules, self._request_seen,
                                                           self._response_seen)
            self.requests = []
            channel.on_data = self._data_http
            target_protocol = _HttpTarget
        channel.on_close = self._channel_closed
        channel.on_pause = lambda: self.stall("peer", True)
        channel.on_resume = lambda: self.stall("peer", False)
        if ws.carrier_paused:
            self._stall.add("carrier")
        self._connecting = None
        connecting = endpoint.connect(Factory.forProtocol(lambda: target_protocol(self)))
        # an endpoint may connect at once: target_up has then run already
        if self.target is None and not connecting.called:
            self._connecting = connecting
        connecting.addErrback(self._connect_failed)

    # channel -> target
    def _data(self, data):
        sock = self._direct
        if sock is not None:
            write_now(sock, data)
            return
        if self.target is not None:
            self.target.transport.write(data if data.__class__ is bytes else bytes(data))
            return
        if self.closed:
            return
        self._pending.append(bytes(data))
        self._pending_size += len(data)
        if self._pending_size > PENDING_HIGH_WATER:
            self.hold("pending", True)

    def _data_http(self, data):
        if self.closed or self.rewriter is None:
            return
        if data.__class__ is not bytes:  # (a view of a large DATA message)
            data = bytes(data)
        try:
            data = self.rewriter.feed(data)
        except httpmode.HttpModeError as e:
            self.rewriter = None
            log.warn("HTTP mode: {err}; closing the request's connection", err=str(e))
            self.channel.close("EPROTO")
            return
        if data:
            self._data(data)

    def _request_seen(self, method, path):
        self.requests.append((method, path, self.ws.clock.seconds()))
        self.watcher.request(method)

    def _response_seen(self, status):
        if not self.requests:
            return
        method, path, started = self.requests.pop(0)
        ms = round((self.ws.clock.seconds() - started) * 1000, 1)
        self.ws.connector._event("request", f"{method} {path} {status} {ms:.0f} ms",
                                 method=method, path=path, status=status, duration_ms=ms)

    def hold(self, reason, on):
        was = bool(self._hold)
        (self._hold.add if on else self._hold.discard)(reason)
        if self.closed or was == bool(self._hold):
            return
        (self.channel.pause if self._hold else self.channel.resume)()

    def stall(self, reason, on):
        was = bool(self._stall)
        (self._stall.add if on else self._stall.discard)(reason)
        if self.target is None or was == bool(self._stall):
            return
        if self._stall:
            self.target.transport.pauseProducing()
        else:
            self.target.transport.resumeProducing()

    # IPushProducer: the target socket's write buffer is full / drained
    def pauseProducing(self):
        self.hold("target", True)

    def resumeProducing(self):
        self.hold("target", False)

    def stopProducing(self):
        pass

    # target events
    def target_up(self, target):
        self._connecting = None
        if self.closed:
            target.transport.abortConnection()
            return
        self.target = target
        if isinstance(target.transport, tcp.Connection):
            self._direct = target.transport
        target.transport.registerProducer(self, True)
        pending, self._pending, self._pending_size = self._pending, [], 0
        if pending:
            target.transport.write(b"".join(pending))
        self.hold("pending", False)
        if self._stall:
            target.transport.pauseProducing()

    def _connect_failed(self, failure):
        self._connecting = None
        if self.closed:
            return
        log.warn("target connection failed: {err}", err=failure.getErrorMessage())
        self.closed = True
        code = "ECONNREFUSED" if failure.check(error.ConnectionRefusedError) else \
            (failure.getErrorMessage() or "ECONNREFUSED")
        self.channel.close(code)

    def target_down(self, reason):
        if self.closed:
            return
        self.closed = True
        self.channel.close(None if reason.check(error.ConnectionDone) else "ECONNRESET")

    # the channel is gone (peer CLOSE, our CLOSE acked, or WebSocket teardown)
    def _channel_closed(self, err):
        self.ws.splices.discard(self)
        already, self.closed = self.closed, True
        if self._connecting is not None:
            self._connecting.cancel()
        elif self.target is not None and not already:
            if err is None:
                self.target.transport.loseConnection()
            else:
                self.target.transport.abortConnection()


# -- the WebSocket ----------------------------------------------------------------------


@implementer(IPushProducer)
class _Carrier:
    """Producer on the WebSocket's TCP transport: pauses every target when it is full."""

    def __init__(self, ws):
        self.ws = ws

    def pauseProducing(self):
        self.ws.set_carrier_paused(True)

    def resumeProducing(self):
        self.ws.set_carrier_paused(False)

    def stopProducing(self):
        pass


class TunnelWebSocket(wsframes.FastSend, wsframes.FastReceive, WebSocketClientProtocol):
    """One transport connection: ws-multiplex acceptor + keep-alive.

    dataReceived (`wsframes.FastReceive`): complete, unfragmented, unmasked
    binary frames go straight to the multiplexer; everything else (the
    handshake, control frames, fragments, masked frames from the server, which
    are a protocol violation) goes to autobahn.
    """

    _rx_masked = False
    _tx_masked = True  # (`wsframes.FastSend`: _send, _send_parts)

    def __init__(self, connector):
        super().__init__()
        self.connector = connector
        self.clock = connector.clock
        self.opened = defer.Deferred(lambda d: self.dropConnection(abort=True))
        self.closed = defer.Deferred()  # fires with the close code
        self.mux = None
        self.splices = set()
        self.carrier_paused = False
        self._pinger = None
        self._keepalive = None
        self._dropping = False

    def onOpen(self):
        # autobahn tries TCP_NODELAY before its options are copied from the
        # factory, and silently fails: small PAUSE/RESUME/ACK frames then
        # wait ~40 ms for delayed ACKs
        no_delay(self.transport)
        self.mux = multiplex.Multiplexer(self._send, role=multiplex.CLIENT, clock=self.clock,
                                         send_parts=self._send_parts)
        self.mux.on_incoming = self._incoming
        self.mux.on_teardown = self._teardown
        self.mux.on_warning = lambda text: log.warn("{text}", text=text)
        # Twisted's bufferSize (64 KiB, also the size of every recv()) is
        # kept: a larger one cost an mmap per read and measured no faster
        self.transport.registerProducer(_Carrier(self), True)
        self._keepalive = multiplex.KeepAlive(self.clock.seconds())
        self._pinger = task.LoopingCall(self._ping)
        self._pinger.clock = self.clock
        self._pinger.start(multiplex.PING_INTERVAL, now=True)
        if not self.opened.called:
            self.opened.callback(self)

    def _seconds(self):
        return self.clock.seconds()

    def _incoming(self, channel):
        try:
            endpoint = self.connector.target()
        except ValueError as e:
            channel.close(str(e))
            return
        self.splices.add(_Splice(self, channel, endpoint))

    def onMessage(self, payload, isBinary):
        if isBinary and self.mux is not None:
            self.mux.receive(payload)

    def onPong(self, payload):
        if self._keepalive is not None:
            self._keepalive.pong(self.clock.seconds())

    def _ping(self):
        if self._keepalive.expired(self.clock.seconds()):
            log.warn("no pong for {s} s, dropping the connection", s=multiplex.PING_TIMEOUT)
            self._dropping = True
            self.mux.teardown(multiplex.ERR_WS_PING_TIMEOUT)
            self.dropConnection(abort=True)
            return
        self.sendPing()

    def _teardown(self, err):
        if self.state == self.STATE_OPEN and not self._dropping:
            self.sendClose(1000)

    def set_carrier_paused(self, paused):
        self.carrier_paused = paused
        for splice in list(self.splices):
            splice.stall("carrier", paused)

    def close(self):
        """Close (1000) and wait for the connection to end."""
        if self.state == self.STATE_OPEN:
            self.sendClose(1000)
        elif self.state != self.STATE_CLOSED:
            self.dropConnection(abort=True)
        return self.closed

    def onClose(self, wasClean, code, reason):
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        if self.mux is not None:
            self.mux.teardown(multiplex.ERR_WS_SOCKET_CLOSED_UNEXPECTEDLY)
        if not self.opened.called:
            self.opened.errback(TunnelClosed(reason or f"WebSocket failed ({code})"))
        if not self.closed.called:
            self.closed.callback(code)


def ws_factory(url):
    """The autobahn client factory of a tunnel WebSocket (``protocol`` still to set)."""
    factory = WebSocketClientFactory(url, useragent=None)
    limit = multiplex.DEFAULT_MAX_PAYLOAD + 64
    factory.setProtocolOptions(maxMessagePayloadSize=limit, maxFramePayloadSize=limit,
                               openHandshakeTimeout=0, autoPingInterval=0,
                               closeHandshakeTimeout=1)
    return factory


# -- slots and the connector --------------------------------------------------------------


class _Slot:
    """One of the ``max_connections`` WebSockets, reconnected independently."""

    def __init__(self, connector, index):
        self.connector = connector
        self.index = index
        self.delay = BACKOFF_INITIAL
        self.ws = None
        self.timer = None
        self.attempt = None
        self.done = False

    def connect(self):
        self.timer = None
        if self.connector.stopping:
            return
        self.attempt = self.connector._lock.run(self.connector._attempt)
        self.attempt.addCallbacks(self._up, self._failed)

    def _up(self, ws):
        self.attempt = None
        if self.connector.stopping:
            ws.close()
            return
        self.ws = ws
        self.delay = BACKOFF_INITIAL
        ws.closed.addCallback(self._down)
        self.connector._slot_up(self)

    def _failed(self, failure):
        self.attempt = None
        if self.connector.stopping:
            return
        if failure.check(ApiError) and failure.value.code in FATAL_CODES:
            self.connector._fail(failure)
            return
        n, err = self.index + 1, _describe(failure)
        if not self.connector._event("failed", f"Connection {n} failed: {err}",
                                     connection=n, error=err):
            log.warn("connection {n} failed: {err}; retrying in {d:.1f} s",
                     n=n, err=err, d=self.delay)
        self._retry()

    def _down(self, code):
        self.ws = None
        if self.connector.stopping:
            return code
        n = self.index + 1
        if code == CLOSE_REFUSED:
            if not self.connector._event(
                    "refused", f"Connection {n} refused by the server (1008), not retrying",
                    connection=n, code=code):
                log.warn("connection {n} refused by the server (1008), not retrying", n=n)
            self.done = True
            self.connector._slot_done()
            return code
        if not self.connector._event("disconnected", f"Connection {n} lost ({code})",
                                     connection=n, code=code):
            log.warn("connection {n} lost ({code}), reconnecting", n=n, code=code)
        self._retry()
        return code

    def _retry(self):
        n = self.index + 1
        self.connector._event("reconnecting",
                              f"Connection {n} reconnecting in {self.delay:.1f} s",
                              connection=n, delay=round(self.delay, 2))
        self.timer = self.connector.clock.callLater(self.delay, self.connect)
        self.delay = min(self.delay * BACKOFF_FACTOR, BACKOFF_MAX)

    def cancel(self):
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.attempt is not None:
            self.attempt.cancel()


def _describe(failure):
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return "timeout"
    return str(failure.value) or failure.getErrorMessage()


class TunnelConnector:
    def __init__(self, reactor, api, tunnel_id, target_url=None, insecure=False, clock=None,
                 handshake_timeout=HANDSHAKE_TIMEOUT, http_mode=None):
        self.reactor = reactor
        self.clock = clock or reactor
        self.api = api
        self.tunnel_id = tunnel_id
        self.target_url = target_url
        self.insecure = insecure
        self.handshake_timeout = handshake_timeout
        self.info = None
        self.slots = []
        self.stopping = False
        self.finished = defer.Deferred()
        self._started = None
        self._stopped = None
        self._lock = defer.DeferredLock()
        self._waiters = []
        self.on_event = None
        # HTTP mode: None, or {"rewrite": names, "replace": {name: (Name, value)}}
        self.http_mode = http_mode
        self.http_rules = None
        self.capture = None  # an `inspector.Capture` (HTTP mode with the inspector on)

    def _event(self, name, text, **fields):
        """Tell `on_event` (True), or let the caller log (False)."""
        if self.on_event is None:
            return False
        self.on_event(name, text, **fields)
        return True

    @property
    def connections(self):
        return [s.ws for s in self.slots if s.ws is not None]

    def target(self):
        return target_endpoint(self.reactor, self.target_url, self.insecure)

    def start(self):
        self._started = defer.Deferred()
        d = self.api.read_tunnel(self.tunnel_id)
        d.addCallback(self._configured)
        d.addErrback(self._fail)
        return self._started

    def _configured(self, info):
        ws_url = ((info.get("transport") or {}).get("ws") or {}).get("url")
        if not ws_url:
            raise ApiError(None, "NO_TUNNEL_ENDPOINT")
        self.target_url = self.target_url or (info.get("target") or {}).get("url")
        if not self.target_url:
            raise ApiError(None, "NO_TUNNEL_TARGET")
        try:
            self.target()
        except ValueError as e:
            raise TunnelClosed(str(e)) from None
        if self.http_mode is not None:
            try:
                self.http_rules = httpmode.HeaderRules(self.target_url, **self.http_mode)
            except ValueError as e:
                raise TunnelClosed(str(e)) from None
        self.info = info
        count = (info.get("transport") or {}).get("max_connections") or 1
        self.slots = [_Slot(self, i) for i in range(max(1, int(count)))]
        for slot in self.slots:
            slot.connect()

    @defer.inlineCallbacks
    def _attempt(self):
        info = yield self.api.read_tunnel(self.tunnel_id)
        url = ((info.get("transport") or {}).get("ws") or {}).get("url")
        if not url:
            raise ApiError(None, "NO_TUNNEL_ENDPOINT")
        d = self._open_ws(url)
        d.addTimeout(self.handshake_timeout, self.clock)
        ws = yield d
        return ws

    @defer.inlineCallbacks
    def _open_ws(self, url):
        factory = ws_factory(url)
        factory.protocol = lambda: TunnelWebSocket(self)
        endpoint = HostnameEndpoint(self.reactor, factory.host, factory.port,
                                    timeout=self.handshake_timeout)
        if factory.isSecure:
            endpoint = wrapClientTLS(client_creator(factory.host, self.insecure), endpoint)
        ws = yield endpoint.connect(factory)
        yield ws.opened
        return ws

    def wait_connections(self, count):
        """Deferred firing once `count` WebSockets are up at the same time."""
        d = defer.Deferred()
        self._waiters.append((count, d))
        self._check_waiters()
        return d

    def _check_waiters(self):
        up = len(self.connections)
        for item in [w for w in self._waiters if w[0] <= up]:
            self._waiters.remove(item)
            item[1].callback(up)

    def _slot_up(self, slot):
        n = slot.index + 1
        if not self._event("connected", f"Connection {n} established", connection=n,
                           connections=len(self.connections)):
            log.info("connection {n} established", n=n)
        self._check_waiters()
        if not self._started.called:
            self._started.callback(self.info)

    def _slot_done(self):
        if all(s.done for s in self.slots):
            self._fail(TunnelClosed("The server refused the tunnel connection (1008)"))

    def _fail(self, failure):
        if self.stopping:
            return None
        self._shutdown()
        if not self._started.called:
            self._started.errback(failure)
            self._stopped.addCallback(lambda _: self.finished.callback(None))
        else:
            self._stopped.addCallback(lambda _: self.finished.errback(failure))
        return None

    def _shutdown(self):
        self.stopping = True
        for slot in self.slots:
            slot.cancel()
        closing = [ws.close() for ws in self.connections]
        self._stopped = defer.DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)

    def stop(self):
        """Close every WebSocket; the Deferred fires when they are gone."""
        if not self.stopping:
            self._shutdown()
            if self._started is not None and not self._started.called:
                self._started.errback(TunnelClosed("stopped"))

            def done(_):
                if not self.finished.called:
                    self.finished.callback(None)

            self._stopped.addCallback(done)
        d = defer.Deferred()
        self._stopped.addBoth(lambda r: (d.callback(None), r)[1])
        return d
