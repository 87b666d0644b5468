"""The lease of a Redis test database per process (tests/redis_db.py)."""

import os

from twisted.trial import unittest

from tests import redis_db


class _FakeRedis:
    """INCR, SET NX EX, and the two scripts, on a dict (shared by every connection)."""

    def __init__(self, data):
        self.data = data

    def __call__(self, *args):
        if args[0] == "INCR":
            self.data[args[1]] = self.data.get(args[1], 0) + 1
            return self.data[args[1]]
        if args[0] == "SET":
            key, value = args[1], args[2]
            if key in self.data:
                return None
            self.data[key] = value
            return "OK"
        if args[0] == "EVAL":
            key, token = args[3], args[4]
            if self.data.get(key) != token:
                return 0
            if args[1] == redis_db._RELEASE:
                del self.data[key]
            return 1
        raise AssertionError(args)

    def close(self):
        pass


class LeaseTests(unittest.TestCase):
    def setUp(self):
        self.data = {}
        self.connect = lambda: _FakeRedis(self.data)
        self.patch(redis_db, "DATABASES", tuple(range(1, 16)))

    def test_concurrent_leases_get_different_databases(self):
        leases = [redis_db.lease(self.connect, token=f"run{i}", wait=0) for i in range(15)]
        dbs = [db for db, _ in leases]
        self.assertEqual(sorted(dbs), list(range(1, 16)))
        self.assertEqual(self.data[redis_db.lock_key(dbs[0])], "run0")

    def test_none_free(self):
        for i in range(15):
            redis_db.lease(self.connect, token=f"run{i}", wait=0)
        e = self.assertRaises(RuntimeError, redis_db.lease, self.connect, token="late", wait=0)
        self.assertIn("no free Redis test database", str(e))

    def test_release_and_renew_only_our_own(self):
        db, token = redis_db.lease(self.connect, token="mine", wait=0)
        self.assertFalse(redis_db.release(db, "theirs", self.connect))
        self.assertTrue(redis_db.renew(db, "mine", self.connect))
        self.assertTrue(redis_db.release(db, "mine", self.connect))
        self.assertNotIn(redis_db.lock_key(db), self.data)
        self.assertFalse(redis_db.renew(db, "mine", self.connect))
        self.assertIn(redis_db.lease(self.connect, token="next", wait=0)[0], range(1, 16))


class DatabasesTests(unittest.TestCase):
    def test_parse(self):
        self.assertEqual(redis_db.parse_databases("1-15"), tuple(range(1, 16)))
        self.assertEqual(redis_db.parse_databases("3, 4,12-14,4"), (3, 4, 12, 13, 14))


class RealRedisTests(unittest.TestCase):
    def test_this_process_holds_its_database(self):
        """The lease of this process is in Redis, with our token, and expires unless renewed."""
        redis = redis_db._Redis()
        self.addCleanup(redis.close)
        if "EXPOSR_TEST_REDIS_DB" in os.environ:
            raise unittest.SkipTest("EXPOSR_TEST_REDIS_DB forces a database: nothing is leased")
        owner = redis("GET", redis_db.lock_key(redis_db.REDIS_DB))
        self.assertIsNotNone(owner)
        self.assertIn(":%d:" % os.getpid(), owner)
        self.assertTrue(0 < redis("TTL", redis_db.lock_key(redis_db.REDIS_DB)) <= redis_db.LEASE_SECONDS)

    def test_a_second_lease_is_another_database(self):
        db, token = redis_db.lease(wait=5)
        self.addCleanup(redis_db.release, db, token)
        self.assertNotEqual(db, redis_db.REDIS_DB)
