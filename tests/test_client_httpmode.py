"""The client's HTTP mode: header rewriting toward the target, sans I/O and over real sockets."""

import io
import json

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from exposr.client import cli, httpmode
from tests.test_client import ACCOUNT, _Base
from tests.test_client_fakes import within

TARGET = "http://127.0.0.1:8080"


def rewriter(target=TARGET, **kw):
    seen = []
    r = httpmode.RequestRewriter(httpmode.HeaderRules(target, **kw),
                                 lambda m, p: seen.append((m, p)))
    return r, seen


def feed_bytewise(r, data):
    return b"".join(r.feed(data[i:i + 1]) for i in range(len(data)))


class HeaderRulesTests(unittest.TestCase):
    def test_default_rewrites_host_origin_referer(self):
        r, seen = rewriter()
        out = r.feed(b"GET /a?b=1 HTTP/1.1\r\nHost: demo.example.com\r\n"
                     b"Origin: https://demo.example.com\r\n"
                     b"Referer: https://demo.example.com/page?x=1#f\r\n"
                     b"X-Other: https://demo.example.com/\r\n\r\n")
        self.assertEqual(out, b"GET /a?b=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                              b"Origin: http://127.0.0.1:8080\r\n"
                              b"Referer: http://127.0.0.1:8080/page?x=1#f\r\n"
                              b"X-Other: https://demo.example.com/\r\n\r\n")
        self.assertEqual(seen, [("GET", "/a?b=1")])

    def test_default_port_is_left_out(self):
        r, _ = rewriter("https://api.internal:443/")
        self.assertIn(b"Host: api.internal\r\n",
                      r.feed(b"GET / HTTP/1.1\r\nHost: x.example.com\r\n\r\n"))

    def test_replace_and_chosen_rewrites(self):
        replace = httpmode.parse_replace(["X-Env: staging", "host:fixed.local"])
        r, _ = rewriter(rewrite=httpmode.parse_rewrite(["origin,x-forwarded-url"]),
                        replace=replace)
        out = r.feed(b"POST / HTTP/1.1\r\nHost: demo.example.com\r\nx-env: prod\r\n"
                     b"Referer: https://demo.example.com/r\r\n"
                     b"X-Forwarded-Url: https://demo.example.com/p\r\n"
                     b"Content-Length: 0\r\n\r\n")
        self.assertEqual(out, b"POST / HTTP/1.1\r\nReferer: https://demo.example.com/r\r\n"
                              b"X-Forwarded-Url: http://127.0.0.1:8080/p\r\n"
                              b"Content-Length: 0\r\nX-Env: staging\r\nhost: fixed.local\r\n\r\n")

    def test_bad_replacement(self):
        for bad in ("NoColon", ":value", "Bad Name:v"):
            self.assertRaises(ValueError, httpmode.parse_replace, [bad])

    def test_only_http_targets(self):
        self.assertRaises(ValueError, httpmode.HeaderRules, "tcp://127.0.0.1:22")


class StreamTests(unittest.TestCase):
    def test_pipelined_bodies_pass_through_any_split(self):
        stream = (b"POST /one HTTP/1.1\r\nHost: h\r\nContent-Length: 17\r\n\r\n"
                  b"GET /x HTTP/1.1\r\n"  # 17 body bytes that look like a request
                  b"PUT /two HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5;ext=1\r\nHost:\r\n0\r\nTrailer: t\r\n\r\n"
                  b"GET /three HTTP/1.1\r\nHost: h\r\n\r\n")
        expected = stream.replace(b"Host: h\r\n", b"Host: 127.0.0.1:8080\r\n")
        r, seen = rewriter()
        self.assertEqual(r.feed(stream), expected)
        self.assertEqual(seen, [("POST", "/one"), ("PUT", "/two"), ("GET", "/three")])
        r, seen = rewriter()
        self.assertEqual(feed_bytewise(r, stream), expected)
        self.assertEqual(len(seen), 3)

    def test_upgrade_goes_raw(self):
        r, seen = rewriter()
        out = r.feed(b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n\x81\x05hello GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertTrue(out.endswith(b"\x81\x05hello GET / HTTP/1.1\r\nHost: h\r\n\r\n"))
        self.assertEqual(seen, [("GET", "/ws")])

    def test_garbage_and_huge_heads_are_refused(self):
        r, _ = rewriter()
        self.assertRaises(httpmode.HttpModeError, r.feed, b"SSH-2.0-OpenSSH\r\n\r\n")
        r, _ = rewriter()
        self.assertRaises(httpmode.HttpModeError, r.feed,
                          b"GET / HTTP/1.1\r\nX: " + b"a" * httpmode.MAX_HEAD)
        r, _ = rewriter()
        self.assertRaises(httpmode.HttpModeError, r.feed,
                          b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")

    def test_response_watcher(self):
        seen = []
        w = httpmode.ResponseWatcher(seen.append)
        for m in ("GET", "HEAD", "GET", "GET", "GET"):
            w.request(m)
        stream = (b"HTTP/1.1 100 Continue\r\n\r\n"
                  b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nHTTP/1.1 500 Nope\r\n\r\n"
                  b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"  # HEAD: no body
                  b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n0\r\n\r\n"
                  b"HTTP/1.1 204 No Content\r\n\r\n"
                  b"HTTP/1.0 200 OK\r\n\r\nuntil close HTTP/1.1 500 x\r\n\r\n")
        for i in range(len(stream)):
            w.feed(stream[i:i + 1])
        self.assertEqual(seen, [200, 200, 404, 204, 200])


class CliValidationTests(_Base):
    @defer.inlineCallbacks
    def test_tcp_target_without_port_is_refused_before_any_call(self):
        code, out, err = yield self.run_cli("-a", ACCOUNT, "tunnel", "connect", "t1",
                                            "tcp://localhost")
        self.assertEqual(code, 1)
        self.assertIn("needs a host and a port", err)
        self.assertEqual(self.api.requests, [])

    @defer.inlineCallbacks
    def test_http_options_are_checked_before_any_call(self):
        for argv, text in (
                (["-H", "X-A:b", "t1", "http://127.0.0.1:1"], "need --http-mode"),
                (["--http-mode", "-H", "nocolon", "t1", "http://127.0.0.1:1"], "NAME:VALUE"),
                (["--http-mode", "t1", "tcp://127.0.0.1:22"], "--http-mode needs an http")):
            code, out, err = yield self.run_cli("-a", ACCOUNT, "tunnel", "connect", *argv)
            self.assertEqual(code, 1)
            self.assertIn(text, err)
        self.assertEqual(self.api.requests, [])


class _Echo(resource.Resource):
    isLeaf = True

    def render(self, request):
        request.setHeader(b"content-type", b"application/json")
        headers = {k.decode().lower(): [v.decode() for v in vs]
                   for k, vs in request.requestHeaders.getAllRawHeaders()}
        return json.dumps({"path": request.uri.decode(), "headers": headers}).encode()


class HttpModeE2ETests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        from exposr.config import Config
        from exposr.server import ExposrService

        config = Config(api_port=0, ingress_http_port=0, admin_port=0, admin_api_port=0,
                        ingress_http_url="http://localhost.test", allow_registration=True,
                        transport_max_connections=1)
        self.service = ExposrService(config, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        yield within(self.service.when_started())
        self.port = self.service.listeners["api"].port.getHost().port
        self.server_url = f"http://127.0.0.1:{self.port}/"
        target = reactor.listenTCP(0, server.Site(_Echo()), interface="127.0.0.1")
        self.addCleanup(target.stopListening)
        self.target_host = f"127.0.0.1:{target.getHost().port}"

    @defer.inlineCallbacks
    def through(self, tunnel_id, path, headers):
        response = yield Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{self.port}{path}".encode(),
            Headers({"Host": [f"{tunnel_id}.localhost.test"], **headers}))
        body = yield readBody(response)
        return response.code, json.loads(body)

    @defer.inlineCallbacks
    def connect(self, *flags):
        out, err = io.StringIO(), io.StringIO()
        c = cli.Cli(reactor, out, err, environ={})
        done = within(c.run(["-s", self.server_url, "tunnel", "connect", *flags, "web-tunnel",
                             f"http://{self.target_host}"]), 20)
        yield within(c.connected)
        return c, done

    @defer.inlineCallbacks
    def test_requests_are_rewritten_and_reported(self):
        c, done = yield self.connect("--http-mode", "-H", "X-Added: yes",
                                     "-H", "Authorization:Bearer local")
        origin = "http://web-tunnel.localhost.test"
        for n in range(2):  # two requests on one kept-alive channel or two channels
            code, seen = yield within(self.through("web-tunnel", f"/page/{n}?q=1", {
                "Origin": [origin], "Referer": [origin + "/from?x=y"],
                "Authorization": ["Bearer public"]}))
            self.assertEqual(code, 200)
            h = seen["headers"]
            self.assertEqual(seen["path"], f"/page/{n}?q=1")
            self.assertEqual(h["host"], [self.target_host])
            self.assertEqual(h["origin"], [f"http://{self.target_host}"])
            self.assertEqual(h["referer"], [f"http://{self.target_host}/from?x=y"])
            self.assertEqual(h["x-added"], ["yes"])
            self.assertEqual(h["authorization"], ["Bearer local"])
        yield within(c.shutdown(), 10)
        code = yield done
        self.assertEqual((code, c.err.getvalue()), (0, ""))
        requests = [line for line in c.out.getvalue().splitlines() if "GET /page/" in line]
        self.assertEqual(len(requests), 2)
        self.assertRegex(requests[0], r"^\[\d\d:\d\d:\d\d\] GET /page/0\?q=1 200 \d+ ms$")

    @defer.inlineCallbacks
    def test_without_http_mode_headers_pass_unchanged(self):
        c, done = yield self.connect()
        code, seen = yield within(self.through("web-tunnel", "/p", {"X-Kept": ["as sent"]}))
        self.assertEqual((code, seen["headers"]["x-kept"]), (200, ["as sent"]))
        self.assertNotIn("GET /p", c.out.getvalue())  # requests are seen in HTTP mode only
        yield within(c.shutdown(), 10)
        yield done
