"""Two real `ExposrService`s in this process, one on 127.0.0.1 and one on
127.0.0.2 (same ports), clustered over the real Redis at 127.0.0.1:6379 on a
channel of their own per run, sharing storage in the Redis db of the storage
tests (`tests.test_storage.REDIS_DB`; only the records made here are touched,
and deleted at the end).
"""

import base64
import json
import uuid

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from exposr.config import Config
from exposr.connections import new_connection_id
from exposr.server import ExposrService
from tests.e2e_support import wait_until, within
from tests.support import FakeConnection
from tests.test_storage import REDIS_DB

ADMIN_KEY = "admin-key-for-the-cluster-test"


class TwoNodesOverRedisTests(unittest.TestCase):
    def make_node(self, ip, channel, api_port=0, admin_port=0, discovery_wait=0):
        config = Config(
            ingress_http_url="http://localhost",
            api_port=api_port,
            ingress_http_port=api_port,
            admin_api_enable=True,
            admin_api_port=admin_port,
            admin_api_key=ADMIN_KEY,
            listen_address=ip,
            cluster="redis",
            cluster_key="cluster-test-key",
            cluster_redis_url="redis://127.0.0.1:6379",
            cluster_redis_channel=channel,
            cluster_discovery_wait=discovery_wait,
            cluster_node_ip=ip,
            storage_url="redis://127.0.0.1:6379/%d" % REDIS_DB,
        )
        service = ExposrService(config, reactor)
        service.startService()
        self.addCleanup(lambda: within(defer.maybeDeferred(service.stopService), 15))
        return service

    @defer.inlineCallbacks
    def get_json(self, url):
        agent = Agent(reactor)
        response = yield within(agent.request(
            b"GET", url.encode("ascii"), Headers({b"authorization": [b"Bearer " + base64.b64encode(ADMIN_KEY.encode("ascii"))]})))
        body = yield within(readBody(response))
        return response.code, json.loads(body)

    @defer.inlineCallbacks
    def test_tunnel_connected_on_one_node_seen_by_the_other(self):
        channel = "exposr-test-%s" % uuid.uuid4().hex
        a = self.make_node("127.0.0.1", channel)
        yield within(a.when_started())
        # the same ports on the other address (every node of a cluster listens on the same ports)
        api_port = a.listeners["api"].address.port
        admin_port = a.listeners["admin-api"].address.port
        # (B waits a little for peers before it is ready, as multi-node servers do)
        b = self.make_node("127.0.0.2", channel, api_port=api_port, admin_port=admin_port, discovery_wait=0.2)
        yield within(b.when_started())
        self.assertTrue(b.readiness.ready)
        # A heard B's start-up heartbeat
        self.assertEqual([n["node_id"] for n in a.cluster.membership.view()], [a.node.id, b.node.id])

        account = yield within(a.accounts.create())
        self.addCleanup(lambda: within(a.tunnels.delete_account(account["id"])))
        tunnel_id = "cluster-test-%s" % uuid.uuid4().hex[:12]
        tunnel = yield within(a.tunnels.create(tunnel_id, account["id"]))
        self.assertIsNotNone(tunnel)

        conn = FakeConnection(tunnel_id, peer="192.0.2.7", connection_id=new_connection_id(a.node.id),
                              registry=a.registry)
        registered = yield within(a.tunnels.register(conn, account["id"]))
        self.assertTrue(registered)

        # A announces the connection at once: B shows the tunnel connected, on A
        yield wait_until(lambda: b.registry.is_connected(tunnel_id))
        [record] = b.registry.state(tunnel_id)["connections"]
        self.assertEqual((record["connection_id"], record["node"], record["peer"], record["local"]),
                         (conn.connection_id, a.node.id, "192.0.2.7", False))
        route = b.router.route(tunnel_id)
        self.assertTrue(route.remote)
        self.assertEqual((route.endpoint.ip, route.endpoint.port), ("127.0.0.1", api_port))

        # B's admin API lists both nodes, itself first
        code, body = yield self.get_json("http://127.0.0.2:%d/v1/admin/cluster" % admin_port)
        self.assertEqual(code, 200)
        nodes = body["nodes"]
        self.assertEqual([(n["node_id"], n["ip"], n["is_stale"]) for n in nodes],
                         [(b.node.id, "127.0.0.2", False), (a.node.id, "127.0.0.1", False)])
        self.assertEqual(nodes[1]["host"], a.node.host)
        self.assertGreaterEqual(nodes[1]["alive_age"], 0)

        # a disconnect asked on B closes the connection held by A
        yield within(b.cluster.disconnect(tunnel_id))
        yield wait_until(lambda: conn.disconnected and not b.registry.is_connected(tunnel_id))
        self.assertFalse(a.registry.is_connected(tunnel_id))
