"""``postgres://user:password@host[:port]/database`` (docs/protocol.rst, "Backends and locks").

Same tables as the original (``account``, ``tunnel``, ``ingress_altnames``:
``key TEXT PRIMARY KEY, value JSONB NOT NULL, modified_at TIMESTAMP NOT NULL,
expires_at TIMESTAMP NULL`` plus two indices), so original and Python nodes can
share a database. Timestamps are written as ``NOW()`` and
``TO_TIMESTAMP(<unix seconds>)``; atomic updates take the row lock with
``SELECT ... FOR UPDATE`` inside a transaction, which works across nodes.

Connections are txpostgres `Connection` objects (non-blocking psycopg2) in a
pool of our own: txpostgres' `ConnectionPool` neither notices nor replaces a
dead connection, and its semaphore would hand a dead one out while live ones
are busy. Here every connection is watched (an idle one that the server drops
is seen at once), replaced with a capped backoff, and only live connections
are handed out; when none is live, calls fail at once with
`StorageUnavailable` instead of queueing. A call that found its connection
dead before anything could have been written is retried on another one.
"""

import collections
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg2
from twisted.internet import defer, error, task
from twisted.logger import Logger
from txpostgres import txpostgres

from exposr.storage.base import (
    NAMESPACES,
    BaseStorage,
    NotFound,
    ParsedCache,
    StorageError,
    StorageUnavailable,
    clean,
    dumps,
    loads,
    one_line,
    table_name,
)

log = Logger(namespace="exposr.storage.postgres")

CLEANUP_INTERVAL = 300.0

_IDLE, _BUSY, _CONNECTING, _DEAD, _CLOSED = "idle", "busy", "connecting", "dead", "closed"


class _Connection(txpostgres.Connection):
    """A txpostgres connection that tells its slot when the server drops it."""

    slot = None

    def doRead(self):
        # an idle connection the server dropped: poll() raises with nobody to
        # report to, and the reactor would log a traceback; report it as a
        # lost connection instead
        try:
            return txpostgres.Connection.doRead(self)
        except psycopg2.Error as e:
            return error.ConnectionLost(one_line(e))

    def connectionLost(self, reason):
        txpostgres.Connection.connectionLost(self, reason)
        if self.slot is not None:
            self.slot.lost(self, reason)


def _alive(conn):
    raw = getattr(conn, "_connection", None)
    return raw is not None and not raw.closed


class _Slot:
    """One pooled connection: connects, reconnects with backoff, reports its state."""

    def __init__(self, pool, index):
        self.pool = pool
        self.index = index
        self.conn = None
        self.state = _DEAD
        self.failures = 0
        self.last_error = None
        self._retry = None

    @property
    def usable(self):
        return self.conn is not None and _alive(self.conn)

    def connect(self):
        """One connection attempt; fires with self or fails with the reason."""
        pool = self.pool
        self._drop()
        conn = _Connection(reactor=pool.reactor)
        self.conn = conn
        self.state = _CONNECTING
        timer = pool.reactor.callLater(pool.connect_timeout, self._connect_timed_out, conn)
        d = conn.connect(**pool.connect_kwargs)

        def connected(_):
            if timer.active():
                timer.cancel()
            if self.conn is not conn or self.state == _CLOSED:
                conn.close()
                raise StorageUnavailable("PostgreSQL pool closed")
            conn.slot = self
            self.failures = 0
            self.last_error = None
            return self

        def failed(f):
            if timer.active():
                timer.cancel()
                self.last_error = _reason(f)
            if self.conn is conn:
                self._drop()
                if self.state != _CLOSED:
                    self.state = _DEAD
            return f

        return d.addCallbacks(connected, failed)

    def _connect_timed_out(self, conn):
        if self.conn is conn and self.state == _CONNECTING:
            self.last_error = "timed out after %s s" % self.pool.connect_timeout
            try:
                conn.close()
            except Exception:
                pass

    def start(self):
        """Connect now and hand the connection to the pool; keep trying on failure."""
        self._retry = None
        if self.state == _CLOSED:
            return defer.succeed(None)
        d = self.connect()
        d.addCallbacks(lambda _: self.pool.ready(self), self._failed)
        return d

    def _failed(self, f):
        if self.state == _CLOSED:
            return None
        self.failures += 1
        delay = min(self.pool.reconnect_max_delay, 0.25 * (2 ** (self.failures - 1)))
        if self.failures == 1 or self.failures % 10 == 0:
            log.warn(
                "PostgreSQL connection {index} failed ({reason}); retrying in {delay:.2f} s",
                index=self.index,
                reason=self.last_error or _reason(f),
                delay=delay,
            )
        self._retry = self.pool.reactor.callLater(delay, self.start)
        return None

    def lost(self, conn, reason):
        """The server dropped the connection (noticed by the reactor)."""
        if conn is not self.conn or self.state in (_CLOSED, _CONNECTING):
            return
        if self.state == _IDLE:
            self.pool.discard_idle(self)
            self.dead(_reason(reason))
        # a busy slot is handled when its operation completes

    def dead(self, reason=None):
        if self.state == _CLOSED:
            return
        if reason:
            log.warn("PostgreSQL connection {index} lost: {reason}", index=self.index, reason=reason)
        self.state = _DEAD
        self._drop()
        self.pool.slot_died(self)
        if self._retry is None:
            self._retry = self.pool.reactor.callLater(0, self.start)

    def _drop(self):
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.slot = None
            try:
                conn.close()
            except Exception:
                pass

    def close(self):
        self.state = _CLOSED
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._drop()


def _reason(f):
    value = getattr(f, "value", f)
    return one_line(value)


class _Pool:
    """Live connections only: idle ones queue up, callers wait for a busy one to return."""

    def __init__(self, reactor, size, connect_kwargs, connect_timeout, reconnect_max_delay):
        self.reactor = reactor
        self.connect_kwargs = connect_kwargs
        self.connect_timeout = connect_timeout
        self.reconnect_max_delay = reconnect_max_delay
        self.slots = [_Slot(self, i) for i in range(max(1, size))]
        self.idle = collections.deque()
        self.waiters = collections.deque()
        self.closed = False

    def live(self):
        return sum(1 for s in self.slots if s.state in (_IDLE, _BUSY))

    def checkout(self):
        if self.closed:
            return defer.fail(StorageUnavailable("PostgreSQL storage is closed"))
        while self.idle:
            slot = self.idle.popleft()
            if slot.state == _IDLE and slot.usable:
                slot.state = _BUSY
                return defer.succeed(slot)
            if slot.state == _IDLE:
                slot.dead("connection closed")
        if not any(s.state == _BUSY for s in self.slots):
            return defer.fail(StorageUnavailable("no connection to PostgreSQL" + self._why()))

        def cancel(d):
            try:
                self.waiters.remove(d)
            except ValueError:
                pass

        d = defer.Deferred(cancel)
        self.waiters.append(d)
        return d

    def _why(self):
        for s in self.slots:
            if s.last_error:
                return ": " + s.last_error
        return ""

    def checkin(self, slot):
        if slot.state != _BUSY:
            return
        if not slot.usable:
            slot.dead("connection closed")
            return
        self._hand_out(slot)

    def ready(self, slot):
        """A (re)connected slot joins the pool."""
        if self.closed:
            slot.close()
            return
        slot.state = _BUSY
        self._hand_out(slot)

    def _hand_out(self, slot):
        if self.waiters:
            self.waiters.popleft().callback(slot)
        else:
            slot.state = _IDLE
            self.idle.append(slot)

    def discard_idle(self, slot):
        try:
            self.idle.remove(slot)
        except ValueError:
            pass

    def slot_died(self, slot):
        self.discard_idle(slot)
        if self.waiters and not any(s.state == _BUSY for s in self.slots):
            waiters, self.waiters = self.waiters, collections.deque()
            for d in waiters:
                d.errback(StorageUnavailable("no connection to PostgreSQL" + self._why()))

    def close(self):
        self.closed = True
        for s in self.slots:
            s.close()
        self.idle.clear()
        waiters, self.waiters = self.waiters, collections.deque()
        for d in waiters:
            d.errback(StorageUnavailable("PostgreSQL storage is closed"))


class _NotStarted(Exception):
    """The connection died before the operation sent anything (safe to retry)."""


class PostgresStorage(BaseStorage):
    """
    ``connect_kwargs`` are libpq parameters (``host``, ``port``, ``user``,
    ``password``, ``dbname``, ``options``, ``sslmode``...). ``clock`` (defaults
    to ``reactor``) gives the time for TTLs and drives the 5-minute cleanup.
    """

    def __init__(
        self,
        reactor,
        clock=None,
        pool_size=10,
        open_attempts=5,
        open_retry_delay=1.0,
        connect_timeout=10.0,
        query_timeout=30.0,
        reconnect_max_delay=5.0,
        **connect_kwargs,
    ):
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        # parsed large records (accounts with many tunnels) by their text
        self._parsed = ParsedCache()
        self.pool_size = pool_size
        self.open_attempts = max(1, open_attempts)
        self.open_retry_delay = open_retry_delay
        self.query_timeout = query_timeout
        connect_kwargs.setdefault("application_name", "exposrd")
        connect_kwargs.setdefault("client_encoding", "UTF8")
        self.connect_kwargs = connect_kwargs
        self._connect_timeout = connect_timeout
        self._reconnect_max_delay = reconnect_max_delay
        self._pool = None
        self._tables = {}
        self._cleanup = None
        self._cleanup_d = None

    @classmethod
    def from_url(cls, url, reactor, pool_size=10, **kwargs):
        """``postgres://user:password@host[:port]/database[?libpq-param=value...]``."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("postgres", "pgsql", "postgresql"):
            raise StorageError("Not a postgres URL: %s" % url)
        params = {}
        if parts.hostname:
            params["host"] = unquote(parts.hostname)
        if parts.port:
            params["port"] = parts.port
        if parts.username:
            params["user"] = unquote(parts.username)
        if parts.password is not None:
            params["password"] = unquote(parts.password)
        dbname = unquote(parts.path.lstrip("/"))
        if dbname:
            params["dbname"] = dbname
        params.update(parse_qsl(parts.query))
        params.update(kwargs)
        return cls(reactor=reactor, pool_size=pool_size, **params)

    def describe(self):
        kw = self.connect_kwargs
        return "%s@%s:%s/%s" % (kw.get("user", ""), kw.get("host", "localhost"), kw.get("port", 5432), kw.get("dbname", ""))

    # -- life cycle ---------------------------------------------------------

    @defer.inlineCallbacks
    def open(self):
        if self._pool is not None:
            return self
        pool = _Pool(self._reactor, self.pool_size, self.connect_kwargs, self._connect_timeout, self._reconnect_max_delay)
        self._pool = pool
        first = pool.slots[0]
        reason = None
        for attempt in range(self.open_attempts):
            if attempt:
                yield task.deferLater(self._reactor, self.open_retry_delay, lambda: None)
            try:
                yield first.connect()
                yield first.conn.runQuery("SELECT NOW()")
                reason = None
                break
            except Exception as e:
                reason = first.last_error or one_line(e)
                first._drop()
                log.warn(
                    "PostgreSQL {where} not reachable (attempt {n}/{total}): {reason}",
                    where=self.describe(),
                    n=attempt + 1,
                    total=self.open_attempts,
                    reason=reason,
                )
        if reason is not None:
            pool.close()
            self._pool = None
            raise StorageUnavailable("PostgreSQL %s unreachable: %s" % (self.describe(), reason))
        pool.ready(first)
        # the rest of the pool; those that fail keep retrying in the background
        yield defer.DeferredList([s.start() for s in pool.slots[1:]], consumeErrors=True)
        try:
            for ns in NAMESPACES:
                yield self._ensure(ns)
            yield self._delete_expired()
        except Exception:
            pool.close()
            self._pool = None
            raise
        self._start_cleanup(self._clock, CLEANUP_INTERVAL)
        return self

    @defer.inlineCallbacks
    def close(self):
        yield self._stop_cleanup()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._tables.clear()

    @defer.inlineCallbacks
    def _delete_expired(self):
        total = 0
        for table in sorted(set(self._tables.values())):
            n = yield self._run(
                lambda conn, table=table: _rowcount(
                    conn,
                    "DELETE FROM %s WHERE expires_at IS NOT NULL AND expires_at <= TO_TIMESTAMP(%%s)" % table,
                    (self._now(),),
                ),
                retry=True,
            )
            total += n
        return total

    # -- plumbing -----------------------------------------------------------

    def _now(self):
        return float(self._clock.seconds())

    def _expires(self, ttl):
        return None if ttl is None else self._now() + float(ttl)

    @defer.inlineCallbacks
    def _run(self, op, retry=False):
        """
        ``op(conn)`` on a pooled connection, bounded by ``query_timeout``.
        Errors: a dead connection is `StorageUnavailable`, other database
        errors `StorageError`, anything else (NotFound, fn's own) as is.
        """
        pool = self._pool
        if pool is None:
            raise StorageUnavailable("PostgreSQL storage is not open")
        attempts = len(pool.slots) + 1
        for attempt in range(attempts):
            slot = yield pool.checkout()
            conn = slot.conn
            timer = self._reactor.callLater(self.query_timeout, _abort, slot, conn, self.query_timeout)
            try:
                if not _alive(conn):
                    raise _NotStarted()
                result = yield op(conn)
            except Exception as e:
                if timer.active():
                    timer.cancel()
                broken = not _alive(conn)
                pool.checkin(slot)
                if not broken and not isinstance(e, _NotStarted):
                    if isinstance(e, psycopg2.Error):
                        raise StorageError("PostgreSQL: %s" % one_line(e))
                    raise
                if (retry or isinstance(e, _NotStarted)) and attempt + 1 < attempts and not pool.closed:
                    continue
                reason = slot.last_error or one_line(e)
                raise StorageUnavailable("PostgreSQL connection lost: %s" % reason)
            if timer.active():
                timer.cancel()
            pool.checkin(slot)
            return result
        raise StorageUnavailable("PostgreSQL connection lost")

    @defer.inlineCallbacks
    def _ensure(self, ns):
        table = self._tables.get(ns)
        if table is not None:
            return table
        table = table_name(ns)
        statements = [
            "CREATE TABLE IF NOT EXISTS %s (key TEXT PRIMARY KEY, value JSONB NOT NULL, "
            "modified_at TIMESTAMP NOT NULL, expires_at TIMESTAMP NULL)" % table,
            "CREATE INDEX IF NOT EXISTS idx_%s_modified_at ON %s (modified_at)" % (table, table),
            "CREATE INDEX IF NOT EXISTS idx_%s_expires_at ON %s (expires_at)" % (table, table),
        ]
        for sql in statements:
            for attempt in range(2):
                try:
                    yield self._run(lambda conn, sql=sql: conn.runOperation(sql), retry=True)
                    break
                except StorageError as e:
                    # two nodes creating the same table at once: the loser
                    # gets a unique violation on the catalog; once more is fine
                    if attempt or isinstance(e, StorageUnavailable):
                        raise
        self._tables[ns] = table
        return table

    @defer.inlineCallbacks
    def _query(self, ns, sql, params, retry=False, rowcount=False):
        table = yield self._ensure(ns)
        sql = sql.format(t=table)
        if rowcount:
            result = yield self._run(lambda conn: _rowcount(conn, sql, params), retry=retry)
        else:
            result = yield self._run(lambda conn: conn.runQuery(sql, params), retry=retry)
        return result

    # -- IStorage -----------------------------------------------------------

    @defer.inlineCallbacks
    def create(self, ns, key, value, ttl=None):
        text = dumps(value)
        rows = yield self._query(
            ns,
            "INSERT INTO {t} AS cur (key, value, modified_at, expires_at) "
            "VALUES (%s, %s, NOW(), TO_TIMESTAMP(%s)) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "modified_at = excluded.modified_at, expires_at = excluded.expires_at "
            "WHERE cur.expires_at IS NOT NULL AND cur.expires_at <= TO_TIMESTAMP(%s) "
            "RETURNING key",
            (key, text, self._expires(ttl), self._now()),
        )
        return bool(rows)

    @defer.inlineCallbacks
    def put(self, ns, key, value, ttl=None):
        text = dumps(value)
        yield self._query(
            ns,
            "INSERT INTO {t} (key, value, modified_at, expires_at) "
            "VALUES (%s, %s, NOW(), TO_TIMESTAMP(%s)) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "modified_at = excluded.modified_at, expires_at = excluded.expires_at",
            (key, text, self._expires(ttl)),
            retry=True,
            rowcount=True,
        )
        return None

    @defer.inlineCallbacks
    def get(self, ns, key):
        rows = yield self._query(
            ns,
            # as text: parsed here, once per text for large records (`ParsedCache`)
            "SELECT value::text FROM {t} WHERE key = %s "
            "AND (expires_at IS NULL OR expires_at > TO_TIMESTAMP(%s))",
            (key, self._now()),
            retry=True,
        )
        return self._parsed.loads((ns, key), rows[0][0], "%s:%s" % (ns, key)) if rows else None

    @defer.inlineCallbacks
    def get_multi(self, ns, keys):
        keys = list(keys)
        if not keys:
            return []
        rows = yield self._query(
            ns,
            "SELECT key, value FROM {t} WHERE key = ANY(%s::text[]) "
            "AND (expires_at IS NULL OR expires_at > TO_TIMESTAMP(%s))",
            (list(dict.fromkeys(keys)), self._now()),
            retry=True,
        )
        found = dict(rows)
        return [loads(found[k], "%s:%s" % (ns, k)) if k in found else None for k in keys]

    @defer.inlineCallbacks
    def delete(self, ns, key):
        self._parsed.forget((ns, key))
        rows = yield self._query(
            ns,
            "DELETE FROM {t} WHERE key = %s "
            "RETURNING (expires_at IS NULL OR expires_at > TO_TIMESTAMP(%s))",
            (key, self._now()),
        )
        return any(r[0] for r in rows)

    @defer.inlineCallbacks
    def list_keys(self, ns, cursor, count):
        count = max(1, int(count))
        if cursor is None:
            rows = yield self._query(
                ns,
                "SELECT key FROM {t} WHERE (expires_at IS NULL OR expires_at > TO_TIMESTAMP(%s)) "
                "ORDER BY key LIMIT %s",
                (self._now(), count),
                retry=True,
            )
        else:
            rows = yield self._query(
                ns,
                "SELECT key FROM {t} WHERE key > %s "
                "AND (expires_at IS NULL OR expires_at > TO_TIMESTAMP(%s)) ORDER BY key LIMIT %s",
                (cursor, self._now(), count),
                retry=True,
            )
        keys = [r[0] for r in rows]
        return keys, (keys[-1] if keys else None)

    @defer.inlineCallbacks
    def update(self, ns, key, fn):
        table = yield self._ensure(ns)
        now = self._now()
        state = {"fn_called": False}

        @defer.inlineCallbacks
        def interaction(cur):
            yield cur.execute(
                "SELECT value::text FROM %s WHERE key = %%s "
                "AND (expires_at IS NULL OR expires_at > TO_TIMESTAMP(%%s)) FOR UPDATE" % table,
                (key, now),
            )
            row = cur.fetchone()
            if row is None:
                # raising rolls the transaction back; the connection goes back
                # to the pool either way
                raise NotFound("No such key %s:%s" % (ns, key))
            state["fn_called"] = True
            new = yield defer.maybeDeferred(fn, self._parsed.loads((ns, key), row[0], "%s:%s" % (ns, key)))
            if new is None:
                return None
            yield cur.execute(
                "UPDATE %s SET value = %%s, modified_at = NOW() WHERE key = %%s" % table,
                (dumps(new), key),
            )
            return clean(new)

        def op(conn):
            return _transaction(conn, interaction)

        # retried on another connection only if fn has not run yet
        result = yield self._run_update(op, state)
        return result

    def _run_update(self, op, state):
        def attempt(retries):
            d = self._run(op)

            def failed(f):
                if f.check(StorageUnavailable) and not state["fn_called"] and retries > 0 and self._pool is not None:
                    return attempt(retries - 1)
                return f

            return d.addErrback(failed)

        return attempt(2)


def _transaction(conn, interaction):
    """
    ``interaction(cursor)`` between BEGIN and COMMIT on ``conn``; ROLLBACK on
    failure if the connection is still there (a dropped connection has
    rolled back on the server already).
    """

    @defer.inlineCallbacks
    def run():
        cur = conn.cursor()
        yield cur.execute("BEGIN")
        try:
            result = yield interaction(cur)
        except BaseException:
            if _alive(conn):
                try:
                    yield cur.execute("ROLLBACK")
                except Exception as e:
                    log.warn("PostgreSQL rollback failed: {reason}", reason=one_line(e))
                    conn.close()
            raise
        yield cur.execute("COMMIT")
        return result

    return conn.lock.run(run)


def _rowcount(conn, sql, params):
    """Run one statement (autocommit) and return its row count."""

    def run():
        cur = conn.cursor()
        return cur.execute(sql, params).addCallback(lambda c: c.rowcount)

    # go through the connection's lock like runOperation does
    return conn.lock.run(run)


def _abort(slot, conn, timeout):
    """A query ran past ``query_timeout``: drop the connection (it is replaced)."""
    if slot.conn is conn and _alive(conn):
        slot.last_error = "query timed out after %s s" % timeout
        log.warn("PostgreSQL query timed out after {timeout} s; dropping the connection", timeout=timeout)
        try:
            conn.close()
        except Exception:
            pass

