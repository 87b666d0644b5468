"""``redis://[:password@]host[:port][/db]`` (docs/protocol.rst, "Backends and locks").

Key layout shared with the original: ``<namespace>:<key>`` holding the JSON
text (``tunnel:my-tunnel``, ``account:MPW4YDYVNPFXVV2D``,
``ingress-altnames:http-example.net``); listing is ``SCAN <cursor> MATCH
<namespace>:*``. Atomic updates take the original's Redlock-style lock on
``lock:<key>`` (no namespace): ``SET NX PX 1000`` with 16 random bytes as hex,
25 retries every 200 ms +/- 100 ms, extended every 500 ms while held, released
only by its owner. The final write is a script that writes only while the lock
is still ours. Within one process, updates of one key also queue on a FIFO
mutex first, so only other nodes make us retry.

Commands go to live txredisapi connections only: while Redis is away every
call fails at once with `StorageUnavailable` (no queueing) and the
connections come back by themselves.
"""

import os
import random
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet import defer, endpoints, task
from twisted.logger import Logger

from exposr.compat.txredisapi import usable
from exposr.storage.base import (
    BaseStorage,
    KeyedLock,
    LockTimeout,
    NotFound,
    ParsedCache,
    StorageError,
    StorageUnavailable,
    check_namespace,
    clean,
    dumps,
    loads,
    one_line,
)

log = Logger(namespace="exposr.storage.redis")

# release: delete the lock only if it is still ours
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""

# extend: renew the lease only if the lock is still ours
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
"""

# write the record only while we hold the lock; keep the record's TTL
_COMMIT = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then
    return -1
end
if redis.call('exists', KEYS[2]) == 0 then
    return 0
end
local ttl = redis.call('pttl', KEYS[2])
if ttl > 0 then
    redis.call('set', KEYS[2], ARGV[2], 'PX', ttl)
else
    redis.call('set', KEYS[2], ARGV[2])
end
return 1
"""


class _Factory(txredisapi.RedisFactory):
    """Reconnects quickly: first retry after ~0.1 s, never more than 2 s apart."""

    initialDelay = 0.1
    maxDelay = 2.0
    factor = 2.0


class RedisStorage(BaseStorage):
    def __init__(
        self,
        host="localhost",
        port=6379,
        db=None,
        password=None,
        username=None,
        *,
        reactor,
        pool_size=2,
        open_attempts=5,
        open_retry_delay=1.0,
        connect_timeout=10.0,
        reply_timeout=30.0,
        lock_ttl=1.0,
        lock_retries=25,
        lock_retry_delay=0.2,
        lock_retry_jitter=0.1,
        lock_extend_interval=0.5,
    ):
        self._reactor = reactor
        self.host = host
        self.port = int(port)
        self.db = db
        self.password = password
        self.username = username
        self.pool_size = max(1, pool_size)
        self.open_attempts = max(1, open_attempts)
        self.open_retry_delay = open_retry_delay
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.lock_ttl = lock_ttl
        self.lock_retries = lock_retries
        self.lock_retry_delay = lock_retry_delay
        self.lock_retry_jitter = lock_retry_jitter
        self.lock_extend_interval = lock_extend_interval
        self._factory = None
        self._next = 0
        self._locks = KeyedLock()
        # parsed large records (accounts with many tunnels) by their text
        self._parsed = ParsedCache()

    @classmethod
    def from_url(cls, url, reactor, **kwargs):
        """``redis://[[user]:password@]host[:port][/db]``."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("redis",):
            raise StorageError("Not a redis URL: %s" % url)
        params = {"host": parts.hostname or "localhost", "port": parts.port or 6379}
        if parts.password is not None:
            params["password"] = unquote(parts.password)
        if parts.username:
            params["username"] = unquote(parts.username)
        path = parts.path.strip("/")
        if path:
            try:
                params["db"] = int(path)
            except ValueError:
                raise StorageError("Invalid Redis database number in %s" % url)
        params.update(kwargs)
        return cls(reactor=reactor, **params)

    def describe(self):
        return "%s:%s%s" % (self.host, self.port, "/%s" % self.db if self.db is not None else "")

    # -- life cycle ---------------------------------------------------------

    def _make_factory(self, poolsize, reconnect):
        factory = _Factory(
            self.describe(),
            self.db,
            poolsize,
            isLazy=True,
            password=self.password,
            username=self.username,
            replyTimeout=self.reply_timeout,
            convertNumbers=False,
        )
        factory.reconnect = reconnect
        endpoint = endpoints.HostnameEndpoint(self._reactor, self.host, self.port, timeout=self.connect_timeout)
        factory.startConnecting(endpoint)
        return factory

    @defer.inlineCallbacks
    def _probe(self):
        """One connection attempt (connect, AUTH, SELECT, PING) with its own, clear, failure."""
        factory = self._make_factory(1, reconnect=False)
        d = factory.deferred.addCallback(lambda _: factory.pool[0].ping())
        d.addTimeout(self.connect_timeout, self._reactor)
        try:
            yield d
        except defer.TimeoutError:
            raise StorageUnavailable("no answer within %s s" % self.connect_timeout)
        except Exception as e:
            text = one_line(e)
            if text.startswith("Redis error: "):
                text = text[len("Redis error: "):]
            raise StorageUnavailable(text)
        finally:
            yield factory.disconnect()

    @defer.inlineCallbacks
    def open(self):
        if self._factory is not None:
            return self
        reason = None
        for attempt in range(self.open_attempts):
            if attempt:
                yield task.deferLater(self._reactor, self.open_retry_delay, lambda: None)
            try:
                yield self._probe()
                reason = None
                break
            except StorageUnavailable as e:
                reason = str(e)
                log.warn(
                    "Redis {where} not reachable (attempt {n}/{total}): {reason}",
                    where=self.describe(),
                    n=attempt + 1,
                    total=self.open_attempts,
                    reason=reason,
                )
        if reason is not None:
            raise StorageUnavailable("Redis %s unreachable: %s" % (self.describe(), reason))
        factory = self._make_factory(self.pool_size, reconnect=True)
        self._factory = factory
        try:
            yield factory.deferred.addTimeout(self.connect_timeout + 1, self._reactor)
        except Exception as e:
            self._factory = None
            yield factory.disconnect()
            raise StorageUnavailable("Redis %s unreachable: %s" % (self.describe(), one_line(e)))
        return self

    @defer.inlineCallbacks
    def close(self):
        factory, self._factory = self._factory, None
        if factory is not None:
            yield factory.disconnect()

    # -- plumbing -----------------------------------------------------------

    def _connection(self):
        factory = self._factory
        if factory is None:
            raise StorageUnavailable("Redis storage is not open")
        live = usable(factory)
        if not live:
            raise StorageUnavailable("no connection to Redis at %s" % self.describe())
        self._next = (self._next + 1) % len(live)
        return live[self._next]

    def _cmd(self, fn):
        """``fn(protocol)`` on a live connection; errors as StorageUnavailable/StorageError."""
        try:
            d = defer.maybeDeferred(fn, self._connection())
        except StorageError:
            return defer.fail()

        def translate(f):
            if f.check(txredisapi.ConnectionError):
                raise StorageUnavailable("Redis %s: %s" % (self.describe(), one_line(f.value)))
            if f.check(txredisapi.RedisError):
                raise StorageError("Redis %s: %s" % (self.describe(), one_line(f.value)))
            return f

        return d.addErrback(translate)

    @staticmethod
    def _key(ns, key):
        check_namespace(ns)
        return "%s:%s" % (ns, key)

    @staticmethod
    def _ttl_args(ttl):
        if ttl is None:
            return {}
        if float(ttl) == int(ttl):
            return {"expire": int(ttl)}
        return {"pexpire": max(1, int(round(float(ttl) * 1000)))}

    # -- IStorage -----------------------------------------------------------

    def create(self, ns, key, value, ttl=None):
        try:
            rkey = self._key(ns, key)
        except StorageError:
            return defer.fail()
        text = dumps(value)
        d = self._cmd(lambda c: c.set(rkey, text, only_if_not_exists=True, **self._ttl_args(ttl)))
        return d.addCallback(lambda r: r is not None)

    def put(self, ns, key, value, ttl=None):
        try:
            rkey = self._key(ns, key)
        except StorageError:
            return defer.fail()
        text = dumps(value)
        return self._cmd(lambda c: c.set(rkey, text, **self._ttl_args(ttl))).addCallback(lambda _: None)

    def get(self, ns, key):
        try:
            rkey = self._key(ns, key)
        except StorageError:
            return defer.fail()
        return self._cmd(lambda c: c.get(rkey)).addCallback(self._parse, rkey)

    def _parse(self, raw, rkey):
        # large records (accounts with many tunnels) parsed once per text
        return self._parsed.loads(rkey, raw, rkey)

    def get_multi(self, ns, keys):
        keys = list(keys)
        if not keys:
            return defer.succeed([])
        try:
            rkeys = [self._key(ns, k) for k in keys]
        except StorageError:
            return defer.fail()
        d = self._cmd(lambda c: c.mget(rkeys))
        return d.addCallback(lambda values: [loads(v, k) for k, v in zip(rkeys, values)])

    def delete(self, ns, key):
        try:
            rkey = self._key(ns, key)
        except StorageError:
            return defer.fail()
        self._parsed.forget(rkey)
        return self._cmd(lambda c: c.delete(rkey)).addCallback(lambda n: int(n) > 0)

    def list_keys(self, ns, cursor, count):
        try:
            check_namespace(ns)
        except StorageError:
            return defer.fail()
        prefix = ns + ":"
        start = cursor if cursor is not None else "0"
        count = max(1, int(count))

        def page(reply):
            next_cursor, keys = reply
            next_cursor = next_cursor.decode() if isinstance(next_cursor, bytes) else str(next_cursor)
            keys = [k.decode("utf-8") if isinstance(k, bytes) else k for k in keys]
            keys = [k[len(prefix):] for k in keys if k.startswith(prefix)]
            return keys, (None if next_cursor == "0" else next_cursor)

        d = self._cmd(lambda c: c.scan(start, prefix + "*", count))
        return d.addCallback(page)

    # -- atomic update ------------------------------------------------------

    @defer.inlineCallbacks
    def acquire_lock(self, resource):
        """
        The Redlock-style lock on ``lock:<resource>``: fires with a held lock
        (call ``release()``), or fails with `LockTimeout`.
        """
        lock = _Lock(self, "lock:%s" % resource, os.urandom(16).hex())
        for attempt in range(1 + self.lock_retries):
            if attempt:
                delay = self.lock_retry_delay + random.uniform(-self.lock_retry_jitter, self.lock_retry_jitter)
                yield task.deferLater(self._reactor, max(0.0, delay), lambda: None)
            ok = yield self._cmd(
                lambda c: c.set(lock.key, lock.value, pexpire=int(self.lock_ttl * 1000), only_if_not_exists=True)
            )
            if ok is not None:
                lock.start()
                return lock
        raise LockTimeout("Could not acquire the lock %s" % lock.key)

    def update(self, ns, key, fn):
        try:
            rkey = self._key(ns, key)
        except StorageError:
            return defer.fail()

        @defer.inlineCallbacks
        def body(lock):
            raw = yield self._cmd(lambda c: c.get(rkey))
            if raw is None:
                raise NotFound("No such key %s" % rkey)
            new = yield defer.maybeDeferred(fn, self._parse(raw, rkey))
            if new is None:
                return None
            text = dumps(new)
            done = yield self._cmd(lambda c: c.eval(_COMMIT, [lock.key, rkey], [lock.value, text]))
            if done == -1:
                raise StorageError("Lost the lock %s before writing %s" % (lock.key, rkey))
            if done == 0:
                raise NotFound("No such key %s" % rkey)
            self._parsed.written(rkey, text, new)
            return clean(new)

        def locked():
            def held(lock):
                d = body(lock)
                d.addBoth(lambda result: lock.release().addCallback(lambda _: result))
                return d

            return self.acquire_lock(key).addCallback(held)

        return self._locks.run(rkey, locked)


class _Lock:
    """A held lock: extended every ``lock_extend_interval`` until released."""

    def __init__(self, storage, key, value):
        self.storage = storage
        self.key = key
        self.value = value
        self.lost = False
        self._loop = None
        self._extending = None

    def start(self):
        self._loop = task.LoopingCall(self._extend)
        self._loop.clock = self.storage._reactor
        self._loop.start(self.storage.lock_extend_interval, now=False)

    def _extend(self):
        if self._extending is not None:
            return
        s = self.storage
        d = s._cmd(lambda c: c.eval(_EXTEND, [self.key], [self.value, int(s.lock_ttl * 1000)]))

        def extended(r):
            if r == 0 and not self.lost:
                self.lost = True
                log.warn("Redis lock {key} expired while held", key=self.key)

        def failed(f):
            log.warn("Could not extend Redis lock {key}: {reason}", key=self.key, reason=one_line(f.value))

        def done(_):
            self._extending = None

        d.addCallbacks(extended, failed).addBoth(done)
        self._extending = d

    @defer.inlineCallbacks
    def release(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._extending is not None:
            yield self._extending
        try:
            yield self.storage._cmd(lambda c: c.eval(_RELEASE, [self.key], [self.value]))
        except StorageError as e:
            # it expires by itself within the lease
            log.warn("Could not release Redis lock {key}: {reason}", key=self.key, reason=one_line(e))
