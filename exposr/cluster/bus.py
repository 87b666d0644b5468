"""The core every cluster bus shares, and the single-node bus.

`SignedBus` signs what this node publishes (``ts`` from the injected clock in
epoch ms, ``seq`` from 0 and +1 per published message, all events alike) and
verifies everything received, its own messages included, through one
`Verifier`. A transport subclass implements ``_send(data)`` and hands every
received envelope to ``_deliver(data)``.

Received messages that fail verification or the replay check are dropped:
counted per reason in ``rejected`` and logged at most once per reason per
``log_interval`` seconds (with the number dropped since the previous line),
never raised. A subscriber that raises is logged; the others still get the
message.

`LocalBus` is the single-node bus: messages are delivered in publishing order
on the next reactor turn, still signed and verified.
"""

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from exposr.cluster.envelope import MAX_SENDERS, EnvelopeError, Verifier, encode, key_bytes
from exposr.cluster.interfaces import IEventBus

log = Logger(namespace="exposr.cluster.bus")

#: Seconds between two warnings about dropped messages of one reason.
LOG_INTERVAL = 60.0


class BusUnavailable(Exception):
    """A message could not be handed to the bus (not running, or backlog full)."""


@implementer(IEventBus)
class SignedBus(Service):
    def __init__(self, node, key, clock, max_senders=MAX_SENDERS, log_interval=LOG_INTERVAL):
        self.node = node
        self.clock = clock
        self.seq = 0
        self.rejected = {}
        self.log_interval = log_interval
        self._key = key_bytes(key)
        self._verifier = Verifier(self._key, max_senders)
        self._subscribers = []
        self._drops = {}  # reason -> [time of the last warning, dropped since]

    # -- IEventBus ----------------------------------------------------------

    def publish(self, event, message):
        if not self.running:
            return defer.fail(BusUnavailable("the cluster bus is not running"))
        data = encode(event, message, self.node, int(self.clock.seconds() * 1000), self.seq, self._key)
        self.seq += 1
        return self._send(data)

    def subscribe(self, callback):
        entry = [callback]
        self._subscribers.append(entry)

        def unsubscribe():
            for i, e in enumerate(self._subscribers):
                if e is entry:
                    del self._subscribers[i]
                    return

        return unsubscribe

    def forget(self, node_id):
        """Drop a removed node's replay window."""
        self._verifier.forget(node_id)

    # -- for transports -----------------------------------------------------

    def _send(self, data):
        """Hand one signed envelope (bytes) to the transport; a Deferred."""
        raise NotImplementedError

    def _deliver(self, data):
        """Verify one received envelope and pass it to every subscriber."""
        try:
            msg = self._verifier.check(data)
        except EnvelopeError as e:
            self._dropped(e)
            return
        for entry in list(self._subscribers):
            try:
                entry[0](msg)
            except Exception:
                log.failure("Cluster bus subscriber failed on {event}", event=msg.event)

    def _dropped(self, error):
        reason = error.reason
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        state = self._drops.get(reason)
        now = self.clock.seconds()
        if state is None:
            state = self._drops[reason] = [None, 0]
        state[1] += 1
        if state[0] is None or now - state[0] >= self.log_interval:
            log.warn(
                "Dropped {count} cluster message(s): {reason} ({detail})",
                count=state[1],
                reason=reason,
                detail=str(error),
            )
            state[0], state[1] = now, 0


class LocalBus(SignedBus):
    """The single-node bus: delivery to this process on the next reactor turn."""

    def __init__(self, node, key, clock, **kwargs):
        SignedBus.__init__(self, node, key, clock, **kwargs)
        self._queue = []
        self._flush_call = None

    def _send(self, data):
        self._queue.append(data)
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)
        return defer.succeed(None)

    def _flush(self):
        self._flush_call = None
        batch, self._queue = self._queue, []
        for data in batch:
            self._deliver(data)

    def stopService(self):
        Service.stopService(self)
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush_call = None
        self._queue = []
        return defer.succeed(None)
