"""The front door of the shared HTTP port (`exposr.listener`), without sockets.

A `FrontDoor` on a `StringTransport` reads the first request head and hands the
connection, with every byte read so far, to its owner: the API site, the
WebSocket transport (after authorising the token) or the HTTP ingress. The
owners here are recorders; time is a `MemoryReactorClock`.
"""

import json
from types import SimpleNamespace

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.server import Site
from twisted.web.static import Data

from exposr.listener import FIRST_HEAD_TIMEOUT, Door

PEER = IPv4Address("TCP", "198.51.100.9", 40000)


class Owner(Protocol):
    """A connection owner that records what it got."""

    def __init__(self, name):
        self.name = name
        self.chunks = []
        self.lost = None

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        self.lost = reason

    @property
    def received(self):
        return b"".join(self.chunks)


class FakeSite:
    def __init__(self):
        self.built = []

    def buildProtocol(self, addr):
        owner = Owner("api")
        owner.addr = addr
        self.built.append(owner)
        return owner


class FakeIngress:
    """Claims ``<id>.tunnels.test``; ``answer`` overrides what claim returns (e.g. a Deferred)."""

    def __init__(self):
        self.sessions = []
        self.claims = []
        self.answer = None

    def claim(self, host):
        self.claims.append(host)
        if self.answer is not None:
            return self.answer
        label, _, parent = host.partition(".")
        return label if parent == "tunnels.test" else None

    def session(self):
        owner = Owner("ingress")
        self.sessions.append(owner)
        return owner


class FakeWS:
    def __init__(self):
        self.made = []

    def protocol_for(self, tunnel_id, account_id, peer_ip):
        owner = Owner("ws")
        owner.args = (tunnel_id, account_id, peer_ip)
        self.made.append(owner)
        return owner


class FakeTunnels:
    def __init__(self):
        self.asked = []
        self.result = None

    def authorize(self, tunnel_id, token):
        self.asked.append((tunnel_id, token))
        if isinstance(self.result, Exception):
            raise self.result
        if self.result is not None:
            return self.result
        if (tunnel_id, token) == ("t1", "good-token"):
            return defer.succeed(({"id": "t1"}, {"id": "acct-1"}))
        return defer.succeed(None)


UPGRADE = (b"GET /v1/tunnel/t1/ws-endpoint?t=%s HTTP/1.1\r\nHost: api.test\r\n"
           b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


def split_response(data):
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    return lines[0], headers, body


class FrontDoorTests(unittest.TestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.site = FakeSite()
        self.ingress = FakeIngress()
        self.ws = FakeWS()
        self.tunnels = FakeTunnels()
        self.config = SimpleNamespace(api_url=None, ingress_http_trusted_proxies=[])

    def connect(self, **door_args):
        args = dict(site=self.site, ingress=self.ingress, ws=self.ws, tunnels=self.tunnels)
        args.update(door_args)
        self.door = Door(self.config, self.clock, **args)
        proto = self.door.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER)
        proto.makeConnection(transport)
        return proto, transport

    def assertRefused(self, transport, status_line, body=None):
        line, headers, got = split_response(transport.value())
        self.assertEqual(line, status_line)
        self.assertEqual(headers[b"Connection"], b"close")
        if body is not None:
            self.assertEqual(got, body)
        self.assertTrue(transport.disconnecting)
        return headers, got

    # -- routing -------------------------------------------------------------

    def test_api_request_goes_to_the_site_with_every_byte(self):
        proto, transport = self.connect()
        request = b"POST /v1/tunnel/x HTTP/1.1\r\nHost: api.test\r\nContent-Length: 10\r\n\r\n0123"
        proto.dataReceived(request[:20])
        proto.dataReceived(request[20:])
        [owner] = self.site.built
        self.assertEqual(owner.received, request)
        self.assertIs(owner.transport, transport)
        self.assertEqual(transport.producerState, "producing")
        # later bytes and the end of the connection reach the owner
        proto.dataReceived(b"456789")
        self.assertEqual(owner.received, request + b"456789")
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(owner.lost.check(error.ConnectionDone))
        self.assertEqual(self.ingress.sessions, [])
        self.assertEqual(transport.value(), b"")

    def test_tunnel_host_goes_to_the_ingress(self):
        proto, transport = self.connect()
        request = b"GET /hello HTTP/1.1\r\nHost: t1.tunnels.test\r\n\r\nGET /again HTTP/1.1\r\n"
        proto.dataReceived(request)
        [owner] = self.ingress.sessions
        self.assertEqual(owner.received, request)
        self.assertEqual(self.ingress.claims, ["t1.tunnels.test"])
        self.assertEqual(self.site.built, [])

    def test_tunnel_host_wins_over_the_websocket_path(self):
        proto, transport = self.connect()
        request = UPGRADE.replace(b"Host: api.test", b"Host: t1.tunnels.test") % b"good-token"
        proto.dataReceived(request)
        self.assertEqual(len(self.ingress.sessions), 1)
        self.assertEqual(self.ws.made, [])

    def test_authorised_upgrade_goes_to_the_websocket_transport(self):
        proto, transport = self.connect()
        request = UPGRADE % b"good-token"
        proto.dataReceived(request + b"\x82\x85first-frame")
        [owner] = self.ws.made
        self.assertEqual(owner.args, ("t1", "acct-1", "198.51.100.9"))
        self.assertEqual(owner.received, request + b"\x82\x85first-frame")
        self.assertEqual(self.tunnels.asked, [("t1", "good-token")])
        self.assertEqual(transport.value(), b"")

    def test_wrong_token_is_401_json(self):
        proto, transport = self.connect()
        proto.dataReceived(UPGRADE % b"wrong")
        headers, body = self.assertRefused(transport, b"HTTP/1.1 401 Unauthorized")
        self.assertEqual(json.loads(body), {"error": "PERMISSION_DENIED"})
        self.assertEqual(headers[b"Content-Type"], b"application/json")
        self.assertEqual(self.ws.made, [])

    def test_missing_token_is_401_without_asking_storage(self):
        proto, transport = self.connect()
        proto.dataReceived(UPGRADE.replace(b"?t=%s", b""))
        self.assertRefused(transport, b"HTTP/1.1 401 Unauthorized", b'{"error":"PERMISSION_DENIED"}')
        self.assertEqual(self.tunnels.asked, [])

    def test_storage_trouble_while_authorising_is_401(self):
        self.tunnels.result = RuntimeError("database down")
        proto, transport = self.connect()
        proto.dataReceived(UPGRADE % b"good-token")
        self.assertRefused(transport, b"HTTP/1.1 401 Unauthorized", b'{"error":"PERMISSION_DENIED"}')

    def test_upgrade_elsewhere_is_500(self):
        proto, transport = self.connect()
        proto.dataReceived(UPGRADE.replace(b"/ws-endpoint", b"/other") % b"good-token")
        self.assertRefused(transport, b"HTTP/1.1 500 Internal Server Error", b"")
        self.assertEqual(self.tunnels.asked, [])

    def test_api_url_host_mismatch_is_404(self):
        self.config.api_url = "https://api.example.com"
        proto, transport = self.connect()
        proto.dataReceived(b"GET /v1/ HTTP/1.1\r\nHost: other.example.com\r\n\r\n")
        self.assertRefused(transport, b"HTTP/1.1 404 Not Found", b"Not Found")
        self.assertEqual(self.site.built, [])
        proto, transport = self.connect()
        proto.dataReceived(b"GET /v1/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        self.assertEqual(len(self.site.built), 1)

    def test_ingress_only_port_answers_404_for_unknown_hosts(self):
        proto, transport = self.connect(site=None, ws=None)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n")
        self.assertRefused(transport, b"HTTP/1.1 404 Not Found", b'{"error":"TUNNEL_NOT_FOUND"}')

    def test_real_site_answers_the_api_request(self):
        root = Data(b'{"ok":true}', "application/json")
        root.isLeaf = True
        site = Site(root)
        site.timeOut = None  # no idle timer on the global reactor
        proto, transport = self.connect(site=site)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        line, headers, body = split_response(transport.value())
        self.assertEqual(line, b"HTTP/1.1 200 OK")
        self.assertEqual(body, b'{"ok":true}')

    # -- waiting for the decision --------------------------------------------

    def test_reading_paused_while_deciding_and_later_bytes_kept(self):
        pending = defer.Deferred()
        self.ingress.answer = pending
        proto, transport = self.connect()
        head = b"GET / HTTP/1.1\r\nHost: t1.tunnels.test\r\nContent-Length: 4\r\n\r\n"
        proto.dataReceived(head)
        self.assertEqual(transport.producerState, "paused")
        proto.dataReceived(b"bo")
        proto.dataReceived(b"dy")
        self.assertEqual(self.ingress.sessions, [])
        pending.callback("t1")
        [owner] = self.ingress.sessions
        self.assertEqual(owner.received, head + b"body")
        self.assertEqual(transport.producerState, "producing")

    def test_connection_lost_while_deciding_hands_over_nothing(self):
        pending = defer.Deferred()
        self.ingress.answer = pending
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: t1.tunnels.test\r\n\r\n")
        proto.connectionLost(Failure(error.ConnectionLost()))
        pending.callback("t1")
        for owner in self.ingress.sessions:  # built, perhaps, but never connected
            self.assertIsNone(owner.transport)
            self.assertEqual(owner.received, b"")
        self.assertEqual(transport.value(), b"")

    def test_failing_alt_name_lookup_falls_through_to_the_api(self):
        self.ingress.answer = defer.fail(RuntimeError("storage down"))
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: www.example.org\r\n\r\n")
        self.assertEqual(len(self.site.built), 1)

    def test_owner_failure_is_500_and_close(self):
        class BrokenSite:
            def buildProtocol(self, addr):
                raise RuntimeError("broken")

        proto, transport = self.connect(site=BrokenSite())
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        self.assertRefused(transport, b"HTTP/1.1 500 Internal Server Error", b"")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    # -- the first-head timeout ------------------------------------------------

    def test_no_head_in_time_aborts(self):
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: api")
        self.clock.advance(FIRST_HEAD_TIMEOUT - 0.1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)  # StringTransport: aborted
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.site.built, [])

    def test_timer_ends_with_the_decision(self):
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(FIRST_HEAD_TIMEOUT * 2)
        self.assertFalse(transport.disconnecting)

    def test_timer_ends_with_the_connection(self):
        proto, transport = self.connect()
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    # -- bad heads ---------------------------------------------------------------

    def test_garbage_is_400_json_and_close(self):
        proto, transport = self.connect()
        proto.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
        headers, body = self.assertRefused(transport, b"HTTP/1.1 400 Bad Request")
        self.assertEqual(json.loads(body)["error"], "BAD_REQUEST")
        self.assertEqual(self.site.built + self.ingress.sessions + self.ws.made, [])
        # nothing more is parsed after the refusal
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        self.assertEqual(self.site.built, [])

    def test_oversized_head_is_431_and_close(self):
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: api.test\r\n")
        for _ in range(40):
            proto.dataReceived(b"X-Filler: " + b"a" * 1000 + b"\r\n")
            if transport.disconnecting:
                break
        headers, body = self.assertRefused(transport, b"HTTP/1.1 431 Request Header Fields Too Large")
        self.assertEqual(json.loads(body)["error"], "BAD_REQUEST")
        self.assertEqual(self.site.built, [])

    def test_head_without_host_is_400(self):
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertRefused(transport, b"HTTP/1.1 400 Bad Request", b"")
