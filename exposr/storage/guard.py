"""Storage calls answered within a bounded time, and fast while the store is down.

`GuardedStorage` wraps any `IStorage`:

* **Deadline.** Every data call (``get``, ``get_multi``, ``create``, ``put``,
  ``delete``, ``list_keys``, ``update``) fails with `StorageUnavailable` when
  it has not finished within ``timeout`` seconds of wall time, whatever it is
  waiting for: a pool slot, a lock, a reconnection, a frozen server. (The
  backends' own timeouts are longer: they cover one query, not the wait.)
  The work itself is not undone: a write that completes late is kept.
* **Circuit breaker.** After ``threshold`` consecutive failures of the store
  (`StorageUnavailable`, deadlines) the circuit opens: calls fail at once with
  `StorageUnavailable` for ``cooldown`` seconds, so that API calls and ingress
  lookups answer 503 at once instead of each waiting out a deadline. Then one
  call is let through as a probe: its success closes the circuit, its failure
  opens it for another cool-down. Refusals that are answers (not found, lock
  held, invalid cursor) do not count.

``open``, ``close`` and everything else go to the wrapped storage unchanged.

For the metrics it counts, as plain numbers read at scrape time:
``durations[call]`` (`exposr.stats.Durations` of the calls that finished in
time, answers and failures alike), ``timeouts`` (deadlines passed),
``unavailable`` (calls the store failed with `StorageUnavailable`) and
``short_circuited`` (calls refused at once while the circuit is open).
"""

import time

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from exposr.errors import StorageUnavailable
from exposr.stats import Durations
from exposr.storage.base import IStorage

log = Logger(namespace="exposr.storage")

TIMEOUT = 5.0  # seconds a storage call may take, waits included
THRESHOLD = 3  # consecutive failures that open the circuit
COOLDOWN = 5.0  # seconds the circuit stays open before a probe

_CALLS = ("get", "get_multi", "create", "put", "delete", "list_keys", "update")


@implementer(IStorage)
class GuardedStorage:
    """``GuardedStorage(storage, clock, timeout=TIMEOUT, threshold=THRESHOLD, cooldown=COOLDOWN)``."""

    def __init__(self, storage, clock, timeout=TIMEOUT, threshold=THRESHOLD, cooldown=COOLDOWN):
        self.storage = storage
        self.clock = clock
        self.timeout = timeout
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0  # consecutive
        self.open_until = None  # clock time the circuit is open until
        self.probing = False
        self.short_circuited = 0  # calls refused at once (for metrics)
        self.timeouts = 0
        self.unavailable = 0
        self.durations = {name: Durations() for name in _CALLS}
        for name in _CALLS:
            setattr(self, name, self._guarded(name, getattr(storage, name)))

    def __getattr__(self, name):
        return getattr(self.storage, name)

    # the wrapped storage is a Service: the server adds and stops it
    def setServiceParent(self, parent):
        return self.storage.setServiceParent(parent)

    def open(self):
        return self.storage.open()

    def close(self):
        return self.storage.close()

    @property
    def circuit_open(self):
        return self.open_until is not None

    def _guarded(self, name, call):
        def guarded(*args, **kwargs):
            if self.open_until is not None:
                if self.clock.seconds() < self.open_until or self.probing:
                    self.short_circuited += 1
                    return defer.fail(StorageUnavailable("storage is unavailable (circuit open)"))
                self.probing = True
            answer = defer.Deferred()
            timer = self.clock.callLater(self.timeout, self._expired, answer)
            defer.maybeDeferred(call, *args, **kwargs).addBoth(
                self._finished, answer, timer, durations, time.monotonic())
            return answer

        durations = self.durations[name]

        guarded.__name__ = call.__name__
        return guarded

    def _expired(self, answer):
        # the backend's own work goes on (it is not cancelled: a backend may
        # hold a pool slot or a lock); its late result is dropped
        failure = Failure(StorageUnavailable(f"no answer from storage within {self.timeout:g} s"))
        self.timeouts += 1
        self._failed(failure)
        answer.errback(failure)

    def _finished(self, result, answer, timer, durations, started):
        if answer.called:
            return None  # too late: already answered unavailable
        timer.cancel()
        durations.observe(time.monotonic() - started)
        if isinstance(result, Failure) and result.check(StorageUnavailable):
            self.unavailable += 1
            self._failed(result)
        else:
            self._succeeded()
        if isinstance(result, Failure):
            answer.errback(result)
        else:
            answer.callback(result)
        return None

    def _failed(self, failure):
        self.failures += 1
        self.probing = False
        if self.failures >= self.threshold:
            if self.open_until is None:
                log.warn("Storage failing ({error}): answering unavailable at once for {cooldown} s",
                         error=failure.getErrorMessage(), cooldown=self.cooldown)
            self.open_until = self.clock.seconds() + self.cooldown

    def _succeeded(self):
        if self.open_until is not None:
            log.info("Storage answers again")
        self.failures = 0
        self.open_until = None
        self.probing = False

