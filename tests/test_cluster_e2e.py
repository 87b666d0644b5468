"""
The cluster end to end: three (or four) real ``exposrd`` processes on
127.0.0.1-4 with the same ports, shared storage (Redis or PostgreSQL) and a
Redis pub/sub bus on a channel of their own (`tests.cluster_support`).
Tunnels are served by the real ``exposr`` client as a subprocess, connected
to node A; requests enter at the other nodes, which forward them to A (HTTP
to A's ingress port, SNI as the raw TLS bytes to A's SNI port).

Every wait is bounded; nothing sleeps a fixed time.
"""

import datetime
import hashlib
import json
import os
import shutil
import signal

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests import cluster_support as cs
from tests import e2e_support as e2e
from tests import procs
from tests.cluster_support import Cluster, poll_until
from tests.e2e_support import within
from tests.test_certificate import cert_pem, make_cert, write_pair

CURL = shutil.which("curl") or "/usr/bin/curl"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def epoch(iso):
    """Seconds since the epoch of an ISO 8601 UTC time such as 2024-02-10T12:34:56.789Z."""
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class _Base(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.addCleanup(e2e.autobahn_settled)
        self.target = yield e2e.HTTPTarget().start()
        self.addCleanup(self.target.stop)

    @defer.inlineCallbacks
    def cluster(self, **kw):
        cluster = Cluster(self, **kw)
        yield cluster.start()
        return cluster

    @defer.inlineCallbacks
    def tunnel_on(self, cluster, node, name, target_url=None, *settings, account=None):
        """A tunnel whose `exposr` client is connected to ``node``; (tunnel id, account, client)."""
        if account is None:
            account, _ = yield cluster.create_account(node)
        tunnel_id = cluster.tunnel_id(name)
        client = cluster.client(node, account, tunnel_id, target_url or self.target.url, *settings)
        try:
            yield client.connected()
        except Exception:
            raise AssertionError(f"client of {tunnel_id} did not connect through node {node.name}:\n{client.output}")
        return tunnel_id, account, client

    @defer.inlineCallbacks
    def reachable(self, node, tunnel_id, seconds=15):
        """Until a GET through ``node`` answers 200 from the target (the announcement arrived)."""
        yield poll_until(lambda: node.request(tunnel_id, path=b"/ready"),
                         lambda r: r[0].status == 200, seconds,
                         what=f"200 for {tunnel_id} through node {node.name}")

    @defer.inlineCallbacks
    def assertGetExact(self, node, tunnel_id, size=100_000):
        head, body = yield node.request(tunnel_id, path=b"/bytes/%d" % size)
        self.assertEqual(head.status, 200, (node, body[:300]))
        self.assertEqual(len(body), size)
        self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(e2e.expected_bytes(size)).digest())


class HTTPAndSNIThroughPeersTests(_Base):
    """Redis storage + Redis bus: a tunnel held by A, used through B and C."""

    @defer.inlineCallbacks
    def setUp(self):
        yield _Base.setUp(self)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.cert, key = make_cert(f"*.{cs.DOMAIN}", [f"*.{cs.DOMAIN}"])
        self.cafile = os.path.join(self.dir, "ca.pem")
        with open(self.cafile, "wb") as f:
            f.write(cert_pem(self.cert))
        self.c = yield self.cluster(sni=write_pair(self.dir, self.cert, key))
        self.a, self.b, self.c_ = self.c.nodes

    @defer.inlineCallbacks
    def test_http_and_sni_through_b_and_c(self):
        tunnel_id, account, _ = yield self.tunnel_on(self.c, self.a, "web", self.target.url, "ingress-sni", "on")
        for node in (self.b, self.c_):
            yield self.reachable(node, tunnel_id)

            # GET, byte exact
            yield self.assertGetExact(node, tunnel_id, 300_000)

            # 1 MiB POST echoed byte exact
            payload = os.urandom(1024 * 1024)
            head, body = yield node.request(tunnel_id, b"POST", b"/echo-body", body=payload)
            self.assertEqual(head.status, 200)
            self.assertEqual(body, payload)

            # several requests on one kept-alive connection
            conn = yield node.connect()
            for i in range(5):
                conn.request(e2e.request(b"GET", b"/keep/%d" % i, node.host(tunnel_id)))
                head, body, _ = yield conn.response()
                self.assertEqual(head.status, 200)
                self.assertEqual(json.loads(body)["path"], "/keep/%d" % i)
            self.assertFalse(conn.closed.called, "the kept-alive connection was closed")
            conn.transport.loseConnection()
            yield within(conn.closed)

            # what the target saw: the request entered at a peer (exposr-via) and
            # was forwarded once
            seen = json.loads((yield node.request(tunnel_id, path=b"/headers"))[1])
            names = [k for k, _ in seen["headers"]]
            self.assertEqual(names.count("exposr-via"), 1, seen["headers"])

        # SNI through B and C: curl (ALPN offered) and openssl s_client
        host = f"{tunnel_id}.{cs.DOMAIN}"
        for node in (self.b, self.c_):
            code, out, err = yield procs.run([
                CURL, "-sS", "--cacert", self.cafile, "--resolve", f"{host}:{self.c.sni_port}:{node.ip}",
                f"https://{host}:{self.c.sni_port}/bytes/200000"])
            self.assertEqual(code, 0, (node, err))
            self.assertEqual(out, e2e.expected_bytes(200000))
            request = f"GET /over-sni HTTP/1.0\r\nHost: {host}\r\n\r\n".encode()
            code, out, err = yield procs.run([
                OPENSSL, "s_client", "-connect", f"{node.ip}:{self.c.sni_port}", "-CAfile", self.cafile,
                "-verify_return_error", "-ign_eof", "-servername", host], stdin=request)
            self.assertIn(b"HTTP/1.0 200 OK", out, (node, err[-2000:]))
            self.assertIn(b'"path": "/over-sni"', out)
            self.assertIn(b"Verify return code: 0 (ok)", out)

    @defer.inlineCallbacks
    def test_websocket_upgrade_through_b_and_c(self):
        ws_target = yield e2e.WSTarget().start()
        self.addCleanup(ws_target.stop)
        tunnel_id, _, _ = yield self.tunnel_on(self.c, self.a, "ws", ws_target.url)
        for node in (self.b, self.c_):
            # a plain GET answers (the echo server refuses non-upgrades): the route is known
            yield poll_until(lambda: node.request(tunnel_id), lambda r: r[0].status != 503, 15,
                             what=f"route of {tunnel_id} through {node.name}")
            client = yield node.ws(tunnel_id, "/chat")
            yield within(client.opened)
            self.assertEqual((yield client.next_message()), b"ws echo connected")
            for payload in (b"hello through " + node.name.encode(), os.urandom(200_000)):
                client.sendMessage(payload, isBinary=True)
                self.assertEqual((yield client.next_message()), payload)
            client.sendClose()
            yield within(client.closed)


class PostgresStorageTests(_Base):
    @defer.inlineCallbacks
    def test_http_get_through_every_node(self):
        c = yield self.cluster(storage="postgres")
        tunnel_id, _, _ = yield self.tunnel_on(c, c[0], "pg")
        for node in c.nodes:
            yield self.reachable(node, tunnel_id)
            yield self.assertGetExact(node, tunnel_id)


class ClientGoneTests(_Base):
    @defer.inlineCallbacks
    def test_killed_client_gives_503_tunnel_not_connected_everywhere(self):
        c = yield self.cluster()
        a, b, cc = c.nodes
        tunnel_id, _, client = yield self.tunnel_on(c, a, "gone")
        for node in (b, cc):
            yield self.reachable(node, tunnel_id)
        yield client.kill()
        started = reactor.seconds()
        for node in (a, b, cc):
            head, body = yield poll_until(lambda: node.request(tunnel_id), lambda r: r[0].status == 503,
                                          25 - (reactor.seconds() - started),
                                          what=f"503 for {tunnel_id} through node {node.name}")
            self.assertEqual(json.loads(body), {"error": "TUNNEL_NOT_CONNECTED"})


class NodeCrashTests(_Base):
    @defer.inlineCallbacks
    def test_sigkill_of_the_owner_then_a_client_on_b_serves_through_b_and_c(self):
        self.statuses = {}
        c = yield self.cluster()
        a, b, cc = c.nodes
        tunnel_id, account, first = yield self.tunnel_on(c, a, "crash")
        for node in (b, cc):
            yield self.reachable(node, tunnel_id)
        yield a.kill()
        yield first.kill()
        killed_at = reactor.seconds()

        # A's connections are counted until they expire, so a new client on B is
        # refused (1008) until then: start it again each time it gives up
        attempts = []

        @defer.inlineCallbacks
        def connect_on_b():
            client = c.client(b, account, tunnel_id, self.target.url)
            attempts.append(client)
            # the client says "connected" once a WebSocket is open; the server may
            # still refuse it (1008) right after: it holds the tunnel once B
            # counts one of its connections as alive
            try:
                yield client.connected(15)
                yield poll_until(lambda: b.alive_connections(tunnel_id),
                                 lambda conns: any(x["node_id"] == b.node_id for x in conns) or not client.running,
                                 5, what="a connection of B")
                if client.running:
                    return True
            except Exception:
                pass
            yield client.stop()
            return False

        yield poll_until(connect_on_b, lambda ok: ok, 45, interval=0.5,
                         what=f"a client on B holding {tunnel_id} after A died "
                              f"(last output: {attempts[-1].output[-500:] if attempts else ''})")
        try:
            for node in (b, cc):
                # until every request succeeds (not one lucky round-robin pick)
                yield self.steady(node, tunnel_id, 10, 40)
        except AssertionError as e:
            views = {}
            for node in (b, cc):
                views[node.name] = (yield node.admin("GET", f"/v1/admin/tunnel/{tunnel_id}"))[1]
            raise AssertionError(f"{e}\nstatuses: {self.statuses}\nclient on B ({len(attempts)} attempts), last output:\n"
                                 f"{attempts[-1].output[-3000:]}\nadmin views: {views}\n"
                                 f"node B log tail:\n{b.proc.output.decode(errors='replace')[-4000:]}")
        if os.environ.get("E2E_SHOW_LOG"):
            print(f"\nafter the crash: {len(attempts)} client attempts on B, statuses {self.statuses}, "
                  f"steady after {reactor.seconds() - killed_at:.1f} s")
        self.assertLess(reactor.seconds() - killed_at, 90)
        yield self.assertNodeGone(c, a, (b, cc))

    @defer.inlineCallbacks
    def steady(self, node, tunnel_id, n, seconds):
        """Until ``n`` GETs in a row through ``node`` answer 200 with the exact body."""
        statuses = []
        expected = e2e.expected_bytes(10_000)

        @defer.inlineCallbacks
        def run():
            head, body = yield node.request(tunnel_id, path=b"/bytes/10000")
            ok = head.status == 200 and body == expected
            statuses.append(head.status if head.status != 200 or ok else "200 (wrong body)")
            return ok

        def accept(ok):
            return statuses[-n:] == [200] * n

        try:
            yield poll_until(run, accept, seconds, interval=0.05, what=f"{n} GETs in a row through {node.name}")
        finally:
            self.statuses[node.name] = statuses

    @defer.inlineCallbacks
    def assertNodeGone(self, c, dead, alive):
        """The dead node ends up stale (or forgotten) in the survivors' views."""
        for node in alive:
            yield poll_until(node.cluster_view,
                             lambda view: all(n["is_stale"] for n in view if n["node_id"] == dead.node_id),
                             45, interval=1, what=f"node {dead.name} stale in {node.name}'s view")


class WrongKeyTests(_Base):
    @defer.inlineCallbacks
    def test_node_with_a_wrong_cluster_key_is_ignored_and_serves_nothing_of_theirs(self):
        c = yield self.cluster()
        a, b, cc = c.nodes
        tunnel_id, _, _ = yield self.tunnel_on(c, a, "keyed")
        for node in (b, cc):
            yield self.reachable(node, tunnel_id)
        d = yield c.add_node(key="not-the-cluster-key")

        # D's messages are on the channel (signed with its own key) ...
        seen_at, _ = yield c.tap.wait_for(lambda m: (m.get("node") or {}).get("id") == d.node_id)
        # ... and every good node has processed them: each has since taken in a
        # heartbeat of every other good node sent after D's message (one Redis
        # connection per subscriber delivers in publish order)
        good = (a, b, cc)
        for node in good:
            yield poll_until(node.cluster_view, lambda view: self.all_refreshed_after(view, good, node, seen_at),
                             25, interval=0.5, what=f"fresh heartbeats in {node.name}'s view")
            view = yield node.cluster_view()
            self.assertNotIn(d.node_id, [n["node_id"] for n in view])
            self.assertEqual(sorted(n["node_id"] for n in view), sorted(n.node_id for n in good))
        # D knows only itself and does not serve the others' tunnels
        view = yield d.cluster_view()
        self.assertEqual([n["node_id"] for n in view], [d.node_id])
        head, body = yield d.request(tunnel_id)
        self.assertEqual(head.status, 503, body)
        self.assertEqual(json.loads(body), {"error": "TUNNEL_NOT_CONNECTED"})
        # and the good nodes still do
        yield self.assertGetExact(b, tunnel_id)

    @staticmethod
    def all_refreshed_after(view, good, me, seen_at):
        by_id = {n["node_id"]: n for n in view}
        for other in good:
            if other is me:
                continue
            entry = by_id.get(other.node_id)
            if entry is None or epoch(entry["alive_at"]) <= seen_at:
                return False
        return True


class MaxConnectionsTests(_Base):
    @defer.inlineCallbacks
    def test_limit_of_one_is_cluster_wide(self):
        c = yield self.cluster(max_connections=1)
        a, b, cc = c.nodes
        tunnel_id, account, first = yield self.tunnel_on(c, a, "limited")
        yield c.wait_alive(c.nodes, tunnel_id, 1)
        second = c.client(b, account, tunnel_id, self.target.url)
        code = yield within(second.proc.ended, 30)
        self.assertEqual(code, 1, second.output)
        self.assertIn("The server refused the tunnel connection (1008)", second.output)
        self.assertNotIn("Traceback", second.output)
        seen = yield c.wait_alive(c.nodes, tunnel_id, 1)
        self.assertEqual(seen, {"A": 1, "B": 1, "C": 1})
        self.assertTrue(first.running)
        for node in (b, cc):
            yield self.assertGetExact(node, tunnel_id)


class BusRestartTests(_Base):
    """A private redis-server as the bus of two nodes, killed and started again."""

    @defer.inlineCallbacks
    def start_redis(self, port):
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir, exist_ok=True)
        proto, transport = procs.spawn(
            ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
            executable=REDIS_SERVER)

        def stop():
            procs.stop(transport, signal.SIGKILL)
            return within(proto.ended, 15)

        self.addCleanup(stop)
        yield proto.wait_for(b"Ready to accept connections", 20)
        return proto, transport

    @defer.inlineCallbacks
    def test_announcements_resume_after_the_bus_redis_restarts(self):
        port = procs.free_port()
        proto, transport = yield self.start_redis(port)
        c = yield self.cluster(n=2, bus_url=f"redis://127.0.0.1:{port}")
        a, b = c.nodes
        before, account, _ = yield self.tunnel_on(c, a, "before")
        yield self.reachable(b, before)

        procs.stop(transport, signal.SIGKILL)
        yield within(proto.ended, 15)
        yield self.start_redis(port)
        c.tap = yield cs.redis_connect(cs.ChannelTap(c.channel), "127.0.0.1", port)
        yield within(c.tap.subscribed)

        # a tunnel connected on A after the restart becomes reachable through B
        after, _, _ = yield self.tunnel_on(c, a, "after", account=account)
        yield self.reachable(b, after, 30)
        yield self.assertGetExact(b, after)
        # the tunnel of before the restart is announced again too (periodic announcements)
        yield self.reachable(b, before, 30)
        yield c.wait_discovery(c.nodes)
        # storage (on the shared Redis) lost nothing
        for tunnel_id in (before, after):
            status, body = yield c[1].admin("GET", f"/v1/admin/tunnel/{tunnel_id}")
            self.assertEqual(status, 200, body)
            self.assertEqual(body["account_id"], account)
        keys = yield c.storage_keys()
        self.assertIn(f"tunnel:{before}", [k.decode() for k in keys])
        self.assertIn(f"account:{account}", [k.decode() for k in keys])


class HarnessTests(unittest.TestCase):
    """The harness itself: ports free on every address, RESP parsing."""

    def test_free_ports_bindable_everywhere(self):
        ports = cs.free_ports(3)
        self.assertEqual(len(set(ports)), 3)
        for port in ports:
            self.assertTrue(cs._bindable(port, cs.ADDRESSES))

    def test_free_ports_skip_a_port_taken_on_one_address(self):
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.3", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            self.assertFalse(cs._bindable(port, cs.ADDRESSES))
            self.assertNotIn(port, cs.free_ports(20))

    def test_resp_parse(self):
        data = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n:1\r\n"
        self.assertEqual(cs._parse(data), ([b"message", b"ch", b"hello"], b":1\r\n"))
        self.assertEqual(cs._parse(data[:20]), (None, data[:20]))
