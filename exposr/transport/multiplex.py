"""
ws-multiplex, protocol version 2: framing and channel state machine (sans-I/O).

Wire-compatible with ``@exposr/ws-multiplex`` 1.4.0 as used by the original
exposrd and the exposr client (see docs/protocol.rst, "ws-multiplex").
This module does no I/O and imports nothing from Twisted; the server's
WebSocket binding and our Python client both drive it.

Framing
-------
`encode` builds one protocol message (16-byte big-endian header ``>HHIII``:
version, type, dst, src, length; then the payload). `decode` parses one and
returns a `Message` whose payload is a zero-copy ``memoryview`` slice.

The state machine
-----------------
One `Multiplexer` per WebSocket::

    mux = Multiplexer(send, role=SERVER, clock=reactor)

* ``send(data: bytes)`` must emit ``data`` as ONE binary WebSocket message.
  It must not deliver to the peer synchronously (a real WebSocket never
  does); `Multiplexer` keeps its own state consistent before calling it.
  ``send_parts(header, payload)`` (optional) does the same for a DATA
  message over `SMALL_DATA` bytes given in two parts (``payload`` bytes-like).
* ``mux.receive(message)`` is called with every incoming binary message
  (``bytes``, a ``bytearray`` the binding unmasked into, or a ``memoryview``
  of the bytes it read).
  Malformed input never raises (see "Leniency" below); exceptions raised by
  the binding's own callbacks do propagate.
* Timers: ``clock`` is anything with ``callLater(delay, f, *args)`` returning
  an object with ``cancel()`` -- the reactor in production,
  ``twisted.internet.task.Clock`` in tests (advance it to fire the 5 s open
  timeout and the 1 s close-ACK timeout). Each channel holds at most one
  timer at a time.

Channels (`Channel`) are created by ``mux.open_channel()`` (the opener: the
server towards the exposr client) or by an incoming OPEN (the acceptor: our
client), which calls ``mux.on_incoming(channel)`` after the ACK is sent.
The binding sets these callbacks on a channel (all default to no-ops):

* ``on_open()``       -- opener only: the peer ACKed; data written while
                         OPENING has already been flushed, in order.
* ``on_data(data)``   -- payload of one DATA message: ``bytes``, or for a
                         payload over `SMALL_DATA` of a message that is not
                         ``bytes``, a ``memoryview`` of it (not copied; the
                         memory is never reused).
* ``on_pause()`` / ``on_resume()`` -- the peer asked us to stop / restart
                         sending on this channel (once per state change);
                         the binding pauses / resumes the producer feeding
                         the channel. Writes while paused are buffered here
                         and flushed on RESUME, so nothing is lost.
* ``on_close(error)`` -- exactly once per channel, when its number is freed:
                         ``None`` for a clean end, else an error string
                         (`ERR_WSM_*` constants). For a peer CLOSE it fires
                         at once; for our own ``close()`` after the peer's
                         ACK or the 1 s timeout, with the error we passed.
                         Open failures: `ERR_WSM_OPEN_CHANNEL_TIMEOUT`,
                         `ERR_WSM_OPEN_CHANNEL_REJECTED` (peer's reason in
                         ``channel.peer_error``).

and calls ``write(data)``, ``close(error=None)``, ``pause()``, ``resume()``.

Channel numbers stay in lock-step with the peer's (the exposr client accepts
DATA only when both sides use the same number for a channel; docs/protocol.rst,
"Channels"): one counter per multiplexer, starting at ``first_channel`` (1),
advanced for every channel created locally or accepted, wrapping from 2**32-1
to 1 and skipping numbers still in use. The server role still consumes a
number for an OPEN from the peer (ACK, then CLOSE with
``ERR_WSM_OPEN_CHANNEL_REJECTED``) so both counters stay in lock-step.

``mux.teardown(error)`` ends every channel (``on_close(error)``), sends
nothing, and calls ``mux.on_teardown(error)`` once; the binding closes the
WebSocket there. A header version other than 2 tears down with
`ERR_WSM_UNSUPPORTED_PROTOCOL_VERSION`.

Leniency (documented decisions)
-------------------------------
* Messages shorter than 16 bytes and unknown types are ignored.
* The header ``length`` field is not checked: the payload is everything after
  byte 16, as the original receiver does. We always send it correctly.
* DATA is routed by ``dst`` alone; its ``src`` is not compared with the
  pairing (the exposr client does; we are lenient on receive).
* A DATA payload larger than ``max_payload`` (4 MiB) closes that channel with
  `ERR_WSM_MESSAGE_TOO_LARGE` (our own string); the data is dropped.
* DATA/PAUSE/RESUME/ACK for a channel that is not open (unknown or still
  OPENING) is answered with ``CLOSE(dst=src, src=0, ERR_WSM_CHANNEL_NOT_OPEN)``
  (nothing when ``src`` is 0). DATA for a channel we are closing is dropped.
* A CLOSE crossing our own CLOSE is ACKed; we then still wait for the ACK of
  ours (or 1 s), so neither side sees a message for an unknown channel.
* ``close()`` sends the data buffered by a PAUSE before the CLOSE, even while
  still paused (a CLOSE must follow all pending data of its channel).
* An ACK with ``src`` 0 for a channel we are opening names no channel of the
  peer: the open fails with `ERR_WSM_OPEN_CHANNEL_REJECTED` (nothing is sent).

Bounds: a refused OPEN holds its number (and a 1 s timer, ~800 bytes) until
the peer ACKs our CLOSE; with more than `MAX_REFUSED_OPENS` of them waiting,
the multiplexer tears down with `ERR_WSM_TOO_MANY_REFUSED_OPENS` (the exposr
client never opens channels towards the server).

Hot path: a DATA message costs one ``unpack_from``, one dict lookup and one
slice; outgoing DATA one ``pack`` and one concatenation per <= 64 KiB piece.
"""

import struct
from typing import NamedTuple

from exposr.errors import ChannelLimitError, TransportClosedError

__all__ = [
    "VERSION", "HEADER_SIZE", "DATA", "OPEN", "ACK", "CLOSE", "PAUSE", "RESUME",
    "SERVER", "CLIENT", "Message", "FrameError", "UnsupportedVersion",
    "ChannelLimit", "MultiplexerClosed", "encode", "decode",
    "Multiplexer", "Channel", "KeepAlive",
]

VERSION = 2
HEADER = struct.Struct(">HHIII")
HEADER_SIZE = HEADER.size  # 16

DATA = 1
OPEN = 2
ACK = 3
CLOSE = 4
PAUSE = 5
RESUME = 6
TYPE_NAMES = {DATA: "DATA", OPEN: "OPEN", ACK: "ACK", CLOSE: "CLOSE",
              PAUSE: "PAUSE", RESUME: "RESUME"}

SERVER = "server"  # opener towards the exposr client; refuses peer OPENs
CLIENT = "client"  # acceptor; reports peer OPENs through on_incoming

CHANNEL_MAX = 0xFFFFFFFF
MAX_CHANNELS = 65535
MAX_DATA_CHUNK = 64 * 1024
# DATA payloads up to this size are sent as one joined message even where the
# carrier takes parts (`Multiplexer(send_parts=...)`): a small concatenation
# costs less than the parts' path; above it, a payload that arrived as a view
# of a larger buffer goes on without a copy of its own; a received DATA
# message this large (a bytearray, unmasked in place) is delivered as a view
SMALL_DATA = 1024
DEFAULT_MAX_PAYLOAD = 4 * 1024 * 1024
OPEN_TIMEOUT = 5.0
CLOSE_TIMEOUT = 1.0
PING_INTERVAL = 10.0
PING_TIMEOUT = 20.0
MAX_REASON = 1024  # bytes of a peer's CLOSE reason kept in peer_error
# refused peer OPENs whose CLOSE the peer has not ACKed yet; one more tears
# the multiplexer down (a client opening channels to the server is hostile)
MAX_REFUSED_OPENS = 256

# error strings (CLOSE payloads and on_close values; docs/protocol.rst, "Error strings")
ERR_WS_PING_TIMEOUT = "ERR_WS_PING_TIMEOUT"
ERR_WS_SOCKET_CLOSED_UNEXPECTEDLY = "ERR_WS_SOCKET_CLOSED_UNEXPECTEDLY"
ERR_WS_SOCKED_CLOSED = "ERR_WS_SOCKED_CLOSED"  # (sic)
ERR_WSM_UNSUPPORTED_PROTOCOL_VERSION = "ERR_WSM_UNSUPPORTED_PROTOCOL_VERSION"
ERR_WSM_NO_CHANNELS = "ERR_WSM_NO_CHANNELS"
ERR_WSM_OPEN_CHANNEL_TIMEOUT = "ERR_WSM_OPEN_CHANNEL_TIMEOUT"
ERR_WSM_OPEN_CHANNEL_REJECTED = "ERR_WSM_OPEN_CHANNEL_REJECTED"
ERR_WSM_CHANNEL_NOT_OPEN = "ERR_WSM_CHANNEL_NOT_OPEN"
ERR_WSM_CHANNEL_CLOSED_BY_PEER = "ERR_WSM_CHANNEL_CLOSED_BY_PEER"
ERR_WSM_OPEN_CHANNEL_REUSE = "ERR_WSM_OPEN_CHANNEL_REUSE"
ERR_WSM_CHANNEL_MISMATCH = "ERR_WSM_CHANNEL_MISMATCH"
ERR_WSM_MESSAGE_TOO_LARGE = "ERR_WSM_MESSAGE_TOO_LARGE"  # ours, not in 1.4.0
ERR_WSM_TOO_MANY_REFUSED_OPENS = "ERR_WSM_TOO_MANY_REFUSED_OPENS"  # ours, not in 1.4.0

# errno-style code the exposr client's socket exposes for each error
ERROR_CODES = {
    ERR_WSM_NO_CHANNELS: "EMFILE",
    ERR_WSM_OPEN_CHANNEL_TIMEOUT: "ERR_SOCKET_CONNECTION_TIMEOUT",
    ERR_WSM_OPEN_CHANNEL_REJECTED: "ECONNREFUSED",
    ERR_WSM_CHANNEL_NOT_OPEN: "ERR_SOCKET_CLOSED",
    ERR_WSM_CHANNEL_CLOSED_BY_PEER: "ECONNRESET",
    ERR_WSM_OPEN_CHANNEL_REUSE: "EADDRINUSE",
}

# channel states
OPENING = "OPENING"
OPEN_STATE = "OPEN"
CLOSING = "CLOSING"
CLOSED = "CLOSED"

_pack = HEADER.pack
_unpack_from = HEADER.unpack_from


class Message(NamedTuple):
    type: int
    dst: int
    src: int
    payload: memoryview


class FrameError(ValueError):
    """A message that cannot be decoded."""


class UnsupportedVersion(FrameError):
    def __init__(self, version):
        super().__init__(ERR_WSM_UNSUPPORTED_PROTOCOL_VERSION, version)
        self.version = version


class ChannelLimit(ChannelLimitError):
    """``open_channel`` with 65535 channels in use (``ERR_WSM_NO_CHANNELS``)."""


class MultiplexerClosed(TransportClosedError):
    """``open_channel`` after ``teardown``; ``args[0]`` is the teardown error."""


def encode(type, dst, src, payload=b""):
    """One protocol message: the 16-byte header (version 2) + ``payload``."""
    return _pack(VERSION, type, dst, src, len(payload)) + payload


def decode(message):
    """
    Parse one message into a `Message`; the payload is a memoryview of
    ``message`` from byte 16 on (the ``length`` field is not trusted).

    Raises `FrameError` for fewer than 16 bytes, `UnsupportedVersion` for a
    version other than 2.
    """
    if len(message) < HEADER_SIZE:
        raise FrameError("short message", len(message))
    version, type, dst, src, _length = _unpack_from(message)
    if version != VERSION:
        raise UnsupportedVersion(version)
    return Message(type, dst, src, memoryview(message)[HEADER_SIZE:])


def _noop(*args):
    pass


_NOT_OPEN = ERR_WSM_CHANNEL_NOT_OPEN.encode()


class Channel:
    """
    One logical stream. ``id`` is our channel number, ``remote`` the peer's
    (0 until ACKed). ``state`` is OPENING, OPEN, CLOSING or CLOSED.
    ``paused``: we asked the peer to pause; ``peer_paused``: the peer asked us.
    ``error``: the value given to ``on_close``; ``peer_error``: the reason
    string of the peer's CLOSE, if any.
    """

    __slots__ = ("id", "remote", "state", "paused", "peer_paused", "error",
                 "peer_error", "on_open", "on_data", "on_close", "on_pause",
                 "on_resume", "_mux", "_timer", "_buffer", "_close_requested",
                 "_close_error")

    def __init__(self, mux, id, state):
        self._mux = mux
        self.id = id
        self.remote = 0
        self.state = state
        self.paused = False
        self.peer_paused = False
        self.error = None
        self.peer_error = None
        self.on_open = _noop
        self.on_data = _noop
        self.on_close = _noop
        self.on_pause = _noop
        self.on_resume = _noop
        self._timer = None
        # List of pending writes while OPENING or peer-paused, else None.
        self._buffer = [] if state is OPENING else None
        self._close_requested = False
        self._close_error = None

    def __repr__(self):
        return f"<Channel {self.id}<->{self.remote} {self.state}>"

    def write(self, data):
        """
        Send ``data`` as DATA messages of at most 64 KiB. Buffered while
        OPENING or while the peer has paused us; ignored once closing.
        """
        if not data:
            return
        if self._buffer is None:
            if self.state is OPEN_STATE:
                self._mux._send_data(self.remote, self.id, data)
        elif not self._close_requested:
            self._buffer.append(bytes(data))

    def close(self, error=None):
        """
        Send pending data, then CLOSE (with ``error`` as payload if given).
        While OPENING this happens on the ACK. ``on_close(error)`` follows
        on the peer's ACK or after 1 s. Idempotent.
        """
        state = self.state
        if state is OPEN_STATE:
            self._mux._close(self, error)
        elif state is OPENING and not self._close_requested:
            self._close_requested = True
            self._close_error = error

    def pause(self):
        """Ask the peer to stop sending (one PAUSE until `resume`)."""
        if self.paused or self.state is CLOSING or self.state is CLOSED:
            return
        self.paused = True
        if self.state is OPEN_STATE:
            self._mux._send(_pack(VERSION, PAUSE, self.remote, self.id, 0))

    def resume(self):
        """Let the peer send again (one RESUME after a `pause`)."""
        if not self.paused or self.state is CLOSING or self.state is CLOSED:
            return
        self.paused = False
        if self.state is OPEN_STATE:
            self._mux._send(_pack(VERSION, RESUME, self.remote, self.id, 0))


class Multiplexer:
    """
    The ws-multiplex state machine of one WebSocket (see module docstring).

    ``role`` is `SERVER` or `CLIENT`; ``clock`` provides ``callLater``.
    ``first_channel``, ``max_channels``, ``max_payload``, ``open_timeout``
    and ``close_timeout`` exist for tests and tuning.
    Callbacks: ``on_incoming(channel)``, ``on_teardown(error)``,
    ``on_warning(text)`` (protocol oddities worth a log line).
    """

    __slots__ = ("_send", "role", "_clock", "_next", "max_channels", "_max_message", "open_timeout",
                 "close_timeout", "_channels", "_by_remote", "_refused", "closed", "error",
                 "on_incoming", "on_teardown", "on_warning", "_send_parts")

    def __init__(self, send, *, role, clock, first_channel=1,
                 max_channels=MAX_CHANNELS, max_payload=DEFAULT_MAX_PAYLOAD,
                 open_timeout=OPEN_TIMEOUT, close_timeout=CLOSE_TIMEOUT, send_parts=None):
        if role not in (SERVER, CLIENT):
            raise ValueError(f"role must be {SERVER!r} or {CLIENT!r}")
        if not 1 <= first_channel <= CHANNEL_MAX:
            raise ValueError("first_channel out of range")
        self._send = send
        # send_parts(header, payload): one DATA message given as its 16-byte
        # header and its payload, for a carrier that frames both into one
        # buffer (one copy of the payload instead of a concatenation and then
        # the frame's); without it, send(header + payload)
        self._send_parts = send_parts
        self.role = role
        self._clock = clock
        self._next = first_channel
        self.max_channels = max_channels
        self._max_message = HEADER_SIZE + max_payload
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        self._channels = {}   # our number -> Channel
        self._by_remote = {}  # peer number -> Channel
        # our numbers of refused peer OPENs, until ACKed (a set once there is one)
        self._refused = _NO_REFUSED
        self.closed = False
        self.error = None
        self.on_incoming = None
        self.on_teardown = _noop
        self.on_warning = _noop

    # -- public ------------------------------------------------------------

    @property
    def channel_count(self):
        """Channel numbers in use (OPENING, OPEN or CLOSING)."""
        return len(self._channels)

    def get(self, channel_id):
        return self._channels.get(channel_id)

    @property
    def next_channel(self):
        """The number the next allocation tries first."""
        return self._next

    def open_channel(self):
        """
        Allocate the next number, send OPEN, return the OPENING `Channel`.
        Raises `ChannelLimit` (no message sent) or `MultiplexerClosed`.
        """
        if self.closed:
            raise MultiplexerClosed(self.error)
        n = self._allocate()
        ch = Channel(self, n, OPENING)
        self._channels[n] = ch
        ch._timer = self._clock.callLater(self.open_timeout,
                                          self._open_timed_out, ch)
        self._send(_pack(VERSION, OPEN, 0, n, 0))
        return ch

    def receive(self, message):
        """Process one incoming binary WebSocket message."""
        if len(message) < HEADER_SIZE or self.closed:
            return
        version, mtype, dst, src, _length = _unpack_from(message)
        if mtype == DATA and version == VERSION:
            ch = self._channels.get(dst)
            if ch is not None and ch.state is OPEN_STATE:
                n = len(message)
                if n > self._max_message:
                    self._close(ch, ERR_WSM_MESSAGE_TOO_LARGE)
                elif n > HEADER_SIZE:
                    # a large message unmasked into a bytearray, or a view of
                    # a read, goes on as a view (no copy); bytes are sliced
                    if message.__class__ is bytes:
                        ch.on_data(message[HEADER_SIZE:])
                    elif n <= SMALL_DATA:
                        ch.on_data(bytes(memoryview(message)[HEADER_SIZE:]))
                    else:
                        ch.on_data(memoryview(message)[HEADER_SIZE:])
                return
        if version != VERSION:
            self.on_warning(f"ws-multiplex: unsupported version {version}")
            self.teardown(ERR_WSM_UNSUPPORTED_PROTOCOL_VERSION)
            return
        handler = _HANDLERS.get(mtype)
        if handler is not None:
            handler(self, dst, src, message)

    def teardown(self, error=None):
        """
        End every channel with ``on_close(error)`` (channels we were already
        closing get their own close error), send nothing, refuse further
        opens, ignore further input, call ``on_teardown(error)``. Idempotent.
        """
        if self.closed:
            return
        self.closed = True
        self.error = error
        channels = list(self._channels.values())
        self._channels.clear()
        self._by_remote.clear()
        self._refused = _NO_REFUSED
        for ch in channels:
            if ch._timer is not None:
                ch._timer.cancel()
                ch._timer = None
            ch.error = ch._close_error if ch.state is CLOSING else error
            ch.state = CLOSED
            ch._buffer = None
        for ch in channels:
            ch.on_close(ch.error)
        self.on_teardown(error)

    # -- internals ---------------------------------------------------------

    def _allocate(self):
        channels = self._channels
        if len(channels) >= self.max_channels:
            raise ChannelLimit(ERR_WSM_NO_CHANNELS)
        n = self._next
        while n in channels:
            n = n + 1 if n < CHANNEL_MAX else 1
        self._next = n + 1 if n < CHANNEL_MAX else 1
        return n

    def _send_data(self, dst, src, data):
        n = len(data)
        parts = self._send_parts
        if n <= MAX_DATA_CHUNK:
            if parts is None or n <= SMALL_DATA:
                self._send(_pack(VERSION, DATA, dst, src, n) + data)
            else:
                parts(_pack(VERSION, DATA, dst, src, n), data)
            return
        view = memoryview(data)
        for i in range(0, n, MAX_DATA_CHUNK):
            chunk = view[i:i + MAX_DATA_CHUNK]
            if parts is None:
                self._send(_pack(VERSION, DATA, dst, src, len(chunk)) + chunk)
            else:
                parts(_pack(VERSION, DATA, dst, src, len(chunk)), chunk)

    def _not_open(self, src):
        if src:
            self._send(_pack(VERSION, CLOSE, src, 0, len(_NOT_OPEN)) + _NOT_OPEN)

    def _reject(self, src, error):
        payload = error.encode()
        self._send(_pack(VERSION, CLOSE, src, 0, len(payload)) + payload)

    def _close(self, ch, error):
        """OPEN -> CLOSING: flush pending data, send CLOSE, start 1 s timer."""
        pending = ch._buffer
        ch._buffer = None
        ch.state = CLOSING
        ch._close_error = error
        ch._timer = self._clock.callLater(self.close_timeout,
                                          self._close_timed_out, ch)
        if pending:
            for data in pending:
                self._send_data(ch.remote, ch.id, data)
        payload = error.encode() if error else b""
        self._send(_pack(VERSION, CLOSE, ch.remote, ch.id, len(payload))
                   + payload)

    def _free(self, ch, error):
        if ch._timer is not None:
            ch._timer.cancel()
            ch._timer = None
        ch.state = CLOSED
        ch._buffer = None
        ch.error = error
        self._channels.pop(ch.id, None)
        if ch.remote and self._by_remote.get(ch.remote) is ch:
            del self._by_remote[ch.remote]
        if self._refused:
            self._refused.discard(ch.id)
        ch.on_close(error)

    def _open_timed_out(self, ch):
        ch._timer = None
        if ch.state is OPENING:
            self._free(ch, ERR_WSM_OPEN_CHANNEL_TIMEOUT)

    def _close_timed_out(self, ch):
        ch._timer = None
        if ch.state is CLOSING:
            self._free(ch, ch._close_error)

    # -- message handlers (dst, src, message) ------------------------------

    def _on_data(self, dst, src, message):
        # Only reached when the fast path in receive() did not deliver.
        ch = self._channels.get(dst)
        if ch is None or ch.state is OPENING:
            self._not_open(src)
        # CLOSING: data crossing our CLOSE; dropped.

    def _on_open(self, dst, src, message):
        if src == 0:
            self.on_warning("ws-multiplex: OPEN with src 0 ignored")
            return
        old = self._by_remote.get(src)
        if old is not None:
            if old.state is not CLOSING:
                self._reject(src, ERR_WSM_OPEN_CHANNEL_REUSE)
                return
            # The peer reused a number we were closing: it has freed it, so
            # take the OPEN as the missing ACK.
            self._free(old, old._close_error)
        refuse = self.role == SERVER or self.on_incoming is None
        if refuse and len(self._refused) >= MAX_REFUSED_OPENS:
            self.on_warning(f"ws-multiplex: more than {MAX_REFUSED_OPENS} refused OPENs unacknowledged")
            self.teardown(ERR_WSM_TOO_MANY_REFUSED_OPENS)
            return
        try:
            n = self._allocate()
        except ChannelLimit:
            self._reject(src, ERR_WSM_NO_CHANNELS)
            return
        ch = Channel(self, n, OPEN_STATE)
        ch.remote = src
        self._channels[n] = ch
        self._by_remote[src] = ch
        self._send(_pack(VERSION, ACK, src, n, 0))
        if n != src:
            self.on_warning(f"ws-multiplex: accepted peer channel {src} as "
                            f"{n}; numbering out of lock-step")
        if refuse:
            # Consume the number (both counters stay in lock-step), then refuse.
            if self._refused is _NO_REFUSED:
                self._refused = set()
            self._refused.add(n)
            self._close(ch, ERR_WSM_OPEN_CHANNEL_REJECTED)
        else:
            self.on_incoming(ch)

    def _on_ack(self, dst, src, message):
        ch = self._channels.get(dst)
        if ch is None:
            self._not_open(src)
            return
        state = ch.state
        if state is CLOSING:
            self._free(ch, ch._close_error)
            return
        if state is not OPENING:
            return  # duplicate ACK
        if not src:
            # names no channel of the peer: we could never address it
            self.on_warning(f"ws-multiplex: channel {dst} ACKed with src 0; open failed")
            self._free(ch, ERR_WSM_OPEN_CHANNEL_REJECTED)
            return
        if ch._timer is not None:
            ch._timer.cancel()
            ch._timer = None
        if src != dst:
            self.on_warning(f"ws-multiplex: channel {dst} ACKed with src "
                            f"{src}; the exposr client will drop our DATA")
        ch.remote = src
        self._by_remote[src] = ch
        ch.state = OPEN_STATE
        pending = ch._buffer
        ch._buffer = None
        if ch._close_requested:
            ch._buffer = pending
            self._close(ch, ch._close_error)
            return
        if ch.paused:
            self._send(_pack(VERSION, PAUSE, src, dst, 0))
        for data in pending:
            self._send_data(src, dst, data)
        if ch.state is OPEN_STATE:
            ch.on_open()

    def _on_close(self, dst, src, message):
        if src:
            self._send(_pack(VERSION, ACK, src, dst, 0))
        ch = self._channels.get(dst)
        if ch is None:
            return
        state = ch.state
        if state is CLOSING and src:
            return  # crossing CLOSEs: ACKed; wait for the ACK of ours
        reason = None
        if len(message) > HEADER_SIZE:
            reason = bytes(message[HEADER_SIZE:HEADER_SIZE + MAX_REASON]
                           ).decode("utf-8", "replace")
        ch.peer_error = reason
        if state is OPENING:
            error = ERR_WSM_OPEN_CHANNEL_REJECTED
        elif state is CLOSING:
            error = ch._close_error
        else:
            error = ERR_WSM_CHANNEL_CLOSED_BY_PEER if reason else None
        self._free(ch, error)

    def _on_pause(self, dst, src, message):
        ch = self._channels.get(dst)
        if ch is None or ch.state is OPENING:
            self._not_open(src)
        elif ch.state is OPEN_STATE and not ch.peer_paused:
            ch.peer_paused = True
            if ch._buffer is None:
                ch._buffer = []
            ch.on_pause()

    def _on_resume(self, dst, src, message):
        ch = self._channels.get(dst)
        if ch is None or ch.state is OPENING:
            self._not_open(src)
        elif ch.state is OPEN_STATE and ch.peer_paused:
            ch.peer_paused = False
            pending = ch._buffer
            ch._buffer = None
            for data in pending:
                self._send_data(ch.remote, ch.id, data)
            ch.on_resume()


# message type -> Multiplexer method (one table, not one per multiplexer)
_HANDLERS = {
    DATA: Multiplexer._on_data, OPEN: Multiplexer._on_open, ACK: Multiplexer._on_ack,
    CLOSE: Multiplexer._on_close, PAUSE: Multiplexer._on_pause, RESUME: Multiplexer._on_resume,
}
# the empty ``_refused`` of every multiplexer that never refused an OPEN
_NO_REFUSED = frozenset()


class KeepAlive:
    """
    Keep-alive bookkeeping: the binding pings every `PING_INTERVAL` seconds,
    calls ``pong(now)`` on every pong and, at each ping tick, tears the
    multiplexer down with `ERR_WS_PING_TIMEOUT` when ``expired(now)``.
    """

    __slots__ = ("threshold", "last_pong")

    def __init__(self, now, threshold=PING_TIMEOUT):
        self.threshold = threshold
        self.last_pong = now

    def pong(self, now):
        self.last_pong = now

    def expired(self, now):
        return now - self.last_pong >= self.threshold
