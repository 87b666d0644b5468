"""
Alt names (BYOD) end to end (docs/protocol.rst, "Alt names" and "Routing"):
a real DNS server (twisted.names, UDP, port 0), the full server in process,
the Python client serving a tunnel to a local twisted.web target, and requests
with ``Host: <alt name>`` on the server port.

The customer zone is ``customer.net``; private zones (``dev.test``,
``corp.internal``) serve alt names on private top-level domains. The ingress
host is ``example.test``.
"""

import io

from twisted.internet import defer, reactor
from twisted.names import authority, common, dns, server as dns_server
from twisted.trial import unittest
from twisted.web import resource, server, static
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from exposr.client import cli
from exposr.client.connect import TunnelConnector
from exposr.client.rest import ApiClient, ApiError
from exposr.config import Config
from exposr.server import ExposrService
from tests.e2e_support import autobahn_settled, within

INGRESS_HOST = "example.test"
ALT = "app.customer.net"
HTTP_ON = {"ingress": {"http": {"enabled": True}}}

class Zone(authority.FileAuthority):
    """A zone (``customer.net`` by default) in memory; `set` changes a CNAME at once."""

    def __init__(self, origin=b"customer.net"):
        common.ResolverBase.__init__(self)
        soa = dns.Record_SOA(mname=b"ns." + origin, rname=b"root." + origin,
                             serial=1, refresh=1, retry=1, expire=1, minimum=1, ttl=1)
        self.soa = (origin, soa)
        self.records = {origin: [soa]}

    def set(self, name, target):
        self.records[name.encode("ascii")] = [dns.Record_CNAME(target.encode("ascii"), ttl=1)]


class AltNamesEndToEndTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.zone = Zone()
        self.private = [Zone(b"dev.test"), Zone(b"corp.internal")]
        factory = dns_server.DNSServerFactory(authorities=[self.zone, *self.private])
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.addCleanup(udp.stopListening)

        config = Config(
            dns_server="127.0.0.1:%d" % udp.getHost().port,
            api_port=0, ingress_http_port=0, listen_address="127.0.0.1",
            ingress_http_url=f"http://{INGRESS_HOST}", allow_registration=True,
        )
        self.service = ExposrService(config, reactor)
        self.service.startService()
        self.addCleanup(self.stop_server)
        yield within(self.service.when_started())
        self.port = self.service.listeners["api"].address.port
        self.url = f"http://127.0.0.1:{self.port}/"
        self.connectors = []

    @defer.inlineCallbacks
    def stop_server(self):
        for connector in self.connectors:
            yield within(connector.stop())
        yield within(defer.maybeDeferred(self.service.stopService), 15)
        yield autobahn_settled()

    def target(self, text):
        """A twisted.web target answering ``text`` on /hello: its URL."""
        root = resource.Resource()
        root.putChild(b"hello", static.Data(text.encode(), "text/plain"))
        port = reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    @defer.inlineCallbacks
    def account(self):
        api = ApiClient(reactor, self.url)
        acct = yield within(api.create_account())
        api.account = acct["account_id"]
        return api

    @defer.inlineCallbacks
    def tunnel(self, api, tunnel_id, target_url):
        """A tunnel configured as the exposr client does, served by `TunnelConnector`."""
        yield within(api.put_tunnel(tunnel_id, {}))
        yield within(api.patch_tunnel(tunnel_id, {"target": {"url": target_url}}))
        yield within(api.patch_tunnel(tunnel_id, {"ingress": {"http": {"enabled": True}}}))
        yield within(api.patch_tunnel(tunnel_id, {"transport": {"ws": {"enabled": True}}}))
        connector = TunnelConnector(reactor, api, tunnel_id)
        self.connectors.append(connector)
        yield within(connector.start())
        yield within(connector.wait_connections(1))
        return connector

    @defer.inlineCallbacks
    def get(self, host, path="/hello"):
        response = yield within(Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{self.port}{path}".encode(), Headers({"Host": [host]})))
        body = yield within(readBody(response))
        return response.code, body

    @defer.inlineCallbacks
    def set_alt_names(self, api, tunnel_id, names):
        info = yield within(api.patch_tunnel(tunnel_id, {"ingress": {"http": {"alt_names": names}}}))
        return info

    @defer.inlineCallbacks
    def refused(self, d):
        try:
            yield within(d)
        except ApiError as e:
            return e
        self.fail("the request succeeded")

    # -- the tests -----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_request_for_alt_name_reaches_the_target(self):
        api = yield self.account()
        yield self.tunnel(api, "alt-e2e", self.target("hello via the alt name"))
        self.zone.set(ALT, f"alt-e2e.{INGRESS_HOST}")
        info = yield self.set_alt_names(api, "alt-e2e", [ALT.upper()])
        http = info["ingress"]["http"]
        self.assertEqual(http["alt_names"], [ALT])
        self.assertEqual(http["urls"], [f"http://alt-e2e.{INGRESS_HOST}/", f"http://{ALT}/"])

        self.assertEqual((yield self.get(ALT)), (200, b"hello via the alt name"))
        self.assertEqual((yield self.get(f"{ALT.upper()}:80")), (200, b"hello via the alt name"))
        self.assertEqual((yield self.get(f"alt-e2e.{INGRESS_HOST}")), (200, b"hello via the alt name"))
        # a name of the zone that is not registered is not the tunnel's
        code, body = yield self.get("other.customer.net")
        self.assertNotEqual(body, b"hello via the alt name")

        # removing the name stops the routing
        info = yield self.set_alt_names(api, "alt-e2e", None)
        self.assertEqual(info["ingress"]["http"]["alt_names"], [])
        code, body = yield self.get(ALT)
        self.assertNotEqual(body, b"hello via the alt name")

    @defer.inlineCallbacks
    def test_wrong_cname_is_400_bad_alt_names(self):
        api = yield self.account()
        yield within(api.put_tunnel("alt-wrong", HTTP_ON))
        self.zone.set("wrong.customer.net", f"another-tunnel.{INGRESS_HOST}")
        self.zone.set("chain.customer.net", ALT)
        self.zone.set(ALT, f"alt-wrong.{INGRESS_HOST}")
        for name in ("wrong.customer.net", "missing.customer.net", "chain.customer.net"):
            e = yield self.refused(self.set_alt_names(api, "alt-wrong", [name]))
            self.assertEqual((e.status, e.code, e.field), (400, "TUNNEL_INGRESS_BAD_ALT_NAMES", name))
        # one bad name refuses the whole list, the good one is not registered
        e = yield self.refused(self.set_alt_names(api, "alt-wrong", [ALT, "wrong.customer.net"]))
        self.assertEqual((e.status, e.code, e.field), (400, "TUNNEL_INGRESS_BAD_ALT_NAMES", "wrong.customer.net"))
        info = yield within(api.get_tunnel("alt-wrong"))
        self.assertEqual(info["ingress"]["http"]["alt_names"], [])
        other = yield self.account()
        yield within(other.put_tunnel("alt-other", HTTP_ON))
        self.zone.set(ALT, f"alt-other.{INGRESS_HOST}")
        info = yield self.set_alt_names(other, "alt-other", [ALT])
        self.assertEqual(info["ingress"]["http"]["alt_names"], [ALT])
        # a top-level domain that is not a name is a validation error
        e = yield self.refused(self.set_alt_names(api, "alt-wrong", ["app.customer.42"]))
        self.assertEqual((e.status, e.code), (400, "BAD_INPUT"))

    @defer.inlineCallbacks
    def test_alt_names_on_private_domains(self):
        api = yield self.account()
        yield self.tunnel(api, "private-one", self.target("hello, private"))
        test_zone, internal_zone = self.private
        test_zone.set("app.dev.test", f"private-one.{INGRESS_HOST}")
        internal_zone.set("app.corp.internal", f"private-one.{INGRESS_HOST}")
        internal_zone.set("wrong.corp.internal", f"another-tunnel.{INGRESS_HOST}")
        info = yield self.set_alt_names(api, "private-one", ["app.dev.test", "App.Corp.Internal"])
        self.assertEqual(sorted(info["ingress"]["http"]["alt_names"]), ["app.corp.internal", "app.dev.test"])
        self.assertEqual((yield self.get("app.dev.test")), (200, b"hello, private"))
        self.assertEqual((yield self.get("app.corp.internal")), (200, b"hello, private"))
        # the CNAME still guards ownership on a private domain
        for name in ("wrong.corp.internal", "missing.dev.test"):
            e = yield self.refused(self.set_alt_names(api, "private-one", [name]))
            self.assertEqual((e.status, e.code, e.field), (400, "TUNNEL_INGRESS_BAD_ALT_NAMES", name))

    @defer.inlineCallbacks
    def test_first_come_first_served_and_freed_by_delete(self):
        first = yield self.account()
        second = yield self.account()
        c1 = yield self.tunnel(first, "first-one", self.target("first"))
        yield self.tunnel(second, "second-one", self.target("second"))

        self.zone.set(ALT, f"first-one.{INGRESS_HOST}")
        info = yield self.set_alt_names(first, "first-one", [ALT])
        self.assertEqual(info["ingress"]["http"]["alt_names"], [ALT])
        self.assertEqual((yield self.get(ALT)), (200, b"first"))

        # the DNS now points at the other account's tunnel: the name is taken,
        # so it is silently not granted (never stolen)
        self.zone.set(ALT, f"second-one.{INGRESS_HOST}")
        info = yield self.set_alt_names(second, "second-one", [ALT])
        self.assertEqual(info["ingress"]["http"]["alt_names"], [])
        self.assertEqual((yield self.get(ALT)), (200, b"first"))
        info = yield within(first.get_tunnel("first-one"))
        self.assertEqual(info["ingress"]["http"]["alt_names"], [ALT])

        # deleting the first tunnel frees the name; the other account takes it
        yield within(c1.stop())
        yield within(first.delete_tunnel("first-one"))
        code, body = yield self.get(ALT)
        self.assertNotIn(body, (b"first", b"second"))
        info = yield self.set_alt_names(second, "second-one", [ALT])
        self.assertEqual(info["ingress"]["http"]["alt_names"], [ALT])
        self.assertEqual((yield self.get(ALT)), (200, b"second"))

    @defer.inlineCallbacks
    def test_client_command_configures_alt_names(self):
        api = yield self.account()
        yield self.tunnel(api, "alt-cli", self.target("hello from the cli tunnel"))
        self.zone.set(ALT, f"alt-cli.{INGRESS_HOST}")
        out, err = io.StringIO(), io.StringIO()
        code = yield within(cli.Cli(reactor, out, err, environ={}).run(
            ["-s", self.url, "-a", api.account, "tunnel", "configure", "alt-cli",
             "set", "ingress-http-altnames", ALT]))
        self.assertEqual((code, err.getvalue()), (0, ""))
        self.assertIn(f"Set ingress-http-altnames to {ALT}", out.getvalue())
        self.assertIn("Tunnel alt-cli configured", out.getvalue())
        self.assertEqual((yield self.get(ALT)), (200, b"hello from the cli tunnel"))

        out = io.StringIO()
        code = yield within(cli.Cli(reactor, out, err, environ={"EXPOSR_SERVER": self.url,
                                                                "EXPOSR_ACCOUNT": api.account})
                            .run(["tunnel", "info", "alt-cli"]))
        self.assertEqual(code, 0)
        self.assertIn(f"ingress-http-altnames: {ALT}", out.getvalue())
        self.assertIn(f"http://{ALT}/", out.getvalue())

        # a wrong CNAME: the client prints the server's reason, exit code 1
        self.zone.set("bad.customer.net", f"nobody.{INGRESS_HOST}")
        out, err = io.StringIO(), io.StringIO()
        code = yield within(cli.Cli(reactor, out, err, environ={}).run(
            ["-s", self.url, "-a", api.account, "tunnel", "configure", "alt-cli",
             "set", "ingress-http-altnames", f"{ALT},bad.customer.net"]))
        self.assertEqual(code, 1)
        self.assertEqual(err.getvalue(),
                         "The altname bad.customer.net can not be configured for this tunnel\n")
        self.assertEqual((yield self.get(ALT)), (200, b"hello from the cli tunnel"))
