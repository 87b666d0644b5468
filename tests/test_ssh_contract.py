"""The `ITunnelConnection` contract over the SSH transport (see `tests.connection_contract`).

The server side is the real `SSHTransportService` (its Conch factory,
`ServerTransport`, `UserAuth`, `ForwardingConnection`, `ForwardedChannel`);
the far end is what ``ssh -R 0:localhost:3000 <tunnel>:<token>@relay`` does,
built from Conch's client pieces: a `SSHClientTransport`, a
`SSHUserAuthClient` logging in with a ``<tunnel>:<token>`` user name, and a
`SSHConnection` that asks for the remote forward and accepts the
``forwarded-tcpip`` channels. Both talk through `twisted.test.iosim`: no
sockets, no OpenSSH process, no waiting; the service's timers run on a
`MemoryReactorClock` that only ``callLater(0)`` calls move.

SSH has no PAUSE message: back-pressure is the channel window. A reader that
stops consuming stops granting window, and the writer learns of it only when
the window it was granted is used up. So over SSH the far end's ``pause()``
(and the server side's ``pauseProducing()``) reaches the other side's
producer once the writer has filled the window, not while the stream is idle.
`SSHConnectionContract` runs the three back-pressure tests of the contract in
that form (see their docstrings); every other contract test runs unchanged.
"""

import struct

from twisted.conch.ssh import common, connection, userauth
from twisted.conch.ssh import transport as sshtransport
from twisted.conch.ssh.channel import SSHChannel
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import ClientFactory
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial import unittest

from exposr.config import Config
from exposr.transport.ssh import LOCAL_WINDOW, SSHTransportService
from exposr.transport.ssh.shared import BANNER
from tests.connection_contract import ConnectionContractMixin, RecordingProducer
from tests.test_ssh_support import FakeRegistry, FakeTunnels

# what the far end grants per forwarded channel: smaller than the contract's
# mebibyte, so that its window is used up and re-granted along the way
# (OpenSSH grants 2 MiB in 32 KiB packets)
FAR_WINDOW = 256 * 1024
FAR_PACKET = 32 * 1024

SERVER_ADDRESS = IPv4Address("TCP", "127.0.0.1", 2200)
CLIENT_ADDRESS = IPv4Address("TCP", "192.0.2.7", 50000)


# -- the far end: an ``ssh -R`` client ------------------------------------------------


class _FarChannel(SSHChannel):
    """The client's side of one ``forwarded-tcpip`` channel (its target connection)."""

    name = b"forwarded-tcpip"

    def __init__(self, **kw):
        SSHChannel.__init__(self, localWindow=FAR_WINDOW, localMaxPacket=FAR_PACKET, **kw)
        self.chunks = []
        self.reading_paused = False  # the target socket is backed up: no window granted
        self.writer_paused = False  # the server's window is used up: the target is not read
        self.eof_pending = False  # the target ended; EOF goes once what it sent is out
        self.ended = False

    def channelOpen(self, specificData):
        pass

    def dataReceived(self, data):
        self.chunks.append(data)

    def eofReceived(self):
        pass

    def stopWriting(self):
        self.writer_paused = True

    def startWriting(self):
        self.writer_paused = False

    def addWindowBytes(self, data):
        SSHChannel.addWindowBytes(self, data)
        if self.eof_pending and not self.buf:
            self.eof_pending = False
            self.conn.sendEOF(self)

    def closed(self):
        self.ended = True


class _FarStream:
    """The contract's far-end handle for one channel."""

    def __init__(self, channel):
        self.channel = channel

    @property
    def received(self):
        return b"".join(self.channel.chunks)

    @property
    def closed(self):
        return self.channel.ended

    @property
    def producer_paused(self):
        return self.channel.writer_paused

    def write(self, data):
        self.channel.write(data)

    def close(self):
        # what OpenSSH does when its target connection ends: EOF once what
        # the target sent is out, then CLOSE once the server closes its side
        if self.channel.buf:
            self.channel.eof_pending = True
        else:
            self.channel.conn.sendEOF(self.channel)

    def pause(self):
        self.channel.reading_paused = True

    def resume(self):
        channel = self.channel
        channel.reading_paused = False
        consumed = channel.localWindowSize - channel.localWindowLeft
        if consumed and not channel.localClosed:
            channel.conn.adjustWindow(channel, consumed)


class _FarConnection(connection.SSHConnection):
    def __init__(self, harness):
        connection.SSHConnection.__init__(self)
        self.harness = harness

    def serviceStarted(self):
        connection.SSHConnection.serviceStarted(self)
        # ssh -R 0:localhost:3000: the server allocates the port
        d = self.sendGlobalRequest(
            b"tcpip-forward", common.NS(b"localhost") + struct.pack(">L", 0), wantReply=1
        )
        d.addCallback(self.harness._forwarded)

    def channel_forwarded_tcpip(self, windowSize, maxPacket, data):
        channel = _FarChannel(remoteWindow=windowSize, remoteMaxPacket=maxPacket, conn=self)
        channel.open_data = data  # connected address and port, originator address and port
        self.harness.far_streams.append(_FarStream(channel))
        return channel

    def adjustWindow(self, channel, bytesToAdd):
        # Conch re-grants on every data packet; a backed-up target does not
        if not getattr(channel, "reading_paused", False):
            connection.SSHConnection.adjustWindow(self, channel, bytesToAdd)


class _FarAuth(userauth.SSHUserAuthClient):
    def ssh_USERAUTH_BANNER(self, packet):
        self.transport.banner = common.getNS(packet)[0]

    def getPassword(self, prompt=None):
        return None

    def getPublicKey(self):
        return None


class _FarTransport(sshtransport.SSHClientTransport):
    banner = None
    disconnect_reason = None

    def verifyHostKey(self, hostKey, fingerprint):
        if hostKey != self.factory.harness.service.host_key.public().blob():
            return defer.fail(AssertionError("not the service's host key"))
        return defer.succeed(True)

    def connectionSecure(self):
        harness = self.factory.harness
        self.requestService(_FarAuth(harness.user, _FarConnection(harness)))

    def receiveError(self, reasonCode, description):
        self.disconnect_reason = (reasonCode, description)


class _FarFactory(ClientFactory):
    protocol = _FarTransport

    def __init__(self, harness):
        self.harness = harness


# -- the server side ------------------------------------------------------------------


class _Port:
    def __init__(self, factory):
        self.factory = factory

    def getHost(self):
        return SERVER_ADDRESS

    def stopListening(self):
        self.factory.doStop()


class _Endpoint:
    """Where `SSHTransportService.listen` opens its listener: hands the factory to the harness."""

    def listen(self, factory):
        factory.doStart()  # what a listening port does
        self.factory = factory
        return defer.succeed(_Port(factory))


class SSHHarness:
    """An `SSHTransportService` and an ``ssh -R`` client over an iosim pump, logged in and forwarded."""

    def __init__(self, test, refuse=False):
        self.clock = MemoryReactorClock()
        self.tunnels = FakeTunnels()
        self.user = ("t1:" + self.tunnels.add("t1")).encode("utf-8")
        self.registry = FakeRegistry(self.tunnels)
        self.registry.refuse = refuse
        self.far_streams = []
        self.forwarded_port = None
        endpoint = _Endpoint()
        config = Config(transport=("ssh",), transport_ssh_port=0, transport_ssh_key=None)
        self.service = SSHTransportService(
            config, self.tunnels, self.registry, "node-a", self.clock, endpoint=endpoint
        )
        test.successResultOf(self.service.listen())  # generates a host key
        self.server = endpoint.factory.buildProtocol(CLIENT_ADDRESS)
        self.far = _FarFactory(self).buildProtocol(SERVER_ADDRESS)
        server_io = iosim.FakeTransport(self.server, True, SERVER_ADDRESS, CLIENT_ADDRESS)
        client_io = iosim.FakeTransport(self.far, False, CLIENT_ADDRESS, SERVER_ADDRESS)
        self.io = iosim.connect(self.server, server_io, self.far, client_io, clock=self.clock)
        test.addCleanup(self._stop, test)
        self.conn = self.registry.registered[0] if self.registry.registered else None
        if not self.registry.refuse:
            test.assertIsNotNone(self.conn, "the server did not register the connection")
            test.assertEqual(self.conn.forwards, [("localhost", 0, self.forwarded_port)])
            test.assertEqual(self.far.banner, BANNER)

    def _forwarded(self, reply):
        (self.forwarded_port,) = struct.unpack(">L", reply[:4])

    def pump(self):
        self.io.flush()

    def disconnect_far(self):
        self.far.transport.abortConnection()

    def _stop(self, test):
        # shut down as the process would: every connection closed, no timer left
        stopped = self.service.stopService()
        self.pump()
        test.successResultOf(stopped)
        test.assertEqual(self.service.protocols, set())
        test.assertEqual(self.clock.getDelayedCalls(), [])


class SSHConnectionContract(ConnectionContractMixin, unittest.TestCase):
    def make_harness(self):
        return SSHHarness(self)

    # -- back-pressure: the SSH window instead of PAUSE/RESUME -----------------

    def _fill_far_window(self, proto, far):
        """The server side writes more than the far end grants; what it holds back."""
        self.assertEqual(far.channel.localWindowLeft, FAR_WINDOW)
        extra = b"held back"
        proto.transport.write(b"w" * FAR_WINDOW + extra)
        return extra

    def test_far_end_pause_pauses_the_registered_producer(self):
        """The contract's test, over SSH: a far end that stops consuming stops
        granting window; the producer is paused when the server side has used
        up the window, and resumed once the far end grants it again, after the
        held-back bytes went out."""
        h = self.make_harness()
        proto, far = self.open(h)
        producer = RecordingProducer()
        proto.transport.registerProducer(producer, True)
        far.pause()
        h.pump()
        self.assertEqual(producer.events, [])  # no PAUSE message in SSH: nothing to tell yet
        extra = self._fill_far_window(proto, far)
        h.pump()
        self.assertEqual(producer.events, ["pause"])
        self.assertEqual(len(far.received), FAR_WINDOW)
        far.resume()
        h.pump()
        self.assertEqual(producer.events, ["pause", "resume"])
        self.assertEqual(far.received[FAR_WINDOW:], extra)
        # data still flows after the resume
        proto.transport.write(b"after")
        h.pump()
        self.assertTrue(far.received.endswith(extra + b"after"))
        self.assertEqual(producer.events, ["pause", "resume"])

    def test_producer_registered_while_far_end_paused_is_paused(self):
        """The contract's test, over SSH: "paused" is the far end's window used up."""
        h = self.make_harness()
        proto, far = self.open(h)
        far.pause()
        self._fill_far_window(proto, far)
        h.pump()
        producer = RecordingProducer()
        proto.transport.registerProducer(producer, True)
        self.assertTrue(producer.paused)
        far.resume()
        h.pump()
        self.assertFalse(producer.paused)

    def test_server_side_pause_pauses_the_far_producer(self):
        """The contract's test, over SSH: the paused server side grants no
        more window, so the far end's writer stops once it has used up the
        window the server granted (``LOCAL_WINDOW``); what it wrote beyond
        arrives after the resume."""
        h = self.make_harness()
        proto, far = self.open(h)
        self.assertFalse(far.producer_paused)
        proto.transport.pauseProducing()
        h.pump()
        self.assertFalse(far.producer_paused)  # no PAUSE message in SSH: nothing to tell yet
        far.write(b"r" * LOCAL_WINDOW + b"held back")
        h.pump()
        self.assertTrue(far.producer_paused)
        self.assertEqual(len(proto.received), LOCAL_WINDOW)
        proto.transport.resumeProducing()
        h.pump()
        self.assertFalse(far.producer_paused)
        self.assertTrue(proto.received.endswith(b"r" + b"held back"))
        far.write(b"flowing")
        h.pump()
        self.assertTrue(proto.received.endswith(b"held back" + b"flowing"))
        self.assertEqual(len(proto.received), LOCAL_WINDOW + len(b"held backflowing"))


class SSHConnectionTests(unittest.TestCase):
    """What the harness shows of the SSH connection beyond the contract."""

    def test_gone_connection_unregisters(self):
        h = SSHHarness(self)
        self.assertEqual(h.registry.conns, [h.conn])
        h.disconnect_far()
        h.pump()
        self.assertEqual(h.registry.unregistered, [h.conn])
        self.assertEqual(h.registry.conns, [])

    def test_disconnect_sends_the_reason(self):
        h = SSHHarness(self)
        h.conn.disconnect("tunnel deleted")
        h.pump()
        self.assertEqual(
            h.far.disconnect_reason, (sshtransport.DISCONNECT_BY_APPLICATION, b"tunnel deleted")
        )
        self.assertEqual(h.registry.unregistered, [h.conn])

    def test_streams_announce_the_forwarded_port(self):
        h = SSHHarness(self)
        proto, far = ConnectionContractMixin.open(self, h)
        address, rest = common.getNS(far.channel.open_data)
        self.assertEqual(address, b"localhost")
        self.assertEqual(struct.unpack(">L", rest[:4])[0], h.forwarded_port)

    def test_far_close_behind_a_held_window_delivers_everything(self):
        h = SSHHarness(self)
        proto, far = ConnectionContractMixin.open(self, h)
        proto.transport.pauseProducing()
        data = bytes(range(256)) * (LOCAL_WINDOW // 256) + b"tail"
        far.write(data)
        far.close()
        h.pump()
        self.assertIsNone(proto.lost)
        self.assertEqual(len(proto.received), LOCAL_WINDOW)
        proto.transport.resumeProducing()
        h.pump()
        self.assertTrue(proto.received == data, "far end -> server bytes differ")
        self.assertTrue(proto.lost.check(error.ConnectionDone), proto.lost)
        self.assertTrue(far.closed)

    def test_server_close_behind_a_held_window_delivers_everything(self):
        h = SSHHarness(self)
        proto, far = ConnectionContractMixin.open(self, h)
        far.pause()
        data = bytes(range(256)) * (FAR_WINDOW // 256) + b"tail"
        proto.transport.write(data)
        proto.transport.loseConnection()
        h.pump()
        self.assertFalse(far.closed)
        self.assertIsNone(proto.lost)
        self.assertEqual(len(far.received), FAR_WINDOW)
        far.resume()
        h.pump()
        self.assertTrue(far.received == data, "server -> far end bytes differ")
        self.assertTrue(far.closed)
        self.assertTrue(proto.lost.check(error.ConnectionDone), proto.lost)

    def test_backed_up_connection_pauses_every_stream(self):
        h = SSHHarness(self)
        pairs = [ConnectionContractMixin.open(self, h) for _ in range(2)]
        producers = []
        for proto, far in pairs:
            producers.append(RecordingProducer())
            proto.transport.registerProducer(producers[-1], True)
        carrier = h.io.serverIO.producer  # what Twisted pauses when the socket is full
        carrier.pauseProducing()
        self.assertEqual([p.events for p in producers], [["pause"], ["pause"]])
        # a stream opened meanwhile starts paused
        late_proto, _ = ConnectionContractMixin.open(self, h)
        late = RecordingProducer()
        late_proto.transport.registerProducer(late, True)
        self.assertTrue(late.paused)
        carrier.resumeProducing()
        self.assertEqual([p.events for p in producers], [["pause", "resume"]] * 2)
        self.assertFalse(late.paused)

    def test_refused_registration_disconnects(self):
        h = SSHHarness(self, refuse=True)
        self.assertIsNone(h.conn)
        self.assertEqual(
            h.far.disconnect_reason,
            (sshtransport.DISCONNECT_BY_APPLICATION, b"unable to establish tunnel"),
        )
        self.assertTrue(h.io.clientIO.disconnected)
