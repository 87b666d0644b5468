"""
Several server processes on one database (PostgreSQL row locks, Redis ``lock:<key>``):

* two OS processes (tests/storage_worker.py, opening the real backend with
  `storage_from_url`) run 25 concurrent atomic updates each of ONE record: the
  counter ends at 50 and every update saw a distinct value;
* two real ``exposrd`` processes on the same database create 25 tunnels each,
  concurrently, for ONE account (every creation is an atomic update of the
  account record): the account lists all 50; each node serves the other's
  records;
* records written in the original's shapes (hand-written JSON) are served by
  the API of both nodes, and can be updated.

PostgreSQL (127.0.0.1:5432, database ``test``) runs in a schema of its own
(``?options=-c search_path=<schema>`` in the storage URL); Redis
(127.0.0.1:6379) uses the database this process leases (tests/redis_db.py),
flushed before and after each test.
"""

import base64
import json
import os
import signal

from twisted.internet import defer, reactor
from twisted.trial import unittest

from exposr.storage import storage_from_url
from exposr.storage.base import table_name
from tests import procs
from tests.redis_db import REDIS_DB

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "storage_worker.py")
PG = dict(host="127.0.0.1", port=5432, user="postgres", dbname="test")

ACCOUNT = "MPW4YDYVNPFXVV2D"
# the original's shapes: an old account record without "status", a tunnel
# record as the original stores it after an update (created_at/updated_at
# dropped), an alt-name registration
LEGACY_ACCOUNT = (
    '{"accountId":"MPW4YDYVNPFXVV2D","id":"MPW4YDYVNPFXVV2D",'
    '"created_at":"2024-02-10T12:34:56.789Z","updated_at":"2024-02-10T12:34:56.789Z",'
    '"tunnels":["legacy-tunnel"]}'
)
LEGACY_TUNNEL = (
    '{"transport":{"token":"' + "A" * 86 + '","max_connections":1,'
    '"ws":{"enabled":true},"ssh":{"enabled":false}},'
    '"ingress":{"http":{"enabled":true,"url":"http://legacy-tunnel.old-host.example:8080/",'
    '"urls":["http://legacy-tunnel.old-host.example:8080/","http://legacy.example.net:8080/"],'
    '"alt_names":["legacy.example.net"]},"sni":{"enabled":false,"urls":[]}},'
    '"target":{"url":"http://legacy-target.example:3000"},'
    '"id":"legacy-tunnel","account":"MPW4YDYVNPFXVV2D"}'
)
LEGACY_ALTNAME = '{"tunnelId":"legacy-tunnel","created_at":"2024-02-10T12:34:56.789Z"}'

_counter = [0]


def unique_name(prefix):
    _counter[0] += 1
    return "%s_%d_%d" % (prefix, os.getpid(), _counter[0])


def within(d, seconds=30):
    return d.addTimeout(seconds, reactor)


def bearer(account):
    return {"Authorization": "Bearer " + base64.b64encode(account.encode("ascii")).decode("ascii")}


class ClusterStorageMixin:
    timeout = 120

    # -- two storage processes, one record ----------------------------------------

    @defer.inlineCallbacks
    def open_storage(self):
        storage = storage_from_url(self.url, reactor)
        yield within(storage.open())
        self.addCleanup(storage.close)
        return storage

    @defer.inlineCallbacks
    def test_two_processes_50_concurrent_updates_of_one_record(self):
        storage = yield self.open_storage()
        created = yield storage.create("tunnel", "counted", {"id": "counted", "counter": 0})
        self.assertTrue(created)
        workers = []
        for _ in range(2):
            proto, transport = procs.spawn([WORKER, self.url, "tunnel", "counted", "25"])
            self.addCleanup(procs.stop, transport, signal.SIGKILL)
            workers.append((proto, transport))
        yield defer.gatherResults([p.wait_for(b"ready\n", 30) for p, _ in workers])
        for _, transport in workers:  # both start together
            transport.write(b"go\n")
        codes = yield within(defer.gatherResults([p.ended for p, _ in workers]), 90)
        outputs = [p.output.decode("utf-8", "replace") for p, _ in workers]
        self.assertEqual(codes, [0, 0], outputs)
        seen = []
        for out in outputs:
            done = [line for line in out.splitlines() if line.startswith("done ")]
            self.assertEqual(len(done), 1, out)
            values = json.loads(done[0][len("done "):])
            self.assertEqual(len(values), 25, out)
            seen.extend(values)
        # no update lost: each one saw a value nobody else saw, 0..49
        self.assertEqual(sorted(seen), list(range(50)))
        record = yield storage.get("tunnel", "counted")
        self.assertEqual(record, {"id": "counted", "counter": 50})

    @defer.inlineCallbacks
    def test_control_get_put_without_lock_loses_updates(self):
        """The same two workers doing get + put: the test above would see it."""
        storage = yield self.open_storage()
        yield storage.create("tunnel", "counted", {"id": "counted", "counter": 0})
        workers = []
        for _ in range(2):
            proto, transport = procs.spawn([WORKER, self.url, "tunnel", "counted", "25", "unlocked"])
            self.addCleanup(procs.stop, transport, signal.SIGKILL)
            workers.append((proto, transport))
        yield defer.gatherResults([p.wait_for(b"ready\n", 30) for p, _ in workers])
        for _, transport in workers:
            transport.write(b"go\n")
        codes = yield within(defer.gatherResults([p.ended for p, _ in workers]), 90)
        self.assertEqual(codes, [0, 0], [p.output for p, _ in workers])
        record = yield storage.get("tunnel", "counted")
        self.assertLess(record["counter"], 50)

    # -- two exposrd processes -------------------------------------------------------

    @defer.inlineCallbacks
    def start_nodes(self, n=2):
        nodes = []
        for _ in range(n):
            api = procs.free_port()
            proto, transport = procs.exposrd(
                "--allow-registration", "--ingress-http-url", f"http://localhost:{api}",
                "--api-port", str(api), "--ingress-http-port", str(api),
                "--listen-address", "127.0.0.1", "--cluster", "single-node",
                "--storage-url", self.url,
            )
            self.addCleanup(self.stop_node, proto, transport)
            nodes.append((proto, transport, f"http://127.0.0.1:{api}"))
        yield defer.gatherResults([p.wait_for(b"exposrd ready", 30) for p, _, _ in nodes])
        return [url for _, _, url in nodes]

    @defer.inlineCallbacks
    def stop_node(self, proto, transport):
        procs.stop(transport, signal.SIGTERM)
        try:
            code = yield within(proto.ended, 20)
        except defer.TimeoutError:
            procs.stop(transport, signal.SIGKILL)
            raise AssertionError("exposrd did not stop on SIGTERM")
        self.assertEqual(code, 0, proto.output[-3000:])
        self.assertNotIn(b"Traceback", proto.output)

    @defer.inlineCallbacks
    def api(self, method, url, body=None, headers=None, expect=None):
        status, data = yield procs.http(method, url, body, headers)
        if expect is not None:
            self.assertEqual(status, expect, (method, url, data))
        try:
            return status, (json.loads(data) if data else None)
        except ValueError:
            return status, data

    @defer.inlineCallbacks
    def test_two_exposrd_nodes_share_accounts_and_tunnels(self):
        a, b = yield self.start_nodes(2)
        _, acct = yield self.api("POST", f"{a}/v1/account", b"{}", expect=201)
        account = acct["account_id"]
        _, tok = yield self.api("GET", f"{b}/v1/account/{acct['account_id_hr']}/token", expect=201)
        auth = {"Authorization": "Bearer " + tok["token"]}

        # 25 tunnel creations on each node at once, all for one account: every
        # creation is an atomic update of the same account record
        names = [f"node-a-{i}" for i in range(25)] + [f"node-b-{i}" for i in range(25)]
        results = yield within(defer.gatherResults([
            self.api("PUT", f"{a if n.startswith('node-a') else b}/v1/tunnel/{n}", b"{}", auth)
            for n in names
        ]), 60)
        self.assertEqual([s for s, _ in results], [200] * 50, results)
        self.assertEqual([info["id"] for _, info in results], names)

        stored = yield self.raw_get("account", account)
        self.assertEqual(sorted(stored["tunnels"]), sorted(names))

        # each node serves what the other one wrote
        _, info = yield self.api("GET", f"{b}/v1/tunnel/node-a-0", headers=auth, expect=200)
        self.assertEqual(info["id"], "node-a-0")
        _, info = yield self.api("GET", f"{a}/v1/tunnel/node-b-0", headers=auth, expect=200)
        self.assertEqual(info["id"], "node-b-0")

        # 25 PATCHes of one tunnel on each node at once
        patches = [
            self.api("PATCH", f"{node}/v1/tunnel/node-a-1",
                     json.dumps({"target": {"url": f"http://t{i}.example:{1000 + i}"}}).encode(), auth)
            for i, node in enumerate([a, b] * 25)
        ]
        results = yield within(defer.gatherResults(patches), 60)
        self.assertEqual([s for s, _ in results], [200] * 50, results)
        _, info_a = yield self.api("GET", f"{a}/v1/tunnel/node-a-1", headers=auth, expect=200)
        _, info_b = yield self.api("GET", f"{b}/v1/tunnel/node-a-1", headers=auth, expect=200)
        self.assertEqual(info_a["target"], info_b["target"])
        self.assertIn(info_a["target"]["url"], [f"http://t{i}.example:{1000 + i}/" for i in range(50)]
                      + [f"http://t{i}.example:{1000 + i}" for i in range(50)])

        # a second account on node B: it cannot read or take the first one's tunnel
        _, other = yield self.api("POST", f"{b}/v1/account", b"{}", expect=201)
        other_auth = bearer(other["account_id"])
        yield self.api("GET", f"{a}/v1/tunnel/node-b-3", headers=other_auth, expect=404)
        yield self.api("PUT", f"{a}/v1/tunnel/node-b-3", b"{}", other_auth, expect=403)
        yield self.api("PUT", f"{b}/v1/tunnel/other-one", b"{}", other_auth, expect=200)
        _, info = yield self.api("GET", f"{a}/v1/tunnel/other-one", headers=other_auth, expect=200)
        self.assertEqual(info["id"], "other-one")

        # delete on one node, gone on the other; the account record follows
        yield self.api("DELETE", f"{b}/v1/tunnel/node-a-2", headers=auth, expect=204)
        yield self.api("GET", f"{a}/v1/tunnel/node-a-2", headers=auth, expect=404)
        stored = yield self.raw_get("account", account)
        self.assertEqual(sorted(stored["tunnels"]), sorted(set(names) - {"node-a-2"}))
        stored = yield self.raw_get("account", other["account_id"])
        self.assertEqual(stored["tunnels"], ["other-one"])

    @defer.inlineCallbacks
    def test_records_in_the_originals_shapes_are_served_by_both_nodes(self):
        a, b = yield self.start_nodes(2)  # the nodes create the tables
        yield self.raw_put("account", ACCOUNT, LEGACY_ACCOUNT)
        yield self.raw_put("tunnel", "legacy-tunnel", LEGACY_TUNNEL)
        yield self.raw_put("ingress-altnames", "http-legacy.example.net", LEGACY_ALTNAME)
        auth = bearer(ACCOUNT)
        for node in (a, b):
            _, info = yield self.api("GET", f"{node}/v1/tunnel/legacy-tunnel", headers=auth, expect=200)
            self.assertEqual(info["id"], "legacy-tunnel")
            self.assertEqual(info["target"], {"url": "http://legacy-target.example:3000"})
            self.assertTrue(info["ingress"]["http"]["enabled"])
            self.assertEqual(info["ingress"]["http"]["alt_names"], ["legacy.example.net"])
            self.assertTrue(info["transport"]["ws"]["enabled"])
            # a foreign account sees nothing; an unknown one is refused
            _, other = yield self.api("POST", f"{node}/v1/account", b"{}", expect=201)
            yield self.api("GET", f"{node}/v1/tunnel/legacy-tunnel",
                           headers=bearer(other["account_id"]), expect=404)
            yield self.api("GET", f"{node}/v1/tunnel/legacy-tunnel",
                           headers=bearer("CDEFHJKMNPRTVWXY"), expect=401)
            # the original's alt-name row routes on both nodes' HTTP ingress: the
            # tunnel is found (not 404 from the API) and reported not connected
            status, body = yield self.api("GET", f"{node}/", headers={"Host": "legacy.example.net"})
            self.assertEqual((status, body), (503, {"error": "TUNNEL_NOT_CONNECTED"}))
        # the token endpoint reads the old account record (no "status")
        _, tok = yield self.api("GET", f"{a}/v1/account/{ACCOUNT}/token", expect=201)
        self.assertEqual("Bearer " + tok["token"], auth["Authorization"])

        # an update through one node is seen by the other; the record keeps its shape
        _, info = yield self.api(
            "PATCH", f"{a}/v1/tunnel/legacy-tunnel",
            json.dumps({"target": {"url": "http://new-target.example:4000"}}).encode(), auth, expect=200)
        _, info = yield self.api("GET", f"{b}/v1/tunnel/legacy-tunnel", headers=auth, expect=200)
        self.assertEqual(info["target"]["url"].rstrip("/"), "http://new-target.example:4000")
        self.assertEqual(info["ingress"]["http"]["alt_names"], ["legacy.example.net"])
        stored = yield self.raw_get("tunnel", "legacy-tunnel")
        self.assertEqual((stored["id"], stored["account"]), ("legacy-tunnel", ACCOUNT))
        self.assertEqual(stored["transport"]["token"], "A" * 86)
        self.assertEqual(stored["ingress"]["http"]["alt_names"], ["legacy.example.net"])
        self.assertIn("updated_at", stored)
        self.assertEqual((yield self.raw_get("ingress-altnames", "http-legacy.example.net")),
                         json.loads(LEGACY_ALTNAME))

        # a tunnel created by a new node is readable in the original's layout
        yield self.api("PUT", f"{b}/v1/tunnel/legacy-two", b"{}", auth, expect=200)
        stored = yield self.raw_get("account", ACCOUNT)
        self.assertEqual(sorted(stored["tunnels"]), ["legacy-tunnel", "legacy-two"])
        stored = yield self.raw_get("tunnel", "legacy-two")
        self.assertEqual(set(stored), {"transport", "ingress", "target", "id", "account",
                                       "created_at", "updated_at"})
        self.assertEqual(len(stored["transport"]["token"]), 86)


class PostgresClusterTests(ClusterStorageMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        from txpostgres import txpostgres

        self.schema = unique_name("exposr_cluster")
        self.admin = txpostgres.Connection(reactor=reactor)
        yield within(self.admin.connect(**PG))
        self.addCleanup(self._drop_schema)
        yield self.admin.runOperation("CREATE SCHEMA %s" % self.schema)
        self.url = "postgres://postgres@127.0.0.1:5432/test?options=-c%%20search_path%%3D%s" % self.schema

    @defer.inlineCallbacks
    def _drop_schema(self):
        yield self.admin.runOperation("DROP SCHEMA IF EXISTS %s CASCADE" % self.schema)
        self.admin.close()

    def raw_put(self, ns, key, text):
        return self.admin.runOperation(
            "INSERT INTO %s.%s (key, value, modified_at) VALUES (%%s, %%s, NOW()) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value" % (self.schema, table_name(ns)),
            (key, text),
        )

    @defer.inlineCallbacks
    def raw_get(self, ns, key):
        rows = yield self.admin.runQuery(
            "SELECT value::text FROM %s.%s WHERE key = %%s" % (self.schema, table_name(ns)), (key,))
        return json.loads(rows[0][0]) if rows else None

    @defer.inlineCallbacks
    def test_url_isolates_the_schema(self):
        """The storage URL's search_path puts the tables in the test schema."""
        yield self.open_storage()
        rows = yield self.admin.runQuery(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY 1",
            (self.schema,))
        self.assertEqual([r[0] for r in rows], ["account", "ingress_altnames", "tunnel"])


class RedisClusterTests(ClusterStorageMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        import txredisapi

        self.admin = yield within(txredisapi.Connection(
            "127.0.0.1", 6379, dbid=REDIS_DB, reconnect=False, convertNumbers=False))
        self.addCleanup(self.admin.disconnect)
        yield self.admin.flushdb()
        self.addCleanup(self.admin.flushdb)
        self.url = "redis://127.0.0.1:6379/%d" % REDIS_DB

    def raw_put(self, ns, key, text):
        return self.admin.set("%s:%s" % (ns, key), text)

    @defer.inlineCallbacks
    def raw_get(self, ns, key):
        text = yield self.admin.get("%s:%s" % (ns, key))
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text) if text is not None else None

    @defer.inlineCallbacks
    def test_no_lock_left_behind(self):
        """After the cross-process updates no ``lock:<key>`` remains."""
        yield self.test_two_processes_50_concurrent_updates_of_one_record()
        self.assertEqual((yield self.admin.keys("lock:*")), [])
