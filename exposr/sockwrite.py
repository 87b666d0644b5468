"""Writing to a TCP socket now instead of at the next reactor turn.

A Twisted TCP transport buffers every ``write`` until the reactor finds the
socket writable: an ``epoll_ctl`` to watch for writability, a reactor turn, a
``doWrite`` and another ``epoll_ctl``. On the proxy's hot paths (a response to
the public client, a request to the target) the buffer is nearly always empty,
so the bytes can go to the socket at once, in the same order; what the socket
does not take is buffered as usual.

This reads Twisted's own transport state (``dataBuffer``, ``_tempDataLen``);
whenever that is not what it expects it takes the ordinary buffered path.
"""

from twisted.internet import tcp


def write_now(transport, data):
    """``transport.write(data)``, sent at once when nothing is buffered."""
    if (
        not isinstance(transport, tcp.Connection)
        or getattr(transport, "_tempDataLen", 1)
        or getattr(transport, "dataBuffer", b"x")
        or not transport.connected
        or transport.disconnecting
        or getattr(transport, "_writeDisconnected", True)
    ):
        transport.write(data)
        return
    sent = transport.writeSomeData(data)
    if sent.__class__ is int:
        if sent == len(data):
            return
        data = data[sent:]
    # a partial send, or an error that Twisted's own write path reports
    transport.write(data)


class TurnWriter:
    """Bytes written during one reactor turn, sent with one ``send`` after it.

    A Twisted TCP transport's ``write`` costs an ``epoll_ctl`` to watch for
    writability, a reactor turn to find the socket writable, ``doWrite`` and
    another ``epoll_ctl``. Here the writes of one turn (every event the
    reactor dispatched) are kept and, right after the turn, sent at once
    (`write_now`): the same batching, none of the writability round trip.
    Whatever the socket does not take goes to the transport as usual.

    Anything else that writes to the transport must call `flush` first (so
    the order is kept), and so must whatever closes it. Transports other than
    Twisted's TCP connections (TLS, test transports) are written at once.

    Used by the server's WebSocket only. On the client (measured) it made the
    server slower at 50 connections: Twisted's write, sent when the next poll
    finds the socket writable, also takes the responses of targets that poll
    finds readable, so the server gets fewer, larger reads.
    """

    __slots__ = ("transport", "parts", "call", "reactor")

    def __init__(self, transport):
        self.transport = transport
        self.parts = []
        self.call = None
        self.reactor = transport.reactor if isinstance(transport, tcp.Connection) else None

    def write(self, header, payload):
        if self.reactor is None:
            self.transport.writeSequence((header, payload))
            return
        parts = self.parts
        parts.append(header)
        parts.append(payload)
        if self.call is None:
            self.call = self.reactor.callLater(0, self._turn_ended)

    def _turn_ended(self):
        self.call = None
        self.flush()

    def flush(self):
        parts = self.parts
        if parts:
            self.parts = []
            write_now(self.transport, b"".join(parts))
