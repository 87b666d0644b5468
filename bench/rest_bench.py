"""REST API calls and tunnel connections at scale (by hand, not in CI).

Starts ``exposrd`` as a subprocess (``memory://`` storage unless ``--storage``
gives a URL: ``sqlite:///tmp/x.sqlite``, ``postgres://...``, ``redis://...``),
creates one account (``POST /v1/account``), gets its token, then sets up N
tunnels of that account, ``--parallel`` (default 16) calls in flight at a time:

* ``PUT /v1/tunnel/<id>`` (create, body ``{}``),
* ``PATCH`` (configure: target URL, HTTP ingress and WS transport enabled),
* ``GET`` (the tunnel info, whose ``transport.ws.url`` carries the token),
* connect: the WebSocket upgrade of that URL, as the exposr client does; the
  WebSocket is then held open (pings answered) until the end of the run.

The tunnels are set up in 10 blocks of N/10; within a block each operation
runs over the block's tunnels before the next one starts (PUT all, PATCH all,
GET all, connect all), so that the server's CPU time (``/proc/PID/task/*/schedstat``) can
be given per call of each operation. Each block also measures ``POST
/v1/account`` (new accounts, at most 100 per block) and ``GET
/v1/account/<id>/token`` (of the account holding the tunnels, one per tunnel
of the block, as the exposr client fetches one before each connection).

Printed per N and operation, for the first and the last block (10 % of the
tunnels each: a per-call cost that grows with the tunnel count shows as a
difference between the two): calls/s, median and p99 latency, exposrd CPU µs
per call; then the wall time of the N tunnels (PUT+PATCH+GET+connect of every
block), the bench's own CPU (to check it is not the bottleneck) and the RSS of
exposrd with all N tunnels connected. Every N runs against a fresh exposrd.

The HTTP client is ``http.client`` in threads (one keep-alive connection per
thread); the WebSockets are held by one thread with ``selectors``.

    .venv/bin/python bench/rest_bench.py [--tunnels 1000,4000] [--parallel 16]
        [--storage URL] [--log-level info] [--profile out.svg]   # py-spy record of exposrd, the last N
        [--profile-idle idle.svg]   # ... while idle with every tunnel connected
"""

import argparse
import base64
import http.client
import json
import os
import queue
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlsplit
from benchlib import free_port, rss_mb, wait_port  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BLOCKS = 10
IDLE = 10.0  # seconds of idle CPU measurement (two cluster announcement rounds, one ping round)
PY_SPY = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
OPS = ("account", "token", "put", "patch", "get", "connect")
SETUP_OPS = ("put", "patch", "get", "connect")


def cpu_seconds(pid):
    """CPU seconds used so far by a process's threads: from ``/proc/PID/task/*/schedstat`` (in ns),
    else from ``/proc/PID/stat`` (user + system, in clock ticks: 10 ms)."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        if total:
            return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * p / 100))]


# -- the WebSockets (held by one thread) ------------------------------------------------


class Holder:
    """Holds the connected WebSockets: answers the server's pings, counts what closed."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.pending = queue.Queue()
        self.closed = 0
        self.held = 0
        self.stopping = False
        self.wake_r, self.wake_w = socket.socketpair()
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def add(self, sock, rest):
        self.pending.put((sock, rest))
        self.wake_w.send(b"x")

    def run(self):
        while not self.stopping:
            for key, _ in self.sel.select(1.0):
                if key.data is None:
                    self.wake_r.recv(4096)
                    while not self.pending.empty():
                        sock, rest = self.pending.get()
                        sock.setblocking(False)
                        buf = [rest]
                        self.sel.register(sock, selectors.EVENT_READ, buf)
                        self.held += 1
                        if rest:
                            self.frames(sock, buf)
                    continue
                sock, buf = key.fileobj, key.data
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.drop(sock)
                    continue
                buf[0] += data
                self.frames(sock, buf)

    def frames(self, sock, buf):
        data = buf[0]
        while len(data) >= 2:
            b0, b1 = data[0], data[1]
            n, off = b1 & 0x7F, 2
            if n == 126:
                if len(data) < 4:
                    break
                n, off = int.from_bytes(data[2:4], "big"), 4
            elif n == 127:
                if len(data) < 10:
                    break
                n, off = int.from_bytes(data[2:10], "big"), 10
            if b1 & 0x80:
                off += 4
            if len(data) < off + n:
                break
            payload, data = data[off:off + n], data[off + n:]
            opcode = b0 & 0x0F
            if opcode == 0x9:  # ping: a masked pong with the same payload
                mask = os.urandom(4)
                masked = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
                try:
                    sock.send(bytes([0x8A, 0x80 | len(payload)]) + mask + masked)
                except OSError:
                    pass
            elif opcode == 0x8:
                self.drop(sock)
                return
        buf[0] = data

    def drop(self, sock):
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        self.closed += 1
        self.held -= 1

    def stop(self):
        self.stopping = True
        self.wake_w.send(b"x")
        self.thread.join(5)
        for key in list(self.sel.get_map().values()):
            if key.data is not None:
                key.fileobj.close()


def ws_connect(url):
    """The WebSocket upgrade of ``url`` (ws://): the socket and the bytes after the 101, or an error."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port or 80), 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    path = parts.path + ("?" + parts.query if parts.query else "")
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            sock.close()
            raise OSError(f"upgrade refused: {data[:100]!r}")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 101"):
        sock.close()
        raise OSError(f"upgrade refused: {head[:100]!r}")
    return sock, rest


# -- the REST calls (threads with http.client) -----------------------------------------


class Client:
    def __init__(self, port):
        self.port = port
        self.local = threading.local()
        self.auth = None

    def call(self, method, path, body=None):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Host": f"127.0.0.1:{self.port}"}
        if self.auth:
            headers["Authorization"] = self.auth
        if body is not None:
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            try:
                conn.request(method, path, body, headers)
                r = conn.getresponse()
                data = r.read()
                return r.status, data
            except (http.client.HTTPException, OSError):
                conn.close()
                if attempt:
                    raise


def run_parallel(parallel, items, fn):
    """``fn(item)`` for every item, ``parallel`` at a time: (latencies in s, wall s, errors)."""
    it = iter(items)
    lock = threading.Lock()
    latencies, errors = [], []

    def worker():
        while True:
            with lock:
                try:
                    item = next(it)
                except StopIteration:
                    return
            t0 = time.perf_counter()
            try:
                fn(item)
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                with lock:
                    errors.append(f"{item}: {e}")
                continue
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)

    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - t0, errors


def expect(status, data, *ok):
    if status not in ok:
        raise RuntimeError(f"HTTP {status}: {data[:200]!r}")
    return data


def run_one(args, n, last):
    """One exposrd, n tunnels (``last``: the last N, the profiled one): {op: [block stats]}, totals."""
    py = sys.executable
    tmp = tempfile.mkdtemp(prefix="exposr-rest-bench-")
    port, target_port = free_port(), free_port()
    log = open(os.path.join(tmp, "exposrd.log"), "wb")
    argv = [py, "-c", "from exposr.script import main; main()",
            "--allow-registration", "--ingress-http-url", f"http://localhost:{port}",
            "--api-port", str(port), "--ingress-http-port", str(port),
            "--listen-address", "127.0.0.1", "--log-level", args.log_level,
            "--storage-url", args.storage]
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={k: v for k, v in os.environ.items() if not k.startswith("EXPOSR_")})
    holder = Holder()
    spy = None
    try:
        wait_port(port, server)
        client = Client(port)
        status, data = client.call("POST", "/v1/account", {})
        account = json.loads(expect(status, data, 201))["account_id"]
        status, data = client.call("GET", f"/v1/account/{account}/token")
        client.auth = "Bearer " + json.loads(expect(status, data, 201))["token"]
        anon = Client(port)
        prefix = f"bench{os.getpid() % 100000}-{n}-"
        ids = [f"{prefix}{i:06d}" for i in range(n)]
        patch = {"target": {"url": f"http://127.0.0.1:{target_port}"},
                 "ingress": {"http": {"enabled": True}}, "transport": {"ws": {"enabled": True}}}
        urls = {}

        def op_account(_):
            expect(*anon.call("POST", "/v1/account", {}), 201)

        def op_token(_):
            expect(*anon.call("GET", f"/v1/account/{account}/token"), 201)

        def op_put(tid):
            expect(*client.call("PUT", f"/v1/tunnel/{tid}", {}), 200)

        def op_patch(tid):
            expect(*client.call("PATCH", f"/v1/tunnel/{tid}", patch), 200)

        def op_get(tid):
            info = json.loads(expect(*client.call("GET", f"/v1/tunnel/{tid}"), 200))
            urls[tid] = info["transport"]["ws"]["url"]

        def op_connect(tid):
            sock, rest = ws_connect(urls.pop(tid))
            if args.no_hold:
                sock.close()
            else:
                holder.add(sock, rest)

        fns = {"account": op_account, "token": op_token, "put": op_put, "patch": op_patch,
               "get": op_get, "connect": op_connect}
        stats = {op: [] for op in OPS}
        errors = []
        setup_wall = 0.0
        block = max(1, n // BLOCKS)
        bench_cpu0 = sum(os.times()[:2])
        for b in range(BLOCKS):
            chunk = ids[b * block:(b + 1) * block] if b < BLOCKS - 1 else ids[b * block:]
            if args.profile and last and b == BLOCKS - 1:
                spy = subprocess.Popen([PY_SPY, "record", "-o", args.profile, "-p", str(server.pid), "-r", "200",
                                        "--nonblocking"] + (["-f", "raw"] if args.profile.endswith(".txt") else []),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for op in OPS:
                items = range(min(100, len(chunk))) if op == "account" else chunk
                c0, b0 = cpu_seconds(server.pid), sum(os.times()[:2])
                lat, wall, errs = run_parallel(args.parallel, items, fns[op])
                c1, b1 = cpu_seconds(server.pid), sum(os.times()[:2])
                errors.extend(f"{op} {e}" for e in errs)
                if op in SETUP_OPS:
                    setup_wall += wall
                calls = max(1, len(lat))
                stats[op].append({"calls": len(lat), "wall": wall, "lat": lat,
                                  "cpu_us": (c1 - c0) * 1e6 / calls, "bench_us": (b1 - b0) * 1e6 / calls})
        bench_cpu = sum(os.times()[:2]) - bench_cpu0
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        # the server's own work with every tunnel connected and no calls (pings,
        # cluster announcements, sweeps): over IDLE seconds
        spy = None
        if args.profile_idle and last:
            spy = subprocess.Popen([PY_SPY, "record", "-o", args.profile_idle, "-p", str(server.pid), "-r", "200",
                                    "-d", str(int(IDLE)), "--nonblocking"]
                                   + (["-f", "raw"] if args.profile_idle.endswith(".txt") else []),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        c0 = cpu_seconds(server.pid)
        time.sleep(IDLE)
        idle = (cpu_seconds(server.pid) - c0) / IDLE
        if spy is not None:
            spy.wait(60)
        rss = rss_mb(server.pid)
        held = holder.held
        return {"stats": stats, "setup_wall": setup_wall, "rss": rss, "idle": idle, "held": held, "closed": holder.closed,
                "errors": errors, "bench_cpu": bench_cpu, "log": log.name}
    finally:
        holder.stop()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True) if not args.keep_logs else None


def report(n, r, args):
    """The table: the first and the last block per operation; "net" is the CPU per call
    without the background (the idle CPU rate times the share of tunnels connected before
    the block, spread over the block's calls of that operation)."""
    print(f"\n== {n} tunnels, {args.parallel} in parallel, storage {args.storage}")
    print(f"{'':9}{'first 10%':>38}  {'last 10%':>38}   {'CPU growth':>12}")
    print(f"{'':9}" + f"{'calls/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'CPU us':>8}{'bench':>7}  " * 2
          + f"{'raw':>6}{'net':>7}")
    idle_us = r["idle"] * 1e6
    for op in OPS:
        cols, net = [], []
        for b, s in ((0, r["stats"][op][0]), (BLOCKS - 1, r["stats"][op][-1])):
            lat = [x * 1000 for x in s["lat"]]
            cols.append(f"{s['calls'] / s['wall']:>9.0f}{statistics.median(lat) if lat else float('nan'):>8.1f}"
                        f"{percentile(lat, 99):>8.1f}{s['cpu_us']:>8.0f}{s['bench_us']:>7.0f}")
            net.append(s["cpu_us"] - idle_us * (b / BLOCKS) * s["wall"] / max(1, s["calls"]))
        first, last = r["stats"][op][0]["cpu_us"], r["stats"][op][-1]["cpu_us"]
        print(f"{op:<9}" + "  ".join(cols) + f"   {last / first if first else float('nan'):>5.2f}x"
              f"{net[1] / net[0] if net[0] > 0 else float('nan'):>6.2f}x")
    all_lat = [x for op in SETUP_OPS for s in r["stats"][op] for x in s["lat"]]
    print(f"setup of {n} tunnels (PUT+PATCH+GET+connect): {r['setup_wall']:.1f} s wall, "
          f"{n / r['setup_wall']:.0f} tunnels/s, median call {statistics.median(all_lat) * 1000:.1f} ms, "
          f"p99 {percentile(all_lat, 99) * 1000:.1f} ms")
    print(f"exposrd with {r['held']} WebSockets held: RSS {r['rss']:.0f} MB, idle CPU {r['idle'] * 1000:.0f} ms/s; "
          f"bench CPU {r['bench_cpu']:.1f} s (threads), WebSockets closed by the server: {r['closed']}")
    if r["errors"]:
        print(f"{len(r['errors'])} errors, e.g.: " + "; ".join(r["errors"][:3]))
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tunnels", default="1000,4000")
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--storage", default="memory://",
                    help="exposrd --storage-url (default memory://); e.g. sqlite:///tmp/bench.sqlite "
                         "(use a fresh file), postgres://user:pw@127.0.0.1/db, redis://127.0.0.1:6379/0")
    ap.add_argument("--log-level", default="info", help="exposrd --log-level (default info)")
    ap.add_argument("--profile", help="py-spy record of exposrd over the last block of the last N "
                    "(flame graph; raw collapsed stacks when the name ends in .txt)")
    ap.add_argument("--profile-idle", help="py-spy record of exposrd while idle with every tunnel of the last N "
                    "connected")
    ap.add_argument("--no-hold", action="store_true",
                    help="close each WebSocket right after its upgrade (no background work of held "
                         "connections: the per-call costs alone)")
    ap.add_argument("--keep-logs", action="store_true")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * max(int(n) for n in args.tunnels.split(",")) + 1000
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, need), hard))
    counts = [int(n) for n in args.tunnels.split(",")]
    for i, n in enumerate(counts):
        r = run_one(args, n, i == len(counts) - 1)
        report(n, r, args)


if __name__ == "__main__":
    main()
