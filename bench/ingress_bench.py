"""The HTTP ingress's own cost per proxied request, in one process (by hand, not in CI).

Drives one `IngressSession` (the public side) and one pooled upstream stream
over in-memory transports: a keep-alive request in, the response back, the
access record written to a throwaway output. No sockets, no WebSocket, no
multiplexer: what is left is the Python cost of routing, forwarding-header
rewriting, head parsing and the response path. Prints microseconds per
request/response and, with ``--profile``, the top functions (cProfile).
``--metrics`` counts the requests for ``/metrics`` as a server with the admin
interface does; ``--compare`` alternates rounds without and with that counting
in one run and prints the median of each.

    .venv/bin/python bench/ingress_bench.py [--requests 100000] [--profile] [--auth] [--allow]
        [--metrics | --compare [--rounds 7]]

``--auth`` gives the tunnel HTTP basic auth (every request carries the right
``Authorization``: the cached check), ``--allow`` an IP allow list that lets
the client in.
"""

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from exposr import config as config_mod, log  # noqa: E402
from exposr.ingress.http import HTTPIngress  # noqa: E402
from exposr.router import Router  # noqa: E402
from exposr.stats import RequestStats  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: bench.example.com:8080\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n"
            b"Connection: keep-alive\r\n\r\n" + b"x" * 100)
RECORD = {"id": "bench", "account": "A", "target": {"url": "http://127.0.0.1:3000"},
          "ingress": {"http": {"enabled": True}}}


class _Tunnels:
    def on_change(self, callback):
        pass

    def get(self, tunnel_id):
        return RECORD if tunnel_id == "bench" else None


class _Stream(StringTransport):
    """The upstream stream's transport: what the ingress sends is dropped."""

    def write(self, data):
        pass


class _Connection:
    def __init__(self):
        self.opened = []

    def open_stream(self, factory):
        proto = factory.buildProtocol(None)
        proto.makeConnection(_Stream())
        self.opened.append(proto)
        return defer.succeed(proto)


class _Registry:
    def __init__(self):
        self.conn = _Connection()

    def on_change(self, callback):
        pass

    def is_connected(self, tunnel_id):
        return True

    def has_local(self, tunnel_id):
        return True

    def connection_for(self, tunnel_id):
        return self.conn


class _Public(StringTransport):
    def write(self, data):
        self.written += len(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--metrics", action="store_true", help="count requests for /metrics (as with --admin-enable)")
    ap.add_argument("--compare", action="store_true", help="rounds without and with --metrics, alternating")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of each with --compare (default 7)")
    ap.add_argument("--auth", action="store_true", help="the tunnel has basic auth (right credentials sent)")
    ap.add_argument("--allow", action="store_true", help="the tunnel has an IP allow list (the client on it)")
    args = ap.parse_args()
    global REQUEST
    if args.auth or args.allow:
        from exposr import httpauth

        rules = RECORD["access"] = {}
        if args.auth:
            rules["http_auth"] = {"user": "bench", "hash": httpauth.hash_password("secret")}
            REQUEST = REQUEST[:-2] + b"Authorization: Basic YmVuY2g6c2VjcmV0\r\n\r\n"
        if args.allow:
            rules["allow"] = ["203.0.113.0/24", "192.168.0.0/16", "2001:db8::/32"]
    # the access records go to a throwaway JSON output of the bench's own,
    # handed to the ingress's access log explicitly (not installed globally)
    sink = log.JSONLineObserver(io.StringIO(), reactor=_NoShutdown())
    access_log = log.AccessLog("exposr.ingress.http.access", sink=sink)
    clock = task.Clock()
    config = config_mod.Config(ingress_http_url="http://example.com:8080")
    registry = _Registry()
    ingress = HTTPIngress(config, Router(_Tunnels(), registry, clock), "node", clock, access_log=access_log,
                          stats=RequestStats() if args.metrics else None)
    session = ingress.session()
    public = _Public()
    public.written = 0
    session.makeConnection(public)
    session.dataReceived(REQUEST)  # opens the stream
    up = registry.conn.opened[0]
    up.dataReceived(RESPONSE)

    def run(n):
        for _ in range(n):
            session.dataReceived(REQUEST)
            up.dataReceived(RESPONSE)

    run(1000)
    assert public.written == 1001 * len(RESPONSE), public.written
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(run, args.requests)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    print(f"python {sys.version.split()[0]}")
    if args.compare:
        times = {False: [], True: []}
        for _ in range(args.rounds):
            for counting in (False, True):
                ingress.stats = RequestStats() if counting else None
                t0 = time.perf_counter()
                run(args.requests)
                times[counting].append((time.perf_counter() - t0) / args.requests * 1e6)
        for counting, label in ((False, "metrics off"), (True, "metrics on ")):
            us = times[counting]
            print(f"ingress request+response, {label}: {statistics.median(us):.2f} us median "
                  f"(min {min(us):.2f}, max {max(us):.2f}, {args.rounds} rounds of {args.requests})")
        return
    t0 = time.perf_counter()
    run(args.requests)
    dt = time.perf_counter() - t0
    print(f"ingress request+response: {dt / args.requests * 1e6:.2f} us ({args.requests / dt:.0f}/s)")


class _NoShutdown:
    running = False

    def addSystemEventTrigger(self, *args):
        pass


if __name__ == "__main__":
    main()
