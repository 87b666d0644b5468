"""The UDP cluster bus datagram (sans-I/O).

One datagram carries exactly one signed envelope (`exposr.cluster.envelope`)::

    E0 05 00 00 <signed JSON message, UTF-8>

The first two bytes are the magic, the next two are reserved: sent as zero,
ignored on receive. A receiver drops, before any JSON work, a datagram of 5
bytes or less, one whose first two bytes are not the magic and one larger than
`MAX_DATAGRAM`. There is no fragmentation and no batching: a message that does
not fit one datagram cannot be sent (`pack` refuses it).
"""

MAGIC = b"\xe0\x05"
HEADER = MAGIC + b"\x00\x00"
HEADER_SIZE = len(HEADER)

#: Largest UDP payload of one IPv4 datagram (65535 - 20 bytes IP - 8 bytes UDP).
MAX_DATAGRAM = 65507

#: Largest signed envelope that fits one datagram.
MAX_ENVELOPE = MAX_DATAGRAM - HEADER_SIZE

_SHORTEST = 5  # datagrams of this many bytes or fewer are ignored


class TooLarge(ValueError):
    """A message that does not fit one datagram."""


def pack(data):
    """The datagram of one signed envelope (bytes); `TooLarge` if it cannot fit."""
    if len(data) > MAX_ENVELOPE:
        raise TooLarge("%d bytes, more than the %d of one UDP datagram" % (len(data), MAX_ENVELOPE))
    return HEADER + bytes(data)


def check(datagram):
    """
    Whether ``datagram`` (bytes, bytearray or memoryview) may hold an envelope:
    more than 5 bytes, at most `MAX_DATAGRAM`, starting with the magic.
    """
    n = len(datagram)
    return _SHORTEST < n <= MAX_DATAGRAM and datagram[0] == 0xE0 and datagram[1] == 0x05


def unpack(datagram):
    """The envelope bytes of a received datagram, or None when it is to be ignored."""
    if not check(datagram):
        return None
    return bytes(datagram[HEADER_SIZE:])
