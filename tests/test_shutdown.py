"""Draining shutdown of a real exposrd process, as a load balancer and a
tunnel client see it.

SIGTERM while a slow response is in flight through a tunnel: ``/health``
answers not ready at once (``/ping`` still 200), the response completes, the
tunnel client's WebSocket is closed with 1001 (so it reconnects elsewhere),
the process exits 0. A second signal during the drain exits at once.
"""

import re

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from exposr.client.connect import TunnelConnector
from exposr.client.rest import ApiClient
from tests import e2e_support as e2e

TID = "draining"
HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"


class ShutdownTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def start(self, grace):
        self.addCleanup(e2e.autobahn_settled)
        self.proc, self.port = yield e2e.exposrd_process(
            "--shutdown-grace", str(grace), "--admin-enable", "--admin-port", "0")
        self.addCleanup(self.proc.kill)
        m = yield self.proc.wait_for(rb"admin listening on [0-9.]+:(\d+)", 30)
        self.admin = f"http://{e2e.HOST}:{int(m.group(1))}"
        yield self.proc.wait_for(rb"exposrd ready", 30)
        # an answer comes from the running reactor: its signal handlers are in place
        self.assertEqual((yield self.get(self.admin + "/ping")), 200)

    @defer.inlineCallbacks
    def get(self, url):
        response = yield e2e.within(Agent(reactor).request(b"GET", url.encode()))
        yield readBody(response)
        return response.code

    @defer.inlineCallbacks
    def test_sigterm_drains_a_slow_response_then_closes_tunnels_with_1001_and_exits_0(self):
        yield self.start(grace=1)
        requests = []
        target = yield e2e.RawTarget(on_data=lambda p, d: requests.append((p, d))).start()
        self.addCleanup(target.stop)
        api = ApiClient(reactor, f"http://{e2e.HOST}:{self.port}/")
        account = yield e2e.within(api.create_account())
        api.account = account["account_id"]
        yield e2e.make_tunnel(None, TID, target.url, api=api)
        connector = TunnelConnector(reactor, api, TID)
        yield e2e.within(connector.start())
        yield e2e.within(connector.wait_connections(1))
        closed = [slot.ws.closed for slot in connector.slots if slot.ws is not None]
        self.assertTrue(closed)
        self.addCleanup(lambda: e2e.within(connector.stop()))

        client = yield e2e.raw_connect(self.port)
        self.addCleanup(client.transport.abortConnection)
        client.request(e2e.request(b"GET", b"/slow", f"{TID}.localhost:{self.port}"))
        response = client.response()
        yield e2e.wait_until(lambda: requests)
        upstream = requests[0][0]
        upstream.transport.write(HEAD + b"01234")  # half the body: the response is in flight

        self.proc.transport.signalProcess("TERM")
        yield e2e.wait_until(lambda: b"shutting down" in self.proc.output, 5)
        self.assertEqual((yield self.get(self.admin + "/health")), 404)  # not ready at once
        self.assertEqual((yield self.get(self.admin + "/ping")), 200)
        self.assertFalse(response.called)

        upstream.transport.write(b"56789")  # the rest, after the grace period began
        head, body, _ = yield e2e.within(response)
        self.assertEqual((head.status, body), (200, b"0123456789"))
        codes = yield e2e.within(defer.gatherResults(closed), 40)
        self.assertEqual(set(codes), {1001})
        status = yield e2e.within(self.proc.ended, 40)
        self.assertEqual(status, 0, self.proc.output.decode(errors="replace")[-2000:])
        self.assertIsNone(re.search(rb"Traceback", self.proc.output))

    @defer.inlineCallbacks
    def test_a_second_signal_exits_at_once(self):
        yield self.start(grace=30)
        self.proc.transport.signalProcess("TERM")
        yield self.proc.wait_for(rb"Still serving for", 10)
        self.proc.transport.signalProcess("INT")
        status = yield e2e.within(self.proc.ended, 5)
        self.assertEqual(status, 255)
