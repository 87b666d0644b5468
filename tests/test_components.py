"""The wired server in-process: the shared port's owners and API body limits."""

import json

from twisted.internet import defer, reactor
from twisted.trial import unittest

from exposr.config import Config
from exposr.server import ExposrService
from tests import procs


class InProcessServerTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        config = Config(
            ingress_http_url="http://example.test", api_port=0, ingress_http_port=0,
            allow_registration=True, listen_address="127.0.0.1",
        )
        self.server = ExposrService(config, reactor)
        self.server.startService()
        yield self.server.when_started()
        self.addCleanup(self.server.stopService)
        self.base = f"http://127.0.0.1:{self.server.listeners['api'].address.port}"

    @defer.inlineCallbacks
    def _tunnel(self):
        status, body = yield procs.http("POST", self.base + "/v1/account", b"{}")
        account = json.loads(body)["account_id"]
        status, body = yield procs.http("GET", f"{self.base}/v1/account/{account}/token")
        return {"Authorization": "Bearer " + json.loads(body)["token"]}

    @defer.inlineCallbacks
    def test_oversized_api_body_is_400_and_not_stored(self):
        auth = yield self._tunnel()
        big = b'{"target":{"url":"http://x/' + b"a" * (2 * 1024 * 1024) + b'"}}'
        status, body = yield procs.http("PUT", self.base + "/v1/tunnel/big-one", big, auth)
        self.assertEqual(status, 400)
        self.assertEqual(json.loads(body), {"error": "BAD_INPUT", "field": "content-type: request entity too large"})

    @defer.inlineCallbacks
    def test_api_ingress_and_ws_endpoint_share_the_port(self):
        auth = yield self._tunnel()
        status, body = yield procs.http("PUT", self.base + "/v1/tunnel/shared-port", b"{}", auth)
        self.assertEqual(status, 200)
        info = json.loads(body)
        self.assertTrue(info["transport"]["ws"]["url"].startswith("ws://127.0.0.1:"))
        # the ingress owns <tunnel>.<domain>: a known tunnel that is not connected
        status, body = yield procs.http("GET", self.base + "/", headers={"Host": "shared-port.example.test"})
        self.assertEqual((status, json.loads(body)), (503, {"error": "TUNNEL_NOT_CONNECTED"}))
        status, body = yield procs.http("GET", self.base + "/", headers={"Host": "nope.example.test"})
        self.assertEqual((status, json.loads(body)), (404, {"error": "TUNNEL_NOT_FOUND"}))
        # the bare domain is the API's
        status, body = yield procs.http("GET", self.base + "/v1/tunnel/shared-port", headers={**auth, "Host": "example.test"})
        self.assertEqual(status, 200)


class BoundPortTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_ssh_port_zero_advertises_the_bound_port(self):
        config = Config(
            ingress_http_url="http://example.test", api_port=0, ingress_http_port=0, transport=("ws", "ssh"),
            transport_ssh_port=0, allow_registration=True, listen_address="127.0.0.1",
        )
        server = ExposrService(config, reactor)
        server.startService()
        yield server.when_started()
        self.addCleanup(server.stopService)
        base = f"http://127.0.0.1:{server.listeners['api'].address.port}"
        status, body = yield procs.http("POST", base + "/v1/account", b"{}")
        account = json.loads(body)["account_id"]
        status, body = yield procs.http("GET", f"{base}/v1/account/{account}/token")
        auth = {"Authorization": "Bearer " + json.loads(body)["token"]}
        status, body = yield procs.http("PUT", base + "/v1/tunnel/port-zero", b"{}", auth)
        ssh = json.loads(body)["transport"]["ssh"]
        self.assertNotEqual(server.ssh.port, 0)
        self.assertEqual(ssh["port"], server.ssh.port)
        self.assertTrue(ssh["url"].endswith(f"@127.0.0.1:{server.ssh.port}"))
