"""The migration tool (upsert, then delete extra keys) against real SQLite, PostgreSQL and Redis."""

import io
import os
import tempfile
from urllib.parse import quote

from twisted.internet import defer, reactor
from twisted.trial import unittest

from exposr.storage.memory import MemoryStorage
from exposr.storage.migrate import migrate, run
from exposr.storage.sqlite import SqliteStorage
from tests.test_storage import ACCOUNT, PG, REDIS_DB, TUNNEL, unique_name


@defer.inlineCallbacks
def fill(storage, n_tunnels=250):
    yield defer.gatherResults([storage.put("tunnel", "t%04d" % i, dict(TUNNEL, id="t%04d" % i)) for i in range(n_tunnels)])
    yield storage.put("account", "MPW4YDYVNPFXVV2D", ACCOUNT)
    yield storage.put("ingress-altnames", "http-example.net", {"tunnelId": "t0001", "created_at": "x"})


@defer.inlineCallbacks
def dump(storage, namespaces=("tunnel", "account", "ingress-altnames")):
    result = {}
    for ns in namespaces:
        keys, cursor = [], None
        while True:
            page, cursor = yield storage.list_keys(ns, cursor, 100)
            keys.extend(page)
            if cursor is None:
                break
        keys = sorted(set(keys))
        values = yield storage.get_multi(ns, keys)
        result[ns] = dict(zip(keys, values))
    return result


class MigrateTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="exposr-migrate-")
        self.src = SqliteStorage(os.path.join(self.dir, "src.sqlite"), reactor=reactor)
        yield self.src.open()
        self.addCleanup(self.src.close)
        self.dst = MemoryStorage(reactor=reactor)
        yield self.dst.open()

    @defer.inlineCallbacks
    def test_copy_upsert_delete_converge(self):
        yield fill(self.src)
        yield self.dst.put("tunnel", "stale", {"id": "stale"})
        yield self.dst.put("tunnel", "t0003", {"id": "old"})
        yield self.dst.put("tunnel", "t0004", dict(TUNNEL, id="t0004"))

        counts = yield migrate(self.src, self.dst, dry_run=True)
        self.assertEqual(counts["tunnel"], {"copied": 249, "unchanged": 1, "deleted": 1})
        self.assertEqual((yield self.dst.get("tunnel", "t0003")), {"id": "old"})
        self.assertEqual((yield self.dst.get("tunnel", "stale")), {"id": "stale"})
        self.assertIsNone((yield self.dst.get("account", "MPW4YDYVNPFXVV2D")))

        counts = yield migrate(self.src, self.dst)
        self.assertEqual(counts["tunnel"], {"copied": 249, "unchanged": 1, "deleted": 1})
        self.assertEqual(counts["account"], {"copied": 1, "unchanged": 0, "deleted": 0})
        self.assertEqual((yield dump(self.dst)), (yield dump(self.src)))

        counts = yield migrate(self.src, self.dst)
        for ns in counts:
            self.assertEqual(counts[ns]["copied"] + counts[ns]["deleted"], 0)

    @defer.inlineCallbacks
    def test_namespace_selection(self):
        yield fill(self.src, 5)
        counts = yield migrate(self.src, self.dst, ["account"])
        self.assertEqual(list(counts), ["account"])
        self.assertEqual((yield dump(self.dst))["tunnel"], {})
        self.assertEqual((yield self.dst.get("account", "MPW4YDYVNPFXVV2D")), ACCOUNT)


class MigrateCommandTests(unittest.TestCase):
    """sqlite -> postgres -> redis -> sqlite through the command line."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        import txredisapi
        from txpostgres import txpostgres

        self.dir = tempfile.mkdtemp(prefix="exposr-migrate-")
        self.schema = unique_name("exposr_migrate")
        self.pg = txpostgres.Connection(reactor=reactor)
        yield self.pg.connect(**PG)
        yield self.pg.runOperation("CREATE SCHEMA %s" % self.schema)
        self.addCleanup(self._drop)
        self.redis = yield txredisapi.Connection("127.0.0.1", 6379, dbid=REDIS_DB, reconnect=False)
        self.addCleanup(self.redis.disconnect)
        yield self.redis.flushdb()
        self.addCleanup(self.redis.flushdb)

    @defer.inlineCallbacks
    def _drop(self):
        yield self.pg.runOperation("DROP SCHEMA IF EXISTS %s CASCADE" % self.schema)
        self.pg.close()

    @defer.inlineCallbacks
    def cli(self, *argv):
        out = io.StringIO()
        code = yield run(reactor, list(argv), out=out)
        return code, out.getvalue()

    @defer.inlineCallbacks
    def test_chain(self):
        src_path = os.path.join(self.dir, "a.sqlite")
        back_path = os.path.join(self.dir, "b.sqlite")
        src = SqliteStorage(src_path, reactor=reactor)
        yield src.open()
        yield fill(src, 120)
        expected = yield dump(src)
        yield src.close()

        sqlite_a = "sqlite://" + src_path
        pg = "pgsql://postgres@127.0.0.1:5432/test?options=" + quote("-c search_path=%s" % self.schema)
        redis = "redis://127.0.0.1:6379/%d" % REDIS_DB
        sqlite_b = "sqlite://" + back_path

        code, out = yield self.cli(sqlite_a, pg, "--dry-run")
        self.assertEqual(code, 0)
        self.assertIn("[dry run] tunnel: 120 copied, 0 unchanged, 0 deleted", out)
        rows = yield self.pg.runQuery("SELECT count(*) FROM %s.tunnel" % self.schema)
        self.assertEqual(rows[0][0], 0)

        for a, b in ((sqlite_a, pg), (pg, redis), (redis, sqlite_b)):
            code, out = yield self.cli(a, b)
            self.assertEqual(code, 0, out)
            self.assertIn("tunnel: 120 copied, 0 unchanged, 0 deleted", out)
            code, out = yield self.cli(a, b)
            self.assertIn("tunnel: 0 copied, 120 unchanged, 0 deleted", out)

        back = SqliteStorage(back_path, reactor=reactor)
        yield back.open()
        self.addCleanup(back.close)
        self.assertEqual((yield dump(back)), expected)

    @defer.inlineCallbacks
    def test_refuses_memory(self):
        code, out = yield self.cli("memory://", "sqlite://" + os.path.join(self.dir, "x.sqlite"))
        self.assertEqual(code, 1)
        self.assertIn("memory", out)

    @defer.inlineCallbacks
    def test_unreachable(self):
        from tests.test_storage import free_port

        port = yield free_port()
        code, out = yield self.cli(
            "redis://127.0.0.1:%d" % port, "sqlite://" + os.path.join(self.dir, "x.sqlite"), "--connect-attempts", "1"
        )
        self.assertEqual(code, 1)
        self.assertIn("unreachable", out)
