"""IP allow lists per tunnel (``access.allow``), through a real tunnel: HTTP and SNI ingress."""

import json

from twisted.internet import defer
from twisted.trial import unittest

from exposr import access, model
from exposr.client.rest import ApiError
from tests import e2e_support as e2e
from tests.e2e_support import within
from tests.test_api_admin import AdminAPITestCase
from tests.test_e2e_errorpages import BROWSER
from tests.test_e2e_http import TID, _Base
from tests import test_e2e_sni as sni_tests


class AllowedTests(unittest.TestCase):
    def test_rules(self):
        rec = {"access": {"allow": ["203.0.113.0/24", "2001:db8::/32"]}}
        self.assertTrue(access.allowed(rec, "203.0.113.9"))
        self.assertTrue(access.allowed(rec, "::ffff:203.0.113.9"))
        self.assertTrue(access.allowed(rec, "2001:db8::1"))
        self.assertFalse(access.allowed(rec, "198.51.100.1"))
        self.assertFalse(access.allowed(rec, "2001:db9::1"))
        self.assertFalse(access.allowed(rec, ""))
        self.assertFalse(access.allowed(rec, None))
        # records without rules are open
        for open_rec in ({}, {"access": {}}, {"access": {"allow": []}}):
            self.assertTrue(access.allowed(open_rec, "198.51.100.1"))
        # hand-edited garbage allows no one, and raises nothing
        for bad in (["nonsense"], [{"x": 1}], [None]):
            self.assertFalse(access.allowed({"access": {"allow": bad}}, "203.0.113.9"))

    def test_normalise(self):
        self.assertEqual(access.normalise_allow(["203.0.113.7/24", "203.0.113.0/24", "2001:DB8::1"]),
                         ["203.0.113.0/24", "2001:db8::1/128"])
        with self.assertRaises(ValueError) as e:
            access.normalise_allow(["10.0.0.0/8", "10.0.0.0/33"])
        self.assertEqual(e.exception.args, (1,))

    def test_records_keep_the_field_and_records_without_it_are_unchanged(self):
        self.assertNotIn("access", model.read_tunnel({"id": "abcdef"}))
        rec = model.read_tunnel({"id": "abcdef", "access": {"allow": ["10.0.0.0/8"]}})
        self.assertEqual(model.serialize(rec)["access"], {"allow": ["10.0.0.0/8"]})


class AllowListHTTPTests(_Base):
    # no trusted proxies (loopback is trusted by default): the peer is the client
    server_options = {"transport_max_connections": 1, "ingress_http_trusted_proxies": ()}

    @defer.inlineCallbacks
    def set_allow(self, api, allow):
        info = yield within(api.patch_tunnel(TID, {"access": {"allow": allow}}))
        return info

    @defer.inlineCallbacks
    def test_inside_outside_and_the_api(self):
        connector = yield self.serve()
        api = connector.api
        info = yield self.set_allow(api, ["127.0.0.9/8", "2001:db8::/32"])
        self.assertEqual(info["access"], {"allow": ["127.0.0.0/8", "2001:db8::/32"]})
        info = yield within(api.get_tunnel(TID))
        self.assertEqual(info["access"], {"allow": ["127.0.0.0/8", "2001:db8::/32"]})
        head, body, _ = yield self.ask(self.req(b"GET", b"/echo"))
        self.assertEqual(head.status, 200)

        yield self.set_allow(api, ["203.0.113.0/24", "2001:db8::/32"])
        head, body, _ = yield self.ask(self.req(b"GET", b"/echo"))
        self.assertEqual((head.status, json.loads(body)), (403, {"error": "TUNNEL_ACCESS_DENIED"}))
        head, body, _ = yield self.ask(self.req(b"GET", b"/echo", headers=[BROWSER]))
        self.assertEqual(head.status, 403)
        self.assertIn(b"Access denied", body)
        # an untrusted peer cannot claim another address
        head, body, _ = yield self.ask(self.req(b"GET", b"/echo", headers=[(b"X-Forwarded-For", b"203.0.113.5")]))
        self.assertEqual(head.status, 403)
        self.assertEqual(len(self.target.requests), 1)
        # other changes keep the list; bad input is refused; null removes it
        info = yield within(api.patch_tunnel(TID, {"target": {"url": self.target.url}}))
        self.assertEqual(info["access"], {"allow": ["203.0.113.0/24", "2001:db8::/32"]})
        stored = yield self.server.service.tunnels.get(TID)
        self.assertEqual(stored["access"], {"allow": ["203.0.113.0/24", "2001:db8::/32"]})
        for bad, field in ((["10.0.0.0/33"], '"access.allow[0]" must be a valid CIDR'),
                           ("10.0.0.0/8", '"access.allow" must be an array'),
                           ([1], '"access.allow[0]" must be a string')):
            try:
                yield within(api.patch_tunnel(TID, {"access": {"allow": bad}}))
            except ApiError as e:
                self.assertEqual((e.status, e.code, e.field), (400, "BAD_INPUT", field))
            else:
                self.fail("accepted")
        info = yield self.set_allow(api, None)
        self.assertNotIn("access", info)
        stored = yield self.server.service.tunnels.get(TID)
        self.assertNotIn("access", stored)
        head, body, _ = yield self.ask(self.req(b"GET", b"/echo"))
        self.assertEqual(head.status, 200)

    @defer.inlineCallbacks
    def test_denied_before_telling_whether_connected(self):
        api = yield e2e.make_tunnel(self.server, TID, self.target.url)
        yield within(api.patch_tunnel(TID, {"access": {"allow": ["203.0.113.0/24"]}}))
        head, body, _ = yield self.ask(self.req(b"GET", b"/"))
        self.assertEqual((head.status, json.loads(body)), (403, {"error": "TUNNEL_ACCESS_DENIED"}))


class AllowListBehindProxyTests(_Base):
    server_options = {"transport_max_connections": 1, "ingress_http_trusted_proxies": ["127.0.0.1/32"]}

    @defer.inlineCallbacks
    def test_client_address_from_a_trusted_proxy_ipv4_and_ipv6(self):
        connector = yield self.serve()
        yield within(connector.api.patch_tunnel(TID, {"access": {"allow": ["203.0.113.0/24", "2001:db8::/32"]}}))
        for xff, status in ((b"203.0.113.5", 200), (b"2001:db8::7, 10.0.0.1", 200), (b"[2001:db8::8]", 200),
                            (b"198.51.100.1", 403), (b"2001:db9::1", 403), (None, 403)):
            headers = [(b"X-Forwarded-For", xff)] if xff else []
            head, body, _ = yield self.ask(self.req(b"GET", b"/echo", headers=headers))
            self.assertEqual(head.status, status, xff)


class AllowListSNITests(sni_tests._Base):
    @defer.inlineCallbacks
    def test_refused_before_the_handshake(self):
        api, _ = yield self.ws_tunnel("guarded", self.echo_url)
        yield within(api.patch_tunnel("guarded", {"access": {"allow": ["127.0.0.0/8", "::1/128"]}}))
        yield self.check_echo("guarded", size=1000)
        yield within(api.patch_tunnel("guarded", {"access": {"allow": ["203.0.113.0/24", "2001:db8::/32"]}}))
        code, out, err = yield self.s_client(f"guarded.{sni_tests.DOMAIN}", b"GET / HTTP/1.0\r\n\r\n")
        self.assertNotEqual(code, 0)
        self.assertIn(b"SSL handshake has read 0 bytes", out)
        yield e2e.wait_until(lambda: any("not on the allow list of tunnel guarded" in line
                                         for line in self.sni_lines()), 10)
        yield within(api.patch_tunnel("guarded", {"access": {"allow": None}}))
        yield self.check_echo("guarded", size=1000)


class AllowListAdminTests(AdminAPITestCase):
    @defer.inlineCallbacks
    def test_shown_in_the_admin_api(self):
        r = yield self.request("GET", "/v1/admin/tunnel/my-tunnel")
        self.assertNotIn("access", json.loads(r.body))
        yield self.stack.tunnels.update_config("my-tunnel", self.account["id"],
                                               {"access": {"allow": ["2001:db8::/32"]}})
        r = yield self.request("GET", "/v1/admin/tunnel/my-tunnel")
        self.assertEqual(json.loads(r.body)["access"], {"allow": ["2001:db8::/32"]})
