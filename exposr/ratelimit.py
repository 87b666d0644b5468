"""Failed attempts limited per source address: token buckets in bounded memory.

Guessing an account number, an admin key or a connection token is infeasible
(the key spaces are large), but each attempt costs a storage lookup and a log
line. A `FailureLimiter` gives every source address a bucket of ``burst``
failures that refills at ``rate`` per second; an address whose bucket is empty
is `blocked` (answered 429, or refused before authentication) until it
refills. Successful attempts cost nothing. At most ``max_sources`` addresses
are tracked: beyond that the least recently seen are forgotten (an attacker
with many addresses gets at most ``burst`` tries from each). One warning line
per ``log_interval`` says how much was refused.

Pure logic on an injected clock; no I/O.
"""

from twisted.logger import Logger

log = Logger(namespace="exposr.ratelimit")

BURST = 20  # failures an address may make at once
RATE = 1.0  # failures per second it may make after that
MAX_SOURCES = 10000
LOG_INTERVAL = 60.0


class FailureLimiter:
    """``FailureLimiter(clock, what, burst=BURST, rate=RATE, max_sources=MAX_SOURCES)``."""

    def __init__(self, clock, what, burst=BURST, rate=RATE, max_sources=MAX_SOURCES, log_interval=LOG_INTERVAL):
        self.clock = clock
        self.what = what
        self.burst = float(burst)
        self.rate = float(rate)
        self.max_sources = max_sources
        self.log_interval = log_interval
        self.refused = 0  # total, for metrics
        self._buckets = {}  # source -> [tokens, time of the last update]
        self._last_log = None
        self._refused_since = 0
        self._sources_since = set()

    def _tokens(self, source, now):
        bucket = self._buckets.get(source)
        if bucket is None:
            return None
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        if tokens >= self.burst:
            del self._buckets[source]  # full again: nothing to remember
            return None
        bucket[0], bucket[1] = tokens, now
        return tokens

    @property
    def tracking(self):
        """False while no address has failed recently: then nobody is `blocked`
        (callers may skip working out the address)."""
        return bool(self._buckets)

    def blocked(self, source):
        """True when ``source`` has no failures left: refuse it without trying."""
        now = self.clock.seconds()
        tokens = self._tokens(source, now)
        if tokens is None or tokens >= 1.0:
            return False
        self.refused += 1
        self._refused_since += 1
        self._sources_since.add(source)
        if self._last_log is None or now - self._last_log >= self.log_interval:
            log.warn(
                "Too many failed {what} attempts: refused {count} from {sources} address(es), e.g. {source}",
                what=self.what, count=self._refused_since, sources=len(self._sources_since), source=source,
            )
            self._last_log, self._refused_since = now, 0
            self._sources_since = set()
        return True

    def failed(self, source):
        """``source`` made a failed attempt."""
        now = self.clock.seconds()
        tokens = self._tokens(source, now)
        if tokens is None:
            if len(self._buckets) >= self.max_sources:
                # forget the least recently updated addresses (dicts keep insertion order)
                for old in list(self._buckets)[: max(1, self.max_sources // 10)]:
                    del self._buckets[old]
            tokens = self.burst
        else:
            del self._buckets[source]  # re-inserted last: the most recently seen
        self._buckets[source] = [max(0.0, tokens - 1.0), now]
