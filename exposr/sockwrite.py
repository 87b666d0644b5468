"""Writing to a TCP socket now (or at the end of the poll round) instead of at the next reactor turn; TCP_NODELAY.

A Twisted TCP transport buffers every ``write`` until the reactor finds the
socket writable: an ``epoll_ctl`` to watch for writability, a reactor turn, a
``doWrite`` and another ``epoll_ctl``. On the proxy's hot paths (a response to
the public client, a request to the target, a WebSocket frame of either end)
the buffer is nearly always empty, so the bytes can go to the socket at once,
in the same order; what the socket does not take is buffered as usual.

This reads Twisted's own transport state, so `write_now` lives with the
other uses of Twisted internals (`exposr.compat.twisted`, which checks once at
import that the state is there); whenever it is not what it expects it takes
the ordinary buffered path.

The frames of a multiplexed WebSocket are written with `write_soon`: while
the reactor dispatches the events of one poll (`exposr.reactor.Reactor`
brackets them with `begin_round` / `end_round`), the frames written to one
connection are gathered in its buffer and leave with one system call when
the round ends, still before the reactor waits again. Ten requests read from
ten public connections in one poll then make one ``send`` on the tunnel's
WebSocket instead of ten. Outside a round (timers, other reactors, tests on a
`Clock`) `write_soon` is `write_now`.
"""

from twisted.logger import Logger

from exposr.compat.twisted import flush_batched, write_batched
from exposr.compat.twisted import write_now  # noqa: F401  (the same function: no extra call)

__all__ = ["write_now", "write_soon", "no_delay", "begin_round", "end_round", "RELAY_READ_SIZE", "relay_reads"]

# Bytes per read of a socket whose bytes go on as ws-multiplex DATA messages:
# the message (16-byte header) in its WebSocket frame (a head of at most 8
# bytes below 64 KiB, masked or not) is then at most 65,536 bytes, the size
# of one read (Twisted's bufferSize) on the other end of the WebSocket. With
# Twisted's own 65,536 every frame was 30 bytes over: each read of the
# receiver ended inside a frame, which waited for the next read and was
# joined with its tail (a copy of the whole frame) before it went on.
RELAY_READ_SIZE = 65536 - 16 - 8

log = Logger(namespace="exposr.sockwrite")

# the transports with gathered writes while a round is dispatched, else None
_batch = None


def write_soon(transport, data):
    """``transport.write(data)``: sent at the end of the poll round being
    dispatched (with the round's other writes to ``transport``), else now."""
    batch = _batch
    if batch is None:
        write_now(transport, data)
    else:
        write_batched(transport, data, batch)


def begin_round():
    """The reactor starts dispatching the events of one poll."""
    global _batch
    _batch = set()


def end_round():
    """The reactor has dispatched the events of the poll: send what was gathered."""
    global _batch
    batch, _batch = _batch, None
    if batch:
        for transport in batch:
            try:
                flush_batched(transport)
            except Exception:  # a write error is the transport's own to report; never the reactor's
                log.failure("flushing a batched write to {transport!r}", transport=transport)


def relay_reads(transport):
    """Read ``transport`` (a TCP socket relayed over ws-multiplex) `RELAY_READ_SIZE` bytes at a time."""
    if getattr(transport, "bufferSize", None) == 65536:  # a TCP transport with Twisted's default
        transport.bufferSize = RELAY_READ_SIZE


def no_delay(transport):
    """Set TCP_NODELAY where the transport is a TCP socket.

    A proxy's writes follow what its peers send: a response head, then its
    body a moment later; a window adjust; a small TLS record. With Nagle's
    algorithm the second small write waits until the first is acknowledged,
    and the receiver delays that ACK by up to 40 ms, so every hop that relays
    bytes as they come sets it.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except Exception:  # not a socket, or already closed
            pass
