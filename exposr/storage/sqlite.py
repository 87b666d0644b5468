"""``sqlite://<path>``: one file, single node (docs/protocol.rst, "Backends and locks").

The layout is the original's, so a file can move between an original node and
this one: one table per namespace (``account``, ``tunnel``,
``ingress_altnames``) with ``key TEXT PRIMARY KEY, value BLOB, modified_at
INTEGER, expires_at INTEGER NULL`` (unix seconds) and two indices.

sqlite3 runs on one dedicated thread (never the reactor thread) with WAL and
``synchronous=FULL``: a write is acknowledged only once it is on disk. Updates
hold an in-process FIFO mutex per ``<namespace>:<key>``. Expired rows are
invisible to reads and are deleted at open and every 5 minutes.

Group commit: the calls made while the thread is busy are queued and run
together, in the order they were made, in one hand-off to the thread; when
some of them write, in one transaction (each write in a savepoint of its own,
so that a failing one changes nothing and fails alone), so that they share
one sync to disk instead of one each. Every call is answered once the
transaction is committed, so a write is still acknowledged only once it is on
disk; when the commit fails, every call of the group fails.
"""

import os
import sqlite3

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from exposr.storage.base import (
    NAMESPACES,
    BaseStorage,
    KeyedLock,
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

log = Logger(namespace="exposr.storage.sqlite")

CLEANUP_INTERVAL = 300.0
_CHUNK = 500


def _now(clock):
    return int(clock.seconds())


class SqliteStorage(BaseStorage):
    """
    ``path``: the file (created if missing). ``reactor`` runs the thread
    hand-off; ``clock`` (defaults to ``reactor``) gives the time for TTLs and
    drives the cleanup timer.
    """

    def __init__(self, path, reactor, clock=None, busy_timeout=5.0):
        self.path = path
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._busy_timeout = busy_timeout
        self._pool = None
        self._conn = None
        self._tables = set()
        self._locks = KeyedLock()
        # parsed large records (accounts with many tunnels) by their text
        self._parsed = ParsedCache()
        # group commit: calls waiting for the thread, and whether a group runs
        self._queue = []
        self._group_running = False
        self._cleanup = None
        self._cleanup_d = None

    # -- thread plumbing ----------------------------------------------------

    def _run(self, fn, *args):
        if self._pool is None:
            return defer.fail(StorageUnavailable("SQLite storage %s is not open" % self.path))
        d = threads.deferToThreadPool(self._reactor, self._pool, fn, *args)
        d.addErrback(self._translate)
        return d

    def _translate(self, failure):
        if failure.check(StorageError):
            return failure
        if failure.check(sqlite3.OperationalError):
            raise StorageUnavailable("SQLite %s: %s" % (self.path, one_line(failure.value)))
        if failure.check(sqlite3.Error):
            raise StorageError("SQLite %s: %s" % (self.path, one_line(failure.value)))
        return failure

    def _connect(self):
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise StorageUnavailable("SQLite: directory %s does not exist" % directory)
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,
            isolation_level=None,  # autocommit; explicit transactions only
            check_same_thread=False,
        )
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warn("SQLite {path}: journal mode is {mode}, not WAL", path=self.path, mode=mode)
            conn.execute("PRAGMA synchronous=FULL")
        except Exception:
            conn.close()
            raise
        self._conn = conn

    def _ensure_table_sync(self, table):
        if table in self._tables:
            return
        c = self._conn
        c.execute(
            "CREATE TABLE IF NOT EXISTS %s ("
            "key TEXT PRIMARY KEY, value BLOB, modified_at INTEGER, expires_at INTEGER NULL)" % table
        )
        c.execute("CREATE INDEX IF NOT EXISTS idx_%s_modified_at ON %s (modified_at)" % (table, table))
        c.execute("CREATE INDEX IF NOT EXISTS idx_%s_expires_at ON %s (expires_at)" % (table, table))
        self._tables.add(table)

    def _table_op(self, ns, fn, *args):
        """Run ``fn(conn, table, *args)`` on the thread, creating the table first."""
        try:
            table = table_name(ns)
        except StorageError:
            return defer.fail()

        def op():
            self._ensure_table_sync(table)
            return fn(self._conn, table, *args)

        return self._run(op)

    def _queued(self, ns, fn, write=True):
        """Run ``fn(conn, table)`` on the thread in the next group (see the module docstring)."""
        try:
            table = table_name(ns)
        except StorageError:
            return defer.fail()
        if self._pool is None:
            return defer.fail(StorageUnavailable("SQLite storage %s is not open" % self.path))
        d = defer.Deferred()
        self._queue.append((table, fn, write, d))
        if not self._group_running:
            self._run_group()
        return d.addErrback(self._translate)

    def _run_group(self):
        group, self._queue = self._queue, []
        self._group_running = True
        self._run(self._group_sync, group).addBoth(self._group_done, group)

    def _group_sync(self, group):
        """On the thread: every call of the group, the writes in one transaction."""
        conn = self._conn
        if conn is None:  # closed meanwhile
            raise StorageUnavailable("SQLite storage %s is not open" % self.path)
        for table in {table for table, _, _, _ in group}:
            self._ensure_table_sync(table)
        writes = any(write for _, _, write, _ in group)
        results = []
        if writes:
            conn.execute("BEGIN IMMEDIATE")
        try:
            for table, fn, write, _ in group:
                if write:
                    conn.execute("SAVEPOINT call")
                try:
                    results.append((True, fn(conn, table)))
                except Exception:
                    results.append((False, Failure()))
                    if write:
                        conn.execute("ROLLBACK TO call")
                if write:
                    conn.execute("RELEASE call")
            if writes:
                conn.execute("COMMIT")
        except BaseException:
            if writes and conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        return results

    def _group_done(self, results, group):
        self._group_running = False
        if isinstance(results, Failure):
            for _, _, _, d in group:
                d.errback(results)
        else:
            for (ok, value), (_, _, _, d) in zip(results, group):
                if ok:
                    d.callback(value)
                else:
                    d.errback(value)
        if self._queue:
            if self._pool is None:
                group, self._queue = self._queue, []
                for _, _, _, d in group:
                    d.errback(StorageUnavailable("SQLite storage %s is not open" % self.path))
            else:
                self._run_group()
        return None

    # -- life cycle ---------------------------------------------------------

    @defer.inlineCallbacks
    def open(self):
        if self._pool is not None:
            return self
        pool = ThreadPool(minthreads=1, maxthreads=1, name="exposr-sqlite")
        pool.start()
        self._pool = pool
        try:
            yield self._run(self._connect)
            for ns in NAMESPACES:
                yield self._table_op(ns, lambda conn, table: None)
            yield self._delete_expired()
        except Exception as e:
            yield self._stop_pool()
            if isinstance(e, StorageUnavailable):
                raise
            raise StorageUnavailable("SQLite %s: %s" % (self.path, one_line(e)))
        self._start_cleanup(self._clock, CLEANUP_INTERVAL)
        return self

    def _delete_expired(self):
        now = _now(self._clock)

        def op():
            total = 0
            for table in sorted(self._tables):
                cur = self._conn.execute(
                    "DELETE FROM %s WHERE expires_at IS NOT NULL AND expires_at <= ?" % table, (now,)
                )
                total += cur.rowcount
            return total

        return self._run(op)

    @defer.inlineCallbacks
    def close(self):
        yield self._stop_cleanup()
        yield self._stop_pool()

    @defer.inlineCallbacks
    def _stop_pool(self):
        pool = self._pool
        if pool is None:
            return

        def close_conn():
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        try:
            yield threads.deferToThreadPool(self._reactor, pool, close_conn)
        except Exception:
            log.failure("SQLite close failed")
        self._pool = None
        self._tables.clear()
        # the thread is idle now: joining it does not block
        pool.stop()

    # -- IStorage -----------------------------------------------------------

    def _expires(self, ttl):
        return None if ttl is None else _now(self._clock) + int(ttl)

    def create(self, ns, key, value, ttl=None):
        text = dumps(value)
        now, expires = _now(self._clock), self._expires(ttl)

        def op(conn, table):
            cur = conn.execute(
                "INSERT INTO %s (key, value, modified_at, expires_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(key) DO NOTHING" % table,
                (key, text, now, expires),
            )
            if cur.rowcount == 1:
                return True
            # an expired row still occupies the key: replace it
            cur = conn.execute(
                "UPDATE %s SET value = ?, modified_at = ?, expires_at = ? "
                "WHERE key = ? AND expires_at IS NOT NULL AND expires_at <= ?" % table,
                (text, now, expires, key, now),
            )
            return cur.rowcount == 1

        return self._queued(ns, op)

    def put(self, ns, key, value, ttl=None):
        text = dumps(value)
        now, expires = _now(self._clock), self._expires(ttl)

        def op(conn, table):
            conn.execute(
                "INSERT INTO %s (key, value, modified_at, expires_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
                "modified_at = excluded.modified_at, expires_at = excluded.expires_at" % table,
                (key, text, now, expires),
            )

        return self._queued(ns, op)

    def get(self, ns, key):
        now = _now(self._clock)

        def op(conn, table):
            row = conn.execute(
                "SELECT value FROM %s WHERE key = ? AND (expires_at IS NULL OR expires_at > ?)" % table,
                (key, now),
            ).fetchone()
            return None if row is None else row[0]

        return self._queued(ns, op, write=False).addCallback(self._parse, ns, key)

    def _parse(self, text, ns, key):
        return self._parsed.loads((ns, key), text, "%s:%s" % (ns, key))

    def get_multi(self, ns, keys):
        keys = list(keys)
        now = _now(self._clock)

        def op(conn, table):
            found = {}
            unique = list(dict.fromkeys(keys))
            for i in range(0, len(unique), _CHUNK):
                chunk = unique[i:i + _CHUNK]
                rows = conn.execute(
                    "SELECT key, value FROM %s WHERE key IN (%s) AND (expires_at IS NULL OR expires_at > ?)"
                    % (table, ",".join("?" * len(chunk))),
                    (*chunk, now),
                ).fetchall()
                for k, v in rows:
                    found[k] = v
            return [loads(found[k], "%s:%s" % (ns, k)) if k in found else None for k in keys]

        if not keys:
            return defer.succeed([])
        return self._queued(ns, op, write=False)

    def delete(self, ns, key):
        now = _now(self._clock)

        def op(conn, table):
            cur = conn.execute(
                "DELETE FROM %s WHERE key = ? RETURNING expires_at" % table, (key,)
            )
            rows = cur.fetchall()
            return any(exp is None or exp > now for (exp,) in rows)

        self._parsed.forget((ns, key))
        return self._queued(ns, op)

    def list_keys(self, ns, cursor, count):
        now = _now(self._clock)
        count = max(1, int(count))

        def op(conn, table):
            if cursor is None:
                rows = conn.execute(
                    "SELECT key FROM %s WHERE (expires_at IS NULL OR expires_at > ?) "
                    "ORDER BY key ASC LIMIT ?" % table,
                    (now, count),
                ).fetchall()
            else:
                rows = conn.execute(
                    "SELECT key FROM %s WHERE key > ? AND (expires_at IS NULL OR expires_at > ?) "
                    "ORDER BY key ASC LIMIT ?" % table,
                    (cursor, now, count),
                ).fetchall()
            keys = [r[0] for r in rows]
            return keys, (keys[-1] if keys else None)

        return self._queued(ns, op, write=False)

    def update(self, ns, key, fn):
        @defer.inlineCallbacks
        def locked():
            current = yield self.get(ns, key)
            if current is None:
                raise NotFound("No such key %s:%s" % (ns, key))
            new = yield defer.maybeDeferred(fn, current)
            if new is None:
                return None
            text = dumps(new)
            now = _now(self._clock)

            def op(conn, table):
                cur = conn.execute(
                    "UPDATE %s SET value = ?, modified_at = ? "
                    "WHERE key = ? AND (expires_at IS NULL OR expires_at > ?)" % table,
                    (text, now, key, now),
                )
                return cur.rowcount

            changed = yield self._queued(ns, op)
            if not changed:
                # deleted (or expired) while fn ran
                raise NotFound("No such key %s:%s" % (ns, key))
            self._parsed.written((ns, key), text, new)
            return clean(new)

        return self._locks.run("%s:%s" % (ns, key), locked)
