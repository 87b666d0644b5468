"""A connection token is good for one connection, on every storage backend.

Two logins with the same token at the same moment (two WebSocket handshakes,
two SSH logins) used to both succeed on SQLite, PostgreSQL and Redis: the
token was compared on one read and replaced later. It is now compared and
replaced in one locked read-modify-write of storage.
"""

import os
import tempfile

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from exposr.storage.memory import MemoryStorage
from exposr.storage.sqlite import SqliteStorage
from tests.support import Stack
from tests.test_storage import PG, REDIS_DB, unique_name

LOGINS = 5


class TokenTestsMixin:
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        storage = yield defer.maybeDeferred(self.make_storage)
        self.addCleanup(storage.close)
        self.stack = Stack(storage=storage)
        self.account, self.tunnel = yield self.stack.account_and_tunnel("my-tunnel")

    @defer.inlineCallbacks
    def test_one_token_one_login_at_the_same_moment(self):
        token = self.tunnel["transport"]["token"]
        results = yield defer.gatherResults(
            [self.stack.tunnels.authorize("my-tunnel", token) for _ in range(LOGINS)]
        )
        granted = [r for r in results if r is not None]
        self.assertEqual(len(granted), 1, results)
        stored = yield self.stack.tunnels.get("my-tunnel")
        self.assertNotEqual(stored["transport"]["token"], token)
        self.assertEqual(granted[0][0]["transport"]["token"], stored["transport"]["token"])

    @defer.inlineCallbacks
    def test_a_used_token_is_refused_later(self):
        token = self.tunnel["transport"]["token"]
        first = yield self.stack.tunnels.authorize("my-tunnel", token)
        self.assertIsNotNone(first)
        again = yield self.stack.tunnels.authorize("my-tunnel", token)
        self.assertIsNone(again)
        fresh = first[0]["transport"]["token"]
        self.assertIsNotNone((yield self.stack.tunnels.authorize("my-tunnel", fresh)))


class MemoryTokenTests(TokenTestsMixin, unittest.TestCase):
    def make_storage(self):
        return MemoryStorage(task.Clock())


class SqliteTokenTests(TokenTestsMixin, unittest.TestCase):
    def make_storage(self):
        path = os.path.join(tempfile.mkdtemp(prefix="exposr-tokens-"), "db.sqlite")
        return SqliteStorage(path, reactor=reactor, clock=task.Clock()).open()


class PostgresTokenTests(TokenTestsMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def make_storage(self):
        from txpostgres import txpostgres

        from exposr.storage.postgres import PostgresStorage

        schema = unique_name("exposr_tokens")
        admin = txpostgres.Connection(reactor=reactor)
        yield admin.connect(**PG)
        yield admin.runOperation("CREATE SCHEMA %s" % schema)

        @defer.inlineCallbacks
        def drop():
            yield admin.runOperation("DROP SCHEMA IF EXISTS %s CASCADE" % schema)
            admin.close()

        self.addCleanup(drop)
        storage = PostgresStorage(**dict(PG, reactor=reactor, pool_size=4,
                                         options="-c search_path=%s" % schema, connect_timeout=5))
        return (yield storage.open())


class RedisTokenTests(TokenTestsMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def make_storage(self):
        import txredisapi

        from exposr.storage.redis import RedisStorage

        admin = yield txredisapi.Connection("127.0.0.1", 6379, dbid=REDIS_DB, reconnect=False)
        yield admin.flushdb()

        @defer.inlineCallbacks
        def clean():
            yield admin.flushdb()
            yield admin.disconnect()

        self.addCleanup(clean)
        storage = RedisStorage(host="127.0.0.1", port=6379, db=REDIS_DB, reactor=reactor, connect_timeout=5)
        return (yield storage.open())
