"""The account service."""

from twisted.internet import defer
from twisted.trial import unittest

from exposr import model
from exposr.tunnels import TunnelNotFound
from tests.support import FakeConnection, Stack


class AccountServiceTests(unittest.TestCase):
    def setUp(self):
        self.stack = Stack()
        return self.stack.open()

    @defer.inlineCallbacks
    def test_create(self):
        account = yield self.stack.accounts.create()
        self.assertTrue(model.is_valid_account_id(account["id"]))
        self.assertEqual(account["accountId"], account["id"])
        self.assertEqual(account["created_at"], account["updated_at"])
        self.assertEqual(account["created_at"], model.iso_timestamp(self.stack.clock.seconds()))
        again = yield self.stack.accounts.get(account["id"])
        self.assertEqual(again, account)
        stored = yield self.stack.storage.get("account", account["id"])
        self.assertEqual(list(stored), ["accountId", "id", "created_at", "updated_at", "tunnels", "status"])

    @defer.inlineCallbacks
    def test_get_any_spelling(self):
        account = yield self.stack.accounts.create()
        hr = model.format_account_id(account["id"])
        for spelling in (hr, hr.lower(), hr.replace("-", " "), account["id"]):
            found = yield self.stack.accounts.get(spelling)
            self.assertEqual(found["id"], account["id"])
        missing = yield self.stack.accounts.get("not an account")
        self.assertIsNone(missing)

    @defer.inlineCallbacks
    def test_create_retries_on_collision(self):
        existing = yield self.stack.accounts.create()
        ids = [existing["id"], "MPW4YDYVNPFXVV2D"]
        self.stack.accounts.generate_id = lambda: ids.pop(0)
        account = yield self.stack.accounts.create()
        self.assertEqual(account["id"], "MPW4YDYVNPFXVV2D")
        self.assertEqual(ids, [])

    @defer.inlineCallbacks
    def test_create_gives_up(self):
        existing = yield self.stack.accounts.create()
        calls = []

        def same():
            calls.append(1)
            return existing["id"]

        self.stack.accounts.generate_id = same
        account = yield self.stack.accounts.create()
        self.assertIsNone(account)
        self.assertEqual(len(calls), 101)

    @defer.inlineCallbacks
    def test_disable_enable(self):
        account = yield self.stack.accounts.create()
        self.stack.clock.advance(10)
        disabled = yield self.stack.accounts.set_disabled(account["id"], True, "spam")
        self.assertEqual(disabled["status"]["disabled"], True)
        self.assertEqual(disabled["status"]["disabled_reason"], "spam")
        self.assertEqual(disabled["status"]["disabled_at"], model.iso_timestamp(self.stack.clock.seconds()))
        self.assertEqual(disabled["updated_at"], disabled["status"]["disabled_at"])
        self.assertNotEqual(disabled["updated_at"], disabled["created_at"])
        enabled = yield self.stack.accounts.set_disabled(account["id"], False)
        self.assertEqual(enabled["status"], {"disabled": False})
        stored = yield self.stack.accounts.get(account["id"])
        self.assertEqual(stored["status"], {"disabled": False})

    @defer.inlineCallbacks
    def test_disable_without_reason(self):
        account = yield self.stack.accounts.create()
        disabled = yield self.stack.accounts.set_disabled(account["id"], True)
        self.assertNotIn("disabled_reason", disabled["status"])
        missing = yield self.stack.accounts.set_disabled("MPW4YDYVNPFXVV2D", True)
        self.assertIsNone(missing)

    @defer.inlineCallbacks
    def test_disable_disconnects_and_refuses_authorization(self):
        account, tunnel = yield self.stack.account_and_tunnel()
        conn = FakeConnection("my-tunnel", registry=self.stack.registry)
        ok = yield self.stack.tunnels.register(conn, account["id"])
        self.assertTrue(ok)
        tunnel = yield self.stack.tunnels.get("my-tunnel")
        token = tunnel["transport"]["token"]
        yield self.stack.tunnels.set_account_disabled(account["id"], True, "spam")
        self.assertEqual(len(conn.disconnected), 1)
        self.assertFalse(self.stack.registry.state("my-tunnel")["connected"])
        auth = yield self.stack.tunnels.authorize("my-tunnel", token)
        self.assertIsNone(auth)

    @defer.inlineCallbacks
    def test_tunnel_bookkeeping(self):
        account, tunnel = yield self.stack.account_and_tunnel("first")
        account = yield self.stack.accounts.get(account["id"])
        self.assertEqual(account["tunnels"], ["first"])
        yield self.stack.tunnels.create("second", account["id"])
        account = yield self.stack.accounts.get(account["id"])
        self.assertEqual(account["tunnels"], ["first", "second"])
        yield self.stack.tunnels.delete("first", account["id"])
        account = yield self.stack.accounts.get(account["id"])
        self.assertEqual(account["tunnels"], ["second"])

    @defer.inlineCallbacks
    def test_add_tunnel_no_duplicates(self):
        account, _ = yield self.stack.account_and_tunnel("first")
        yield self.stack.accounts.add_tunnel(account["id"], "first")
        account = yield self.stack.accounts.get(account["id"])
        self.assertEqual(account["tunnels"], ["first"])

    @defer.inlineCallbacks
    def test_add_tunnel_calls_waiting_for_the_account_share_one_write(self):
        """Calls made while the account is locked: one update appends them all, in order, once each."""
        account, _ = yield self.stack.account_and_tunnel("first")
        storage = self.stack.accounts.storage
        gate = defer.Deferred()
        holding = storage.update("account", account["id"], lambda current: gate)
        updates = []
        real_update = storage.update

        def counting(ns, key, fn):
            updates.append(key)
            return real_update(ns, key, fn)

        self.patch(storage, "update", counting)
        add = self.stack.accounts.add_tunnel
        calls = [add(account["id"], "a"), add(account["id"], "b"), add(account["id"], "a"),
                 add(account["id"], "first"), add(model.format_account_id(account["id"]), "c")]
        gate.callback(None)  # (aborted: nothing written)
        yield holding
        results = yield defer.gatherResults(calls)
        self.assertEqual(updates, [account["id"]])
        for got in (results[0], results[1], results[4]):
            self.assertEqual(got["tunnels"], ["first", "a", "b", "c"])
        self.assertEqual((results[2], results[3]), (None, None))
        results[0]["tunnels"].append("not-stored")
        stored = yield self.stack.accounts.get(account["id"])
        self.assertEqual(stored["tunnels"], ["first", "a", "b", "c"])
        # the next calls make the next update
        again = yield add(account["id"], "d")
        self.assertEqual(again["tunnels"], ["first", "a", "b", "c", "d"])
        self.assertEqual(len(updates), 2)

    @defer.inlineCallbacks
    def test_add_tunnel_to_a_missing_account_or_failing_storage(self):
        add = self.stack.accounts.add_tunnel
        results = yield defer.gatherResults([add("MPW4YDYVNPFXVV2D", "a"), add("MPW4YDYVNPFXVV2D", "b"),
                                             add("not an account", "c")])
        self.assertEqual(results, [None, None, None])
        account = yield self.stack.accounts.create()
        storage = self.stack.accounts.storage
        self.patch(storage, "update", lambda ns, key, fn: defer.fail(RuntimeError("storage broke")))
        failed = [add(account["id"], "a"), add(account["id"], "b")]
        for d in failed:
            yield self.assertFailure(d, RuntimeError)

    @defer.inlineCallbacks
    def test_delete_deletes_tunnels(self):
        account, _ = yield self.stack.account_and_tunnel("first")
        yield self.stack.tunnels.create("second", account["id"])
        deleted = yield self.stack.tunnels.delete_account(account["id"])
        self.assertTrue(deleted)
        for tunnel_id in ("first", "second"):
            tunnel = yield self.stack.tunnels.get(tunnel_id)
            self.assertIsNone(tunnel)
            yield self.assertFailure(self.stack.tunnels.delete(tunnel_id), TunnelNotFound)
        account = yield self.stack.accounts.get(account["id"])
        self.assertIsNone(account)

    @defer.inlineCallbacks
    def test_delete_hr_form(self):
        """The id is normalised before the tunnels are deleted (the original kept them for a readable id)."""
        account, _ = yield self.stack.account_and_tunnel("first")
        deleted = yield self.stack.tunnels.delete_account(model.format_account_id(account["id"]).lower())
        self.assertTrue(deleted)
        tunnel = yield self.stack.tunnels.get("first")
        self.assertIsNone(tunnel)

    @defer.inlineCallbacks
    def test_delete_missing(self):
        deleted = yield self.stack.tunnels.delete_account("MPW4YDYVNPFXVV2D")
        self.assertFalse(deleted)
        deleted = yield self.stack.tunnels.delete_account("garbage")
        self.assertFalse(deleted)

    @defer.inlineCallbacks
    def test_list(self):
        created = set()
        for _ in range(100):
            account = yield self.stack.accounts.create()
            created.add(account["id"])
        for verbose in (False, True):
            seen = []
            cursor = None
            pages = 0
            while True:
                cursor, accounts = yield self.stack.accounts.list(cursor, 10, verbose)
                seen.extend(accounts)
                pages += 1
                if not cursor:
                    break
            self.assertEqual(len(seen), 100)
            self.assertEqual({a["id"] for a in seen}, created)
            self.assertLessEqual(pages, 12)
            if verbose:
                self.assertIn("created_at", seen[0])
            else:
                self.assertEqual(
                    seen[0],
                    {"accountId": seen[0]["id"], "id": seen[0]["id"], "tunnels": [],
                     "status": {"disabled": False}},
                )
