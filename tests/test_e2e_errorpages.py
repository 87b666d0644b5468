"""HTML error pages for browsers, JSON for everyone else, through a real tunnel."""

import json

from twisted.internet import defer
from twisted.trial import unittest

from tests import e2e_support as e2e
from tests.test_e2e_http import TID, _Base
from exposr.ingress import errorpage
from exposr.ingress.http import json_response

BROWSER = (b"Accept", b"text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8")


def _prefers(*values):
    return errorpage.prefers_html([(b"Accept", v) for v in values])


class PrefersHTMLTests(unittest.TestCase):
    def test_browsers_get_html(self):
        self.assertTrue(_prefers(BROWSER[1]))
        self.assertTrue(_prefers(b"text/html"))
        self.assertTrue(_prefers(b"text/html, */*"))
        self.assertTrue(_prefers(b"*/*;q=0.5, text/html"))
        self.assertTrue(_prefers(b"application/json;q=0.5, TEXT/HTML"))
        self.assertTrue(_prefers(b"application/json", b"text/html"))  # a tie: not lower

    def test_everyone_else_gets_json(self):
        self.assertFalse(errorpage.prefers_html([]))
        self.assertFalse(_prefers(b"*/*"))
        self.assertFalse(_prefers(b"application/json"))
        self.assertFalse(_prefers(b"application/json, text/html;q=0.9"))
        self.assertFalse(_prefers(b"text/html;q=0.5, */*"))
        self.assertFalse(_prefers(b"text/html;q=0"))
        self.assertFalse(_prefers(b"text/html;q=bogus"))
        self.assertFalse(_prefers(b"text/plain"))

    def test_page_escapes_and_names_the_tunnel(self):
        page = errorpage.html_page(503, "TUNNEL_NOT_CONNECTED", "a<b")
        self.assertIn(b"not connected", page)
        self.assertIn(b"a&lt;b", page)
        self.assertNotIn(b"a<b", page)
        self.assertIn(b"Error", errorpage.html_page(500, "SOMETHING_ELSE"))


class ErrorPageTests(_Base):
    server_options = {"transport_max_connections": 1}

    def assertHTML(self, resp, status, phrase):
        head, body, _ = resp
        self.assertEqual(head.status, status)
        self.assertEqual(head.get(b"content-type"), b"text/html; charset=utf-8")
        self.assertEqual(int(head.get(b"content-length")), len(body))
        self.assertTrue(body.startswith(b"<!DOCTYPE html>"), body)
        self.assertIn(phrase, body)

    @defer.inlineCallbacks
    def test_not_found_html_for_a_browser_json_byte_for_byte_otherwise(self):
        resp = yield self.ask(self.req(b"GET", b"/", tunnel_id="nope", headers=[BROWSER]))
        self.assertHTML(resp, 404, b"No such tunnel")
        self.assertIn(b"<code>nope</code>", resp[1])
        for headers in ([], [(b"Accept", b"*/*")], [(b"Accept", b"application/json")]):
            conn = yield e2e.raw_connect(self.server.port)
            self.addCleanup(conn.transport.abortConnection)
            conn.request(self.req(b"GET", b"/", tunnel_id="nope", headers=headers))
            yield conn.response()
            self.assertEqual(conn.data, json_response(404, {"error": "TUNNEL_NOT_FOUND"}))

    @defer.inlineCallbacks
    def test_not_connected_and_disabled(self):
        api = yield e2e.make_tunnel(self.server, TID, self.target.url, http_enabled=False)
        resp = yield self.ask(self.req(b"GET", b"/", headers=[BROWSER]))
        self.assertHTML(resp, 503, b"client is not connected")
        self.assertIn(b"exposr tunnel connect my-tunnel", resp[1])
        yield self.serve(api=api, http_enabled=False)
        resp = yield self.ask(self.req(b"GET", b"/", headers=[BROWSER]))
        self.assertHTML(resp, 403, b"HTTP ingress is not enabled")

    @defer.inlineCallbacks
    def test_target_down_and_keep_alive_continues(self):
        dead = yield e2e.RawTarget().start()
        url = dead.url
        yield dead.stop()
        yield self.serve(target_url=url)
        resp = yield self.ask(self.req(b"GET", b"/", headers=[BROWSER]))
        self.assertHTML(resp, 502, b"connection to the tunnel's target was lost")
        # a refusal keeps a kept-alive connection open, HTML or not
        conn = yield e2e.raw_connect(self.server.port)
        self.addCleanup(conn.transport.abortConnection)
        conn.request(self.req(b"GET", b"/", tunnel_id="nope", headers=[BROWSER]))
        first = yield conn.response()
        conn.request(self.req(b"GET", b"/", tunnel_id="nope"))
        second = yield conn.response()
        self.assertHTML(first, 404, b"No such tunnel")
        self.assertEqual(json.loads(second[1]), {"error": "TUNNEL_NOT_FOUND"})

    @defer.inlineCallbacks
    def test_upgrades_keep_json(self):
        up = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"), BROWSER]
        resp = yield self.ask(self.req(b"GET", b"/ws", tunnel_id="nope", headers=up))
        self.assertEqual((resp[0].status, json.loads(resp[1])), (404, {"error": "TUNNEL_NOT_FOUND"}))

    @defer.inlineCallbacks
    def test_target_answers_are_untouched(self):
        yield self.serve()
        head, body, _ = yield self.ask(self.req(b"GET", b"/echo", headers=[BROWSER]))
        self.assertEqual(head.status, 200)
        self.assertEqual(json.loads(body)["path"], "/echo")
