"""`SSHTunnelConnection`: the `ITunnelConnection` the registry holds for one
logged-in SSH client. It keeps the client's remote forwards (adopting a
target from them), and ``open_stream`` opens a ``forwarded-tcpip`` channel
announcing the bind address and port the client asked for, speaking TLS to
the target itself when the target URL asks for it."""

import ipaddress
import struct
import uuid

from twisted.conch.ssh import common
from twisted.internet import defer, ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from exposr.errors import (
    ChannelLimitError,
    StreamOpenTimeoutError,
    StreamRefusedError,
    TransportClosedError,
)
from exposr.interfaces import ITunnelConnection
from exposr.transport.ssh import conch_private
from exposr.transport.ssh.channels import ForwardedChannel
from exposr.transport.ssh.shared import MAX_CHANNELS, MAX_FORWARDS, log
from exposr.transport.ssh.target import TLS_SCHEMES, forward_target, parse_url, valid_bind


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
            self._service.connections.unregister(self)
        except Exception:
            log.failure("unregistering {tunnel_id} failed", tunnel_id=self.tunnel_id)

    @property
    def closed(self):
        return self._gone_already or self._transport._lost or self._transport._closing

    def disconnect(self, reason="disconnected"):
        if not self.closed:
            self._transport.disconnect_by_application(str(reason))

    # -- forwards --------------------------------------------------------------

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

    # -- streams -----------------------------------------------------------------

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
        if conch_private.channel_count(conn) >= MAX_CHANNELS:
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
        channel = ForwardedChannel(self, factory_, d, conn)
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
        """The target URL when the server must speak TLS to it, else None."""
        url = parse_url(_target_of(self.tunnel))
        return url if url is not None and url.scheme in TLS_SCHEMES else None


def _client_tls(host, insecure):
    """TLS client options for a TLS target: SNI = host name."""
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
