"""The WebSocket transport: autobahn + the ws-multiplex core, as a tunnel connection.

The shared HTTP listener (`exposr.listener`) authorises an upgrade to
``/v1/tunnel/<id>/ws-endpoint?t=<token>`` itself (so refusals get the JSON
answers of docs/protocol.rst, "WebSocket endpoint") and then hands the
connection, with the bytes read so far, to a `TunnelWebSocket` built by
`WSTransport.protocol_for`. From the handshake on, the WebSocket is an
`ITunnelConnection`: every ``open_stream(factory)`` opens one channel and
attaches the factory's protocol to a `StreamTransport` over it.

Back-pressure: when the TCP connection to the client is backed up, every
channel's producer (the ingress sockets) is paused until it drains; a PAUSE from
the client pauses that channel's producer only.

Bounded memory against a client that does not read: once more than
`MAX_OUTGOING` bytes wait for the client, the server also stops reading from
it (so it answers nothing more: pings, OPENs, DATA for unknown channels) until
they are sent; at most the answers to one read (64 KiB, answered with at most
~3 times as much) come on top. A close of ours waits at most `CLOSE_DRAIN_TIMEOUT`
for the client to take what is buffered, then the connection is aborted.
"""

import types
import uuid

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import encode_truncate
from autobahn.websocket.protocol import TrafficStats
from autobahn.websocket.utf8validator import Utf8Validator
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from exposr import errors
from exposr.compat.autobahn import EQUAL_VALUES, HANDSHAKE_ONLY, INITIAL_STATE
from exposr.interfaces import ITunnelConnection
from exposr.sockwrite import no_delay
from exposr.transport import multiplex, wsframes
from exposr.transport.stream import StreamTransport

log = Logger(namespace="exposr.transport.ws")

HANDSHAKE_TIMEOUT = 5.0
CLOSE_REFUSED = 1008
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
# Twisted's bufferSize: past this many bytes buffered for the client, the TCP
# transport pauses its producer (`_CarrierProducer`): the channels, and reading
MAX_OUTGOING = 64 * 1024
# a close (ours, or the answer to the client's) flushes what is buffered; a
# client that does not read is aborted after this many seconds
CLOSE_DRAIN_TIMEOUT = 10.0


# Memory per connection (docs/architecture.rst, "Memory"): autobahn keeps ~100
# attributes per protocol instance, in an instance dict of several KiB. Once the
# WebSocket is open, `TunnelWebSocket._compact` rebuilds that dict without
# * what only the opening handshake reads (`HANDSHAKE_ONLY`);
# * values that are class attributes of the same name (`_CLASS_VALUES`, the
#   same object): the factory's options (autobahn copies them into every
#   instance) and the state autobahn starts every connection with
#   (`INITIAL_STATE`);
# * values equal to those of `EQUAL_VALUES` (the same for every connection);
# * ``send_queue`` while it is empty (the class value is an empty tuple: the
#   queue of sync/chopped sends, which exposrd never makes), the resolved
#   ``is_open`` (the class value is a resolved Deferred), ``utf8validator``
#   (made again on the first text message, `_PerInstance`) and
#   ``trafficStats`` (counters autobahn keeps and nobody reads: one shared).
# (the tables of autobahn's attributes are `exposr.compat.autobahn`'s)


class _PerInstance:
    """A class attribute made per instance on first use (a non-data descriptor:
    the instance's own value, when it has one, wins)."""

    def __init__(self, make):
        self.make = make

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.make()
        return value


@implementer(IPushProducer)
class _CarrierProducer:
    """Registered on the TCP transport: tells the channels when it is full."""

    __slots__ = ("ws",)

    def __init__(self, ws):
        self.ws = ws

    def pauseProducing(self):
        self.ws._carrier_paused(True)

    def resumeProducing(self):
        self.ws._carrier_paused(False)

    def stopProducing(self):
        pass


@implementer(ITunnelConnection)
class TunnelWebSocket(wsframes.FastSend, wsframes.FastReceive, WebSocketServerProtocol):
    """One exposr client WebSocket carrying one tunnel."""

    local = True
    send_queue = ()
    is_open = defer.succeed(None)  # once open (autobahn's own is resolved then dropped)
    utf8validator = _PerInstance(Utf8Validator)
    trafficStats = TrafficStats()
    _valid_events = EQUAL_VALUES["_valid_events"]  # read only
    _results = _PerInstance(lambda: dict(EQUAL_VALUES["_results"]))
    websocket_extensions_in_use = _PerInstance(list)
    websocket_version = EQUAL_VALUES["websocket_version"]
    # name -> class value, for `_compact` (the factory's options are added by
    # `WSTransport`'s subclass)
    _CLASS_VALUES = dict(INITIAL_STATE)

    def __init__(self, transport_service, tunnel_id, account_id, peer_ip):
        super().__init__()
        self.service = transport_service
        self.tunnel_id = tunnel_id
        self.account_id = account_id
        self.peer = self._peer_ip = peer_ip
        self.connection_id = f"{transport_service.node_id}:{uuid.uuid4()}"
        self.registered = False
        self.mux = None
        self._streams = {}
        self._paused = False
        self._pinger = None
        self._keepalive = None
        self._closing = False
        self._drain_call = None

    # -- WebSocket life cycle -------------------------------------------

    def onOpen(self):
        # autobahn's connectionMade overwrote ``peer`` with "tcp4:host:port";
        # the registry wants the client's IP address (ITunnelConnection.peer)
        self.peer = self.__dict__.pop("_peer_ip")
        # autobahn tries TCP_NODELAY before its options are set and fails
        # silently: small PAUSE/RESUME/OPEN frames then wait for delayed ACKs
        no_delay(self.transport)
        clock = self.service.clock
        self.mux = multiplex.Multiplexer(self._send, role=multiplex.SERVER, clock=clock,
                                         send_parts=self._send_parts)
        self.mux.on_teardown = self._on_teardown
        # Twisted's bufferSize (64 KiB) is kept: it is the size of every
        # recv() too, and frames go to the socket at once (`_send`), so the
        # backlog that pauses every channel only grows once the kernel's send
        # buffer is full
        self.transport.registerProducer(_CarrierProducer(self), True)
        self._keepalive = multiplex.KeepAlive(clock.seconds())
        self._pinger = clock.callLater(multiplex.PING_INTERVAL, self._ping)
        # autobahn resolves is_open right after onOpen: compact then
        self.is_open.addCallback(self._compact)
        d = self.service.connections.register(self, self.account_id)
        d.addCallbacks(self._registered, self._register_failed)

    def _compact(self, result=None):
        """Rebuild the instance dict without what the class holds (see `HANDSHAKE_ONLY`)."""
        values = self._CLASS_VALUES
        state = self.__dict__
        if not state.get("send_queue", True):
            del state["send_queue"]
        state.pop("utf8validator", None)
        state.pop("trafficStats", None)
        if state.get("is_open") is not None and state["is_open"].called:
            del state["is_open"]
        self.__dict__ = {k: v for k, v in state.items()
                         if k not in HANDSHAKE_ONLY and (k not in values or values[k] is not v)
                         and (k not in EQUAL_VALUES or EQUAL_VALUES[k] != v)}

    def _registered(self, ok):
        if not ok:
            log.info("tunnel {tunnel} connection refused (limit or draining)", tunnel=self.tunnel_id)
            self._close(CLOSE_REFUSED, "unable to establish tunnel")
            return
        self.registered = True
        if self._closing or self.state == self.STATE_CLOSED:
            self._unregister()
            return
        # (the registry logs the connect, for every transport: one record per event)

    def _register_failed(self, failure):
        log.warn("tunnel {tunnel}: registration failed: {err}", tunnel=self.tunnel_id, err=failure.getErrorMessage())
        self._close(CLOSE_REFUSED, "unable to establish tunnel")

    def onMessage(self, payload, isBinary):
        if isBinary:
            self.mux.receive(payload)

    def onPong(self, payload):
        if self._keepalive is not None:
            self._keepalive.pong(self.service.clock.seconds())

    def when_closed(self):
        """A Deferred firing once the WebSocket is closed (its close handshake done)."""
        d = defer.Deferred()
        if self.state == self.STATE_CLOSED:
            d.callback(None)
        else:
            self.__dict__.setdefault("_close_waiters", []).append(d)
        return d

    def onClose(self, wasClean, code, reason):
        for d in self.__dict__.pop("_close_waiters", []):
            d.callback(None)
        self._closing = True
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        if self._pinger is not None and self._pinger.active():
            self._pinger.cancel()
        self._pinger = None
        if self.mux is not None:
            self.mux.teardown(multiplex.ERR_WS_SOCKET_CLOSED_UNEXPECTEDLY)
        self._unregister()

    def _unregister(self):
        if self.registered:
            self.registered = False
            self.service.connections.unregister(self)

    def _ping(self):
        now = self.service.clock.seconds()
        if self._keepalive.expired(now):
            log.info("tunnel {tunnel}: no pong for {s} s, dropping", tunnel=self.tunnel_id, s=multiplex.PING_TIMEOUT)
            self._pinger = None
            self._closing = True
            self.mux.teardown(multiplex.ERR_WS_PING_TIMEOUT)
            self.dropConnection(abort=True)
            return
        # one timer per connection, re-armed (a LoopingCall costs a Deferred and more)
        self._pinger = self.service.clock.callLater(multiplex.PING_INTERVAL, self._ping)
        self.sendPing()

    # _send / _send_parts (the multiplexer's): wsframes.FastSend, unmasked frames

    # dataReceived: wsframes.FastReceive takes complete, unfragmented, masked
    # binary frames; everything else goes to autobahn

    def _on_teardown(self, error):
        if not self._closing:
            code = CLOSE_REFUSED if error == multiplex.ERR_WSM_TOO_MANY_REFUSED_OPENS else CLOSE_NORMAL
            self._close(code, error or "")

    def _seconds(self):
        return self.service.clock.seconds()

    def dropConnection(self, abort=False):
        # After we failed the connection (a 1002, 1007, 1009 close is out, or
        # still buffered), the client's close or its next violation must not
        # discard that close frame with an abort: it is flushed, within
        # CLOSE_DRAIN_TIMEOUT.
        if abort and self.failedByMe and self.state == self.STATE_CLOSING:
            abort = False
        super().dropConnection(abort)

    def _closeConnection(self, abort=False):
        if not abort and self._drain_call is None and self.transport is not None:
            self._drain_call = self.service.clock.callLater(CLOSE_DRAIN_TIMEOUT, self.transport.abortConnection)
        super()._closeConnection(abort)

    def _close(self, code, reason):
        self._closing = True
        if self.state == self.STATE_OPEN:
            # sendClose() refuses 1001/1008 (autobahn allows applications only
            # 1000 and 3000-4999); the original's codes are sent as they are
            self.sendCloseFrame(code=code, reasonUtf8=encode_truncate(reason or "", 123) or None, isReply=False)
        elif self.state in (self.STATE_CONNECTING, self.STATE_PROXY_CONNECTING):
            self.dropConnection(abort=True)
        # CLOSING: our close frame (or the peer's) is out; autobahn finishes it

    def _carrier_paused(self, paused):
        # the client takes too little of what we send: stop reading what it
        # sends (which we would answer) too, until it has taken the backlog
        if paused:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()
        self._paused = paused
        for stream in list(self._streams.values()):
            if paused:
                stream.carrier_paused()
            else:
                stream.carrier_resumed()

    # -- ITunnelConnection ------------------------------------------------

    def open_stream(self, protocolFactory):
        if self._closing or self.mux is None or self.state != self.STATE_OPEN:
            return defer.fail(errors.TransportClosedError("WebSocket closed"))
        try:
            channel = self.mux.open_channel()
        except errors.StreamError as e:
            return defer.fail(e)
        d = defer.Deferred()
        stream = StreamTransport(channel, self.transport.getHost(), self.transport.getPeer())
        if self._paused:
            stream.carrier_paused()

        def opened():
            self._streams[channel.id] = stream
            try:
                protocol = protocolFactory.buildProtocol(stream.getPeer())
            except Exception as e:
                channel.close("ECONNRESET")
                d.errback(e)
                return
            stream.attach(protocol)
            d.callback(protocol)

        def closed(error):
            self._streams.pop(channel.id, None)
            if not d.called:
                if error == multiplex.ERR_WSM_OPEN_CHANNEL_TIMEOUT:
                    d.errback(errors.StreamOpenTimeoutError(error))
                elif error == multiplex.ERR_WSM_OPEN_CHANNEL_REJECTED:
                    d.errback(errors.StreamRefusedError(channel.peer_error or error))
                else:
                    d.errback(errors.TransportClosedError(error or "closed"))
                return
            if error is None or error == multiplex.ERR_WSM_CHANNEL_CLOSED_BY_PEER and not channel.peer_error:
                stream.connection_lost(None)
            else:
                stream.connection_lost(channel.peer_error or error)

        channel.on_open = opened
        channel.on_data = stream.data_received
        channel.on_close = closed
        channel.on_pause = stream.peer_paused
        channel.on_resume = stream.peer_resumed
        return d

    def disconnect(self, reason="disconnected"):
        """Server-side disconnect: close the WebSocket (1001 on shutdown, else 1000),
        so the client notices; the original left it open."""
        if "shutting down" in (reason or "").lower():
            code, reason = CLOSE_GOING_AWAY, "Server shutting down"
        else:
            code = CLOSE_NORMAL
        self._close(code, reason)
        if self.mux is not None:
            self.mux.teardown(multiplex.ERR_WS_SOCKED_CLOSED)


for _name, _value in INITIAL_STATE.items():
    setattr(TunnelWebSocket, _name, _value)
del _name, _value


class WSTransport:
    """Builds `TunnelWebSocket` protocols for authorised upgrades.

    ``connections`` registers and unregisters the tunnel connections
    (``register(conn, account_id)`` → Deferred of bool, ``unregister(conn)``):
    the `TunnelService`."""

    def __init__(self, reactor, connections, node_id, max_message=multiplex.DEFAULT_MAX_PAYLOAD + 64, clock=None):
        self.reactor = reactor
        # timers of the multiplexer and the keep-alive (tests inject a Clock)
        self.clock = clock if clock is not None else reactor
        self.connections = connections
        self.node_id = node_id
        self.factory = WebSocketServerFactory()
        self.factory.setProtocolOptions(
            maxMessagePayloadSize=max_message,
            maxFramePayloadSize=max_message,
            openHandshakeTimeout=HANDSHAKE_TIMEOUT,
            perMessageCompressionAccept=lambda offers: None,
            failByDrop=False,
        )
        # the factory's options as class attributes: autobahn copies them into
        # every instance, `TunnelWebSocket._compact` drops those copies
        options = {name: getattr(self.factory, name) for name in TunnelWebSocket.CONFIG_ATTRS
                   if hasattr(self.factory, name)}
        namespace = {name: staticmethod(value) if isinstance(value, types.FunctionType) else value
                     for name, value in options.items()}  # (a function option must not become a method)
        namespace["_CLASS_VALUES"] = dict(TunnelWebSocket._CLASS_VALUES, **options)
        self.protocol = type("TunnelWebSocket", (TunnelWebSocket,), namespace)

    def protocol_for(self, tunnel_id, account_id, peer_ip):
        proto = self.protocol(self, tunnel_id, account_id, peer_ip)
        proto.factory = self.factory
        return proto
