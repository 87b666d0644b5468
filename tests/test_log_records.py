"""What an operator reads: text format, one record per event, no Twisted chatter, the ready line."""

import io
import json

from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogPublisher,
)
from twisted.python import log as legacy_log
from twisted.trial import unittest

from exposr import log, startup
from exposr.config import Config
from tests import e2e_support as e2e


class _Settings:
    """Restores the module's level, format and installed output after a test."""

    def setUp(self):
        saved = (log._sink, log._reactor, log._text, log._off)

        def restore():
            log._sink, log._reactor, log._text, log._off = saved
            log.set_level("info")

        self.addCleanup(restore)
        log._sink = log._reactor = None
        self.out = io.StringIO()

    def lines(self):
        return self.out.getvalue().splitlines()


class TextFormatTests(_Settings, unittest.TestCase):
    def event(self, fmt, level=LogLevel.info, **kw):
        return dict(log_format=fmt, log_level=level, log_namespace="exposr.test", log_time=1_700_000_000.25, **kw)

    def test_json_is_the_default(self):
        observer = log.observer(self.out)
        observer(self.event("Tunnel {tunnel_id} created", tunnel_id="t1"))
        record = json.loads(self.out.getvalue())
        self.assertEqual(record["data"], {"message": "Tunnel t1 created", "tunnel_id": "t1"})

    def test_text_line(self):
        log.set_format("text")
        observer = log.observer(self.out)
        observer(self.event("Tunnel {tunnel_id} created", tunnel_id="t1", peer="10.0.0.1", note="two words"))
        observer(self.event("disk full", level=LogLevel.warn))
        self.assertEqual(self.lines(), [
            '2023-11-14T22:13:20.250Z INFO  exposr.test: Tunnel t1 created peer=10.0.0.1 note="two words"',
            "2023-11-14T22:13:20.250Z WARN  exposr.test: disk full",
        ])

    def test_text_failure_has_its_traceback_below(self):
        log.set_format("text")
        observer = log.observer(self.out)
        try:
            1 / 0
        except ZeroDivisionError:
            from twisted.python.failure import Failure

            failure = Failure()
        observer(self.event("it broke", level=LogLevel.error, log_failure=failure))
        first, *rest = self.lines()
        self.assertTrue(first.startswith("2023-11-14T22:13:20.250Z ERROR exposr.test: it broke error="), first)
        self.assertIn("ZeroDivisionError", rest[-1])

    def test_text_access_record(self):
        log.set_format("text")
        log.observer(self.out)
        log.AccessLog("exposr.test.access")("GET", "/a b", 200, "t1", "10.0.0.1", 5, 1.5)
        [line] = self.lines()
        self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO  exposr.test.access: "
                               r'GET /a b 200 tunnel=t1 client=10.0.0.1 bytes=5 duration_ms=1.5$')

    def test_unknown_format_refused(self):
        self.assertRaises(ValueError, log.set_format, "yaml")

    def test_service_maker_applies_the_format(self):
        from exposr import tap
        from exposr.node import Node
        from exposr.options import parse_config

        class Options:
            config = parse_config(["--ingress-http-url", "http://x.test", "--log-format", "text"], {})

        self.patch(Node, "create", classmethod(lambda cls, ip=None: Node(id="a" * 40, host="1@t", ip="10.0.0.1")))
        tap.makeService(Options, MemoryReactorClock())
        observer = log.observer(self.out)
        observer(self.event("hello"))
        self.assertEqual(self.lines(), ["2023-11-14T22:13:20.250Z INFO  exposr.test: hello"])


class ChatterTests(_Settings, unittest.TestCase):
    """Twisted's own "starting on" / "Port closed" / "Starting factory" lines are debug, not info."""

    def install(self, level):
        log.set_level(level)
        observer = log.observer(self.out)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    @defer.inlineCallbacks
    def listen_and_close(self):
        factory = protocol.Factory.forProtocol(protocol.Protocol)  # noisy, as Twisted's default
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        return number

    @defer.inlineCallbacks
    def test_listening_chatter_is_not_info(self):
        self.install("info")
        yield self.listen_and_close()
        Logger(namespace="exposr.test").info("ours")
        legacy_log.err(RuntimeError("a real legacy error"), "legacy error")
        self.flushLoggedErrors(RuntimeError)
        messages = [json.loads(line)["data"].get("message") for line in self.lines()]
        self.assertEqual(messages[0], "ours")
        self.assertEqual(len(messages), 2, messages)
        self.assertIn("legacy error", messages[1])

    @defer.inlineCallbacks
    def test_chatter_is_debug(self):
        self.install("debug")
        number = yield self.listen_and_close()
        records = [json.loads(line) for line in self.lines()]
        chatter = [(r["level"], r["data"].get("message", "")) for r in records]
        self.assertIn(("DEBUG", f"Factory starting on {number}"), chatter)
        self.assertIn(("DEBUG", f"(TCP Port {number} Closed)"), chatter)
        self.assertTrue([m for level, m in chatter if level == "DEBUG" and m.startswith("Starting factory")])
        self.assertEqual([m for level, m in chatter if level == "INFO"], [])


class OneRecordPerEventTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_a_tunnel_connect_is_logged_once(self):
        events = []
        observer = FilteringLogObserver(events.append, [LogLevelFilterPredicate(LogLevel.info)])
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.addCleanup(e2e.autobahn_settled)
        server = yield e2e.Server().start()
        self.addCleanup(server.stop)
        target = e2e.HTTPTarget()
        yield target.start()
        self.addCleanup(target.stop)
        connector = yield e2e.connect_client(server, "once", target.url, connections=1)
        yield e2e.within(defer.maybeDeferred(connector.stop))
        yield e2e.wait_until(lambda: not server.local_connections("once"))
        messages = [formatEvent(e) for e in events if e.get("log_namespace", "").startswith("exposr")]
        connects = [m for m in messages if "once" in m and " connected" in m]
        disconnects = [m for m in messages if "once" in m and "disconnected" in m]
        self.assertEqual((len(connects), len(disconnects)), (1, 1), messages)
        self.assertIn("from 127.0.0.1", connects[0])
        [ready] = [m for m in messages if m.startswith("exposrd ready")]
        self.assertIn(f"port {server.port}", ready)


class SummaryTests(unittest.TestCase):
    def config(self, **kw):
        kw.setdefault("ingress_http_url", "https://tun.example.com")
        return Config(**kw)

    def test_shared_port(self):
        text = startup.summary(self.config(), {"api": ("0.0.0.0", 8080)})
        self.assertEqual(text, "API and WebSocket transport http://localhost:8080/ (port 8080), "
                               "HTTP ingress https://<tunnel>.tun.example.com/ (port 8080)")

    def test_every_part(self):
        config = self.config(ingress=("http", "sni"), transport=("ssh",), api_url="https://api.example.com",
                             admin_enable=True, admin_api_enable=True)
        bound = {"api": ("127.0.0.1", 8080), "ingress-http": ("127.0.0.1", 8000),
                 "ingress-sni": ("127.0.0.1", 4430), "admin": ("127.0.0.1", 8081)}
        self.assertEqual(
            startup.summary(config, bound, ssh_port=2200),
            "API https://api.example.com (port 8080), HTTP ingress https://<tunnel>.tun.example.com/ "
            "(port 8000), SNI ingress port 4430, SSH transport port 2200, admin and admin API port 8081",
        )

    def test_admin_ports_apart(self):
        config = self.config(ingress=("sni",), admin_enable=True, admin_api_enable=True, admin_api_port=9001)
        bound = {"api": ("::1", 8080), "admin": ("::1", 9000), "admin-api": ("::1", 9001)}
        self.assertEqual(
            startup.summary(config, bound),
            "API and WebSocket transport http://[::1]:8080/ (port 8080), admin port 9000, admin API port 9001",
        )


class StartupWarningTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def start_and_stop(self, *argv, **environ):
        from exposr.options import parse_config
        from exposr.server import ExposrService

        events = []
        observer = FilteringLogObserver(events.append, [LogLevelFilterPredicate(LogLevel.info)])
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        config = parse_config(["--api-port", "0", "--listen-address", "127.0.0.1", *argv], environ)
        service = ExposrService(config, reactor)
        service.startService()
        yield e2e.within(service.when_started())
        yield e2e.within(defer.maybeDeferred(service.stopService))
        return [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn
                and e.get("log_namespace", "").startswith("exposr")]

    @defer.inlineCallbacks
    def test_deprecated_variable_warned_once_with_its_replacement(self):
        warnings = yield self.start_and_stop(EXPOSR_INGRESS_HTTP_DOMAIN="http://x.test")
        self.assertEqual(warnings, ["EXPOSR_INGRESS_HTTP_DOMAIN is deprecated, use EXPOSR_INGRESS_HTTP_URL"])

    @defer.inlineCallbacks
    def test_no_warning_without_deprecated_options(self):
        warnings = yield self.start_and_stop("--ingress-http-url", "http://x.test")
        self.assertEqual(warnings, [])


class OpenFilesLimitTests(unittest.TestCase):
    def limits(self, soft, hard, fail=False, nr_open=None):
        calls = []

        def setrlimit(which, value):
            if fail:
                raise ValueError("not allowed")
            calls.append(value)

        path = self.mktemp()
        if nr_open is not None:
            with open(path, "w") as f:
                f.write(f"{nr_open}\n")
        result = startup.raise_open_files_limit(lambda which: (soft, hard), setrlimit, nr_open=path)
        return result, calls

    def test_raised_to_the_hard_limit(self):
        self.assertEqual(self.limits(1024, 524288), ((1024, 524288, 524288), [(524288, 524288)]))

    def test_already_at_the_hard_limit(self):
        self.assertEqual(self.limits(4096, 4096), ((4096, 4096, 4096), []))

    def test_unlimited_hard_limit_is_capped_at_nr_open(self):
        import resource

        inf = resource.RLIM_INFINITY
        self.assertEqual(self.limits(1024, inf, nr_open=1048576), ((1024, 1048576, inf), [(1048576, inf)]))

    def test_refused(self):
        self.assertEqual(self.limits(1024, 4096, fail=True), ((1024, 1024, 4096), []))

    def test_logged_with_both_values(self):
        events = []
        logger = Logger(namespace="exposr.startup", observer=events.append)
        startup.log_open_files_limit(logger, (1024, 4096, 4096))
        startup.log_open_files_limit(logger, (4096, 4096, 4096))
        self.assertEqual([formatEvent(e) for e in events], [
            "Open files limit raised from 1024 to 4096 (hard limit 4096)",
            "Open files limit 4096 (hard limit 4096)",
        ])

    @defer.inlineCallbacks
    def test_exposrd_raises_its_limit(self):
        """A real process started with a low soft limit runs at the hard limit and says so."""
        import resource
        import signal

        from tests import procs

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        low = min(soft, 256, hard)
        script = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (%d, %d)); "
                  "from exposr.script import main; main()" % (low, hard))
        api = procs.free_port()
        proto, transport = procs.spawn(["-c", script, "--api-port", str(api), "--listen-address", "127.0.0.1",
                                        "--ingress-http-url", "http://x.test", "--log-format", "text"])
        self.addCleanup(procs.stop, transport, signal.SIGKILL)
        yield proto.wait_for(b"exposrd ready")
        procs.stop(transport, signal.SIGTERM)
        yield proto.ended.addTimeout(30, reactor)
        if low < hard:
            self.assertIn(f"Open files limit raised from {low} to ".encode(), proto.output)
        shown = "unlimited" if hard == resource.RLIM_INFINITY else hard
        self.assertIn(f"(hard limit {shown})".encode(), proto.output)
