"""The storage contract shared by every backend (docs/protocol.rst, "Storage layout").

A backend is a small key/value store of JSON objects in three namespaces
(``account``, ``tunnel``, ``ingress-altnames``). Every `IStorage` method
returns a Deferred. Values are Python dicts; they are serialised as compact
JSON and returned exactly as stored: filling in defaults is the domain's
job.
"""

import base64
import binascii
import collections
import json
import re

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Interface, implementer

from exposr.errors import (  # noqa: F401  (the storage errors, named here too)
    InvalidCursor,
    LockTimeout,
    NotFound,
    StorageError,
    StorageUnavailable,
)
from exposr.periodic import Periodic

log = Logger(namespace="exposr.storage")

NAMESPACES = ("tunnel", "account", "ingress-altnames")

_NS_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class IStorage(Interface):
    """A key/value store of JSON objects; every method returns a Deferred."""

    def open():
        """
        Connect, create the schema and start the expiry cleanup. Fails with
        `StorageUnavailable` (one-line reason) once a bounded number of
        connection attempts have failed.
        """

    def close():
        """Stop the cleanup and disconnect."""

    def create(ns, key, value, ttl=None):
        """Write ``value`` only if ``key`` is absent: True if written, else False."""

    def put(ns, key, value, ttl=None):
        """Write ``value`` unconditionally (None)."""

    def get(ns, key):
        """The stored dict, or None."""

    def get_multi(ns, keys):
        """A list with the dict (or None) of every key, in request order."""

    def delete(ns, key):
        """True if the key was deleted, False if it was absent."""

    def list_keys(ns, cursor, count):
        """
        One page of keys from the backend: ``(keys, next_cursor)``, the cursor
        being the backend's own (a string) and None at the end. ``cursor`` None
        starts from the beginning. The page may hold fewer or more than
        ``count`` keys.
        """

    def update(ns, key, fn):
        """
        Atomic read-modify-write under the backend's lock (docs/protocol.rst,
        "Backends and locks").

        ``fn(current)`` returns the new dict (or a Deferred of it), or None to
        leave the record untouched. Fires with the dict written, or None when
        ``fn`` aborted; fails with `NotFound` when the key does not exist.
        """


# -- serialisation ----------------------------------------------------------


# types whose values are immutable: a list of only these is copied as a whole
_ATOMIC = frozenset((str, int, float, bool, type(None)))


def clean(value):
    """
    The JSON-able form of ``value``: keys starting with ``_`` and None values
    are dropped from every object, at every level.
    """
    if isinstance(value, dict):
        return {
            k: clean(v)
            for k, v in value.items()
            if v is not None and not (isinstance(k, str) and k.startswith("_"))
        }
    if isinstance(value, (list, tuple)):
        if _ATOMIC.issuperset(map(type, value)):
            # (an account's tunnel ids): nothing to clean, copied at C speed
            return list(value)
        return [clean(v) for v in value]
    return value


def dumps(value):
    """Compact JSON text of ``value`` after `clean`."""
    return json.dumps(clean(value), separators=(",", ":"), ensure_ascii=False)


def loads(text, where=""):
    """
    Parse a stored value; text or bytes. A value that is not valid JSON is
    logged and read as missing.
    """
    if text is None:
        return None
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", "replace")
    if not isinstance(text, str):
        # already decoded (PostgreSQL JSONB)
        return text
    try:
        return json.loads(text)
    except ValueError:
        log.warn("Ignoring unreadable stored value at {where}", where=where)
        return None


# -- copies and parsed values of large records ------------------------------------
#
# An account record lists the ids of all its tunnels: with thousands of them,
# parsing it (or deep-copying it) element by element on every API call would
# make every call's cost grow with the number of tunnels. Lists of plain values
# are therefore frozen as tuples and copied back as lists at C speed, and the
# SQL and Redis backends keep the parsed form of their few large records by
# their stored text: a record read again with the same text is not parsed
# again. The stored text is still read every time, so what is returned is
# always what is stored (another node may have changed it).


class _Nested(tuple):
    """A frozen list holding objects or lists (thawed element by element)."""

    __slots__ = ()


def freeze(value):
    """An immutable copy of a JSON value (dicts stay dicts, but nothing
    mutable is shared with ``value`` and `thaw` copies it back)."""
    if isinstance(value, dict):
        return {k: freeze(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if _ATOMIC.issuperset(map(type, value)):
            return tuple(value)
        return _Nested(freeze(v) for v in value)
    return value


def freeze_clean(value):
    """`freeze` of `clean` of ``value``, in one pass."""
    if isinstance(value, dict):
        return {
            k: freeze_clean(v)
            for k, v in value.items()
            if v is not None and not (isinstance(k, str) and k.startswith("_"))
        }
    if isinstance(value, (list, tuple)):
        if _ATOMIC.issuperset(map(type, value)):
            return tuple(value)
        return _Nested(freeze_clean(v) for v in value)
    return value


def thaw(value):
    """A fresh mutable copy (dicts and lists) of a `freeze` d value."""
    cls = type(value)
    if cls is dict:
        return {k: thaw(v) for k, v in value.items()}
    if cls is tuple:
        return list(value)
    if cls is _Nested:
        return [thaw(v) for v in value]
    return value


class ParsedCache:
    """
    The parsed values of the large records a backend read, by key and stored
    text: `loads` parses a text only when it differs from the one seen last for
    that key. Only texts of at least `MIN_SIZE` characters are kept, at most
    `MAX_ENTRIES` of them (least recently used first out).
    """

    MIN_SIZE = 4096
    MAX_ENTRIES = 64

    def __init__(self):
        self._entries = collections.OrderedDict()  # key -> (text, frozen value)

    def loads(self, key, text, where=""):
        """`loads` of ``text`` (the stored text of ``key``), parsed once."""
        if not isinstance(text, (str, bytes)) or len(text) < self.MIN_SIZE:
            return loads(text, where)
        entry = self._entries.get(key)
        if entry is not None and entry[0] == text:
            self._entries.move_to_end(key)
            return thaw(entry[1])
        value = loads(text, where)
        self._remember(key, text, value)
        return value

    def written(self, key, text, value):
        """``text`` (`dumps` of ``value``) was stored for ``key``: what its next read will parse to
        is ``clean(value)``."""
        self._entries.pop(key, None)
        if isinstance(text, (str, bytes)) and len(text) >= self.MIN_SIZE:
            self._remember(key, text, clean(value))

    def forget(self, key):
        self._entries.pop(key, None)

    def _remember(self, key, text, value):
        if not isinstance(value, dict):
            self._entries.pop(key, None)
            return
        self._entries[key] = (text, freeze(value))
        self._entries.move_to_end(key)
        while len(self._entries) > self.MAX_ENTRIES:
            self._entries.popitem(last=False)

    def __len__(self):
        return len(self._entries)


def table_name(ns):
    """SQL table of a namespace: lower case, ``-`` to ``_``, ``t_`` before a digit."""
    check_namespace(ns)
    name = ns.lower().replace("-", "_")
    if name[0].isdigit():
        name = "t_" + name
    return name


def check_namespace(ns):
    if not isinstance(ns, str) or not _NS_RE.match(ns):
        raise StorageError("Invalid namespace %r" % (ns,))


# -- API list paging (docs/protocol.rst, "List cursors") -------------------


def encode_cursor(cursor):
    if cursor is None:
        return None
    return base64.urlsafe_b64encode(str(cursor).encode("utf-8")).rstrip(b"=").decode("ascii")


def decode_cursor(cursor):
    if cursor is None or cursor == "":
        return None
    try:
        raw = cursor.encode("ascii") if isinstance(cursor, str) else bytes(cursor)
        raw += b"=" * (-len(raw) % 4)
        return base64.b64decode(raw, altchars=b"-_", validate=True).decode("utf-8")
    except (ValueError, binascii.Error, UnicodeError):
        raise InvalidCursor("Invalid cursor")


@defer.inlineCallbacks
def list_page(storage, ns, cursor, count):
    """
    One API page of keys: ``(keys, cursor)`` where ``cursor`` is the base64url
    (no padding) of the backend cursor, None at the end. The backend is asked
    until it has given at least ``count`` keys or is exhausted; surplus keys
    stay in the page.
    """
    count = max(1, int(count))
    backend_cursor = decode_cursor(cursor)
    keys = []
    while True:
        # the full count each time: Redis takes COUNT as a hint only, and a
        # small hint means many round trips
        page, backend_cursor = yield storage.list_keys(ns, backend_cursor, count)
        keys.extend(page)
        if backend_cursor is None or len(keys) >= count:
            break
    return keys, encode_cursor(backend_cursor)


# -- helpers for backends ---------------------------------------------------


class KeyedLock:
    """A FIFO mutex per key, forgotten when nobody holds or waits for it."""

    def __init__(self):
        self._locks = {}

    def run(self, key, fn, *args, **kwargs):
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = defer.DeferredLock()

        def release(result):
            if not lock.locked and not lock.waiting and self._locks.get(key) is lock:
                del self._locks[key]
            return result

        return lock.run(fn, *args, **kwargs).addBoth(release)

    def __len__(self):
        return len(self._locks)


def unavailable(reason):
    """A `StorageUnavailable` failure with a one-line reason."""
    return defer.fail(StorageUnavailable(one_line(reason)))


def one_line(reason):
    text = str(reason).strip() or reason.__class__.__name__
    return " ".join(text.split())


@implementer(IStorage)
class BaseStorage(service.Service):
    """
    Service plumbing shared by the backends: the startup sequence awaits
    `open`; `stopService` closes.
    """

    name = "storage"
    _cleanup = None
    _cleanup_d = None

    # -- expiry cleanup (at start-up and every 5 minutes)

    def _start_cleanup(self, clock, interval):
        """Run `_delete_expired` every ``interval`` s from now; a failure never stops it.

        The timer is the storage's own (started by `open`, stopped by `close`),
        not a child service: `open` also runs without the service (migrate).
        """
        self._cleanup = Periodic(interval, self._cleanup_tick, clock, "%s expiry cleanup" % type(self).__name__)
        self._cleanup.startService()

    def _cleanup_tick(self):
        if self._cleanup_d is not None:  # never two at once
            return None
        d = self._delete_expired()
        d.addErrback(lambda f: log.warn("{backend} expiry cleanup failed: {reason}",
                                        backend=type(self).__name__, reason=one_line(f.value)))
        self._cleanup_d = d

        def done(_):
            self._cleanup_d = None

        d.addBoth(done)
        return None

    @defer.inlineCallbacks
    def _stop_cleanup(self):
        if self._cleanup is not None and self._cleanup.running:
            yield self._cleanup.stopService()
        self._cleanup = None
        if self._cleanup_d is not None:
            try:
                yield self._cleanup_d
            except Exception:
                pass

    def stopService(self):
        service.Service.stopService(self)
        return self.close()

    def _written(self, value):
        """What ``update`` returns: the value as it is stored."""
        return clean(value)
