"""`Periodic`: a TimerService on an injected clock whose calls survive their own failures."""

from twisted.internet import defer, task
from twisted.trial import unittest

from exposr.periodic import Periodic


class PeriodicTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.calls = []

    def _start(self, fn):
        timer = Periodic(5, fn, self.clock, "test job")
        timer.startService()
        self.addCleanup(lambda: timer.running and timer.stopService())
        return timer

    def test_the_first_call_is_one_interval_after_the_start(self):
        self._start(lambda: self.calls.append(self.clock.seconds()))
        self.assertEqual(self.calls, [])
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual(self.calls, [5, 10])

    def test_a_call_that_raises_is_logged_and_the_calls_go_on(self):
        def fn():
            self.calls.append(self.clock.seconds())
            raise ValueError("broken")

        self._start(fn)
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual(self.calls, [5, 10])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)

    def test_a_failed_deferred_is_logged_and_the_calls_go_on(self):
        def fn():
            self.calls.append(self.clock.seconds())
            return defer.fail(ValueError("broken"))

        self._start(fn)
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual(self.calls, [5, 10])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)

    def test_no_call_after_stop_and_a_restart_waits_an_interval_again(self):
        timer = self._start(lambda: self.calls.append(self.clock.seconds()))
        self.clock.advance(5)
        timer.stopService()
        self.clock.advance(20)
        timer.startService()
        self.clock.advance(4)
        self.assertEqual(self.calls, [5])
        self.clock.advance(1)
        self.assertEqual(self.calls, [5, 30])
