"""HTTP basic auth per tunnel (``access.http_auth``), through a real tunnel."""

import base64
import json

import bcrypt
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from exposr import httpauth
from exposr.client.rest import ApiError
from exposr.ratelimit import FailureLimiter
from tests import e2e_support as e2e
from tests.e2e_support import within
from tests.test_api_admin import AdminAPITestCase
from tests.test_e2e_errorpages import BROWSER
from tests.test_e2e_http import TID, _Base, _headers


def basic(user, password):
    return (b"Authorization", b"Basic " + base64.b64encode(f"{user}:{password}".encode()))


RIGHT = basic("alice", "s3cret pass")
WRONG = basic("alice", "guess")


class CredentialsTests(unittest.TestCase):
    def test_parse(self):
        self.assertEqual(httpauth.credentials(RIGHT[1]), ("alice", "s3cret pass"))
        self.assertEqual(httpauth.credentials(b"basic " + base64.b64encode(b"u:p:q")), ("u", "p:q"))
        for bad in (b"Bearer x", b"Basic !!!", b"Basic " + base64.b64encode(b"nocolon"),
                    b"Basic " + base64.b64encode(b"\xff:x"), b""):
            self.assertIsNone(httpauth.credentials(bad), bad)

    def test_malformed_stored_hash_lets_no_one_in(self):
        auth = httpauth.Authorizer(task.Clock())  # no thread pool: verified synchronously
        self.assertEqual(self.successResultOf(auth.check({"user": "alice", "hash": "nope"}, RIGHT[1], "x")),
                         httpauth.WRONG)
        self.assertEqual(auth.check({"user": "alice"}, RIGHT[1], "x"), httpauth.WRONG)


class BasicAuthTests(_Base):
    server_options = {"transport_max_connections": 1, "ingress_http_trusted_proxies": ()}

    @defer.inlineCallbacks
    def protect(self):
        connector = yield self.serve()
        info = yield within(connector.api.patch_tunnel(
            TID, {"access": {"http_auth": {"user": "alice", "password": "s3cret pass"}}}))
        self.assertEqual(info["access"], {"http_auth": {"user": "alice"}})
        return connector.api

    def assertChallenge(self, resp, code):
        head, body, _ = resp
        self.assertEqual((head.status, json.loads(body)), (401, {"error": code}))
        self.assertEqual(head.get(b"www-authenticate"), b'Basic realm="my-tunnel", charset="UTF-8"')

    @defer.inlineCallbacks
    def test_none_wrong_right_and_the_header_stripped(self):
        api = yield self.protect()
        stored = yield self.server.service.tunnels.get(TID)
        hashed = stored["access"]["http_auth"]["hash"]
        self.assertTrue(hashed.startswith("$2b$"))
        self.assertNotIn("s3cret", json.dumps(stored))
        info = yield within(api.get_tunnel(TID))
        self.assertEqual(info["access"], {"http_auth": {"user": "alice"}})

        self.assertChallenge((yield self.ask(self.req(b"GET", b"/echo"))), "TUNNEL_HTTP_AUTH_REQUIRED")
        self.assertChallenge((yield self.ask(self.req(b"GET", b"/echo", headers=[WRONG]))),
                             "TUNNEL_HTTP_AUTH_FAILED")
        self.assertChallenge((yield self.ask(self.req(b"GET", b"/echo", headers=[basic("bob", "s3cret pass")]))),
                             "TUNNEL_HTTP_AUTH_FAILED")
        head, body, _ = yield self.ask(self.req(b"GET", b"/echo", headers=[BROWSER]))
        self.assertEqual(head.status, 401)
        self.assertIn(b"Sign-in required", body)
        self.assertEqual(head.get(b"www-authenticate"), b'Basic realm="my-tunnel", charset="UTF-8"')
        self.assertEqual(self.target.requests, [])

        head, body, _ = yield self.ask(self.req(b"GET", b"/echo", headers=[RIGHT]))
        self.assertEqual(head.status, 200)
        self.assertNotIn("authorization", _headers(json.loads(body)))

    @defer.inlineCallbacks
    def test_kept_alive_client_is_hashed_once(self):
        yield self.protect()
        calls = []
        real = bcrypt.checkpw

        def counting(*a):
            calls.append(1)
            return real(*a)

        self.patch(bcrypt, "checkpw", counting)
        conn = yield e2e.raw_connect(self.server.port)
        self.addCleanup(conn.transport.abortConnection)
        for _ in range(5):
            conn.request(self.req(b"GET", b"/echo", headers=[RIGHT]))
            head, body, _ = yield conn.response()
            self.assertEqual(head.status, 200)
        # a refusal keeps the connection: the browser sends the credentials next
        conn.request(self.req(b"GET", b"/echo"))
        head, _, _ = yield conn.response()
        self.assertEqual(head.status, 401)
        conn.request(self.req(b"GET", b"/echo", headers=[RIGHT]))
        head, _, _ = yield conn.response()
        self.assertEqual(head.status, 200)
        self.assertEqual(len(calls), 1)
        self.assertEqual(len(set(self.target.channels)), 1)

    @defer.inlineCallbacks
    def test_failures_are_rate_limited_per_address(self):
        yield self.protect()
        self.server.ingress.authorizer.limiter = FailureLimiter(reactor, "tunnel basic auth", burst=2, rate=0.001)
        for _ in range(2):
            self.assertChallenge((yield self.ask(self.req(b"GET", b"/", headers=[WRONG]))),
                                 "TUNNEL_HTTP_AUTH_FAILED")
        for creds in (WRONG, basic("alice", "another guess")):
            head, body, _ = yield self.ask(self.req(b"GET", b"/", headers=[creds]))
            self.assertEqual((head.status, json.loads(body)), (429, {"error": "TUNNEL_HTTP_AUTH_RATE_LIMITED"}))
        self.assertEqual(head.get(b"retry-after"), b"1")
        self.assertEqual(self.target.requests, [])

    @defer.inlineCallbacks
    def test_upgrade_without_credentials_and_unset(self):
        api = yield self.protect()
        up = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"), BROWSER]
        resp = yield self.ask(self.req(b"GET", b"/ws", headers=up))
        self.assertChallenge(resp, "TUNNEL_HTTP_AUTH_REQUIRED")
        # the allow list is checked first
        yield within(api.patch_tunnel(TID, {"access": {"allow": ["203.0.113.0/24"]}}))
        head, body, _ = yield self.ask(self.req(b"GET", b"/echo", headers=[RIGHT]))
        self.assertEqual((head.status, json.loads(body)), (403, {"error": "TUNNEL_ACCESS_DENIED"}))
        info = yield within(api.patch_tunnel(TID, {"access": {"allow": None, "http_auth": None}}))
        self.assertNotIn("access", info)
        head, body, _ = yield self.ask(self.req(b"GET", b"/echo", headers=[RIGHT]))
        self.assertEqual(head.status, 200)
        # without basic auth the header is the target's
        self.assertEqual(_headers(json.loads(body))["authorization"], [RIGHT[1].decode()])

    @defer.inlineCallbacks
    def test_bad_input(self):
        api = yield e2e.make_tunnel(self.server, TID, self.target.url)
        for bad, field in (({"user": "a:b", "password": "x"}, '"access.http_auth.user" must be 1 to 64 characters, no colon'),
                           ({"user": "a", "password": ""}, '"access.http_auth.password" must be 1 to 72 bytes'),
                           ({"user": "a", "password": "x" * 73}, '"access.http_auth.password" must be 1 to 72 bytes'),
                           ({"user": "a"}, '"access.http_auth.password" must be a string'),
                           ("a:b", '"access.http_auth" must be of type object')):
            try:
                yield within(api.patch_tunnel(TID, {"access": {"http_auth": bad}}))
            except ApiError as e:
                self.assertEqual((e.status, e.code, e.field), (400, "BAD_INPUT", field))
            else:
                self.fail("accepted")


class BasicAuthAdminTests(AdminAPITestCase):
    @defer.inlineCallbacks
    def test_shown_without_the_secret(self):
        yield self.stack.tunnels.update_config("my-tunnel", self.account["id"],
                                               {"access": {"http_auth": {"user": "alice", "password": "pw"}}})
        r = yield self.request("GET", "/v1/admin/tunnel/my-tunnel")
        body = json.loads(r.body)
        self.assertEqual(body["access"], {"http_auth": {"user": "alice"}})
        self.assertNotIn("$2b$", r.body.decode())
