"""The SSH connection service against Conch, in memory.

The canaries fail when a Conch internal that `exposr.transport.ssh` relies on
(all listed in `conch_private`) or a Conch handler it overrides disappears or
changes its rule, so that a hardening or a fast path cannot switch off
silently on a Twisted upgrade. The other tests drive `ForwardingConnection`
with the packets a hostile or slow peer would send."""

import struct
from types import SimpleNamespace

from twisted.conch.ssh import channel as sshchannel
from twisted.conch.ssh import common, connection, service
from twisted.internet import defer, protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from exposr.errors import StreamRefusedError, TransportClosedError
from exposr.transport.ssh import conch_private
from exposr.transport.ssh.auth import TunnelAvatar
from exposr.transport.ssh.channels import ForwardedChannel
from exposr.transport.ssh.connection import ForwardingConnection
from exposr.transport.ssh.shared import LOCAL_WINDOW, MAX_REMOTE_PACKET, ProtocolViolation


class CanaryTests(unittest.TestCase):
    def test_connection_internals_exist(self):
        conn = connection.SSHConnection()
        for name in conch_private.CONNECTION_ATTRIBUTES:
            self.assertTrue(hasattr(conn, name), name)
        self.assertEqual(conn.deferreds["global"], [])

    def test_channel_internals_exist(self):
        channel = sshchannel.SSHChannel()
        for name in conch_private.CHANNEL_ATTRIBUTES:
            self.assertTrue(hasattr(channel, name), name)

    def test_overridden_handlers_are_what_conch_dispatches_to(self):
        # Conch's dispatch: packetReceived -> ssh_<name without MSG_>
        self.assertIn("packetReceived", vars(service.SSHService))
        for number, name in (
            (connection.MSG_GLOBAL_REQUEST, "ssh_GLOBAL_REQUEST"),
            (connection.MSG_CHANNEL_OPEN, "ssh_CHANNEL_OPEN"),
            (connection.MSG_CHANNEL_DATA, "ssh_CHANNEL_DATA"),
            (connection.MSG_CHANNEL_EXTENDED_DATA, "ssh_CHANNEL_EXTENDED_DATA"),
        ):
            self.assertEqual("ssh_" + connection.SSHConnection.protocolMessages[number][4:], name)
            self.assertIn(name, vars(connection.SSHConnection))
            self.assertIn(name, vars(ForwardingConnection))

    def test_confirmation_makes_a_channel_open(self):
        conn = connection.SSHConnection()
        conn.transport = SimpleNamespace(sendPacket=lambda *a: None)
        channel = sshchannel.SSHChannel(conn=conn)
        channel.name = b"x"
        channel.channelOpen = lambda data: None
        conn.openChannel(channel)
        packet = struct.pack(">4L", channel.id, 5, 100, 100)
        self.assertIs(conch_private.opening_channel(conn, packet), channel)
        conn.ssh_CHANNEL_OPEN_CONFIRMATION(packet)
        self.assertIs(conch_private.open_channel(conn, packet), channel)
        self.assertIsNone(conch_private.opening_channel(conn, packet))
        self.assertEqual(conch_private.channel_count(conn), 1)

    def test_write_on_a_full_window_buffers_and_stops_the_writer(self):
        sent = []
        conn = SimpleNamespace(sendData=lambda ch, data: sent.append(data))
        channel = sshchannel.SSHChannel(remoteWindow=3, remoteMaxPacket=10, conn=conn)
        stopped = []
        channel.stopWriting = lambda: stopped.append(True)
        channel.startWriting = lambda: stopped.append(False)
        channel.write(b"abcdef")
        self.assertEqual((sent, channel.buf, channel.areWriting, stopped), ([b"abc"], b"def", 0, [True]))
        conch_private.add_window_backlog_first(channel, 10)
        self.assertEqual((sent, channel.buf, channel.areWriting, stopped), ([b"abc", b"def"], b"", 1, [True, False]))

    def test_conch_reopens_the_window_whatever_the_reader_does(self):
        # why ForwardingConnection overrides ssh_CHANNEL_DATA: if this ever
        # fails, Conch changed its window rule; re-check the override
        packets = []
        conn = connection.SSHConnection()
        conn.transport = SimpleNamespace(sendPacket=lambda kind, payload: packets.append(kind))
        channel = sshchannel.SSHChannel(localWindow=100, localMaxPacket=100, conn=conn)
        channel.name = b"x"
        channel.channelOpen = lambda data: None
        channel.dataReceived = lambda data: None
        conn.openChannel(channel)
        conn.ssh_CHANNEL_OPEN_CONFIRMATION(struct.pack(">4L", channel.id, 5, 100, 100))
        conn.ssh_CHANNEL_DATA(struct.pack(">L", channel.id) + common.NS(b"x" * 60))
        self.assertIn(connection.MSG_CHANNEL_WINDOW_ADJUST, packets)


# -- ForwardingConnection in memory ----------------------------------------------------


class _Tunnel:
    tunnel_id = "tun1"
    peer = "127.0.0.1"
    tunnel = {}

    def __init__(self):
        self.closed_streams = []

    def _attach(self, conn):
        self.conn = conn

    def _stream_closed(self, channel):
        self.closed_streams.append(channel)

    def add_forward(self, address, port):
        return True


class _Transport:
    def __init__(self):
        self.packets = []
        self.tunnel_conn = _Tunnel()
        self.avatar = TunnelAvatar(self.tunnel_conn)
        self.factory = SimpleNamespace(
            exposr=SimpleNamespace(keepalive_interval=15.0, keepalive_max_missed=3, reactor=Clock())
        )
        self.transport = StringTransport()
        self._lost = False
        self._tcp_paused = False

    def sendPacket(self, kind, payload):
        self.packets.append((kind, payload))

    def kinds(self):
        return [k for k, _ in self.packets]


class _Reader(protocol.Protocol):
    def __init__(self, paused=False):
        self.paused = paused
        self.received = b""

    def connectionMade(self):
        if self.paused:
            self.transport.pauseProducing()

    def dataReceived(self, data):
        self.received += data


class ConnectionTests(unittest.TestCase):
    def setUp(self):
        self.transport = _Transport()
        self.conn = ForwardingConnection()
        self.conn.transport = self.transport
        self.conn.serviceStarted()
        self.addCleanup(self.conn.serviceStopped)
        self.failed_opens = []

    def open_forwarded(self, reader, max_packet=32768, confirm=True):
        d = defer.Deferred()
        channel = ForwardedChannel(self.transport.tunnel_conn, protocol.Factory.forProtocol(lambda: reader), d, self.conn)
        self.conn.openChannel(channel, b"")
        d.addErrback(self.failed_opens.append)  # before the connection stops in cleanup
        if confirm:
            self.receive(connection.MSG_CHANNEL_OPEN_CONFIRMATION, struct.pack(">4L", channel.id, 7, 1 << 20, max_packet))
        return channel, d

    def receive(self, kind, payload):
        return self.conn.packetReceived(kind, payload)

    def data(self, channel, data, ext=None):
        if ext is None:
            self.receive(connection.MSG_CHANNEL_DATA, struct.pack(">L", channel.id) + common.NS(data))
        else:
            self.receive(connection.MSG_CHANNEL_EXTENDED_DATA, struct.pack(">2L", channel.id, ext) + common.NS(data))

    def adjusts(self):
        return [p for k, p in self.transport.packets if k == connection.MSG_CHANNEL_WINDOW_ADJUST]

    def test_window_held_while_the_reader_is_paused(self):
        reader = _Reader(paused=True)
        channel, _ = self.open_forwarded(reader)
        for _ in range(LOCAL_WINDOW // 32768):
            self.data(channel, b"x" * 32768)
        self.assertEqual((len(reader.received), channel.localWindowLeft, self.adjusts()), (LOCAL_WINDOW, 0, []))
        self.data(channel, b"y")  # beyond the window: the channel closes
        self.assertEqual(self.transport.kinds()[-1], connection.MSG_CHANNEL_CLOSE)

    def test_window_reopened_on_resume(self):
        reader = _Reader(paused=True)
        channel, _ = self.open_forwarded(reader)
        for _ in range(LOCAL_WINDOW // 32768 - 1):
            self.data(channel, b"x" * 32768)
        self.data(channel, b"x" * 100, ext=1)  # extended data does not reopen it either
        self.assertEqual(self.adjusts(), [])
        reader.transport.resumeProducing()  # everything consumed is given back
        self.assertEqual(self.adjusts(), [struct.pack(">2L", 7, LOCAL_WINDOW - 32768 + 100)])

    def test_caps_peer_sizes(self):
        channel, d = self.open_forwarded(_Reader(), max_packet=0xFFFFFFFF)
        self.assertEqual(channel.remoteMaxPacket, MAX_REMOTE_PACKET)
        self.receive(connection.MSG_CHANNEL_WINDOW_ADJUST, struct.pack(">2L", channel.id, 0xFFFFFFFF))
        self.assertEqual(channel.remoteWindowLeft, 0xFFFFFFFF)

    def test_zero_packet_size_refused(self):
        channel, d = self.open_forwarded(_Reader(), max_packet=0)
        [failure] = self.failed_opens
        failure.trap(StreamRefusedError)
        self.assertEqual(self.transport.kinds()[-1], connection.MSG_CHANNEL_CLOSE)

    def test_open_failure_refuses_the_stream(self):
        channel, d = self.open_forwarded(_Reader(), confirm=False)
        self.receive(connection.MSG_CHANNEL_OPEN_FAILURE, struct.pack(">2L", channel.id, 2) + common.NS(b"no") + common.NS(b""))
        [failure] = self.failed_opens
        failure.trap(StreamRefusedError)
        self.assertEqual(str(failure.value), "open refused (2) no")
        self.assertEqual(conch_private.channel_count(self.conn), 0)

    def test_replies_for_channels_in_the_wrong_state_are_violations(self):
        opened, _ = self.open_forwarded(_Reader())
        pending, _ = self.open_forwarded(_Reader(), confirm=False)
        for kind, payload in (
            (connection.MSG_CHANNEL_OPEN_FAILURE, struct.pack(">2L", opened.id, 2) + common.NS(b"") + common.NS(b"")),
            (connection.MSG_CHANNEL_OPEN_CONFIRMATION, struct.pack(">4L", opened.id, 9, 10, 10)),
            (connection.MSG_CHANNEL_OPEN_CONFIRMATION, struct.pack(">4L", 4242, 9, 10, 10)),
            (connection.MSG_CHANNEL_DATA, struct.pack(">L", pending.id) + common.NS(b"x")),
            (connection.MSG_CHANNEL_EXTENDED_DATA, struct.pack(">2L", pending.id, 1) + common.NS(b"x")),
            (connection.MSG_CHANNEL_CLOSE, struct.pack(">L", pending.id)),
            (connection.MSG_CHANNEL_EOF, struct.pack(">L", 4242)),
            (connection.MSG_CHANNEL_REQUEST, struct.pack(">L", pending.id) + common.NS(b"x") + b"\x01"),
            (connection.MSG_CHANNEL_WINDOW_ADJUST, struct.pack(">2L", pending.id, 5)),
        ):
            self.assertRaises(ProtocolViolation, self.receive, kind, payload)
        # Conch's bookkeeping untouched
        self.assertIs(conch_private.open_channel(self.conn, struct.pack(">L", opened.id)), opened)
        self.assertIs(conch_private.opening_channel(self.conn, struct.pack(">L", pending.id)), pending)
        # the connection ends: the open still pending fails, the open stream ends
        self.conn.serviceStopped()
        [failure] = self.failed_opens
        failure.trap(TransportClosedError)
        self.assertEqual(self.transport.tunnel_conn.closed_streams, [opened, pending])

    def test_stray_global_replies_ignored(self):
        self.receive(connection.MSG_REQUEST_SUCCESS, b"")
        self.receive(connection.MSG_REQUEST_FAILURE, b"")
        self.assertEqual(self.transport.packets, [])

    def open_session(self, name=b"session", max_packet=0xFFFFFFFF):
        self.receive(connection.MSG_CHANNEL_OPEN, common.NS(name) + struct.pack(">3L", 3, 0xFFFFFFFF, max_packet))
        return self.transport.packets[-1]

    def test_channel_policy(self):
        for name in (b"direct-tcpip", b"x11"):
            kind, payload = self.open_session(name)
            self.assertEqual((kind, payload[4:8]), (connection.MSG_CHANNEL_OPEN_FAILURE, struct.pack(">L", 1)))
        kind, _ = self.open_session(max_packet=0)
        self.assertEqual(kind, connection.MSG_CHANNEL_OPEN_FAILURE)
        kind, _ = self.open_session()
        self.assertEqual(kind, connection.MSG_CHANNEL_OPEN_CONFIRMATION)
        [session] = conch_private.channels(self.conn)
        self.assertEqual(session.remoteMaxPacket, MAX_REMOTE_PACKET)
        self.receive(connection.MSG_GLOBAL_REQUEST, common.NS(b"no-more-sessions@openssh.com") + b"\x00")
        kind, _ = self.open_session()
        self.assertEqual(kind, connection.MSG_CHANNEL_OPEN_FAILURE)

    def test_shell_request_on_a_channel_gone_meanwhile_is_not_answered(self):
        held = defer.Deferred()
        self.transport.avatar.gotGlobalRequest = lambda kind, data: held  # a forward still being decided
        self.receive(connection.MSG_GLOBAL_REQUEST, common.NS(b"tcpip-forward") + b"\x01" + common.NS(b"") + struct.pack(">L", 0))
        self.open_session()
        [session] = conch_private.channels(self.conn)
        session._end = lambda why: None
        self.receive(connection.MSG_CHANNEL_REQUEST, struct.pack(">L", session.id) + common.NS(b"shell") + b"\x01")
        self.receive(connection.MSG_CHANNEL_CLOSE, struct.pack(">L", session.id))
        self.conn.sendClose(session)
        self.assertTrue(session.gone)
        before = len(self.transport.packets)
        held.callback(False)
        self.assertEqual(self.transport.kinds()[before:], [connection.MSG_REQUEST_FAILURE])
