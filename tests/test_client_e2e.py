"""The Python exposr client against the real server, in process, on port 0."""

import io

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from exposr.client import cli
from exposr.client.rest import ApiClient
from tests.test_client_fakes import real_server_and_target, within


class RealServerTests(unittest.TestCase):
    def setUp(self):
        return real_server_and_target(self, body=b"hello through the tunnel")

    @defer.inlineCallbacks
    def ingress_get(self, tunnel_id, path):
        agent = Agent(reactor)
        response = yield agent.request(
            b"GET", f"http://127.0.0.1:{self.port}{path}".encode(),
            Headers({"Host": [f"{tunnel_id}.localhost.test"]}))
        body = yield readBody(response)
        return response.code, body

    @defer.inlineCallbacks
    def test_connect_proxy_and_cleanup(self):
        out, err = io.StringIO(), io.StringIO()
        c = cli.Cli(reactor, out, err, environ={})
        done = within(c.run(["-s", self.server_url, "tunnel", "connect", "e2e-tunnel",
                             self.target_url]), 20)
        info = yield within(c.connected)
        self.assertEqual(info["target"]["url"], self.target_url + "/")
        yield within(c.connector.wait_connections(info["transport"]["max_connections"]))
        self.assertIn("Ingress HTTP: http://e2e-tunnel.localhost.test/", out.getvalue())
        code, body = yield within(self.ingress_get("e2e-tunnel", "/hello"))
        self.assertEqual((code, body), (200, b"hello through the tunnel"))

        account = out.getvalue().split("Created account ")[1].split()[0]
        api = ApiClient(reactor, self.server_url, account)
        info = yield within(api.get_tunnel("e2e-tunnel"))
        self.assertEqual(info["connection"]["connections"], info["transport"]["max_connections"])

        yield within(c.shutdown(), 10)
        exit_code = yield done
        self.assertEqual((exit_code, err.getvalue()), (0, ""))
        self.assertIn("Tunnel e2e-tunnel deleted", out.getvalue())
        with self.assertRaises(Exception) as cm:
            yield within(api.get_tunnel("e2e-tunnel"))
        self.assertEqual(cm.exception.code, "TUNNEL_NOT_FOUND")
