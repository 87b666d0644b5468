"""A service that calls a function periodically on an injected clock.

`Periodic` is Twisted's `TimerService` with the two rules every periodic job
of exposrd keeps: the first call comes one interval after the start (not at
the start: the job's owner has just done that work), and a failure of one
call (an exception, or a Deferred that fails) is logged and the calls go on.
"""

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.logger import Logger

log = Logger(namespace="exposr.periodic")


class Periodic(TimerService):
    """``fn()`` every ``interval`` seconds of ``clock`` while running; ``what`` names it in logs.

    When ``fn`` returns a Deferred, the next call is scheduled once it fires.
    """

    def __init__(self, interval, fn, clock, what):
        super().__init__(interval, self._tick)
        self.clock = clock
        self.fn = fn
        self.what = what
        self._due = False

    def startService(self):
        self._due = False  # TimerService calls at once: that call is skipped
        super().startService()

    def _tick(self):
        if not self._due:
            self._due = True
            return None
        try:
            result = self.fn()
        except Exception:
            log.failure("{what} failed", what=self.what)
            return None
        if isinstance(result, defer.Deferred):
            return result.addErrback(lambda f: log.failure("{what} failed", f, what=self.what))
        return None
