"""A Twisted transport over one multiplexed stream (a ws-multiplex channel).

`StreamTransport` is what an ingress protocol sees after
``ITunnelConnection.open_stream``: ``write``/``loseConnection`` like a TCP
transport, producer registration for back-pressure both ways:

* the ingress asks us to stop delivering (``pauseProducing``): the channel
  sends PAUSE, so the tunnel client stops reading its target;
* the tunnel client asks us to stop sending (PAUSE received), or the WebSocket
  itself is backed up: the producer registered with us (the ingress socket) is
  paused, so nothing is buffered without bound.
"""

from twisted.internet import error
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(ITransport, IConsumer, IPushProducer)
class StreamTransport:
    __slots__ = ("channel", "_host", "_peer", "protocol", "producer", "disconnecting", "disconnected",
                 "_peer_paused", "_carrier_paused", "_views")

    def __init__(self, channel, host, peer):
        self.channel = channel
        self._host = host
        self._peer = peer
        self.protocol = None
        self.producer = None
        self.disconnecting = False
        self.disconnected = False
        self._peer_paused = False  # PAUSE from the tunnel client
        self._carrier_paused = False  # the WebSocket / SSH connection is backed up
        self._views = False

    def attach(self, protocol):
        """Deliver the stream to ``protocol``.

        Its ``dataReceived`` gets ``bytes``, or, when the protocol says
        ``takes_views = True`` (a class attribute), any bytes-like object the
        channel delivered as it is (a large DATA message: a ``memoryview``,
        never reused), with no copy.
        """
        self.protocol = protocol
        self._views = getattr(protocol, "takes_views", False) is True
        protocol.makeConnection(self)

    # -- ITransport ------------------------------------------------------

    def write(self, data):
        if not self.disconnecting and data:
            self.channel.write(data)

    def writeSequence(self, seq):
        self.write(b"".join(seq))

    def loseConnection(self):
        if not self.disconnecting:
            self.disconnecting = True
            self.channel.close()

    def abortConnection(self):
        if not self.disconnected:
            self.disconnecting = True
            self.channel.close("ECONNRESET")

    def getPeer(self):
        return self._peer

    def getHost(self):
        return self._host

    def setTcpNoDelay(self, enabled):
        pass

    # -- IConsumer: the ingress side registers itself ----------------------

    def registerProducer(self, producer, streaming):
        self.producer = producer
        if self._peer_paused or self._carrier_paused:
            producer.pauseProducing()

    def unregisterProducer(self):
        self.producer = None

    # -- IPushProducer: the ingress side throttles what we deliver -----------

    def pauseProducing(self):
        if not self.disconnected:
            self.channel.pause()

    def resumeProducing(self):
        if not self.disconnected:
            self.channel.resume()

    def stopProducing(self):
        self.loseConnection()

    # -- events from the channel -------------------------------------------

    def data_received(self, data):
        if self.protocol is not None and not self.disconnected:
            if data.__class__ is not bytes and not self._views:
                data = bytes(data)
            self.protocol.dataReceived(data)

    def connection_lost(self, error_text=None):
        if self.disconnected:
            return
        self.disconnected = True
        self.disconnecting = True
        reason = error.ConnectionDone() if error_text is None else error.ConnectionLost(error_text)
        producer, self.producer = self.producer, None
        if producer is not None:
            # the peer of a splice must learn the stream is gone; it does
            # that through connectionLost below, not by a stray resume
            pass
        if self.protocol is not None:
            self.protocol.connectionLost(Failure(reason))

    def peer_paused(self):
        self._peer_paused = True
        self._update_producer()

    def peer_resumed(self):
        self._peer_paused = False
        self._update_producer()

    def carrier_paused(self):
        self._carrier_paused = True
        self._update_producer()

    def carrier_resumed(self):
        self._carrier_paused = False
        self._update_producer()

    def _update_producer(self):
        if self.producer is None:
            return
        if self._peer_paused or self._carrier_paused:
            self.producer.pauseProducing()
        else:
            self.producer.resumeProducing()
