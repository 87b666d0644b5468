"""The cluster as a service: heartbeats, announcements, disconnects, membership.

`ClusterService` runs the node's side of the signed event bus (any
`IEventBus`: in-process for a single node, Redis pub/sub, UDP):

* ``cluster:heartbeat`` (payload ``{}``) once at start, then every
  `HEARTBEAT_INTERVAL` seconds; in multi-node modes also every
  `DISCOVERY_HEARTBEAT` seconds during the start-up discovery wait, before the
  node declares itself ready (`discovery_wait`);
* ``tunnel:announce``: the local connections of a tunnel (`ConnectionRegistry
  .announcement`), at once when they change, and every `ANNOUNCE_INTERVAL`
  seconds for every tunnel with local connections, `ANNOUNCE_BATCH` tunnels a
  message, fewer when a batch would not fit the bus's ``max_payload`` (the
  UDP bus: one datagram). Received from a peer, it replaces what this node
  knew of that peer's connections of each tunnel;
* ``tunnel:disconnect`` ``{"tunnel_id"}``: every node, the sender included,
  closes its local connections of the tunnel. `disconnect` publishes it and
  waits up to `DISCONNECT_WAIT` seconds for the tunnel to be disconnected
  everywhere, as the peers' announcements tell.

Every periodic job is a `exposr.periodic.Periodic` (a TimerService) on the
injected clock. Bus failures are logged and retried by the next period; a
malformed payload from a peer is ignored with a debug line.
"""

import json

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from exposr.cluster.bus import BusUnavailable
from exposr.cluster.nodes import Membership
from exposr.periodic import Periodic

log = Logger(namespace="exposr.cluster")

HEARTBEAT_INTERVAL = 9.5
DISCOVERY_HEARTBEAT = 2.0
DISCOVERY_WAIT = 2 * HEARTBEAT_INTERVAL + 1  # 20 s
ANNOUNCE_INTERVAL = 5.0
ANNOUNCE_BATCH = 50
DISCONNECT_WAIT = 0.5
DISCONNECT_POLL = 0.05
BUS_TIMEOUT = 30.0  # seconds for the bus to connect at start-up

HEARTBEAT = "cluster:heartbeat"
ANNOUNCE = "tunnel:announce"
DISCONNECT = "tunnel:disconnect"


class ClusterService(MultiService):
    """``ClusterService(bus, node, registry, clock, discovery_wait=0)``.

    ``bus`` is an `IEventBus` service (a child of this one, so it starts
    first and stops last); ``registry`` the `ConnectionRegistry`;
    ``discovery_wait`` the seconds `discovery_wait` lets pass before the node
    is ready (0 for a single node); ``announce``: whether the tunnels'
    connections are announced (False on a single node, whose bus only
    delivers to itself, which ignores its own announcements: the signing and
    checking of every connected tunnel every `ANNOUNCE_INTERVAL` seconds
    was most of an idle node's CPU with thousands of tunnels).
    """

    name = "cluster"

    def __init__(self, bus, node, registry, clock, discovery_wait=0.0, announce=True):
        MultiService.__init__(self)
        self.bus = bus
        self.node = node
        self.registry = registry
        self.clock = clock
        self.discovery_wait_seconds = discovery_wait
        self.membership = Membership(node, clock, on_removed=bus.forget)
        self.published = {}  # event -> count (for metrics)
        bus.setServiceParent(self)
        Periodic(HEARTBEAT_INTERVAL, self.heartbeat, clock, "cluster heartbeat").setServiceParent(self)
        self._unsubscribe = None
        self._discovery = None
        if announce:
            Periodic(ANNOUNCE_INTERVAL, self.announce_all, clock, "tunnel announcements").setServiceParent(self)
            registry.on_change(self.announce)

    # -- life --------------------------------------------------------------------

    def startService(self):
        self._unsubscribe = self.bus.subscribe(self._received)
        MultiService.startService(self)
        self.heartbeat()

    def stopService(self):
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._discovery is not None and self._discovery.running:
            self._discovery.stopService()
        self.membership.stop()
        return MultiService.stopService(self)

    def bus_ready(self, timeout=BUS_TIMEOUT):
        """A Deferred firing once the bus can carry messages (fails after ``timeout`` s)."""
        ready = getattr(self.bus, "ready", None)
        if ready is None:
            return defer.succeed(None)
        d = defer.Deferred()

        def fired(result):
            if not d.called:
                if isinstance(result, Failure):
                    d.errback(result)
                    return None  # reported through d
                d.callback(None)
            return result

        ready.addBoth(fired)

        def expired():
            if not d.called:
                d.errback(BusUnavailable(f"the cluster bus did not connect within {timeout:g} s"))

        call = self.clock.callLater(timeout, expired)
        d.addBoth(lambda r: (call.cancel() if call.active() else None, r)[1])
        return d

    def discovery_wait(self):
        """A Deferred firing once peers had time to be discovered (heartbeats meanwhile)."""
        seconds = self.discovery_wait_seconds
        if not seconds:
            return defer.succeed(None)
        log.info("Waiting {seconds} s for cluster peers before ready", seconds=seconds)
        self._discovery = Periodic(DISCOVERY_HEARTBEAT, self.heartbeat, self.clock, "discovery heartbeat")
        self._discovery.startService()
        d = defer.Deferred()
        self.clock.callLater(seconds, d.callback, None)

        def done(result):
            if self._discovery is not None and self._discovery.running:
                self._discovery.stopService()
            self._discovery = None
            log.info("Cluster discovery done: {count} peer(s) known", count=len(self.membership.peers))
            return result

        return d.addBoth(done)

    # -- sending -------------------------------------------------------------------

    def _publish(self, event, message):
        self.published[event] = self.published.get(event, 0) + 1
        d = self.bus.publish(event, message)
        d.addErrback(lambda f: log.warn("Cluster {event} not sent: {error}", event=event,
                                        error=f.getErrorMessage()))
        return d

    def heartbeat(self):
        return self._publish(HEARTBEAT, {})

    def announce(self, tunnel_id):
        """Announce the local connections of one tunnel (they changed)."""
        return self._publish(ANNOUNCE, [self.registry.announcement(tunnel_id)])

    def announce_all(self):
        tunnels = self.registry.local_tunnels()
        ds = []
        budget = getattr(self.bus, "max_payload", None)
        for i in range(0, len(tunnels), ANNOUNCE_BATCH):
            batch = [self.registry.announcement(t) for t in tunnels[i:i + ANNOUNCE_BATCH]]
            for part in _fitting(batch, budget):
                ds.append(self._publish(ANNOUNCE, part))
        return defer.gatherResults(ds, consumeErrors=True) if ds else None

    @defer.inlineCallbacks
    def disconnect(self, tunnel_id):
        """Close the tunnel's connections on every node: True once it is disconnected everywhere."""
        deadline = self.clock.seconds() + DISCONNECT_WAIT
        yield self._publish(DISCONNECT, {"tunnel_id": tunnel_id})
        # the wait is bounded by the clock, not by counting polls (which run late)
        while self.registry.is_connected(tunnel_id):
            remaining = deadline - self.clock.seconds()
            if remaining <= 0:
                break
            d = defer.Deferred()
            self.clock.callLater(min(DISCONNECT_POLL, remaining), d.callback, None)
            yield d
        return not self.registry.is_connected(tunnel_id)

    # -- receiving -----------------------------------------------------------------

    def _received(self, message):
        self.membership.heard(message)
        event = message.event
        if event == ANNOUNCE:
            self._learn(message)
        elif event == DISCONNECT:
            payload = message.message
            tunnel_id = payload.get("tunnel_id") if isinstance(payload, dict) else None
            if isinstance(tunnel_id, str):
                self.registry.disconnect(tunnel_id)
            else:
                log.debug("Ignored a {event} without a tunnel id", event=event)

    def _learn(self, message):
        if message.node_id == self.node.id:
            return
        entries = message.message
        if not isinstance(entries, list):
            log.debug("Ignored an announcement that is not a list from {node}", node=message.node_id)
            return
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("tunnel_id"), str):
                continue
            connections = entry.get("connections")
            if not isinstance(connections, list):
                continue
            self.registry.learn(message.node_id, entry["tunnel_id"],
                                [c for c in connections if isinstance(c, dict)])


def _fitting(entries, budget):
    """
    ``entries`` split, in order, into lists whose compact JSON is at most
    ``budget`` bytes (a bus whose messages are limited in size, such as one
    UDP datagram, says so as ``max_payload``); one list when ``budget`` is
    None. An entry too large on its own goes alone (the bus refuses it).
    """
    if budget is None:
        return [entries]
    parts, part, size = [], [], 2  # the brackets
    for entry in entries:
        n = len(json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"))
        if part and size + 1 + n > budget:
            parts.append(part)
            part, size = [], 2
        size += n + (1 if part else 0)
        part.append(entry)
    if part:
        parts.append(part)
    return parts
