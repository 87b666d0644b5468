"""RFC 6455 frames on the hot path, shared by the server (`exposr.transport.ws`)
and the client (`exposr.client.connect`).

autobahn costs ~10 calls, a masker object and a signal per message (and
formats debug-log arguments per read and per send). Both ends only carry
ws-multiplex messages as single binary frames, so:

* `FastReceive.dataReceived` hands complete, unfragmented binary frames with
  the expected masking (client->server frames masked, server->client frames
  not) straight to the multiplexer; everything else is autobahn's, handed
  over one complete frame at a time (autobahn copies its whole buffer for
  every frame it parses: a read of 10,000 tiny frames given at once cost
  10,000 copies of up to 64 KiB).
* Fragmented messages are capped: `MAX_FRAGMENTS` frames per message (close
  1009, as for a message over the size limit) and `MAX_FRAGMENTS_PER_SECOND`
  continuation frames per connection (close 1008): autobahn keeps ~50 bytes
  per fragment, and an empty fragment never counts towards the message-size
  limit.
* `binary_frame` (server: unmasked) and `masked_binary_frame` (client: a fresh
  key per frame, as autobahn's own) build one frame without autobahn;
  `binary_frame_parts` and ``masked_binary_frame(data, lead)`` build the frame
  of a ws-multiplex DATA message from its header and its payload with one
  copy of the payload (a download's 64 KiB chunks: the concatenation, and the
  masked frame's copy back to ``bytes``, cost two more copies per chunk).
  A large frame is a ``bytearray``, and a large masked payload is unmasked
  into one (`xor_mask`), which the multiplexer passes on as a view; a large
  unmasked payload (the client's side) goes on as a view of the read.

Each end sends a frame the moment the message exists (`FastSend`, with
`exposr.sockwrite.write_now`),
not at the end of the reactor turn: measured on one 2-core machine at 10
connections, coalescing a turn's frames into one send made every stage wait
for the whole batch (the server's requests, then the client's, in convoy) and
cost ~20% of the requests per second; at 50 connections immediate sends were
still ahead. Sending a poll round's frames together at the end of the round
(not the next turn) cost 8-12% (`exposr.sockwrite`).
"""

import struct
from random import getrandbits

from exposr.compat.autobahn import autobahn_receive, compression, prefixed_xor_large, xor_large
from exposr.sockwrite import write_now

# up to this payload size, XOR with Python ints beats NVX's set-up (`xor_large`:
# 1.4 µs at any size up to 512 bytes; the ints 1.1 µs at 256, 1.7 at 512)
SMALL_XOR = 384

# an unmasked frame's payload over this size (a client's large DATA message)
# is handed on as a view of the read, not a copy (the multiplexer passes a
# view of its payload on: `exposr.transport.multiplex.SMALL_DATA`)
VIEW_MIN = 1024

# Frames of one fragmented message. The Node client sends every message as 2
# frames (header, then payload), ours as 1; an RFC client fragmenting a 4 MiB
# message at 4 KiB needs 1024. Over it: close 1009.
MAX_FRAGMENTS = 1024
# Continuation frames per connection per second (checked once per this many
# frames: this many within less than a second closes with 1008). The Node
# client sends one per message; one exposrd process routes ~10,000 requests/s
# (bench/http_bench.py), a few messages each, over all its tunnels.
MAX_FRAGMENTS_PER_SECOND = 20_000

_HEAD_SHORT = [bytes((0x82, n)) for n in range(126)]
_pack_head16 = struct.Struct("!BBH").pack
_pack_head64 = struct.Struct("!BBQ").pack
_pack_masked_short = struct.Struct("!BBI").pack
_pack_masked16 = struct.Struct("!BBHI").pack
_pack_masked64 = struct.Struct("!BBQI").pack


def xor_mask(payload, mask):
    """RFC 6455 5.3: ``payload`` XOR the 4-byte ``mask`` repeated (masks and unmasks).

    ``bytes`` up to `SMALL_XOR` bytes, a new ``bytearray`` above (no copy back).
    """
    n = len(payload)
    if n <= SMALL_XOR:
        key = (mask * ((n >> 2) + 1))[:n]
        return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")
    return xor_large(payload, mask)


def binary_frame(data):
    """An unmasked FIN+binary frame of ``data`` (bytes)."""
    n = len(data)
    if n < 126:
        return _HEAD_SHORT[n] + data
    if n < 65536:
        return _pack_head16(0x82, 126, n) + data
    return _pack_head64(0x82, 127, n) + data


def binary_frame_parts(lead, payload):
    """``binary_frame(lead + payload)``, joined once (one copy of ``payload``, bytes-like)."""
    n = len(lead) + len(payload)
    if n < 126:
        head = _HEAD_SHORT[n]
    elif n < 65536:
        head = _pack_head16(0x82, 126, n)
    else:
        head = _pack_head64(0x82, 127, n)
    return b"".join((head, lead, payload))


def masked_binary_frame(data, lead=b""):
    """A masked FIN+binary frame of ``lead + data``, with a fresh masking key.

    The key comes from ``random.getrandbits(32)``, as autobahn's own. Up to
    `SMALL_XOR` bytes of payload the frame is ``bytes``; above, a new
    ``bytearray`` holding the head and the masked ``lead`` and ``data`` (one
    copy of ``data``, bytes-like, no concatenation first).
    """
    n = len(lead) + len(data)
    key = getrandbits(32)
    if n < 126:
        header = _pack_masked_short(0x82, 0x80 | n, key)
    elif n < 65536:
        header = _pack_masked16(0x82, 0xFE, n, key)
    else:
        header = _pack_masked64(0x82, 0xFF, n, key)
    if not n:
        return header
    if n > SMALL_XOR:
        return prefixed_xor_large(header, data, header[-4:], lead)
    return header + xor_mask(lead + data if lead else data, header[-4:])


class FastSend:
    """Mixin (before the autobahn protocol class): one ws-multiplex message as
    one binary frame, written straight to the socket (`write_now`).

    autobahn's sendMessage/sendFrame/sendData cost several calls and eagerly
    formatted debug-log arguments per message. This is equivalent as long as
    autobahn has nothing queued (we never use sync sends, chopsize,
    auto-fragmentation or compression) and no message of its own is half
    sent (we never use beginMessage); otherwise the message goes through
    autobahn. ``_tx_masked``: the frames are masked (True on the client).
    """

    _tx_masked = False

    def _send(self, data):
        """One message (``Multiplexer``'s ``send``)."""
        if self.state != self.STATE_OPEN:
            return
        if self.send_queue or self.send_state != self.SEND_STATE_GROUND:
            self.sendMessage(data, isBinary=True)
            return
        write_now(self.transport, masked_binary_frame(data) if self._tx_masked else binary_frame(data))

    def _send_parts(self, header, payload):
        """The message ``header + payload`` (a large DATA message: ``Multiplexer``'s
        ``send_parts``), framed in one buffer: one copy of ``payload``."""
        if self.state != self.STATE_OPEN:
            return
        if self.send_queue or self.send_state != self.SEND_STATE_GROUND:
            self.sendMessage(header + payload, isBinary=True)
            return
        write_now(self.transport, masked_binary_frame(payload, header) if self._tx_masked
                  else binary_frame_parts(header, payload))


class FastReceive:
    """Mixin (before the autobahn protocol class) with the fast receive path.

    ``_rx_masked``: whether the frames taken must be masked (True on the
    server; a server's frames must not be, so False on the client). The
    subclass sets ``mux`` (with ``receive(message)``) once open, and
    provides ``_seconds()`` (its clock) for the fragment rate.
    """

    _rx_masked = True
    _rx = None  # an incomplete frame: [chunks, length buffered, length needed]
    _rx_limit = None
    mux = None
    _fragments = 0  # frames of the current message (autobahn's path)
    _continuations = 0  # continuation frames since _window_start
    _window_start = None

    def dataReceived(self, data):
        """Complete, unfragmented binary frames go straight to the multiplexer.

        Everything else (the handshake, control frames, fragments, text,
        protocol violations, oversized frames) is left to autobahn: the fast
        path only runs while autobahn holds no partial frame, and gives it
        whole frames, one at a time (binary frames and continuations up to
        the size limit are completed here first), so autobahn sees a
        well-formed stream from a frame boundary on. After a frame that leaves autobahn other than
        open and idle (closing, failed, a partial frame), the rest is its.
        """
        rx = self._rx
        if rx is not None:
            rx[0].append(data)
            rx[1] += len(data)
            if rx[1] < rx[2]:
                return
            data = b"".join(rx[0])
            self._rx = None
            if self.state != self.STATE_OPEN:
                autobahn_receive(self, data)
                return
        elif (self.state != self.STATE_OPEN or self.data or self.current_frame is not None
              or self.mux is None):
            autobahn_receive(self, data)
            return
        limit = self._rx_limit
        if limit is None:
            limit = min((v for v in (self.maxFramePayloadSize, self.maxMessagePayloadSize) if v > 0),
                        default=1 << 63)
            if compression(self) is not None:
                limit = -1  # compressed frames (RSV1) are never taken anyway; be explicit
            self._rx_limit = limit
        receive = self.mux.receive
        masked = self._rx_masked
        mask_bit = 0x80 if masked else 0
        key_len = 4 if masked else 0
        inside = self.inside_message  # a fragmented message is under way: every frame is autobahn's
        pos = 0
        end = len(data)
        need = 0  # > 0: the frame at pos is incomplete, this many bytes make progress
        while pos < end:
            left = end - pos
            if left < 2:
                need = 2
                break
            b1 = data[pos + 1]
            # the wrong masking: autobahn fails the connection
            if b1 & 0x80 != mask_bit:
                break
            n = b1 & 0x7F
            if n < 126:
                i = pos + 2
            elif n == 126:
                if left < 4:
                    need = 4
                    break
                n = (data[pos + 2] << 8) | data[pos + 3]
                if n < 126:
                    break
                i = pos + 4
            else:
                if left < 10:
                    need = 10
                    break
                n = int.from_bytes(data[pos + 2:pos + 10], "big")
                if n < 65536:
                    break
                i = pos + 10
            if n > limit:
                break
            stop = i + key_len + n
            if stop > end:
                # wait here only for a frame whose header autobahn accepts as
                # it is (binary, or a continuation inside a message): it
                # judges any other header on every read it gets a part of
                b0 = data[pos]
                if (b0 == 0x80 or b0 == 0) if inside else (b0 == 0x82 or b0 == 0x02):
                    need = stop - pos
                break
            if data[pos] == 0x82 and not inside:  # FIN+binary, no RSV
                if masked:
                    # (a large payload is unmasked from a view of the read: no slice copy)
                    receive(xor_mask(data[i + 4:stop] if stop - i <= SMALL_XOR else memoryview(data)[i + 4:stop],
                                     data[i:i + 4]))
                else:
                    # (a large payload goes on as a view of the read: no slice copy)
                    receive(data[i:stop] if stop - i <= VIEW_MIN else memoryview(data)[i:stop])
            else:
                autobahn_receive(self, data[pos:stop] if pos or stop < end else data)
                if self.data or self.current_frame is not None:
                    pos = stop  # autobahn kept part of it (not expected): the rest is its too
                    break
                inside = self.inside_message
            pos = stop
            if self.state != self.STATE_OPEN:
                break
        if pos < end:
            rest = data[pos:] if pos else data
            if need:
                # wait for the rest of this frame (joined once, not per read)
                self._rx = [[rest], end - pos, need]
            else:
                autobahn_receive(self, rest)

    # -- fragment limits (autobahn's path) ----------------------------------

    def onMessageBegin(self, isBinary):
        self._fragments = 0
        super().onMessageBegin(isBinary)

    def onMessageFrameBegin(self, length):
        n = self._fragments = self._fragments + 1
        if n > MAX_FRAGMENTS:
            self._fragment_limit(1009, f"more than {MAX_FRAGMENTS} fragments in one message")
            return
        if self.current_frame.opcode == 0:
            n = self._continuations + 1
            if n >= MAX_FRAGMENTS_PER_SECOND:
                now = self._seconds()
                start, self._window_start = self._window_start, now
                n = 0
                if start is not None and now - start < 1.0:
                    self._fragment_limit(1008, f"more than {MAX_FRAGMENTS_PER_SECOND} fragments per second")
                    return
            self._continuations = n
        super().onMessageFrameBegin(length)

    def _fragment_limit(self, code, reason):
        """Close with ``code`` and stop reading: nothing of the message is kept."""
        if self.state == self.STATE_OPEN:
            self._fail_connection(code, reason)  # autobahn keeps nothing more of the message
        self.dropConnection(abort=False)
