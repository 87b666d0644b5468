"""The hardened SSH server transport: identification string, login grace
timer and per-address limit, garbage tolerance, back-pressure from the TCP
socket, disconnects, and the login that registers the tunnel connection."""

import struct

from twisted.conch.ssh import common, userauth
from twisted.conch.ssh import transport as sshtransport
from twisted.internet import defer

from exposr.sockwrite import no_delay
from exposr.transport.ssh import conch_private
from exposr.transport.ssh.auth import TunnelAvatar
from exposr.transport.ssh.channels import ForwardedChannel
from exposr.transport.ssh.connection import ForwardingConnection
from exposr.transport.ssh.shared import DISCONNECT_GRACE, MAX_VERSION_PREAMBLE, VERSION, conch_log, log
from exposr.transport.ssh.tunnel import SSHTunnelConnection


def _has_version_line(buf):
    """A complete line starting with ``SSH-`` (RFC 4253 4.2 allows lines before it)."""
    if buf.startswith(b"SSH-"):
        start = 0
    else:
        start = buf.find(b"\nSSH-")
        if start < 0:
            return False
        start += 1
    return buf.find(b"\n", start) != -1


def _peer_ip(address):
    host = getattr(address, "host", "") or ""
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host


class ServerTransport(sshtransport.SSHServerTransport):
    ourVersionString = b"SSH-2.0-exposr/" + VERSION.encode("ascii")
    _log = conch_log

    avatar = None
    tunnel_conn = None
    _lost = False
    _closing = False
    _tcp_paused = False
    _grace_call = None
    _abort_call = None

    _counted_ip = None  # counted in svc.unauthenticated until login or close

    def connectionMade(self):
        svc = self.factory.exposr
        svc.protocols.add(self)
        self._closed = defer.Deferred()
        ip = self.peer_ip
        waiting = svc.logins_in_progress.setdefault(ip, [])
        if len(waiting) >= svc.max_unauthenticated_per_ip:
            # the address already has that many logins in progress (a scanner,
            # a flood, or many users behind one NAT): the oldest makes room, so
            # that stalled logins cannot lock everyone at the address out
            oldest = waiting[0]
            log.info("SSH login in progress from {peer} closed: {n} in progress, a newer one came",
                     peer=ip, n=len(waiting))
            oldest._uncount()
            oldest.transport.abortConnection()
        svc.unauthenticated[ip] += 1
        waiting.append(self)
        self._counted_ip = ip
        self._grace_call = svc.reactor.callLater(svc.login_grace, self._grace_expired)
        # window adjusts and keep-alives are small packets: never hold them
        # back for the peer's delayed ACK (Nagle), or streams stall ~40 ms
        no_delay(self.transport)
        self.transport.registerProducer(self, True)
        sshtransport.SSHServerTransport.connectionMade(self)

    @property
    def peer_ip(self):
        return _peer_ip(self.transport.getPeer())

    # -- robustness ----------------------------------------------------------

    def dataReceived(self, data):
        if self._closing or self._lost:
            return
        try:
            if not self.gotVersion:
                buf = self.buf + data
                if not _has_version_line(buf):
                    if len(buf) > MAX_VERSION_PREAMBLE:
                        self._drop(sshtransport.DISCONNECT_PROTOCOL_ERROR, b"no SSH identification")
                    else:
                        self.buf = buf
                    return
            sshtransport.SSHServerTransport.dataReceived(self, data)
        except Exception as e:
            log.warn(
                "SSH protocol error from {peer}: {error}",
                peer=self._peer_for_log(),
                error=repr(e),
            )
            self._drop(sshtransport.DISCONNECT_PROTOCOL_ERROR, b"protocol error")

    def _peer_for_log(self):
        try:
            return self.peer_ip
        except Exception:
            return "?"

    def _drop(self, code, desc):
        """Send a disconnect if we still can, and abort."""
        if self._lost:
            return
        try:
            self.sendDisconnect(code, desc)
        except Exception:
            pass
        self._closing = True
        self.transport.abortConnection()

    def _grace_expired(self):
        self._grace_call = None
        log.info("SSH client {peer} did not log in in time", peer=self._peer_for_log())
        self._drop(sshtransport.DISCONNECT_BY_APPLICATION, b"login grace time exceeded")

    def sendDisconnect(self, reason, desc):
        if self._lost:
            return
        if not self._closing:
            self._closing = True
            self.transport.unregisterProducer()
            self._abort_call = self.factory.exposr.reactor.callLater(
                DISCONNECT_GRACE, self.transport.abortConnection
            )
        try:
            self.sendPacket(
                sshtransport.MSG_DISCONNECT,
                struct.pack(">L", reason) + common.NS(desc) + common.NS(b""),
            )
        finally:
            self.transport.loseConnection()

    def receiveError(self, reasonCode, description):
        """The client's MSG_DISCONNECT: a user ending ``ssh`` is routine (info);
        any other reason is the client's complaint, not our error (warning).
        Conch's own logs this at error level."""
        text = description.decode("utf-8", "replace") if isinstance(description, bytes) else str(description)
        if reasonCode == sshtransport.DISCONNECT_BY_APPLICATION:
            log.info("SSH client {peer} disconnected: {reason}", peer=self._peer_for_log(), reason=text[:200])
        else:
            log.warn("SSH client {peer} disconnected with code {code}: {reason}", peer=self._peer_for_log(),
                     code=reasonCode, reason=text[:200])

    def disconnect_by_application(self, text):
        if isinstance(text, str):
            text = text.encode("utf-8", "replace")
        self.sendDisconnect(sshtransport.DISCONNECT_BY_APPLICATION, text)

    def close_for_shutdown(self):
        if self._lost:
            return defer.succeed(None)
        d = defer.Deferred()
        self._closed.addBoth(lambda r: d.callback(None))
        self.disconnect_by_application("server shutting down")
        return d

    # -- back-pressure from the TCP socket -----------------------------------

    def pauseProducing(self):
        self._tcp_paused = True
        for ch in self._forwarded_channels():
            ch.carrier_paused()

    def resumeProducing(self):
        self._tcp_paused = False
        for ch in self._forwarded_channels():
            ch.carrier_resumed()

    def stopProducing(self):
        pass

    def _forwarded_channels(self):
        service = self.service
        if not isinstance(service, ForwardingConnection):
            return []
        return [c for c in conch_private.channels(service) if isinstance(c, ForwardedChannel)]

    # -- login -----------------------------------------------------------------

    @defer.inlineCallbacks
    def login(self, tunnel, account):
        """Register the authenticated connection; True when it may go on."""
        svc = self.factory.exposr
        self._uncount()  # authenticated: no longer a login in progress
        conn = SSHTunnelConnection(self, tunnel, account, svc)
        try:
            ok = yield svc.connections.register(conn, account["id"])
        except Exception:
            log.failure("Registering SSH connection of {tunnel_id} failed", tunnel_id=conn.tunnel_id)
            ok = False
        if self._lost or self._closing:
            if ok:
                svc.connections.unregister(conn)
            return False
        if not ok:
            log.info(
                "SSH connection for {tunnel_id} from {peer} refused by the registry",
                tunnel_id=conn.tunnel_id,
                peer=conn.peer,
            )
            self.sendDisconnect(sshtransport.DISCONNECT_BY_APPLICATION, b"unable to establish tunnel")
            return False
        if self._grace_call is not None and self._grace_call.active():
            self._grace_call.cancel()
        self._grace_call = None
        self.tunnel_conn = conn
        self.avatar = TunnelAvatar(conn)
        self.logoutFunction = conn._gone
        self.sendPacket(userauth.MSG_USERAUTH_SUCCESS, b"")
        self.setService(ForwardingConnection())
        return True

    def _uncount(self):
        ip, self._counted_ip = self._counted_ip, None
        if ip is not None:
            svc = self.factory.exposr
            svc.unauthenticated[ip] -= 1
            if svc.unauthenticated[ip] <= 0:
                del svc.unauthenticated[ip]
            waiting = svc.logins_in_progress.get(ip)
            if waiting is not None:
                if self in waiting:
                    waiting.remove(self)
                if not waiting:
                    del svc.logins_in_progress[ip]

    def connectionLost(self, reason=None):
        self._lost = True
        self._uncount()
        self.factory.exposr.protocols.discard(self)
        for call in (self._grace_call, self._abort_call):
            if call is not None and call.active():
                call.cancel()
        self._grace_call = self._abort_call = None
        try:
            if self.service:
                self.service.serviceStopped()
        finally:
            self.service = None
            if self.tunnel_conn is not None:
                self.tunnel_conn._gone()
            self._closed.callback(None)


