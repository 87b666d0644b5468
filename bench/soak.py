"""Soak run of the WebSocket tunnel path (by hand, not in CI); bounded, stops by itself.

Starts ``exposrd`` as a subprocess, and in this process a small HTTP target
and the exposr client's `TunnelConnector`s, then measures ``exposrd``'s RSS
(/proc/PID/status) and open descriptors (/proc/PID/fd):

1. ``--tunnels N`` tunnels connected and held: RSS per tunnel;
2. ``--streams`` (1,000) concurrent requests through one tunnel: the target
   holds every request until all have arrived, then answers them all;
3. ``--cycles`` (10,000) connect / request / response / disconnect cycles of
   public clients through the tunnel, ``--concurrency`` (50) at a time,
   then ``--reconnects`` (200) tunnel WebSocket disconnect / reconnect cycles;
   RSS and descriptors before and after.

    .venv/bin/python bench/soak.py [--tunnels 20] [--streams 1000] [--cycles 10000]
        [--concurrency 50] [--reconnects 200] [--timeout 600]

Every wait is bounded (``--timeout`` for the whole run); the process exits 1
when a phase fails or times out.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from benchlib import fds, free_port, rss_kib as rss_kb  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tunnels", type=int, default=20)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--cycles", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--reconnects", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()

    from twisted.internet import defer, protocol, reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint

    from exposr.client.connect import TunnelConnector
    from exposr.client.rest import ApiClient

    port = free_port()
    tmp = tempfile.mkdtemp(prefix="exposr-soak-")
    log = open(os.path.join(tmp, "exposrd.log"), "wb")
    server = subprocess.Popen(
        [sys.executable, "-c", "from exposr.script import main; main()", "--allow-registration",
         "--ingress-http-url", f"http://localhost:{port}", "--api-port", str(port),
         "--ingress-http-port", str(port), "--listen-address", "127.0.0.1", "--log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("EXPOSR_")})
    failed = []

    class Target(protocol.Protocol):
        """Answers each request head with RESPONSE; holds them while ``hold`` is set."""

        def dataReceived(self, data):
            if b"\r\n\r\n" not in data:
                return
            if target.hold is not None:
                target.held.append(self)
                if len(target.held) >= target.hold:
                    held, target.held, target.hold = target.held, [], None
                    for p in held:
                        p.transport.write(RESPONSE)
                return
            self.transport.write(RESPONSE)

    target = protocol.Factory.forProtocol(Target)
    target.hold, target.held = None, []

    class Public(protocol.Protocol):
        def __init__(self, host):
            self.host = host
            self.done = defer.Deferred()
            self.got = b""

        def connectionMade(self):
            self.transport.write(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % self.host.encode())

        def dataReceived(self, data):
            self.got += data
            if self.got.endswith(b"\r\n\r\nok") and not self.done.called:
                self.done.callback(self.got.split(b" ", 2)[1])
                self.transport.loseConnection()

        def connectionLost(self, reason):
            if not self.done.called:
                self.done.errback(reason)

    class Once(protocol.Factory):
        def __init__(self, proto):
            self.proto = proto

        def buildProtocol(self, addr):
            return self.proto

    def request(host):
        p = Public(host)
        d = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10).connect(Once(p))
        d.addCallback(lambda _: p.done)
        return d

    def figures(label):
        rss, n = rss_kb(server.pid), fds(server.pid)
        print(f"{label:<44} RSS {rss / 1024:7.1f} MB   descriptors {n:5d}", flush=True)
        return rss, n

    @defer.inlineCallbacks
    def wait_port():
        for _ in range(400):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return
            except OSError:
                yield deferLater(0.05)
        raise SystemExit("exposrd does not listen")

    def deferLater(seconds):
        from twisted.internet import task

        return task.deferLater(reactor, seconds, lambda: None)

    @defer.inlineCallbacks
    def run():
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(target)
        target_url = f"http://127.0.0.1:{listening.getHost().port}"
        yield wait_port()
        api = ApiClient(reactor, f"http://127.0.0.1:{port}/")
        connectors = []
        try:
            base = figures("exposrd started")
            # 1. N tunnels held
            for i in range(args.tunnels):
                if i % 10 == 0:  # a few tunnels per account
                    acct = yield api.create_account()
                    api = ApiClient(reactor, f"http://127.0.0.1:{port}/", account=acct["account_id"])
                tid = f"soak{i}"
                yield api.put_tunnel(tid, {})
                yield api.patch_tunnel(tid, {"target": {"url": target_url}, "ingress": {"http": {"enabled": True}},
                                             "transport": {"ws": {"enabled": True}}})
                c = TunnelConnector(reactor, api, tid)
                yield c.start()
                yield c.wait_connections(len(c.slots))
                connectors.append(c)
            held = figures(f"{args.tunnels} tunnels held")
            per = (held[0] - base[0]) / max(1, args.tunnels)
            print(f"{'':44} {per:.1f} KB RSS, {(held[1] - base[1]) / max(1, args.tunnels):.1f} descriptors per tunnel")
            host = f"soak0.localhost:{port}"
            yield request(host)  # warm-up
            # 2. concurrent streams
            before = figures("before concurrent streams")
            target.hold = args.streams
            t0 = time.monotonic()
            results = yield defer.gatherResults([request(host) for _ in range(args.streams)], consumeErrors=True)
            dt = time.monotonic() - t0
            ok = sum(1 for r in results if r == b"200")
            figures(f"{args.streams} concurrent streams answered")
            print(f"{'':44} {ok} of {args.streams} answered 200 in {dt:.1f} s")
            if ok != args.streams:
                failed.append("streams")
            # 3. churn (after the streams' connections have closed: at most 10 s)
            for _ in range(200):
                if fds(server.pid) <= held[1] + 2:
                    break
                yield deferLater(0.05)
            before = figures(f"before {args.cycles} connect/disconnect cycles")
            left, ok = [args.cycles], [0]
            t0 = time.monotonic()

            @defer.inlineCallbacks
            def worker():
                while left[0] > 0:
                    left[0] -= 1
                    code = yield request(host)
                    ok[0] += code == b"200"

            yield defer.gatherResults([worker() for _ in range(args.concurrency)], consumeErrors=True)
            dt = time.monotonic() - t0
            for _ in range(200):  # the last connections' close, at most 10 s
                if fds(server.pid) <= before[1] + 2:
                    break
                yield deferLater(0.05)
            after = figures(f"after {args.cycles} cycles")
            print(f"{'':44} {ok[0]} of {args.cycles} answered 200, {args.cycles / dt:.0f}/s; "
                  f"RSS {(after[0] - before[0]) / 1024:+.1f} MB, descriptors {after[1] - before[1]:+d}")
            if ok[0] != args.cycles:
                failed.append("cycles")
            before = figures(f"before {args.reconnects} tunnel reconnects")
            c = connectors[-1]
            for _ in range(args.reconnects):
                for ws in c.connections:
                    ws.transport.abortConnection()
                yield c.wait_connections(len(c.slots))
            after = figures(f"after {args.reconnects} tunnel reconnects")
            print(f"{'':44} RSS {(after[0] - before[0]) / 1024:+.1f} MB, descriptors {after[1] - before[1]:+d}")
        finally:
            for c in connectors:
                yield c.stop()
            yield listening.stopListening()

    def timed_out():
        failed.append("timeout")
        reactor.stop()

    guard = reactor.callLater(args.timeout, timed_out)

    def finish(result):
        if hasattr(result, "getTraceback"):
            failed.append(result.getErrorMessage())
            print(result.getTraceback(), file=sys.stderr)
        if guard.active():
            guard.cancel()
        if reactor.running:
            reactor.stop()

    reactor.callWhenRunning(lambda: run().addBoth(finish))
    try:
        reactor.run()
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
    print(f"exposrd log: {log.name}")
    if failed:
        print("FAILED:", ", ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
