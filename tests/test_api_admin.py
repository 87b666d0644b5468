"""The admin interface and admin API over real HTTP."""

import base64

from twisted.internet import defer, reactor
from twisted.trial import unittest

from exposr import model
from exposr.api.admin import AdminAPI, AdminInterface, admin_resource, local_node_view
from exposr.errors import StorageUnavailable
from exposr.node import Node
from exposr.readiness import Readiness
from exposr.storage.memory import MemoryStorage
from tests.support import (JSON, NODE_ID, FailingStorage, FakeConnection, HTTPServer, ResponseAssertions,
                           Stack, make_config)

KEY = "s3cret-admin-key"


def key_header(key=KEY):
    return {"authorization": "Bearer " + base64.b64encode(key.encode()).decode()}


class InterfaceTests(ResponseAssertions, unittest.TestCase):
    def setUp(self):
        self.readiness = Readiness()
        self.server = HTTPServer(self, AdminInterface(self.readiness).resource())

    @defer.inlineCallbacks
    def probe(self):
        ping = yield self.server.request("GET", "/ping")
        health = yield self.server.request("GET", "/health")
        return ping.code, health.code

    @defer.inlineCallbacks
    def test_timeline(self):
        self.assertEqual((yield self.probe()), (404, 404))
        self.readiness.started = self.readiness.ready = True
        self.assertEqual((yield self.probe()), (200, 200))
        r = yield self.server.request("GET", "/ping")
        self.assertText(r, 200, "OK")
        self.readiness.ready = False
        self.assertEqual((yield self.probe()), (200, 404))

    @defer.inlineCallbacks
    def test_other_paths(self):
        self.readiness.started = self.readiness.ready = True
        for method, path in (("GET", "/"), ("GET", "/v1/admin/tunnel"), ("POST", "/ping"),
                             ("GET", "/ping/x"), ("GET", "/healthz")):
            r = yield self.server.request(method, path)
            self.assertText(r, 404, "Not Found")
        r = yield self.server.request("HEAD", "/health")
        self.assertEqual(r.code, 200)


class AdminAPITestCase(ResponseAssertions, unittest.TestCase):
    config_overrides = {"admin_api_key": KEY}

    @defer.inlineCallbacks
    def setUp(self):
        overrides = dict(transport=("ws", "ssh"))
        overrides.update(self.config_overrides)
        self.storage = FailingStorage(MemoryStorage(reactor), StorageUnavailable("down"))
        self.stack = Stack(config=make_config(**overrides), storage=self.storage)
        yield self.stack.open()
        self.node = Node(id=NODE_ID, host="1@test", ip="10.0.0.5")
        self.api = AdminAPI(self.stack.config, self.stack.accounts, self.stack.tunnels,
                            self.stack.registry, nodes=local_node_view(self.node, self.stack.clock),
                            ssh_fingerprint=lambda: "SHA256:fp")
        self.server = HTTPServer(self, self.api.resource())
        self.account, self.tunnel = yield self.stack.account_and_tunnel("my-tunnel")

    def request(self, method, path, headers=None, **kwargs):
        all_headers = key_header()
        all_headers.update(headers or {})
        return self.server.request(method, path, headers=all_headers, **kwargs)


class AuthTests(AdminAPITestCase):
    ROUTES = [
        ("POST", "/v1/admin/account"),
        ("GET", "/v1/admin/account"),
        ("GET", "/v1/admin/account/MPW4YDYVNPFXVV2D"),
        ("DELETE", "/v1/admin/account/MPW4YDYVNPFXVV2D"),
        ("PUT", "/v1/admin/account/MPW4YDYVNPFXVV2D/disable"),
        ("GET", "/v1/admin/tunnel"),
        ("GET", "/v1/admin/tunnel/BAD"),
        ("DELETE", "/v1/admin/tunnel/my-tunnel"),
        ("POST", "/v1/admin/tunnel/my-tunnel/disconnect"),
        ("GET", "/v1/admin/cluster"),
    ]

    @defer.inlineCallbacks
    def test_wrong_or_missing_key(self):
        for headers in ({}, key_header("wrong"), {"authorization": "Bearer"},
                        {"authorization": "Bearer " + KEY}, key_header(KEY + "x"), key_header(KEY[:-1])):
            for method, path in self.ROUTES:
                r = yield self.server.request(method, path, headers=headers)
                self.assertText(r, 403, "Forbidden")
        tunnel = yield self.stack.tunnels.get("my-tunnel")
        self.assertIsNotNone(tunnel)

    @defer.inlineCallbacks
    def test_auth_before_validation(self):
        r = yield self.server.request("GET", "/v1/admin/tunnel/BAD")
        self.assertText(r, 403, "Forbidden")
        r = yield self.request("GET", "/v1/admin/tunnel/BAD")
        self.assertJSON(r, 400, {"error": "BAD_INPUT", "field": model.tunnel_id_error("BAD")})

    @defer.inlineCallbacks
    def test_unknown_path(self):
        r = yield self.request("GET", "/v1/admin/nothing")
        self.assertText(r, 404, "Not Found")
        r = yield self.request("PATCH", "/v1/admin/account")
        self.assertText(r, 404, "Not Found")


class NoKeyTests(AdminAPITestCase):
    config_overrides = {"admin_api_key": None}

    @defer.inlineCallbacks
    def test_everything_404(self):
        for method, path in AuthTests.ROUTES:
            r = yield self.server.request(method, path, headers=key_header())
            self.assertText(r, 404, "Not Found")


class EmptyKeyTests(NoKeyTests):
    config_overrides = {"admin_api_key": ""}


class OpenAccessTests(AdminAPITestCase):
    config_overrides = {"admin_api_key": None, "admin_api_allow_access_without_key": True}

    @defer.inlineCallbacks
    def test_open(self):
        r = yield self.server.request("GET", "/v1/admin/tunnel")
        self.assertJSON(r, 200, {"cursor": None, "tunnels": ["my-tunnel"]})


class AccountTests(AdminAPITestCase):
    @defer.inlineCallbacks
    def test_create(self):
        r = yield self.request("POST", "/v1/admin/account")
        self.assertEqual(r.code, 201)
        props = r.json()
        self.assertEqual(list(props), ["account_id", "account_id_hr", "tunnels", "status",
                                       "created_at", "updated_at"])
        self.assertEqual(props["account_id_hr"], model.format_account_id(props["account_id"]))
        self.assertEqual(props["tunnels"], [])
        self.assertEqual(props["status"], {"disabled": False})

    @defer.inlineCallbacks
    def test_create_exhausted(self):
        self.stack.accounts.generate_id = lambda: self.account["id"]
        r = yield self.request("POST", "/v1/admin/account")
        self.assertText(r, 503, "Service Unavailable")

    @defer.inlineCallbacks
    def test_get(self):
        for spelling in (self.account["id"], model.format_account_id(self.account["id"]).lower()):
            r = yield self.request("GET", "/v1/admin/account/" + spelling)
            self.assertJSON(r, 200, {
                "account_id": self.account["id"],
                "account_id_hr": model.format_account_id(self.account["id"]),
                "tunnels": ["my-tunnel"],
                "status": {"disabled": False},
                "created_at": self.account["created_at"],
                "updated_at": self.account["updated_at"],
            })
        for missing in ("MPW4YDYVNPFXVV2D", "garbage"):
            r = yield self.request("GET", "/v1/admin/account/" + missing)
            self.assertJSON(r, 404, "{}")

    @defer.inlineCallbacks
    def test_delete(self):
        hr = model.format_account_id(self.account["id"])
        r = yield self.request("DELETE", "/v1/admin/account/" + hr)
        self.assertEqual(r.code, 204)
        self.assertEqual(r.body, b"")
        tunnel = yield self.stack.tunnels.get("my-tunnel")
        self.assertIsNone(tunnel)
        r = yield self.request("DELETE", "/v1/admin/account/" + hr)
        self.assertJSON(r, 404, "{}")
        r = yield self.request("DELETE", "/v1/admin/account/garbage")
        self.assertJSON(r, 404, "{}")

    @defer.inlineCallbacks
    def test_disable(self):
        conn = FakeConnection("my-tunnel", registry=self.stack.registry)
        yield self.stack.tunnels.register(conn, self.account["id"])
        self.stack.clock.advance(1)
        path = "/v1/admin/account/%s/disable" % self.account["id"]
        r = yield self.request("PUT", path, json_body={"disable": True, "reason": "spam"})
        self.assertEqual(r.code, 200, r)
        now = model.iso_timestamp(self.stack.clock.seconds())
        self.assertEqual(r.json()["status"], {"disabled": True, "disabled_at": now, "disabled_reason": "spam"})
        self.assertEqual(r.json()["updated_at"], now)
        self.assertEqual(len(conn.disconnected), 1)
        r = yield self.request("PUT", path, json_body={"disable": "false"})
        self.assertEqual(r.json()["status"], {"disabled": False})
        r = yield self.request("PUT", path, json_body={"disable": True})
        self.assertEqual(list(r.json()["status"]), ["disabled", "disabled_at"])

    @defer.inlineCallbacks
    def test_disable_bad_input(self):
        path = "/v1/admin/account/%s/disable" % self.account["id"]
        cases = [
            ({}, '"disable" is required'),
            ({"disable": "maybe"}, '"disable" must be a boolean'),
            ({"disable": True, "reason": 5}, '"reason" must be a string'),
            ({"disable": True, "reason": "x" * 257},
             '"reason" length must be less than or equal to 256 characters long'),
            ({"disable": True, "other": 1}, '"other" is not allowed'),
            ([], '"value" must be of type object'),
        ]
        for body, field in cases:
            r = yield self.request("PUT", path, json_body=body)
            self.assertJSON(r, 400, {"error": "BAD_INPUT", "field": field})
        r = yield self.request("PUT", path, body='{"disable":true}')
        self.assertJSON(r, 400, {"error": "BAD_INPUT", "field": "content-type: expected json"})
        r = yield self.request("PUT", path, json_body={"disable": True, "reason": "x" * 256})
        self.assertEqual(r.code, 200)

    @defer.inlineCallbacks
    def test_disable_unknown(self):
        r = yield self.request("PUT", "/v1/admin/account/MPW4YDYVNPFXVV2D/disable", json_body={"disable": True})
        self.assertText(r, 404, "Not Found")

    @defer.inlineCallbacks
    def test_list(self):
        for _ in range(29):
            yield self.stack.accounts.create()
        for verbose in ("false", "true"):
            seen, cursor = [], None
            while True:
                query = "?count=10&verbose=%s" % verbose
                if cursor:
                    query += "&cursor=" + cursor
                r = yield self.request("GET", "/v1/admin/account" + query)
                self.assertEqual(r.code, 200, r)
                self.assertEqual(list(r.json()), ["cursor", "accounts"])
                seen.extend(r.json()["accounts"])
                cursor = r.json()["cursor"]
                if not cursor:
                    break
            self.assertEqual(len(seen), 30)
            if verbose == "true":
                self.assertIn("created_at", seen[0])
            else:
                self.assertEqual(list(seen[0]), ["accountId", "id", "tunnels", "status"])
        r = yield self.request("GET", "/v1/admin/account")
        self.assertEqual(len(r.json()["accounts"]), 25)

    @defer.inlineCallbacks
    def test_list_bad_query(self):
        cases = [
            ("count=0", '"count" must be greater than or equal to 1'),
            ("count=101", '"count" must be less than or equal to 100'),
            ("count=abc", '"count" must be a number'),
            ("verbose=maybe", '"verbose" must be a boolean'),
            ("foo=1", '"foo" is not allowed'),
            ("cursor=%25%25%25", '"cursor" is not a valid cursor'),
            ("cursor=bm90LWEtbnVtYmVy", '"cursor" is not a valid cursor'),
        ]
        for query, field in cases:
            for path in ("/v1/admin/account?", "/v1/admin/tunnel?"):
                r = yield self.request("GET", path + query)
                self.assertJSON(r, 400, {"error": "BAD_INPUT", "field": field})


class TunnelTests(AdminAPITestCase):
    @defer.inlineCallbacks
    def test_props(self):
        yield self.stack.tunnels.update_config("my-tunnel", self.account["id"], {
            "target": {"url": "http://localhost:3000"}, "transport": {"ws": {"enabled": True}}})
        conn = FakeConnection("my-tunnel", peer="203.0.113.9", registry=self.stack.registry)
        yield self.stack.tunnels.register(conn, self.account["id"])
        now = model.iso_timestamp(self.stack.clock.seconds())
        tunnel = yield self.stack.tunnels.get("my-tunnel")
        token = tunnel["transport"]["token"]
        r = yield self.request("GET", "/v1/admin/tunnel/my-tunnel", headers={"Host": "admin.local:8081"})
        self.assertEqual(r.code, 200)
        self.assertEqual(r.content_type, JSON)
        self.assertEqual(r.json(), {
            "tunnel_id": "my-tunnel",
            "account_id": self.account["id"],
            "connection": {"connected": True, "connected_at": now, "alive_at": now},
            "connections": [{
                "connection_id": conn.connection_id, "node_id": NODE_ID, "peer": "203.0.113.9",
                "connected": True, "connected_at": now, "alive_at": now,
            }],
            "transport": {
                "token": token,
                "max_connections": 2,
                "ws": {"enabled": True,
                       "url": "ws://admin.local:8081/v1/tunnel/my-tunnel/ws-endpoint?t=" + token},
                "ssh": {"enabled": False, "host": "admin.local", "port": 2200, "username": "my-tunnel",
                        "password": token, "url": "ssh://my-tunnel:%s@admin.local:2200" % token,
                        "fingerprint": "SHA256:fp"},
            },
            "ingress": {"http": {"enabled": False, "urls": [], "alt_names": []},
                        "sni": {"enabled": False, "urls": []}},
            "target": {"url": "http://localhost:3000"},
            "created_at": tunnel["created_at"],
            "updated_at": tunnel["updated_at"],
        })
        self.assertEqual(list(r.json()), ["tunnel_id", "account_id", "connection", "connections",
                                          "transport", "ingress", "target", "created_at", "updated_at"])

    @defer.inlineCallbacks
    def test_get_missing(self):
        r = yield self.request("GET", "/v1/admin/tunnel/nope-nope")
        self.assertJSON(r, 404, '{"error":"TUNNEL_NOT_FOUND"}')

    @defer.inlineCallbacks
    def test_storage_unavailable(self):
        self.storage.failing = True
        r = yield self.request("GET", "/v1/admin/tunnel/my-tunnel")
        self.assertJSON(r, 503, {"error": "UNKNOWN_ERROR", "details": "storage_unavailable"})

    @defer.inlineCallbacks
    def test_delete(self):
        conn = FakeConnection("my-tunnel", registry=self.stack.registry)
        yield self.stack.tunnels.register(conn, self.account["id"])
        r = yield self.request("DELETE", "/v1/admin/tunnel/my-tunnel")
        self.assertEqual(r.code, 204)
        self.assertEqual(len(conn.disconnected), 1)
        account = yield self.stack.accounts.get(self.account["id"])
        self.assertEqual(account["tunnels"], [])
        r = yield self.request("DELETE", "/v1/admin/tunnel/my-tunnel")
        self.assertJSON(r, 403, '{"error":"UNKNOWN_ERROR","details":"no_such_tunnel"}')

    @defer.inlineCallbacks
    def test_disconnect(self):
        conn = FakeConnection("my-tunnel", registry=self.stack.registry)
        yield self.stack.tunnels.register(conn, self.account["id"])
        r = yield self.request("POST", "/v1/admin/tunnel/my-tunnel/disconnect")
        self.assertJSON(r, 200, '{"result":true}')
        self.assertEqual(len(conn.disconnected), 1)
        r = yield self.request("POST", "/v1/admin/tunnel/nope-nope/disconnect")
        self.assertJSON(r, 403, '{"details":"no_such_tunnel"}')

    @defer.inlineCallbacks
    def test_list(self):
        for i in range(30):
            yield self.stack.tunnels.create("tunnel-%02d" % i, self.account["id"])
        seen, cursor = [], None
        while True:
            query = "?count=7&verbose=true" + ("&cursor=" + cursor if cursor else "")
            r = yield self.request("GET", "/v1/admin/tunnel" + query)
            self.assertEqual(r.code, 200)
            seen.extend(r.json()["tunnels"])
            cursor = r.json()["cursor"]
            if not cursor:
                break
        self.assertEqual(len(seen), 31)
        self.assertEqual({t["tunnel_id"] for t in seen},
                         {"my-tunnel"} | {"tunnel-%02d" % i for i in range(30)})
        self.assertEqual(seen[0]["account_id"], self.account["id"])
        r = yield self.request("GET", "/v1/admin/tunnel?count=100")
        self.assertEqual(len(r.json()["tunnels"]), 31)
        self.assertIsInstance(r.json()["tunnels"][0], str)


class ClusterTests(AdminAPITestCase):
    @defer.inlineCallbacks
    def test_nodes(self):
        r = yield self.request("GET", "/v1/admin/cluster")
        self.assertJSON(r, 200, {"nodes": [{
            "node_id": NODE_ID, "host": "1@test", "ip": "10.0.0.5",
            "alive_at": model.iso_timestamp(self.stack.clock.seconds()),
            "alive_age": 0, "is_stale": False,
        }]})


class SharedPortTests(ResponseAssertions, unittest.TestCase):
    """Interface and API on one port, routed by path."""

    @defer.inlineCallbacks
    def setUp(self):
        self.stack = Stack(config=make_config(admin_api_key=KEY))
        yield self.stack.open()
        self.readiness = Readiness(started=True, ready=True)
        self.interface = AdminInterface(self.readiness)
        self.api = AdminAPI(self.stack.config, self.stack.accounts, self.stack.tunnels,
                            self.stack.registry)

    @defer.inlineCallbacks
    def test_both(self):
        server = HTTPServer(self, admin_resource(self.interface, self.api))
        r = yield server.request("GET", "/ping")
        self.assertText(r, 200, "OK")
        r = yield server.request("GET", "/health")
        self.assertText(r, 200, "OK")
        r = yield server.request("GET", "/v1/admin/tunnel", headers=key_header())
        self.assertJSON(r, 200, {"cursor": None, "tunnels": []})
        r = yield server.request("GET", "/v1/admin/cluster", headers=key_header())
        self.assertJSON(r, 200, {"nodes": []})
        r = yield server.request("GET", "/other")
        self.assertText(r, 404, "Not Found")

    @defer.inlineCallbacks
    def test_interface_only(self):
        server = HTTPServer(self, admin_resource(self.interface, None))
        r = yield server.request("GET", "/ping")
        self.assertEqual(r.code, 200)
        r = yield server.request("GET", "/v1/admin/tunnel", headers=key_header())
        self.assertText(r, 404, "Not Found")

    @defer.inlineCallbacks
    def test_api_only(self):
        server = HTTPServer(self, admin_resource(None, self.api))
        r = yield server.request("GET", "/ping")
        self.assertText(r, 404, "Not Found")
        r = yield server.request("GET", "/v1/admin/tunnel", headers=key_header())
        self.assertEqual(r.code, 200)
