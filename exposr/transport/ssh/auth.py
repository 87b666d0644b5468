"""Authentication (``<tunnel>:<token>`` user names with any method, or
``<tunnel>`` + password) and the avatar: what a logged-in client may do."""

import struct

from twisted.conch.avatar import ConchUser
from twisted.conch.ssh import common, userauth
from twisted.conch.ssh import transport as sshtransport
from twisted.internet import defer

from exposr.transport.ssh.channels import SessionChannel
from exposr.transport.ssh.shared import (
    BANNER,
    MAX_AUTH_FAILURES,
    MAX_CHANNELS,
    MAX_SESSIONS,
    MSG_USERAUTH_BANNER,
    ProtocolViolation,
    conch_log,
    log,
)


class UserAuth(userauth.SSHUserAuthServer):
    """Logins evaluated one at a time in order; failures counted; the tunnel
    connection registered before USERAUTH_SUCCESS."""

    _log = conch_log

    def serviceStarted(self):
        self._queue = []
        self._busy = False
        self._done = False
        self._failures = 0
        self.transport.sendPacket(MSG_USERAUTH_BANNER, common.NS(BANNER) + common.NS(b""))

    def serviceStopped(self):
        self._done = True
        self._queue = []

    def ssh_USERAUTH_REQUEST(self, packet):
        if self._done:
            return  # RFC 4252 5.1: ignore requests after success
        if len(self._queue) > 8:
            raise ProtocolViolation("too many pipelined authentication requests")
        self._queue.append(packet)
        self._next()

    def _next(self):
        if self._busy or self._done or not self._queue:
            return
        packet = self._queue.pop(0)
        self._busy = True
        d = defer.maybeDeferred(self._attempt, packet)
        d.addErrback(self._error)
        d.addBoth(self._finished)

    def _finished(self, _):
        self._busy = False
        self._next()

    def _error(self, failure):
        log.warn("SSH authentication error: {error}", error=failure.getErrorMessage())
        if not self._done:
            self.transport._drop(sshtransport.DISCONNECT_PROTOCOL_ERROR, b"authentication error")

    def _refuse(self, count):
        if count:
            self._failures += 1
            if self._failures >= MAX_AUTH_FAILURES:
                self._done = True
                self.transport.sendDisconnect(
                    sshtransport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
                    b"too many authentication failures",
                )
                return
        self.transport.sendPacket(userauth.MSG_USERAUTH_FAILURE, common.NS(b"password") + b"\x00")

    @defer.inlineCallbacks
    def _attempt(self, packet):
        user, next_service, method, rest = common.getNS(packet, 3)
        if next_service != b"ssh-connection":
            self._refuse(count=False)
            return
        try:
            user = user.decode("utf-8")
        except UnicodeDecodeError:
            self._refuse(count=True)
            return
        if ":" in user:
            tunnel_id, token = user.split(":", 1)
        elif method == b"password":
            try:
                token = common.getNS(rest[1:])[0].decode("utf-8")
            except (UnicodeDecodeError, struct.error, IndexError):
                self._refuse(count=True)
                return
            tunnel_id = user
        else:
            self._refuse(count=False)  # `none` (or a key) without a token: ask for a password
            return
        svc = self.transport.factory.exposr
        ip = self.transport.peer_ip
        if svc.limiter is not None and svc.limiter.blocked(ip):
            self._done = True
            self.transport.sendDisconnect(
                sshtransport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE, b"too many failed logins, try later"
            )
            return
        try:
            result = yield svc.tunnels.authorize(tunnel_id, token)
        except Exception as e:
            log.warn("SSH login check for {tunnel_id} failed: {error}", tunnel_id=tunnel_id, error=repr(e))
            result = None
        if self._done or self.transport._lost:
            return
        if not result:
            if svc.limiter is not None:
                svc.limiter.failed(ip)
            log.info(
                "SSH login refused for tunnel {tunnel_id} from {peer}",
                tunnel_id=tunnel_id[:80],
                peer=self.transport._peer_for_log(),
            )
            self._refuse(count=True)
            return
        tunnel, account = result
        self._done = True
        yield self.transport.login(tunnel, account)


class TunnelAvatar(ConchUser):
    """What an authenticated tunnel client may do on its SSH connection:
    ``tcpip-forward``, ``cancel-tcpip-forward``, and a few ``session`` channels
    that only print the banner (Conch's `lookupChannel` builds them)."""

    def __init__(self, tunnel_conn):
        ConchUser.__init__(self)
        self.tunnel_conn = tunnel_conn
        self.channelLookup = {b"session": SessionChannel}
        self.sessions = 0  # session channels ever accepted
        self.no_more_sessions = False

    def admit_channel(self, channel_type, max_packet, open_channels):
        """Whether the client may open a channel of this type now; counts it if so."""
        if (
            channel_type != b"session"
            or self.no_more_sessions
            or self.sessions >= MAX_SESSIONS
            or open_channels >= MAX_CHANNELS
            or max_packet <= 0
        ):
            return False
        self.sessions += 1
        return True

    def gotGlobalRequest(self, requestType, data):
        if requestType == b"tcpip-forward":
            address, rest = common.getNS(data)
            (port,) = struct.unpack(">L", rest[:4])
            return self.tunnel_conn.add_forward(address, port)
        if requestType == b"cancel-tcpip-forward":
            address, rest = common.getNS(data)
            (port,) = struct.unpack(">L", rest[:4])
            return self.tunnel_conn.cancel_forward(address, port)
        if requestType == b"no-more-sessions@openssh.com":
            self.no_more_sessions = True
            return True
        return False
