"""Failed attempts are limited per source address (account numbers, admin keys,
connection tokens), in bounded memory; other addresses and successes are not
affected."""

import json

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from exposr.ratelimit import BURST, FailureLimiter
from tests import e2e_support as e2e


class FailureLimiterTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.limiter = FailureLimiter(self.clock, "test", burst=3, rate=0.5, max_sources=100)

    def test_burst_then_blocked_then_refilled(self):
        for _ in range(3):
            self.assertFalse(self.limiter.blocked("203.0.113.1"))
            self.limiter.failed("203.0.113.1")
        self.assertTrue(self.limiter.blocked("203.0.113.1"))
        self.assertFalse(self.limiter.blocked("203.0.113.2"))  # another address is not affected
        self.clock.advance(2)  # 0.5/s: one more attempt
        self.assertFalse(self.limiter.blocked("203.0.113.1"))
        self.limiter.failed("203.0.113.1")
        self.assertTrue(self.limiter.blocked("203.0.113.1"))
        self.assertEqual(self.limiter.refused, 2)

    def test_memory_is_bounded(self):
        for n in range(1000):
            self.limiter.failed(f"10.0.{n // 256}.{n % 256}")
        self.assertLessEqual(len(self.limiter._buckets), 100)

    def test_tracking_only_after_a_failure(self):
        """Nothing to look up while no address failed (the API then skips working out the address)."""
        self.assertFalse(self.limiter.tracking)
        self.assertFalse(self.limiter.blocked("10.0.0.1"))
        self.limiter.failed("10.0.0.1")
        self.assertTrue(self.limiter.tracking)
        self.clock.advance(60)
        self.assertFalse(self.limiter.blocked("10.0.0.1"))
        self.assertFalse(self.limiter.tracking)

    def test_full_buckets_are_forgotten(self):
        self.limiter.failed("203.0.113.1")
        self.clock.advance(10)
        self.assertFalse(self.limiter.blocked("203.0.113.1"))
        self.assertEqual(self.limiter._buckets, {})

    def test_one_warning_per_interval(self):
        from twisted.logger import globalLogPublisher

        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        for _ in range(3):
            self.limiter.failed("203.0.113.1")
        for _ in range(50):
            self.limiter.blocked("203.0.113.1")
        warnings = [e for e in seen if e.get("log_namespace") == "exposr.ratelimit"]
        self.assertEqual(len(warnings), 1)


class APIRateLimitTests(unittest.TestCase):
    """Over real sockets: guessing account numbers or the admin key gets 429."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.addCleanup(e2e.autobahn_settled)
        self.server = yield e2e.Server(admin_api_enable=True, admin_api_key="right-key",
                                       admin_api_port=0, admin_enable=False).start()
        self.addCleanup(self.server.stop)

    @defer.inlineCallbacks
    def request(self, url, method=b"GET", token=None):
        headers = Headers()
        if token is not None:
            headers.addRawHeader(b"authorization", b"Bearer " + token.encode())
        response = yield e2e.within(Agent(reactor).request(method, url.encode(), headers))
        body = yield e2e.within(readBody(response))
        return response.code, body

    @defer.inlineCallbacks
    def test_guessing_account_numbers(self):
        url = self.server.url + "v1/account/MPW4YDYVNPFXVV2D/token"
        codes = []
        for _ in range(BURST + 2):
            code, body = yield self.request(url)
            codes.append(code)
        self.assertEqual(codes[:BURST], [403] * BURST)
        self.assertEqual(codes[BURST:], [429, 429])
        self.assertEqual(json.loads(body), {"error": "TOO_MANY_REQUESTS"})

    @defer.inlineCallbacks
    def test_guessing_the_admin_key(self):
        port = self.server.service.listeners["admin-api"].address.port
        url = f"http://{e2e.HOST}:{port}/v1/admin/cluster"
        codes = []
        for _ in range(BURST + 1):
            code, _ = yield self.request(url, token="wrong-key")
            codes.append(code)
        self.assertEqual(codes[:BURST], [403] * BURST)
        self.assertEqual(codes[BURST], 429)
        # the right key from the same address waits for the bucket too
        code, _ = yield self.request(url, token="right-key")
        self.assertEqual(code, 429)
