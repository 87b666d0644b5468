"""The JSON line output: records as the original's, written once per reactor turn."""

import io
import json
import threading

from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.trial import unittest

from exposr import log


class _Out(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


class _Reactor(Clock):
    running = True

    def __init__(self):
        super().__init__()
        self.triggers = []

    def addSystemEventTrigger(self, phase, event, f):
        self.triggers.append((phase, event, f))


class JSONLineObserverTests(unittest.TestCase):
    def setUp(self):
        self.out, self.reactor = _Out(), _Reactor()
        self.observer = log.JSONLineObserver(self.out, reactor=self.reactor)

    def _event(self, text):
        return {"log_format": text, "log_level": LogLevel.info, "log_namespace": "exposr.test", "log_time": 0}

    def test_lines_of_one_turn_are_written_with_one_write_after_it(self):
        for i in range(3):
            self.observer(self._event(f"line {i}"))
        self.assertEqual(self.out.writes, [])
        self.reactor.advance(0)
        self.assertEqual(len(self.out.writes), 1)
        records = [json.loads(line) for line in self.out.getvalue().splitlines()]
        self.assertEqual([r["data"]["message"] for r in records], ["line 0", "line 1", "line 2"])
        self.assertEqual({r["level"] for r in records}, {"INFO"})
        self.observer(self._event("next turn"))
        self.reactor.advance(0)
        self.assertEqual(len(self.out.writes), 2)
        self.assertTrue(self.out.getvalue().endswith("next turn\"}}\n"))

    def test_lines_pending_when_the_reactor_stops_are_written_by_the_shutdown_trigger(self):
        self.observer(self._event("last words"))
        [(phase, event, flush)] = self.reactor.triggers
        self.assertEqual((phase, event), ("after", "shutdown"))
        flush()
        self.assertIn("last words", self.out.getvalue())
        self.reactor.advance(0)  # the turn's own flush finds nothing left
        self.assertEqual(len(self.out.writes), 1)

    def test_outside_a_running_reactor_each_line_is_written_at_once(self):
        self.reactor.running = False
        self.observer(self._event("starting"))
        self.assertIn("starting", self.out.getvalue())

    def test_lines_from_another_thread_are_written_at_once(self):
        t = threading.Thread(target=self.observer, args=(self._event("from a thread"),))
        t.start()
        t.join(10)
        self.assertIn("from a thread", self.out.getvalue())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_a_closed_output_does_not_break_logging(self):
        self.out.close()
        self.reactor.running = False
        self.observer(self._event("nobody reads this"))  # no exception


class InstalledOutputReactorTests(unittest.TestCase):
    """`observer` (twistd's logger factory) batches by the reactor the entry point gives."""

    def setUp(self):
        saved = (log._sink, log._reactor)

        def restore():
            log._sink, log._reactor = saved

        self.addCleanup(restore)
        log._sink = log._reactor = None
        self.out, self.reactor = _Out(), _Reactor()

    def _log_one(self, observer, text):
        observer({"log_format": text, "log_level": LogLevel.info, "log_namespace": "exposr.test", "log_time": 0})

    def test_without_a_reactor_each_line_is_written_at_once(self):
        self._log_one(log.observer(self.out), "early")
        self.assertEqual(len(self.out.writes), 1)

    def test_a_reactor_given_before_the_output_is_made_is_used(self):
        log.use_reactor(self.reactor)  # twistd: the service maker runs before logging starts
        observer = log.observer(self.out)
        self._log_one(observer, "one")
        self._log_one(observer, "two")
        self.assertEqual(self.out.writes, [])
        self.reactor.advance(0)
        self.assertEqual(len(self.out.writes), 1)

    def test_a_reactor_given_after_the_output_is_made_is_used(self):
        observer = log.observer(self.out)  # a tap file: the server is built when it starts
        log.use_reactor(self.reactor)
        self._log_one(observer, "one")
        self._log_one(observer, "two")
        self.assertEqual(self.out.writes, [])
        self.reactor.advance(0)
        self.assertEqual(len(self.out.writes), 1)
        self.assertEqual([t[:2] for t in self.reactor.triggers], [("after", "shutdown")])


class _Lines:
    def __init__(self):
        self.lines = []

    def write_line(self, line):
        self.lines.append(line)


class AccessLogTests(unittest.TestCase):
    """Access records go to the writer given, else to the installed output, else to twisted.logger."""

    def setUp(self):
        saved = log._sink

        def restore():
            log._sink = saved

        self.addCleanup(restore)
        log._sink = None

    def _record(self, access):
        access("GET", "/a?b", 200, "t1", "10.0.0.1", 5, 1.5)

    def test_access_writer_is_the_installed_output(self):
        self.assertIsNone(log.access_writer())
        log.observer(_Out())
        self.assertIs(log.access_writer(), log._sink)

    def test_an_explicit_writer_wins_over_the_installed_output(self):
        installed, given = _Lines(), _Lines()
        log._sink = installed
        self._record(log.AccessLog("exposr.test.access", sink=given))
        self.assertEqual(installed.lines, [])
        [line] = given.lines
        record = json.loads(line)
        self.assertEqual((record["level"], record["logger"]), ("INFO", "exposr.test.access"))
        self.assertEqual(record["data"], {"message": "GET /a?b 200", "method": "GET", "path": "/a?b", "status": 200,
                                          "tunnel": "t1", "client": "10.0.0.1", "bytes": 5, "duration_ms": 1.5})

    def test_without_a_writer_the_installed_output_is_used(self):
        installed = _Lines()
        log._sink = installed
        self._record(log.AccessLog("exposr.test.access"))
        self.assertEqual(len(installed.lines), 1)

    def test_without_any_output_the_record_is_a_twisted_logger_event(self):
        events = []
        access = log.AccessLog("exposr.test.access")
        access.logger.observer = events.append
        self._record(access)
        [event] = events
        self.assertEqual((event["method"], event["status"], event["tunnel"]), ("GET", 200, "t1"))
