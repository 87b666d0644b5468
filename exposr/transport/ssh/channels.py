"""The SSH channels of a tunnel connection: the client's ``session`` channel
(prints the banner; its end ends the tunnel) and the ``forwarded-tcpip``
channels we open, one per upstream stream, relaying to a `StreamTransport`."""

from twisted.conch.error import ConchError
from twisted.conch.ssh.channel import SSHChannel
from twisted.internet import defer

from exposr.errors import StreamError, StreamRefusedError, TransportClosedError
from exposr.transport.ssh import conch_private
from exposr.transport.ssh.shared import (
    LOCAL_MAX_PACKET,
    LOCAL_WINDOW,
    MAX_REMOTE_PACKET,
    MAX_WINDOW,
    conch_log,
    log,
)
from exposr.transport.ssh.target import render_target
from exposr.transport.stream import StreamTransport


class QuietChannel(SSHChannel):
    """Conch's channel without the per-event info log lines."""

    _log = conch_log

    window_held = False  # True while the stream's reader has paused us
    gone = False  # closed on both sides: Conch has forgotten the channel

    def channelOpen(self, specificData):
        pass

    def eofReceived(self):
        pass

    def closed(self):
        self.gone = True

    def addWindowBytes(self, data):
        # a window never exceeds 2^32-1, whatever the peer adds (RFC 4254)
        SSHChannel.addWindowBytes(self, min(data, MAX_WINDOW - self.remoteWindowLeft))

    def requestReceived(self, requestType, data):
        f = getattr(self, "request_" + requestType.replace(b"-", b"_").decode("ascii", "replace"), None)
        if f is None:
            return False
        return f(data)

    def drop(self):
        """Close now, discarding what the window did not let through."""
        conch_private.discard_unsent(self)
        self.conn.sendClose(self)


class SessionChannel(QuietChannel):
    """Prints the target and ingress URLs; EOF or Ctrl-C ends the whole tunnel connection."""

    name = b"session"

    def __init__(self, *args, **kwargs):
        QuietChannel.__init__(self, *args, **kwargs)
        self.remoteMaxPacket = min(self.remoteMaxPacket, MAX_REMOTE_PACKET)

    def request_pty_req(self, data):
        return True

    def request_window_change(self, data):
        return True

    def request_shell(self, data):
        # answered once the forwards asked for before it are (the banner shows
        # them); never if the channel is gone by then: there is no one to answer
        answer = defer.Deferred()

        def ready(_):
            if not self.gone:
                self._banner()
                answer.callback(True)

        self.conn.when_idle().addCallback(ready)
        return answer

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


class ForwardedChannel(QuietChannel):
    """One upstream stream: a ``forwarded-tcpip`` channel we opened."""

    name = b"forwarded-tcpip"

    def __init__(self, tunnel_conn, protocol_factory, deferred, conn):
        QuietChannel.__init__(self, localWindow=LOCAL_WINDOW, localMaxPacket=LOCAL_MAX_PACKET, conn=conn)
        self.tunnel_conn = tunnel_conn
        self.factory = protocol_factory
        self.deferred = deferred
        self.stream = None
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
        if self.remoteMaxPacket == 0:
            self.conn.sendClose(self)
            self.openFailed(StreamRefusedError("zero maximum packet size"))
            return
        self.remoteMaxPacket = min(self.remoteMaxPacket, MAX_REMOTE_PACKET)
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
            conch_private.stopped_writing(self)
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
        if isinstance(reason, ConchError):  # the client's CHANNEL_OPEN_FAILURE
            desc = reason.value.decode("utf-8", "replace") if isinstance(reason.value, bytes) else ""
            reason = StreamRefusedError("open refused (%d) %s" % (reason.data, desc[:200]))
        elif not isinstance(reason, StreamError):
            reason = TransportClosedError("SSH connection closed")  # Conch: ConnectionLost
        d.errback(reason)

    def abandon(self):
        """Timed out or cancelled: close it if it ever opens."""
        self.abandoned = True
        self.deferred = None
        self._settle()
        if self.conn is not None and conch_private.is_open(self.conn, self):
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
        # the producer is resumed only once the backlog is out
        conch_private.add_window_backlog_first(self, min(data, MAX_WINDOW - self.remoteWindowLeft))

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
        self.gone = True
        self._settle()
        self.tunnel_conn._stream_closed(self)
        if self.deferred is not None:
            d, self.deferred = self.deferred, None
            d.errback(TransportClosedError("SSH connection closed"))
        if self.stream is not None:
            self.stream.connection_lost(None if self.peer_closed else "connection lost")


