"""Cluster membership: which nodes exist, where they are, whether they are alive.

A node becomes known when any valid bus message of an unknown node id arrives;
its record (host, address, the sender's last timestamp) is refreshed by every
``cluster:heartbeat`` it sends, and only by those. A node not heard from for
`STALE_AFTER` seconds is *stale*: it stays listed (``is_stale``) but is no
longer a forwarding target. After `REMOVE_AFTER` seconds it is forgotten, and
so is its replay window (``on_removed``). A heartbeat makes a stale node fresh
again. This node is always listed and never stale.

A peer that refuses a forwarded connection is *unreachable* until its next
heartbeat: requests go to other connections of the tunnel meanwhile instead of
failing one after the other (the original keeps using it until it is stale).

Everything runs on an injected clock: timers are DelayedCalls, tested with
`twisted.internet.task.Clock`.
"""

import attrs
from twisted.logger import Logger

from exposr import model

log = Logger(namespace="exposr.cluster.nodes")

STALE_AFTER = 30.0  # seconds without heartbeat before a node is stale
REMOVE_AFTER = 60.0  # seconds without heartbeat before a node is forgotten
MAX_NODES = 1024  # peers tracked at most (a flood of forged ids cannot pass the signature)


@attrs.define(eq=False)
class Peer:
    node_id: str
    host: str
    ip: str
    last_ts: int  # the sender's clock (ms), as it said
    seen_at: float  # our clock (s) of the last heartbeat or first message
    stale: bool = False
    unreachable: bool = False
    stale_timer: object = None
    remove_timer: object = None


class Membership:
    """``Membership(node, clock, on_removed=None)``: this node and its known peers."""

    def __init__(self, node, clock, on_removed=None):
        self.node = node
        self.clock = clock
        self.on_removed = on_removed
        self.peers = {}

    # -- what the bus tells ------------------------------------------------------

    def heard(self, message):
        """A verified bus message arrived (`exposr.cluster.envelope.Message`)."""
        node_id = message.node_id
        if node_id == self.node.id:
            return
        peer = self.peers.get(node_id)
        if peer is None:
            if len(self.peers) >= MAX_NODES:
                return
            peer = self.peers[node_id] = Peer(node_id, message.host, message.ip, message.ts, self.clock.seconds())
            log.info("Cluster node {node_id} ({host}, {ip}) joined", node_id=node_id, host=message.host, ip=message.ip)
            self._arm(peer)
        elif message.event == "cluster:heartbeat":
            peer.host, peer.ip, peer.last_ts = message.host, message.ip, message.ts
            peer.seen_at = self.clock.seconds()
            if peer.stale:
                log.info("Cluster node {node_id} is alive again", node_id=node_id)
            peer.stale = False
            peer.unreachable = False
            self._arm(peer)

    def _arm(self, peer):
        for timer in (peer.stale_timer, peer.remove_timer):
            if timer is not None and timer.active():
                timer.cancel()
        peer.stale_timer = self.clock.callLater(STALE_AFTER, self._stale, peer)
        peer.remove_timer = self.clock.callLater(REMOVE_AFTER, self._remove, peer)

    def _stale(self, peer):
        peer.stale_timer = None
        peer.stale = True
        log.warn("Cluster node {node_id} is stale (no heartbeat for {seconds} s)", node_id=peer.node_id,
                 seconds=int(STALE_AFTER))

    def _remove(self, peer):
        peer.remove_timer = None
        if self.peers.get(peer.node_id) is peer:
            del self.peers[peer.node_id]
            log.info("Cluster node {node_id} removed", node_id=peer.node_id)
            if self.on_removed is not None:
                self.on_removed(peer.node_id)

    def unreachable(self, node_id):
        """A forwarded connection to the node failed: skip it until it heartbeats."""
        peer = self.peers.get(node_id)
        if peer is not None and not peer.unreachable:
            peer.unreachable = True
            log.warn("Cluster node {node_id} ({ip}) unreachable; skipped until its next heartbeat",
                     node_id=node_id, ip=peer.ip)

    def stop(self):
        for peer in self.peers.values():
            for timer in (peer.stale_timer, peer.remove_timer):
                if timer is not None and timer.active():
                    timer.cancel()

    # -- what the router and the admin API ask ----------------------------------

    def address(self, node_id):
        """The IP address to forward to, or None (unknown, stale or unreachable)."""
        peer = self.peers.get(node_id)
        if peer is None or peer.stale or peer.unreachable:
            return None
        return peer.ip

    def is_node(self, ip):
        """True when ``ip`` is the address of a known, non-stale peer node."""
        return any(p.ip == ip and not p.stale for p in self.peers.values())

    def fresh_ips(self):
        """Addresses of this node and every non-stale peer (for discovery)."""
        return [self.node.ip] + [p.ip for p in self.peers.values() if not p.stale]

    def view(self):
        """The nodes as ``GET /v1/admin/cluster`` lists them."""
        now = self.clock.seconds()
        now_ms = model.epoch_ms(now)
        out = [{
            "node_id": self.node.id,
            "host": self.node.host,
            "ip": self.node.ip,
            "alive_at": model.iso_timestamp(now),
            "alive_age": 0,
            "is_stale": False,
        }]
        for peer in self.peers.values():
            out.append({
                "node_id": peer.node_id,
                "host": peer.host,
                "ip": peer.ip,
                "alive_at": model.iso_from_ms(peer.last_ts),
                "alive_age": max(0, now_ms - model.epoch_ms(peer.seen_at)),
                "is_stale": peer.stale,
            })
        return out
