"""Writing to a TCP socket now instead of at the next reactor turn; TCP_NODELAY.

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
"""

from exposr.compat.twisted import write_now  # noqa: F401  (the same function: no extra call)

__all__ = ["write_now", "no_delay"]


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
