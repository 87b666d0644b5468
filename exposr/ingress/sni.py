"""The SNI ingress (docs/protocol.rst, "SNI routing"): TLS on a port of its own.

For every connection:

1. peek at the ClientHello (`exposr.ingress.clienthello`): only the hello is
   buffered, within ``hello_timeout`` and ``max_hello_size``;
2. the tunnel id is the first label of the server name; ``resolve(tunnel_id)``
   (injected) answers, possibly through a Deferred, with the upstream
   ``IStreamClientEndpoint`` (or a `Route`, or ``(endpoint, passthrough)``),
   or fails (`SNIRefused` or any exception: unknown tunnel, SNI disabled, not
   connected). A refusal closes the connection before the handshake completes;
3. normally the TLS session is terminated here with the current certificate
   (``certificates``, an ``IOpenSSLServerConnectionCreator`` such as
   `exposr.ingress.certificate.CertificateWatcher`), replaying the buffered
   hello into a `TLSMemoryBIOProtocol`; once the handshake is complete the
   upstream stream is opened and the plaintext is spliced both ways with
   producers registered in both directions. With ``passthrough`` the upstream
   is opened right away and the raw bytes (hello included) are spliced
   untouched;
4. either side closing or failing closes the other. Every failure is one log
   line and a clean close, never a traceback.
"""

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from exposr import clientaddr
from exposr.errors import ExposrError
from exposr.router import Reason, Refusal
from exposr.ingress.clienthello import DEFAULT_MAX_SIZE, ClientHelloError, ClientHelloParser
from exposr.sockwrite import no_delay

log = Logger(namespace="exposr.ingress.sni")

HELLO_TIMEOUT = 10.0  # seconds for the whole ClientHello to arrive
SETUP_TIMEOUT = 30.0  # seconds from accept until bytes flow (handshake + stream open)
CLOSE_TIMEOUT = 10.0  # seconds a closing side may take to flush before it is aborted


class SNIRefused(ExposrError):
    """Raised (or failed with) by a resolver: the tunnel cannot take this connection."""


@attrs.frozen
class Route:
    """What a resolver may answer: where to go, and whether to keep TLS intact."""

    endpoint: object
    passthrough: bool = False


def tunnel_id_from_server_name(server_name):
    """The first label of the server name, lower-cased (the rest is not checked), or None."""
    if not server_name:
        return None
    label = server_name.split(".", 1)[0].lower()
    return label or None


_REFUSALS = {
    Reason.NOT_FOUND: "unknown tunnel {}",
    Reason.SNI_DISABLED: "SNI ingress not enabled for {}",
    Reason.NOT_CONNECTED: "tunnel {} is not connected",
    Reason.UNREACHABLE: "tunnel {} is connected only on nodes that cannot be reached",
    Reason.STORAGE_UNAVAILABLE: "tunnel {} could not be looked up (storage failing)",
    Reason.ACCESS_DENIED: "the client address is not on the allow list of tunnel {}",
}


def router_resolver(router):
    """The ``resolve`` of an SNI ingress that asks the domain router (`exposr.router`)."""

    def refused(failure, tunnel_id):
        failure.trap(Refusal)
        raise SNIRefused(_REFUSALS.get(failure.value.reason, "{} refused").format(tunnel_id))

    def resolve(tunnel_id, client_ip=None):
        return router.sni_route(tunnel_id, client_ip).addErrback(refused, tunnel_id)

    resolve.with_client_ip = True  # the factory passes the client address too
    return resolve


def _as_route(answer):
    if isinstance(answer, Route):
        return answer
    if hasattr(answer, "endpoint") and hasattr(answer, "passthrough"):
        return Route(answer.endpoint, bool(answer.passthrough))
    if isinstance(answer, tuple) and len(answer) == 2:
        return Route(answer[0], bool(answer[1]))
    if IStreamClientEndpoint.providedBy(answer) or hasattr(answer, "connect"):
        return Route(answer)
    raise SNIRefused(f"resolver answered {answer!r}")


def _reason_text(failure_or_exc):
    exc = getattr(failure_or_exc, "value", failure_or_exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


class SNIIngressFactory(Factory):
    """
    The listening factory. ``resolve(tunnel_id)`` → endpoint / `Route` /
    ``(endpoint, passthrough)`` or a Deferred of one; ``certificates`` an
    ``IOpenSSLServerConnectionCreator`` asked once per new TLS session (so a
    reloaded certificate applies to new connections only); ``reactor`` gives
    the timers (and TLS write aggregation).
    """

    noisy = False

    def __init__(
        self,
        resolve,
        certificates,
        reactor,
        hello_timeout=HELLO_TIMEOUT,
        setup_timeout=SETUP_TIMEOUT,
        max_hello_size=DEFAULT_MAX_SIZE,
        close_timeout=CLOSE_TIMEOUT,
    ):
        self.resolve = resolve
        self.certificates = certificates
        self.reactor = reactor
        self.hello_timeout = hello_timeout
        self.setup_timeout = setup_timeout
        self.max_hello_size = max_hello_size
        self.close_timeout = close_timeout
        # One TLS factory for all connections; protocols are built per
        # connection around our plaintext side (see SNIProtocol._start_tls).
        self.tls_factory = TLSMemoryBIOFactory(certificates, False, self, clock=reactor)
        self.connections = set()
        self._drained = []
        # for the metrics: connections accepted, and refused before the handshake
        self.accepted = 0
        self.refused = 0

    def drain(self):
        """Shutting down: close the sessions that carry nothing yet (before or
        in their handshake); a Deferred firing once the others have ended."""
        for session in list(self.connections):
            if session._state != "splice":
                session.shut_down()
        if not self.connections:
            return defer.succeed(None)
        d = defer.Deferred()
        self._drained.append(d)
        return d

    def _gone(self, session):
        self.connections.discard(session)
        if not self.connections and self._drained:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def buildProtocol(self, addr):
        p = SNIProtocol()
        p.factory = self
        return p


class SNIProtocol(Protocol):
    """One accepted connection on the SNI port (the raw, encrypted side)."""

    factory = None

    def __init__(self):
        self._parser = None
        self._state = "hello"  # hello, resolving, handshake, connecting, splice, closed
        self._timers = []
        self._tls = None  # TLSMemoryBIOProtocol once terminating
        self._pending = []  # bytes for the upstream before it is connected
        self._paused = False  # we paused the client socket ourselves
        self._endpoint = None  # where to connect once the handshake is done
        self._connecting = None  # the endpoint.connect Deferred
        self._upstream = None  # _Upstream once connected
        self._client_consumer = None  # where the upstream producer is registered
        self._lingering = {}  # transport -> DelayedCall aborting it if it will not close
        self.server_name = None
        self.tunnel_id = None
        self.passthrough = False
        self.peer = None

    # -- helpers --------------------------------------------------------------

    def _describe(self):
        peer = self.peer
        where = f"{peer.host}:{peer.port}" if hasattr(peer, "host") else str(peer)
        if self.server_name:
            return f"{where} -> {self.server_name}"
        return where

    def _log(self, message, level="info", **kw):
        getattr(log, level)(
            "SNI {connection}: " + message, connection=self._describe(), **kw
        )

    def _cancel_timers(self):
        for call in self._timers:
            if call.active():
                call.cancel()
        self._timers = []

    def _linger(self, transport):
        """Abort ``transport`` if its closing flush has not finished in time."""

        def abort():
            self._lingering.pop(transport, None)
            if not getattr(transport, "disconnected", False):
                transport.abortConnection()

        if transport not in self._lingering:
            self._lingering[transport] = self.factory.reactor.callLater(
                self.factory.close_timeout, abort
            )

    def _unlinger(self, transport):
        call = self._lingering.pop(transport, None)
        if call is not None and call.active():
            call.cancel()

    def _pause_client(self):
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _resume_client(self):
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    # -- raw side -------------------------------------------------------------

    def connectionMade(self):
        f = self.factory
        f.connections.add(self)
        f.accepted += 1
        self.peer = self.transport.getPeer()
        no_delay(self.transport)  # small TLS records go out at once
        self._parser = ClientHelloParser(max_size=f.max_hello_size)
        clock = f.reactor
        self._timers = [
            clock.callLater(
                f.hello_timeout,
                self._expired,
                "no complete ClientHello within {t:g} s",
                f.hello_timeout,
            ),
            clock.callLater(
                f.setup_timeout,
                self._expired,
                "connection not established within {t:g} s",
                f.setup_timeout,
            ),
        ]

    def shut_down(self):
        """Server shutdown: close the session (TLS close_notify, then the socket)."""
        self._close_upstream()
        self._close_client()

    def dataReceived(self, data):
        if self._tls is not None:
            self._tls.dataReceived(data)
        elif self._state == "splice":  # passthrough
            self._upstream.transport.write(data)
        elif self._state == "hello":
            self._hello_data(data)
        elif self._state in ("resolving", "connecting"):
            # A read that raced our pauseProducing.
            self._pending.append(data)

    def connectionLost(self, reason):
        self.factory._gone(self)
        self._unlinger(self.transport)
        if self._tls is not None:
            tls, self._tls = self._tls, None
            # Delivers _Plaintext.connectionLost → _client_gone.
            tls.connectionLost(reason)
        else:
            self._client_gone(reason)
        self._parser = None

    # -- 1. ClientHello -------------------------------------------------------

    def _hello_data(self, data):
        try:
            hello = self._parser.feed(data)
        except ClientHelloError as e:
            self._refuse(f"bad ClientHello: {e.reason}")
            return
        if hello is None:
            return
        self._timers[0].cancel()
        self.server_name = hello.server_name
        self.tunnel_id = tunnel_id_from_server_name(hello.server_name)
        if self.tunnel_id is None:
            self._refuse("no SNI server name")
            return
        self._pending = [hello.raw, hello.trailing] if hello.trailing else [hello.raw]
        self._parser = None
        self._state = "resolving"
        self._pause_client()
        resolve = self.factory.resolve
        if getattr(resolve, "with_client_ip", False):
            # the client is the socket peer (no proxy header on a TLS port)
            d = defer.maybeDeferred(resolve, self.tunnel_id, clientaddr.normalise_ip(getattr(self.peer, "host", "")))
        else:
            d = defer.maybeDeferred(resolve, self.tunnel_id)
        d.addCallback(_as_route)
        d.addCallbacks(self._resolved, self._resolve_failed)
        d.addErrback(self._internal_error)

    # -- 2. routing -------------------------------------------------------------

    def _resolve_failed(self, failure):
        if self._state == "closed":
            return
        self._refuse(f"refused tunnel {self.tunnel_id}: {_reason_text(failure)}")

    def _resolved(self, route):
        if self._state == "closed":
            return
        self.passthrough = route.passthrough
        if route.passthrough:
            self._state = "connecting"
            self._connect(route.endpoint)
        else:
            self._endpoint = route.endpoint
            self._start_tls()

    # -- 3a. TLS termination -------------------------------------------------

    def _start_tls(self):
        self._state = "handshake"
        hello = b"".join(self._pending)
        self._pending = []
        tls_factory = self.factory.tls_factory
        self._tls = tls_factory.protocol(tls_factory, _Plaintext(self))
        self._tls.makeConnection(self.transport)
        self._resume_client()
        if self._tls is not None and self._state == "handshake":
            self._tls.dataReceived(hello)

    def _handshake_completed(self):
        if self._state != "handshake":
            return
        self._state = "connecting"
        self._connect(self._endpoint)
        self._endpoint = None

    def _plaintext(self, data):
        if self._state == "splice":
            self._upstream.transport.write(data)
        elif self._state != "closed":
            self._pending.append(data)
            self._pause_client()

    # -- 3b. upstream ------------------------------------------------------------

    def _connect(self, endpoint):
        try:
            d = endpoint.connect(_UpstreamFactory(self))
        except Exception as e:
            d = defer.fail(e)
        self._connecting = d
        d.addCallbacks(self._connected, self._connect_failed)
        d.addErrback(self._internal_error)

    def _connect_failed(self, failure):
        self._connecting = None
        if self._state == "closed" or failure.check(defer.CancelledError):
            return
        self._fail(f"cannot open a stream to tunnel {self.tunnel_id}: {_reason_text(failure)}")

    def _connected(self, upstream):
        self._connecting = None
        if self._state == "closed":
            # The client went away while the stream was being opened.
            upstream.transport.loseConnection()
            return
        self._cancel_timers()
        self._state = "splice"
        self._upstream = upstream
        if self._pending:
            data = b"".join(self._pending)
            self._pending = []
            upstream.transport.write(data)
        # Back-pressure both ways: the upstream throttles the client socket,
        # the client side (TLS layer or socket) throttles the upstream.
        self._resume_client()
        # Proxies, so that a side going away never stopProducing()s the other:
        # closing is ours to do (it must flush the TLS layer first).
        self._client_consumer = self._tls if self._tls is not None else self.transport
        self._client_consumer.registerProducer(_Throttle(upstream.transport), True)
        upstream.transport.registerProducer(_Throttle(self.transport), True)

    def _upstream_data(self, data):
        if self._client_consumer is not None:
            self._client_consumer.write(data)

    def _upstream_lost(self, transport):
        self._unlinger(transport)
        if self._state == "closed":
            return
        self._state = "closed"
        self._upstream = None
        self._cancel_timers()
        self._close_client()

    # -- 4. closing -------------------------------------------------------------

    def _client_gone(self, reason):
        """The client connection is gone (socket closed, TLS failed)."""
        state, self._state = self._state, "closed"
        self._cancel_timers()
        if state == "closed":
            return
        if state == "handshake":
            self._log("TLS handshake failed: {reason}", reason=_reason_text(reason))
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.cancel()
        self._close_upstream()

    def _close_upstream(self):
        upstream, self._upstream = self._upstream, None
        if upstream is None or upstream.transport is None:
            return
        transport = upstream.transport
        try:
            transport.unregisterProducer()
        except Exception:
            pass
        transport.loseConnection()
        if not getattr(transport, "disconnected", False):
            self._linger(transport)

    def _close_client(self, abort=False):
        consumer, self._client_consumer = self._client_consumer, None
        if consumer is not None:
            consumer.unregisterProducer()
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        if self._tls is not None:
            if abort:
                self._tls.abortConnection()
            else:
                # Flushes pending writes and sends close_notify; do not wait
                # for the client's close_notify in return (as Node does not).
                self._tls.loseConnection()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()
            self._linger(self.transport)

    def _refuse(self, message):
        """Close before the TLS handshake completes: the client sees a reset/EOF."""
        if self._state != "closed":
            self.factory.refused += 1
        self._fail(message)

    def _fail(self, message, abort=False, level="info"):
        if self._state == "closed":
            return
        self._log(message, level=level)
        self._state = "closed"
        self._cancel_timers()
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.cancel()
        self._close_upstream()
        self._close_client(abort=abort)

    def _expired(self, message, seconds):
        self._fail(message.format(t=seconds), abort=True)

    def _internal_error(self, failure):
        self._fail(f"internal error: {_reason_text(failure)}", abort=True, level="error")


@implementer(IPushProducer)
class _Throttle:
    """Pause/resume reading of a transport for its peer; never stops it."""

    def __init__(self, transport):
        self.transport = transport

    def pauseProducing(self):
        if not getattr(self.transport, "disconnected", False):
            self.transport.pauseProducing()

    def resumeProducing(self):
        if not getattr(self.transport, "disconnected", False):
            self.transport.resumeProducing()

    def stopProducing(self):
        pass


@implementer(IHandshakeListener)
class _Plaintext(Protocol):
    """The decrypted side of a terminated TLS session."""

    def __init__(self, owner):
        self.owner = owner

    def handshakeCompleted(self):
        self.owner._handshake_completed()

    def dataReceived(self, data):
        self.owner._plaintext(data)

    def connectionLost(self, reason):
        owner, self.owner = self.owner, None
        if owner is not None:
            owner._client_gone(reason)


class _Upstream(Protocol):
    def __init__(self, owner):
        self.owner = owner

    def dataReceived(self, data):
        self.owner._upstream_data(data)

    def connectionLost(self, reason):
        owner, self.owner = self.owner, None
        if owner is not None:
            owner._upstream_lost(self.transport)


class _UpstreamFactory(Factory):
    noisy = False

    def __init__(self, owner):
        self.owner = owner

    def buildProtocol(self, addr):
        return _Upstream(self.owner)
