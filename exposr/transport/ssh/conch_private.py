"""The Conch internals the SSH transport still relies on, all of them here.

Checked against Twisted 26.10.0 (``twisted/conch/ssh/connection.py`` and
``channel.py``). ``tests/test_ssh_conch_private.py`` fails when one of the
names below disappears, so that a hardening or a fast path built on them
cannot switch off silently; on a Twisted upgrade re-read those two files for
each name in `CONNECTION_ATTRIBUTES` and `CHANNEL_ATTRIBUTES`.

`SSHConnection`:

* ``channels``: local channel id -> channel, opened by either side, open or
  still waiting for the peer's confirmation;
* ``channelsToRemoteChannel``: channel -> the peer's id, only once open;
* ``deferreds["global"]``: our global requests waiting for a reply, oldest first.

`SSHChannel`: ``buf``/``extBuf`` (what the remote window did not let through
yet), ``areWriting`` (0 once `stopWriting` was called), ``closing`` (close
once the buffers are empty).
"""

import struct

TWISTED_CHECKED = "26.10.0"

CONNECTION_ATTRIBUTES = ("channels", "channelsToRemoteChannel", "deferreds")
CHANNEL_ATTRIBUTES = ("buf", "extBuf", "areWriting", "closing")

_channel_id = struct.Struct(">L").unpack_from


# -- SSHConnection ------------------------------------------------------------------


def open_channel(conn, packet):
    """The open channel a channel message (first field: our id) is for, or None."""
    channel = conn.channels.get(_channel_id(packet)[0])
    if channel is not None and channel in conn.channelsToRemoteChannel:
        return channel
    return None


def opening_channel(conn, packet):
    """The channel we asked the peer to open that a reply is for, or None."""
    channel = conn.channels.get(_channel_id(packet)[0])
    if channel is not None and channel not in conn.channelsToRemoteChannel:
        return channel
    return None


def is_open(conn, channel):
    return channel in conn.channelsToRemoteChannel


def channels(conn):
    """Every channel of the connection (a copy), open or opening."""
    return list(conn.channels.values())


def channel_count(conn):
    return len(conn.channels)


def awaits_global_reply(conn):
    """Whether one of our global requests still waits for its reply."""
    return bool(conn.deferreds["global"])


# -- SSHChannel ------------------------------------------------------------------------


def discard_unsent(channel):
    """Forget what the remote window did not let through, and close when asked to."""
    channel.buf = b""
    channel.extBuf = []
    channel.closing = 1


def stopped_writing(channel):
    """Record that the writer was told to stop (what `SSHChannel.write` does on a full window)."""
    channel.areWriting = 0


def add_window_backlog_first(channel, n):
    """`SSHChannel.addWindowBytes`, but the writer is resumed only once the
    backlog is sent (Conch resumes it first, so it writes behind the backlog)."""
    channel.remoteWindowLeft += n
    if channel.buf:
        backlog, channel.buf = channel.buf, b""
        channel.write(backlog)
    if not channel.buf and not channel.areWriting and not channel.closing:
        channel.areWriting = 1
        channel.startWriting()
