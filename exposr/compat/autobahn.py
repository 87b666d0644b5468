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
* `create_xor_masker`: autobahn's (NVX-accelerated) masking for large
  payloads;
* the fragment limits override ``onMessageBegin``/``onMessageFrameBegin``
  (autobahn calls them per message / per data frame it parses, with
  ``current_frame.opcode`` set) and close with ``_fail_connection`` (sends the
  close frame, sets ``failedByMe``: the message's data is no longer kept);
  the server's ``dropConnection``/``_closeConnection`` overrides rely on
  ``failedByMe`` and on ``_closeConnection(abort)`` being the one place the
  TCP connection is closed.
"""

from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.xormasker import create_xor_masker  # noqa: F401

CHECKED_AGAINST = "26.10.2"

RECEIVE_STATE = ("state", "data", "current_frame", "inside_message")

autobahn_receive = WebSocketProtocol._dataReceived


def compression(protocol):
    """The connection's permessage-compress state (None when not negotiated)."""
    return protocol._perMessageCompress
