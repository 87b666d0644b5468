"""End to end over real sockets: public client -> ingress -> WebSocket -> exposr client -> target.

The server runs in process (an `ExposrService` on port 0) except where its
memory is measured (an `exposrd` subprocess). The tunnel is served by the real
client (`TunnelConnector`, or the `exposr` CLI as a subprocess).
"""

import json
import os
import re
import socket

from twisted.internet import defer, reactor, task, tcp
from twisted.trial import unittest

from tests import e2e_support as e2e
from tests.e2e_support import within

TID = "my-tunnel"


def _headers(doc):
    out = {}
    for name, value in doc["headers"]:
        out.setdefault(name, []).append(value)
    return out


def _json(resp):
    return json.loads(resp[1])


class _Base(unittest.TestCase):
    timeout = 60
    server_options = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.addCleanup(e2e.autobahn_settled)
        self.server = yield e2e.Server(**self.server_options).start()
        self.addCleanup(self.server.stop)
        self.target = yield e2e.HTTPTarget().start()
        self.addCleanup(self.target.stop)
        self.connectors = []

    @defer.inlineCallbacks
    def serve(self, tunnel_id=TID, target_url=None, **kw):
        connector = yield e2e.connect_client(self.server, tunnel_id, target_url or self.target.url, **kw)
        self.connectors.append(connector)
        self.addCleanup(lambda: within(connector.stop()))
        return connector

    @defer.inlineCallbacks
    def ask(self, data, method=b"GET", n=None, **kw):
        """One request on a new connection: (head, body)."""
        conn = yield e2e.raw_connect(self.server.port, **kw)
        self.addCleanup(conn.transport.abortConnection)
        conn.request(data, method)
        resp = yield conn.response()
        return resp

    def req(self, method, target, tunnel_id=TID, **kw):
        return e2e.request(method, target, self.server.host(tunnel_id), **kw)


class ProxyTests(_Base):
    @defer.inlineCallbacks
    def test_get_and_post_byte_exact(self):
        yield self.serve()
        head, body, _ = yield self.ask(self.req(b"GET", b"/bytes/300000"))
        self.assertEqual(head.status, 200)
        self.assertEqual(body, e2e.expected_bytes(300000))
        payload = os.urandom(200000)
        head, body, _ = yield self.ask(self.req(b"POST", b"/echo-body?x=1", body=payload), method=b"POST")
        self.assertEqual(head.status, 200)
        self.assertEqual(body, payload)
        req = self.target.requests[-1]
        self.assertEqual(req.uri, b"/echo-body?x=1")

    @defer.inlineCallbacks
    def test_keep_alive_rewrites_every_request(self):
        yield self.serve()
        conn = yield e2e.raw_connect(self.server.port)
        self.addCleanup(conn.transport.abortConnection)
        host = self.server.host(TID)
        for i in range(4):
            extra = [(b"X-Forwarded-For", b"10.1.2.%d, 10.9.9.9" % i), (b"exposr-via", b"b" * 40),
                     (b"Forwarded", b"for=1.1.1.1"), (b"Referer", f"http://{host}/page{i}".encode()),
                     (b"Origin", f"http://{host}".encode()), (b"Connection", b"keep-alive")]
            conn.request(self.req(b"GET", b"/echo/%d?q=%d" % (i, i), headers=extra))
            resp = yield conn.response()
            self.assertEqual(resp[0].status, 200)
            doc = _json(resp)
            h = _headers(doc)
            self.assertEqual(doc["path"], "/echo/%d?q=%d" % (i, i))
            ip = "10.1.2.%d" % i  # the peer 127.0.0.1 is a trusted proxy by default
            self.assertEqual(h["x-forwarded-for"], [ip])
            self.assertEqual(h["x-real-ip"], [ip])
            self.assertEqual(h["exposr-via"], [self.server.node_id + "," + "b" * 40])
            self.assertEqual(h["x-forwarded-host"], [host])
            self.assertEqual(h["x-forwarded-proto"], ["http"])
            self.assertEqual(h["x-forwarded-port"], [str(self.server.port)])
            self.assertEqual(h["forwarded"], [f"by=_exposr;for={ip};host={host};proto=http"])
            self.assertEqual(h["host"], [f"127.0.0.1:{self.target.port}"])
            self.assertEqual(h["referer"], [f"http://127.0.0.1:{self.target.port}/page{i}"])
            self.assertEqual(h["origin"], [f"http://127.0.0.1:{self.target.port}"])
        # one public connection, one upstream stream, four requests
        self.assertEqual(len(set(self.target.channels)), 1)
        self.assertEqual(len(self.target.requests), 4)

    @defer.inlineCallbacks
    def test_pipelined_requests(self):
        yield self.serve()
        conn = yield e2e.raw_connect(self.server.port)
        self.addCleanup(conn.transport.abortConnection)
        data = b"".join(self.req(b"GET", b"/echo/%d" % i) for i in range(3))
        for _ in range(3):
            conn.parser.expect(b"GET")
        conn.transport.write(data)
        resps = yield defer.gatherResults([conn.response(n) for n in (1, 2, 3)])
        self.assertEqual([_json(r)["path"] for r in resps], ["/echo/0", "/echo/1", "/echo/2"])

    @defer.inlineCallbacks
    def test_connection_close_from_the_client_ends_the_connection(self):
        # forwarding drops the request's Connection header; the client's
        # wish to close must still be honoured (and said in the response)
        yield self.serve()
        for version, headers in ((b"HTTP/1.1", [(b"Connection", b"close")]), (b"HTTP/1.0", [])):
            conn = yield e2e.raw_connect(self.server.port)
            self.addCleanup(conn.transport.abortConnection)
            conn.request(self.req(b"GET", b"/bytes/100", headers=headers, version=version))
            head, body, _ = yield conn.response()
            self.assertEqual((head.status, len(body)), (200, 100))
            self.assertFalse(head.keep_alive, head.raw)  # "Connection: close", or HTTP/1.0 without keep-alive
            yield within(conn.closed)

    @defer.inlineCallbacks
    def test_relaying_sockets_send_small_writes_at_once(self):
        # A response head and its body (or a request head and its body)
        # often come in separate writes. Every socket that relays them as
        # they come has TCP_NODELAY: with Nagle the second write waited for
        # the peer's delayed ACK, 40 ms per response (measured with wrk).
        yield self.serve()
        conn = yield e2e.raw_connect(self.server.port)
        self.addCleanup(conn.transport.abortConnection)
        conn.request(self.req(b"GET", b"/echo"))
        yield conn.response()
        public_port = conn.transport.getHost().port
        sockets = [s for s in reactor.getReaders() + reactor.getWriters() if isinstance(s, tcp.Connection)]
        ingress = [s for s in sockets if isinstance(s, tcp.Server) and s.getPeer().port == public_port]
        to_target = [s for s in sockets if isinstance(s, tcp.Client) and s.getPeer().port == self.target.port]
        self.assertEqual(len(ingress), 1)
        self.assertTrue(to_target)
        for s in ingress + to_target:
            self.assertTrue(s.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), s)

    @defer.inlineCallbacks
    def test_chunked_upload_50mb(self):
        yield self.serve()
        conn = yield e2e.raw_connect(self.server.port)
        self.addCleanup(conn.transport.abortConnection)
        conn.request(self.req(b"PUT", b"/upload", headers=[(b"Transfer-Encoding", b"chunked")]), b"PUT")
        upload = e2e.ChunkedUpload(conn.transport, 50 * 1024 * 1024)
        conn.transport.registerProducer(upload, False)
        digest = yield within(upload.done, 60)
        resp = yield conn.response(seconds=60)
        doc = _json(resp)
        self.assertEqual(resp[0].status, 200)
        self.assertEqual(doc["body_len"], 50 * 1024 * 1024)
        self.assertEqual(doc["body_sha256"], digest)

    @defer.inlineCallbacks
    def test_websocket_echo_through_the_tunnel(self):
        wst = yield e2e.WSTarget().start()
        self.addCleanup(wst.stop)
        yield self.serve(target_url=wst.url)
        ws = yield e2e.ws_connect(self.server.port, f"ws://{self.server.host(TID)}/ws")
        self.addCleanup(ws.transport.abortConnection)
        first = yield ws.next_message()
        self.assertEqual(first, b"ws echo connected")
        ws.sendMessage(b"\x00\x01binary" * 1000, isBinary=True)
        echoed = yield ws.next_message()
        self.assertEqual(echoed, b"\x00\x01binary" * 1000)
        ws.sendClose(1000)
        code, _ = yield within(ws.closed)
        self.assertEqual(code, 1000)

    @defer.inlineCallbacks
    def test_trusted_proxy_forwarded_for(self):
        yield self.serve()
        head, body, _ = yield self.ask(self.req(b"GET", b"/echo", headers=[
            (b"X-Forwarded-For", b"203.0.113.7"), (b"X-Forwarded-Proto", b"https")]))
        h = _headers(json.loads(body))
        self.assertEqual(h["x-forwarded-for"], ["203.0.113.7"])
        self.assertEqual(h["x-real-ip"], ["203.0.113.7"])
        self.assertEqual(h["x-forwarded-proto"], ["https"])
        self.assertTrue(h["forwarded"][0].startswith("by=_exposr;for=203.0.113.7;"))
        self.assertTrue(h["forwarded"][0].endswith(";proto=https"))


class UntrustedPeerTests(_Base):
    server_options = {"ingress_http_trusted_proxies": ()}

    @defer.inlineCallbacks
    def test_untrusted_peer_cannot_spoof(self):
        yield self.serve()
        head, body, _ = yield self.ask(self.req(b"GET", b"/echo", headers=[
            (b"X-Forwarded-For", b"203.0.113.7"), (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"evil.example"), (b"X-Real-IP", b"1.2.3.4")]))
        h = _headers(json.loads(body))
        self.assertEqual(h["x-forwarded-for"], ["127.0.0.1"])
        self.assertEqual(h["x-real-ip"], ["127.0.0.1"])
        self.assertEqual(h["x-forwarded-proto"], ["http"])
        self.assertEqual(h["x-forwarded-host"], [self.server.host(TID)])
        self.assertEqual(h["forwarded"], [f"by=_exposr;for=127.0.0.1;host={self.server.host(TID)};proto=http"])


class ErrorTests(_Base):
    server_options = {"transport_max_connections": 1}

    def assertError(self, resp, status, code):
        head, body, _ = resp
        self.assertEqual((head.status, json.loads(body)), (status, {"error": code}))
        self.assertEqual(head.get(b"content-type").split(b";")[0], b"application/json")

    @defer.inlineCallbacks
    def test_not_found(self):
        resp = yield self.ask(self.req(b"GET", b"/", tunnel_id="nope"))
        self.assertError(resp, 404, "TUNNEL_NOT_FOUND")

    @defer.inlineCallbacks
    def test_not_connected_then_disabled(self):
        api = yield e2e.make_tunnel(self.server, TID, self.target.url, http_enabled=False)
        resp = yield self.ask(self.req(b"GET", b"/"))
        self.assertError(resp, 503, "TUNNEL_NOT_CONNECTED")
        yield self.serve(api=api, http_enabled=False)
        resp = yield self.ask(self.req(b"GET", b"/"))
        self.assertError(resp, 403, "TUNNEL_HTTP_INGRESS_DISABLED")

    @defer.inlineCallbacks
    def test_loop_by_header(self):
        yield self.serve()
        resp = yield self.ask(self.req(b"GET", b"/", headers=[(b"exposr-via", b"x, " + self.server.node_id.encode())]))
        self.assertError(resp, 508, "HTTP_INGRESS_REQUEST_LOOP")
        self.assertEqual(self.target.requests, [])

    @defer.inlineCallbacks
    def test_loop_by_target_pointing_at_the_ingress(self):
        yield self.serve(target_url=f"tcp://127.0.0.1:{self.server.port}")
        resp = yield self.ask(self.req(b"GET", b"/"))
        self.assertError(resp, 508, "HTTP_INGRESS_REQUEST_LOOP")

    @defer.inlineCallbacks
    def test_channel_limit(self):
        yield self.serve()
        for conn in self.server.local_connections(TID):
            conn.mux.max_channels = 1
        first = yield e2e.raw_connect(self.server.port)
        self.addCleanup(first.transport.abortConnection)
        first.request(self.req(b"GET", b"/hang"))
        yield e2e.wait_until(lambda: self.target.hanging)
        resp = yield self.ask(self.req(b"GET", b"/echo"))
        self.assertError(resp, 429, "TUNNEL_TRANSPORT_REQUEST_LIMIT")
        self.target.hanging[0].write(b"done")
        self.target.hanging[0].finish()
        head, body, _ = yield first.response()
        self.assertEqual(body, b"done")

    @defer.inlineCallbacks
    def test_target_unreachable_is_reset(self):
        dead = yield e2e.RawTarget().start()
        url = dead.url
        yield dead.stop()
        yield self.serve(target_url=url)
        resp = yield self.ask(self.req(b"GET", b"/"))
        self.assertError(resp, 502, "TUNNEL_TARGET_CON_RESET")

    @defer.inlineCallbacks
    def test_malformed_response_is_con_failed(self):
        bad = yield e2e.RawTarget(on_data=lambda p, d: p.transport.write(b"SSH-2.0-nope\r\n\r\n")).start()
        self.addCleanup(bad.stop)
        yield self.serve(target_url=bad.url)
        resp = yield self.ask(self.req(b"GET", b"/"))
        self.assertError(resp, 502, "TUNNEL_TARGET_CON_FAILED")

    @defer.inlineCallbacks
    def test_failure_after_response_started_aborts(self):
        def half(p, d):
            p.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            reactor.callLater(0.05, p.transport.abortConnection)

        bad = yield e2e.RawTarget(on_data=half).start()
        self.addCleanup(bad.stop)
        yield self.serve(target_url=bad.url)
        conn = yield e2e.raw_connect(self.server.port)
        conn.request(self.req(b"GET", b"/"))
        yield within(conn.closed)
        self.assertEqual(conn.responses, [])
        self.assertTrue(conn.data.endswith(b"partial"), conn.data)

    @defer.inlineCallbacks
    def test_upgrade_errors_are_raw(self):
        up = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
        resp = yield self.ask(self.req(b"GET", b"/ws", tunnel_id="nope", headers=up))
        self.assertError(resp, 404, "TUNNEL_NOT_FOUND")
        yield e2e.make_tunnel(self.server, TID, "http://127.0.0.1:1")
        resp = yield self.ask(self.req(b"GET", b"/ws", headers=up))
        self.assertError(resp, 502, "TUNNEL_NOT_CONNECTED")

    @defer.inlineCallbacks
    def test_upgrade_target_unreachable(self):
        dead = yield e2e.RawTarget().start()
        url = dead.url
        yield dead.stop()
        yield self.serve(target_url=url)
        up = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
        resp = yield self.ask(self.req(b"GET", b"/ws", headers=up))
        self.assertError(resp, 502, "TUNNEL_TARGET_CON_RESET")

    @defer.inlineCallbacks
    def test_upgrade_disabled_and_loop(self):
        yield self.serve(http_enabled=False)
        up = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
        resp = yield self.ask(self.req(b"GET", b"/ws", headers=up))
        self.assertError(resp, 403, "TUNNEL_HTTP_INGRESS_DISABLED")

    @defer.inlineCallbacks
    def test_head_too_large(self):
        yield self.serve()
        big = [(b"X-Big", b"a" * 20000)]
        resp = yield self.ask(self.req(b"GET", b"/", headers=big))
        self.assertEqual(resp[0].status, 431)
        # the same on a kept-alive connection's second request
        conn = yield e2e.raw_connect(self.server.port)
        self.addCleanup(conn.transport.abortConnection)
        conn.request(self.req(b"GET", b"/echo"))
        yield conn.response()
        conn.request(self.req(b"GET", b"/", headers=big))
        resp = yield conn.response()
        self.assertEqual(resp[0].status, 431)
        yield within(conn.closed)

    @defer.inlineCallbacks
    def test_slow_headers_are_cut(self):
        self.server.door.first_head_timeout = 0.3
        self.server.ingress.head_timeout = 0.3
        yield self.serve()
        conn = yield e2e.raw_connect(self.server.port)
        conn.transport.write(b"GET / HTTP/1.1\r\nHost: " + self.server.host(TID).encode() + b"\r\n")
        yield within(conn.closed, 5)
        # and on a kept-alive connection, after one request
        conn = yield e2e.raw_connect(self.server.port)
        conn.request(self.req(b"GET", b"/echo"))
        yield conn.response()
        conn.transport.write(b"GET / HTTP/1.1\r\nX-Slow: 1\r\n")
        yield within(conn.closed, 5)
        self.assertIn(b" 408 ", conn.data)


class ClientLifecycleTests(_Base):
    server_options = {"transport_max_connections": 1}

    @defer.inlineCallbacks
    def test_ping_timeout_then_reconnect(self):
        clock = task.Clock()
        self.server.ws.clock = clock
        connector = yield self.serve()
        resp = yield self.ask(self.req(b"GET", b"/echo"))
        self.assertEqual(resp[0].status, 200)
        # the client stops answering (its socket is not read any more)
        ws = connector.connections[0]
        ws.transport.pauseProducing()
        for _ in range(3):
            clock.advance(10)
        yield e2e.wait_until(lambda: not self.server.service.registry.is_connected(TID))
        resp = yield self.ask(self.req(b"GET", b"/echo"))
        self.assertEqual(resp[0].status, 503)
        ws.transport.resumeProducing()
        yield e2e.wait_until(lambda: self.server.service.registry.is_connected(TID), 15)
        resp = yield self.ask(self.req(b"GET", b"/echo"))
        self.assertEqual(resp[0].status, 200)

    @defer.inlineCallbacks
    def test_server_side_disconnect_closes_the_websocket(self):
        connector = yield self.serve()
        ws = connector.connections[0]
        yield self.server.service.tunnels.disconnect(TID)
        yield within(ws.closed)
        # (the client's slot consumes the `closed` result: read the frame's code)
        self.assertEqual(ws.remoteCloseCode, 1000)
        # the client reconnects with a fresh token and serves again
        yield e2e.wait_until(lambda: self.server.service.registry.is_connected(TID), 15)
        resp = yield self.ask(self.req(b"GET", b"/echo"))
        self.assertEqual(resp[0].status, 200)


class WSEndpointTests(_Base):
    server_options = {"transport_max_connections": 1}

    @staticmethod
    def token(info):
        return info["transport"]["ws"]["url"].rsplit("?t=", 1)[1]

    def endpoint(self, token, tunnel_id=TID):
        return f"ws://127.0.0.1:{self.server.port}/v1/tunnel/{tunnel_id}/ws-endpoint?t={token}"

    @defer.inlineCallbacks
    def test_wrong_token_is_401_json(self):
        yield e2e.make_tunnel(self.server, TID, self.target.url)
        conn = yield e2e.raw_connect(self.server.port)
        conn.request(e2e.request(b"GET", b"/v1/tunnel/my-tunnel/ws-endpoint?t=wrong", f"127.0.0.1:{self.server.port}",
                                 headers=[(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"),
                                          (b"Sec-WebSocket-Version", b"13"),
                                          (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ==")]))
        head, body, _ = yield conn.response()
        self.assertEqual(head.status, 401)
        self.assertEqual(json.loads(body), {"error": "PERMISSION_DENIED"})

    @defer.inlineCallbacks
    def test_reused_token_and_limit(self):
        api = yield e2e.make_tunnel(self.server, TID, self.target.url)
        info = yield api.read_tunnel(TID)
        token = self.token(info)
        ws = yield e2e.ws_connect(self.server.port, self.endpoint(token))
        self.addCleanup(ws.transport.abortConnection)
        yield within(ws.opened)
        yield e2e.wait_until(lambda: self.server.service.registry.is_connected(TID))
        # the token rotated: the same one is refused
        conn = yield e2e.raw_connect(self.server.port)
        conn.request(e2e.request(b"GET", f"/v1/tunnel/{TID}/ws-endpoint?t={token}".encode(),
                                 f"127.0.0.1:{self.server.port}",
                                 headers=[(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"),
                                          (b"Sec-WebSocket-Version", b"13"),
                                          (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ==")]))
        head, body, _ = yield conn.response()
        self.assertEqual(head.status, 401)
        # a fresh token, but the limit (1) is reached: 1008
        info = yield api.read_tunnel(TID)
        ws2 = yield e2e.ws_connect(self.server.port, self.endpoint(self.token(info)))
        self.addCleanup(ws2.transport.abortConnection)
        yield within(ws2.opened)
        code, reason = yield within(ws2.closed)
        self.assertEqual(code, 1008)
        self.assertEqual(reason, "unable to establish tunnel")


class ProcessTests(unittest.TestCase):
    """`exposrd` and `exposr` as subprocesses: memory is the server's alone."""

    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        self.target = yield e2e.HTTPTarget().start()
        self.addCleanup(self.target.stop)
        self.server, self.port = yield e2e.exposrd_process()
        self.addCleanup(self.server.kill, "TERM")
        self.url = f"http://127.0.0.1:{self.port}/"
        self.client = yield self.start_client()

    @defer.inlineCallbacks
    def start_client(self, account=None):
        argv = ["-a", account] if account else []
        client = e2e.spawn("-c", "from exposr.client.cli import main; main()", "-s", self.url, *argv,
                           "tunnel", "connect", TID, self.target.url)
        self.addCleanup(client.kill, "TERM")
        yield client.wait_for(rb"Ingress HTTP", 20)
        return client

    def req(self, target):
        return e2e.request(b"GET", target, f"{TID}.localhost:{self.port}")

    @defer.inlineCallbacks
    def ask(self, target):
        conn = yield e2e.raw_connect(self.port)
        self.addCleanup(conn.transport.abortConnection)
        conn.request(self.req(target))
        resp = yield conn.response()
        return resp

    def hwm_kb(self):
        with open(f"/proc/{self.server.pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])

    @defer.inlineCallbacks
    def test_1gb_download_server_memory(self):
        resp = yield self.ask(b"/bytes/1000000")  # warm up the pool and the code paths
        self.assertEqual(resp[0].status, 200)
        before = e2e.rss_kb(self.server.pid)
        size = 1000 * 1000 * 1000
        conn = yield e2e.raw_connect(self.port, keep_body=False)
        self.addCleanup(conn.transport.abortConnection)
        conn.request(self.req(b"/bytes/%d" % size))
        head, got, _ = yield conn.response(seconds=75)
        self.assertEqual((head.status, got), (200, size))
        growth = self.hwm_kb() - before
        self.assertLess(growth, 50 * 1024, f"server RSS grew by {growth} kB")

    @defer.inlineCallbacks
    def test_slow_reader_does_not_grow_the_server(self):
        yield self.ask(b"/bytes/1000000")
        before = e2e.rss_kb(self.server.pid)
        size = 300 * 1000 * 1000
        conn = yield e2e.raw_connect(self.port, keep_body=False)
        self.addCleanup(conn.transport.abortConnection)
        conn.request(self.req(b"/bytes/%d" % size))
        yield e2e.wait_until(lambda: conn.body_bytes > 1000000)
        conn.transport.pauseProducing()  # the public client stops reading
        # the stall propagates to the target, which stays stopped
        stalled = {"since": None, "sent": None}

        def stopped_for_a_while():
            if not self.target.producer_paused or stalled["sent"] != self.target.sent:
                stalled.update(since=reactor.seconds(), sent=self.target.sent)
                return False
            return reactor.seconds() - stalled["since"] > 0.5

        yield e2e.wait_until(stopped_for_a_while, 20, 0.05)
        in_flight = self.target.sent - conn.body_bytes
        self.assertLess(in_flight, 32 * 1024 * 1024, "bytes buffered between target and client")
        growth = self.hwm_kb() - before
        self.assertLess(growth, 30 * 1024, f"server RSS grew by {growth} kB")
        conn.transport.resumeProducing()
        head, got, _ = yield conn.response(seconds=60)
        self.assertEqual(got, size)

    @defer.inlineCallbacks
    def test_killed_client_then_reconnect(self):
        resp = yield self.ask(b"/echo")
        self.assertEqual(resp[0].status, 200)
        account = re.search(rb"Created account (\S+)", self.client.output).group(1).decode()
        yield self.client.kill("KILL")
        # the WebSocket's socket closed: 503 at once (no ping timeout needed)
        resp = yield self.ask(b"/echo")
        self.assertEqual((resp[0].status, json.loads(resp[1])), (503, {"error": "TUNNEL_NOT_CONNECTED"}))
        yield self.start_client(account)
        resp = yield self.ask(b"/echo")
        self.assertEqual(resp[0].status, 200)


class HostileInputTests(_Base):
    """Bad input is answered or cut, never an exception or an error-level log line."""

    @defer.inlineCallbacks
    def test_garbage_heads(self):
        yield self.serve()
        host = self.server.host(TID).encode()
        cases = [
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",  # no Host
            b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nBad Header\r\n\r\n",
            b"GET / HTTP/9.9\r\nHost: " + host + b"\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nContent-Length: 1, 2\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
            b"POST /echo HTTP/1.1\r\nHost: " + host + b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"GET /echo HTTP/1.1\r\nHost: " + host + b"\r\n\r\n\x00\x01\x02garbage\r\n\r\n",
        ]
        for data in cases:
            conn = yield e2e.raw_connect(self.server.port)
            conn.transport.write(data)
            yield within(conn.closed, 10)
            self.assertTrue(conn.data.startswith(b"HTTP/1.1 "), (data[:60], conn.data[:100]))
        # still serving
        resp = yield self.ask(self.req(b"GET", b"/echo"))
        self.assertEqual(resp[0].status, 200)

    @defer.inlineCallbacks
    def test_clients_that_go_away(self):
        yield self.serve()
        # mid-upload
        conn = yield e2e.raw_connect(self.server.port)
        conn.transport.write(self.req(b"POST", b"/echo", headers=[(b"Content-Length", b"1000000")]) + b"x" * 1000)
        yield e2e.wait_until(lambda: self.server.ingress.pools)
        conn.transport.abortConnection()
        # while the target is still answering
        conn = yield e2e.raw_connect(self.server.port)
        conn.request(self.req(b"GET", b"/hang"))
        yield e2e.wait_until(lambda: self.target.hanging)
        conn.transport.abortConnection()
        yield within(conn.closed)
        # mid-download
        conn = yield e2e.raw_connect(self.server.port, keep_body=False)
        conn.request(self.req(b"GET", b"/bytes/50000000"))
        yield e2e.wait_until(lambda: conn.body_bytes > 100000)
        conn.transport.abortConnection()
        for _ in range(3):
            resp = yield self.ask(self.req(b"GET", b"/echo"))
            self.assertEqual(resp[0].status, 200)

    @defer.inlineCallbacks
    def test_bodyless_responses_and_http10(self):
        yield self.serve()
        conn = yield e2e.raw_connect(self.server.port)
        self.addCleanup(conn.transport.abortConnection)
        conn.request(self.req(b"HEAD", b"/bytes/1000"), b"HEAD")
        head, body, _ = yield conn.response()
        self.assertEqual((head.status, head.get(b"content-length"), body), (200, b"1000", b""))
        conn.request(self.req(b"GET", b"/echo"))
        resp = yield conn.response()
        self.assertEqual(resp[0].status, 200)
        conn = yield e2e.raw_connect(self.server.port)
        conn.request(self.req(b"GET", b"/echo", version=b"HTTP/1.0"))
        resp = yield conn.response()
        self.assertEqual(resp[0].status, 200)
        yield within(conn.closed)

    @defer.inlineCallbacks
    def test_unsolicited_upstream_bytes(self):
        def answer(p, d):
            p.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")

        bad = yield e2e.RawTarget(on_data=answer).start()
        self.addCleanup(bad.stop)
        yield self.serve(target_url=bad.url)
        for _ in range(3):
            head, body, _ = yield self.ask(self.req(b"GET", b"/"))
            self.assertEqual((head.status, body), (200, b"ok"))
