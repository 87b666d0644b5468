"""What `exposr tunnel connect` prints: plain lines per event, JSON lines, never Twisted's format."""

import io
import json

from twisted.internet import defer, reactor
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial import unittest

from exposr.client import cli, output
from exposr.client.rest import ApiClient
from tests.test_client_fakes import real_server_and_target, within


class LinePrinterTests(unittest.TestCase):
    def printer(self, fmt):
        self.out, self.err = io.StringIO(), io.StringIO()
        return output.LinePrinter(self.out, self.err, fmt, clock=lambda: 1700000000.25)

    def test_text(self):
        p = self.printer("text")
        p.message("Created tunnel x", "created")
        p.event("reconnecting", "Connection 2 reconnecting in 1.1 s", connection=2, delay=1.12)
        lines = self.out.getvalue().splitlines()
        self.assertEqual(lines[0], "Created tunnel x")
        self.assertRegex(lines[1], r"^\[\d\d:\d\d:\d\d\] Connection 2 reconnecting in 1.1 s$")

    def test_json(self):
        p = self.printer("json")
        p.message("Created tunnel x", "created")
        p.event("reconnecting", "Connection 2 reconnecting in 1.1 s", connection=2, delay=1.12)
        docs = [json.loads(line) for line in self.out.getvalue().splitlines()]
        self.assertEqual(docs, [
            {"time": "2023-11-14T22:13:20.250Z", "event": "created",
             "message": "Created tunnel x"},
            {"time": "2023-11-14T22:13:20.250Z", "event": "reconnecting",
             "message": "Connection 2 reconnecting in 1.1 s", "connection": 2, "delay": 1.12}])

    def test_log_events_are_one_line_without_traceback(self):
        p = self.printer("text")
        log = Logger(namespace="exposr.client", observer=p.observer)
        log.warn("target connection failed: {err}", err="refused")
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("splice broke", Failure())
        self.assertEqual(self.err.getvalue().splitlines(), [
            "warning: target connection failed: refused",
            "critical: splice broke: division by zero"])
        self.assertNotIn("[exposr.client#", self.err.getvalue())
        self.assertEqual(self.out.getvalue(), "")

    def test_log_events_as_json(self):
        p = self.printer("json")
        Logger(namespace="exposr.client", observer=p.observer).warn("no pong for {s} s", s=30)
        doc = json.loads(self.out.getvalue())
        self.assertEqual((doc["event"], doc["level"], doc["namespace"], doc["message"]),
                         ("log", "warning", "exposr.client", "no pong for 30 s"))


class ConnectOutputTests(unittest.TestCase):
    """The events of a real connection to the in-process server."""

    def setUp(self):
        return real_server_and_target(self, transport_max_connections=1)

    @defer.inlineCallbacks
    def connect_and_drop(self, *flags):
        out, err = io.StringIO(), io.StringIO()
        c = cli.Cli(reactor, out, err, environ={})
        done = within(c.run(["-s", self.server_url, *flags, "tunnel", "connect", "out-tunnel",
                             self.target_url]), 20)
        yield within(c.connected)
        yield within(c.connector.wait_connections(1))
        reconnecting = defer.Deferred()
        show = c.connector.on_event

        def watch(name, text, **fields):
            show(name, text, **fields)
            if name == "reconnecting" and not reconnecting.called:
                reconnecting.callback(None)

        c.connector.on_event = watch
        account = out.getvalue().split("Created account ")[1].split()[0] if not flags else \
            json.loads(out.getvalue().splitlines()[0])["account"]
        yield within(ApiClient(reactor, self.server_url, account).disconnect_tunnel("out-tunnel"))
        yield within(reconnecting)
        yield within(c.shutdown(), 10)
        code = yield done
        return code, out.getvalue(), err.getvalue()

    @defer.inlineCallbacks
    def test_plain_lines(self):
        code, out, err = yield self.connect_and_drop()
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertIn(f"Tunnel out-tunnel connected to {self.target_url}/", lines)
        events = [line for line in lines if line.startswith("[")]
        self.assertRegex(events[0], r"^\[\d\d:\d\d:\d\d\] Connection 1 established$")
        self.assertRegex(events[1], r"^\[\d\d:\d\d:\d\d\] Connection 1 lost \(\d+\)$")
        self.assertRegex(events[2], r"^\[\d\d:\d\d:\d\d\] Connection 1 reconnecting in 1.0 s$")
        self.assertNotIn("#info]", out)

    @defer.inlineCallbacks
    def test_json_lines(self):
        code, out, err = yield self.connect_and_drop("--log-format", "json")
        self.assertEqual((code, err), (0, ""))
        docs = [json.loads(line) for line in out.splitlines()]
        events = [d["event"] for d in docs]
        self.assertEqual(events[:4], ["account_created", "tunnel_created", "connected", "tunnel"])
        self.assertIn("ingress", events)
        rest = [d for d in docs if d["event"] in ("connected", "disconnected", "reconnecting")]
        self.assertEqual([(d["event"], d["connection"]) for d in rest[:3]],
                         [("connected", 1), ("disconnected", 1), ("reconnecting", 1)])
        self.assertEqual(rest[2]["delay"], 1.0)
        self.assertEqual((docs[-1]["event"], docs[-1]["message"]),
                         ("tunnel_deleted", "Tunnel out-tunnel deleted"))
