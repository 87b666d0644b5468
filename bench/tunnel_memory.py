"""Memory per tunnel of exposrd (by hand, not in CI): RSS with N tunnels x 1 and x 2 connections.

Starts ``exposrd`` as a subprocess (memory storage, ``--allow-registration``),
creates N tunnels through the REST API and connects each with WebSockets the
way the exposr client does (ws-multiplex over a binary WebSocket; a fresh
``GET /v1/tunnel/<id>`` before each connection, since a token is good for one
connection). The WebSocket clients are light raw connections driven by
``--workers`` separate processes (asyncio; each from its own source address
127.0.0.<2+k>), so no client memory is counted and the ephemeral ports of one
address are not the limit.

Figures (exposrd's VmRSS from /proc/PID/status), for each N of ``--tunnels``
with a fresh exposrd:

* idle: after start, and after a warm-up tunnel has been connected twice and
  one request went through it (so lazily imported code and first-use caches
  are not counted as per-tunnel bytes; the per-tunnel figures are over this);
* N tunnels created (no connection), then x 1 connection, then x 2: RSS and
  (RSS - idle) / N in KiB per tunnel;
* where the bytes go: gc-tracked objects per tunnel by type (count and
  ``sys.getsizeof`` bytes) between idle and x 2, dumped by exposrd itself on
  SIGUSR1; with ``--tracemalloc``, also the top allocation sites (file:line)
  per tunnel (exposrd then runs with tracemalloc on: slower, and its RSS
  figures include tracemalloc's own bookkeeping);
* a request through ``--check`` (20) sampled tunnels, answered by the
  holding worker as a tiny target (200 "ok"): the tunnels do work.

exposrd needs 2N + a few descriptors: N is capped to what RLIMIT_NOFILE's
hard limit allows (printed; the x 2 RSS at the asked N is then extrapolated).

    .venv/bin/python bench/tunnel_memory.py [--tunnels 1000,10000] [--workers 4]
        [--parallel 8] [--per-account 500] [--check 20] [--tracemalloc]
"""

import argparse
import asyncio
import base64
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time

from benchlib import fds, free_port, rss_kib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

# exposrd, with a SIGUSR1 handler that dumps gc object counts per type (and a
# tracemalloc snapshot when tracing) to <argv[1]>.<n>.json / .tm
SERVER = r"""
import collections, gc, json, os, signal, sys, tracemalloc
_dump_base = sys.argv.pop(1)
_dumps = [0]
def _dump(signum, frame):
    _dumps[0] += 1
    base = "%s.%d" % (_dump_base, _dumps[0])
    gc.collect()
    counts = collections.Counter()
    sizes = collections.Counter()
    for o in gc.get_objects():
        t = type(o)
        key = "%s.%s" % (t.__module__, t.__qualname__)
        counts[key] += 1
        sizes[key] += sys.getsizeof(o)
    if tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(base + ".tm")
    with open(base + ".tmp", "w") as f:
        json.dump({k: [counts[k], sizes[k]] for k in counts}, f)
    os.rename(base + ".tmp", base + ".json")
signal.signal(signal.SIGUSR1, _dump)
from exposr.script import main
main()
"""


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- a worker process: REST calls and light WebSocket clients -------------------------


class Rest:
    """One keep-alive HTTP/1.1 connection to the API."""

    def __init__(self, port, src, token=None):
        self.port, self.src, self.token = port, src, token
        self.reader = self.writer = None

    async def call(self, method, path, body=None, token=None):
        if self.writer is None:
            sock = await connect_from(self.src, self.port)
            self.reader, self.writer = await asyncio.open_connection(sock=sock)
        data = b"" if body is None else json.dumps(body).encode()
        head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}", f"Content-Length: {len(data)}"]
        if body is not None:
            head.append("Content-Type: application/json")
        if token or self.token:
            head.append(f"Authorization: Bearer {token or self.token}")
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        status_line = await self.reader.readline()
        length, close = 0, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        payload = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        status = int(status_line.split()[1])
        return status, (json.loads(payload) if payload else None)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def connect_from(src, port):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((src, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


def _pack(version, mtype, dst, src, length):
    return version.to_bytes(2, "big") + mtype.to_bytes(2, "big") + dst.to_bytes(4, "big") + \
        src.to_bytes(4, "big") + length.to_bytes(4, "big")


class WS(asyncio.Protocol):
    """A tunnel WebSocket as the exposr client holds it (ws-multiplex acceptor),
    answering every request of every channel with RESPONSE."""

    def __init__(self, path, port, opened, lost):
        self.path, self.port, self.opened, self.lost = path, port, opened, lost
        self.buf = bytearray()
        self.up = False
        self.channels = {}

    def connection_made(self, transport):
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write((f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                              "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                              f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())

    def connection_lost(self, exc):
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed before the handshake"))
        self.lost(self)

    def send(self, opcode, payload):
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
        self.transport.write(head + b"\0\0\0\0" + payload)  # the zero mask leaves the payload as it is

    def data_received(self, data):
        buf = self.buf
        buf += data
        if not self.up:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[9:12])
            del buf[:end + 4]
            if status != b"101":
                self.opened.set_exception(ConnectionError(f"handshake answered {status.decode()}"))
                self.transport.close()
                return
            self.up = True
            self.opened.set_result(self)
        while len(buf) >= 2:
            opcode, n, at = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, at = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, at = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < at + n:
                return
            payload = bytes(buf[at:at + n])
            del buf[:at + n]
            if opcode == 2:
                self.message(payload)
            elif opcode == 9:
                self.send(0xA, payload)
            elif opcode == 8:
                self.send(0x8, payload[:2])
                self.transport.close()
                return

    def message(self, m):
        if len(m) < 16:
            return
        mtype = int.from_bytes(m[2:4], "big")
        dst, src = int.from_bytes(m[4:8], "big"), int.from_bytes(m[8:12], "big")
        if mtype == 2:  # OPEN: accept with the same number (lock-step)
            self.channels[src] = b""
            self.send(2, _pack(2, 3, src, src, 0))
        elif mtype == 1 and dst in self.channels:  # DATA
            got = self.channels[dst] + m[16:]
            self.channels[dst] = got
            if b"\r\n\r\n" in got:
                self.send(2, _pack(2, 1, dst, dst, len(RESPONSE)) + RESPONSE)
                self.send(2, _pack(2, 4, dst, dst, 0))
                self.channels[dst] = b""
        elif mtype == 4:  # CLOSE
            if src:
                self.send(2, _pack(2, 3, src, dst, 0))
            self.channels.pop(dst, None)
        elif mtype == 3:  # ACK of our CLOSE
            self.channels.pop(dst, None)


async def worker_main(port, src):
    raise_nofile()
    loop = asyncio.get_running_loop()
    held = set()
    dropped = [0]

    def lost(ws):
        if ws in held:
            held.discard(ws)
            dropped[0] += 1

    reader = asyncio.StreamReader(limit=1 << 26)  # a command lists thousands of tunnels
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async def run_all(jobs, parallel, fn):
        jobs = list(jobs)
        failures = []

        async def lane():
            rest = Rest(port, src)
            try:
                while jobs:
                    job = jobs.pop()
                    try:
                        await fn(rest, *job)
                    except Exception as e:
                        failures.append(f"{job[0]}: {e}")
                        rest.close()
            finally:
                rest.close()

        await asyncio.gather(*[lane() for _ in range(parallel)])
        return failures

    async def create(rest, tunnel_id, token, target):
        status, body = await rest.call("PUT", f"/v1/tunnel/{tunnel_id}", {
            "target": {"url": target}, "ingress": {"http": {"enabled": True}},
            "transport": {"ws": {"enabled": True}}}, token=token)
        if status != 200:
            raise RuntimeError(f"PUT answered {status} {body}")

    async def connect(rest, tunnel_id, token):
        status, body = await rest.call("GET", f"/v1/tunnel/{tunnel_id}", token=token)
        if status != 200:
            raise RuntimeError(f"GET answered {status} {body}")
        url = body["transport"]["ws"]["url"]
        path = url[url.index("/v1/"):]
        opened = loop.create_future()
        sock = await connect_from(src, port)
        await loop.create_connection(lambda: WS(path, port, opened, lost), sock=sock)
        ws = await asyncio.wait_for(opened, 30)
        held.add(ws)

    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        t0 = time.monotonic()
        if cmd["cmd"] == "create":
            failures = await run_all(cmd["tunnels"], cmd["parallel"],
                                     lambda rest, tid, tok: create(rest, tid, tok, cmd["target"]))
        elif cmd["cmd"] == "connect":
            failures = await run_all(cmd["tunnels"], cmd["parallel"], connect)
            await asyncio.sleep(0.5)  # the server registers a connection after the handshake
        elif cmd["cmd"] == "exit":
            for ws in list(held):
                ws.transport.close()
            answer({"ok": True})
            break
        else:
            failures = [f"unknown command {cmd['cmd']}"]
        answer({"failures": failures[:5], "failed": len(failures), "seconds": time.monotonic() - t0,
                "held": len(held), "dropped": dropped[0]})


# -- the driver ----------------------------------------------------------------------


class Worker:
    def __init__(self, index, port, env):
        self.src = f"127.0.0.{2 + index}"
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(port), self.src],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env=env, text=True)

    def send(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def result(self):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.src} died")
        return json.loads(line)


def on_all(workers, cmds):
    """Send each worker its command, then gather the answers."""
    for w, cmd in zip(workers, cmds):
        w.send(**cmd)
    results = [w.result() for w in workers]
    failed = sum(r["failed"] for r in results)
    if failed:
        print(f"  ! {failed} failed, e.g. {[f for r in results for f in r['failures']][:3]}", flush=True)
    return results


def http_get(port, host):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        got = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            got += data
            if got.endswith(b"\r\n\r\nok"):
                break
    return got


def api(port, method, path, body=None, token=None):
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    c.request(method, path, json.dumps(body) if body is not None else None, headers)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, (json.loads(data) if data else None)


def one_run(n_asked, args, tmp, hard):
    port = free_port()
    dump = os.path.join(tmp, f"dump-{n_asked}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPOSR_")}
    server_env = dict(env, PYTHONPATH=args.code)
    if args.tracemalloc:
        server_env["PYTHONTRACEMALLOC"] = str(args.frames)
    log = open(os.path.join(tmp, f"exposrd-{n_asked}.log"), "wb")
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, dump, "--allow-registration", "--storage-url", "memory://",
         "--ingress-http-url", f"http://localhost:{port}", "--api-port", str(port),
         "--ingress-http-port", str(port), "--listen-address", "127.0.0.1", "--log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT, cwd=args.code, env=server_env, preexec_fn=raise_nofile)
    workers = []
    dumps = [0]

    def stats():
        dumps[0] += 1
        server.send_signal(signal.SIGUSR1)
        path = f"{dump}.{dumps[0]}.json"
        for _ in range(1200):
            if os.path.exists(path):
                with open(path) as f:
                    return json.load(f), (f"{dump}.{dumps[0]}.tm" if args.tracemalloc else None)
            time.sleep(0.05)
        raise SystemExit("exposrd did not dump its statistics")

    def settle():
        time.sleep(args.settle)
        return rss_kib(server.pid)

    try:
        for _ in range(400):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise SystemExit("exposrd does not listen")
        rss_start = settle()
        workers = [Worker(k, port, env) for k in range(args.workers)]
        # accounts: one per --per-account tunnels, plus one for the warm-up tunnel
        n = n_asked
        n_accounts = -(-n // args.per_account) + 1
        tokens = []
        for _ in range(n_accounts):
            status, body = api(port, "POST", "/v1/account")
            assert status == 201, (status, body)
            tokens.append(base64.b64encode(body["account_id"].encode()).decode())
        # warm-up: one tunnel, two connections, one request
        warm = [["warmup0", tokens[-1]]]
        target = "http://127.0.0.1:9"
        on_all(workers[:1], [dict(cmd="create", tunnels=warm, parallel=1, target=target)])
        on_all(workers[:1], [dict(cmd="connect", tunnels=warm, parallel=1)])
        on_all(workers[:1], [dict(cmd="connect", tunnels=warm, parallel=1)])
        got = http_get(port, f"warmup0.localhost:{port}")
        if not got.startswith(b"HTTP/1.1 200") or not got.endswith(b"ok"):
            raise SystemExit(f"the warm-up request through the tunnel failed: {got[:200]!r}")
        rss_idle = settle()
        fds_idle = fds(server.pid)
        idle_stats, idle_tm = stats()
        # descriptors: 2 per tunnel, the idle ones, the workers' REST connections, a margin
        room = hard - fds_idle - args.workers * args.parallel - 16
        if 2 * n > room:
            n = room // 2
            print(f"  N capped to {n}: exposrd needs 2 descriptors per tunnel and RLIMIT_NOFILE's hard "
                  f"limit is {hard} (it has {fds_idle} open when idle)", flush=True)
        ids = [[f"mem{i}", tokens[i // args.per_account]] for i in range(n)]
        shares = [ids[k::args.workers] for k in range(args.workers)]
        print(f"exposrd started                        RSS {rss_start / 1024:8.1f} MiB", flush=True)
        print(f"idle (after warm-up)                   RSS {rss_idle / 1024:8.1f} MiB", flush=True)
        rows = {}

        def row(label, key):
            rss = settle()
            per = (rss - rss_idle) / n
            rows[key] = (rss, per)
            print(f"{label:<38} RSS {rss / 1024:8.1f} MiB   {per:6.1f} KiB per tunnel over idle   "
                  f"descriptors {fds(server.pid)}", flush=True)

        t0 = time.monotonic()
        on_all(workers, [dict(cmd="create", tunnels=s, parallel=args.parallel, target=target) for s in shares])
        t_create = time.monotonic() - t0
        row(f"{n} tunnels created ({t_create:.0f} s)", "created")
        t0 = time.monotonic()
        res = on_all(workers, [dict(cmd="connect", tunnels=s, parallel=args.parallel) for s in shares])
        row(f"{n} x 1 connection ({time.monotonic() - t0:.0f} s)", "x1")
        t0 = time.monotonic()
        res = on_all(workers, [dict(cmd="connect", tunnels=s, parallel=args.parallel) for s in shares])
        row(f"{n} x 2 connections ({time.monotonic() - t0:.0f} s)", "x2")
        held = sum(r["held"] for r in res) - 2  # less the warm-up tunnel's
        dropped = sum(r["dropped"] for r in res)
        print(f"{'':38} {held} WebSockets held by the workers ({dropped} dropped)", flush=True)
        if n < n_asked:
            rss, per = rows["x2"]
            print(f"{'':38} extrapolated to {n_asked} x 2: RSS {(rss_idle + per * n_asked) / 1024:8.1f} MiB",
                  flush=True)
        # the tunnels work
        sample = [ids[i * n // args.check][0] for i in range(min(args.check, n))]
        ok = 0
        for tid in sample:
            got = http_get(port, f"{tid}.localhost:{port}")
            ok += got.startswith(b"HTTP/1.1 200") and got.endswith(b"\r\n\r\nok")
        print(f"{'':38} {ok} of {len(sample)} sampled tunnels answered 200 through exposrd", flush=True)
        final_stats, final_tm = stats()
        breakdown(idle_stats, final_stats, idle_tm, final_tm, n, args.top, args.frames)
        return rows, rss_start, rss_idle, n, ok == len(sample) and held == 2 * n
    finally:
        for w in workers:
            try:
                w.send(cmd="exit")
                w.proc.wait(10)
            except Exception:
                w.proc.kill()
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()


def breakdown(before, after, tm_before, tm_after, n, top, frames=1):
    diff = []
    for key in set(before) | set(after):
        c0, s0 = before.get(key, [0, 0])
        c1, s1 = after.get(key, [0, 0])
        if c1 - c0 or s1 - s0:
            diff.append((s1 - s0, c1 - c0, key))
    diff.sort(reverse=True)
    total = sum(d[0] for d in diff)
    print(f"  gc-tracked objects, idle -> x 2, per tunnel: {sum(d[1] for d in diff) / n:.1f} objects, "
          f"{total / n / 1024:.2f} KiB (sys.getsizeof, containers only)")
    for size, count, key in diff[:top]:
        print(f"    {size / n:8.0f} B  {count / n:6.2f}  {key}")
    if tm_before and tm_after:
        import tracemalloc

        s0 = tracemalloc.Snapshot.load(tm_before)
        s1 = tracemalloc.Snapshot.load(tm_after)
        stats = s1.compare_to(s0, "lineno" if frames == 1 else "traceback")
        total = sum(s.size_diff for s in stats)
        print(f"  tracemalloc, idle -> x 2, per tunnel: {total / n / 1024:.2f} KiB; top sites:")

        def where(frame):
            name = frame.filename
            for marker in ("/site-packages/", ROOT + "/", "/lib/python3."):
                if marker in name:
                    name = name.split(marker, 1)[1]
            return f"{name}:{frame.lineno}"

        for s in stats[:top]:
            print(f"    {s.size_diff / n:8.0f} B  {s.count_diff / n:6.2f}  {where(s.traceback[-1])}")
            for frame in list(s.traceback)[-2::-1]:
                print(f"    {'':24}{where(frame)}")
    print(flush=True)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        asyncio.run(worker_main(int(sys.argv[2]), sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tunnels", default="1000,10000", help="tunnel counts, one fresh exposrd each")
    ap.add_argument("--workers", type=int, default=4, help="client processes (default 4)")
    ap.add_argument("--parallel", type=int, default=8, help="REST calls / connections at a time per worker")
    ap.add_argument("--per-account", type=int, default=500, help="tunnels per account (default 500)")
    ap.add_argument("--check", type=int, default=20, help="tunnels a request is sent through (default 20)")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds before each RSS reading")
    ap.add_argument("--top", type=int, default=15, help="lines of each breakdown")
    ap.add_argument("--tracemalloc", action="store_true", help="also tracemalloc's top sites (slower)")
    ap.add_argument("--frames", type=int, default=1,
                    help="with --tracemalloc: frames kept per allocation; above 1, the top tracebacks are shown")
    ap.add_argument("--code", default=ROOT, help="the tree whose exposr package exposrd runs (default: this one), "
                    "e.g. an exported older commit for a before/after comparison")
    args = ap.parse_args()
    args.code = os.path.abspath(args.code)
    hard = raise_nofile()
    tmp = tempfile.mkdtemp(prefix="exposr-mem-")
    print(f"exposrd {args.code}; RLIMIT_NOFILE {hard}; logs in {tmp}\n", flush=True)
    summary = []
    ok = True
    for n_asked in [int(x) for x in args.tunnels.split(",")]:
        print(f"== {n_asked} tunnels", flush=True)
        rows, rss_start, rss_idle, n, fine = one_run(n_asked, args, tmp, hard)
        ok = ok and fine
        summary.append((n_asked, n, rss_start, rss_idle, rows))
    print("summary: N, KiB per tunnel over idle (created / x 1 / x 2), RSS x 2, idle")
    for n_asked, n, rss_start, rss_idle, rows in summary:
        x2 = rows["x2"][0]
        note = "" if n == n_asked else f" (N capped from {n_asked}; x 2 at {n_asked} extrapolated: " \
            f"{(rss_idle + rows['x2'][1] * n_asked) / 1024:.0f} MiB)"
        print(f"  {n:6d}  {rows['created'][1]:6.1f} / {rows['x1'][1]:6.1f} / {rows['x2'][1]:6.1f} KiB   "
              f"{x2 / 1024:7.1f} MiB   idle {rss_idle / 1024:.1f} MiB{note}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
