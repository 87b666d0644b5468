"""Property-based tests of the transport's sans-I/O cores (hypothesis).

* the ws-multiplex codec: ``decode`` raises nothing but `FrameError`,
  ``encode``/``decode`` round-trip, a `Multiplexer` in either role takes any
  sequence of messages without raising;
* the WebSocket frame fast path (`wsframes.FastReceive`): any stream of
  frames cut anywhere gives exactly what autobahn's own parser gives; a frame
  fed byte by byte costs linear work.

CI runs a fixed seed and few examples. A longer run by hand::

    HYPOTHESIS_EXAMPLES=5000 .venv/bin/python -m twisted.trial --reactor=exposr tests.test_transport_properties
"""

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from exposr.transport import multiplex as m
from tests.test_ws_transport import FramePathHelpers

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "150"))
SETTINGS = settings(derandomize=True, max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

u32 = st.integers(0, 0xFFFFFFFF)
header_fields = st.tuples(st.integers(0, 0xFFFF), st.integers(0, 8), u32, u32, u32)


def raw_message(fields, payload):
    return struct.pack(">HHIII", *fields) + payload


# messages that mostly parse: version 2, known types, small channel numbers
plausible = st.builds(
    lambda t, dst, src, payload: m.encode(t, dst, src, payload),
    st.integers(0, 7), st.integers(0, 6), st.integers(0, 6), st.binary(max_size=40))
any_message = st.one_of(plausible, st.binary(max_size=40),
                        st.builds(raw_message, header_fields, st.binary(max_size=20)))


class CodecProperties(unittest.SynchronousTestCase):
    @SETTINGS
    @given(st.binary(max_size=64))
    def test_decode_raises_only_frame_errors(self, data):
        try:
            msg = m.decode(data)
        except m.FrameError:
            return
        self.assertEqual(bytes(msg.payload), data[m.HEADER_SIZE:])

    @SETTINGS
    @given(st.integers(1, 6), u32, u32, st.binary(max_size=300))
    def test_round_trip(self, t, dst, src, payload):
        data = m.encode(t, dst, src, payload)
        self.assertEqual(len(data), m.HEADER_SIZE + len(payload))
        msg = m.decode(data)
        self.assertEqual((msg.type, msg.dst, msg.src, bytes(msg.payload)), (t, dst, src, payload))
        self.assertEqual(struct.unpack_from(">I", data, 12)[0], len(payload))

    @SETTINGS
    @given(st.sampled_from([m.SERVER, m.CLIENT]), st.integers(0, 3), st.lists(any_message, max_size=60))
    def test_multiplexer_takes_any_input(self, role, opens, messages):
        clock = Clock()
        sent = []
        mux = m.Multiplexer(sent.append, role=role, clock=clock)
        if role == m.CLIENT:
            mux.on_incoming = lambda ch: ch.write(b"hello") if ch.id % 2 else ch.close("no")
        channels = [mux.open_channel() for _ in range(opens)]
        for data in messages:
            mux.receive(data)
            for ch in channels:
                ch.write(b"x")
        clock.advance(m.OPEN_TIMEOUT + m.CLOSE_TIMEOUT)
        # every message we sent decodes; no timer outlives its channel
        for data in sent:
            self.assertEqual(m.decode(data).dst >= 0, True)
        if not mux.closed:
            self.assertLessEqual(len(clock.getDelayedCalls()), mux.channel_count)
            self.assertTrue(all(ch.remote for ch in mux._by_remote.values()))


def _frame(opcode, payload, fin=True, key=b"\x01\x02\x03\x04"):
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", b0, 0xFE, n)
    else:
        head = struct.pack("!BBQ", b0, 0xFF, n)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@st.composite
def frame_streams(draw):
    """Masked client frames: binary messages, pings, pongs, fragmented messages, text."""
    frames = []
    for kind in draw(st.lists(st.sampled_from("bbbbppftz"), min_size=1, max_size=8)):
        payload = draw(st.binary(max_size=300))
        if kind == "b":
            frames.append(_frame(2, payload))
        elif kind == "p":
            frames.append(_frame(9, payload[:125]))
        elif kind == "f":
            parts = draw(st.integers(1, 5))
            step = max(1, len(payload) // parts)
            pieces = [payload[i:i + step] for i in range(0, len(payload), step)] or [b""]
            out = [_frame(2, pieces[0], fin=len(pieces) == 1)]
            out += [_frame(0, p, fin=i == len(pieces) - 1) for i, p in enumerate(pieces[1:], 1)]
            if len(out) > 1 and draw(st.booleans()):
                out.insert(1, _frame(9, b"mid"))  # a control frame inside the message
            frames.extend(out)
        elif kind == "t":
            frames.append(_frame(1, b"text"))
        else:  # a protocol violation: reserved opcode, unmasked frame, or a bad close
            frames.append(draw(st.sampled_from([
                _frame(3, b"r"), bytes((0x82, 3)) + b"abc", _frame(8, b"\x03"), _frame(8, struct.pack("!H", 999))])))
    stream = b"".join(frames)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=6))))
    return [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)]) if a < b]


class FramePathProperties(FramePathHelpers, unittest.TestCase):
    """Any frame stream, cut anywhere: the fast path gives what autobahn gives."""

    @settings(derandomize=True, max_examples=max(20, EXAMPLES // 3), deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(frame_streams())
    def test_fast_path_matches_autobahn(self, pieces):
        fast, slow = self._feed_both(pieces)
        self.assertEqual(fast, slow)

    def test_byte_by_byte_is_linear(self):
        """A frame fed one byte per read: 4 times the bytes cost about 4 times the work.

        Counted, not timed: the bytes each read makes autobahn copy (what it
        is handed plus what it already holds: its parser appends every read
        to its buffer), which a path handing it a growing buffer makes
        quadratic; and the fast path keeps a pending frame as the reads'
        chunks, joined once when the frame is complete, not re-joined per read.
        """
        from exposr.transport import wsframes

        copied = [0]
        real_receive = wsframes.autobahn_receive

        def counting_receive(proto, data):
            copied[0] += len(data) + len(getattr(proto, "data", b"") or b"")
            return real_receive(proto, data)

        self.patch(wsframes, "autobahn_receive", counting_receive)

        def feed(n):
            p = self._make(True)
            data = _frame(2, b"y" * n) + _frame(0x09, b"") + _frame(2, b"z" * 10, fin=False) + _frame(0, b"w" * n)
            copied[0] = 0
            most_chunks = 0
            for i in range(len(data)):
                p.dataReceived(data[i:i + 1])
                if p._rx is not None:
                    most_chunks = max(most_chunks, len(p._rx[0]))
            self.assertEqual(p.mux.got[0], (b"y" * n, True))
            self.assertEqual(p.mux.got[-1], (b"z" * 10 + b"w" * n, True))
            self.assertGreaterEqual(most_chunks, n, "a pending frame's reads were joined before it was complete")
            return copied[0]

        self.settle_reactor()
        small, large = feed(8000), feed(32000)
        self.assertLess(large / small, 6, f"{small} bytes copied for 8 KB, {large} for 32 KB")
