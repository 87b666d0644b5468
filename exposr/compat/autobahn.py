"""autobahn internals exposr relies on. Checked against autobahn 26.10.2.

`exposr.transport.wsframes.FastReceive` takes complete binary frames before
autobahn sees them, and hands everything else to autobahn's own parser:

* `autobahn_receive(protocol, data)`: ``WebSocketProtocol._dataReceived``,
  autobahn's frame parser for bytes read (bound here once, called as a
  plain function: no extra call);
* `compression(protocol)`: the negotiated permessage-deflate (private
  ``_perMessageCompress``), read once per connection;
* per read it checks the protocol's ``state``, ``data`` (autobahn's unparsed
  bytes), ``current_frame`` and ``inside_message`` (`RECEIVE_STATE`): public
  attribute names, but what they mean is autobahn's implementation;
* `xor_large(payload, mask)`: masking of large payloads with autobahn's NVX
  SIMD masker (its cffi module ``_nvx_xormasker``: ``nvx_xormask_new``,
  ``_set_impl``, ``_process``, ``_free``) run in place on a ``bytearray`` copy
  of the payload, which is the result (no copy back to ``bytes``).
  autobahn's own ``create_xor_masker(mask).process(data)``
  allocates a fresh zeroed cffi buffer per call, copies into it and out of
  it, and registers a finaliser: 33 µs for 64 KiB against 5.7 µs here, on
  every frame a download carries (the client masks it, the server unmasks
  it; `prefixed_xor_large` builds a client's masked frame, head and
  payload, in the same buffer). Without NVX, autobahn's masker
  (`create_xor_masker`);
* the fragment limits override ``onMessageBegin``/``onMessageFrameBegin``
  (autobahn calls them per message / per data frame it parses, with
  ``current_frame.opcode`` set) and close with ``_fail_connection`` (sends the
  close frame, sets ``failedByMe``: the message's data is no longer kept);
  the server's ``dropConnection``/``_closeConnection`` overrides rely on
  ``failedByMe`` and on ``_closeConnection(abort)`` being the one place the
  TCP connection is closed.

`exposr.transport.ws.TunnelWebSocket` keeps a smaller instance dict once a
WebSocket is open (docs/architecture.rst, "Memory") by knowing which of
autobahn's per-connection attributes only the opening handshake reads
(`HANDSHAKE_ONLY`), which start every connection with the same value
(`INITIAL_STATE`, made class attributes) and which stay equal for every
connection (`EQUAL_VALUES`); ``tests/test_compat.py`` checks that autobahn
still sets every one of them.

autobahn formats some debug log arguments before the logger decides whether
to emit them: ``pformat`` of its ~30 options on every new connection (about
a third of the server's CPU time for a WebSocket connect) and of the
transport details on every client handshake. Importing this module makes
``autobahn.websocket.protocol.pformat`` lazy (`LazyPformat`): the text is
made only if a debug line is written (``Timings.__str__``, its other user,
gets the text at once).
"""

import pprint

import autobahn.websocket.protocol as _protocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.xormasker import create_xor_masker

try:
    from _nvx_xormasker import ffi as _nvx_ffi
    from _nvx_xormasker import lib as _nvx_lib
except ImportError:  # pragma: no cover  (autobahn without its NVX build)
    _nvx_lib = None

CHECKED_AGAINST = "26.10.2"

HANDSHAKE_ONLY = frozenset((
    "http_request_data", "http_status_line", "http_headers", "http_request_uri", "http_request_path",
    "http_request_params", "http_request_host", "http_response_data", "_wskey", "websocket_origin",
    "websocket_protocols", "websocket_extensions", "_transport_details",
))
INITIAL_STATE = {
    "_perMessageCompress": None, "trackedTimings": None, "wasNotCleanReason": None,
    "localCloseCode": None, "localCloseReason": None, "remoteCloseCode": None, "remoteCloseReason": None,
    "openHandshakeTimeoutCall": None, "closeHandshakeTimeoutCall": None, "autoPingTimeoutCall": None,
    "autoPingPending": None, "autoPingPendingCall": None, "autoPingPendingSent": None,
    "websocket_protocol_in_use": None, "current_frame": None, "_drain_call": None,
    "triggered": False, "wasMaxFramePayloadSizeExceeded": False, "wasMaxMessagePayloadSizeExceeded": False,
    "closedByMe": False, "failedByMe": False, "droppedByMe": False, "wasClean": False,
    "wasServerConnectionDropTimeout": False, "wasOpenHandshakeTimeout": False,
    "wasCloseHandshakeTimeout": False, "wasServingFlashSocketPolicyFile": False, "inside_message": False,
    "registered": False, "_paused": False, "_closing": False, "autoPingPendingSeq": 0,
}
EQUAL_VALUES = {
    "_valid_events": ["message"], "_results": {"message": None}, "websocket_extensions_in_use": [],
    "websocket_version": 13,
}

RECEIVE_STATE = ("state", "data", "current_frame", "inside_message")

autobahn_receive = WebSocketProtocol._dataReceived


def compression(protocol):
    """The connection's permessage-compress state (None when not negotiated)."""
    return protocol._perMessageCompress


class LazyPformat:
    """``pprint.pformat(obj)``, made when the log line is formatted."""

    __slots__ = ("obj",)

    def __init__(self, obj, *args, **kwargs):
        self.obj = obj

    def __str__(self):
        return pprint.pformat(self.obj)

    __repr__ = __str__

    def __format__(self, spec):
        return format(str(self), spec)


_protocol.pformat = LazyPformat
# the one other user of the module's pformat, which must return a str
_protocol.Timings.__str__ = lambda self: pprint.pformat(self._timings)


_NVX_SSE2 = 2  # nvx_xormask_set_impl: 1 scalar, 2 SIMD (XOR_MASKER_SSE2)

if _nvx_lib is not None and all(hasattr(_nvx_lib, f) for f in (
        "nvx_xormask_new", "nvx_xormask_set_impl", "nvx_xormask_process", "nvx_xormask_free")):
    NVX_DIRECT = True

    def _xor_in_place(out, start, mask):
        """XOR ``out[start:]`` (a bytearray) with the 4-byte ``mask`` repeated, in place."""
        masker = _nvx_lib.nvx_xormask_new(mask)
        try:
            _nvx_lib.nvx_xormask_set_impl(masker, _NVX_SSE2)
            _nvx_lib.nvx_xormask_process(masker, _nvx_ffi.from_buffer(out) + start, len(out) - start)
        finally:
            _nvx_lib.nvx_xormask_free(masker)

    def xor_large(payload, mask):
        """``payload`` (bytes-like) XOR the 4-byte ``mask`` repeated (RFC 6455 5.3), as a new bytearray."""
        out = bytearray(payload)
        _xor_in_place(out, 0, mask)
        return out

    def prefixed_xor_large(prefix, payload, mask, lead=b""):
        """``prefix + xor_large(lead + payload, mask)``, built in one new bytearray
        (a masked frame: its head, then the masked message)."""
        out = bytearray(prefix)
        if lead:
            out += lead
        out += payload
        _xor_in_place(out, len(prefix), mask)
        return out

else:  # pragma: no cover
    NVX_DIRECT = False

    def xor_large(payload, mask):
        """``payload`` XOR the 4-byte ``mask`` repeated (autobahn's masker)."""
        return create_xor_masker(mask, len(payload)).process(payload)

    def prefixed_xor_large(prefix, payload, mask, lead=b""):
        """``prefix + xor_large(lead + payload, mask)``."""
        return prefix + xor_large(lead + payload, mask)
