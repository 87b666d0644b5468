"""The ``ssh-connection`` service of a logged-in tunnel client."""

import struct

from twisted.conch.ssh import common, connection
from twisted.conch.ssh import transport as sshtransport
from twisted.internet import defer, task
from twisted.logger import Logger

from exposr.transport.ssh import conch_private
from exposr.transport.ssh.shared import ProtocolViolation, log

_MUST_BE_OPEN = frozenset(
    (
        connection.MSG_CHANNEL_WINDOW_ADJUST,
        connection.MSG_CHANNEL_EOF,
        connection.MSG_CHANNEL_CLOSE,
        connection.MSG_CHANNEL_REQUEST,
    )
)
_MUST_BE_OPENING = frozenset((connection.MSG_CHANNEL_OPEN_CONFIRMATION, connection.MSG_CHANNEL_OPEN_FAILURE))
_GLOBAL_REPLIES = frozenset((connection.MSG_REQUEST_SUCCESS, connection.MSG_REQUEST_FAILURE))


class _ConnectionLog(Logger):
    """Conch's connection logs one info line per channel opened and closed:
    not for every stream (its debug lines stay)."""

    def info(self, format=None, **kwargs):
        pass


class ForwardingConnection(connection.SSHConnection):
    """
    Conch's ``ssh-connection`` with only what forwarding needs on top. Channel
    work is in the channel classes (`exposr.transport.ssh.channels`), channel
    policy and global requests in `TunnelAvatar`. The overrides, and why:

    * ``serviceStarted``/``serviceStopped``: keep-alive pings; attach to the tunnel.
    * ``packetReceived``: a channel message for a channel not in the state it needs drops the connection.
    * ``ssh_GLOBAL_REQUEST``: replies in order, possibly later (``tcpip-forward`` asks storage).
    * ``ssh_CHANNEL_OPEN``: unwanted types and over-limit sessions refused without a traceback.
    * ``ssh_CHANNEL_DATA``: the window stays shut while the stream's reader is paused.
    * ``ssh_CHANNEL_EXTENDED_DATA``: the same window rule (Conch's reopens a held window).

    Conch would index its channel table with the peer's number and trust the
    channel's state (an open failure for an open channel corrupts it), answer
    global requests synchronously, log a traceback per refused channel type,
    and reopen the window on every data packet whatever the reader does.
    """

    _log = _ConnectionLog(namespace="exposr.transport.ssh.conch")

    def serviceStarted(self):
        connection.SSHConnection.serviceStarted(self)
        self.tunnel = self.transport.tunnel_conn
        self._global = defer.succeed(None)
        self._stopped = False
        svc = self.transport.factory.exposr
        self._missed = 0
        self._max_missed = svc.keepalive_max_missed
        self._keepalive = task.LoopingCall(self._ping)
        self._keepalive.clock = svc.reactor
        self._keepalive.start(svc.keepalive_interval, now=False)
        self.tunnel._attach(self)

    def serviceStopped(self):
        if self._stopped:
            return
        self._stopped = True
        if self._keepalive.running:
            self._keepalive.stop()
        connection.SSHConnection.serviceStopped(self)

    # -- keep-alive ------------------------------------------------------------

    def _ping(self):
        if self._missed >= self._max_missed:
            log.info(
                "SSH connection of {tunnel_id} from {peer}: no keep-alive reply, dropping",
                tunnel_id=self.tunnel.tunnel_id,
                peer=self.tunnel.peer,
            )
            self.transport._drop(sshtransport.DISCONNECT_CONNECTION_LOST, b"keep-alive timeout")
            return
        self._missed += 1
        d = self.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=1)
        d.addBoth(self._pong)

    def _pong(self, _):
        # success or failure: either way the client is alive
        self._missed = 0

    # -- the gate ----------------------------------------------------------------

    def packetReceived(self, messageNum, packet):
        if messageNum == connection.MSG_CHANNEL_DATA:
            return self.ssh_CHANNEL_DATA(packet)  # the hot path: straight to its handler
        if messageNum in _MUST_BE_OPEN:
            if conch_private.open_channel(self, packet) is None:
                raise ProtocolViolation("message for an unknown channel")
        elif messageNum in _MUST_BE_OPENING:
            if conch_private.opening_channel(self, packet) is None:
                raise ProtocolViolation("open reply for a channel we are not opening")
        elif messageNum in _GLOBAL_REPLIES and not conch_private.awaits_global_reply(self):
            return None  # a reply to nothing we asked
        return connection.SSHConnection.packetReceived(self, messageNum, packet)

    # -- global requests, answered in order ------------------------------------

    def ssh_GLOBAL_REQUEST(self, packet):
        request_type, rest = common.getNS(packet)
        if not rest:
            raise ProtocolViolation("truncated global request")
        want_reply, data = rest[0] != 0, rest[1:]

        def run(_):
            d = defer.maybeDeferred(self.transport.avatar.gotGlobalRequest, request_type, data)
            d.addErrback(self._global_failed, request_type)
            d.addCallback(reply)
            d.addErrback(lambda f: log.failure("answering a global request failed", failure=f))
            return d

        def reply(result):
            if self._stopped or self.transport._lost:
                return
            if want_reply:
                if result:
                    payload = result[1] if isinstance(result, (tuple, list)) else b""
                    self.transport.sendPacket(connection.MSG_REQUEST_SUCCESS, payload)
                else:
                    self.transport.sendPacket(connection.MSG_REQUEST_FAILURE, b"")
            if isinstance(result, (tuple, list)) and len(result) > 2:
                result[2]()  # after the reply (see SSHTunnelConnection.add_forward)

        self._global.addCallback(run)

    def _global_failed(self, failure, request_type):
        log.warn(
            "SSH global request {request} of {tunnel_id} failed: {error}",
            request=request_type.decode("ascii", "replace")[:64],
            tunnel_id=self.tunnel.tunnel_id,
            error=failure.getErrorMessage(),
        )
        return False

    def when_idle(self):
        """Fires once every global request received so far has been answered."""
        d = defer.Deferred()
        self._global.addCallback(lambda r: (d.callback(None), r)[1])
        return d

    # -- channels opened by the client -----------------------------------------

    def ssh_CHANNEL_OPEN(self, packet):
        channel_type, rest = common.getNS(packet)
        sender, _, max_packet = struct.unpack(">3L", rest[:12])
        count = conch_private.channel_count(self)
        if self.transport.avatar.admit_channel(channel_type, max_packet, count):
            return connection.SSHConnection.ssh_CHANNEL_OPEN(self, packet)
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_FAILURE,
            struct.pack(">2L", sender, connection.OPEN_ADMINISTRATIVELY_PROHIBITED)
            + common.NS(b"not supported")
            + common.NS(b""),
        )
        return None

    # -- data and window: held back while the reader is paused ------------------

    def ssh_CHANNEL_DATA(self, packet):
        channel = conch_private.open_channel(self, packet)
        if channel is None:
            raise ProtocolViolation("message for an unknown channel")
        self._deliver(channel, common.getNS(packet[4:])[0], None)

    def ssh_CHANNEL_EXTENDED_DATA(self, packet):
        channel = conch_private.open_channel(self, packet)
        if channel is None:
            raise ProtocolViolation("message for an unknown channel")
        (type_code,) = struct.unpack(">L", packet[4:8])
        self._deliver(channel, common.getNS(packet[8:])[0], type_code)

    def _deliver(self, channel, data, type_code):
        n = len(data)
        if n > channel.localWindowLeft or n > channel.localMaxPacket:
            log.warn(
                "SSH client of {tunnel_id} overran a channel window, closing it",
                tunnel_id=self.tunnel.tunnel_id,
            )
            self.sendClose(channel)
            return
        channel.localWindowLeft -= n
        if channel.localClosed:
            return
        if type_code is None:
            channel.dataReceived(data)
        else:
            channel.extReceived(type_code, data)
        self.maybe_adjust(channel)

    def maybe_adjust(self, channel):
        """Reopen the window, unless the stream's reader has paused us."""
        if channel.localClosed or channel.window_held:
            return
        if channel.localWindowLeft < channel.localWindowSize // 2:
            self.adjustWindow(channel, channel.localWindowSize - channel.localWindowLeft)
