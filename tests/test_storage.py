"""
Storage backends (docs/protocol.rst, "Storage layout"), one suite run against each of
memory, SQLite, PostgreSQL (127.0.0.1:5432, database ``test``) and Redis
(127.0.0.1:6379, in the database this process leases: tests/redis_db.py) for real.

PostgreSQL tests run in a schema of their own (search_path set through the
connection options) so the table names stay ``account``/``tunnel``/
``ingress_altnames``; Redis tests use the leased db, flushed before and after each test.
"""

import json
import os
import sqlite3
import sys
import tempfile
import time

from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from exposr.storage import storage_from_url
from exposr.storage.base import (
    IStorage,
    InvalidCursor,
    NotFound,
    ParsedCache,
    StorageError,
    StorageUnavailable,
    clean,
    decode_cursor,
    freeze,
    freeze_clean,
    thaw,
    dumps,
    encode_cursor,
    list_page,
    table_name,
)
from exposr.storage.memory import MemoryStorage
from exposr.storage.sqlite import SqliteStorage
from tests.redis_db import REDIS_DB  # (other test modules import it from here)

ACCOUNT = {
    "accountId": "MPW4YDYVNPFXVV2D",
    "id": "MPW4YDYVNPFXVV2D",
    "created_at": "2024-02-10T12:34:56.789Z",
    "updated_at": "2024-02-10T12:34:56.789Z",
    "tunnels": ["my-tunnel"],
    "status": {"disabled": False},
}
ACCOUNT_JSON = (
    '{"accountId":"MPW4YDYVNPFXVV2D","id":"MPW4YDYVNPFXVV2D","created_at":"2024-02-10T12:34:56.789Z",'
    '"updated_at":"2024-02-10T12:34:56.789Z","tunnels":["my-tunnel"],"status":{"disabled":false}}'
)
TUNNEL = {
    "transport": {
        "token": "A" * 86,
        "max_connections": 1,
        "ws": {"enabled": True},
        "ssh": {"enabled": False},
    },
    "ingress": {
        "http": {
            "enabled": True,
            "url": "http://my-tunnel.localhost:8080/",
            "urls": ["http://my-tunnel.localhost:8080/"],
            "alt_names": [],
        },
        "sni": {"enabled": False, "urls": []},
    },
    "target": {"url": "http://example.com"},
    "id": "my-tunnel",
    "account": "MPW4YDYVNPFXVV2D",
    "created_at": "2024-02-10T12:34:56.789Z",
    "updated_at": "2024-02-10T12:34:56.789Z",
}
ALTNAME = {"tunnelId": "my-tunnel", "created_at": "2024-02-10T12:34:56.789Z"}
REFERENCE_RECORDS = [
    ("account", "MPW4YDYVNPFXVV2D", ACCOUNT),
    ("tunnel", "my-tunnel", TUNNEL),
    ("ingress-altnames", "http-example.net", ALTNAME),
]


def fake_clock():
    """A `task.Clock` at the current time (TTLs are compared with wall time)."""
    clock = task.Clock()
    clock.advance(time.time())
    return clock


def within(d, seconds, what="operation"):
    """``d`` with a bound: fails the test instead of hanging it."""
    return d.addTimeout(seconds, reactor, onTimeoutCancel=lambda *a: self_fail(what, seconds))


def self_fail(what, seconds):
    raise AssertionError("%s did not finish within %s s" % (what, seconds))


class SerialisationTests(unittest.TestCase):
    def test_vectors(self):
        """Compact JSON, key order kept, nested objects and arrays round-trip."""
        self.assertEqual(dumps({"anumber": 10}), '{"anumber":10}')
        self.assertEqual(
            dumps({"anumber": 10, "obj": {"astring": "foo"}}), '{"anumber":10,"obj":{"astring":"foo"}}'
        )
        self.assertEqual(dumps({"anumber": 10, "anarray": ["bar"]}), '{"anumber":10,"anarray":["bar"]}')
        self.assertEqual(
            dumps({"anumber": 10, "obj": {"anarray": [1, 2]}}), '{"anumber":10,"obj":{"anarray":[1,2]}}'
        )
        for v in ({"anumber": 10}, {"anumber": 10, "obj": {"anarray": [1, 2]}}):
            self.assertEqual(json.loads(dumps(v)), v)

    def test_private_and_none_dropped(self):
        value = {"a": 1, "_conn": object(), "b": None, "c": {"_x": 1, "d": None, "e": "ü"}, "l": [{"_y": 2, "z": 3}]}
        self.assertEqual(dumps(value), '{"a":1,"c":{"e":"ü"},"l":[{"z":3}]}')
        self.assertEqual(clean(value), {"a": 1, "c": {"e": "ü"}, "l": [{"z": 3}]})

    def test_reference_shapes(self):
        self.assertEqual(dumps(ACCOUNT), ACCOUNT_JSON)

    def test_clean_copies_lists(self):
        value = {"tunnels": ["a", "b"], "mixed": [1, None, {"x": None}], "t": ("c",)}
        cleaned = clean(value)
        self.assertEqual(cleaned, {"tunnels": ["a", "b"], "mixed": [1, None, {}], "t": ["c"]})
        cleaned["tunnels"].append("z")
        self.assertEqual(value["tunnels"], ["a", "b"])
        # the memory backend's stored form: both in one pass, read back by thaw
        self.assertEqual(thaw(freeze_clean(value)), clean(value))
        self.assertEqual(freeze_clean(value), freeze(clean(value)))

    def test_parsed_cache(self):
        """Parsed once per text; every answer a copy of its own; a new text parsed again."""
        cache = ParsedCache()
        text = json.dumps(LARGE_RECORD)
        parsed = []

        def counting(t, where=""):
            parsed.append(t)
            return json.loads(t)

        import exposr.storage.base as base

        self.patch(base, "loads", counting)
        first = cache.loads("k", text)
        first["tunnels"].append("x")
        first["nested"][0]["a"].append(3)
        second = cache.loads("k", text)
        self.assertEqual((first is second, second, len(parsed)), (False, LARGE_RECORD, 1))
        changed = json.dumps(dict(LARGE_RECORD, status={"disabled": True}))
        self.assertEqual(cache.loads("k", changed)["status"], {"disabled": True})
        self.assertEqual(len(parsed), 2)
        # a write tells what the text stored reads as
        written = dict(LARGE_RECORD, tunnels=["written-tunnel-%04d" % i for i in range(400)], _private=1, gone=None)
        stored = dumps(written)
        cache.written("k", stored, written)
        self.assertEqual(cache.loads("k", stored), json.loads(stored))
        self.assertEqual(len(parsed), 2)
        # small texts are not kept; at most MAX_ENTRIES large ones
        self.assertEqual(cache.loads("small", '{"a":1}'), {"a": 1})
        for i in range(ParsedCache.MAX_ENTRIES + 5):
            cache.loads("key%d" % i, text)
        self.assertEqual(len(cache), ParsedCache.MAX_ENTRIES)
        cache.forget("key%d" % (ParsedCache.MAX_ENTRIES + 4))
        self.assertEqual(len(cache), ParsedCache.MAX_ENTRIES - 1)

    def test_table_names(self):
        self.assertEqual(table_name("account"), "account")
        self.assertEqual(table_name("ingress-altnames"), "ingress_altnames")
        self.assertEqual(table_name("1abc"), "t_1abc")
        self.assertRaises(StorageError, table_name, "a; DROP TABLE x")

    def test_cursor_encoding(self):
        self.assertEqual(encode_cursor(None), None)
        self.assertEqual(encode_cursor("10"), "MTA")
        self.assertEqual(decode_cursor("MTA"), "10")
        self.assertEqual(decode_cursor(encode_cursor("my-tunnel")), "my-tunnel")
        self.assertEqual(decode_cursor(None), None)
        self.assertRaises(InvalidCursor, decode_cursor, "!!!")


class StorageTestsMixin:
    """
    Every backend passes these. Subclasses define ``make_storage()`` (a
    Deferred of an opened storage, or the storage) and, for fake time,
    ``self.clock``; `expire` moves time forward.
    """

    timeout = 60
    #: backends whose TTL runs on the server's own clock set this
    real_time_ttl = False

    @defer.inlineCallbacks
    def setUp(self):
        self.storage = yield defer.maybeDeferred(self.make_storage)
        self.addCleanup(self.storage.close)

    def expire(self, ttl):
        """Let a TTL of ``ttl`` seconds run out."""
        self.clock.advance(ttl + 1)
        return defer.succeed(None)

    def ttl_value(self):
        return 2

    # -- basics ---------------------------------------------------------

    def test_interface(self):
        self.assertTrue(verifyObject(IStorage, self.storage))

    @defer.inlineCallbacks
    def test_create(self):
        s = self.storage
        self.assertIs((yield s.create("tunnel", "t1", {"a": 1})), True)
        self.assertIs((yield s.create("tunnel", "t1", {"a": 2})), False)
        self.assertEqual((yield s.get("tunnel", "t1")), {"a": 1})

    @defer.inlineCallbacks
    def test_put(self):
        s = self.storage
        self.assertIsNone((yield s.put("tunnel", "t1", {"a": 1})))
        yield s.put("tunnel", "t1", {"b": [1, 2], "c": {"d": "é"}})
        self.assertEqual((yield s.get("tunnel", "t1")), {"b": [1, 2], "c": {"d": "é"}})

    @defer.inlineCallbacks
    def test_get_missing(self):
        self.assertIsNone((yield self.storage.get("tunnel", "nope")))

    @defer.inlineCallbacks
    def test_serialisation_rules(self):
        s = self.storage
        yield s.put("tunnel", "t1", {"a": 1, "_hidden": 2, "n": None, "o": {"_x": 1, "y": None, "z": "ü"}})
        self.assertEqual((yield s.get("tunnel", "t1")), {"a": 1, "o": {"z": "ü"}})

    @defer.inlineCallbacks
    def test_namespaces_are_separate(self):
        s = self.storage
        yield s.put("tunnel", "same", {"ns": "tunnel"})
        yield s.put("account", "same", {"ns": "account"})
        yield s.put("ingress-altnames", "same", {"ns": "alt"})
        self.assertEqual((yield s.get("tunnel", "same")), {"ns": "tunnel"})
        self.assertEqual((yield s.get("account", "same")), {"ns": "account"})
        self.assertEqual((yield s.get("ingress-altnames", "same")), {"ns": "alt"})
        yield s.delete("account", "same")
        self.assertEqual((yield s.get("tunnel", "same")), {"ns": "tunnel"})

    @defer.inlineCallbacks
    def test_get_multi(self):
        s = self.storage
        yield s.put("account", "A", {"v": "a"})
        yield s.put("account", "C", {"v": "c"})
        got = yield s.get_multi("account", ["C", "B", "A", "C"])
        self.assertEqual(got, [{"v": "c"}, None, {"v": "a"}, {"v": "c"}])
        self.assertEqual((yield s.get_multi("account", [])), [])

    @defer.inlineCallbacks
    def test_delete(self):
        s = self.storage
        yield s.put("tunnel", "t1", {"a": 1})
        self.assertIs((yield s.delete("tunnel", "t1")), True)
        self.assertIs((yield s.delete("tunnel", "t1")), False)
        self.assertIsNone((yield s.get("tunnel", "t1")))
        self.assertIs((yield s.create("tunnel", "t1", {"a": 2})), True)

    # -- listing --------------------------------------------------------

    @defer.inlineCallbacks
    def test_list_empty(self):
        keys, cursor = yield list_page(self.storage, "tunnel", None, 10)
        self.assertEqual((keys, cursor), ([], None))

    @defer.inlineCallbacks
    def test_list_paging(self):
        """100 keys, pages of 10: the cursor chain gives each key once."""
        s = self.storage
        expected = {"t%03d" % i for i in range(100)}
        yield defer.gatherResults([s.put("tunnel", k, {"id": k}) for k in sorted(expected)])
        yield s.put("account", "OTHER", {"x": 1})
        seen = []
        cursor = None
        pages = 0
        while True:
            keys, cursor = yield list_page(s, "tunnel", cursor, 10)
            pages += 1
            seen.extend(keys)
            if cursor is None:
                break
            self.assertGreaterEqual(len(keys), 10)
            self.assertIsInstance(cursor, str)
            self.assertNotIn("=", cursor)
            self.assertLess(pages, 50)
        self.assertEqual(len(seen), 100)
        self.assertEqual(set(seen), expected)

    @defer.inlineCallbacks
    def test_list_keys_backend_chain(self):
        s = self.storage
        for i in range(25):
            yield s.put("account", "K%02d" % i, {"i": i})
        seen, cursor = [], None
        for _ in range(200):
            keys, cursor = yield s.list_keys("account", cursor, 7)
            seen.extend(keys)
            if cursor is None:
                break
            self.assertIsInstance(cursor, str)
        self.assertEqual(sorted(seen), ["K%02d" % i for i in range(25)])

    # -- TTL ------------------------------------------------------------

    @defer.inlineCallbacks
    def test_ttl_expiry(self):
        s = self.storage
        ttl = self.ttl_value()
        yield s.put("tunnel", "short", {"a": 1}, ttl=ttl)
        self.assertIs((yield s.create("tunnel", "short2", {"b": 1}, ttl=ttl)), True)
        yield s.put("tunnel", "long", {"c": 1})
        self.assertEqual((yield s.get("tunnel", "short")), {"a": 1})
        yield self.expire(ttl)
        self.assertIsNone((yield s.get("tunnel", "short")))
        self.assertEqual((yield s.get_multi("tunnel", ["short", "short2", "long"])), [None, None, {"c": 1}])
        keys, _ = yield list_page(s, "tunnel", None, 10)
        self.assertEqual(keys, ["long"])
        self.assertIs((yield s.delete("tunnel", "short")), False)
        yield self.assertFailure(s.update("tunnel", "short", lambda v: v), NotFound)
        self.assertIs((yield s.create("tunnel", "short", {"new": 1})), True)
        self.assertEqual((yield s.get("tunnel", "short")), {"new": 1})

    @defer.inlineCallbacks
    def test_put_without_ttl_clears_ttl(self):
        s = self.storage
        ttl = self.ttl_value()
        yield s.put("tunnel", "k", {"a": 1}, ttl=ttl)
        yield s.put("tunnel", "k", {"a": 2})
        yield self.expire(ttl)
        self.assertEqual((yield s.get("tunnel", "k")), {"a": 2})

    # -- atomic update --------------------------------------------------

    @defer.inlineCallbacks
    def test_update(self):
        s = self.storage
        yield s.put("account", "A", {"n": 1, "tunnels": []})
        seen = []

        def fn(current):
            seen.append(json.loads(json.dumps(current)))
            current["n"] += 1
            current["_private"] = "x"
            current["tunnels"].append("t")
            return current

        written = yield s.update("account", "A", fn)
        self.assertEqual(seen, [{"n": 1, "tunnels": []}])
        self.assertEqual(written, {"n": 2, "tunnels": ["t"]})
        self.assertEqual((yield s.get("account", "A")), {"n": 2, "tunnels": ["t"]})

    @defer.inlineCallbacks
    def test_update_deferred_fn(self):
        s = self.storage
        yield s.put("account", "A", {"n": 1})
        written = yield s.update("account", "A", lambda cur: defer.succeed({"n": cur["n"] + 10}))
        self.assertEqual(written, {"n": 11})
        self.assertEqual((yield s.get("account", "A")), {"n": 11})

    @defer.inlineCallbacks
    def test_update_abort(self):
        s = self.storage
        yield s.put("account", "A", {"n": 1})
        self.assertIsNone((yield s.update("account", "A", lambda cur: None)))
        self.assertEqual((yield s.get("account", "A")), {"n": 1})

    @defer.inlineCallbacks
    def test_update_missing(self):
        s = self.storage
        called = []
        yield self.assertFailure(s.update("account", "NOPE", called.append), NotFound)
        self.assertEqual(called, [])
        self.assertIsNone((yield s.get("account", "NOPE")))
        # the lock (and, for PostgreSQL, the pooled connection) was released
        for _ in range(12):
            yield self.assertFailure(s.update("account", "NOPE", called.append), NotFound)
        yield s.put("account", "NOPE", {"n": 0})
        self.assertEqual((yield s.update("account", "NOPE", lambda c: {"n": 1})), {"n": 1})

    @defer.inlineCallbacks
    def test_update_fn_raises(self):
        s = self.storage
        yield s.put("account", "A", {"n": 1})

        def boom(current):
            raise ValueError("nope")

        yield self.assertFailure(s.update("account", "A", boom), ValueError)
        self.assertEqual((yield s.get("account", "A")), {"n": 1})
        # the lock is free again
        written = yield within(s.update("account", "A", lambda c: {"n": 2}), 10, "update after failure")
        self.assertEqual(written, {"n": 2})

    @defer.inlineCallbacks
    def test_overlapping_updates_serialised(self):
        """The second of two overlapping updates sees the first one's result."""
        s = self.storage
        yield s.put("account", "A", {"n": 0, "log": []})
        gate = defer.Deferred()
        first_called = defer.Deferred()
        calls = []

        def first(current):
            calls.append(("first", current["n"]))
            first_called.callback(None)
            return gate.addCallback(lambda _: {"n": current["n"] + 1, "log": current["log"] + ["first"]})

        def second(current):
            calls.append(("second", current["n"]))
            return {"n": current["n"] + 1, "log": current["log"] + ["second"]}

        d1 = s.update("account", "A", first)
        yield within(first_called, 10, "first update")
        d2 = s.update("account", "A", second)
        # give the second update time to reach the backend (and wait on the lock)
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(calls, [("first", 0)])
        gate.callback(None)
        r1, r2 = yield within(defer.gatherResults([d1, d2]), 15, "overlapping updates")
        self.assertEqual(r1, {"n": 1, "log": ["first"]})
        self.assertEqual(r2, {"n": 2, "log": ["first", "second"]})
        self.assertEqual(calls, [("first", 0), ("second", 1)])
        self.assertEqual((yield s.get("account", "A")), {"n": 2, "log": ["first", "second"]})

    @defer.inlineCallbacks
    def test_many_concurrent_increments(self):
        s = self.storage
        yield s.put("account", "A", {"n": 0})

        def inc(current):
            return {"n": current["n"] + 1}

        yield within(defer.gatherResults([s.update("account", "A", inc) for _ in range(8)]), 30, "increments")
        self.assertEqual((yield s.get("account", "A")), {"n": 8})

    @defer.inlineCallbacks
    def test_updates_of_different_keys_do_not_wait(self):
        s = self.storage
        yield s.put("account", "A", {"n": 0})
        yield s.put("account", "B", {"n": 0})
        gate = defer.Deferred()
        d1 = s.update("account", "A", lambda c: gate.addCallback(lambda _: {"n": 1}))
        r2 = yield within(s.update("account", "B", lambda c: {"n": 1}), 10, "independent update")
        self.assertEqual(r2, {"n": 1})
        gate.callback(None)
        self.assertEqual((yield within(d1, 10)), {"n": 1})

    # -- reference records ----------------------------------------------

    @defer.inlineCallbacks
    def test_reference_records_roundtrip(self):
        s = self.storage
        for ns, key, value in REFERENCE_RECORDS:
            self.assertIs((yield s.create(ns, key, value)), True)
        for ns, key, value in REFERENCE_RECORDS:
            self.assertEqual((yield s.get(ns, key)), value)

    # -- large records (an account with many tunnels) ---------------------

    @defer.inlineCallbacks
    def test_large_record_reads_are_copies(self):
        """Every read of a large record is the stored value, in a copy of its own."""
        s = self.storage
        yield s.put("account", "BIG", LARGE_RECORD)
        got = yield s.get("account", "BIG")
        self.assertEqual(got, LARGE_RECORD)
        got["tunnels"].append("changed-by-a-reader")
        got["nested"][0]["a"].append(3)
        got["status"]["disabled"] = True
        self.assertEqual((yield s.get("account", "BIG")), LARGE_RECORD)
        self.assertEqual((yield s.get_multi("account", ["BIG"])), [LARGE_RECORD])

        def append(current):
            current["tunnels"].append("tunnel-new")
            return current

        expected = dict(LARGE_RECORD, tunnels=LARGE_RECORD["tunnels"] + ["tunnel-new"])
        written = yield s.update("account", "BIG", append)
        self.assertEqual(written, expected)
        written["tunnels"].append("changed-after-the-update")
        self.assertEqual((yield s.get("account", "BIG")), expected)

        def aborted(current):
            current["tunnels"].clear()
            return None

        self.assertIsNone((yield s.update("account", "BIG", aborted)))
        self.assertEqual((yield s.get("account", "BIG")), expected)
        self.assertIs((yield s.delete("account", "BIG")), True)
        self.assertIsNone((yield s.get("account", "BIG")))
        self.assertIs((yield s.create("account", "BIG", {"tunnels": ["only-one"]})), True)
        self.assertEqual((yield s.get("account", "BIG")), {"tunnels": ["only-one"]})

LARGE_RECORD = {
    "accountId": "MPW4YDYVNPFXVV2D",
    "id": "MPW4YDYVNPFXVV2D",
    "tunnels": ["tunnel-of-a-big-account-%04d" % i for i in range(500)],
    "status": {"disabled": False},
    "nested": [{"a": [1, 2]}],
}


class OtherWriterTestsMixin:
    """For backends another process can write to: ``write_behind(ns, key, text)`` writes as it would."""

    @defer.inlineCallbacks
    def test_large_record_changed_by_another_writer(self):
        """A large record read before is read again as another writer left it."""
        write_behind = self.write_behind
        s = self.storage
        yield s.put("account", "BIG", LARGE_RECORD)
        self.assertEqual((yield s.get("account", "BIG")), LARGE_RECORD)
        changed = dict(LARGE_RECORD, tunnels=LARGE_RECORD["tunnels"] + ["from-elsewhere"])
        yield write_behind("account", "BIG", json.dumps(changed, separators=(",", ":")))
        self.assertEqual((yield s.get("account", "BIG")), changed)
        seen = []
        yield s.update("account", "BIG", lambda current: seen.append(current["tunnels"][-1]))
        self.assertEqual(seen, ["from-elsewhere"])


class MemoryStorageTests(StorageTestsMixin, unittest.TestCase):
    def make_storage(self):
        self.clock = task.Clock()
        return MemoryStorage(reactor=self.clock).open()

    @defer.inlineCallbacks
    def test_overlapping_updates_serialised(self):
        # the shared test waits on the real reactor; the memory backend is
        # synchronous, so drive it without waiting
        s = self.storage
        yield s.put("account", "A", {"n": 0})
        gate = defer.Deferred()
        calls = []
        d1 = s.update("account", "A", lambda c: (calls.append(c["n"]), gate.addCallback(lambda _: {"n": c["n"] + 1}))[1])
        d2 = s.update("account", "A", lambda c: (calls.append(c["n"]), {"n": c["n"] + 1})[1])
        self.assertEqual(calls, [0])
        gate.callback(None)
        self.assertEqual(self.successResultOf(d1), {"n": 1})
        self.assertEqual(self.successResultOf(d2), {"n": 2})
        self.assertEqual(calls, [0, 1])
        self.assertEqual(len(s._locks), 0)

    @defer.inlineCallbacks
    def test_cursor_is_offset(self):
        s = self.storage
        for k in ("b", "a", "c"):
            yield s.put("tunnel", k, {})
        self.assertEqual((yield s.list_keys("tunnel", None, 2)), (["b", "a"], "2"))
        self.assertEqual((yield s.list_keys("tunnel", "2", 2)), (["c"], "3"))
        self.assertEqual((yield s.list_keys("tunnel", "3", 2)), ([], None))
        yield self.assertFailure(s.list_keys("tunnel", "x", 2), InvalidCursor)

    @defer.inlineCallbacks
    def test_stored_copy_is_independent(self):
        s = self.storage
        value = {"l": [1]}
        yield s.put("tunnel", "k", value)
        value["l"].append(2)
        got = yield s.get("tunnel", "k")
        got["l"].append(3)
        self.assertEqual((yield s.get("tunnel", "k")), {"l": [1]})


class SqliteStorageTests(StorageTestsMixin, OtherWriterTestsMixin, unittest.TestCase):
    def make_storage(self):
        self.dir = tempfile.mkdtemp(prefix="exposr-sqlite-")
        self.path = os.path.join(self.dir, "db.sqlite")
        self.clock = fake_clock()
        return SqliteStorage(self.path, reactor=reactor, clock=self.clock).open()

    def raw(self):
        conn = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(conn.close)
        return conn

    def write_behind(self, ns, key, text):
        self.raw().execute("UPDATE %s SET value = ? WHERE key = ?" % ns, (text, key))
        return defer.succeed(None)

    @defer.inlineCallbacks
    def test_group_commit(self):
        """Calls made together: answered in order, the writes committed together."""
        s = self.storage
        groups = []
        real = s._group_sync

        def counting(group):
            groups.append(len(group))
            return real(group)

        self.patch(s, "_group_sync", counting)
        puts = [s.put("tunnel", "t%02d" % i, {"n": i}) for i in range(20)]
        read = s.get("tunnel", "t19")  # made after the writes: sees them
        self.assertEqual((yield defer.gatherResults(puts)), [None] * 20)
        self.assertEqual((yield read), {"n": 19})
        self.assertEqual(groups, [1, 20])
        got = yield s.get_multi("tunnel", ["t%02d" % i for i in range(20)])
        self.assertEqual(got, [{"n": i} for i in range(20)])
        rows = self.raw().execute("SELECT count(*) FROM tunnel").fetchone()[0]
        self.assertEqual(rows, 20)

    @defer.inlineCallbacks
    def test_group_commit_failing_write_fails_alone(self):
        """A write that fails in a group changes nothing and fails; the others are committed."""
        s = self.storage
        yield s.put("tunnel", "before", {"n": 0})

        def half_then_fail(conn, table):
            conn.execute("INSERT INTO tunnel (key, value, modified_at) VALUES ('half', '{}', 0)")
            conn.execute("INSERT INTO no_such_table VALUES (1)")

        first = s.put("tunnel", "a", {"n": 1})
        bad = s._queued("tunnel", half_then_fail)
        last = s.put("tunnel", "b", {"n": 2})
        yield first
        yield self.assertFailure(bad, StorageError)
        yield last
        self.assertEqual((yield s.get_multi("tunnel", ["a", "half", "b"])), [{"n": 1}, None, {"n": 2}])
        keys = [r[0] for r in self.raw().execute("SELECT key FROM tunnel ORDER BY key")]
        self.assertEqual(keys, ["a", "b", "before"])

    def test_layout(self):
        """Tables and indices are exactly the original's."""
        conn = self.raw()
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        tables = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type='table'").fetchall())
        self.assertEqual(set(tables), {"account", "tunnel", "ingress_altnames"})
        cols = [(r[1], r[2], r[5]) for r in conn.execute("PRAGMA table_info(ingress_altnames)")]
        self.assertEqual(
            cols,
            [("key", "TEXT", 1), ("value", "BLOB", 0), ("modified_at", "INTEGER", 0), ("expires_at", "INTEGER", 0)],
        )
        indices = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index' AND sql IS NOT NULL")}
        self.assertEqual(
            indices,
            {"idx_%s_%s" % (t, c) for t in ("account", "tunnel", "ingress_altnames") for c in ("modified_at", "expires_at")},
        )

    @defer.inlineCallbacks
    def test_written_rows_match_layout(self):
        s = self.storage
        yield s.put("account", "MPW4YDYVNPFXVV2D", ACCOUNT)
        yield s.put("tunnel", "my-tunnel", TUNNEL, ttl=60)
        conn = self.raw()
        key, value, modified, expires = conn.execute("SELECT key, value, modified_at, expires_at FROM account").fetchone()
        self.assertEqual((key, value, expires), ("MPW4YDYVNPFXVV2D", ACCOUNT_JSON, None))
        self.assertEqual(modified, int(self.clock.seconds()))
        self.assertEqual(conn.execute("SELECT typeof(value) FROM account").fetchone()[0], "text")
        expires = conn.execute("SELECT expires_at FROM tunnel").fetchone()[0]
        self.assertEqual(expires, int(self.clock.seconds()) + 60)

    @defer.inlineCallbacks
    def test_reads_rows_written_by_original(self):
        """Rows written the way the original writes them (raw SQL) read back."""
        yield self.storage.close()
        conn = self.raw()
        conn.execute(
            "INSERT INTO account (key, value, modified_at, expires_at) VALUES (?, ?, unixepoch(), NULL)",
            ("MPW4YDYVNPFXVV2D", ACCOUNT_JSON),
        )
        conn.execute(
            "INSERT INTO tunnel (key, value, modified_at, expires_at) VALUES (?, ?, unixepoch(), NULL)",
            ("my-tunnel", dumps(TUNNEL)),
        )
        conn.execute(
            "INSERT INTO ingress_altnames (key, value, modified_at, expires_at) VALUES (?, ?, unixepoch(), unixepoch() + 3600)",
            ("http-example.net", dumps(ALTNAME)),
        )
        conn.execute(
            "INSERT INTO tunnel (key, value, modified_at, expires_at) VALUES (?, ?, unixepoch(), unixepoch() - 10)",
            ("expired", "{}"),
        )
        conn.close()
        s = SqliteStorage(self.path, reactor=reactor, clock=self.clock)
        yield s.open()
        self.addCleanup(s.close)
        for ns, key, value in REFERENCE_RECORDS:
            self.assertEqual((yield s.get(ns, key)), value)
        # the expired row was removed by the start-up cleanup
        self.assertEqual(self.raw().execute("SELECT count(*) FROM tunnel WHERE key='expired'").fetchone()[0], 0)

    @defer.inlineCallbacks
    def test_file_created_by_original_schema(self):
        """A file whose tables the original created opens and is used as is."""
        path = os.path.join(self.dir, "orig.sqlite")
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        for t in ("account", "tunnel", "ingress_altnames"):
            conn.execute(
                "CREATE TABLE IF NOT EXISTS %s (key TEXT PRIMARY KEY, value BLOB, modified_at INTEGER, expires_at INTEGER NULL)" % t
            )
        conn.execute(
            "INSERT INTO tunnel (key, value, modified_at) VALUES ('t', CAST('{\"id\":\"t\"}' AS BLOB), unixepoch())"
        )
        conn.close()
        s = SqliteStorage(path, reactor=reactor)
        yield s.open()
        self.addCleanup(s.close)
        self.assertEqual((yield s.get("tunnel", "t")), {"id": "t"})
        self.assertEqual((yield s.update("tunnel", "t", lambda v: dict(v, x=1))), {"id": "t", "x": 1})

    @defer.inlineCallbacks
    def test_durable_across_reopen(self):
        s = self.storage
        yield s.put("account", "A", {"n": 1})
        yield s.update("account", "A", lambda c: {"n": 2})
        yield s.close()
        s2 = SqliteStorage(self.path, reactor=reactor, clock=self.clock)
        yield s2.open()
        self.addCleanup(s2.close)
        self.assertEqual((yield s2.get("account", "A")), {"n": 2})

    @defer.inlineCallbacks
    def test_acknowledged_write_survives_kill9(self):
        """A child acknowledges writes and is killed with SIGKILL: all of them are there."""
        path = os.path.join(self.dir, "kill.sqlite")
        script = (
            "import sys\n"
            "from twisted.internet import reactor, defer\n"
            "from exposr.storage.sqlite import SqliteStorage\n"
            "@defer.inlineCallbacks\n"
            "def main():\n"
            "    s = SqliteStorage(sys.argv[1], reactor=reactor)\n"
            "    yield s.open()\n"
            "    for i in range(20):\n"
            "        yield s.put('tunnel', 'k%d' % i, {'i': i})\n"
            "        sys.stdout.write('ack %d\\n' % i); sys.stdout.flush()\n"
            "    sys.stdout.write('done\\n'); sys.stdout.flush()\n"
            "reactor.callWhenRunning(main)\n"
            "reactor.run()\n"
        )
        done = defer.Deferred()
        ended = defer.Deferred()

        class Child(protocol.ProcessProtocol):
            out = b""

            def outReceived(self, data):
                self.out += data
                if b"done\n" in self.out and not done.called:
                    done.callback(None)

            def processEnded(self, reason):
                ended.callback(None)
                if not done.called:
                    done.errback(AssertionError("child died: %r" % self.out))

        child = Child()
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        proc = reactor.spawnProcess(child, sys.executable, [sys.executable, "-c", script, path], env=env)
        yield within(done, 20, "child writes")
        proc.signalProcess("KILL")
        yield within(ended, 10, "child exit")
        acked = [int(line.split()[1]) for line in child.out.decode().splitlines() if line.startswith("ack")]
        self.assertEqual(acked, list(range(20)))
        s = SqliteStorage(path, reactor=reactor)
        yield s.open()
        self.addCleanup(s.close)
        got = yield s.get_multi("tunnel", ["k%d" % i for i in acked])
        self.assertEqual(got, [{"i": i} for i in acked])

    @defer.inlineCallbacks
    def test_cleanup_every_five_minutes(self):
        s = self.storage
        yield s.put("tunnel", "short", {"a": 1}, ttl=10)
        yield s.put("tunnel", "long", {"a": 1})
        conn = self.raw()
        self.clock.advance(20)
        # invisible, but still in the file until the cleanup runs
        self.assertIsNone((yield s.get("tunnel", "short")))
        self.assertEqual(conn.execute("SELECT count(*) FROM tunnel").fetchone()[0], 2)
        self.clock.advance(300)
        yield within(s._cleanup_d, 10, "cleanup")
        self.assertEqual(conn.execute("SELECT key FROM tunnel").fetchall(), [("long",)])

    @defer.inlineCallbacks
    def test_open_unusable_path(self):
        s = SqliteStorage(os.path.join(self.dir, "missing-dir", "x.sqlite"), reactor=reactor)
        f = yield self.assertFailure(s.open(), StorageUnavailable)
        self.assertNotIn("\n", str(f))
        self.assertIn("missing-dir", str(f))

    @defer.inlineCallbacks
    def test_closed_storage_fails(self):
        yield self.storage.close()
        yield self.assertFailure(self.storage.get("tunnel", "x"), StorageUnavailable)


class StorageFromUrlTests(unittest.TestCase):
    def test_memory(self):
        self.assertIsInstance(storage_from_url("memory://", reactor), MemoryStorage)

    def test_sqlite_paths(self):
        s = storage_from_url("sqlite://exposr.sqlite", reactor)
        self.assertEqual(s.path, "exposr.sqlite")
        s = storage_from_url("sqlite:///var/lib/exposr/db.sqlite", reactor)
        self.assertEqual(s.path, "/var/lib/exposr/db.sqlite")

    def test_unsupported(self):
        e = self.assertRaises(StorageError, storage_from_url, "mysql://x", reactor)
        self.assertEqual(
            str(e), "Unsupported storage type mysql:. Valid options are redis, postgres or sqlite"
        )


# -- a TCP relay that can play "the server went away" ------------------------


class _Relay(protocol.Protocol):
    peer = None
    buffered = b""

    def connectionMade(self):
        self.factory.relays.add(self)
        if self.factory.upstream is not None:
            return
        self.transport.pauseProducing()
        up = protocol.ClientCreator(reactor, _RelayUp, self)
        d = up.connectTCP(self.factory.target_host, self.factory.target_port, timeout=5)
        d.addErrback(lambda f: self.transport.abortConnection())

    def dataReceived(self, data):
        if self.peer is not None:
            self.peer.transport.write(data)

    def connectionLost(self, reason):
        self.factory.relays.discard(self)
        if self.peer is not None:
            self.peer.transport.abortConnection()


class _RelayUp(protocol.Protocol):
    def __init__(self, down):
        self.down = down

    def connectionMade(self):
        self.down.factory.relays.add(self)
        self.down.peer = self
        self.peer = self.down
        self.down.transport.resumeProducing()

    def dataReceived(self, data):
        self.down.transport.write(data)

    def connectionLost(self, reason):
        self.down.factory.relays.discard(self)
        self.down.transport.abortConnection()


class Outage(protocol.Factory):
    """
    Listens on a local port and relays to ``host:port``. `down` closes the
    port and cuts every relayed connection (the server "went away"); `up`
    listens on the same port again.
    """

    protocol = _Relay
    upstream = None

    def __init__(self, target_host, target_port):
        self.target_host = target_host
        self.target_port = target_port
        self.relays = set()
        self.listening = None
        self.port = 0

    def up(self):
        self.listening = reactor.listenTCP(self.port, self, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    def down(self):
        d = defer.maybeDeferred(self.listening.stopListening)
        self.listening = None
        for r in list(self.relays):
            r.transport.abortConnection()
        return d

    def stop(self):
        if self.listening is not None:
            return self.down()
        for r in list(self.relays):
            r.transport.abortConnection()


def free_port():
    """A local TCP port nobody listens on."""
    p = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
    port = p.getHost().port
    return defer.maybeDeferred(p.stopListening).addCallback(lambda _: port)


@defer.inlineCallbacks
def eventually(fn, seconds, what):
    """Call ``fn`` until it succeeds, at most ``seconds``; its last error otherwise."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            result = yield defer.maybeDeferred(fn)
            return result
        except Exception:
            if time.monotonic() > deadline:
                raise
        yield task.deferLater(reactor, 0.1, lambda: None)


class RecoveryTestsMixin:
    """Backend outages: calls fail fast, the backend comes back by itself."""

    def make_storage_at(self, host, port, **kwargs):
        raise NotImplementedError

    @defer.inlineCallbacks
    def test_unreachable_at_startup(self):
        port = yield free_port()
        s = self.make_storage_at("127.0.0.1", port, open_attempts=2, open_retry_delay=0.05)
        started = time.monotonic()
        f = yield self.assertFailure(s.open(), StorageUnavailable)
        self.assertLess(time.monotonic() - started, 5)
        self.assertNotIn("\n", str(f))
        self.assertIn("unreachable", str(f))
        self.assertIn(str(port), str(f))

    @defer.inlineCallbacks
    def test_silent_server_at_startup(self):
        """A server that accepts connections but never answers: bounded, clear failure."""
        silent = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        port = silent.getHost().port
        s = self.make_storage_at("127.0.0.1", port, open_attempts=2, open_retry_delay=0.05, connect_timeout=0.3)
        started = time.monotonic()
        f = yield self.assertFailure(within(s.open(), 10, "open"), StorageUnavailable)
        self.assertLess(time.monotonic() - started, 3)
        self.assertNotIn("\n", str(f))
        self.assertIn("unreachable", str(f))

    @defer.inlineCallbacks
    def test_outage_fails_fast_and_recovers(self):
        outage = Outage(*self.server_address)
        outage.up()
        self.addCleanup(outage.stop)
        s = self.make_storage_at("127.0.0.1", outage.port, open_attempts=1)
        yield s.open()
        self.addCleanup(s.close)
        yield s.put("tunnel", "before", {"n": 1})
        self.assertIs((yield s.create("account", "ACK", {"n": 1})), True)
        yield outage.down()
        # fail fast: no queueing while the server is away
        for _ in range(3):
            started = time.monotonic()
            yield self.assertFailure(within(s.get("tunnel", "before"), 5, "get during outage"), StorageUnavailable)
            self.assertLess(time.monotonic() - started, 2)
        yield self.assertFailure(within(s.put("tunnel", "during", {}), 5), StorageUnavailable)
        yield self.assertFailure(within(s.update("tunnel", "before", lambda c: c), 10), StorageUnavailable)
        outage.up()
        got = yield eventually(lambda: s.get("tunnel", "before"), 15, "recovery")
        self.assertEqual(got, {"n": 1})
        self.assertEqual((yield s.get("account", "ACK")), {"n": 1})
        self.assertEqual((yield s.update("tunnel", "before", lambda c: {"n": c["n"] + 1})), {"n": 2})
        self.assertIsNone((yield s.get("tunnel", "during")))


# -- PostgreSQL --------------------------------------------------------------

PG = dict(host="127.0.0.1", port=5432, user="postgres", dbname="test")
_counter = [0]


def unique_name(prefix):
    _counter[0] += 1
    return "%s_%d_%d" % (prefix, os.getpid(), _counter[0])


class PostgresStorageTests(StorageTestsMixin, OtherWriterTestsMixin, RecoveryTestsMixin, unittest.TestCase):
    server_address = ("127.0.0.1", 5432)

    @defer.inlineCallbacks
    def setUp(self):
        from txpostgres import txpostgres

        self.schema = unique_name("exposr_test")
        self.app = unique_name("exposrd_test")
        self.admin = txpostgres.Connection(reactor=reactor)
        yield self.admin.connect(**PG)
        self.addCleanup(self._drop_schema)
        yield self.admin.runOperation("CREATE SCHEMA %s" % self.schema)
        yield StorageTestsMixin.setUp(self)

    @defer.inlineCallbacks
    def _drop_schema(self):
        yield self.admin.runOperation("DROP SCHEMA IF EXISTS %s CASCADE" % self.schema)
        self.admin.close()

    def make_storage_at(self, host, port, **kwargs):
        from exposr.storage.postgres import PostgresStorage

        kw = dict(PG, host=host, port=port)
        kw.update(
            reactor=reactor,
            clock=getattr(self, "clock", None),
            pool_size=4,
            options="-c search_path=%s" % self.schema,
            application_name=self.app,
            connect_timeout=5,
        )
        kw.update(kwargs)
        return PostgresStorage(**kw)

    def make_storage(self):
        self.clock = fake_clock()
        return self.make_storage_at("127.0.0.1", 5432).open()

    def sql(self, query, params=None):
        return self.admin.runQuery("SET search_path TO %s; %s" % (self.schema, query), params)

    def raw(self, query, params=None):
        return self.admin.runOperation("SET search_path TO %s; %s" % (self.schema, query), params)

    def write_behind(self, ns, key, text):
        return self.raw("UPDATE %s SET value = %%s::jsonb WHERE key = %%s" % ns, (text, key))

    @defer.inlineCallbacks
    def test_layout(self):
        cols = yield self.admin.runQuery(
            "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_schema = %s ORDER BY table_name, ordinal_position",
            (self.schema,),
        )
        expected = []
        for t in ("account", "ingress_altnames", "tunnel"):
            expected += [
                (t, "key", "text", "NO"),
                (t, "value", "jsonb", "NO"),
                (t, "modified_at", "timestamp without time zone", "NO"),
                (t, "expires_at", "timestamp without time zone", "YES"),
            ]
        self.assertEqual([tuple(r) for r in cols], expected)
        idx = yield self.admin.runQuery("SELECT indexname FROM pg_indexes WHERE schemaname = %s", (self.schema,))
        self.assertEqual(
            {r[0] for r in idx},
            {"%s_pkey" % t for t in ("account", "tunnel", "ingress_altnames")}
            | {"idx_%s_%s" % (t, c) for t in ("account", "tunnel", "ingress_altnames") for c in ("modified_at", "expires_at")},
        )

    @defer.inlineCallbacks
    def test_reads_rows_written_by_original(self):
        for ns, key, value in REFERENCE_RECORDS:
            yield self.raw(
                "INSERT INTO %s (key, value, modified_at, expires_at) VALUES (%%s, %%s, NOW(), NULL)" % table_name(ns),
                (key, dumps(value)),
            )
        yield self.raw(
            "INSERT INTO tunnel (key, value, modified_at, expires_at) VALUES ('old', '{}', NOW(), TO_TIMESTAMP(%s))",
            (int(time.time()) - 10,),
        )
        for ns, key, value in REFERENCE_RECORDS:
            self.assertEqual((yield self.storage.get(ns, key)), value)
        self.assertIsNone((yield self.storage.get("tunnel", "old")))

    @defer.inlineCallbacks
    def test_written_rows_match_layout(self):
        yield self.storage.put("account", "MPW4YDYVNPFXVV2D", ACCOUNT)
        yield self.storage.put("tunnel", "my-tunnel", TUNNEL, ttl=60)
        rows = yield self.sql("SELECT key, value, modified_at, expires_at FROM account")
        self.assertEqual(len(rows), 1)
        key, value, modified, expires = rows[0]
        self.assertEqual((key, value, expires), ("MPW4YDYVNPFXVV2D", ACCOUNT, None))
        rows = yield self.sql(
            "SELECT EXTRACT(EPOCH FROM (expires_at::timestamptz))::bigint FROM tunnel WHERE key = 'my-tunnel'"
        )
        self.assertLessEqual(abs(rows[0][0] - (self.clock.seconds() + 60)), 1)

    @defer.inlineCallbacks
    def test_cleanup_every_five_minutes(self):
        s = self.storage
        yield s.put("tunnel", "short", {"a": 1}, ttl=10)
        yield s.put("tunnel", "long", {"a": 1})
        self.clock.advance(20)
        self.assertIsNone((yield s.get("tunnel", "short")))
        self.assertEqual(len((yield self.sql("SELECT key FROM tunnel"))), 2)
        self.clock.advance(300)
        yield within(s._cleanup_d, 10, "cleanup")
        self.assertEqual((yield self.sql("SELECT key FROM tunnel")), [("long",)])

    @defer.inlineCallbacks
    def test_update_missing_releases_connection(self):
        """PostgreSQL: "not found" rolls back and returns the connection to the pool."""
        s = self.storage
        for _ in range(3 * s.pool_size):
            yield self.assertFailure(within(s.update("tunnel", "none", lambda c: c), 10), NotFound)
        rows = yield self.admin.runQuery(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND state LIKE 'idle in transaction%%'",
            (self.app,),
        )
        self.assertEqual(rows[0][0], 0)
        self.assertEqual(len(s._pool.idle), s.pool_size)

    @defer.inlineCallbacks
    def test_update_row_lock_across_instances(self):
        """Two storages (two "nodes") on one database serialise on the row lock."""
        other = self.make_storage_at("127.0.0.1", 5432)
        yield other.open()
        self.addCleanup(other.close)
        yield self.storage.put("account", "A", {"n": 0})
        gate = defer.Deferred()
        entered = defer.Deferred()
        calls = []

        def first(c):
            calls.append(c["n"])
            entered.callback(None)
            return gate.addCallback(lambda _: {"n": c["n"] + 1})

        d1 = self.storage.update("account", "A", first)
        yield within(entered, 10)
        d2 = other.update("account", "A", lambda c: (calls.append(c["n"]), {"n": c["n"] + 1})[1])
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(calls, [0])
        gate.callback(None)
        yield within(defer.gatherResults([d1, d2]), 10)
        self.assertEqual(calls, [0, 1])
        self.assertEqual((yield self.storage.get("account", "A")), {"n": 2})

    @defer.inlineCallbacks
    def test_connections_killed_recover(self):
        """pg_terminate_backend of all our connections: the next calls recover."""
        s = self.storage
        yield s.put("tunnel", "k", {"v": 1})
        rows = yield self.admin.runQuery(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (self.app,)
        )
        self.assertEqual(len(rows), s.pool_size)
        got = yield eventually(lambda: s.get("tunnel", "k"), 10, "recovery")
        self.assertEqual(got, {"v": 1})
        yield eventually(lambda: self._all_live(s), 10, "pool refilled")
        yield s.put("tunnel", "k2", {"v": 2})
        self.assertEqual((yield s.get_multi("tunnel", ["k", "k2"])), [{"v": 1}, {"v": 2}])

    def _all_live(self, s):
        if s._pool.live() != s.pool_size:
            raise AssertionError("pool not refilled: %d live" % s._pool.live())

    @defer.inlineCallbacks
    def test_connection_killed_while_busy(self):
        """A connection dropped in the middle of an update: StorageUnavailable, then recovery."""
        s = self.storage
        yield s.put("account", "A", {"n": 0})
        entered = defer.Deferred()
        gate = defer.Deferred()

        def slow(c):
            entered.callback(None)
            return gate.addCallback(lambda _: {"n": 1})

        d = s.update("account", "A", slow)
        yield within(entered, 10)
        yield self.admin.runQuery(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s "
            "AND query LIKE 'SELECT value%% FROM account%%'",
            (self.app,),
        )
        gate.callback(None)
        yield self.assertFailure(within(d, 10), StorageUnavailable)
        got = yield eventually(lambda: s.get("account", "A"), 10, "recovery")
        self.assertEqual(got, {"n": 0})

    @defer.inlineCallbacks
    def test_url(self):
        from exposr.storage.postgres import PostgresStorage

        s = storage_from_url("postgres://us%40er:p%3Ass@db.example:5433/exposr", reactor, pool_size=3)
        self.assertIsInstance(s, PostgresStorage)
        self.assertEqual(s.pool_size, 3)
        kw = s.connect_kwargs
        self.assertEqual(
            (kw["host"], kw["port"], kw["user"], kw["password"], kw["dbname"]),
            ("db.example", 5433, "us@er", "p:ss", "exposr"),
        )
        s = PostgresStorage.from_url("postgres://u@h/d?sslmode=require", reactor)
        self.assertEqual(s.connect_kwargs["sslmode"], "require")
        yield None


# -- Redis -------------------------------------------------------------------



class RedisStorageTests(StorageTestsMixin, OtherWriterTestsMixin, RecoveryTestsMixin, unittest.TestCase):
    server_address = ("127.0.0.1", 6379)

    @defer.inlineCallbacks
    def setUp(self):
        import txredisapi

        self.admin = yield txredisapi.Connection("127.0.0.1", 6379, dbid=REDIS_DB, reconnect=False, convertNumbers=False)
        self.addCleanup(self.admin.disconnect)
        yield self.admin.flushdb()
        self.addCleanup(self.admin.flushdb)
        yield StorageTestsMixin.setUp(self)

    def make_storage_at(self, host, port, **kwargs):
        from exposr.storage.redis import RedisStorage

        kw = dict(host=host, port=port, db=REDIS_DB, reactor=reactor, connect_timeout=5)
        kw.update(kwargs)
        return RedisStorage(**kw)

    def make_storage(self):
        return self.make_storage_at("127.0.0.1", 6379).open()

    def write_behind(self, ns, key, text):
        return self.admin.set("%s:%s" % (ns, key), text)

    def ttl_value(self):
        return 0.3

    def expire(self, ttl):
        # Redis expires keys on its own clock
        return task.deferLater(reactor, ttl + 0.2, lambda: None)

    @defer.inlineCallbacks
    def test_written_keys_match_layout(self):
        s = self.storage
        for ns, key, value in REFERENCE_RECORDS:
            yield s.put(ns, key, value)
        self.assertEqual((yield self.admin.get("account:MPW4YDYVNPFXVV2D")), ACCOUNT_JSON)
        self.assertEqual(json.loads((yield self.admin.get("tunnel:my-tunnel"))), TUNNEL)
        self.assertEqual((yield self.admin.get("ingress-altnames:http-example.net")), dumps(ALTNAME))
        yield s.put("test", "key", {"test": 1234})
        self.assertEqual((yield self.admin.get("test:key")), '{"test":1234}')
        self.assertEqual((yield self.admin.ttl("tunnel:my-tunnel")), -1)
        yield s.put("tunnel", "t", {}, ttl=100)
        self.assertEqual((yield self.admin.ttl("tunnel:t")), 100)
        self.assertEqual(sorted((yield self.admin.keys("*"))), sorted(
            ["account:MPW4YDYVNPFXVV2D", "tunnel:my-tunnel", "ingress-altnames:http-example.net", "test:key", "tunnel:t"]
        ))

    @defer.inlineCallbacks
    def test_reads_keys_written_by_original(self):
        for ns, key, value in REFERENCE_RECORDS:
            yield self.admin.set("%s:%s" % (ns, key), dumps(value))
        yield self.admin.set("1234", "not ours")
        yield self.admin.set("lock:my-tunnel", "deadbeef", pexpire=5000)
        for ns, key, value in REFERENCE_RECORDS:
            self.assertEqual((yield self.storage.get(ns, key)), value)
        keys, cursor = yield list_page(self.storage, "tunnel", None, 10)
        self.assertEqual((keys, cursor), (["my-tunnel"], None))

    @defer.inlineCallbacks
    def test_numeric_keys_stay_strings(self):
        s = self.storage
        yield s.put("tunnel", "1234", {"id": "1234"})
        keys, _ = yield list_page(s, "tunnel", None, 10)
        self.assertEqual(keys, ["1234"])
        self.assertEqual((yield s.get("tunnel", "1234")), {"id": "1234"})

    @defer.inlineCallbacks
    def test_update_keeps_ttl(self):
        s = self.storage
        yield s.put("tunnel", "t", {"n": 1}, ttl=100)
        yield s.update("tunnel", "t", lambda c: {"n": 2})
        ttl = yield self.admin.execute_command("PTTL", "tunnel:t")
        self.assertTrue(90000 < ttl <= 100000, ttl)

    @defer.inlineCallbacks
    def test_long_update_keeps_lock(self):
        """A 1.2 s update keeps lock:<key> by extension; another node waits for it."""
        other = self.make_storage_at("127.0.0.1", 6379)
        yield other.open()
        self.addCleanup(other.close)
        s = self.storage
        yield s.put("account", "A", {"n": 0})
        entered = defer.Deferred()

        def slow(c):
            entered.callback(None)
            return task.deferLater(reactor, 1.2, lambda: {"n": c["n"] + 1})

        d1 = s.update("account", "A", slow)
        yield within(entered, 10)
        value = yield self.admin.get("lock:A")
        self.assertRegex(value, "^[0-9a-f]{32}$")
        seen = []
        d2 = other.update("account", "A", lambda c: (seen.append(c["n"]), {"n": c["n"] + 1})[1])
        # past the 1 s lease: still held, by the same owner, thanks to extension
        yield task.deferLater(reactor, 1.1, lambda: None)
        self.assertEqual((yield self.admin.get("lock:A")), value)
        self.assertGreater((yield self.admin.execute_command("PTTL", "lock:A")), 0)
        self.assertEqual(seen, [])
        self.assertEqual((yield within(d1, 10)), {"n": 1})
        self.assertEqual((yield within(d2, 10)), {"n": 2})
        self.assertEqual(seen, [1])
        self.assertIsNone((yield self.admin.get("lock:A")))

    @defer.inlineCallbacks
    def test_lock_held_elsewhere(self):
        """A lock another node holds is waited for and never stolen."""
        s = self.make_storage_at("127.0.0.1", 6379, lock_retries=2, lock_retry_delay=0.05, lock_retry_jitter=0.01)
        yield s.open()
        self.addCleanup(s.close)
        yield s.put("tunnel", "t", {"n": 0})
        yield self.admin.set("lock:t", "someone-else", pexpire=10000)
        called = []
        from exposr.storage.base import LockTimeout

        yield self.assertFailure(within(s.update("tunnel", "t", called.append), 10), LockTimeout)
        self.assertEqual(called, [])
        self.assertEqual((yield self.admin.get("lock:t")), "someone-else")
        # released by its owner: we get it
        yield self.admin.delete("lock:t")
        self.assertEqual((yield s.update("tunnel", "t", lambda c: {"n": 1})), {"n": 1})

    @defer.inlineCallbacks
    def test_client_kill_recovers(self):
        """CLIENT KILL of our connections: the next calls recover."""
        s = self.storage
        yield s.put("tunnel", "k", {"v": 1})
        ids = []
        for conn in list(s._factory.pool):
            ids.append((yield conn.execute_command("CLIENT", "ID")))
        self.assertEqual(len(ids), s.pool_size)
        for i in ids:
            yield self.admin.execute_command("CLIENT", "KILL", "ID", i)
        got = yield eventually(lambda: s.get("tunnel", "k"), 10, "recovery")
        self.assertEqual(got, {"v": 1})
        yield s.put("tunnel", "k2", {"v": 2})
        self.assertEqual((yield s.get_multi("tunnel", ["k", "k2"])), [{"v": 1}, {"v": 2}])

    def test_url(self):
        from exposr.storage.redis import RedisStorage

        s = storage_from_url("redis://:p%40ss@cache.example:6380/3", reactor)
        self.assertIsInstance(s, RedisStorage)
        self.assertEqual((s.host, s.port, s.password, s.db, s.username), ("cache.example", 6380, "p@ss", 3, None))
        s = storage_from_url("redis://localhost", reactor)
        self.assertEqual((s.host, s.port, s.password, s.db), ("localhost", 6379, None, None))
        self.assertRaises(StorageError, storage_from_url, "redis://localhost/x", reactor)
