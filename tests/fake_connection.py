"""An in-memory `ITunnelConnection` and connection registry, for protocol tests.

`FakeTunnelConnection` is a reference implementation of the contract in
`tests.connection_contract` (it runs that suite in
`tests.test_connection_contract`) and the upstream side of the ingress tests.
Nothing happens behind the test's back: every byte, pause, resume and close
crossing the "tunnel" waits in one FIFO queue until ``pump()``, so the order of
events is the order they were caused in, as over a real transport.

* ``conn.open_stream(factory)``: a Deferred firing at the next ``pump()`` with
  the factory's protocol, connected to a `FakeStreamTransport`; the far end of
  the stream (`FarStream`) is appended to ``conn.far_streams`` at that moment.
  Fails at once with ``conn.open_error`` when that is set (e.g.
  ``StreamRefusedError(...)``), with `ChannelLimitError` when
  ``conn.max_streams`` streams are open, with `TransportClosedError` once the
  connection is gone.
* ``conn.disconnect(reason)`` (server side) and ``conn.drop()`` (the client
  drops its connection) end every stream: the server-side protocols get
  ``connectionLost(ConnectionLost)`` at once, the far ends are closed.
"""

import itertools

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.python.failure import Failure
from zope.interface import implementer

from exposr import errors
from exposr.interfaces import ITunnelConnection

_ids = itertools.count(1)


@implementer(ITransport, IConsumer, IPushProducer)
class FakeStreamTransport:
    """The server side of one fake stream: what an ingress protocol sees."""

    def __init__(self, conn, far):
        self.conn = conn
        self.far = far
        self.protocol = None
        self.producer = None
        self.disconnecting = False
        self.disconnected = False
        self.far_paused = False  # the far end stopped consuming
        self.paused = False  # we asked the far end to stop sending

    # ITransport
    def write(self, data):
        if data and not self.disconnecting:
            data = bytes(data)
            self.conn._queue(lambda: self.far._deliver(data))

    def writeSequence(self, seq):
        self.write(b"".join(seq))

    def loseConnection(self):
        if not self.disconnecting:
            self.disconnecting = True
            self.conn._queue(self._closed_by_us)

    def abortConnection(self):
        self.loseConnection()

    def _closed_by_us(self):
        self.far._end()
        self.lost(None)

    def getPeer(self):
        return IPv4Address("TCP", self.conn.peer, 4321)

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 8080)

    def setTcpNoDelay(self, enabled):
        pass

    # IConsumer
    def registerProducer(self, producer, streaming):
        self.producer = producer
        if self.far_paused:
            producer.pauseProducing()

    def unregisterProducer(self):
        self.producer = None

    # IPushProducer
    def pauseProducing(self):
        if not self.disconnected and not self.paused:
            self.paused = True
            self.conn._queue(lambda: self.far._set_producer_paused(True))

    def resumeProducing(self):
        if not self.disconnected and self.paused:
            self.paused = False
            self.conn._queue(lambda: self.far._set_producer_paused(False))

    def stopProducing(self):
        self.loseConnection()

    # events from the far end
    def _far_pause(self, paused):
        if self.disconnected or self.far_paused == paused:
            return
        self.far_paused = paused
        if self.producer is not None:
            (self.producer.pauseProducing if paused else self.producer.resumeProducing)()

    def _data(self, data):
        if not self.disconnected:
            self.protocol.dataReceived(data)

    def lost(self, why):
        """The stream is gone: ``why`` None for a clean end, else an error text."""
        if self.disconnected:
            return
        self.disconnected = self.disconnecting = True
        self.producer = None
        self.conn._streams.discard(self)
        reason = error.ConnectionDone() if why is None else error.ConnectionLost(why)
        self.protocol.connectionLost(Failure(reason))


class FarStream:
    """The tunnel client's end of one fake stream (the harness's far stream handle)."""

    def __init__(self, conn):
        self.conn = conn
        self.server = None  # the FakeStreamTransport
        self.chunks = []
        self.closed = False
        self.producer_paused = False
        self._paused = False

    @property
    def received(self):
        return b"".join(self.chunks)

    def write(self, data):
        if not self.closed:
            data = bytes(data)
            self.conn._queue(lambda: self.server._data(data))

    def close(self):
        if not self.closed:
            self.closed = True
            self.conn._queue(lambda: self.server.lost(None))

    def pause(self):
        if not self._paused:
            self._paused = True
            self.conn._queue(lambda: self.server._far_pause(True))

    def resume(self):
        if self._paused:
            self._paused = False
            self.conn._queue(lambda: self.server._far_pause(False))

    def _deliver(self, data):
        if not self.closed:
            self.chunks.append(data)

    def _end(self):
        self.closed = True

    def _set_producer_paused(self, paused):
        if not self.closed:
            self.producer_paused = paused


@implementer(ITunnelConnection)
class FakeTunnelConnection:
    local = True

    def __init__(self, tunnel_id="fake", peer="192.0.2.7", node_id="node-a", registry=None):
        self.tunnel_id = tunnel_id
        self.peer = peer
        self.connection_id = f"{node_id}:fake-{next(_ids)}"
        self.registry = registry
        self.far_streams = []
        self.open_error = None
        self.max_streams = None
        self.closed = False
        self.opened = 0  # open_stream calls that got a stream
        self._events = []
        self._streams = set()

    def _queue(self, thunk):
        self._events.append(thunk)

    def pump(self):
        """Deliver everything queued (and what that causes) until quiet."""
        while self._events:
            events, self._events = self._events, []
            for thunk in events:
                thunk()

    # ITunnelConnection
    def open_stream(self, protocolFactory):
        if self.closed:
            return defer.fail(errors.TransportClosedError("connection closed"))
        if self.open_error is not None:
            return defer.fail(self.open_error)
        if self.max_streams is not None and len(self._streams) >= self.max_streams:
            return defer.fail(errors.ChannelLimitError("ERR_WSM_NO_CHANNELS"))
        far = FarStream(self)
        transport = FakeStreamTransport(self, far)
        far.server = transport
        self._streams.add(transport)
        self.opened += 1
        d = defer.Deferred()

        def accepted():
            if transport.disconnected:  # the connection went away meanwhile
                d.errback(errors.TransportClosedError("connection closed"))
                return
            self.far_streams.append(far)
            protocol = protocolFactory.buildProtocol(transport.getPeer())
            transport.protocol = protocol
            protocol.makeConnection(transport)
            d.callback(protocol)

        self._queue(accepted)
        return d

    def disconnect(self, reason="disconnected"):
        self._end(reason)

    def drop(self):
        """The tunnel client drops its connection."""
        self._end("ERR_WS_SOCKET_CLOSED_UNEXPECTEDLY")

    def _end(self, why):
        if self.closed:
            return
        self.closed = True
        for transport in list(self._streams):
            transport.far._end()
            if transport.protocol is None:
                transport.disconnected = True  # still opening: the open fails
                self._streams.discard(transport)
            else:
                transport.lost(why)
        if self.registry is not None:
            self.registry.unregister(self)


class FakeRegistry:
    """The part of `exposr.connections.ConnectionRegistry` the transports and the ingress use."""

    def __init__(self):
        self.connections = {}  # tunnel id -> [connection]
        self.registered = []
        self.unregistered = []
        self.refuse = False
        self._listeners = []

    def add(self, conn):
        """Make ``conn`` a live connection of its tunnel (what a successful register does)."""
        self.connections.setdefault(conn.tunnel_id, []).append(conn)
        if isinstance(conn, FakeTunnelConnection):
            conn.registry = self
        self._changed(conn.tunnel_id)
        return conn

    def register(self, conn, account_id):
        self.registered.append((conn, account_id))
        if self.refuse:
            return defer.succeed(False)
        self.connections.setdefault(conn.tunnel_id, []).append(conn)
        self._changed(conn.tunnel_id)
        return defer.succeed(True)

    def unregister(self, conn):
        self.unregistered.append(conn)
        conns = self.connections.get(conn.tunnel_id, [])
        if conn in conns:
            conns.remove(conn)
            self._changed(conn.tunnel_id)

    def connection_for(self, tunnel_id):
        conns = self.connections.get(tunnel_id)
        return conns[0] if conns else None

    def is_connected(self, tunnel_id):
        return bool(self.connections.get(tunnel_id))

    def has_local(self, tunnel_id):
        return self.is_connected(tunnel_id)

    def remote_nodes(self, tunnel_id):
        return []

    def on_change(self, callback):
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def _changed(self, tunnel_id):
        for callback in list(self._listeners):
            callback(tunnel_id)
