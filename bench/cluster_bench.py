"""HTTP entering at the tunnel's owner node vs at another node of the cluster (by hand, not in CI).

Starts two ``exposrd`` nodes on 127.0.0.1 (A) and 127.0.0.2 (B) with the same
ports, Redis storage (127.0.0.1:6379, db 0 by default; only this run's
records are written and they are deleted at the end) and a Redis pub/sub bus
on a channel of this run (``--bus redis``, the default) or the UDP bus
(``--bus udp``: multicast discovery on loopback, TTL 0, a group of
239.0.0.0/8 and a UDP port chosen per run, each node's group interface its
own 127.0.0.N), the raw 100-byte target of `http_bench`, and one
``exposr`` client holding the tunnel on A. Then ``wrk --latency`` at
``--connections`` (default 10) entering at A (served locally) and at B
(forwarded to A over a peer connection), first with keep-alive, then with a
new connection per request (``Connection: close``), and prints req/s and
p50/p99 with the ratio non-owner/owner. The aim: non-owner >= 0.5 x owner req/s.

    .venv/bin/python bench/cluster_bench.py [--duration 10] [--connections 10] [--redis-db 0]
        [--bus redis|udp] [--log-level info]

Needs ``wrk`` on the PATH (``apt-get install -y wrk``) and Redis on 127.0.0.1:6379.
"""

import argparse
import base64
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]

import http_bench  # noqa: E402  (the raw target, wrk driver and helpers)
from http_bench import cpu_seconds, start_logged, wait_file, wait_port, wrk  # noqa: E402

A, B = "127.0.0.1", "127.0.0.2"
DOMAIN = "example.test"
ADMIN_KEY = "cluster-bench-admin-key"


def bindable(port, addresses):
    held = []
    try:
        for address in addresses:
            s = socket.socket()
            held.append(s)
            s.bind((address, port))
        return True
    except OSError:
        return False
    finally:
        for s in held:
            s.close()


def same_free_ports(count, addresses):
    """``count`` port numbers free on every one of ``addresses`` (the cluster needs identical ports)."""
    ports = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
        if port not in ports and bindable(port, addresses):
            ports.append(port)
    return ports


def free_udp_port():
    """A UDP port free on 0.0.0.0 right now (the UDP bus binds the wildcard)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def bus_argv(bus, redis_db, token):
    """The options selecting the cluster bus, the same on every node."""
    if bus == "redis":
        return ["--cluster", "redis", "--cluster-redis-url", f"redis://127.0.0.1:6379/{redis_db}",
                "--cluster-redis-channel", f"exposr-bench-{token}"]
    group = "239.%d.%d.%d" % (random.randrange(1, 255), random.randrange(256), random.randrange(1, 255))
    return ["--cluster", "udp", "--cluster-udp-port", str(free_udp_port()),
            "--cluster-udp-discovery", "multicast", "--cluster-udp-discovery-multicast-group", group,
            "--cluster-udp-discovery-multicast-ttl", "0"]


def http_json(url, method="GET", body=None, headers=None):
    req = urllib.request.Request(url, method=method, data=body, headers=headers or {})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status, json.loads(resp.read() or b"null")


def wait_until(check, what, timeout=30):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what} (last error: {last})")


def get_status(ip, port, host):
    req = urllib.request.Request(f"http://{ip}:{port}/", headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def redis_cli(db, *args):
    return subprocess.run(["redis-cli", "-n", str(db), *args], capture_output=True, text=True).stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--redis-db", type=int, default=0)
    ap.add_argument("--bus", choices=("redis", "udp"), default="redis",
                    help="cluster bus: Redis pub/sub, or UDP with multicast discovery on loopback")
    ap.add_argument("--log-level", default="info", help="exposrd --log-level (default info)")
    args = ap.parse_args()
    for tool in ("wrk", "redis-cli"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed (apt-get install -y {tool})")
    py = sys.executable
    tmp = tempfile.mkdtemp(prefix="exposr-cluster-bench-")
    token = uuid.uuid4().hex[:8]
    tunnel = f"bench-{token}"
    procs = []
    account = None
    admin_auth = {"Authorization": "Bearer " + base64.b64encode(ADMIN_KEY.encode()).decode()}

    def start(argv, name):
        return start_logged(procs, tmp, argv, name, ROOT)

    try:
        tport = http_bench.free_port()
        start([py, http_bench.__file__, "--target", str(tport), "raw"], "target")
        wait_port(tport)
        port, admin = same_free_ports(2, [A, B])
        nodes = {}
        bus = bus_argv(args.bus, args.redis_db, token)
        for name, ip in (("A", A), ("B", B)):
            nodes[name] = start([
                py, "-c", "from exposr.script import main; main()",
                *bus, "--cluster-key", "bench-key",
                "--cluster-node-ip", ip, "--listen-address", ip, "--cluster-discovery-wait", "0",
                "--storage-url", f"redis://127.0.0.1:6379/{args.redis_db}",
                "--api-port", str(port), "--ingress-http-port", str(port),
                "--ingress-http-url", f"http://{DOMAIN}:{port}", "--allow-registration",
                "--admin-enable", "--admin-api-enable", "--admin-api-key", ADMIN_KEY,
                "--admin-port", str(admin), "--admin-api-port", str(admin),
                "--log-level", args.log_level], "exposrd-" + name)
        for name, (_, log) in nodes.items():
            wait_file(log, rb"exposrd ready")
        for ip in (A, B):
            wait_until(lambda ip=ip: len(http_json(f"http://{ip}:{admin}/v1/admin/cluster",
                                                   headers=admin_auth)[1]["nodes"]) == 2,
                       f"node {ip} to list both nodes")
        _, acct = http_json(f"http://{A}:{port}/v1/account", "POST", b"{}", {"Content-Type": "application/json"})
        account = acct["account_id"]
        client, client_log = start([py, "-c", "from exposr.client.cli import main; main()",
                                    "-s", f"http://{A}:{port}/", "-a", account, "tunnel", "connect", tunnel,
                                    f"http://127.0.0.1:{tport}"], "exposr")
        wait_file(client_log, rb"Ingress HTTP")
        host = f"{tunnel}.{DOMAIN}:{port}"
        for ip in (A, B):
            wait_until(lambda ip=ip: get_status(ip, port, host) == 200, f"200 through {ip}")
        owner_url, peer_url = f"http://{A}:{port}/", f"http://{B}:{port}/"
        wrk(owner_url, args.connections, 1, host)  # warm up both paths
        wrk(peer_url, args.connections, 1, host)

        rows = []
        for label, headers in (("keep-alive", ()), ("conn/request", ("Connection: close",))):
            pids = [nodes["A"][0].pid, nodes["B"][0].pid]
            res = {}
            for which, url in (("owner", owner_url), ("peer", peer_url)):
                cpu0 = [cpu_seconds(p) for p in pids]
                res[which] = wrk(url, args.connections, args.duration, host, headers=headers)
                cpu1 = [cpu_seconds(p) for p in pids]
                n = max(1, res[which]["requests"])
                res[which]["cpu_us"] = [sum(cpu1[i]) * 1e6 / n - sum(cpu0[i]) * 1e6 / n for i in range(2)]
            rows.append((label, res["owner"], res["peer"]))

        c = args.connections
        print(f"{c} connections, {args.duration} s each, {args.bus} bus; entering at the owner A vs the non-owner B")
        print(f"{'':22}{'owner A':>14}{'non-owner B':>14}{'B/A':>8}")
        for label, o, p in rows:
            print(f"{label:<14}req/s  {o['rps']:>14.0f}{p['rps']:>14.0f}{p['rps'] / o['rps']:>8.2f}")
            print(f"{'':14}p50 ms {o['p50']:>14.2f}{p['p50']:>14.2f}{p['p50'] / o['p50']:>8.2f}")
            print(f"{'':14}p99 ms {o['p99']:>14.2f}{p['p99']:>14.2f}{p['p99'] / o['p99']:>8.2f}")
            print(f"{'':14}CPU us/req A+B {sum(o['cpu_us']):>7.0f}{sum(p['cpu_us']):>14.0f}"
                  f"   (B: {p['cpu_us'][1]:.0f}, A: {p['cpu_us'][0]:.0f} when entering at B)")
            if o["non2xx"] or p["non2xx"]:
                print(f"{'':14}non-2xx{o['non2xx']:>14}{p['non2xx']:>14}")
        verdict = min(p["rps"] / o["rps"] for _, o, p in rows)
        print(f"lowest non-owner/owner req/s ratio: {verdict:.2f} (aim >= 0.5); logs in {tmp}")
    finally:
        http_bench.stop_all(procs, 15)
        if account is not None:
            redis_cli(args.redis_db, "DEL", f"account:{account}", f"tunnel:{tunnel}")
            left = redis_cli(args.redis_db, "--scan", "--pattern", f"*{token}*").split()
            left += redis_cli(args.redis_db, "--scan", "--pattern", f"*{account}*").split()
            if left:
                print(f"Redis keys left behind: {left}")


if __name__ == "__main__":
    main()
