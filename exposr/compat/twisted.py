"""Twisted internals exposr relies on. Checked against Twisted 26.10.0.

* `write_now` (the proxy's per-chunk writes) reads a TCP transport's own
  buffer state: ``dataBuffer``, ``_tempDataLen``, ``_writeDisconnected``
  (state of every ``abstract.FileDescriptor``) and ``_aborting`` (a
  ``tcp.Connection``'s: set by ``abortConnection``, after which nothing
  may be sent) and calls ``writeSomeData``.
  `WRITE_NOW_DIRECT` says, once at import, whether they are all there;
  without them every write takes the ordinary buffered path. (Each is still
  read with a default that means "buffered", as before.)
* `swap_protocol` (the shared port's front door) relies on a
  ``tcp.Connection`` reading its ``protocol`` attribute at every read and at
  the connection's end.
* `exposr.reactor` subclasses ``EPollReactor`` and uses ``_poller``,
  ``_selectables`` and ``_doReadOrWrite`` (`EPOLL_INTERNALS`).
"""

from twisted.internet import abstract, tcp

CHECKED_AGAINST = "26.10.0"

_BUFFER_STATE = ("dataBuffer", "_tempDataLen", "_writeDisconnected")


def _has_buffer_state():
    """Whether a file descriptor transport (`tcp.Connection` is one) has the state read by `write_now`."""
    probe = abstract.FileDescriptor(reactor=_NoReactor())  # sets its per-instance state; no I/O
    return (all(hasattr(probe, a) for a in _BUFFER_STATE) and hasattr(_Connection, "writeSomeData")
            and hasattr(_Connection, "_aborting"))


class _NoReactor:
    pass


_Connection = tcp.Connection
WRITE_NOW_DIRECT = _has_buffer_state()
EPOLL_INTERNALS = ("_poller", "_selectables", "_doReadOrWrite")

if WRITE_NOW_DIRECT:

    def write_now(transport, data):
        """``transport.write(data)``, sent at once when nothing is buffered.

        ``data`` may be any bytes-like object (a frame built in a
        ``bytearray``, a ``memoryview`` of one); what is left to buffer
        becomes ``bytes``, as a transport's ``write`` wants.
        """
        if (
            not isinstance(transport, _Connection)
            or getattr(transport, "_tempDataLen", 1)
            or getattr(transport, "dataBuffer", b"x")
            or not transport.connected
            or transport.disconnecting
            or getattr(transport, "_writeDisconnected", True)
            or transport._aborting
        ):
            transport.write(data if data.__class__ is bytes else bytes(data))
            return
        sent = transport.writeSomeData(data)
        if sent.__class__ is int:
            if sent == len(data):
                return
            data = data[sent:]
        # a partial send, or an error that Twisted's own write path reports
        transport.write(data if data.__class__ is bytes else bytes(data))

else:  # pragma: no cover  (a Twisted whose transports changed: the ordinary path)

    def write_now(transport, data):
        """``transport.write(data)`` (this Twisted's buffer state is unknown)."""
        transport.write(data if data.__class__ is bytes else bytes(data))


def swap_protocol(transport, old, new):
    """Let the reactor deliver ``transport``'s reads and end to ``new`` instead of ``old``.

    Only for a plain TCP connection whose protocol is ``old``; True if done.
    """
    if isinstance(transport, _Connection) and transport.protocol is old:
        transport.protocol = new
        return True
    return False


def clear_exit_signal(reactor):
    """Make twistd exit 0 after a shutdown begun by SIGTERM/SIGINT.

    twistd re-raises the signal that stopped the reactor once it returns, so
    the process status would show the signal. The reactor keeps that signal
    in ``_exitSignal`` (`twisted.internet.interfaces._ISupportsExitSignalCapturing`);
    reactors without it are left alone.
    """
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None
