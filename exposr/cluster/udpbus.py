"""The cluster bus over UDP (``--cluster udp``).

Two sockets, both with address reuse (``SO_REUSEADDR`` and ``SO_REUSEPORT``),
on the bus port (``--cluster-udp-port``, the same on every node): IPv4 on
``0.0.0.0`` (or the IPv4 ``--listen-address``) and IPv6 on ``[::]`` (or the
IPv6 ``--listen-address``), IPv6 only, so that IPv4 datagrams reach the IPv4
socket alone. The bus starts when at least one of them is bound; ``ready``
fails with `BusUnavailable` when neither is.

Every published message is one datagram (`exposr.cluster.datagram`), sent to
each address the discovery gives (`exposr.cluster.discovery`), IPv6 addresses
through the IPv6 socket. This node receives its own messages as any other
(multicast loop-back, or its own address among the peers).

With multicast discovery the IPv4 socket joins the group on one explicitly
chosen interface, the one of the node's advertised IPv4 address
(``--cluster-node-ip``), and sends through that interface with loop-back on
and the configured TTL (``--cluster-udp-discovery-multicast-ttl``, 1 by
default: one subnet; 0: this host only). That socket binds ``0.0.0.0`` even
with a ``--listen-address``: a socket bound to a unicast address never
receives group datagrams.

Receiving is bounded: at most `MAX_READS` datagrams per event-loop turn are
read, into one reused buffer; a datagram that is too short, too long or not
ours (`datagram.check`) is dropped before it is copied or parsed. Every drop
is counted in ``rejected`` and logged at most once per reason per interval, as
envelope errors are.
"""

import errno
import ipaddress
import socket

from twisted.internet import defer, error, udp
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from exposr.cluster import datagram
from exposr.cluster.bus import BusUnavailable, SignedBus
from exposr.cluster.envelope import EnvelopeError, Oversized, encode

log = Logger(namespace="exposr.cluster.udp")

PORT = 1025
MAX_READS = 64  # datagrams read per event-loop turn at most
RECEIVE_BUFFER = 1 << 20  # bytes of socket receive buffer asked for (the kernel may give less)
SEND_LOG_INTERVAL = 60.0  # seconds between two warnings about failed sends
_EVENT_ROOM = 32  # characters of an event name the payload budget leaves room for
_RETRY_READ = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR}


class Foreign(EnvelopeError):
    """Not a datagram of the bus: 5 bytes or fewer, or no magic."""

    reason = "foreign"


class _Port(udp.MulticastPort):
    """
    A UDP port that reads at most ``max_reads`` datagrams per call, into one
    buffer reused for every read, and hands ``(buffer, length, address)`` to
    its protocol's ``received`` (Twisted's own loop reads up to 256 KiB per
    call: thousands of small datagrams). The reactor calls it again on its
    next turn while datagrams are waiting. An IPv6 port is IPv6 only; the
    receive buffer is `RECEIVE_BUFFER` (bursts of announcements from many
    nodes) where the system allows it.
    """

    max_reads = MAX_READS

    def createInternetSocket(self):
        skt = udp.MulticastPort.createInternetSocket(self)
        try:
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        except OSError:
            pass  # the system default then
        if self.addressFamily == socket.AF_INET6:
            skt.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return skt

    def startListening(self):
        # one byte more than the largest datagram: a longer one shows as too long
        self._buffer = bytearray(datagram.MAX_DATAGRAM + 1)
        udp.MulticastPort.startListening(self)

    def doRead(self):
        buffer = self._buffer
        received = self.protocol.received
        recv_into = self.socket.recvfrom_into
        for _ in range(self.max_reads):
            try:
                n, addr = recv_into(buffer)
            except OSError as e:
                if e.errno not in _RETRY_READ:
                    # (an ICMP error of an earlier send, for one): the socket stays usable
                    log.debug("Cluster bus read error: {error}", error=e)
                return
            received(buffer, n, addr)


class _Receiver(DatagramProtocol):
    noisy = False

    def __init__(self, bus):
        self.bus = bus

    def received(self, buffer, n, addr):
        self.bus._datagram(buffer, n)

    def datagramReceived(self, data, addr):
        self.bus._datagram(data, len(data))


def _family(address):
    return socket.AF_INET6 if ":" in address else socket.AF_INET


class UDPBus(SignedBus):
    """
    ``UDPBus(node, key, reactor, discovery, port=1025, listen_address="",
    multicast_group=None, multicast_ttl=1, max_reads=64)``.

    ``discovery`` has ``peers()`` (a Deferred of addresses); with
    ``multicast_group`` set the IPv4 socket joins that group on the interface
    of ``node.ip``. ``ready`` fires once the sockets are bound (and the group
    joined), or fails with `BusUnavailable`. ``max_payload`` is the largest
    message (its compact JSON, in bytes) that still fits one datagram.
    """

    def __init__(self, node, key, reactor, discovery, port=PORT, listen_address="",
                 multicast_group=None, multicast_ttl=1, max_reads=MAX_READS, **kwargs):
        SignedBus.__init__(self, node, key, reactor, **kwargs)
        self.reactor = reactor
        self.discovery = discovery
        self.port = port
        self.listen_address = listen_address or ""
        self.multicast_group = multicast_group
        self.multicast_ttl = multicast_ttl
        self.max_reads = max_reads
        self.ready = defer.Deferred()
        self.sent = 0  # datagrams handed to the kernel
        self.send_errors = 0
        self._v4 = None
        self._v6 = None
        self._send_warned_at = None
        unsafe = 2**53 - 1
        skeleton = encode("e" * _EVENT_ROOM, [], node, unsafe, unsafe, self._key)
        self.max_payload = datagram.MAX_ENVELOPE - len(skeleton) + len("[]")

    # -- life cycle ----------------------------------------------------------

    def _addresses(self):
        """(IPv4 bind address, IPv6 bind address)."""
        v4, v6 = "0.0.0.0", "::"
        if self.listen_address:
            if _family(self.listen_address) == socket.AF_INET6:
                v6 = self.listen_address
            elif self.multicast_group is None:
                v4 = self.listen_address
        return v4, v6

    def _listen(self, interface):
        p = _Port(self.port, _Receiver(self), interface, datagram.MAX_DATAGRAM + 1, self.reactor,
                  listenMultiple=True)
        p.max_reads = self.max_reads
        p.startListening()
        return p

    def startService(self):
        SignedBus.startService(self)
        v4, v6 = self._addresses()
        failures = []
        for family, interface in (("_v4", v4), ("_v6", v6)):
            try:
                setattr(self, family, self._listen(interface))
            except error.CannotListenError as e:
                failures.append("%s: %s" % (_where(interface, self.port), e.socketError))
        if self._v4 is None and self._v6 is None:
            self.ready.errback(BusUnavailable("cannot bind the UDP cluster port: " + "; ".join(failures)))
            return self.ready
        for failure in failures:
            log.warn("Cluster bus not listening on {failure}", failure=failure)
        bound = [_where(p.getHost().host, self.port) for p in (self._v4, self._v6) if p is not None]
        log.info("Cluster bus listening on UDP {addresses}", addresses=", ".join(bound))
        if self.multicast_group is None:
            self.ready.callback(self)
        else:
            self._join().addCallbacks(lambda _: self.ready.callback(self), self.ready.errback)
        return self.ready

    def multicast_interface(self):
        """The IPv4 address of the interface the group is joined on ("" when the node's ip is IPv6)."""
        ip = self.node.ip
        try:
            return ip if ipaddress.ip_address(ip).version == 4 else ""
        except ValueError:
            return ""

    @defer.inlineCallbacks
    def _join(self):
        port, group, interface = self._v4, self.multicast_group, self.multicast_interface()
        if port is None:
            raise BusUnavailable("multicast discovery needs the IPv4 UDP socket, which is not bound")
        port.setLoopbackMode(1)
        port.setTTL(self.multicast_ttl)
        try:
            if interface:
                yield port.setOutgoingInterface(interface)
            yield port.joinGroup(group, interface)
        except Exception as e:
            raise BusUnavailable("cannot join multicast group %s on %s: %s"
                                 % (group, interface or "the default interface", _reason(e)))
        log.info("Cluster bus joined multicast group {group} on {interface} (TTL {ttl})", group=group,
                 interface=interface or "the default interface", ttl=self.multicast_ttl)

    def stopService(self):
        SignedBus.stopService(self)
        ports = [p for p in (self._v4, self._v6) if p is not None]
        self._v4 = self._v6 = None
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports],
                                   consumeErrors=True).addBoth(lambda _: None)

    # -- sending -------------------------------------------------------------

    def _send(self, data):
        try:
            packet = datagram.pack(data)
        except datagram.TooLarge as e:
            return defer.fail(BusUnavailable("message not sent: %s" % e))
        return self.discovery.peers().addCallback(self._send_to, packet)

    def _send_to(self, addresses, packet):
        if not self.running:
            raise BusUnavailable("the cluster bus stopped")
        sent = 0
        for address in addresses:
            port = self._v6 if _family(address) == socket.AF_INET6 else self._v4
            if port is None:
                continue
            try:
                port.write(packet, (address, self.port))
            except (OSError, error.MessageLengthError, error.InvalidAddressError) as e:
                self._send_failed(address, e)
                continue
            sent += 1
        self.sent += sent
        return sent

    def _send_failed(self, address, e):
        self.send_errors += 1
        now = self.clock.seconds()
        if self._send_warned_at is None or now - self._send_warned_at >= SEND_LOG_INTERVAL:
            self._send_warned_at = now
            log.warn("Cluster message not sent to {address}: {error} ({count} failed sends so far)",
                     address=address, error=_reason(e), count=self.send_errors)

    # -- receiving -----------------------------------------------------------

    def _datagram(self, buffer, n):
        """One received datagram: the first ``n`` bytes of ``buffer`` (reused by the next read)."""
        if n > datagram.MAX_DATAGRAM:
            self._dropped(Oversized("a datagram of more than %d bytes" % datagram.MAX_DATAGRAM))
        elif not datagram.check(memoryview(buffer)[:n]):
            self._dropped(Foreign("a datagram of %d bytes without the bus header" % n))
        else:
            self._deliver(bytes(memoryview(buffer)[datagram.HEADER_SIZE:n]))


def _where(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def _reason(e):
    return getattr(e, "strerror", None) or str(e) or type(e).__name__
