"""Storage outages as the public sees them, over real sockets.

The server's Redis storage goes through a relay the test controls: cut (the
server went away) or black-holed (a frozen server: connections accepted,
nothing answered). A live tunnel must never be reported missing (404) because
storage is down, and nobody may wait for long: answers come within a few
seconds, and at once while the store stays down.
"""

import json
import time

import txredisapi
from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from tests import e2e_support as e2e
from tests.test_storage import REDIS_DB, Outage

TID = "outage-tunnel"
STORAGE_TIMEOUT = 1.0


class _Hole(protocol.Protocol):
    """Accepts and never answers (a frozen Redis)."""

    def connectionMade(self):
        self.factory.held.append(self.transport)


class _BlackHole(protocol.Factory):
    protocol = _Hole

    def __init__(self):
        self.held = []


class OutageTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.addCleanup(e2e.autobahn_settled)
        self.admin = yield txredisapi.Connection("127.0.0.1", 6379, dbid=REDIS_DB, reconnect=False)
        yield self.admin.flushdb()
        self.addCleanup(self.admin.disconnect)
        self.addCleanup(self.admin.flushdb)
        self.relay = Outage("127.0.0.1", 6379)
        self.relay.up()
        self.addCleanup(self.relay.stop)
        self.server = yield e2e.Server(
            storage_url=f"redis://127.0.0.1:{self.relay.port}/{REDIS_DB}",
            storage_timeout=STORAGE_TIMEOUT,
        ).start()
        self.addCleanup(self.server.stop)
        self.target = yield e2e.HTTPTarget().start()
        self.addCleanup(self.target.stop)
        connector = yield e2e.connect_client(self.server, TID, self.target.url)
        self.addCleanup(lambda: e2e.within(connector.stop()))

    @defer.inlineCallbacks
    def get(self, path=b"/x"):
        conn = yield e2e.raw_connect(self.server.port)
        self.addCleanup(conn.transport.abortConnection)
        conn.request(e2e.request(b"GET", path, self.server.host(TID)))
        head, body, _ = yield e2e.within(conn.response())
        return head, body

    @defer.inlineCallbacks
    def test_connected_tunnel_served_through_an_outage_never_404(self):
        head, _ = yield self.get()
        self.assertEqual(head.status, 200)
        yield self.relay.down()
        # once the ingress's cached record has run out (2 s)...
        router = self.server.service.router
        yield e2e.wait_until(lambda: router.cached(TID) is None, 5)
        head, _ = yield self.get()
        self.assertEqual(head.status, 200)  # the last known record serves a connected tunnel
        # no record known at all (e.g. a node that just started): 503, not 404
        self.server.service.router.forget(TID)
        head, body = yield self.get()
        self.assertEqual(head.status, 503)
        self.assertEqual(json.loads(body), {"error": "TUNNEL_LOOKUP_UNAVAILABLE"})

    @defer.inlineCallbacks
    def test_frozen_store_answers_503_within_seconds_then_at_once(self):
        api = self.server.url + "v1/account"
        yield self.relay.down()
        hole = _BlackHole()
        port = reactor.listenTCP(self.relay.port, hole, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: [t.abortConnection() for t in hole.held])
        self.server.service.router.forget(TID)
        started = time.monotonic()
        head, _ = yield self.get()
        first = time.monotonic() - started
        self.assertEqual(head.status, 503)
        self.assertLess(first, STORAGE_TIMEOUT + 3)
        # the API too, and once the circuit is open, at once
        for _ in range(3):
            yield e2e.within(self.post(api))
        started = time.monotonic()
        status = yield e2e.within(self.post(api))
        self.assertEqual(status, 503)
        self.assertLess(time.monotonic() - started, STORAGE_TIMEOUT)

    def post(self, url):
        from twisted.web.client import Agent

        d = Agent(reactor).request(b"POST", url.encode())
        return d.addCallback(lambda r: (r.deliverBody(protocol.Protocol()), r.code)[1])
