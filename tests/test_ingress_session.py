"""The HTTP ingress (`IngressSession`, `UpstreamPool`) without sockets.

The public client is a `StringTransport`, time a `MemoryReactorClock`, the
tunnel a `tests.fake_connection.FakeTunnelConnection` (the reference
implementation of the `ITunnelConnection` contract): every upstream stream's
far end shows what the tunnel client's target would receive, and answers.
"""

import json
from types import SimpleNamespace

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from exposr import errors
from exposr.config import Config
from exposr.router import Router
from exposr.ingress.http import HEAD_TIMEOUT, HTTPIngress
from tests.fake_connection import FakeRegistry, FakeTunnelConnection

NODE = "node-a"
IDLE_TIMEOUT = 10.0  # shorter than the client head timeout: one client sees it
PEER = IPv4Address("TCP", "198.51.100.9", 40000)
TARGET = "http://localhost:3000"


def make_ingress(clock, tunnels, registry, node_id=NODE):
    """The ingress under test: the one place that knows its constructor."""
    config = SimpleNamespace(
        ingress_http_url="http://tunnels.test:8080",
        ingress_http_trusted_proxies=[],
        ingress_http_agent_idle_timeout=IDLE_TIMEOUT,
        http_head_timeout=HEAD_TIMEOUT,
        http_body_timeout=Config().http_body_timeout,
        http_body_min_rate=Config().http_body_min_rate,
        ingress_http_tunnel_idle_timeout=Config().ingress_http_tunnel_idle_timeout,
    )
    return HTTPIngress(config, Router(tunnels, registry, clock), node_id, clock)


class FakeTunnels:
    """Tunnel records by id (what ``tunnels.get`` returns)."""

    def __init__(self):
        self.records = {}

    def add(self, tunnel_id, enabled=True, target=TARGET):
        self.records[tunnel_id] = {
            "id": tunnel_id,
            "ingress": {"http": {"enabled": enabled}},
            "target": {"url": target},
        }

    def get(self, tunnel_id):
        return self.records.get(tunnel_id)

    def on_change(self, callback):
        """This node's record changes (none happen in these tests)."""


def request(path=b"/", host=b"t1.tunnels.test", extra=b"", method=b"GET"):
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (method, path, host, extra)


def parse(data):
    """(status line or request line, {lower-case name: value}, rest) of one message."""
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, rest


OK_HELLO = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


class IngressSessionTests(unittest.TestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.tunnels = FakeTunnels()
        self.tunnels.add("t1")
        self.registry = FakeRegistry()
        self.conn = self.registry.add(FakeTunnelConnection(tunnel_id="t1"))
        self.ingress = make_ingress(self.clock, self.tunnels, self.registry)

    def client(self):
        session = self.ingress.session()
        transport = StringTransport(peerAddress=PEER, lenient=True)
        session.makeConnection(transport)
        return session, transport

    def send(self, session, data):
        session.dataReceived(data)
        self.conn.pump()

    def assertError(self, transport, status, code, close):
        line, headers, body = parse(transport.value())
        self.assertEqual(line.split(b" ")[:2], [b"HTTP/1.1", b"%d" % status])
        self.assertEqual(json.loads(body), {"error": code})
        self.assertEqual(headers[b"connection"], b"close" if close else b"keep-alive")
        self.assertEqual(transport.disconnecting, close)

    # -- routing errors ------------------------------------------------------

    def test_unknown_tunnel_is_404(self):
        session, transport = self.client()
        self.send(session, request(host=b"nope.tunnels.test"))
        self.assertError(transport, 404, "TUNNEL_NOT_FOUND", close=False)
        self.assertEqual(self.conn.opened, 0)

    def test_tunnel_without_connection_is_503(self):
        self.tunnels.add("t2")
        session, transport = self.client()
        self.send(session, request(host=b"t2.tunnels.test"))
        self.assertError(transport, 503, "TUNNEL_NOT_CONNECTED", close=False)

    def test_ingress_disabled_is_403(self):
        self.tunnels.add("t1", enabled=False)
        session, transport = self.client()
        self.send(session, request())
        self.assertError(transport, 403, "TUNNEL_HTTP_INGRESS_DISABLED", close=False)

    def test_request_through_this_node_again_is_508(self):
        session, transport = self.client()
        self.send(session, request(extra=b"Exposr-Via: other-node, node-a\r\n"))
        self.assertError(transport, 508, "HTTP_INGRESS_REQUEST_LOOP", close=False)
        self.assertEqual(self.conn.opened, 0)

    def test_host_of_no_tunnel_is_421_and_close(self):
        session, transport = self.client()
        self.send(session, request(host=b"www.example.org"))
        self.assertError(transport, 421, "MISDIRECTED_REQUEST", close=True)

    def test_no_free_channel_is_429(self):
        self.conn.max_streams = 0
        session, transport = self.client()
        self.send(session, request())
        self.assertError(transport, 429, "TUNNEL_TRANSPORT_REQUEST_LIMIT", close=False)

    def test_stream_refused_is_502(self):
        self.conn.open_error = errors.StreamRefusedError("ECONNREFUSED")
        session, transport = self.client()
        self.send(session, request())
        self.assertError(transport, 502, "TUNNEL_TARGET_CON_FAILED", close=False)

    def test_error_with_unread_body_closes(self):
        self.conn.open_error = errors.StreamRefusedError("ECONNREFUSED")
        session, transport = self.client()
        self.send(session, request(method=b"POST", extra=b"Content-Length: 3\r\n") + b"abc")
        self.assertError(transport, 502, "TUNNEL_TARGET_CON_FAILED", close=True)

    def test_keep_alive_continues_after_an_error(self):
        session, transport = self.client()
        self.send(session, request(host=b"nope.tunnels.test"))
        transport.clear()
        self.send(session, request())
        self.conn.far_streams[0].write(OK_HELLO)
        self.conn.pump()
        self.assertEqual(transport.value(), OK_HELLO)

    def test_upstream_closing_before_a_response_is_502(self):
        session, transport = self.client()
        self.send(session, request())
        self.conn.far_streams[0].close()
        self.conn.pump()
        line, headers, body = parse(transport.value())
        self.assertEqual(line, b"HTTP/1.1 502 Bad Gateway")
        self.assertIn(json.loads(body)["error"], ("TUNNEL_TARGET_CON_RESET", "TUNNEL_TARGET_CON_FAILED"))
        self.assertTrue(transport.disconnecting)

    # -- forwarding ------------------------------------------------------------

    def test_request_forwarded_with_rewritten_head_and_response_spliced_back(self):
        session, transport = self.client()
        self.send(session, request(b"/path?q=1", extra=b"Connection: keep-alive\r\nUser-Agent: test\r\n"))
        [far] = self.conn.far_streams
        line, headers, rest = parse(far.received)
        self.assertEqual(line, b"GET /path?q=1 HTTP/1.1")
        self.assertEqual(headers[b"host"], b"localhost:3000")
        self.assertEqual(headers[b"x-forwarded-for"], b"198.51.100.9")
        self.assertEqual(headers[b"x-forwarded-host"], b"t1.tunnels.test")
        self.assertEqual(headers[b"exposr-via"], NODE.encode())
        self.assertEqual(headers[b"user-agent"], b"test")
        self.assertNotIn(b"connection", headers)
        self.assertEqual(rest, b"")
        far.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Up: 1\r\n\r\nhel")
        far.write(b"lo")
        self.conn.pump()
        self.assertEqual(transport.value(), b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Up: 1\r\n\r\nhello")
        self.assertFalse(transport.disconnecting)

    def test_request_body_forwarded(self):
        session, transport = self.client()
        head = request(method=b"POST", extra=b"Content-Length: 11\r\n")
        self.send(session, head + b"hello")
        self.send(session, b" world")
        [far] = self.conn.far_streams
        self.assertTrue(far.received.endswith(b"\r\n\r\nhello world"))

    def test_keep_alive_reuses_the_pooled_upstream_stream(self):
        session, transport = self.client()
        self.send(session, request(b"/one"))
        self.conn.far_streams[0].write(OK_HELLO)
        self.conn.pump()
        self.send(session, request(b"/two"))
        self.assertEqual(self.conn.opened, 1)
        [far] = self.conn.far_streams
        self.assertIn(b"GET /two HTTP/1.1\r\n", far.received)
        far.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.conn.pump()
        self.assertEqual(transport.value(), OK_HELLO + b"HTTP/1.1 204 No Content\r\n\r\n")
        # another client gets the same pooled stream too
        other, other_transport = self.client()
        self.send(other, request(b"/three"))
        self.assertEqual(self.conn.opened, 1)
        self.assertIn(b"GET /three HTTP/1.1\r\n", far.received)

    def test_client_connection_close_is_honoured(self):
        session, transport = self.client()
        self.send(session, request(extra=b"Connection: close\r\n"))
        self.conn.far_streams[0].write(OK_HELLO)
        self.conn.pump()
        line, headers, body = parse(transport.value())
        self.assertEqual(line, b"HTTP/1.1 200 OK")
        self.assertEqual(headers[b"connection"], b"close")
        self.assertEqual(body, b"hello")
        self.assertTrue(transport.disconnecting)

    def test_upstream_connection_close_closes_both(self):
        session, transport = self.client()
        self.send(session, request())
        far = self.conn.far_streams[0]
        far.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        self.conn.pump()
        self.assertTrue(transport.value().endswith(b"ok"))
        self.assertTrue(transport.disconnecting)
        self.assertTrue(far.closed)
        # a new request opens a new stream
        session2, transport2 = self.client()
        self.send(session2, request())
        self.assertEqual(self.conn.opened, 2)

    def test_upstream_lost_mid_response_aborts_the_client(self):
        session, transport = self.client()
        self.send(session, request())
        far = self.conn.far_streams[0]
        far.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        self.conn.pump()
        self.conn.drop()
        self.conn.pump()
        self.assertTrue(transport.value().endswith(b"partial"))  # no JSON appended
        self.assertTrue(transport.disconnected)  # StringTransport: aborted

    # -- back-pressure ---------------------------------------------------------

    def test_paused_upstream_pauses_reading_the_client(self):
        session, transport = self.client()
        self.send(session, request(method=b"POST", extra=b"Content-Length: 100000\r\n") + b"x" * 10)
        far = self.conn.far_streams[0]
        self.assertEqual(transport.producerState, "producing")
        far.pause()
        self.conn.pump()
        self.assertEqual(transport.producerState, "paused")
        far.resume()
        self.conn.pump()
        self.assertEqual(transport.producerState, "producing")

    def test_backed_up_client_pauses_the_upstream(self):
        session, transport = self.client()
        self.send(session, request())
        far = self.conn.far_streams[0]
        far.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        self.conn.pump()
        # the public socket's buffer is full: Twisted pauses its producer
        transport.producer.pauseProducing()
        self.conn.pump()
        self.assertTrue(far.producer_paused)
        transport.producer.resumeProducing()
        self.conn.pump()
        self.assertFalse(far.producer_paused)

    def test_pooled_stream_is_not_left_paused(self):
        session, transport = self.client()
        self.send(session, request())
        far = self.conn.far_streams[0]
        far.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        self.conn.pump()
        transport.producer.pauseProducing()
        self.conn.pump()
        far.write(b"67890")  # in flight when the pause arrived
        self.conn.pump()
        self.assertTrue(transport.value().endswith(b"1234567890"))
        self.assertIsNone(transport.producer)  # unspliced
        self.assertFalse(far.producer_paused)

    # -- timers ------------------------------------------------------------------

    def test_idle_pooled_stream_closed_after_the_idle_timeout(self):
        session, transport = self.client()
        self.send(session, request())
        far = self.conn.far_streams[0]
        far.write(OK_HELLO)
        self.conn.pump()
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.conn.pump()
        self.assertFalse(far.closed)
        self.clock.advance(1)
        self.conn.pump()
        self.assertTrue(far.closed)
        self.send(session, request())
        self.assertEqual(self.conn.opened, 2)

    def test_reuse_restarts_the_idle_timeout(self):
        session, transport = self.client()
        self.send(session, request())
        far = self.conn.far_streams[0]
        far.write(OK_HELLO)
        self.conn.pump()
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.send(session, request())
        far.write(OK_HELLO)
        self.conn.pump()
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.conn.pump()
        self.assertFalse(far.closed)
        self.clock.advance(1)
        self.conn.pump()
        self.assertTrue(far.closed)

    def test_idle_client_closed_after_the_head_timeout(self):
        session, transport = self.client()
        self.send(session, request())
        self.conn.far_streams[0].write(OK_HELLO)
        self.conn.pump()
        transport.clear()
        self.clock.advance(HEAD_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")  # an idle connection just ends

    def test_partial_head_times_out_with_408(self):
        session, transport = self.client()
        self.send(session, b"GET / HTTP/1.1\r\nHost: t1.tun")
        self.clock.advance(HEAD_TIMEOUT)
        line, headers, body = parse(transport.value())
        self.assertEqual(line, b"HTTP/1.1 408 Request Timeout")
        self.assertEqual(json.loads(body), {"error": "REQUEST_TIMEOUT"})
        self.assertTrue(transport.disconnecting)

    def test_running_request_is_not_timed_out(self):
        session, transport = self.client()
        self.send(session, request())
        self.clock.advance(HEAD_TIMEOUT * 3)
        self.assertFalse(transport.disconnecting)
        self.conn.far_streams[0].write(OK_HELLO)
        self.conn.pump()
        self.assertEqual(transport.value(), OK_HELLO)

    def test_lost_connection_unregisters_the_pooled_streams(self):
        session, transport = self.client()
        self.send(session, request())
        self.conn.far_streams[0].write(OK_HELLO)
        self.conn.pump()
        self.assertIn("t1", self.ingress.pools)
        self.conn.drop()
        self.assertNotIn("t1", self.ingress.pools)
        self.send(session, request())
        self.assertError(_Tail(transport, len(OK_HELLO)), 503, "TUNNEL_NOT_CONNECTED", close=False)


class _Tail:
    """The part of a StringTransport's output after ``skip`` bytes (for assertError)."""

    def __init__(self, transport, skip):
        self.transport = transport
        self.skip = skip

    def value(self):
        return self.transport.value()[self.skip:]

    @property
    def disconnecting(self):
        return self.transport.disconnecting
