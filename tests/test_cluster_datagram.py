"""The UDP bus datagram: header, size limits and what a receiver ignores (plain bytes)."""

from twisted.trial import unittest

from exposr.cluster import datagram
from exposr.cluster.datagram import MAX_DATAGRAM, MAX_ENVELOPE, TooLarge, pack, unpack

ENVELOPE = b'{"event":"cluster:heartbeat","message":{},"s":"00"}'


class DatagramTests(unittest.TestCase):
    def test_layout(self):
        self.assertEqual(pack(ENVELOPE), b"\xe0\x05\x00\x00" + ENVELOPE)
        self.assertEqual(pack(bytearray(b"{}xx")), b"\xe0\x05\x00\x00{}xx")

    def test_round_trip(self):
        self.assertEqual(unpack(pack(ENVELOPE)), ENVELOPE)
        self.assertEqual(unpack(memoryview(pack(ENVELOPE))), ENVELOPE)
        self.assertEqual(unpack(bytearray(pack(ENVELOPE))), ENVELOPE)

    def test_reserved_bytes_are_ignored_on_receive(self):
        self.assertEqual(unpack(b"\xe0\x05\xff\x17" + ENVELOPE), ENVELOPE)

    def test_five_bytes_or_fewer_are_ignored(self):
        for n in range(6):
            self.assertIsNone(unpack(b"\xe0\x05\x00\x00{}"[:n]), n)
        self.assertEqual(unpack(b"\xe0\x05\x00\x00{}"), b"{}")  # six bytes: one byte of message

    def test_wrong_magic_is_ignored(self):
        for head in (b"\xe0\x06", b"\x05\xe0", b"\x00\x05", b"{\"", b"\xe1\x05"):
            self.assertIsNone(unpack(head + b"\x00\x00" + ENVELOPE), head)
        self.assertIsNone(unpack(ENVELOPE))  # a bare envelope (no header)

    def test_size_limits(self):
        self.assertEqual(MAX_DATAGRAM, 65507)
        self.assertEqual(MAX_ENVELOPE, 65503)
        largest = b"{" + b"x" * (MAX_ENVELOPE - 1)
        self.assertEqual(len(pack(largest)), MAX_DATAGRAM)
        self.assertEqual(unpack(pack(largest)), largest)
        e = self.assertRaises(TooLarge, pack, largest + b"x")
        self.assertIn("65504 bytes", str(e))
        self.assertIsInstance(e, ValueError)
        self.assertIsNone(unpack(b"\xe0\x05\x00\x00" + largest + b"x"))  # oversized: 65508 bytes

    def test_check_is_the_cheap_filter(self):
        self.assertTrue(datagram.check(pack(ENVELOPE)))
        self.assertFalse(datagram.check(b"\xe0\x05\x00\x00\x00"))
        self.assertFalse(datagram.check(b"\xe0\x04" + ENVELOPE))
        self.assertFalse(datagram.check(bytearray(MAX_DATAGRAM + 1)))
