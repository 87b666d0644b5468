"""``memory://``: in-process dicts, lost on restart, single node.

Keys keep insertion order; the backend cursor is the decimal offset into that
order and the end is a call that returns no keys. Updates hold a FIFO mutex per
key. TTLs are timers on the injected reactor (or `task.Clock`), which is required.

Values are kept in a frozen form (`exposr.storage.base.freeze_clean`): a
list of plain values (the tunnel ids of an account) is kept as a tuple and
handed out as a new list, a copy made at C speed, instead of `copy.deepcopy`
element by element; an account with thousands of tunnels is then read and
written in microseconds. Every read still gets its own mutable copy.
"""

from twisted.internet import defer

from exposr.storage.base import (
    BaseStorage,
    InvalidCursor,
    KeyedLock,
    NotFound,
    check_namespace,
    freeze_clean,
    thaw,
)


class MemoryStorage(BaseStorage):
    def __init__(self, reactor):
        self._reactor = reactor
        self._data = {}  # ns -> {key: dict}
        self._timers = {}  # (ns, key) -> IDelayedCall
        self._locks = KeyedLock()

    # -- life cycle ---------------------------------------------------------

    def open(self):
        return defer.succeed(self)

    def close(self):
        for call in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()
        return defer.succeed(None)

    # -- helpers ------------------------------------------------------------

    def _ns(self, ns):
        check_namespace(ns)
        return self._data.setdefault(ns, {})

    def _set_ttl(self, ns, key, ttl):
        old = self._timers.pop((ns, key), None)
        if old is not None and old.active():
            old.cancel()
        if ttl is not None:
            self._timers[(ns, key)] = self._reactor.callLater(ttl, self._expire, ns, key)

    def _expire(self, ns, key):
        self._timers.pop((ns, key), None)
        self._data.get(ns, {}).pop(key, None)

    def _store(self, ns, key, value, ttl):
        self._ns(ns)[key] = freeze_clean(value)
        self._set_ttl(ns, key, ttl)

    # -- IStorage -----------------------------------------------------------

    def create(self, ns, key, value, ttl=None):
        if key in self._ns(ns):
            return defer.succeed(False)
        self._store(ns, key, value, ttl)
        return defer.succeed(True)

    def put(self, ns, key, value, ttl=None):
        self._store(ns, key, value, ttl)
        return defer.succeed(None)

    def get(self, ns, key):
        return defer.succeed(thaw(self._ns(ns).get(key)))

    def get_multi(self, ns, keys):
        data = self._ns(ns)
        return defer.succeed([thaw(data.get(k)) for k in keys])

    def delete(self, ns, key):
        data = self._ns(ns)
        if key not in data:
            return defer.succeed(False)
        del data[key]
        self._set_ttl(ns, key, None)
        return defer.succeed(True)

    def list_keys(self, ns, cursor, count):
        data = self._ns(ns)
        try:
            offset = int(cursor) if cursor is not None else 0
        except ValueError:
            return defer.fail(InvalidCursor("Invalid cursor"))
        if offset < 0:
            return defer.fail(InvalidCursor("Invalid cursor"))
        count = max(1, int(count))
        keys = list(data)[offset:offset + count]
        if not keys:
            return defer.succeed(([], None))
        return defer.succeed((keys, str(offset + len(keys))))

    def update(self, ns, key, fn):
        data = self._ns(ns)

        @defer.inlineCallbacks
        def locked():
            if key not in data:
                raise NotFound("No such key %s:%s" % (ns, key))
            new = yield defer.maybeDeferred(fn, thaw(data[key]))
            if new is None:
                return None
            if key not in data:
                # deleted (or expired) while fn ran
                raise NotFound("No such key %s:%s" % (ns, key))
            data[key] = stored = freeze_clean(new)
            return thaw(stored)

        return self._locks.run("%s:%s" % (ns, key), locked)
