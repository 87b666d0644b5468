"""The tunnel service, at service level."""

from twisted.internet import defer
from twisted.trial import unittest

from exposr import model
from exposr.tunnels import (
    BadAltNames,
    IngressAdministrativelyDisabled,
    NoAltNames,
    PermissionDenied,
    TunnelNotFound,
)
from tests.support import FakeConnection, Stack, make_config


class AcceptAll(NoAltNames):
    def update(self, tunnel, requested):
        return defer.succeed(list(requested))


class RecordingAltNames(NoAltNames):
    def __init__(self):
        self.released = []

    def release(self, tunnel):
        self.released.append(tunnel["id"])
        return defer.succeed(None)


class TunnelServiceTests(unittest.TestCase):
    def setUp(self):
        self.stack = Stack()
        return self.stack.open()

    @defer.inlineCallbacks
    def test_create_and_get(self):
        account, tunnel = yield self.stack.account_and_tunnel("my-tunnel")
        self.assertEqual(tunnel["id"], "my-tunnel")
        self.assertEqual(tunnel["account"], account["id"])
        self.assertEqual(len(tunnel["transport"]["token"]), 86)
        self.assertEqual(tunnel["transport"]["max_connections"], 1)
        got = yield self.stack.tunnels.get_owned("my-tunnel", account["id"])
        self.assertEqual(got, tunnel)
        self.assertEqual(got["created_at"], model.iso_timestamp(self.stack.clock.seconds()))
        account = yield self.stack.accounts.get(account["id"])
        self.assertEqual(account["tunnels"], ["my-tunnel"])
        stored = yield self.stack.storage.get("tunnel", "my-tunnel")
        self.assertEqual(
            list(stored),
            ["transport", "ingress", "target", "id", "account", "created_at", "updated_at"],
        )

    @defer.inlineCallbacks
    def test_create_existing(self):
        account, _ = yield self.stack.account_and_tunnel("my-tunnel")
        other = yield self.stack.accounts.create()
        again = yield self.stack.tunnels.create("my-tunnel", other["id"])
        self.assertIsNone(again)
        again = yield self.stack.tunnels.create("my-tunnel", account["id"])
        self.assertIsNone(again)

    @defer.inlineCallbacks
    def test_create_without_account(self):
        tunnel = yield self.stack.tunnels.create("my-tunnel", "MPW4YDYVNPFXVV2D")
        self.assertIsNone(tunnel)
        stored = yield self.stack.tunnels.get("my-tunnel")
        self.assertIsNone(stored)

    @defer.inlineCallbacks
    def test_get_owned_foreign(self):
        yield self.stack.account_and_tunnel("my-tunnel")
        other = yield self.stack.accounts.create()
        got = yield self.stack.tunnels.get_owned("my-tunnel", other["id"])
        self.assertIsNone(got)

    @defer.inlineCallbacks
    def test_update_target_keeps_created_at(self):
        account, tunnel = yield self.stack.account_and_tunnel()
        self.stack.clock.advance(5)
        updated = yield self.stack.tunnels.update_config(
            "my-tunnel", account["id"], {"target": {"url": "http://example.com"}}
        )
        self.assertEqual(updated["target"], {"url": "http://example.com"})
        self.assertEqual(updated["created_at"], tunnel["created_at"])
        self.assertEqual(updated["updated_at"], model.iso_timestamp(self.stack.clock.seconds()))
        got = yield self.stack.tunnels.get("my-tunnel")
        self.assertEqual(got, updated)
        cleared = yield self.stack.tunnels.update_config(
            "my-tunnel", account["id"], {"target": {"url": None}}
        )
        self.assertEqual(cleared["target"], {})

    @defer.inlineCallbacks
    def test_update_flags_and_ingress(self):
        account, _ = yield self.stack.account_and_tunnel()
        updated = yield self.stack.tunnels.update_config(
            "my-tunnel",
            account["id"],
            {"ingress": {"http": {"enabled": True}}, "transport": {"ws": {"enabled": True}}},
        )
        self.assertEqual(
            updated["ingress"]["http"],
            {
                "enabled": True,
                "url": "http://my-tunnel.localhost:8080/",
                "urls": ["http://my-tunnel.localhost:8080/"],
                "alt_names": [],
            },
        )
        self.assertTrue(updated["transport"]["ws"]["enabled"])
        self.assertFalse(updated["transport"]["ssh"]["enabled"])

    @defer.inlineCallbacks
    def test_update_errors(self):
        account, _ = yield self.stack.account_and_tunnel()
        other = yield self.stack.accounts.create()
        yield self.assertFailure(
            self.stack.tunnels.update_config("my-tunnel", other["id"], {}), PermissionDenied
        )
        yield self.assertFailure(
            self.stack.tunnels.update_config("nope-nope", account["id"], {}), TunnelNotFound
        )
        yield self.assertFailure(
            self.stack.tunnels.update_config(
                "my-tunnel", account["id"], {"ingress": {"sni": {"enabled": True}}}
            ),
            IngressAdministrativelyDisabled,
        )

    @defer.inlineCallbacks
    def test_http_disabled_on_server(self):
        self.stack = Stack(config=make_config(ingress=("sni",)))
        account, _ = yield self.stack.account_and_tunnel()
        yield self.assertFailure(
            self.stack.tunnels.update_config(
                "my-tunnel", account["id"], {"ingress": {"http": {"enabled": True}}}
            ),
            IngressAdministrativelyDisabled,
        )
        updated = yield self.stack.tunnels.update_config(
            "my-tunnel", account["id"], {"ingress": {"http": {"enabled": False}}}
        )
        self.assertFalse(updated["ingress"]["http"]["enabled"])

    @defer.inlineCallbacks
    def test_sni(self):
        self.stack = Stack(
            config=make_config(ingress=("http", "sni")),
            sni_url_for="tcps://{}.example.com:4430".format,
        )
        account, _ = yield self.stack.account_and_tunnel()
        updated = yield self.stack.tunnels.update_config(
            "my-tunnel", account["id"], {"ingress": {"sni": {"enabled": True}}}
        )
        self.assertEqual(
            updated["ingress"]["sni"],
            {"enabled": True, "url": "tcps://my-tunnel.example.com:4430",
             "urls": ["tcps://my-tunnel.example.com:4430"]},
        )

    @defer.inlineCallbacks
    def test_sni_passthrough_is_stored_and_survives_disable(self):
        self.stack = Stack(
            config=make_config(ingress=("http", "sni")),
            sni_url_for="tcps://{}.example.com:4430".format,
        )
        account, _ = yield self.stack.account_and_tunnel()
        tunnels = self.stack.tunnels
        updated = yield tunnels.update_config(
            "my-tunnel", account["id"], {"ingress": {"sni": {"enabled": True, "passthrough": True}}}
        )
        self.assertIs(updated["ingress"]["sni"]["passthrough"], True)
        updated = yield tunnels.update_config("my-tunnel", account["id"], {"ingress": {"sni": {"enabled": False}}})
        self.assertEqual(updated["ingress"]["sni"], {"enabled": False, "urls": [], "passthrough": True})
        stored = yield tunnels.get("my-tunnel")
        self.assertIs(stored["ingress"]["sni"]["passthrough"], True)
        updated = yield tunnels.update_config("my-tunnel", account["id"], {"ingress": {"sni": {"passthrough": False}}})
        self.assertNotIn("passthrough", updated["ingress"]["sni"])

    @defer.inlineCallbacks
    def test_alt_names_default_refuses_new(self):
        account, _ = yield self.stack.account_and_tunnel()
        failure = yield self.assertFailure(
            self.stack.tunnels.update_config(
                "my-tunnel", account["id"],
                {"ingress": {"http": {"alt_names": ["a.example.com", "b.example.com"]}}},
            ),
            BadAltNames,
        )
        self.assertEqual(str(failure), "a.example.com, b.example.com")
        # the same (empty) set is not verified
        yield self.stack.tunnels.update_config(
            "my-tunnel", account["id"], {"ingress": {"http": {"alt_names": []}}}
        )
        yield self.stack.tunnels.update_config(
            "my-tunnel", account["id"], {"ingress": {"http": {"alt_names": None}}}
        )

    @defer.inlineCallbacks
    def test_alt_names_granted(self):
        self.stack = Stack(altnames=AcceptAll())
        account, _ = yield self.stack.account_and_tunnel()
        updated = yield self.stack.tunnels.update_config(
            "my-tunnel", account["id"],
            {"ingress": {"http": {"enabled": True, "alt_names": ["Example.NET", "example.net"]}}},
        )
        self.assertEqual(updated["ingress"]["http"]["alt_names"], ["example.net"])
        self.assertEqual(updated["ingress"]["http"]["urls"],
                         ["http://my-tunnel.localhost:8080/", "http://example.net:8080/"])
        cleared = yield self.stack.tunnels.update_config(
            "my-tunnel", account["id"], {"ingress": {"http": {"alt_names": None}}}
        )
        self.assertEqual(cleared["ingress"]["http"]["alt_names"], [])

    @defer.inlineCallbacks
    def test_delete(self):
        altnames = RecordingAltNames()
        self.stack = Stack(altnames=altnames)
        account, _ = yield self.stack.account_and_tunnel()
        conn = FakeConnection("my-tunnel", registry=self.stack.registry)
        yield self.stack.tunnels.register(conn, account["id"])
        other = yield self.stack.accounts.create()
        yield self.assertFailure(self.stack.tunnels.delete("my-tunnel", other["id"]), PermissionDenied)
        deleted = yield self.stack.tunnels.delete("my-tunnel", account["id"])
        self.assertTrue(deleted)
        self.assertEqual(len(conn.disconnected), 1)
        self.assertEqual(altnames.released, ["my-tunnel"])
        yield self.assertFailure(self.stack.tunnels.update_config("my-tunnel", account["id"], {}),
                                 TunnelNotFound)
        yield self.assertFailure(self.stack.tunnels.delete("my-tunnel"), TunnelNotFound)
        account = yield self.stack.accounts.get(account["id"])
        self.assertEqual(account["tunnels"], [])

    @defer.inlineCallbacks
    def test_disconnect(self):
        account, _ = yield self.stack.account_and_tunnel()
        other = yield self.stack.accounts.create()
        conn = FakeConnection("my-tunnel", registry=self.stack.registry)
        yield self.stack.tunnels.register(conn, account["id"])
        result = yield self.stack.tunnels.disconnect("my-tunnel", other["id"])
        self.assertFalse(result)
        self.assertEqual(conn.disconnected, [])
        result = yield self.stack.tunnels.disconnect("my-tunnel", account["id"])
        self.assertTrue(result)
        self.assertEqual(len(conn.disconnected), 1)
        yield self.assertFailure(self.stack.tunnels.disconnect("nope-nope"), TunnelNotFound)

    @defer.inlineCallbacks
    def test_authorize(self):
        account, tunnel = yield self.stack.account_and_tunnel()
        token = tunnel["transport"]["token"]
        result = yield self.stack.tunnels.authorize("my-tunnel", token)
        self.assertEqual(result[0]["id"], "my-tunnel")
        self.assertEqual(result[1]["id"], account["id"])
        for bad in ("", token[:-1], token + "x", "x" * 86, None):
            refused = yield self.stack.tunnels.authorize("my-tunnel", bad)
            self.assertIsNone(refused, bad)
        refused = yield self.stack.tunnels.authorize("nope-nope", token)
        self.assertIsNone(refused)

    @defer.inlineCallbacks
    def test_authorize_deleted_account(self):
        account, tunnel = yield self.stack.account_and_tunnel()
        yield self.stack.storage.delete("account", account["id"])
        refused = yield self.stack.tunnels.authorize("my-tunnel", tunnel["transport"]["token"])
        self.assertIsNone(refused)

    @defer.inlineCallbacks
    def test_authorize_self_heals(self):
        account, tunnel = yield self.stack.account_and_tunnel()
        yield self.stack.accounts.remove_tunnel(account["id"], "my-tunnel")
        result = yield self.stack.tunnels.authorize("my-tunnel", tunnel["transport"]["token"])
        self.assertEqual(result[1]["tunnels"], ["my-tunnel"])
        yield self.stack.tunnels.authorize("my-tunnel", tunnel["transport"]["token"])
        account = yield self.stack.accounts.get(account["id"])
        self.assertEqual(account["tunnels"], ["my-tunnel"])

    @defer.inlineCallbacks
    def test_rotate_token(self):
        account, tunnel = yield self.stack.account_and_tunnel()
        rotated = yield self.stack.tunnels.rotate_token("my-tunnel")
        self.assertNotEqual(rotated["transport"]["token"], tunnel["transport"]["token"])
        self.assertEqual(len(rotated["transport"]["token"]), 86)
        old = yield self.stack.tunnels.authorize("my-tunnel", tunnel["transport"]["token"])
        self.assertIsNone(old)

    @defer.inlineCallbacks
    def test_concurrent_updates_serialise(self):
        account, _ = yield self.stack.account_and_tunnel()
        ds = [
            self.stack.tunnels.update_config("my-tunnel", account["id"],
                                             {"target": {"url": "http://a%d.com" % i}})
            for i in range(5)
        ]
        yield defer.gatherResults(ds)
        got = yield self.stack.tunnels.get("my-tunnel")
        self.assertEqual(got["target"]["url"], "http://a4.com")

    @defer.inlineCallbacks
    def test_list(self):
        account = yield self.stack.accounts.create()
        for i in range(100):
            yield self.stack.tunnels.create("tunnel-%03d" % i, account["id"])
        for verbose in (False, True):
            cursor, seen = None, []
            while True:
                cursor, tunnels = yield self.stack.tunnels.list(cursor, 10, verbose)
                seen.extend(tunnels)
                if not cursor:
                    break
            self.assertEqual(len(seen), 100)
            ids = [t["id"] for t in seen] if verbose else seen
            self.assertEqual(sorted(ids), ["tunnel-%03d" % i for i in range(100)])
