"""The cluster bus over Redis pub/sub (``--cluster redis``).

Two connections to ``redis://[[user]:password@]host[:port][/db]``: one
subscribed to the channel (``exposr`` by default, as the original uses), one
that sends ``PUBLISH <channel> <signed JSON text>``. Redis delivers each
message to every subscribed node, this one included. Pub/sub ignores the
database number, so a ``/db`` in the URL is accepted and not used.

Both connections come back by themselves after Redis restarts or kills them
(first retry after ~0.1 s, then at most 2 s apart); the subscriber subscribes
again on every new connection. Messages published while the subscriber is
away are lost for this node, as with any Redis pub/sub client; the periodic
heartbeats and announcements make up for it.

Publishing while the publisher connection is down queues the message, in
order, up to ``max_pending`` messages (beyond that `publish` fails at once with
`BusUnavailable`); the queue is sent when a connection is back. A PUBLISH whose
connection breaks before Redis answers is sent again on the next connection:
receivers drop the possible duplicate by its seq. The Deferred of `publish`
fires with the number of nodes Redis delivered the message to, and fails with
`BusUnavailable` if the bus stops first.
"""

import bisect
from urllib.parse import unquote, urlsplit

import attrs
import txredisapi
from twisted.internet import defer, endpoints
from twisted.logger import Logger

from exposr.cluster.bus import BusUnavailable, SignedBus

log = Logger(namespace="exposr.cluster.redis")

CHANNEL = "exposr"


@attrs.frozen
class RedisAddress:
    host: str
    port: int = 6379
    password: str = None
    username: str = None
    db: int = None

    def describe(self):
        return "%s:%s" % (self.host, self.port)


def parse_redis_url(url):
    """`RedisAddress` of ``redis://[[user]:password@]host[:port][/db]``; ValueError if not one."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "redis":
        raise ValueError("not a redis:// URL: %s" % parts.scheme)
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError("invalid port in the Redis URL")
    db = None
    path = parts.path.strip("/")
    if path:
        try:
            db = int(path)
        except ValueError:
            raise ValueError("invalid Redis database number: %s" % path)
    return RedisAddress(
        host=parts.hostname or "localhost",
        port=port,
        password=unquote(parts.password) if parts.password is not None else None,
        username=unquote(parts.username) if parts.username else None,
        db=db,
    )


class _Factory(txredisapi.RedisFactory):
    """One connection, kept: first retry after ~0.1 s, never more than 2 s apart."""

    initialDelay = 0.1
    maxDelay = 2.0
    factor = 2.0


class _Subscriber(txredisapi.SubscriberProtocol):
    """Subscribes on every (re)connection; hands the channel's messages to the bus."""

    def connectionMade(self):
        d = txredisapi.SubscriberProtocol.connectionMade(self)  # AUTH first, when needed
        d.addCallback(self._subscribe)
        return d

    def _subscribe(self, _):
        if not self._ready:  # AUTH failed; the factory gave up
            return
        bus = self.factory.bus
        d = self.subscribe(bus.channel)
        d.addCallbacks(lambda _: bus._subscribed(self), lambda f: bus._subscribe_failed(self, f))

    def messageReceived(self, pattern, channel, message):
        bus = self.factory.bus
        if channel == bus._channel_bytes and isinstance(message, bytes):
            bus._deliver(message)


class _Publisher(txredisapi.RedisProtocol):
    """Tells the bus when it is usable and when it is gone."""

    def connectionMade(self):
        d = txredisapi.RedisProtocol.connectionMade(self)
        d.addCallback(lambda _: self._ready and self.factory.bus._publisher_up(self))
        return d

    def connectionLost(self, why):
        self.factory.bus._publisher_down(self)
        txredisapi.RedisProtocol.connectionLost(self, why)


_FINISHED = "finished"


@attrs.define(eq=False)
class _Outgoing:
    seq: int
    data: bytes
    deferred: defer.Deferred
    conn: object = None  # the connection it was sent on; None while queued, _FINISHED once answered


class RedisBus(SignedBus):
    """
    ``RedisBus(node, key, url, reactor, channel="exposr", max_pending=1000,
    connect_timeout=10.0, reply_timeout=10.0)``; ``ready`` fires (also
    returned by ``startService``) once the channel is first subscribed, and
    fails with `BusUnavailable` if Redis refuses our credentials.
    """

    def __init__(self, node, key, url, reactor, channel=CHANNEL, max_pending=1000,
                 connect_timeout=10.0, reply_timeout=10.0, **kwargs):
        SignedBus.__init__(self, node, key, reactor, **kwargs)
        self.address = parse_redis_url(url)
        self.channel = channel
        self._channel_bytes = channel.encode("utf-8")
        self.max_pending = max_pending
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.ready = defer.Deferred()
        self.subscriptions = 0  # successful SUBSCRIBEs so far (one per connection)
        self._subscription_waiters = []
        self._reactor = reactor
        self._factories = []
        self._publisher = None
        self._queue = []  # _Outgoing not yet sent, by seq
        self._inflight = []  # _Outgoing sent, waiting for Redis' answer

    # -- life cycle ---------------------------------------------------------

    def _factory(self, protocol, charset):
        a = self.address
        factory = _Factory(
            a.describe(), None, 1, isLazy=True, charset=charset, password=a.password,
            username=a.username, replyTimeout=self.reply_timeout, convertNumbers=False,
        )
        factory.protocol = protocol
        factory.bus = self
        factory.deferred.addErrback(self._refused)
        factory.startConnecting(endpoints.HostnameEndpoint(self._reactor, a.host, a.port, timeout=self.connect_timeout))
        self._factories.append(factory)
        return factory

    def startService(self):
        SignedBus.startService(self)
        self._factory(_Subscriber, None)  # bytes in: the envelope is verified as received
        self._factory(_Publisher, "utf-8")
        return self.ready

    def stopService(self):
        SignedBus.stopService(self)
        waiting, self._queue, self._inflight = self._queue + self._inflight, [], []
        for out in waiting:
            out.conn = _FINISHED
            out.deferred.errback(BusUnavailable("the cluster bus stopped"))
        factories, self._factories = self._factories, []
        return defer.gatherResults([f.disconnect() for f in factories], consumeErrors=True).addBoth(lambda _: None)

    def _refused(self, failure):
        log.error("Redis {where} refused the cluster bus: {reason}", where=self.address.describe(),
                  reason=failure.getErrorMessage())
        if not self.ready.called:
            self.ready.errback(BusUnavailable(failure.getErrorMessage()))

    # -- subscriber ---------------------------------------------------------

    def next_subscription(self):
        """A Deferred that fires at the next successful SUBSCRIBE (after a reconnection)."""
        d = defer.Deferred()
        self._subscription_waiters.append(d)
        return d

    def _subscribed(self, conn):
        self.subscriptions += 1
        if self.subscriptions > 1:
            log.info("Cluster bus subscribed again to Redis {where}", where=self.address.describe())
        if not self.ready.called:
            self.ready.callback(self)
        waiters, self._subscription_waiters = self._subscription_waiters, []
        for d in waiters:
            d.callback(self)

    def _subscribe_failed(self, conn, failure):
        log.warn("Could not subscribe to Redis {where}: {reason}", where=self.address.describe(),
                 reason=failure.getErrorMessage())
        if conn.transport is not None:
            conn.transport.loseConnection()  # and try again on a new connection

    # -- publisher ----------------------------------------------------------

    def _send(self, data):
        if len(self._queue) + len(self._inflight) >= self.max_pending:
            return defer.fail(BusUnavailable("%d cluster messages already waiting for Redis" % self.max_pending))
        out = _Outgoing(self.seq - 1, data, defer.Deferred())  # publish() has counted it already
        self._queue.append(out)
        self._pump()
        return out.deferred

    def _publisher_up(self, conn):
        if not self.running:
            return
        self._publisher = conn
        self._pump()

    def _publisher_down(self, conn):
        if self._publisher is conn:
            self._publisher = None
        for out in [o for o in self._inflight if o.conn is conn]:
            self._requeue(out)

    def _requeue(self, out):
        self._inflight.remove(out)
        out.conn = None
        bisect.insort(self._queue, out, key=lambda o: o.seq)

    def _pump(self):
        conn = self._publisher
        while conn is not None and self._queue and conn.connected:
            out = self._queue.pop(0)
            out.conn = conn
            self._inflight.append(out)
            d = conn.execute_command("PUBLISH", self.channel, out.data)
            d.addCallbacks(self._published, self._not_published, callbackArgs=(out,), errbackArgs=(out,))

    def _published(self, receivers, out):
        if out.conn is None or out.conn is _FINISHED:
            return  # requeued, or the bus stopped
        self._inflight.remove(out)
        out.conn = _FINISHED
        out.deferred.callback(receivers)

    def _not_published(self, failure, out):
        if out.conn is None or out.conn is _FINISHED:
            return
        if failure.check(txredisapi.ConnectionError):
            # the connection is going away (lost, or no answer in time): the next one sends it
            if self._publisher is out.conn:
                self._publisher = None
            self._requeue(out)
            return
        self._inflight.remove(out)
        out.conn = _FINISHED
        log.warn("Redis {where} refused a cluster message: {reason}", where=self.address.describe(),
                 reason=failure.getErrorMessage())
        out.deferred.errback(BusUnavailable(failure.getErrorMessage()))
