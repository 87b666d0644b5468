"""The floor under the tunnel's req/s: plain Twisted TCP relays in front of the same nginx (by hand, not in CI).

The tunnel puts two Python processes between wrk and the target (exposrd, then
the exposr client). This prints, in one run and against one nginx (the one of
``http_bench.py --target nginx``), req/s at 10 connections and the MB/s of a
100 MB download (curl) for

* the target direct;
* one plain relay: a Twisted process that copies bytes between each public
  connection and its own connection to the target (no HTTP parsing, no
  WebSocket, no multiplexing, writes straight to the socket);
* two plain relays in a chain (the tunnel's shape: two Python processes);

each as stock Twisted (buffered writes, the default reactor) and lean (exposr's
reactor, writes straight to the socket as exposrd and the client make them),

with the CPU per request of each relay, so that the tunnel's figures
(``http_bench.py``) can be read against what the reactor and the socket calls
alone cost on this machine.

    .venv/bin/python bench/relay_floor.py [--duration 10] [--connections 10] [--rounds 2]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from benchlib import free_port, wait_port
from http_bench import cpu_seconds, download, nginx_argv, stop_all, wrk

HERE = os.path.abspath(__file__)


def run_relay(port, target_port, lean):
    """A plain Twisted relay: 127.0.0.1:port -> 127.0.0.1:target_port, one upstream connection per client.

    ``lean``: on exposr's reactor, writing with `exposr.sockwrite.write_now` (as exposrd and the client do).
    """
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    if lean:
        from exposr import reactor as exposr_reactor
        exposr_reactor.install()
        from exposr.sockwrite import write_now
    else:
        def write_now(transport, data):
            transport.write(data)
    from twisted.internet import protocol, reactor

    class Upstream(protocol.Protocol):
        def __init__(self, peer):
            self.peer = peer

        def connectionMade(self):
            self.transport.setTcpNoDelay(True)
            self.peer.upstream = self
            # back-pressure both ways, as any splice
            self.transport.registerProducer(self.peer.transport, True)
            self.peer.transport.registerProducer(self.transport, True)
            if self.peer.pending:
                write_now(self.transport, b"".join(self.peer.pending))
                self.peer.pending = None

        def dataReceived(self, data):
            write_now(self.peer.transport, data)

        def connectionLost(self, reason):
            self.peer.transport.loseConnection()

    class Public(protocol.Protocol):
        upstream = None

        def connectionMade(self):
            self.transport.setTcpNoDelay(True)
            self.pending = []
            protocol.ClientCreator(reactor, Upstream, self).connectTCP("127.0.0.1", target_port)

        def dataReceived(self, data):
            if self.upstream is None:
                self.pending.append(data)
            else:
                write_now(self.upstream.transport, data)

        def connectionLost(self, reason):
            if self.upstream is not None:
                self.upstream.transport.loseConnection()

    factory = protocol.Factory.forProtocol(Public)
    reactor.listenTCP(port, factory, interface="127.0.0.1", backlog=1024)
    reactor.run()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    procs = []
    tmp = tempfile.mkdtemp(prefix="exposr-floor-")

    def relay(port, upstream, lean):
        p = subprocess.Popen([sys.executable, HERE, "--relay", str(port), str(upstream), "lean" if lean else "plain"])
        procs.append(p)
        wait_port(port, p)
        return p.pid

    try:
        tport = free_port()
        procs.append(subprocess.Popen(nginx_argv(tport, tmp)))
        wait_port(tport, procs[-1])
        cases = []  # (name, port, relay pids)
        for lean, kind in ((False, "Twisted"), (True, "lean")):
            one, second, first = free_port(), free_port(), free_port()
            cases.append((f"one {kind} relay", one, [relay(one, tport, lean)]))
            pid2 = relay(second, tport, lean)
            cases.append((f"two {kind} relays", first, [relay(first, second, lean), pid2]))
        rps = {"direct": []}
        cpu = {}
        mbs = {"direct": []}
        for _ in range(args.rounds):
            rps["direct"].append(wrk(f"http://127.0.0.1:{tport}/", args.connections, args.duration)["rps"])
            mbs["direct"].append(download(f"http://127.0.0.1:{tport}/big"))
            for name, port, pids in cases:
                before = [sum(cpu_seconds(pid)) for pid in pids]
                result = wrk(f"http://127.0.0.1:{port}/", args.connections, args.duration)
                after = [sum(cpu_seconds(pid)) for pid in pids]
                rps.setdefault(name, []).append(result["rps"])
                cpu.setdefault(name, []).append([1e6 * (a - b) / result["requests"] for a, b in zip(after, before)])
                mbs.setdefault(name, []).append(download(f"http://127.0.0.1:{port}/big"))
        direct = statistics.median(rps["direct"])
        print(f"{args.connections} connections, nginx 100 B, median of {args.rounds} alternated rounds")
        print(f"  {'':20} {'req/s':>8} {'ratio':>6}  {'100 MB MB/s':>11} {'ratio':>6}  CPU us/req of each relay")
        direct_mbs = statistics.median(mbs["direct"])
        for name, values in rps.items():
            per = ""
            if name in cpu:
                per = "  ".join(f"{statistics.median(c[i] for c in cpu[name]):6.1f}" for i in range(len(cpu[name][0])))
            m = statistics.median(mbs[name])
            print(f"  {name:20} {statistics.median(values):8.0f} {statistics.median(values) / direct:6.2f}"
                  f"  {m:11.1f} {m / direct_mbs:6.2f}  {per}")
    finally:
        stop_all(procs, 5)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--relay":
        run_relay(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "lean")
    else:
        main()
