"""The SSH transport (reference/ssh.md): tunnels carried by plain ``ssh -R``.

``ssh -R 0:localhost:3000 <tunnel>:<token>@host -p 2200`` logs in with the
tunnel's connection token, asks for a remote forward, and from then on every
upstream stream an ingress needs is one ``forwarded-tcpip`` channel the server
opens towards that client.

Layout (Conch pieces, all our own; nothing of ``twisted.conch.unix``):

* `SSHTransportService`: host key, factory, listener; tracks live connections.
* `_ServerTransport`: identification string, login grace timer, garbage
  tolerance, back-pressure from the TCP socket, disconnects.
* `_UserAuth`: ``<tunnel>:<token>`` user names (any method) or ``<tunnel>`` +
  password; every attempt evaluated (known-issues S2); registration in the
  connection registry before USERAUTH_SUCCESS (refused → disconnect, S5).
* `TunnelAvatar`: what an authenticated client may do: ``tcpip-forward``,
  ``cancel-tcpip-forward``, a ``session`` channel that only prints the banner.
* `_Connection`: the ``ssh-connection`` service: global requests answered in
  order (possibly asynchronously), window adjusts held back while a stream's
  reader is paused, keep-alives, strict channel bookkeeping.
* `SSHTunnelConnection`: the `ITunnelConnection` the registry holds;
  ``open_stream`` opens a ``forwarded-tcpip`` channel announcing the bind
  address and port the client asked for (S3) and hands the ingress a
  `StreamTransport` with producers both ways.
"""

import base64
import collections
import hashlib
import ipaddress
import struct
import uuid

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.application.service import Service
from twisted.conch.avatar import ConchUser
from twisted.conch.ssh import common, connection, factory, keys, userauth
from twisted.conch.ssh import transport as sshtransport
from twisted.conch.ssh.channel import SSHChannel
from twisted.internet import defer, ssl, task
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from exposr import __version__
from exposr.errors import (
    ChannelLimitError,
    StreamError,
    StreamOpenTimeoutError,
    StreamRefusedError,
    TransportClosedError,
)
from exposr.interfaces import ITunnelConnection
from exposr.listen import tcp_endpoint
from exposr.sockwrite import no_delay
from exposr.transport.ssh.target import (
    TLS_SCHEMES,
    forward_target,
    parse_url,
    render_target,
    valid_bind,
)
from exposr.transport.stream import StreamTransport

log = Logger(namespace="exposr.transport.ssh")


class _QuietLogger(Logger):
    """Conch's own per-connection info lines (kex, services, channels) as debug."""

    def info(self, format=None, **kwargs):
        self.debug(format, **kwargs)


_conch_log = _QuietLogger(namespace="exposr.transport.ssh.conch")

VERSION = __version__ if __version__.startswith("v") else "v" + __version__
BANNER = ("exposr/%s\r\n" % (VERSION,)).encode("ascii")

LOGIN_GRACE = 30.0  # seconds from TCP accept to USERAUTH_SUCCESS
MAX_UNAUTHENTICATED_PER_IP = 10  # connections still in handshake/login from one address
KEEPALIVE_INTERVAL = 15.0
KEEPALIVE_MAX_MISSED = 3
STREAM_OPEN_TIMEOUT = 10.0  # forwarded-tcpip open → confirmation (or first forward)
DISCONNECT_GRACE = 5.0  # sendDisconnect → abort if the peer does not close
MAX_AUTH_FAILURES = 3
MAX_FORWARDS = 16
MAX_SESSIONS = 4
MAX_CHANNELS = 1024
MAX_VERSION_PREAMBLE = 4096

LOCAL_WINDOW = 1024 * 1024  # what one stream may have in flight towards us
LOCAL_MAX_PACKET = 32 * 1024
MAX_REMOTE_PACKET = 64 * 1024  # we never send larger data packets than this
MAX_WINDOW = 0xFFFFFFFF

MSG_USERAUTH_BANNER = 53


class _ProtocolViolation(Exception):
    """The peer sent something we cannot make sense of."""


def fingerprint(key):
    """``SHA256:<unpadded base64>`` of the public key blob (what ssh-keygen -l prints)."""
    digest = hashlib.sha256(key.public().blob()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def load_host_key(text):
    """A private `keys.Key` from PEM text (OpenSSH or PKCS#8/PEM)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    try:
        key = keys.Key.fromString(data)
    except Exception as e:
        raise ValueError("transport-ssh-key: unusable host key (%s)" % (e,)) from None
    if key.isPublic():
        raise ValueError("transport-ssh-key: a private key is required")
    return key


def generate_host_key():
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


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


# -- the service ----------------------------------------------------------------


class SSHTransportService(Service):
    """
    ``SSHTransportService(config, tunnels, registry, node_id, reactor)``.

    `listen` (awaited by the start-up sequence; `startService` calls it too,
    once) loads or generates the host key and opens the listener on
    ``config.transport_ssh_port``. Afterwards ``port`` is the bound port number
    and ``fingerprint`` the host key's ``SHA256:...``.
    """

    name = "transport-ssh"

    def __init__(
        self,
        config,
        tunnels,
        registry,
        node_id,
        reactor,
        *,
        login_grace=LOGIN_GRACE,
        keepalive_interval=KEEPALIVE_INTERVAL,
        keepalive_max_missed=KEEPALIVE_MAX_MISSED,
        stream_open_timeout=STREAM_OPEN_TIMEOUT,
        endpoint=None,
    ):
        self.config = config
        self.tunnels = tunnels
        self.registry = registry
        self.node_id = node_id
        self.reactor = reactor
        self.login_grace = login_grace
        self.keepalive_interval = keepalive_interval
        self.keepalive_max_missed = keepalive_max_missed
        self.stream_open_timeout = stream_open_timeout
        self.endpoint = endpoint
        self.host_key = None
        self.fingerprint = None
        self.port = None
        self.listening_port = None
        self.protocols = set()  # live _ServerTransport instances
        self.max_unauthenticated_per_ip = MAX_UNAUTHENTICATED_PER_IP
        self.unauthenticated = collections.Counter()  # peer IP -> connections not yet logged in
        self._listening = None
        self._waiting_close = []

    # -- key ---------------------------------------------------------------

    def _load_key(self):
        if self.host_key is not None:
            return
        text = self.config.transport_ssh_key
        if text:
            self.host_key = load_host_key(text)
            origin = "configured"
        else:
            self.host_key = generate_host_key()
            origin = "generated"
        self.fingerprint = fingerprint(self.host_key)
        log.info(
            "SSH host key {origin}: {key_type} {fingerprint}",
            origin=origin,
            key_type=self.host_key.sshType().decode("ascii"),
            fingerprint=self.fingerprint,
        )

    # -- listening ---------------------------------------------------------

    def listen(self):
        """Open the listener (once); a Deferred firing with the `IListeningPort`."""
        if self._listening is None:
            self._listening = []
            self._outcome = None

            def done(result):
                self._outcome = result
                waiters, self._listening = self._listening, ()
                for d in waiters:
                    (d.errback if isinstance(result, Failure) else d.callback)(result)

            defer.maybeDeferred(self._listen).addBoth(done)
        if self._outcome is not None:
            if isinstance(self._outcome, Failure):
                return defer.fail(self._outcome)
            return defer.succeed(self._outcome)
        d = defer.Deferred()
        self._listening.append(d)
        return d

    @defer.inlineCallbacks
    def _listen(self):
        self._load_key()
        endpoint = self.endpoint or tcp_endpoint(
            self.reactor, self.config.transport_ssh_port, self.config.listen_address
        )
        port = yield endpoint.listen(_Factory(self))
        self.listening_port = port
        self.port = port.getHost().port
        return port

    @property
    def address(self):
        return self.listening_port.getHost() if self.listening_port is not None else None

    def startService(self):
        Service.startService(self)
        if self._listening is None:
            self.listen().addErrback(
                lambda f: log.failure("SSH transport failed to listen", failure=f)
            )

    def stopService(self):
        Service.stopService(self)
        port, self.listening_port = self.listening_port, None
        stopped = defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
        closing = [p.close_for_shutdown() for p in list(self.protocols)]
        return defer.gatherResults([stopped] + closing, consumeErrors=True).addCallback(lambda _: None)


class _Factory(factory.SSHFactory):
    # no /etc/ssh/moduli: fixed groups and curves only
    primes = None

    def __init__(self, service):
        self.exposr = service
        key = service.host_key
        self.publicKeys = {key.sshType(): key.public()}
        self.privateKeys = {key.sshType(): key}
        self.services = {b"ssh-userauth": _UserAuth, b"ssh-connection": _Connection}
        self.noisy = False

    def getPrimes(self):
        return None

    def getService(self, transport, service):
        if service == b"ssh-userauth" and getattr(transport, "avatar", None) is None:
            return _UserAuth
        return None  # ssh-connection is started by _UserAuth itself



# -- the transport ----------------------------------------------------------------


class _ServerTransport(sshtransport.SSHServerTransport):
    ourVersionString = b"SSH-2.0-exposr/" + VERSION.encode("ascii")
    _log = _conch_log

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
        if svc.unauthenticated[ip] >= svc.max_unauthenticated_per_ip:
            # a scanner or a flood: the address already has that many logins
            # in progress; close before any key exchange work
            log.info("SSH connection from {peer} refused: {n} logins in progress", peer=ip,
                     n=svc.unauthenticated[ip])
            self._lost = True
            self.transport.abortConnection()
            return
        svc.unauthenticated[ip] += 1
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
        if not isinstance(service, _Connection):
            return []
        return [c for c in list(service.channels.values()) if isinstance(c, _ForwardedChannel)]

    # -- login -----------------------------------------------------------------

    @defer.inlineCallbacks
    def login(self, tunnel, account):
        """Register the authenticated connection; True when it may go on."""
        svc = self.factory.exposr
        self._uncount()  # authenticated: no longer a login in progress
        conn = SSHTunnelConnection(self, tunnel, account, svc)
        try:
            ok = yield svc.registry.register(conn, account["id"])
        except Exception:
            log.failure("Registering SSH connection of {tunnel_id} failed", tunnel_id=conn.tunnel_id)
            ok = False
        if self._lost or self._closing:
            if ok:
                svc.registry.unregister(conn)
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
        self.setService(_Connection())
        return True

    def _uncount(self):
        ip, self._counted_ip = self._counted_ip, None
        if ip is not None:
            unauthenticated = self.factory.exposr.unauthenticated
            unauthenticated[ip] -= 1
            if unauthenticated[ip] <= 0:
                del unauthenticated[ip]

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


_Factory.protocol = _ServerTransport


# -- authentication ---------------------------------------------------------------


class _UserAuth(userauth.SSHUserAuthServer):
    """ssh.md 7.3 with the recommended fixes."""

    _log = _conch_log

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
            raise _ProtocolViolation("too many pipelined authentication requests")
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
        try:
            result = yield svc.tunnels.authorize(tunnel_id, token)
        except Exception as e:
            log.warn("SSH login check for {tunnel_id} failed: {error}", tunnel_id=tunnel_id, error=repr(e))
            result = None
        if self._done or self.transport._lost:
            return
        if not result:
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


# -- the avatar ---------------------------------------------------------------------


class TunnelAvatar(ConchUser):
    """What an authenticated tunnel client may do on its SSH connection."""

    def __init__(self, tunnel_conn):
        ConchUser.__init__(self)
        self.tunnel_conn = tunnel_conn
        self.channelLookup = {b"session": _SessionChannel}

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
            self.conn.no_more_sessions = True
            return True
        return False


# -- the connection service ----------------------------------------------------------


class _Connection(connection.SSHConnection):
    _log = _conch_log

    no_more_sessions = False

    def serviceStarted(self):
        connection.SSHConnection.serviceStarted(self)
        self.tunnel = self.transport.tunnel_conn
        self.sessions = 0
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

    def ssh_REQUEST_SUCCESS(self, packet):
        if self.deferreds["global"]:
            self.deferreds["global"].pop(0).callback(packet)

    def ssh_REQUEST_FAILURE(self, packet):
        if self.deferreds["global"]:
            self.deferreds["global"].pop(0).callback(None)

    # -- global requests, answered in order ------------------------------------

    def ssh_GLOBAL_REQUEST(self, packet):
        request_type, rest = common.getNS(packet)
        if not rest:
            raise _ProtocolViolation("truncated global request")
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
        sender, window, max_packet = struct.unpack(">3L", rest[:12])
        channel = None
        if (
            channel_type == b"session"
            and not self.no_more_sessions
            and self.sessions < MAX_SESSIONS
            and len(self.channels) < MAX_CHANNELS
            and max_packet > 0
        ):
            channel = _SessionChannel(
                remoteWindow=window,
                remoteMaxPacket=min(max_packet, MAX_REMOTE_PACKET),
                conn=self,
                avatar=self.transport.avatar,
            )
        if channel is None:
            self.transport.sendPacket(
                connection.MSG_CHANNEL_OPEN_FAILURE,
                struct.pack(">2L", sender, connection.OPEN_ADMINISTRATIVELY_PROHIBITED)
                + common.NS(b"not supported")
                + common.NS(b""),
            )
            return
        self.sessions += 1
        local = self.localChannelID
        self.localChannelID += 1
        channel.id = local
        self.channels[local] = channel
        self.channelsToRemoteChannel[channel] = sender
        self.localToRemoteChannel[local] = sender
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_CONFIRMATION,
            struct.pack(">4L", sender, local, channel.localWindowSize, channel.localMaxPacket),
        )
        channel.channelOpen(b"")

    # -- channels we opened ------------------------------------------------------

    def openChannel(self, channel, extra=b""):
        # as Conch's, without an info log line per stream
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN,
            common.NS(channel.name)
            + struct.pack(">3L", self.localChannelID, channel.localWindowSize, channel.localMaxPacket)
            + extra,
        )
        channel.id = self.localChannelID
        self.channels[self.localChannelID] = channel
        self.localChannelID += 1

    def _channel(self, packet):
        (local,) = struct.unpack(">L", packet[:4])
        return self.channels.get(local)

    def ssh_CHANNEL_OPEN_CONFIRMATION(self, packet):
        local, remote, window, max_packet = struct.unpack(">4L", packet[:16])
        channel = self.channels.get(local)
        if channel is None or channel in self.channelsToRemoteChannel:
            raise _ProtocolViolation("confirmation for an unknown channel")
        channel.conn = self
        self.localToRemoteChannel[local] = remote
        self.channelsToRemoteChannel[channel] = remote
        channel.remoteWindowLeft = window
        channel.remoteMaxPacket = min(max_packet, MAX_REMOTE_PACKET)
        if max_packet == 0:
            self.sendClose(channel)
            channel.openFailed(StreamRefusedError("zero maximum packet size"))
            return
        channel.channelOpen(packet[16:])

    def ssh_CHANNEL_OPEN_FAILURE(self, packet):
        local, code = struct.unpack(">2L", packet[:8])
        channel = self.channels.get(local)
        if channel is None or channel in self.channelsToRemoteChannel:
            raise _ProtocolViolation("open failure for an unknown channel")
        del self.channels[local]
        try:
            desc = common.getNS(packet[8:])[0].decode("utf-8", "replace")
        except Exception:
            desc = ""
        channel.openFailed(StreamRefusedError("open refused (%d) %s" % (code, desc[:200])))

    # -- data and window: held back while the reader is paused ------------------

    def _open_channel(self, packet):
        channel = self._channel(packet)
        if channel is None or channel not in self.channelsToRemoteChannel:
            raise _ProtocolViolation("message for an unknown channel")
        return channel

    def ssh_CHANNEL_WINDOW_ADJUST(self, packet):
        channel = self._open_channel(packet)
        (add,) = struct.unpack(">L", packet[4:8])
        add = min(add, MAX_WINDOW - channel.remoteWindowLeft)
        channel.addWindowBytes(add)

    def ssh_CHANNEL_DATA(self, packet):
        channel = self._open_channel(packet)
        data = common.getNS(packet[4:])[0]
        self._data(channel, data, None)

    def ssh_CHANNEL_EXTENDED_DATA(self, packet):
        channel = self._open_channel(packet)
        (type_code,) = struct.unpack(">L", packet[4:8])
        data = common.getNS(packet[8:])[0]
        self._data(channel, data, type_code)

    def _data(self, channel, data, type_code):
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
        if channel.localClosed or getattr(channel, "window_held", False):
            return
        if channel.localWindowLeft < channel.localWindowSize // 2:
            self.adjustWindow(channel, channel.localWindowSize - channel.localWindowLeft)

    def ssh_CHANNEL_EOF(self, packet):
        self._open_channel(packet).eofReceived()

    def ssh_CHANNEL_CLOSE(self, packet):
        channel = self._open_channel(packet)
        channel.closeReceived()
        channel.remoteClosed = True
        if channel.localClosed and channel.remoteClosed:
            self.channelClosed(channel)

    def ssh_CHANNEL_REQUEST(self, packet):
        self._open_channel(packet)
        return connection.SSHConnection.ssh_CHANNEL_REQUEST(self, packet)

    def _cbChannelRequest(self, result, localChannel):
        if localChannel not in self.localToRemoteChannel:
            return
        if not result:
            return self._ebChannelRequest(None, localChannel)
        self.transport.sendPacket(
            connection.MSG_CHANNEL_SUCCESS, struct.pack(">L", self.localToRemoteChannel[localChannel])
        )

    def _ebChannelRequest(self, result, localChannel):
        if localChannel not in self.localToRemoteChannel:
            return
        self.transport.sendPacket(
            connection.MSG_CHANNEL_FAILURE, struct.pack(">L", self.localToRemoteChannel[localChannel])
        )

    def ssh_CHANNEL_SUCCESS(self, packet):
        pass

    def ssh_CHANNEL_FAILURE(self, packet):
        pass

    def sendClose(self, channel):
        # as Conch's, without an info log line per stream
        if channel.localClosed:
            return
        self.transport.sendPacket(
            connection.MSG_CHANNEL_CLOSE, struct.pack(">L", self.channelsToRemoteChannel[channel])
        )
        channel.localClosed = True
        if channel.localClosed and channel.remoteClosed:
            self.channelClosed(channel)


# -- channels -------------------------------------------------------------------------


class _QuietChannel(SSHChannel):
    """Conch's channel without the per-event info log lines."""

    _log = _conch_log

    def channelOpen(self, specificData):
        pass

    def eofReceived(self):
        pass

    def closed(self):
        pass

    def requestReceived(self, requestType, data):
        f = getattr(self, "request_" + requestType.replace(b"-", b"_").decode("ascii", "replace"), None)
        if f is None:
            return False
        return f(data)

    def drop(self):
        """Close now, discarding what the window did not let through."""
        self.buf = b""
        self.extBuf = []
        self.closing = 1
        self.conn.sendClose(self)


class _SessionChannel(_QuietChannel):
    """ssh.md 7.7: prints the target and ingress URLs; EOF or Ctrl-C ends it all."""

    name = b"session"

    def request_pty_req(self, data):
        return True

    def request_window_change(self, data):
        return True

    def request_shell(self, data):
        d = self.conn.when_idle()  # forwards asked for before the shell first
        d.addCallback(lambda _: self._banner())
        d.addCallback(lambda _: True)
        return d

    def _banner(self):
        if self.localClosed:
            return
        tunnel = self.conn.tunnel.tunnel or {}
        lines = ["Target URL: %s" % (render_target((tunnel.get("target") or {}).get("url")),)]
        ingress = tunnel.get("ingress") or {}
        http = ingress.get("http") or {}
        if http.get("enabled") and http.get("url"):
            lines.append("HTTP ingress: %s" % (http["url"],))
        sni = ingress.get("sni") or {}
        if sni.get("enabled") and sni.get("url"):
            lines.append("SNI ingress: %s" % (sni["url"],))
        self.write("".join(line + "\r\n" for line in lines).encode("utf-8"))

    def dataReceived(self, data):
        if data[:1] == b"\x03":
            self._end("interrupted")

    def eofReceived(self):
        self._end("end of input")

    def closeReceived(self):
        self._end("session closed")

    def _end(self, why):
        self.conn.tunnel.disconnect("tunnel closed (%s)" % (why,))


class _ForwardedChannel(_QuietChannel):
    """One upstream stream: a ``forwarded-tcpip`` channel we opened (ssh.md 7.8)."""

    name = b"forwarded-tcpip"

    def __init__(self, tunnel_conn, protocol_factory, deferred, conn):
        _QuietChannel.__init__(self, localWindow=LOCAL_WINDOW, localMaxPacket=LOCAL_MAX_PACKET, conn=conn)
        self.tunnel_conn = tunnel_conn
        self.factory = protocol_factory
        self.deferred = deferred
        self.stream = None
        self.window_held = False
        self.peer_closed = False
        self.abandoned = False  # timed out or cancelled before it opened
        self.unwrap = False  # the stream is TLS to the target: hand out the inner protocol
        self.timeout_call = None

    # -- opening -----------------------------------------------------------

    def _settle(self):
        if self.timeout_call is not None and self.timeout_call.active():
            self.timeout_call.cancel()
        self.timeout_call = None

    def channelOpen(self, specificData):
        self._settle()
        if self.abandoned:
            self.drop()
            return
        transport = self.conn.transport
        peer = transport.transport.getPeer()
        host = transport.transport.getHost()
        try:
            protocol = self.factory.buildProtocol(peer)
        except Exception:
            log.failure("building the stream protocol failed")
            protocol = None
        if protocol is None:
            self.abandoned = True
            self.drop()
            self.deferred.errback(StreamRefusedError("no protocol"))
            return
        stream = StreamTransport(self, host, peer)
        self.stream = stream
        if transport._tcp_paused:
            stream.carrier_paused()
        if self.remoteWindowLeft <= 0:
            self.areWriting = 0
            stream.peer_paused()
        d, self.deferred = self.deferred, None
        stream.attach(protocol)
        d.callback(protocol.wrappedProtocol if self.unwrap else protocol)

    def openFailed(self, reason):
        self._settle()
        self.tunnel_conn._stream_closed(self)
        if self.abandoned or self.deferred is None:
            return
        d, self.deferred = self.deferred, None
        if not isinstance(reason, StreamError):
            reason = TransportClosedError("SSH connection closed")  # Conch: ConnectionLost
        d.errback(reason)

    def abandon(self):
        """Timed out or cancelled: close it if it ever opens."""
        self.abandoned = True
        self.deferred = None
        self._settle()
        if self.conn is not None and self in self.conn.channelsToRemoteChannel:
            self.drop()

    # -- what StreamTransport calls -------------------------------------------

    def close(self, error_text=None):
        if self.localClosed:
            return
        if error_text is not None:
            self.drop()
        else:
            self.loseConnection()

    def pause(self):
        self.window_held = True

    def resume(self):
        if self.window_held:
            self.window_held = False
            if not self.localClosed:
                self.conn.maybe_adjust(self)

    def carrier_paused(self):
        if self.stream is not None:
            self.stream.carrier_paused()

    def carrier_resumed(self):
        if self.stream is not None:
            self.stream.carrier_resumed()

    # -- Conch events ----------------------------------------------------------

    def addWindowBytes(self, data):
        # as Conch's, but the producer is resumed only once the backlog is out
        self.remoteWindowLeft += data
        if self.buf:
            backlog, self.buf = self.buf, b""
            self.write(backlog)
        if not self.buf and not self.areWriting and not self.closing:
            self.areWriting = 1
            self.startWriting()

    def stopWriting(self):
        if self.stream is not None:
            self.stream.peer_paused()

    def startWriting(self):
        if self.stream is not None:
            self.stream.peer_resumed()

    def dataReceived(self, data):
        if self.stream is not None:
            self.stream.data_received(data)

    def eofReceived(self):
        # the client's target closed its side: finish what we have, then close
        self.loseConnection()

    def closeReceived(self):
        # the peer will not take more data: anything still buffered is lost
        self.peer_closed = True
        self.drop()

    def closed(self):
        self._settle()
        self.tunnel_conn._stream_closed(self)
        if self.deferred is not None:
            d, self.deferred = self.deferred, None
            d.errback(TransportClosedError("SSH connection closed"))
        if self.stream is not None:
            self.stream.connection_lost(None if self.peer_closed else "connection lost")


# -- the tunnel connection ---------------------------------------------------------------


@implementer(ITunnelConnection)
class SSHTunnelConnection:
    """One authenticated SSH client carrying a tunnel."""

    local = True

    def __init__(self, transport, tunnel, account, service):
        self._transport = transport
        self._service = service
        self.tunnel = tunnel
        self.tunnel_id = tunnel["id"]
        self.account_id = account["id"]
        self.connection_id = "%s:%s" % (service.node_id, uuid.uuid4())
        self.peer = transport.peer_ip
        self.forwards = []  # [(bind address, bind port, announced port)], oldest first
        self._conn = None
        self._waiters = []
        self._forward_watchers = []
        self._streams = set()
        self._gone_already = False
        self._next_alloc = 49152

    def __repr__(self):
        return "<SSHTunnelConnection %s %s>" % (self.tunnel_id, self.connection_id)

    # -- life cycle ------------------------------------------------------------

    def _attach(self, conn):
        self._conn = conn

    def _gone(self):
        if self._gone_already:
            return
        self._gone_already = True
        for d in self._waiters:
            d.errback(TransportClosedError("SSH connection closed"))
        self._waiters = []
        try:
            self._service.registry.unregister(self)
        except Exception:
            log.failure("unregistering {tunnel_id} failed", tunnel_id=self.tunnel_id)

    @property
    def closed(self):
        return self._gone_already or self._transport._lost or self._transport._closing

    def disconnect(self, reason="disconnected"):
        if not self.closed:
            self._transport.disconnect_by_application(str(reason))

    # -- forwards (ssh.md 7.6) --------------------------------------------------

    def _allocate(self, address):
        used = {(a, p) for a, _, p in self.forwards}
        while (address, self._next_alloc) in used:
            self._next_alloc += 1
        port = self._next_alloc
        self._next_alloc += 1
        return port

    @defer.inlineCallbacks
    def add_forward(self, address, port):
        try:
            address = address.decode("utf-8")
        except UnicodeDecodeError:
            return False
        if not valid_bind(address, port) or len(self.forwards) >= MAX_FORWARDS:
            log.info(
                "SSH forward request of {tunnel_id} refused: {address!r}:{port}",
                tunnel_id=self.tunnel_id,
                address=address[:80],
                port=port,
            )
            return False
        tunnels = self._service.tunnels
        try:
            current = yield tunnels.get(self.tunnel_id)
        except Exception as e:
            log.warn("reading tunnel {tunnel_id} failed: {error}", tunnel_id=self.tunnel_id, error=repr(e))
            current = self.tunnel
        if current is None:
            return False  # deleted meanwhile
        decision = forward_target(_target_of(current), address, port)
        if decision.new_target is not None:

            def change(record):
                again = forward_target(_target_of(record), address, port)
                if again.new_target is not None:
                    record.setdefault("target", {})["url"] = again.new_target

            try:
                current = yield tunnels.update(self.tunnel_id, change, account_id=self.account_id)
            except Exception as e:
                log.warn("updating the target of {tunnel_id} failed: {error}", tunnel_id=self.tunnel_id, error=repr(e))
            else:
                log.info(
                    "Tunnel {tunnel_id} target set to {target} from an SSH forward",
                    tunnel_id=self.tunnel_id,
                    target=_target_of(current),
                )
            decision = forward_target(_target_of(current), address, port)
        self.tunnel = current
        if self.closed:
            return False
        if port == 0:
            announced = decision.reply_port
            if not announced or any(a == address and p == announced for a, _, p in self.forwards):
                announced = self._allocate(address)
            payload = struct.pack(">L", announced)
        else:
            announced, payload = port, b""

        def activate():
            # only once the reply is on the wire: the client must know the
            # allocated port before a channel announces it
            if self.closed:
                return
            self.forwards.append((address, port, announced))
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)
            ready = [(n, d) for n, d in self._forward_watchers if len(self.forwards) >= n]
            self._forward_watchers = [w for w in self._forward_watchers if w not in ready]
            for _, d in ready:
                d.callback(self)

        return True, payload, activate

    def when_forwarded(self, count=1):
        """Fires once the client has ``count`` active forwards (tests, diagnostics)."""
        if len(self.forwards) >= count:
            return defer.succeed(self)
        d = defer.Deferred()
        self._forward_watchers.append((count, d))
        return d

    def cancel_forward(self, address, port):
        try:
            address = address.decode("utf-8")
        except UnicodeDecodeError:
            return False
        for i in range(len(self.forwards) - 1, -1, -1):
            a, requested, announced = self.forwards[i]
            if a == address and port in (requested, announced):
                del self.forwards[i]
                return True
        return False

    # -- streams (ssh.md 7.8) ----------------------------------------------------

    def open_stream(self, protocolFactory):
        if self.closed:
            return defer.fail(TransportClosedError("SSH connection closed"))
        if self._conn is not None and self.forwards:
            return self._open(protocolFactory)
        # logged in, forward not (yet) received: wait a little for it
        waiter = defer.Deferred()
        self._waiters.append(waiter)
        reactor = self._service.reactor
        timer = reactor.callLater(self._service.stream_open_timeout, self._no_forward, waiter)

        def ready(_):
            if timer.active():
                timer.cancel()
            if self.closed:
                raise TransportClosedError("SSH connection closed")
            return self._open(protocolFactory)

        def failed(f):
            if timer.active():
                timer.cancel()
            return f

        return waiter.addCallbacks(ready, failed)

    def _no_forward(self, waiter):
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            waiter.errback(StreamOpenTimeoutError("the SSH client asked for no forward"))

    def _open(self, protocolFactory):
        conn = self._conn
        if not self.forwards:
            return defer.fail(StreamRefusedError("no remote forward"))
        if len(conn.channels) >= MAX_CHANNELS:
            return defer.fail(ChannelLimitError("too many SSH channels"))
        address, _, port = self.forwards[-1]
        originator = getattr(protocolFactory, "originator", None) or ""
        if not isinstance(originator, str):
            originator = ""

        def cancel(d):
            channel.abandon()

        d = defer.Deferred(cancel)
        tls = self.tls_target
        if tls is not None:
            factory_ = TLSMemoryBIOFactory(
                _client_tls(tls.host, self._service.config.transport_ssh_allow_insecure_target),
                True,
                protocolFactory,
            )
        else:
            factory_ = protocolFactory
        channel = _ForwardedChannel(self, factory_, d, conn)
        channel.unwrap = tls is not None
        extra = (
            common.NS(address.encode("utf-8"))
            + struct.pack(">L", port)
            + common.NS(originator.encode("utf-8"))
            + struct.pack(">L", port)
        )
        conn.openChannel(channel, extra)
        self._streams.add(channel)
        reactor = self._service.reactor
        channel.timeout_call = reactor.callLater(self._service.stream_open_timeout, self._open_timeout, channel)
        return d

    def _open_timeout(self, channel):
        channel.timeout_call = None
        d, channel.deferred = channel.deferred, None
        channel.abandon()
        if d is not None:
            d.errback(StreamOpenTimeoutError("the SSH client did not answer the channel open"))

    def _stream_closed(self, channel):
        self._streams.discard(channel)

    @property
    def tls_target(self):
        """The target URL when the server must speak TLS to it (ssh.md 7.8), else None."""
        url = parse_url(_target_of(self.tunnel))
        return url if url is not None and url.scheme in TLS_SCHEMES else None


def _client_tls(host, insecure):
    """TLS client options for a TLS target (ssh.md 7.8): SNI = host name."""
    hostname = host[1:-1] if host.startswith("[") else host
    if not insecure:
        return ssl.optionsForClientTLS(hostname)
    return _InsecureClientTLS(hostname)


@implementer(IOpenSSLClientConnectionCreator)
class _InsecureClientTLS:
    """``--transport-ssh-allow-insecure-target``: no verification, SNI still sent."""

    def __init__(self, hostname):
        self._hostname = hostname
        self._context = ssl.CertificateOptions().getContext()

    def clientConnectionForTLS(self, tlsProtocol):
        from OpenSSL import SSL

        connection_ = SSL.Connection(self._context, None)
        connection_.set_app_data(tlsProtocol)
        try:
            ipaddress.ip_address(self._hostname)
        except ValueError:
            if self._hostname:
                connection_.set_tlsext_host_name(self._hostname.encode("idna"))
        return connection_


def _target_of(tunnel):
    return ((tunnel or {}).get("target") or {}).get("url")


__all__ = [
    "SSHTransportService",
    "SSHTunnelConnection",
    "TunnelAvatar",
    "fingerprint",
    "generate_host_key",
    "load_host_key",
]
