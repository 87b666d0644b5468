"""The runtime connection registry (docs/protocol.rst, "Connection state" and
"Cluster").

Per tunnel it keeps the connections known anywhere in the cluster: local ones
(an `ITunnelConnection` held by this node) and remote ones (learnt from peer
announcements, `learn`), and derives the tunnel's connection state. Nothing
here is stored.
"""

import uuid

import attrs
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from exposr.errors import NoConnectionError
from exposr.interfaces import ITunnelConnection
from exposr.model import describe_error, epoch_ms
from exposr.periodic import Periodic

log = Logger(namespace="exposr.connections")

# the state sweep (docs/protocol.rst, "Connection state")
REFRESH_INTERVAL = 10.0  # seconds between expiry sweeps
REMOTE_ALIVE_THRESHOLD = 15.0  # remote connection not re-announced → disconnected
REMOVE_DISCONNECTED_AFTER = 60.0  # disconnected connection records are dropped
FORGET_STATE_AFTER = 300.0  # empty tunnel state forgotten
CLOSE_WAIT = 5.0  # seconds a stopping server waits for its tunnel connections to close


def _ms(value):
    """An announced epoch-ms timestamp, or None when it is not an integer."""
    return value if type(value) is int else None


def new_connection_id(node_id):
    """``<node id>:<uuid4>``."""
    return "%s:%s" % (node_id, uuid.uuid4())


@attrs.define(eq=False)
class ConnectionRecord:
    connection_id: str
    node: str
    peer: str
    local: bool
    connected: bool = True
    connected_at: int = None  # epoch ms
    disconnected_at: int = None
    alive_at: int = None
    conn: object = None  # the ITunnelConnection

    def as_dict(self):
        out = {
            "connection_id": self.connection_id,
            "node": self.node,
            "peer": self.peer,
            "local": self.local,
            "connected": self.connected,
        }
        for key in ("connected_at", "disconnected_at", "alive_at"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def announcement(self):
        """The entry of a ``tunnel:announce`` message (docs/protocol.rst, "Cluster")."""
        out = {
            "connection_id": self.connection_id,
            "node": self.node,
            "peer": self.peer,
            "connected": self.connected,
            "connected_at": self.connected_at,
        }
        if self.disconnected_at is not None:
            out["disconnected_at"] = self.disconnected_at
        return out


@implementer(ITunnelConnection)
class RemoteConnection:
    """
    A connection held by a peer node. Opening a stream is delegated to the
    registry's ``remote_opener(record, protocolFactory)`` (the cluster
    forwarding, later); without one it fails with `NoConnectionError`.
    """

    local = False

    def __init__(self, registry, record, tunnel_id):
        self._registry = registry
        self.record = record
        self.tunnel_id = tunnel_id

    @property
    def connection_id(self):
        return self.record.connection_id

    @property
    def node(self):
        return self.record.node

    @property
    def peer(self):
        return self.record.peer

    def open_stream(self, protocolFactory):
        opener = self._registry.remote_opener
        if opener is None:
            return defer.fail(NoConnectionError("no route to node"))
        return opener(self, protocolFactory)

    def disconnect(self, reason=None):
        pass


class _TunnelState:
    __slots__ = ("connections", "connected", "alive_connections", "connected_at", "disconnected_at",
                 "alive_at", "last_used", "ever_connected", "local_alive")

    def __init__(self):
        self.connections = {}  # connection_id -> ConnectionRecord
        self.connected = False
        self.alive_connections = 0
        self.connected_at = None
        self.disconnected_at = None
        self.alive_at = None
        self.last_used = None  # connection_id chosen last (round-robin)
        self.ever_connected = False
        self.local_alive = 0  # alive connections held by this node


class ConnectionRegistry(MultiService):
    """
    ``ConnectionRegistry(config, node_id, clock)``: connection state only; it
    knows no tunnel records (`TunnelService.register` checks the tunnel and its
    account, then calls `add`). A service: the expiry sweep is a child
    `Periodic` every `REFRESH_INTERVAL`; stopping disconnects every local
    connection.
    """

    name = "connections"

    def __init__(self, config, node_id, clock):
        MultiService.__init__(self)
        self.config = config
        self.node_id = node_id
        self.clock = clock
        self.stopping = False
        self.remote_opener = None
        self._tunnels = {}
        self._listeners = []
        Periodic(REFRESH_INTERVAL, self.expire, clock, "connection expiry sweep").setServiceParent(self)

    def _now_ms(self):
        return epoch_ms(self.clock.seconds())

    # -- observers ---------------------------------------------------------

    def on_change(self, callback):
        """
        ``callback(tunnel_id)`` is called whenever a **local** connection of a
        tunnel is added or removed (what the cluster bus announces). Returns a
        function that removes the callback.
        """
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def _changed(self, tunnel_id):
        for callback in list(self._listeners):
            try:
                callback(tunnel_id)
            except Exception:
                log.error("Connection change observer failed: {error}", error=describe_error())

    # -- state -------------------------------------------------------------

    def _recompute(self, state):
        now = self._now_ms()
        alive = [c for c in state.connections.values() if c.connected]
        was_connected = state.connected
        state.alive_connections = len(alive)
        state.local_alive = sum(1 for c in alive if c.local)
        state.connected = bool(alive)
        if state.connected:
            state.ever_connected = True
            if not was_connected or state.connected_at is None:
                state.connected_at = min(
                    (c.connected_at for c in alive if c.connected_at is not None), default=now
                )
            state.alive_at = now
            for c in alive:
                if c.local:
                    c.alive_at = now
        elif was_connected or (state.disconnected_at is None and state.connections):
            stamps = [c.disconnected_at for c in state.connections.values()
                      if c.disconnected_at is not None]
            if stamps:
                state.disconnected_at = max(stamps)
            elif was_connected:
                state.disconnected_at = now

    def state(self, tunnel_id):
        """The tunnel's connection state (docs/protocol.rst, "Connection state"); ms timestamps."""
        state = self._tunnels.get(tunnel_id)
        if state is None:
            return {"connected": False, "alive_connections": 0, "connections": []}
        out = {"connected": state.connected, "alive_connections": state.alive_connections}
        for key in ("connected_at", "disconnected_at", "alive_at"):
            value = getattr(state, key)
            if value is not None:
                out[key] = value
        out["connections"] = [
            c.as_dict() for c in sorted(state.connections.values(), key=lambda c: c.connection_id)
        ]
        return out

    def is_connected(self, tunnel_id):
        state = self._tunnels.get(tunnel_id)
        return bool(state and state.connected)

    def has_local(self, tunnel_id):
        """True when this node holds an alive connection of the tunnel."""
        state = self._tunnels.get(tunnel_id)
        return bool(state and state.local_alive)

    def remote_nodes(self, tunnel_id):
        """Ids of the peer nodes holding alive connections of the tunnel, sorted."""
        state = self._tunnels.get(tunnel_id)
        if state is None:
            return []
        return sorted({c.node for c in state.connections.values() if c.connected and not c.local})

    def local_tunnels(self):
        """Ids of tunnels with local connection records (alive or recently gone)."""
        return [tid for tid, s in self._tunnels.items()
                if any(c.local for c in s.connections.values())]

    def connected_counts(self):
        """(tunnels this node holds alive connections of, tunnels connected anywhere)."""
        local = cluster = 0
        for state in self._tunnels.values():
            if state.connected:
                cluster += 1
                if state.local_alive:
                    local += 1
        return local, cluster

    def alive_local_connections(self):
        """The `ITunnelConnection` objects this node holds, alive."""
        return [c.conn for s in self._tunnels.values() for c in s.connections.values()
                if c.local and c.connected and c.conn is not None]

    def announcement(self, tunnel_id):
        """``{tunnel_id, connections}`` of the local connections, for the bus."""
        state = self._tunnels.get(tunnel_id)
        records = [] if state is None else [
            c.announcement() for c in state.connections.values() if c.local
        ]
        return {"tunnel_id": tunnel_id, "connections": records}

    # -- local connections -------------------------------------------------

    def add(self, conn):
        """
        Add a local `ITunnelConnection` whose tunnel and account were checked
        by the caller. Refused (False) while stopping or when the cluster-wide
        limit of connections of the tunnel is reached.
        """
        if self.stopping:
            return False
        tunnel_id = conn.tunnel_id
        state = self._tunnels.setdefault(tunnel_id, _TunnelState())
        if state.alive_connections >= self.config.transport_max_connections:
            log.info(
                "Tunnel {tunnel_id} refused a connection: limit of {limit} reached",
                tunnel_id=tunnel_id,
                limit=self.config.transport_max_connections,
            )
            return False
        now = self._now_ms()
        record = ConnectionRecord(
            connection_id=conn.connection_id,
            node=self.node_id,
            peer=conn.peer,
            local=True,
            connected=True,
            connected_at=now,
            alive_at=now,
            conn=conn,
        )
        state.connections[record.connection_id] = record
        self._recompute(state)
        log.info(
            "Tunnel {tunnel_id} connected ({connection_id} from {peer})",
            tunnel_id=tunnel_id,
            connection_id=record.connection_id,
            peer=conn.peer,
        )
        self._changed(tunnel_id)
        return True

    def unregister(self, conn):
        """The local connection is gone (closed by either side)."""
        state = self._tunnels.get(conn.tunnel_id)
        record = state.connections.get(conn.connection_id) if state else None
        if record is None or not record.local or record.conn is not conn:
            return False
        self._mark_disconnected(conn.tunnel_id, state, record)
        return True

    def _mark_disconnected(self, tunnel_id, state, record):
        if not record.connected:
            record.conn = None
            return
        record.connected = False
        record.disconnected_at = self._now_ms()
        record.conn = None
        self._recompute(state)
        if record.local:
            log.info(
                "Tunnel {tunnel_id} connection {connection_id} disconnected",
                tunnel_id=tunnel_id,
                connection_id=record.connection_id,
            )
            self._changed(tunnel_id)

    def disconnect(self, tunnel_id, reason="disconnected"):
        """
        Close every local connection of the tunnel; fires with True when the
        tunnel is no longer connected anywhere we know of.
        """
        state = self._tunnels.get(tunnel_id)
        if state is not None:
            for record in sorted(state.connections.values(), key=lambda c: c.connection_id):
                if record.local and record.connected:
                    conn = record.conn
                    self._mark_disconnected(tunnel_id, state, record)
                    if conn is not None:
                        try:
                            conn.disconnect(reason)
                        except Exception:
                            log.error("Error disconnecting {tunnel_id}: {error}", tunnel_id=tunnel_id,
                                error=describe_error())
        return defer.succeed(not self.is_connected(tunnel_id))

    def stop(self, timeout=CLOSE_WAIT):
        """Refuse new connections and disconnect every local one; fires once
        they are closed (a WebSocket's close handshake done, so that clients
        see a clean 1001), ``timeout`` seconds at most."""
        self.stopping = True
        closing = []
        for state in self._tunnels.values():
            for record in state.connections.values():
                when_closed = getattr(record.conn, "when_closed", None) if record.local else None
                if when_closed is not None and record.connected:
                    closing.append(when_closed())
        ds = [self.disconnect(tid, "server shutting down") for tid in self.local_tunnels()]
        d = defer.gatherResults(ds + closing, consumeErrors=True)
        if closing:
            timer = self.clock.callLater(timeout, lambda: d.cancel() if not d.called else None)
            d.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return d.addBoth(lambda _: None)

    # -- remote connections ------------------------------------------------

    def learn(self, node_id, tunnel_id, records):
        """
        A peer's announcement: replace every connection attributed to
        ``node_id`` for the tunnel by ``records`` (dicts as announced).
        Announcements from this node are ignored.
        """
        if node_id == self.node_id:
            return
        now = self._now_ms()
        state = self._tunnels.setdefault(tunnel_id, _TunnelState())
        for cid in [cid for cid, c in state.connections.items() if not c.local and c.node == node_id]:
            del state.connections[cid]
        for entry in records or []:
            try:
                cid = str(entry["connection_id"])
            except (KeyError, TypeError):
                continue
            existing = state.connections.get(cid)
            if existing is not None and existing.local:
                continue
            connected = bool(entry.get("connected"))
            disconnected_at = _ms(entry.get("disconnected_at"))
            if not connected and disconnected_at is None:
                # expiry counts from when we learnt it instead
                disconnected_at = now
            state.connections[cid] = ConnectionRecord(
                connection_id=cid,
                node=str(entry.get("node") or node_id),
                peer=str(entry.get("peer") or ""),
                local=False,
                connected=connected,
                connected_at=_ms(entry.get("connected_at")),
                disconnected_at=disconnected_at,
                alive_at=now,
            )
        self._recompute(state)

    # -- selection ---------------------------------------------------------

    def connection_for(self, tunnel_id):
        """
        The `ITunnelConnection` to use for a new upstream stream, or None:
        alive connections, local ones preferred, sorted by id, round-robin.
        """
        state = self._tunnels.get(tunnel_id)
        if state is None:
            return None
        alive = [c for c in state.connections.values() if c.connected]
        candidates = [c for c in alive if c.local and c.conn is not None]
        if not candidates:
            candidates = [c for c in alive if not c.local]
        if not candidates:
            return None
        candidates.sort(key=lambda c: c.connection_id)
        ids = [c.connection_id for c in candidates]
        if state.last_used in ids:
            chosen = candidates[(ids.index(state.last_used) + 1) % len(candidates)]
        else:
            chosen = candidates[0]
        state.last_used = chosen.connection_id
        if chosen.local:
            return chosen.conn
        return RemoteConnection(self, chosen, tunnel_id)

    # -- expiry -----------------------------------------------------------

    def expire(self):
        """One sweep: stale remote connections, old records, forgotten tunnels."""
        now = self._now_ms()
        for tunnel_id, state in list(self._tunnels.items()):
            for record in list(state.connections.values()):
                if (not record.local and record.connected and record.alive_at is not None
                        and now - record.alive_at > REMOTE_ALIVE_THRESHOLD * 1000):
                    record.connected = False
                    record.disconnected_at = now
            self._recompute(state)
            for cid, record in list(state.connections.items()):
                if (not record.connected and record.disconnected_at is not None
                        and now - record.disconnected_at >= REMOVE_DISCONNECTED_AFTER * 1000):
                    del state.connections[cid]
            if not state.connections and (
                not state.ever_connected
                or state.disconnected_at is None
                or now - state.disconnected_at >= FORGET_STATE_AFTER * 1000
            ):
                del self._tunnels[tunnel_id]

    def startService(self):
        self.stopping = False
        MultiService.startService(self)

    @defer.inlineCallbacks
    def stopService(self):
        yield defer.maybeDeferred(MultiService.stopService, self)
        yield self.stop()
