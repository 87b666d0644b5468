"""The server as a process: plugin discovery, start, /ping, SIGTERM, exit codes, durability."""

import os
import signal

from twisted.internet import defer
from twisted.trial import unittest

from tests import procs


def _base(api, admin, *extra):
    return (
        "--allow-registration", "--ingress-http-url", f"http://localhost:{api}",
        "--api-port", str(api), "--ingress-http-port", str(api),
        "--admin-enable", "--admin-port", str(admin), "--listen-address", "127.0.0.1", *extra,
    )


class PluginTests(unittest.TestCase):
    def test_twistd_lists_the_plugin(self):
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins

        names = [p.tapname for p in getPlugins(IServiceMaker)]
        self.assertIn("exposrd", names)

    @defer.inlineCallbacks
    def test_twistd_help_lists_exposrd(self):
        proto, _ = procs.twistd("--help")
        status = yield proto.ended.addTimeout(30, __import__("twisted.internet.reactor").internet.reactor)
        self.assertEqual(status, 0)
        self.assertIn(b"exposrd", proto.output)


class ProcessTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_twistd_serves_ping_and_stops_on_sigterm(self):
        api, admin = procs.free_port(), procs.free_port()
        proto, transport = procs.twistd("-n", "--pidfile=", "exposrd", *_base(api, admin))
        self.addCleanup(procs.stop, transport, signal.SIGKILL)
        yield proto.wait_for(b"exposrd ready")
        status, body = yield procs.http("GET", f"http://127.0.0.1:{admin}/ping")
        self.assertEqual(status, 200)
        status, body = yield procs.http("GET", f"http://127.0.0.1:{admin}/health")
        self.assertEqual(status, 200)
        procs.stop(transport, signal.SIGTERM)
        code = yield proto.ended.addTimeout(30, __import__("twisted.internet.reactor").internet.reactor)
        self.assertEqual(code, 0)
        self.assertIn(b"Shutdown complete", proto.output)
        self.assertNotIn(b"Traceback", proto.output)

    @defer.inlineCallbacks
    def test_exposrd_command_logs_json_and_stops_on_sigint(self):
        api, admin = procs.free_port(), procs.free_port()
        proto, transport = procs.exposrd(*_base(api, admin))
        self.addCleanup(procs.stop, transport, signal.SIGKILL)
        yield proto.wait_for(b"exposrd ready")
        status, body = yield procs.http("POST", f"http://127.0.0.1:{api}/v1/account", b"{}")
        self.assertEqual(status, 201)
        account = procs.jsonof(body)["account_id"]
        procs.stop(transport, signal.SIGINT)
        code = yield proto.ended.addTimeout(30, __import__("twisted.internet.reactor").internet.reactor)
        self.assertEqual(code, 0)
        lines = [l for l in proto.output.splitlines() if l.strip()]
        records = [procs.jsonof(l) for l in lines]  # every line is one JSON record
        self.assertTrue(all({"timestamp", "level", "logger", "data"} <= set(r) for r in records))
        starting = [r for r in records if r["logger"] == "exposr.server" and "starting" in r["data"]["message"]]
        self.assertEqual(starting[0]["data"]["reactor"], "exposr.reactor.Reactor")
        self.assertNotIn(account.encode(), proto.output, "account numbers must not be logged")

    @defer.inlineCallbacks
    def test_bad_option_is_one_line_and_non_zero(self):
        proto, _ = procs.exposrd("--api-port", "notaport", "--ingress-http-url", "http://x")
        code = yield proto.ended.addTimeout(30, __import__("twisted.internet.reactor").internet.reactor)
        self.assertEqual(code, 2)
        out = proto.output.strip().splitlines()
        self.assertEqual(len(out), 1, proto.output)
        self.assertIn(b"--api-port", out[0])
        self.assertNotIn(b"Traceback", proto.output)

    @defer.inlineCallbacks
    def test_missing_ingress_url_is_refused(self):
        proto, _ = procs.exposrd()
        code = yield proto.ended.addTimeout(30, __import__("twisted.internet.reactor").internet.reactor)
        self.assertNotEqual(code, 0)
        self.assertIn(b"ingress-http-url", proto.output)

    @defer.inlineCallbacks
    def test_port_in_use_fails_start_up_with_255(self):
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory

        busy = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(busy.stopListening)
        port = busy.getHost().port
        proto, transport = procs.exposrd(*_base(port, procs.free_port()))
        self.addCleanup(procs.stop, transport, signal.SIGKILL)
        code = yield proto.ended.addTimeout(30, reactor)
        self.assertEqual(code, 255)
        self.assertIn(b"Failed to start up", proto.output)
        self.assertNotIn(b"Traceback", proto.output)

    @defer.inlineCallbacks
    def test_sqlite_writes_survive_kill_9(self):
        from twisted.internet import reactor

        path = os.path.abspath(self.mktemp() + ".sqlite")
        api, admin = procs.free_port(), procs.free_port()
        opts = _base(api, admin, "--storage-url", f"sqlite://{path}")
        proto, transport = procs.exposrd(*opts)
        self.addCleanup(procs.stop, transport, signal.SIGKILL)
        yield proto.wait_for(b"exposrd ready")
        status, body = yield procs.http("POST", f"http://127.0.0.1:{api}/v1/account", b"{}")
        self.assertEqual(status, 201)
        account = procs.jsonof(body)["account_id"]
        status, body = yield procs.http("GET", f"http://127.0.0.1:{api}/v1/account/{account}/token")
        token = procs.jsonof(body)["token"]
        auth = {"Authorization": f"Bearer {token}"}
        status, body = yield procs.http("PUT", f"http://127.0.0.1:{api}/v1/tunnel/durable-one", b"{}", auth)
        self.assertEqual(status, 200)
        procs.stop(transport, signal.SIGKILL)
        yield proto.ended.addTimeout(30, reactor)

        proto2, transport2 = procs.exposrd(*opts)
        self.addCleanup(procs.stop, transport2, signal.SIGKILL)
        yield proto2.wait_for(b"exposrd ready")
        status, body = yield procs.http("GET", f"http://127.0.0.1:{api}/v1/tunnel/durable-one", headers=auth)
        self.assertEqual(status, 200, body)
        self.assertEqual(procs.jsonof(body)["id"], "durable-one")
        procs.stop(transport2, signal.SIGTERM)
        yield proto2.ended.addTimeout(30, reactor)


class TapFileTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_tap_file_runs_under_twistd(self):
        from twisted.internet import reactor

        api, admin = procs.free_port(), procs.free_port()
        path = os.path.abspath(self.mktemp() + ".tap")
        proto, _ = procs.spawn(["-c", "from exposr.tapfile import main; main()", path, *_base(api, admin)])
        code = yield proto.ended.addTimeout(30, reactor)
        self.assertEqual(code, 0, proto.output)
        proto, transport = procs.twistd("-n", "--pidfile=", "-o", "-f", path)
        self.addCleanup(procs.stop, transport, signal.SIGKILL)
        yield proto.wait_for(b"exposrd ready")
        status, _ = yield procs.http("GET", f"http://127.0.0.1:{admin}/ping")
        self.assertEqual(status, 200)
        procs.stop(transport, signal.SIGTERM)
        code = yield proto.ended.addTimeout(30, reactor)
        self.assertEqual(code, 0)

    @defer.inlineCallbacks
    def test_mktap_refuses_bad_options_in_one_line(self):
        from twisted.internet import reactor

        proto, _ = procs.spawn(["-c", "from exposr.tapfile import main; main()", "x.tap", "--api-port", "-3"])
        code = yield proto.ended.addTimeout(30, reactor)
        self.assertEqual(code, 2)
        self.assertEqual(len(proto.output.strip().splitlines()), 1, proto.output)


class SelfTestTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_self_test_reports_each_check(self):
        from twisted.internet import reactor

        proto, _ = procs.exposrd(environ=procs.env(EXPOSR_SELF_TEST="1"))
        code = yield proto.ended.addTimeout(30, reactor)
        self.assertEqual(code, 0, proto.output)
        self.assertEqual(
            proto.output.splitlines(),
            [b"DNS lookup test: PASS", b"HTTPS connection test: PASS", b"SQLite3 module test: PASS", b"All tests: PASS"],
        )
