"""The client's request inspector: capture through a real tunnel, JSON API, truncation, replay."""

import base64
import io
import json
import socket

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from exposr.client import cli, inspector
from tests.e2e_support import HTTPTarget, Server, within


@defer.inlineCallbacks
def fetch(url, method=b"GET", body=None, headers=None):
    producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
    response = yield Agent(reactor).request(method, url.encode(), Headers(headers or {}),
                                            producer)
    data = yield readBody(response)
    return response.code, data


class InspectorTestBase(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.server = yield Server(transport_max_connections=1).start()
        self.addCleanup(self.server.stop)
        self.target = yield HTTPTarget().start()
        self.addCleanup(self.target.stop)

    @defer.inlineCallbacks
    def connect(self, *flags, tunnel_id="insp-tunnel"):
        out, err = io.StringIO(), io.StringIO()
        c = cli.Cli(reactor, out, err, environ={})
        done = within(c.run(["-s", self.server.url, "tunnel", "connect", *flags, tunnel_id,
                             self.target.url]), 60)

        @defer.inlineCallbacks
        def stop():
            yield within(c.shutdown(), 10)
            yield done

        self.addCleanup(stop)
        yield within(c.connected)
        return c

    def through(self, path, method=b"GET", body=None, tunnel_id="insp-tunnel"):
        return within(fetch(f"http://127.0.0.1:{self.server.port}{path}", method, body,
                            {"Host": [self.server.host(tunnel_id)]}))

    def api(self, c, path, method=b"GET", body=None):
        return within(fetch(c.inspector_url.rstrip("/") + path, method, body))

    @defer.inlineCallbacks
    def api_json(self, c, path, method=b"GET", body=None):
        code, data = yield self.api(c, path, method, body)
        return code, json.loads(data)


class InspectorApiTests(InspectorTestBase):
    @defer.inlineCallbacks
    def test_capture_list_detail_and_replay(self):
        c = yield self.connect("--http-mode", "--inspect", "127.0.0.1:0")
        self.assertRegex(c.out.getvalue(), r"(?m)^Inspector: http://127\.0\.0\.1:\d+/$")
        code, _ = yield self.through("/first?x=1")
        self.assertEqual(code, 200)
        code, _ = yield self.through("/form", b"POST", b'{"name": "demo"}')
        self.assertEqual(code, 200)

        code, listing = yield self.api_json(c, "/api/requests")
        self.assertEqual(code, 200)
        self.assertEqual([(r["method"], r["path"], r["status"]) for r in listing],
                         [("POST", "/form", 200), ("GET", "/first?x=1", 200)])
        post_id = listing[0]["id"]
        code, post = yield self.api_json(c, f"/api/requests/{post_id}")
        self.assertEqual(code, 200)
        self.assertEqual(post["request"]["start"], "POST /form HTTP/1.1")
        headers = dict((n.lower(), v) for n, v in post["request"]["headers"])
        self.assertEqual(headers["host"], f"127.0.0.1:{self.target.port}")  # as sent to the target
        self.assertEqual(post["request"]["body"],
                         {"size": 16, "truncated": False, "binary": False,
                          "text": '{"name": "demo"}'})
        self.assertEqual(post["response"]["start"], "HTTP/1.1 200 OK")
        answer = json.loads(post["response"]["body"]["text"])
        self.assertEqual((answer["path"], answer["body_len"]), ("/form", 16))
        self.assertTrue(post["done"])

        # replay as captured, then with an edited body
        before = len(self.target.requests)
        code, new = yield self.api_json(c, f"/api/requests/{post_id}/replay", b"POST", b"")
        self.assertEqual(code, 200)
        self.assertEqual((new["method"], new["path"], new["status"], new["replay_of"]),
                         ("POST", "/form", 200, post_id))
        code, new2 = yield self.api_json(c, f"/api/requests/{post_id}/replay", b"POST",
                                         json.dumps({"body": "edited!"}).encode())
        self.assertEqual(code, 200)
        self.assertEqual(len(self.target.requests), before + 2)
        self.assertEqual([r.uri for r in self.target.requests[-2:]], [b"/form", b"/form"])
        code, replayed = yield self.api_json(c, f"/api/requests/{new2['id']}")
        self.assertEqual(json.loads(replayed["response"]["body"]["text"])["body_len"], 7)
        code, listing = yield self.api_json(c, "/api/requests")
        self.assertEqual([r["id"] for r in listing[:2]], [new2["id"], new["id"]])

        code, _ = yield self.api(c, "/api/requests/9999")
        self.assertEqual(code, 404)
        code, err = yield self.api_json(c, f"/api/requests/{post_id}/replay", b"POST", b"[1]")
        self.assertEqual(code, 400)

    @defer.inlineCallbacks
    def test_large_and_binary_bodies_are_truncated_and_flagged(self):
        c = yield self.connect("--http-mode", "--inspect", "127.0.0.1:0")
        size = inspector.BODY_LIMIT + 5000
        code, data = yield self.through(f"/bytes/{size}")
        self.assertEqual((code, len(data)), (200, size))  # the tunnel passes it all
        _, listing = yield self.api_json(c, "/api/requests")
        _, detail = yield self.api_json(c, f"/api/requests/{listing[0]['id']}")
        body = detail["response"]["body"]
        self.assertEqual((body["size"], body["truncated"], body["binary"]), (size, True, True))
        self.assertEqual(base64.b64decode(body["base64"]), data[:inspector.BODY_LIMIT])

        big = b"a" * (inspector.BODY_LIMIT + 1)
        code, _ = yield self.through("/upload", b"POST", big)
        _, listing = yield self.api_json(c, "/api/requests")
        _, detail = yield self.api_json(c, f"/api/requests/{listing[0]['id']}")
        self.assertEqual((detail["request"]["body"]["size"],
                          detail["request"]["body"]["truncated"],
                          len(detail["request"]["body"]["text"])),
                         (len(big), True, inspector.BODY_LIMIT))
        # a truncated body is not replayed as if it were whole
        code, err = yield self.api_json(c, f"/api/requests/{listing[0]['id']}/replay", b"POST")
        self.assertEqual(code, 400)
        self.assertIn("truncated", err["error"])

    @defer.inlineCallbacks
    def test_only_the_last_requests_are_kept(self):
        c = yield self.connect("--http-mode", "--inspect", "127.0.0.1:0")
        c.connector.capture.limit = 3
        for n in range(5):
            yield self.through(f"/n/{n}")
        _, listing = yield self.api_json(c, "/api/requests")
        self.assertEqual([r["path"] for r in listing], ["/n/4", "/n/3", "/n/2"])

    @defer.inlineCallbacks
    def test_busy_port_is_reported_and_the_tunnel_still_works(self):
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        c = yield self.connect("--http-mode", "--inspect", f"127.0.0.1:{port}")
        self.assertIn(f"Inspector not started: cannot listen on 127.0.0.1:{port}",
                      c.out.getvalue())
        self.assertIsNone(c.connector.capture)
        code, _ = yield self.through("/still")
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_off_without_http_mode_or_with_no_inspect(self):
        c = yield self.connect("--inspect", "127.0.0.1:0")
        self.assertIsNone(c.inspector_port)
        self.assertNotIn("Inspector", c.out.getvalue())
        yield within(c.shutdown(), 10)
        c = yield self.connect("--http-mode", "--no-inspect", tunnel_id="insp-two")
        self.assertIsNone(c.inspector_port)
        self.assertIsNone(c.connector.capture)
        code, _ = yield self.through("/plain", tunnel_id="insp-two")
        self.assertEqual(code, 200)


class CaptureUnitTests(unittest.TestCase):
    def test_chunked_bodies_are_shown_without_framing(self):
        from twisted.internet.task import Clock

        from exposr.client import httpmode
        capture = inspector.Capture(Clock())
        rules = httpmode.HeaderRules("http://127.0.0.1:1")
        rewriter, watcher = capture.taps(rules)
        rewriter.feed(b"PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        watcher.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
        ex = capture.exchanges[1]
        detail = ex.detail()
        self.assertEqual(detail["request"]["body"]["text"], "abcde")
        self.assertEqual((detail["status"], detail["done"]), (204, True))
