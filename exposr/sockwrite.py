"""Writing to a TCP socket now instead of at the next reactor turn; the read size of relayed sockets; TCP_NODELAY.

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

Gathering the WebSocket frames of one poll round into one ``send`` (at the
end of the round, before the reactor waits again) was measured and left
out: it cut the system calls per request by a third and the CPU per
request of both ends (the client's by a third), but the frames waited for
the rest of the round, the other end started later, and on a 2-core machine
at 10 and 50 connections 8-12% fewer requests per second went through
(bench/http_bench.py --target nginx --syscalls).
"""

from exposr.compat.twisted import write_now  # noqa: F401  (the same function: no extra call)

__all__ = ["write_now", "no_delay", "RELAY_READ_SIZE", "relay_reads"]

# Bytes per read of a socket whose bytes go on as ws-multiplex DATA messages:
# the message (16-byte header) in its WebSocket frame (a head of at most 8
# bytes below 64 KiB, masked or not) is then at most 65,536 bytes, the size
# of one read (Twisted's bufferSize) on the other end of the WebSocket. With
# Twisted's own 65,536 every frame was 30 bytes over: each read of the
# receiver ended inside a frame, which waited for the next read and was
# joined with its tail (a copy of the whole frame) before it went on.
RELAY_READ_SIZE = 65536 - 16 - 8


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
