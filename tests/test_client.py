"""The exposr client's REST layer and command line against a fake that replays the recordings."""

import io
import json

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from exposr import __version__
from exposr.client import cli, rest
from exposr.client.rest import ApiClient, ApiError
from tests.test_client_fakes import FakeApi, WSHub, parse_session, tunnel_info, within

ACCOUNT = "F4PJ-RKCH-96WR-JDJ2"
TOKEN = "RjRQSlJLQ0g5NldSSkRKMg=="
UA = f"exposr-cli/{__version__}"


def shape(req):
    """What must match the recording: method, path, JSON body, auth, content type."""
    headers = req["headers"]
    return (req["method"], req["path"], json.loads(req["body"]) if req["body"] else None,
            headers.get("authorization"), headers.get("content-type"))


class _Base(unittest.TestCase):
    def setUp(self):
        self.hub = WSHub()
        self.api = FakeApi(self.hub)
        port = self.api.listen()
        self.addCleanup(port.stopListening)
        self.recorded = parse_session("session-rest.txt")

    def client(self, account=ACCOUNT, **kw):
        return ApiClient(reactor, self.api.url + "/", account, **kw)

    def run_cli(self, *argv, cli_obj=None):
        out, err = io.StringIO(), io.StringIO()
        c = cli_obj or cli.Cli(reactor, out, err, environ={})
        if cli_obj is not None:
            out, err = c.out, c.err
        d = c.run(["-s", self.api.url + "/", *argv])
        return within(d, 10).addCallback(lambda code: (code, out.getvalue(), err.getvalue()))


class RestShapeTests(_Base):
    @defer.inlineCallbacks
    def test_create_account(self):
        self.api.add_recorded(self.recorded[:1])
        res = yield self.client(account=None).create_account()
        self.assertEqual(res["account_id_hr"], ACCOUNT)
        req, = self.api.requests
        self.assertEqual(shape(req), shape(self.recorded[0]))
        self.assertEqual(req["headers"]["user-agent"], UA)
        self.assertEqual(req["headers"]["accept"], "application/json, text/plain, */*")

    @defer.inlineCallbacks
    def test_token_and_put(self):
        self.api.add_recorded(self.recorded[1:3])
        c = self.client()
        yield c.put_tunnel("demo-tunnel", {})
        self.assertEqual([shape(r) for r in self.api.requests],
                         [shape(e) for e in self.recorded[1:3]])
        self.assertEqual(c.token, TOKEN)
        self.assertEqual(rest.account_token(ACCOUNT), TOKEN)
        self.assertNotIn("content-type", self.api.requests[0]["headers"])
        self.assertEqual(self.api.requests[1]["headers"]["authorization"], f"Bearer {TOKEN}")

    @defer.inlineCallbacks
    def test_delete_and_disconnect(self):
        ws = parse_session("session-ws.txt")
        disc = [e for e in ws if e["path"].endswith("/disconnect")]
        dele = [e for e in ws if e["method"] == "DELETE"]
        self.api.add_recorded(self.recorded[1:2] + disc + dele)
        c = self.client(account="DF8C-CPYM-NJ3J-9866")
        self.api.responses[("GET", "/v1/account/DF8C-CPYM-NJ3J-9866/token")] = \
            [(201, json.dumps({"token": rest.account_token("DF8C-CPYM-NJ3J-9866")}), "application/json")]
        result = yield c.disconnect_tunnel("ws-echo-tun")
        self.assertIs(result, True)
        yield c.delete_tunnel("tmp-tunnel")
        got = [shape(r) for r in self.api.requests[1:]]
        self.assertEqual(got, [shape(disc[0]), shape(dele[0])])

    @defer.inlineCallbacks
    def test_read_tunnel_refreshes_token(self):
        self.api.add_recorded(self.recorded[3:5])
        c = self.client()
        c.token = "stale"
        info = yield c.read_tunnel("demo-tunnel")
        self.assertEqual(info["id"], "demo-tunnel")
        self.assertEqual([r["path"] for r in self.api.requests],
                         [f"/v1/account/{ACCOUNT}/token", "/v1/tunnel/demo-tunnel"])


class RestErrorTests(_Base):
    def fails(self, d, code, message):
        def check(f):
            f.trap(ApiError)
            self.assertEqual(f.value.code, code)
            self.assertEqual(str(f.value), message)
        return d.addCallbacks(lambda r: self.fail(f"no error: {r!r}"), check)

    def test_bad_input(self):
        self.api.add("GET", f"/v1/account/{ACCOUNT}/token", 201, {"token": TOKEN})
        self.api.add("PATCH", "/v1/tunnel/t1234", 400,
                     {"error": "BAD_INPUT", "field": '"target.url" must be a valid uri'})
        return self.fails(self.client().patch_tunnel("t1234", {"target": {"url": "x"}}),
                          "BAD_INPUT", 'Bad input: "target.url" must be a valid uri')

    def test_bad_alt_names(self):
        self.api.add("GET", f"/v1/account/{ACCOUNT}/token", 201, {"token": TOKEN})
        self.api.add("PATCH", "/v1/tunnel/t1234", 400,
                     {"error": "TUNNEL_INGRESS_BAD_ALT_NAMES", "field": "a.example.com"})
        return self.fails(self.client().patch_tunnel("t1234", {}), "TUNNEL_INGRESS_BAD_ALT_NAMES",
                          "The altname a.example.com can not be configured for this tunnel")

    def test_permission_denied_token(self):
        self.api.add("GET", f"/v1/account/{ACCOUNT}/token", 403, {"error": "PERMISSION_DENIED"})
        return self.fails(self.client().get_tunnel("t1234"), "PERMISSION_DENIED",
                          "Permission denied")

    def test_not_found(self):
        self.api.add("GET", f"/v1/account/{ACCOUNT}/token", 201, {"token": TOKEN})
        self.api.add("GET", "/v1/tunnel/t1234", 404, {"error": "TUNNEL_NOT_FOUND"})
        return self.fails(self.client().get_tunnel("t1234"), "TUNNEL_NOT_FOUND", "Tunnel not found")

    def test_registration_disabled(self):
        # unknown route -> 404 text
        return self.fails(self.client(account=None).create_account(),
                          "ACCOUNT_REGISTRATION_DISABLED", "Account registration not enabled")

    def test_no_account(self):
        return self.fails(self.client(account=None).get_tunnel("t1234"), "NO_ACCOUNT",
                          "No account was provided")

    def test_unreachable(self):
        c = ApiClient(reactor, "http://127.0.0.1:1/", ACCOUNT)
        d = c.refresh_token()
        return d.addCallbacks(lambda r: self.fail("no error"),
                              lambda f: self.assertEqual(f.value.code, "SERVER_UNREACHABLE"))

    def test_timeout(self):
        self.api.hang = True
        clock = task.Clock()
        c = self.client(clock=clock)
        d = c.refresh_token()
        got = within(self.fails(d, "TIMEOUT", "Timeout"))
        # wait until the request reached the server, then let 5 s pass on the clock
        def poll():
            if self.api.requests:
                clock.advance(rest.TIMEOUT)
            else:
                reactor.callLater(0.01, poll)
        poll()
        return got


class CliTests(_Base):
    @defer.inlineCallbacks
    def test_account_create(self):
        self.api.add_recorded(self.recorded[:1])
        code, out, err = yield self.run_cli("account", "create")
        self.assertEqual((code, err), (0, ""))
        self.assertIn(ACCOUNT, out)

    @defer.inlineCallbacks
    def test_tunnel_create_matches_recording(self):
        self.api.add_recorded(self.recorded[1:3])
        code, out, err = yield self.run_cli("-a", ACCOUNT, "tunnel", "create", "demo-tunnel")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual([shape(r) for r in self.api.requests],
                         [shape(e) for e in self.recorded[1:3]])
        self.assertIn("Created tunnel demo-tunnel", out)

    @defer.inlineCallbacks
    def test_tunnel_create_with_options_and_random_id(self):
        self.api.add("GET", f"/v1/account/{ACCOUNT}/token", 201, {"token": TOKEN})
        code, out, err = yield self.run_cli("-a", ACCOUNT, "tunnel", "create",
                                            "ingress-sni", "on", "target-url", "tcp://x:22")
        # the random id's PUT is a 404 here: error path printed as one line
        self.assertEqual(code, 1)
        self.assertEqual(len(err.strip().splitlines()), 1)
        put = self.api.requests[1]
        self.assertEqual(put["method"], "PUT")
        self.assertRegex(put["path"], r"^/v1/tunnel/[a-z]+-[a-z]+-\d+$")

    @defer.inlineCallbacks
    def test_configure_set_and_unset(self):
        self.api.add("GET", f"/v1/account/{ACCOUNT}/token", 201, {"token": TOKEN})
        self.api.add("PATCH", "/v1/tunnel/my-tunnel", 200, {"id": "my-tunnel"})
        code, out, err = yield self.run_cli(
            "-a", ACCOUNT, "tunnel", "configure", "my-tunnel", "set",
            "ingress-http-altnames", "a.example.com,b.example.com", "transport-ssh", "true",
            "target-url", "http://localhost:3000")
        self.assertEqual((code, err), (0, ""))
        code, out, err = yield self.run_cli(
            "-a", ACCOUNT, "tunnel", "configure", "my-tunnel", "unset", "target-url",
            "ingress-http-altnames")
        self.assertEqual((code, err), (0, ""))
        bodies = [json.loads(r["body"]) for r in self.api.requests if r["method"] == "PATCH"]
        self.assertEqual(bodies, [
            {"ingress": {"http": {"alt_names": ["a.example.com", "b.example.com"]}}},
            {"transport": {"ssh": {"enabled": True}}},
            {"target": {"url": "http://localhost:3000/"}},
            {"target": {"url": None}},
            {"ingress": {"http": {"alt_names": None}}},
        ])

    @defer.inlineCallbacks
    def test_configure_ingress_allow(self):
        self.api.add("GET", f"/v1/account/{ACCOUNT}/token", 201, {"token": TOKEN})
        self.api.add("PATCH", "/v1/tunnel/my-tunnel", 200, {"id": "my-tunnel"})
        code, out, err = yield self.run_cli("-a", ACCOUNT, "tunnel", "configure", "my-tunnel", "set",
                                            "ingress-allow", "203.0.113.0/24, 2001:db8::/32")
        self.assertEqual((code, err), (0, ""))
        code, out, err = yield self.run_cli("-a", ACCOUNT, "tunnel", "configure", "my-tunnel", "unset",
                                            "ingress-allow")
        self.assertEqual((code, err), (0, ""))
        bodies = [json.loads(r["body"]) for r in self.api.requests if r["method"] == "PATCH"]
        self.assertEqual(bodies, [{"access": {"allow": ["203.0.113.0/24", "2001:db8::/32"]}},
                                  {"access": {"allow": None}}])
        code, out, err = yield self.run_cli("-a", ACCOUNT, "tunnel", "configure", "my-tunnel", "set",
                                            "ingress-http-auth", "alice:pa:ss")
        self.assertEqual((code, err), (0, ""))
        code, out, err = yield self.run_cli("-a", ACCOUNT, "tunnel", "configure", "my-tunnel", "unset",
                                            "ingress-http-auth")
        self.assertEqual((code, err), (0, ""))
        bodies = [json.loads(r["body"]) for r in self.api.requests if r["method"] == "PATCH"]
        self.assertEqual(bodies[2:], [{"access": {"http_auth": {"user": "alice", "password": "pa:ss"}}},
                                      {"access": {"http_auth": None}}])
        code, out, err = yield self.run_cli("-a", ACCOUNT, "tunnel", "configure", "my-tunnel", "set",
                                            "ingress-http-auth", "nopassword")
        self.assertEqual(code, 1)
        self.assertIn("user:password", err)
        n = len(self.api.requests)
        code, out, err = yield self.run_cli("-a", ACCOUNT, "tunnel", "configure", "my-tunnel", "set",
                                            "ingress-allow", "10.0.0.0/33")
        self.assertEqual(code, 1)
        self.assertIn("10.0.0.0/33", err)
        self.assertEqual(len(self.api.requests), n)

    @defer.inlineCallbacks
    def test_configure_bad_value(self):
        code, out, err = yield self.run_cli("-a", ACCOUNT, "tunnel", "configure", "my-tunnel",
                                            "set", "ingress-sni", "maybe")
        self.assertEqual(code, 1)
        self.assertIn("ingress-sni", err)
        self.assertEqual(self.api.requests, [])

    @defer.inlineCallbacks
    def test_error_is_one_line(self):
        self.api.add("GET", f"/v1/account/{ACCOUNT}/token", 201, {"token": TOKEN})
        self.api.add("PATCH", "/v1/tunnel/my-tunnel", 400,
                     {"error": "BAD_INPUT", "field": '"ingress.sni.enabled" must be a boolean'})
        code, out, err = yield self.run_cli("-a", ACCOUNT, "tunnel", "configure", "my-tunnel",
                                            "unset", "ingress-sni")
        self.assertEqual(code, 1)
        self.assertEqual(err, 'Bad input: "ingress.sni.enabled" must be a boolean\n')

    @defer.inlineCallbacks
    def test_info_delete_disconnect(self):
        self.api.add("GET", f"/v1/account/{ACCOUNT}/token", 201, {"token": TOKEN})
        self.api.add("GET", "/v1/tunnel/demo-tunnel", 200, self.recorded[-1]["resp_body"])
        self.api.add("DELETE", "/v1/tunnel/demo-tunnel", 204, "")
        self.api.add("POST", "/v1/tunnel/demo-tunnel/disconnect", 200, {"result": False})
        code, out, err = yield self.run_cli("-a", ACCOUNT, "tunnel", "info", "demo-tunnel")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("Tunnel: demo-tunnel", out)
        self.assertIn("Connected: true", out)
        self.assertIn(f"  HTTP: http://demo-tunnel.{self.api.host}/", out)
        self.assertIn("  target-url: http://127.0.0.1:9000/", out)
        code, out, err = yield self.run_cli("-a", ACCOUNT, "tunnel", "disconnect", "demo-tunnel")
        self.assertIn("false", out)
        code, out, err = yield self.run_cli("-a", ACCOUNT, "tunnel", "delete", "demo-tunnel")
        self.assertEqual((code, out), (0, "Tunnel demo-tunnel deleted\n"))

    def test_env(self):
        c = cli.Cli(reactor, environ={"EXPOSR_SERVER": "http://s/", "EXPOSR_ACCOUNT": "A"})
        opts = c.parse(["tunnel", "info", "x", "--insecure"])
        self.assertEqual((opts.server, opts.account, opts.insecure), ("http://s/", "A", True))
        opts = c.parse(["-s", "http://o/", "tunnel", "info", "x"])
        self.assertEqual(opts.server, "http://o/")

    def test_connect_args(self):
        ca = cli.Cli.connect_args
        self.assertEqual(ca(["my-tun", "http://x:1"]), ("my-tun", "http://x:1", []))
        self.assertEqual(ca(["http://x:1"]), (None, "http://x:1", []))
        self.assertEqual(ca(["my-tun"]), ("my-tun", None, []))
        self.assertEqual(ca(["my-tun", "http://x", "ingress-sni", "on"]),
                         ("my-tun", "http://x", [("ingress-sni", "on")]))
        self.assertRaises(cli.UsageError, ca, [])


class CliConnectTests(_Base):
    """`tunnel connect` produces the recorded request sequence and prints the URLs."""

    @defer.inlineCallbacks
    def test_connect_sequence(self):
        connect = self.recorded[5:]
        self.api.add_recorded(connect)
        tokens = [json.loads(e["resp_body"])["transport"]["ws"]["url"].split("t=")[1]
                  for e in connect if e["method"] == "GET" and "tunnel" in e["path"]][-2:]
        out, err = io.StringIO(), io.StringIO()
        c = cli.Cli(reactor, out, err, environ={})
        done = self.run_cli("-a", ACCOUNT, "tunnel", "connect", "demo-tunnel",
                            "http://127.0.0.1:9000", cli_obj=c)
        yield within(c.connected)
        yield within(c.connector.wait_connections(2))  # max_connections = 2
        self.assertEqual([shape(r) for r in self.api.requests], [shape(e) for e in connect])
        for r in self.api.requests:
            self.assertEqual(r["headers"]["user-agent"], UA)
        self.assertEqual(self.hub.tokens, tokens)
        text = out.getvalue()
        self.assertIn("Tunnel demo-tunnel connected to http://127.0.0.1:9000/", text)
        self.assertIn(f"Ingress HTTP: http://demo-tunnel.{self.api.host}/", text)
        yield c.shutdown()
        code, out, err = yield done
        self.assertEqual((code, err), (0, ""))
        closes = yield defer.gatherResults([ws.closed for ws in self.hub.connections])
        self.assertEqual([code for code, _ in closes], [1000, 1000])

    @defer.inlineCallbacks
    def test_connect_creates_account_and_tunnel_and_deletes_it(self):
        acct = {"account_id": "MPW4YDYVNPFXVV2D", "account_id_hr": "MPW4-YDYV-NPFX-VV2D"}
        self.api.add("POST", "/v1/account", 201, acct)
        self.api.add("GET", "/v1/account/MPW4-YDYV-NPFX-VV2D/token", 201,
                     {"token": rest.account_token("MPW4-YDYV-NPFX-VV2D")})
        self.api.add("GET", "/v1/tunnel/my-tunnel", 404, {"error": "TUNNEL_NOT_FOUND"})
        info = tunnel_info(self.api.host, "my-tunnel", target="tcp://127.0.0.1:7/", ingress=False)
        for m in ("PUT", "PATCH", "GET"):
            self.api.add(m, "/v1/tunnel/my-tunnel", 200, info)
        self.api.add("DELETE", "/v1/tunnel/my-tunnel", 204, "")
        out, err = io.StringIO(), io.StringIO()
        c = cli.Cli(reactor, out, err, environ={})
        done = self.run_cli("tunnel", "connect", "my-tunnel", "tcp://127.0.0.1:7",
                            "ingress-sni", "on", cli_obj=c)
        yield within(c.connected)
        yield c.shutdown()
        code, text, errtext = yield done
        self.assertEqual((code, errtext), (0, ""))
        seq = [(r["method"], r["path"], r["body"]) for r in self.api.requests]
        self.assertEqual(seq, [
            ("POST", "/v1/account", "{}"),
            ("GET", "/v1/account/MPW4-YDYV-NPFX-VV2D/token", None),
            ("GET", "/v1/tunnel/my-tunnel", None),
            ("PUT", "/v1/tunnel/my-tunnel", "{}"),
            ("PATCH", "/v1/tunnel/my-tunnel", '{"ingress":{"sni":{"enabled":true}}}'),
            ("PATCH", "/v1/tunnel/my-tunnel", '{"target":{"url":"tcp://127.0.0.1:7"}}'),
            ("PATCH", "/v1/tunnel/my-tunnel", '{"transport":{"ws":{"enabled":true}}}'),
            ("GET", "/v1/account/MPW4-YDYV-NPFX-VV2D/token", None),
            ("GET", "/v1/tunnel/my-tunnel", None),
            ("GET", "/v1/account/MPW4-YDYV-NPFX-VV2D/token", None),
            ("GET", "/v1/tunnel/my-tunnel", None),
            ("DELETE", "/v1/tunnel/my-tunnel", None),
        ])
        self.assertIn("Created account MPW4-YDYV-NPFX-VV2D", text)
        self.assertIn("Tunnel my-tunnel deleted", text)

    @defer.inlineCallbacks
    def test_connect_no_endpoint(self):
        self.api.add("GET", f"/v1/account/{ACCOUNT}/token", 201, {"token": TOKEN})
        info = tunnel_info(self.api.host, "my-tunnel")
        del info["transport"]["ws"]
        for m in ("PATCH", "GET"):
            self.api.add(m, "/v1/tunnel/my-tunnel", 200, info)
        code, out, err = yield self.run_cli("-a", ACCOUNT, "tunnel", "connect", "my-tunnel")
        self.assertEqual((code, err), (1, "No tunnel endpoint available\n"))
