"""Plain counters kept where things happen, read by `exposr.metrics` at scrape time.

Nothing here knows Prometheus: a request or a storage call costs a few integer
additions, and turning them into metric families is the scraper's work.
"""

from bisect import bisect_left

#: Upper bounds (seconds) of the duration buckets (Prometheus' defaults).
DURATION_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class Durations:
    """A histogram of durations: ``counts[i]`` values fell in ``(bounds[i-1], bounds[i]]``,
    the last one above every bound; ``total`` is their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds=DURATION_BOUNDS):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, seconds):
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def cumulative(self):
        """``[(le, count)]`` as Prometheus wants them, ``+Inf`` last."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class RequestStats:
    """What the HTTP ingress counts, updated once per request (`IngressSession._access`).

    ``classes[status // 100]``: requests by status class (index 0 holds the
    requests that ended without a status); ``duration_counts`` /
    ``duration_bounds`` / ``duration_sum``: a `Durations` histogram, flat
    (from the request head to the end of the response); ``bytes_in``: every
    byte read from public clients, ``bytes_out``: every byte written to them
    (heads, bodies, the ingress's own answers, an upgraded connection's bytes),
    both of closed connections only (`bytes` adds the open ones);
    ``connections``: public client connections accepted.
    """

    __slots__ = ("classes", "duration_counts", "duration_bounds", "duration_sum", "bytes_in", "bytes_out",
                 "connections")

    def __init__(self):
        self.classes = [0] * 10
        self.duration_bounds = DURATION_BOUNDS
        self.duration_counts = [0] * (len(DURATION_BOUNDS) + 1)
        self.duration_sum = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.connections = 0

    @property
    def durations(self):
        """The duration histogram as a `Durations` (a copy)."""
        durations = Durations(self.duration_bounds)
        durations.counts = list(self.duration_counts)
        durations.total = self.duration_sum
        return durations

    def bytes(self, sessions):
        """(bytes in, bytes out) so far, the open ``sessions`` (`IngressSession`) included."""
        bytes_in, bytes_out = self.bytes_in, self.bytes_out
        for session in sessions:
            bytes_in += session.received
            bytes_out += session.raw_out + session.other_out
        return bytes_in, bytes_out
