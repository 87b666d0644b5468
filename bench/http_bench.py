"""HTTP through the tunnel vs direct, in one run (by hand, not in CI).

Starts a small target (100-byte responses, and ``/big``: 100 MB), ``exposrd``
and the ``exposr`` client as subprocesses, then prints for the target reached
directly and through the tunnel:

* req/s and p50/p99 latency at 10 and 50 connections (``wrk --latency``),
* MB/s of a 100 MB download (``curl -w '%{speed_download}'``), the median of
  ``--downloads`` runs each way (default 3, direct and tunnel alternating: one
  run varies by a factor of two on a shared 2-core machine), with the CPU
  seconds it cost exposrd and the client,

and the ratios tunnel/direct. Needs ``wrk`` and ``curl`` on the PATH
(``apt-get install -y wrk curl``). ``--metrics-compare`` also starts a second
``exposrd`` with the admin interface (and so the ``/metrics`` counting) and its
own client, runs the tunnel measurements through both, alternating, and
prints a column for it (the 100 MB download goes through the first only).

    .venv/bin/python bench/http_bench.py [--duration 10] [--connections 10,50] [--target raw|web|nginx]
        [--rounds 1]                             # alternating wrk rounds (the median round is printed)
        [--log-level info] [--profile out.svg]   # py-spy record of exposrd
        [--metrics-compare]                      # the same through an exposrd with /metrics
        [--profile-client out.txt]               # ... and of the exposr client
        [--client-arg=--http-mode [--client-arg=--no-inspect]]   # the client in HTTP mode
        [--syscalls]                             # system calls per request (perf stat)

``--target nginx`` serves the same two answers from an ``nginx`` of this run (``apt-get install -y
nginx``; one worker, its own prefix, config and port in a temporary directory): a target much faster
than the Python ones, so the tunnel's own cost shows. ``--syscalls`` counts, with ``perf stat`` (``apt-get install -y linux-perf``; the
syscall tracepoints, not hardware counters), the system calls of ``exposrd`` and of the client
during each tunnel run and prints them per request: all of them, and the reads, writes,
``epoll_wait`` and ``epoll_ctl`` among them. ``--profile`` needs ``py-spy`` (``pip install py-spy``); the profile covers the
tunnel run at the largest connection count.
"""

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from benchlib import free_port, start_logged, wait_port  # noqa: E402,F401  (cluster_bench takes them from here too)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIG = 100 * 1000 * 1000
TUNNEL = "bench"


# -- the target (runs in its own process: `http_bench.py --target PORT`) ---------------


def run_web_target(port):
    """The same answers from a twisted.web Site (a typical small Python HTTP server)."""
    from twisted.internet import reactor
    from twisted.web import resource, server, static

    block = os.urandom(256 * 1024)

    class Big(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-length", b"%d" % BIG)
            left = [BIG]

            def more():
                while left[0] > 0 and not request._disconnected:
                    n = min(left[0], len(block))
                    left[0] -= n
                    request.write(block if n == len(block) else block[:n])
                    if request.channel is not None and request.channel.transport.producerPaused:
                        break
                if left[0] <= 0:
                    request.unregisterProducer()
                    request.finish()

            class P:
                def resumeProducing(self):
                    more()

                def pauseProducing(self):
                    pass

                def stopProducing(self):
                    left[0] = 0

            request.registerProducer(P(), False)
            return server.NOT_DONE_YET

    root = static.Data(b"x" * 100, "text/plain")
    root.isLeaf = True
    top = resource.Resource()
    top.putChild(b"big", Big())
    top.putChild(b"", root)
    site = server.Site(top)
    site.log = lambda request: None
    reactor.listenTCP(port, site, interface="127.0.0.1", backlog=1024)
    reactor.run()


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        root {tmp}/www;
        default_type text/plain;
        location = / {{ try_files /index.txt =404; }}
        location = /big {{ default_type application/octet-stream; }}
    }}
}}
"""


def nginx_argv(port, tmp):
    """Write an nginx prefix for `port` under `tmp` (100-byte / and the 100 MB /big); its argv."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        raise SystemExit("--target nginx needs nginx (apt-get install -y nginx)")
    www = os.path.join(tmp, "www")
    os.makedirs(www, exist_ok=True)
    # (nginx started as root serves as `nobody`: the files must be readable by it)
    os.chmod(tmp, 0o755)
    with open(os.path.join(www, "index.txt"), "wb") as f:
        f.write(b"x" * 100)
    with open(os.path.join(www, "big"), "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(BIG // len(block)):
            f.write(block)
        f.write(block[: BIG % len(block)])
    for name in ("index.txt", "big"):
        os.chmod(os.path.join(www, name), 0o644)
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(tmp=tmp, port=port))
    return [nginx, "-p", tmp, "-c", conf]


def run_target(port):
    from twisted.internet import protocol, reactor
    from twisted.internet.interfaces import IPushProducer
    from zope.interface import implementer

    body = b"x" * 100
    small = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n"
             b"Connection: keep-alive\r\n\r\n" + body)
    block = os.urandom(256 * 1024)

    @implementer(IPushProducer)
    class Big:
        def __init__(self, transport, size):
            self.transport = transport
            self.left = size
            self.paused = False
            self.call = None

        def pauseProducing(self):
            self.paused = True

        def resumeProducing(self):
            self.paused = False
            if self.call is None:
                self.call = reactor.callLater(0, self.run)

        def stopProducing(self):
            self.left = 0

        def run(self):
            self.call = None
            while not self.paused and self.left > 0:
                n = min(self.left, len(block))
                self.left -= n
                self.transport.write(block if n == len(block) else block[:n])
            if self.left <= 0:
                self.transport.unregisterProducer()

    class Responder(protocol.Protocol):
        def connectionMade(self):
            self.buf = b""

        def dataReceived(self, data):
            self.buf += data
            while True:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, self.buf = self.buf[:end], self.buf[end + 4:]
                if head.startswith(b"GET /big"):
                    self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                         b"Content-Length: %d\r\n\r\n" % BIG)
                    p = Big(self.transport, BIG)
                    self.transport.registerProducer(p, True)
                    p.resumeProducing()
                else:
                    self.transport.write(small)

    f = protocol.Factory.forProtocol(Responder)
    f.noisy = False
    reactor.listenTCP(port, f, interface="127.0.0.1", backlog=1024)
    reactor.run()


# -- orchestration ---------------------------------------------------------------


def wait_file(path, pattern, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(path, "rb") as f:
            if re.search(pattern, f.read()):
                return
        time.sleep(0.05)
    with open(path, "rb") as f:
        raise SystemExit(f"timed out waiting for {pattern!r}:\n{f.read().decode(errors='replace')[-2000:]}")


def stop_all(procs, seconds):
    """SIGTERM every process (last started first), then kill what has not exited in time."""
    for p in reversed(procs):
        p.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(seconds)
        except subprocess.TimeoutExpired:
            p.kill()


def wrk(url, connections, duration, host=None, headers=()):
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", url]
    for header in headers:
        argv[1:1] = ["-H", header]
    if host:
        argv[1:1] = ["-H", f"Host: {host}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def ms(label):
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return {"rps": rps, "requests": total, "p50": ms("50"), "p99": ms("99"), "non2xx": int(errors.group(1)) if errors else 0}


def cpu_seconds(pid):
    """(user, system) CPU seconds used so far by a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


SYSCALL_EVENTS = {
    "all": "raw_syscalls:sys_enter",
    "read": "syscalls:sys_enter_recvfrom,syscalls:sys_enter_read",
    "write": "syscalls:sys_enter_sendto,syscalls:sys_enter_write,syscalls:sys_enter_sendmsg,syscalls:sys_enter_writev",
    "epoll_wait": "syscalls:sys_enter_epoll_wait",
    "epoll_ctl": "syscalls:sys_enter_epoll_ctl",
}


class SyscallCounter:
    """``perf stat`` of one process's system calls, from now until `stop`."""

    def __init__(self, pid):
        if shutil.which("perf") is None:
            raise SystemExit("--syscalls needs perf (apt-get install -y linux-perf)")
        events = ",".join(SYSCALL_EVENTS.values())
        self.out = tempfile.NamedTemporaryFile("w+", suffix=".perf")
        self.proc = subprocess.Popen(["perf", "stat", "-x", ",", "-o", self.out.name, "-e", events, "-p", str(pid)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)  # perf attaches

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        counts = {}
        for line in open(self.out.name):
            parts = line.strip().split(",")
            if len(parts) > 2 and parts[0].isdigit():
                counts[parts[2]] = int(parts[0])
        return {k: sum(counts.get(e, 0) for e in v.split(",")) for k, v in SYSCALL_EVENTS.items()}


def download(url, host=None):
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{speed_download} %{size_download} %{http_code}", url]
    if host:
        argv[1:1] = ["-H", f"Host: {host}"]
    speed, size, code = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    if int(size) != BIG or code != "200":
        raise SystemExit(f"download failed: {size} bytes, status {code}")
    return float(speed) / 1e6


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--target":
        (run_web_target if sys.argv[3] == "web" else run_target)(int(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", default="10,50")
    ap.add_argument("--log-level", default="info", help="exposrd --log-level (default info)")
    ap.add_argument("--target", choices=["raw", "web", "nginx"], default="raw",
                    help="raw: a Twisted protocol answering fixed bytes (default); web: a twisted.web Site; "
                         "nginx: an nginx of this run (one worker)")
    ap.add_argument("--profile", help="py-spy record of exposrd during the last tunnel wrk run "
                    "(flame graph; raw collapsed stacks when the name ends in .txt)")
    ap.add_argument("--profile-client", help="the same for the exposr client")
    ap.add_argument("--no-download", action="store_true", help="skip the 100 MB download")
    ap.add_argument("--client-arg", action="append", default=[], metavar="ARG",
                    help="extra argument of `exposr tunnel connect` (repeat it), e.g. --client-arg=--http-mode "
                         "--client-arg=--inspect=127.0.0.1:0 (the inspector on) or --client-arg=--no-inspect")
    ap.add_argument("--syscalls", action="store_true",
                    help="system calls per request of exposrd and the client (perf stat, syscall tracepoints)")
    ap.add_argument("--downloads", type=int, default=3, help="100 MB downloads each way (median, default 3)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="wrk rounds per connection count, direct and tunnel alternating; the round of median "
                         "ratio is printed, with the range (direct varies run to run on a shared machine)")
    ap.add_argument("--metrics-compare", action="store_true",
                    help="also through a second exposrd with --admin-enable (/metrics counting on)")
    args = ap.parse_args()
    for tool in ("wrk", "curl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed (apt-get install -y {tool})")
    conns = [int(c) for c in args.connections.split(",")]
    py = sys.executable
    tmp = tempfile.mkdtemp(prefix="exposr-bench-")
    procs = []

    def start(argv, name):
        return start_logged(procs, tmp, argv, name, ROOT)

    try:
        tport, sport = free_port(), free_port()
        if args.target == "nginx":
            start(nginx_argv(tport, tmp), "target")
        else:
            start([py, os.path.abspath(__file__), "--target", str(tport), args.target], "target")
        wait_port(tport)

        def server_and_client(port, name, extra=()):
            server, _ = start([py, "-c", "from exposr.script import main; main()",
                               "--allow-registration", "--ingress-http-url", f"http://localhost:{port}",
                               "--api-port", str(port), "--ingress-http-port", str(port),
                               "--listen-address", "127.0.0.1", "--log-level", args.log_level, *extra], name)
            wait_port(port)
            client, client_log = start([py, "-c", "from exposr.client.cli import main; main()",
                                        "-s", f"http://127.0.0.1:{port}/", "tunnel", "connect", TUNNEL,
                                        f"http://127.0.0.1:{tport}", *args.client_arg], name + "-client")
            wait_file(client_log, rb"Ingress HTTP")
            return server, client

        server, client = server_and_client(sport, "exposrd")
        host = f"{TUNNEL}.localhost:{sport}"
        direct_url, tunnel_url = f"http://127.0.0.1:{tport}/", f"http://127.0.0.1:{sport}/"
        # warm up both paths
        wrk(direct_url, 10, 1)
        wrk(tunnel_url, 10, 1, host)
        metered = None
        if args.metrics_compare:
            mport, aport = free_port(), free_port()
            mserver, mclient = server_and_client(mport, "exposrd-metrics",
                                                 ("--admin-enable", "--admin-port", str(aport)))
            metered = (mserver, mclient, f"http://127.0.0.1:{mport}/", f"{TUNNEL}.localhost:{mport}")
            wrk(metered[2], 10, 1, metered[3])

        rows = []
        for c, r in ((c, r) for c in conns for r in range(args.rounds)):
            d = wrk(direct_url, c, args.duration)
            spies = []
            for out, proc in ((args.profile, server), (args.profile_client, client)):
                if out and c == conns[-1] and r == args.rounds - 1:
                    raw = ["-f", "raw"] if out.endswith(".txt") else []
                    spies.append(subprocess.Popen(
                        ["py-spy", "record", "-o", out, "-p", str(proc.pid), *raw,
                         "-d", str(args.duration), "-r", "200", "--nonblocking"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            def through(server, client, url, host):
                counters = [SyscallCounter(p.pid) for p in (server, client)] if args.syscalls else []
                cpu0 = cpu_seconds(server.pid), cpu_seconds(client.pid)
                t = wrk(url, c, args.duration, host)
                cpu1 = cpu_seconds(server.pid), cpu_seconds(client.pid)
                n = max(1, t["requests"])
                for key, counter in zip(("server", "client"), counters):
                    t[key + "_sys"] = {k: v / n for k, v in counter.stop().items()}
                for key, i in (("server", 0), ("client", 1)):
                    usr, sys_ = ((cpu1[i][k] - cpu0[i][k]) * 1e6 / n for k in (0, 1))
                    t[key + "_us"], t[key + "_split"] = usr + sys_, f"({usr:.0f}+{sys_:.0f})"
                return t

            t = through(server, client, tunnel_url, host)
            for spy in spies:
                spy.wait()
            m = through(*metered) if metered is not None else None
            rows.append((c, d, t, m))
        # several rounds: each connection count's row is its round of median
        # tunnel/direct req/s (a whole, consistent round), with the spread
        spread = {}
        if args.rounds > 1:
            chosen = []
            for c in conns:
                rounds = sorted((row for row in rows if row[0] == c), key=lambda row: row[2]["rps"] / row[1]["rps"])
                spread[c] = (rounds[0][2]["rps"] / rounds[0][1]["rps"], rounds[-1][2]["rps"] / rounds[-1][1]["rps"])
                chosen.append(rounds[len(rounds) // 2])
            rows = chosen
        if not args.no_download:
            runs, dl_cpu = [], []
            for _ in range(max(1, args.downloads)):
                d_run = download(direct_url + "big")
                cpu0 = cpu_seconds(server.pid), cpu_seconds(client.pid)
                runs.append((d_run, download(tunnel_url + "big", host)))
                cpu1 = cpu_seconds(server.pid), cpu_seconds(client.pid)
                dl_cpu.append([sum(cpu1[i]) - sum(cpu0[i]) for i in (0, 1)])
            d_mb = statistics.median(d for d, _ in runs)
            t_mb = statistics.median(t for _, t in runs)

        print(f"{'':14}{'direct':>22}{'tunnel':>22}{'ratio':>9}"
              + (f"{'tunnel+metrics':>18}{'ratio':>9}" if metered else ""))
        for c, d, t, m in rows:
            for label, key, fmt in (("req/s", "rps", ".0f"), ("p50 ms", "p50", ".2f"), ("p99 ms", "p99", ".2f")):
                line = (f"{c:>3} conns " if key == "rps" else " " * 10) + f"{label:<6}"
                line += f"{d[key]:>{20 if key == 'rps' else 20}{fmt}}{t[key]:>22{fmt}}{t[key] / d[key]:>9.2f}"
                if m is not None:
                    line += f"{m[key]:>18{fmt}}{m[key] / d[key]:>9.2f}"
                if key == "rps" and c in spread:
                    line += f"   (median of {args.rounds} rounds; ratio {spread[c][0]:.2f}-{spread[c][1]:.2f})"
                print(line)
            for name, row in (("", t), ("(metrics) ", m)):
                if row is not None:
                    print(f"{'':4}CPU us/req {name}exposrd{row['server_us']:>8.1f} {row['server_split']:<10} "
                          f"exposr{row['client_us']:>8.1f} {row['client_split']} (user+sys)")
            if "server_sys" in t:
                for name in ("server", "client"):
                    per = t[name + "_sys"]
                    print(f"{'':4}syscalls/req {'exposrd' if name == 'server' else 'exposr':<8}"
                          + " ".join(f"{k} {v:.2f}" for k, v in per.items()))
            if d["non2xx"] or t["non2xx"]:
                print(f"{'':10}non-2xx{d['non2xx']:>19}{t['non2xx']:>22}")
        if metered is not None:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{aport}/metrics", timeout=10) as r:
                counted = [line for line in r.read().decode().splitlines()
                           if line.startswith('exposr_ingress_requests_total{') and 'status_class="2xx"' in line]
            print("metrics of the second exposrd: " + " ".join(counted))
        if not args.no_download:
            print(f"100 MB  MB/s{d_mb:>22.1f}{t_mb:>22.1f}{t_mb / d_mb:>9.2f}   (median of {len(runs)})")
            print(f"{'':4}CPU s/100 MB exposrd {statistics.median(c[0] for c in dl_cpu):.3f}"
                  f"   exposr {statistics.median(c[1] for c in dl_cpu):.3f}")
        rss = 0
        with open(f"/proc/{server.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    rss = int(line.split()[1]) // 1024
        print(f"exposrd peak RSS: {rss} MB; logs in {tmp}")
        for out in (args.profile, args.profile_client):
            if out:
                print(f"profile: {out}")
    finally:
        stop_all(procs, 10)


if __name__ == "__main__":
    main()
