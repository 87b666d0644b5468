"""The public REST API over real HTTP, against bodies recorded from the original."""

import base64
import json

from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher, formatEvent
from twisted.trial import unittest

from exposr import model
from exposr.api.public import PublicAPI
from exposr.errors import StorageError, StorageUnavailable
from exposr.tunnels import NoAltNames
from tests.support import (JSON, FailingStorage, FakeConnection, HTTPServer, ResponseAssertions, Stack,
                           bearer, make_config)
from exposr.storage.memory import MemoryStorage

FINGERPRINT = "SHA256:UglB7zHPJUjlpjwE2mvfg+/pVBTYzprWIM8ID6fCwcs"

# Bodies recorded in a session of the exposr client with the original server,
# the token as {t}; we add the tunnel's created_at at the end (kept on read).
VECTOR_PUT = (
    '{"id":"demo-tunnel","connection":{"connected":false,"connections":0},"transport":'
    '{"max_connections":2,"ws":{"enabled":false,"url":"ws://localhost:8080/v1/tunnel/demo-tunnel/'
    'ws-endpoint?t={t}"},"ssh":{"enabled":false,"host":"localhost","port":2200,"username":'
    '"demo-tunnel","password":"{t}","url":"ssh://demo-tunnel:{t}@localhost:2200","fingerprint":'
    '"SHA256:UglB7zHPJUjlpjwE2mvfg+/pVBTYzprWIM8ID6fCwcs"}},"ingress":{"http":{},"sni":{}},'
    '"target":{}'
)
VECTOR_TARGET = VECTOR_PUT[: -len('"target":{}')] + '"target":{"url":"http://127.0.0.1:9000/"}'
VECTOR_HTTP = VECTOR_TARGET.replace(
    '"ingress":{"http":{}',
    '"ingress":{"http":{"enabled":true,"url":"http://demo-tunnel.localhost:8080/","urls":'
    '["http://demo-tunnel.localhost:8080/"],"alt_names":[]}',
)
VECTOR_WS = VECTOR_HTTP.replace('"ws":{"enabled":false', '"ws":{"enabled":true')
VECTOR_CONNECTED = VECTOR_WS.replace(
    '"connection":{"connected":false,"connections":0}',
    '"connection":{"connected":true,"connections":1,"connected_at":{c},"alive_at":{c}}',
)


def fill(template, token, created_at, connected_at=None):
    body = template.replace("{t}", token)
    if connected_at is not None:
        body = body.replace("{c}", str(connected_at))
    return body + ',"created_at":"%s"}' % (created_at,)


class APITestCase(ResponseAssertions, unittest.TestCase):
    config_overrides = {}
    altnames = None

    @defer.inlineCallbacks
    def setUp(self):
        overrides = dict(transport=("ws", "ssh"), allow_registration=True)
        overrides.update(self.config_overrides)
        self.storage = FailingStorage(MemoryStorage(reactor), StorageUnavailable("down"))
        self.stack = Stack(config=make_config(**overrides), storage=self.storage,
                           altnames=self.altnames)
        yield self.stack.open()
        self.api = PublicAPI(self.stack.config, self.stack.accounts, self.stack.tunnels,
                             self.stack.registry, ssh_fingerprint=lambda: FINGERPRINT)
        self.server = HTTPServer(self, self.api.resource())
        self.request = self.server.request
        self.account = yield self.stack.accounts.create()
        self.token = bearer(self.account["id"])

    def assertBadInput(self, response, field):
        self.assertJSON(response, 400, {"error": "BAD_INPUT", "field": field})

    def put(self, tunnel_id="my-tunnel", body=None, **kwargs):
        kwargs.setdefault("token", self.token)
        return self.request("PUT", "/v1/tunnel/" + tunnel_id, json_body=body if body is not None else {},
                            **kwargs)

    def patch(self, body, tunnel_id="my-tunnel", **kwargs):
        kwargs.setdefault("token", self.token)
        return self.request("PATCH", "/v1/tunnel/" + tunnel_id, json_body=body, **kwargs)

    @defer.inlineCallbacks
    def other_account_tunnel(self, tunnel_id="other-tunnel"):
        other = yield self.stack.accounts.create()
        yield self.stack.tunnels.create(tunnel_id, other["id"])
        return other


class ClientFlowTests(APITestCase):
    """The recorded exposr client session, byte for byte."""

    @defer.inlineCallbacks
    def test_session(self):
        host = {"Host": "localhost:8080"}
        r = yield self.request("POST", "/v1/account", json_body={}, headers=host)
        self.assertEqual(r.code, 201)
        self.assertEqual(r.content_type, JSON)
        account_id = r.json()["account_id"]
        self.assertEqual(
            r.body.decode(),
            '{"account_id":"%s","account_id_hr":"%s"}' % (account_id, model.format_account_id(account_id)),
        )
        self.assertIsNone(r.header("server"))

        r = yield self.request("GET", "/v1/account/%s/token" % model.format_account_id(account_id),
                               headers=host)
        token = base64.b64encode(account_id.encode()).decode()
        self.assertJSON(r, 201, '{"token":"%s"}' % token)

        r = yield self.put("demo-tunnel", headers=host, token=token)
        tunnel = yield self.stack.tunnels.get("demo-tunnel")
        t, created = tunnel["transport"]["token"], tunnel["created_at"]
        self.assertJSON(r, 200, fill(VECTOR_PUT, t, created))

        r = yield self.request("GET", "/v1/tunnel/demo-tunnel", headers=host, token=token)
        self.assertJSON(r, 200, fill(VECTOR_PUT, t, created))

        r = yield self.patch({"target": {"url": "http://127.0.0.1:9000/"}}, "demo-tunnel",
                             headers=host, token=token)
        self.assertJSON(r, 200, fill(VECTOR_TARGET, t, created))
        r = yield self.patch({"ingress": {"http": {"enabled": True}}}, "demo-tunnel",
                             headers=host, token=token)
        self.assertJSON(r, 200, fill(VECTOR_HTTP, t, created))
        r = yield self.patch({"transport": {"ws": {"enabled": True}}}, "demo-tunnel",
                             headers=host, token=token)
        self.assertJSON(r, 200, fill(VECTOR_WS, t, created))

        # what a transport does: authorise with the token (which consumes it), register
        authorized = yield self.stack.tunnels.authorize("demo-tunnel", t)
        self.assertIsNotNone(authorized)
        conn = FakeConnection("demo-tunnel", registry=self.stack.registry)
        ok = yield self.stack.tunnels.register(conn, account_id)
        self.assertTrue(ok)
        now = model.epoch_ms(self.stack.clock.seconds())
        r = yield self.request("GET", "/v1/tunnel/demo-tunnel", headers=host, token=token)
        tunnel = yield self.stack.tunnels.get("demo-tunnel")
        self.assertNotEqual(tunnel["transport"]["token"], t)
        self.assertJSON(r, 200, fill(VECTOR_CONNECTED, tunnel["transport"]["token"], created, now))

        r = yield self.request("POST", "/v1/tunnel/demo-tunnel/disconnect", json_body={},
                               headers=host, token=token)
        self.assertJSON(r, 200, '{"result":true}')
        self.assertEqual(len(conn.disconnected), 1)

        r = yield self.request("DELETE", "/v1/tunnel/demo-tunnel", headers=host, token=token)
        self.assertEqual(r.code, 204)
        self.assertEqual(r.body, b"")
        self.assertIsNone(r.content_type)
        r = yield self.request("GET", "/v1/tunnel/demo-tunnel", headers=host, token=token)
        self.assertJSON(r, 404, '{"error":"TUNNEL_NOT_FOUND"}')

    @defer.inlineCallbacks
    def test_no_secrets_logged(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        r = yield self.request("POST", "/v1/account", json_body={})
        account_id = r.json()["account_id"]
        token = bearer(account_id)
        yield self.put("log-tunnel", token=token)
        yield self.patch({"target": {"url": "http://x.example"}}, "log-tunnel", token=token)
        conn = FakeConnection("log-tunnel", registry=self.stack.registry)
        tunnel = yield self.stack.tunnels.get("log-tunnel")
        yield self.stack.tunnels.register(conn, account_id)
        yield self.request("DELETE", "/v1/tunnel/log-tunnel", token=token)
        text = "\n".join(formatEvent(e) or "" for e in events)
        self.assertIn("log-tunnel", text)
        for secret in (account_id, model.format_account_id(account_id), token,
                       tunnel["transport"]["token"]):
            self.assertNotIn(secret, text)


class AccountRouteTests(APITestCase):
    @defer.inlineCallbacks
    def test_registration_disabled(self):
        self.api.config = self.api.config.__class__(**{
            **{k: getattr(self.api.config, k) for k in ("ingress_http_url", "transport")},
            "allow_registration": False,
        })
        r = yield self.request("POST", "/v1/account", json_body={})
        self.assertText(r, 404, "Not Found")

    @defer.inlineCallbacks
    def test_registration_body_ignored(self):
        r = yield self.request("POST", "/v1/account", body="not json",
                               headers={"content-type": "text/plain"})
        self.assertEqual(r.code, 201)
        r = yield self.request("POST", "/v1/account")
        self.assertEqual(r.code, 201)

    @defer.inlineCallbacks
    def test_registration_exhausted(self):
        self.stack.accounts.generate_id = lambda: self.account["id"]
        r = yield self.request("POST", "/v1/account", json_body={})
        self.assertText(r, 503, "Service Unavailable")

    @defer.inlineCallbacks
    def test_token_spellings(self):
        expected = '{"token":"%s"}' % bearer(self.account["id"])
        hr = model.format_account_id(self.account["id"])
        for spelling in (self.account["id"], hr, hr.lower(), hr.replace("-", "%20")):
            r = yield self.request("GET", "/v1/account/%s/token" % spelling)
            self.assertJSON(r, 201, expected)

    @defer.inlineCallbacks
    def test_token_unknown(self):
        for spelling in ("MPW4YDYVNPFXVV2D", "garbage", "%00", "A" * 300):
            r = yield self.request("GET", "/v1/account/%s/token" % spelling)
            self.assertJSON(r, 403, '{"error":"PERMISSION_DENIED"}')

    @defer.inlineCallbacks
    def test_head_token(self):
        r = yield self.request("HEAD", "/v1/account/%s/token" % self.account["id"])
        self.assertEqual(r.code, 201)
        self.assertEqual(r.body, b"")


class AuthTests(APITestCase):
    @defer.inlineCallbacks
    def test_no_token(self):
        for header in (None, "Bearer", "Bearer ", "Bearer  " + self.token, "Bearer ====",
                       "Bearer %%%%", "Bearer x"):
            headers = {"authorization": header} if header is not None else {}
            r = yield self.request("GET", "/v1/tunnel/my-tunnel", headers=headers)
            self.assertJSON(r, 401, '{"error":"AUTH_NO_TOKEN"}')

    @defer.inlineCallbacks
    def test_permission_denied(self):
        for token in (bearer("MPW4YDYVNPFXVV2D"), "bm90IGFuIGFjY291bnQ=", "AAAA", "!!AA!!AA"):
            r = yield self.request("GET", "/v1/tunnel/my-tunnel", token=token)
            self.assertJSON(r, 401, '{"error":"PERMISSION_DENIED"}')

    @defer.inlineCallbacks
    def test_disabled_account_is_refused_like_an_unknown_one(self):
        yield self.put()
        yield self.stack.accounts.set_disabled(self.account["id"], True, "spam")
        r = yield self.request("GET", "/v1/tunnel/my-tunnel", token=self.token)
        self.assertJSON(r, 401, '{"error":"PERMISSION_DENIED"}')
        r = yield self.request("PUT", "/v1/tunnel/other-tunnel", json_body={}, token=self.token)
        self.assertJSON(r, 401, '{"error":"PERMISSION_DENIED"}')
        r = yield self.request("GET", "/v1/account/%s/token" % self.account["id"], token=None)
        self.assertJSON(r, 403, '{"error":"PERMISSION_DENIED"}')
        yield self.stack.accounts.set_disabled(self.account["id"], False)
        r = yield self.request("GET", "/v1/tunnel/my-tunnel", token=self.token)
        self.assertEqual(r.code, 200)
        r = yield self.request("GET", "/v1/account/%s/token" % self.account["id"], token=None)
        self.assertEqual(r.code, 201)

    @defer.inlineCallbacks
    def test_token_forms(self):
        yield self.put()
        hr = model.format_account_id(self.account["id"])
        forms = [
            base64.b64encode(hr.encode()).decode(),
            base64.b64encode(hr.lower().encode()).decode(),
            base64.urlsafe_b64encode(self.account["id"].encode()).decode().rstrip("="),
        ]
        for token in forms:
            r = yield self.request("GET", "/v1/tunnel/my-tunnel", token=token)
            self.assertEqual(r.code, 200, token)
        r = yield self.request("GET", "/v1/tunnel/my-tunnel",
                               headers={"authorization": "Whatever " + self.token})
        self.assertEqual(r.code, 200)

    @defer.inlineCallbacks
    def test_validation_before_auth(self):
        r = yield self.request("PUT", "/v1/tunnel/AB", json_body={})
        self.assertBadInput(r, model.tunnel_id_error("AB"))
        r = yield self.request("PUT", "/v1/tunnel/my-tunnel", body="{", headers={"content-type": "application/json"})
        self.assertEqual(r.json()["error"], "BAD_INPUT")
        r = yield self.request("PATCH", "/v1/tunnel/my-tunnel", json_body={"foo": 1})
        self.assertBadInput(r, '"foo" is not allowed')
        for method in ("GET", "DELETE"):
            r = yield self.request(method, "/v1/tunnel/AB")
            self.assertBadInput(r, model.tunnel_id_error("AB"))
        r = yield self.request("POST", "/v1/tunnel/AB/disconnect")
        self.assertBadInput(r, model.tunnel_id_error("AB"))


class ValidationTests(APITestCase):
    @defer.inlineCallbacks
    def test_content_type(self):
        for headers in ({}, {"content-type": "text/plain"}, {"content-type": "application/xml"},
                        {"content-type": "json"}):
            r = yield self.request("PUT", "/v1/tunnel/my-tunnel", body="{}", headers=headers,
                                   token=self.token)
            self.assertBadInput(r, "content-type: expected json")
        r = yield self.request("PUT", "/v1/tunnel/my-tunnel", token=self.token)
        self.assertBadInput(r, "content-type: expected json")
        for ctype in ("application/json; charset=utf-8", "Application/JSON",
                      "application/vnd.api+json", "application/merge-patch+json"):
            r = yield self.request("PUT", "/v1/tunnel/my-tunnel", body="{}",
                                   headers={"content-type": ctype}, token=self.token)
            self.assertEqual(r.code, 200, ctype)

    @defer.inlineCallbacks
    def test_empty_json_body(self):
        r = yield self.request("PUT", "/v1/tunnel/my-tunnel", body="",
                               headers={"content-type": "application/json"}, token=self.token)
        self.assertEqual(r.code, 200)

    @defer.inlineCallbacks
    def test_too_large(self):
        body = json.dumps({"target": {"url": "http://x.example/" + "a" * 65536}})
        r = yield self.request("PUT", "/v1/tunnel/my-tunnel", body=body,
                               headers={"content-type": "application/json"}, token=self.token)
        self.assertBadInput(r, "content-type: request entity too large")
        body = '{"target":{"url":"http://x.example/%s"}}' % ("a" * (65536 - 38))
        self.assertEqual(len(body), 65536)
        r = yield self.request("PUT", "/v1/tunnel/my-tunnel", body=body,
                               headers={"content-type": "application/json"}, token=self.token)
        self.assertEqual(r.code, 200)

    @defer.inlineCallbacks
    def test_malformed_json(self):
        cases = {
            "{": "content-type: Unexpected end of JSON input",
            '{"a":}': "content-type: Unexpected token } in JSON at position 5",
            "123": "content-type: invalid JSON, only supports object and array",
            '"x"': "content-type: invalid JSON, only supports object and array",
            "[1] x": "content-type: Unexpected token x in JSON at position 4",
            '{"a": NaN}': None,
            "[" * 40000: None,
            b"{\xff}": None,
        }
        for body, field in cases.items():
            r = yield self.request("PUT", "/v1/tunnel/my-tunnel", body=body,
                                   headers={"content-type": "application/json"}, token=self.token)
            self.assertEqual(r.code, 400, body)
            self.assertEqual(r.json()["error"], "BAD_INPUT")
            self.assertTrue(r.json()["field"].startswith("content-type: "))
            if field is not None:
                self.assertEqual(r.json()["field"], field)
        r = yield self.request("PUT", "/v1/tunnel/my-tunnel", body="[]",
                               headers={"content-type": "application/json"}, token=self.token)
        self.assertBadInput(r, '"value" must be of type object')

    @defer.inlineCallbacks
    def test_schema(self):
        cases = [
            ({"foo": 1}, '"foo" is not allowed'),
            ({"ingress": {"foo": 1}}, '"ingress.foo" is not allowed'),
            ({"ingress": {"http": {"url": "http://x"}}}, '"ingress.http.url" is not allowed'),
            ({"ingress": {"sni": {"urls": []}}}, '"ingress.sni.urls" is not allowed'),
            ({"transport": {"max_connections": 3}}, '"transport.max_connections" is not allowed'),
            ({"transport": {"ws": {"enabled": True, "url": "x"}}}, '"transport.ws.url" is not allowed'),
            ({"target": {"url": "http://x.com", "host": "x"}}, '"target.host" is not allowed'),
            ({"ingress": []}, '"ingress" must be of type object'),
            ({"ingress": None}, '"ingress" must be of type object'),
            ({"ingress": {"http": "yes"}}, '"ingress.http" must be of type object'),
            ({"target": 5}, '"target" must be of type object'),
            ({"transport": {"ssh": 1}}, '"transport.ssh" must be of type object'),
            ({"ingress": {"http": {"enabled": "yes"}}}, '"ingress.http.enabled" must be a boolean'),
            ({"ingress": {"http": {"enabled": 1}}}, '"ingress.http.enabled" must be a boolean'),
            ({"ingress": {"http": {"enabled": None}}}, '"ingress.http.enabled" must be a boolean'),
            ({"ingress": {"sni": {"enabled": []}}}, '"ingress.sni.enabled" must be a boolean'),
            ({"ingress": {"sni": {"passthrough": "maybe"}}}, '"ingress.sni.passthrough" must be a boolean'),
            ({"transport": {"ws": {"enabled": "on"}}}, '"transport.ws.enabled" must be a boolean'),
            ({"target": {"url": ""}}, '"target.url" is not allowed to be empty'),
            ({"target": {"url": "not a uri"}}, '"target.url" must be a valid uri'),
            ({"target": {"url": "1http://x"}}, '"target.url" must be a valid uri'),
            ({"target": {"url": "/relative"}}, '"target.url" must be a valid uri'),
            ({"target": {"url": "http://exa mple.com"}}, '"target.url" must be a valid uri'),
            ({"target": {"url": "http://[::1"}}, '"target.url" must be a valid uri'),
            ({"target": {"url": "http://x:80a/"}}, '"target.url" must be a valid uri'),
            ({"target": {"url": 5}}, '"target.url" must be a string'),
            ({"ingress": {"http": {"alt_names": "a.com"}}}, '"ingress.http.alt_names" must be an array'),
            ({"ingress": {"http": {"alt_names": [1]}}}, '"ingress.http.alt_names[0]" must be a string'),
            ({"ingress": {"http": {"alt_names": ["a.com", "bad_name.com"]}}},
             '"ingress.http.alt_names[1]" must contain a valid domain name'),
            ({"ingress": {"http": {"alt_names": ["localhost"]}}},
             '"ingress.http.alt_names[0]" must contain a valid domain name'),
            ({"ingress": {"http": {"alt_names": ["192.0.2.1"]}}},
             '"ingress.http.alt_names[0]" must contain a valid domain name'),
            ({"ingress": {"http": {"alt_names": ["example.4x"]}}},
             '"ingress.http.alt_names[0]" must contain a valid domain name'),
            ({"ingress": {"http": {"alt_names": ["-a.com"]}}},
             '"ingress.http.alt_names[0]" must contain a valid domain name'),
            ({"ingress": {"http": {"alt_names": ["a..com"]}}},
             '"ingress.http.alt_names[0]" must contain a valid domain name'),
            ({"ingress": {"http": {"alt_names": ["example.com."]}}},
             '"ingress.http.alt_names[0]" must contain a valid domain name'),
            ({"ingress": {"http": {"alt_names": [""]}}},
             '"ingress.http.alt_names[0]" is not allowed to be empty'),
            ({"ingress": {"http": {"alt_names": ["a%d.com" % i for i in range(11)]}}},
             '"ingress.http.alt_names" must contain less than or equal to 10 items'),
        ]
        for body, field in cases:
            r = yield self.put(body=body)
            self.assertBadInput(r, field)
        # nothing was created by the failed requests
        tunnel = yield self.stack.tunnels.get("my-tunnel")
        self.assertIsNone(tunnel)

    @defer.inlineCallbacks
    def test_valid_values(self):
        r = yield self.put(body={
            "ingress": {"http": {"enabled": "TRUE", "alt_names": None}, "sni": {"enabled": "false"}},
            "target": {"url": "tcp://localhost:22"},
            "transport": {"ws": {"enabled": "True"}, "ssh": {"enabled": False}},
        })
        self.assertEqual(r.code, 200, r)
        info = r.json()
        self.assertTrue(info["ingress"]["http"]["enabled"])
        self.assertTrue(info["transport"]["ws"]["enabled"])
        self.assertEqual(info["target"], {"url": "tcp://localhost:22"})
        for url in ("http://[::1]:8080/path?q=1#f", "https://user:pw@example.com/", "urn:isbn:0451450523",
                    "tcps://10.0.0.1:443", "http://ex%41mple.com/%7E"):
            r = yield self.patch({"target": {"url": url}})
            self.assertEqual(r.json()["target"], {"url": url}, url)
        r = yield self.patch({"target": {"url": None}})
        self.assertEqual(r.json()["target"], {})


class DomainNameTests(unittest.TestCase):
    def test_private_top_level_domains_are_names_too(self):
        from exposr.api.common import is_valid_domain

        for name in ("app.dev.test", "app.corp.internal", "nas.lan", "printer.home.arpa", "app.localhost",
                     "www.example.com", "xn--80ak6aa92e.xn--p1ai", "a.b.c.d.museum"):
            self.assertTrue(is_valid_domain(name), name)
        for name in ("localhost", "192.0.2.1", "a.4x", "a..test", "-a.test", "a_b.test", "a.test.", "", None,
                     "x" * 64 + ".test"):
            self.assertFalse(is_valid_domain(name), name)


class TunnelRouteTests(APITestCase):
    @defer.inlineCallbacks
    def test_put_creates_once(self):
        r = yield self.put(body={"target": {"url": "http://a.example"}})
        self.assertEqual(r.code, 200)
        first = yield self.stack.tunnels.get("my-tunnel")
        r = yield self.put(body={})
        self.assertEqual(r.json()["target"], {"url": "http://a.example"})
        second = yield self.stack.tunnels.get("my-tunnel")
        self.assertEqual(first["transport"]["token"], second["transport"]["token"])
        account = yield self.stack.accounts.get(self.account["id"])
        self.assertEqual(account["tunnels"], ["my-tunnel"])

    @defer.inlineCallbacks
    def test_put_of_an_id_taken_meanwhile(self):
        """PUT finds no tunnel, but another account creates it before this PUT does: 403."""
        tunnels = self.stack.tunnels
        real_get = tunnels.get
        seen = []

        @defer.inlineCallbacks
        def get_then_taken(tunnel_id):
            if not seen:  # the first look: nothing yet; then the other account is first
                seen.append(tunnel_id)
                yield self.other_account_tunnel(tunnel_id)
                return None
            return (yield real_get(tunnel_id))

        tunnels.get = get_then_taken
        r = yield self.put("taken-tunnel", body={"target": {"url": "http://a.example"}})
        self.assertJSON(r, 403, '{"error":"PERMISSION_DENIED"}')
        tunnels.get = real_get
        record = yield tunnels.get("taken-tunnel")
        self.assertNotEqual(record["account"], self.account["id"])
        self.assertNotIn("url", record["target"])
        account = yield self.stack.accounts.get(self.account["id"])
        self.assertEqual(account["tunnels"], [])

    @defer.inlineCallbacks
    def test_delete_and_recreate_among_many_tunnels(self):
        """An account with hundreds of tunnels: each stays listed once, through delete and re-create."""
        ids = ["many-tunnels-%04d" % i for i in range(300)]
        for tunnel_id in ids:
            r = yield self.put(tunnel_id)
            self.assertEqual(r.code, 200)
        account = yield self.stack.accounts.get(self.account["id"])
        self.assertEqual(account["tunnels"], ids)
        # what a reader changes in its copy is not stored
        account["tunnels"].append("not-stored")
        r = yield self.request("DELETE", "/v1/tunnel/" + ids[10], token=self.token)
        self.assertEqual(r.code, 204)
        r = yield self.request("GET", "/v1/tunnel/" + ids[10], token=self.token)
        self.assertJSON(r, 404, '{"error":"TUNNEL_NOT_FOUND"}')
        account = yield self.stack.accounts.get(self.account["id"])
        self.assertEqual(account["tunnels"], ids[:10] + ids[11:])
        r = yield self.put(ids[10], body={"target": {"url": "http://again.example"}})
        self.assertEqual(r.json()["target"], {"url": "http://again.example"})
        r = yield self.request("GET", "/v1/tunnel/" + ids[10], token=self.token)
        self.assertEqual((r.code, r.json()["target"]), (200, {"url": "http://again.example"}))
        account = yield self.stack.accounts.get(self.account["id"])
        self.assertEqual(account["tunnels"], ids[:10] + ids[11:] + [ids[10]])
        # another account sees none of them
        other = yield self.stack.accounts.create()
        r = yield self.request("GET", "/v1/tunnel/" + ids[10], token=bearer(other["id"]))
        self.assertJSON(r, 404, '{"error":"TUNNEL_NOT_FOUND"}')
        r = yield self.put(ids[10], token=bearer(other["id"]))
        self.assertJSON(r, 403, '{"error":"PERMISSION_DENIED"}')

    @defer.inlineCallbacks
    def test_foreign_tunnel(self):
        yield self.other_account_tunnel("other-tunnel")
        r = yield self.put("other-tunnel")
        self.assertJSON(r, 403, '{"error":"PERMISSION_DENIED"}')
        r = yield self.patch({}, "other-tunnel")
        self.assertJSON(r, 403, '{"error":"PERMISSION_DENIED"}')
        r = yield self.request("GET", "/v1/tunnel/other-tunnel", token=self.token)
        self.assertJSON(r, 404, '{"error":"TUNNEL_NOT_FOUND"}')
        r = yield self.request("DELETE", "/v1/tunnel/other-tunnel", token=self.token)
        self.assertJSON(r, 404, '{"error":"TUNNEL_NOT_FOUND"}')
        r = yield self.request("POST", "/v1/tunnel/other-tunnel/disconnect", token=self.token)
        self.assertJSON(r, 200, '{"result":false}')
        still = yield self.stack.tunnels.get("other-tunnel")
        self.assertIsNotNone(still)

    @defer.inlineCallbacks
    def test_missing_tunnel(self):
        r = yield self.patch({"target": {"url": "http://x.example"}}, "nope-nope")
        self.assertJSON(r, 404, '{"error":"TUNNEL_NOT_FOUND"}')
        r = yield self.request("GET", "/v1/tunnel/nope-nope", token=self.token)
        self.assertJSON(r, 404, '{"error":"TUNNEL_NOT_FOUND"}')
        r = yield self.request("DELETE", "/v1/tunnel/nope-nope", token=self.token)
        self.assertJSON(r, 404, '{"error":"TUNNEL_NOT_FOUND"}')
        r = yield self.request("POST", "/v1/tunnel/nope-nope/disconnect", token=self.token)
        self.assertJSON(r, 404, '{"error":"TUNNEL_NOT_FOUND"}')

    @defer.inlineCallbacks
    def test_forty_hex_id(self):
        tunnel_id = "0123456789abcdef0123456789abcdef01234567"
        r = yield self.put(tunnel_id)
        self.assertEqual(r.json()["id"], tunnel_id)

    @defer.inlineCallbacks
    def test_head(self):
        yield self.put()
        r = yield self.request("HEAD", "/v1/tunnel/my-tunnel", token=self.token)
        self.assertEqual(r.code, 200)
        self.assertEqual(r.body, b"")
        self.assertEqual(r.content_type, JSON)

    @defer.inlineCallbacks
    def test_disconnect_not_connected(self):
        yield self.put()
        r = yield self.request("POST", "/v1/tunnel/my-tunnel/disconnect", token=self.token)
        self.assertJSON(r, 200, '{"result":true}')

    @defer.inlineCallbacks
    def test_ingress_administratively_disabled(self):
        r = yield self.put(body={"ingress": {"sni": {"enabled": True}}})
        self.assertJSON(r, 500, '{"error":"UNKNOWN_ERROR","detailed":"ingress_administratively_disabled"}')

    @defer.inlineCallbacks
    def test_bad_alt_names(self):
        yield self.put()
        r = yield self.patch({"ingress": {"http": {"alt_names": ["b.example.com", "A.example.com"]}}})
        self.assertJSON(r, 400, {"error": "TUNNEL_INGRESS_BAD_ALT_NAMES",
                                 "field": "b.example.com, a.example.com"})

    @defer.inlineCallbacks
    def test_storage_unavailable(self):
        yield self.put()
        self.storage.failing = True
        for method, path in (("GET", "/v1/tunnel/my-tunnel"), ("PUT", "/v1/tunnel/my-tunnel"),
                             ("POST", "/v1/account"), ("GET", "/v1/account/%s/token" % self.account["id"]),
                             ("DELETE", "/v1/tunnel/my-tunnel")):
            r = yield self.request(method, path, json_body={}, token=self.token)
            self.assertJSON(r, 503, {"error": "UNKNOWN_ERROR", "details": "storage_unavailable"})

    @defer.inlineCallbacks
    def test_storage_error_update(self):
        yield self.put()
        self.storage.error = StorageError("boom")
        self.storage.failing = True
        self.patch_storage_get()
        r = yield self.patch({"target": {"url": "http://x.example"}})
        self.assertJSON(r, 500, '{"error":"UNKNOWN_ERROR","detailed":"could_not_update_tunnel"}')
        self.flushLoggedErrors(StorageError)

    def patch_storage_get(self):
        # let reads through so the request reaches the update
        inner = self.storage.inner
        self.storage.get = inner.get

    @defer.inlineCallbacks
    def test_unexpected_error_is_500_json(self):
        self.storage.error = RuntimeError("secret internals")
        self.storage.failing = True
        r = yield self.request("GET", "/v1/tunnel/my-tunnel", token=self.token)
        self.assertJSON(r, 500, '{"error":"UNKNOWN_ERROR"}')
        self.assertNotIn(b"Traceback", r.body)
        self.flushLoggedErrors(RuntimeError)

    @defer.inlineCallbacks
    def test_unknown_paths_and_methods(self):
        for method, path in (
            ("GET", "/"),
            ("GET", "/v1"),
            ("GET", "/v1/account"),
            ("GET", "/v1/tunnel"),
            ("GET", "/v1/tunnel/"),
            ("GET", "/v1/tunnel/my-tunnel/ws-endpoint"),
            ("POST", "/v1/tunnel/my-tunnel"),
            ("PUT", "/v1/account"),
            ("GET", "/v1/tunnel/my-tunnel/disconnect"),
            ("OPTIONS", "/v1/tunnel/my-tunnel"),
            ("BREW", "/v1/account"),
            ("GET", "/v1/tunnels/x/y/z"),
            ("GET", "/%ff"),
        ):
            r = yield self.request(method, path, token=self.token)
            self.assertText(r, 404, "Not Found")
            self.assertIsNone(r.header("server"))


class BaseURLTests(APITestCase):
    @defer.inlineCallbacks
    def info(self, headers):
        r = yield self.request("GET", "/v1/tunnel/my-tunnel", token=self.token, headers=headers)
        return r

    @defer.inlineCallbacks
    def test_ws_url(self):
        yield self.put()
        tunnel = yield self.stack.tunnels.get("my-tunnel")
        t = tunnel["transport"]["token"]
        cases = [
            ({"Host": "api.example.com"}, "ws://api.example.com"),
            ({"Host": "api.example.com:8080"}, "ws://api.example.com:8080"),
            ({"Host": "api.example.com", "X-Forwarded-Proto": "https"}, "wss://api.example.com"),
            ({"Host": "api.example.com", "X-Forwarded-Proto": "https,http"}, "wss://api.example.com"),
            ({"Host": "b:1", "Forwarded": 'proto=https;host="api.example.com"', "X-Forwarded-Port": "443"},
             "wss://api.example.com"),
            ({"Host": "api.example.com:443", "X-Forwarded-Proto": "https"}, "wss://api.example.com"),
            ({"Host": "api.example.com", "X-Forwarded-Proto": "https", "X-Forwarded-Port": "8443"},
             "wss://api.example.com:8443"),
        ]
        for headers, base in cases:
            r = yield self.info(headers)
            self.assertEqual(r.json()["transport"]["ws"]["url"],
                             "%s/v1/tunnel/my-tunnel/ws-endpoint?t=%s" % (base, t), headers)

    @defer.inlineCallbacks
    def test_underivable(self):
        yield self.put()
        for headers in ({"Host": "bad host"}, {"Host": "x:99999"}, {"Host": "x", "X-Forwarded-Proto": "a b"}):
            r = yield self.info(headers)
            self.assertEqual(r.code, 400)
            self.assertEqual(r.body, b"")


class SSHBlockTests(APITestCase):
    config_overrides = {"transport_ssh_host": "ssh.example.com:22"}

    @defer.inlineCallbacks
    def test_ssh_host_option(self):
        r = yield self.put(headers={"Host": "api.example.com:8080"})
        ssh = r.json()["transport"]["ssh"]
        t = ssh["password"]
        self.assertEqual((ssh["host"], ssh["port"], ssh["username"]), ("ssh.example.com", 22, "my-tunnel"))
        self.assertEqual(ssh["url"], "ssh://my-tunnel:%s@ssh.example.com:22" % t)
        self.assertEqual(ssh["fingerprint"], FINGERPRINT)


class WSOnlyTests(APITestCase):
    config_overrides = {"transport": ("ws",), "transport_max_connections": 1}

    @defer.inlineCallbacks
    def test_no_ssh_block(self):
        r = yield self.put()
        transport = r.json()["transport"]
        self.assertEqual(list(transport), ["max_connections", "ws"])
        self.assertEqual(transport["max_connections"], 1)


class SNITests(APITestCase):
    config_overrides = {"ingress": ("http", "sni")}

    @defer.inlineCallbacks
    def test_sni_enabled(self):
        self.stack.tunnels.sni_url_for = "tcps://{}.example.com:4430".format
        r = yield self.put(body={"ingress": {"sni": {"enabled": True}}})
        self.assertEqual(r.json()["ingress"], {
            "http": {},
            "sni": {"enabled": True, "url": "tcps://my-tunnel.example.com:4430",
                    "urls": ["tcps://my-tunnel.example.com:4430"]},
        })


class AltNamesGrantedTests(APITestCase):
    class Grant(NoAltNames):
        def update(self, tunnel, requested):
            return defer.succeed([n for n in requested if n != "taken.example.com"])

    altnames = Grant()

    @defer.inlineCallbacks
    def test_granted(self):
        r = yield self.put(body={"ingress": {"http": {"enabled": True,
                                                      "alt_names": ["Mine.Example.com", "taken.example.com"]}}})
        self.assertEqual(r.json()["ingress"]["http"], {
            "enabled": True,
            "url": "http://my-tunnel.localhost:8080/",
            "urls": ["http://my-tunnel.localhost:8080/", "http://mine.example.com:8080/"],
            "alt_names": ["mine.example.com"],
        })


class APIURLTests(APITestCase):
    config_overrides = {"api_url": "https://api.example.com"}

    @defer.inlineCallbacks
    def test_host_check(self):
        r = yield self.request("POST", "/v1/account", json_body={}, headers={"Host": "other.example.com"})
        self.assertText(r, 404, "Not Found")
        r = yield self.request("POST", "/v1/account", json_body={},
                               headers={"Host": "API.example.com:443", "X-Forwarded-Proto": "https"})
        self.assertEqual(r.code, 201)
        r = yield self.request("POST", "/v1/account", json_body={}, headers={"Host": "api.example.com"})
        self.assertEqual(r.code, 201)
        r = yield self.request("POST", "/v1/account", json_body={}, headers={"Host": "api.example.com:8080"})
        self.assertEqual(r.code, 404)


class HostileRequestTests(APITestCase):
    @defer.inlineCallbacks
    def test_weird_hosts(self):
        yield self.put()
        for host in ("\xff\xfe", "a b", "[zz]", "x" * 5000, "a:b:c", "%00", ":80", "[::1]x"):
            r = yield self.request("GET", "/v1/tunnel/my-tunnel", token=self.token,
                                   headers={"Host": host})
            self.assertIn(r.code, (200, 400, 404), host)
            self.assertNotIn(b"Traceback", r.body)
        self.assertEqual(self.flushLoggedErrors(), [])
