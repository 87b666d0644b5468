"""Several real ``exposrd`` processes as one cluster, for the multi-node end-to-end tests.

`Cluster(test, n=3, ...)` starts ``n`` nodes on 127.0.0.1, 127.0.0.2, ... with
identical port numbers (the cluster forwards to a peer's ingress on this
node's own port number), one shared storage and a bus of this run only, then
waits until every node lists every other one in ``GET /v1/admin/cluster``.
The bus (``bus=``): ``"redis"`` (pub/sub on a channel of this run),
``"udp-multicast"`` (``--cluster udp`` with multicast discovery on a group of
239.0.0.0/8 and a UDP port chosen per run, TTL 0, each node's group interface
the loopback address it advertises: nothing leaves the host) or
``"udp-kubernetes"`` (``--cluster udp`` with Kubernetes discovery against a
``twisted.names`` server of the test answering the headless service with the
nodes' addresses, the namespace file a temporary file). Everything it starts is stopped when the test
ends (SIGTERM, SIGKILL after a bound) and every storage record it made is
removed: Redis storage by key (tunnel ids carry the run's token, accounts are
remembered), PostgreSQL storage by dropping the run's schema.

Isolation from concurrent runs on this machine: the bus channel (or UDP port
and multicast group) and the tunnel ids carry a random token; Redis storage uses db 0 (not one of the dbs
the storage tests flush; ``EXPOSR_TEST_CLUSTER_E2E_REDIS_DB`` overrides it)
and is never flushed.

Requests enter a chosen node through raw TCP to its address with
``Host: <tunnel>.example.test:<port>``; tunnels are served by the real
``exposr`` client as a subprocess.
"""

import base64
import errno
import json
import os
import re
import socket
import uuid

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from tests import e2e_support as e2e
from tests.e2e_support import within
from tests.test_cluster_udp import free_udp_port, random_group

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_DB = int(os.environ.get("EXPOSR_TEST_CLUSTER_E2E_REDIS_DB", "0"))
PG = dict(host="127.0.0.1", port=5432, user="postgres", dbname="test")
DOMAIN = "example.test"
ADMIN_KEY = "cluster-e2e-admin-key"
CLUSTER_KEY = "cluster-e2e-signing-key"
# the admin API reads the bearer credential as base64 of the key
ADMIN_AUTH = {"Authorization": "Bearer " + base64.b64encode(ADMIN_KEY.encode()).decode()}
ADDRESSES = ["127.0.0.%d" % i for i in range(1, 6)]

_counter = [0]


def run_token():
    """A short random token naming one test's channel, schema and tunnels."""
    return uuid.uuid4().hex[:8]


# -- ports ---------------------------------------------------------------------------


def _bindable(port, addresses):
    held = []
    try:
        for address in addresses:
            s = socket.socket()
            held.append(s)
            s.bind((address, port))
        return True
    except OSError as e:
        if e.errno not in (errno.EADDRINUSE, errno.EACCES):
            raise
        return False
    finally:
        for s in held:
            s.close()


def free_ports(count, addresses=ADDRESSES, attempts=200):
    """``count`` distinct TCP port numbers bindable right now on every one of ``addresses``."""
    ports = []
    for _ in range(attempts):
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            candidate = s.getsockname()[1]
        if candidate not in ports and _bindable(candidate, addresses):
            ports.append(candidate)
            if len(ports) == count:
                return ports
    raise AssertionError(f"no {count} ports free on all of {addresses} after {attempts} tries")


_IN_USE = re.compile(rb"Address already in use|Couldn't listen|EADDRINUSE")


# -- raw Redis ------------------------------------------------------------------------


def _resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class ChannelTap(protocol.Protocol):
    """Subscribes to one Redis channel and keeps the JSON of every message published there."""

    def __init__(self, channel):
        self.channel = channel
        self.buf = b""
        self.messages = []  # (local time received, decoded JSON or None)
        self.subscribed = defer.Deferred()
        self._waiters = []

    def connectionMade(self):
        self.transport.write(_resp("SUBSCRIBE", self.channel))

    def dataReceived(self, data):
        self.buf += data
        while True:
            item, rest = _parse(self.buf)
            if item is None:
                return
            self.buf = rest
            if isinstance(item, list) and item and item[0] == b"subscribe" and not self.subscribed.called:
                self.subscribed.callback(self)
            elif isinstance(item, list) and len(item) == 3 and item[0] == b"message":
                try:
                    msg = json.loads(item[2])
                except ValueError:
                    msg = None
                self.messages.append((reactor.seconds(), msg))
                for pred, d in list(self._waiters):
                    if msg is not None and pred(msg):
                        self._waiters.remove((pred, d))
                        d.callback((reactor.seconds(), msg))

    def wait_for(self, predicate, seconds=20):
        """(local time, message) of the first message (seen or to come) matching ``predicate``."""
        d = defer.Deferred()
        for t, msg in self.messages:
            if msg is not None and predicate(msg):
                d.callback((t, msg))
                return within(d, seconds)
        self._waiters.append((predicate, d))
        return within(d, seconds)


def _parse(buf):
    """One RESP value from ``buf``: (value, rest) or (None, buf) when incomplete."""
    if not buf:
        return None, buf
    eol = buf.find(b"\r\n")
    if eol < 0:
        return None, buf
    kind, line, rest = buf[:1], buf[1:eol], buf[eol + 2:]
    if kind in (b"+", b"-"):
        return line, rest
    if kind == b":":
        return int(line), rest
    if kind == b"$":
        n = int(line)
        if n < 0:
            return b"", rest
        if len(rest) < n + 2:
            return None, buf
        return rest[:n], rest[n + 2:]
    if kind == b"*":
        items = []
        for _ in range(int(line)):
            item, rest = _parse(rest)
            if item is None:
                return None, buf
            items.append(item)
        return items, rest
    raise ValueError("bad RESP: %r" % buf[:40])


class RedisCommands(protocol.Protocol):
    """One command at a time over RESP (enough for SCAN, GET, DEL in cleanups)."""

    def __init__(self):
        self.buf = b""
        self.pending = []

    def command(self, *args):
        d = defer.Deferred()
        self.pending.append(d)
        self.transport.write(_resp(*args))
        return within(d, 10)

    def dataReceived(self, data):
        self.buf += data
        while self.pending:
            item, self.buf = _parse(self.buf)
            if item is None:
                return
            self.pending.pop(0).callback(item)

    @defer.inlineCallbacks
    def keys(self, pattern):
        cursor, found = b"0", []
        while True:
            cursor, batch = yield self.command("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            found += batch
            if cursor == b"0":
                return sorted(set(found))


@defer.inlineCallbacks
def redis_connect(proto, host=REDIS_HOST, port=REDIS_PORT, db=None):
    yield within(TCP4ClientEndpoint(reactor, host, port).connect(e2e._Once(proto)))
    if db is not None:
        yield proto.command("SELECT", db)
    return proto


# -- the nodes -------------------------------------------------------------------------


class Node:
    """One exposrd process of a `Cluster`."""

    def __init__(self, cluster, index, ip, key):
        self.cluster = cluster
        self.index = index
        self.ip = ip
        self.key = key
        self.proc = None
        self.killed = False
        self.node_id = None

    name = property(lambda self: "ABCDEFGH"[self.index])
    url = property(lambda self: f"http://{self.ip}:{self.cluster.port}/")
    admin_url = property(lambda self: f"http://{self.ip}:{self.cluster.admin_port}")

    def argv(self):
        c = self.cluster
        args = c.bus_argv() + [
            "--cluster-key", self.key,
            "--cluster-node-ip", self.ip,
            "--cluster-discovery-wait", "0",
            "--listen-address", self.ip,
            "--storage-url", c.storage_url,
            "--api-port", str(c.port),
            "--ingress-http-port", str(c.port),
            "--ingress-http-url", f"http://{DOMAIN}:{c.port}",
            "--allow-registration",
            "--admin-enable", "--admin-api-enable", "--admin-api-key", ADMIN_KEY,
            "--admin-port", str(c.admin_port), "--admin-api-port", str(c.admin_port),
        ]
        if c.sni is not None:
            args += ["--ingress", "http,sni", "--ingress-sni-port", str(c.sni_port),
                     "--ingress-sni-cert", c.sni[0], "--ingress-sni-key", c.sni[1]]
        if c.max_connections is not None:
            args += ["--transport-max-connections", str(c.max_connections)]
        return args + list(c.extra)

    def start(self):
        self.killed = False
        self.proc = e2e.spawn("-c", "from exposr.script import main; main()", *self.argv())
        return self.proc.wait_for(rb"exposrd ready", 30)

    @property
    def running(self):
        return self.proc is not None and not self.proc.ended.called

    def kill(self):
        """SIGKILL, as a crash: nothing is announced."""
        self.killed = True
        return self.proc.kill("KILL")

    @defer.inlineCallbacks
    def stop(self):
        """SIGTERM and a bounded wait; the exit must be clean (0, no traceback)."""
        if not self.running:
            return
        try:
            self.proc.transport.signalProcess("TERM")
        except error.ProcessExitedAlready:
            pass
        try:
            code = yield within(self.proc.ended, 20)
        except defer.TimeoutError:
            yield self.proc.kill("KILL")
            raise AssertionError(f"node {self.name} did not stop within 20 s of SIGTERM")
        output = self.proc.output
        if code != 0 or b"Traceback" in output:
            raise AssertionError(f"node {self.name} exited {code}:\n{output.decode(errors='replace')[-3000:]}")

    # -- requests ----------------------------------------------------------------

    def host(self, tunnel_id):
        return f"{tunnel_id}.{DOMAIN}:{self.cluster.port}"

    @defer.inlineCallbacks
    def connect(self, port=None, **kw):
        """A `RawHTTP` connected to this node's ingress (or ``port``)."""
        proto = e2e.RawHTTP(**kw)
        yield within(TCP4ClientEndpoint(reactor, self.ip, port or self.cluster.port).connect(e2e._Once(proto)))
        return proto

    @defer.inlineCallbacks
    def request(self, tunnel_id, method=b"GET", path=b"/", body=None, headers=(), seconds=15):
        """(ResponseHead, body) of one request entering at this node, on a new connection."""
        conn = yield self.connect()
        try:
            conn.request(e2e.request(method, path, self.host(tunnel_id), headers=[(b"Connection", b"close"), *headers],
                                     body=body), method)
            head, data, _ = yield conn.response(seconds=seconds)
        finally:
            conn.transport.loseConnection()
        return head, data

    @defer.inlineCallbacks
    def admin(self, method, path, body=None):
        """(status, JSON or None) of an admin API call on this node."""
        from tests import procs

        status, data = yield procs.http(method, self.admin_url + path, body,
                                        ADMIN_AUTH)
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, data

    @defer.inlineCallbacks
    def cluster_view(self):
        """The node ids listed by this node's ``GET /v1/admin/cluster``."""
        status, body = yield self.admin("GET", "/v1/admin/cluster")
        if status != 200:
            raise AssertionError(f"node {self.name}: /v1/admin/cluster answered {status}: {body!r}")
        return body["nodes"]

    @defer.inlineCallbacks
    def alive_connections(self, tunnel_id):
        """Connected connections of the tunnel in this node's ``GET /v1/admin/tunnel/<id>``."""
        status, body = yield self.admin("GET", f"/v1/admin/tunnel/{tunnel_id}")
        if status != 200:
            raise AssertionError(f"node {self.name}: admin tunnel {tunnel_id} answered {status}: {body!r}")
        return [c for c in body["connections"] if c["connected"]]

    @defer.inlineCallbacks
    def ws(self, tunnel_id, path="/"):
        """An autobahn client (`e2e.WSClient`) through this node's ingress."""
        factory = WebSocketClientFactory(f"ws://{self.host(tunnel_id)}{path}")
        factory.protocol = e2e.WSClient
        factory.noisy = False
        proto = yield within(TCP4ClientEndpoint(reactor, self.ip, self.cluster.port).connect(factory))
        return proto

    def __repr__(self):
        return f"<node {self.name} {self.ip} {self.node_id}>"


class Client:
    """``exposr tunnel connect`` as a subprocess."""

    def __init__(self, node, tunnel_id, proc):
        self.node = node
        self.tunnel_id = tunnel_id
        self.proc = proc

    def connected(self, seconds=30):
        return self.proc.wait_for(rb"Tunnel %s connected to" % self.tunnel_id.encode(), seconds)

    @property
    def running(self):
        return not self.proc.ended.called

    @property
    def output(self):
        return self.proc.output.decode(errors="replace")

    def kill(self):
        return self.proc.kill("KILL")

    @defer.inlineCallbacks
    def stop(self):
        if not self.running:
            return
        try:
            self.proc.transport.signalProcess("TERM")
        except error.ProcessExitedAlready:
            pass
        try:
            yield within(self.proc.ended, 15)
        except defer.TimeoutError:
            yield self.proc.kill("KILL")


class Cluster:
    """``n`` exposrd nodes sharing storage and a Redis bus; see the module docstring.

    ``storage``: ``"redis"`` or ``"postgres"``; ``bus_url``: the bus's Redis
    (default the shared one at 127.0.0.1:6379); ``sni``: (cert path, key path)
    to enable the SNI ingress; ``max_connections``: ``--transport-max-connections``.
    """

    BUSES = ("redis", "udp-multicast", "udp-kubernetes")

    def __init__(self, test, n=3, storage="redis", bus_url=None, sni=None, max_connections=None, extra=(),
                 bus="redis"):
        if bus not in self.BUSES:
            raise ValueError(bus)
        self.test = test
        self.bus = bus
        self.n = n
        self.storage = storage
        self.token = run_token()
        self.channel = f"exposr-e2e-{self.token}"
        self.bus_url = bus_url or f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
        self.sni = sni
        self.max_connections = max_connections
        self.extra = extra
        self.nodes = []
        self.clients = []
        self.accounts = []
        self.tap = None

    def tunnel_id(self, name):
        """A tunnel id of this run (cleanup finds its records by the token)."""
        return f"{name}-{self.token}"

    def __getitem__(self, i):
        return self.nodes[i]

    # -- life cycle ----------------------------------------------------------------

    @defer.inlineCallbacks
    def start(self):
        self.test.addCleanup(self.cleanup)
        yield self._open_storage()
        if self.bus == "redis":
            self.tap = yield redis_connect(ChannelTap(self.channel), *self._bus_address())
            yield within(self.tap.subscribed)
        elif self.bus == "udp-kubernetes":
            self._start_dns()
        for attempt in range(3):
            self.port, self.admin_port, self.sni_port = free_ports(3)
            self.udp_port = free_udp_port()
            self.group = random_group()
            self.nodes = [Node(self, i, ADDRESSES[i], CLUSTER_KEY) for i in range(self.n)]
            try:
                yield defer.gatherResults([node.start() for node in self.nodes], consumeErrors=True)
                break
            except defer.FirstError as e:
                yield self._kill_all()
                outputs = b"".join(node.proc.output for node in self.nodes)
                if attempt < 2 and _IN_USE.search(outputs):
                    continue  # somebody took a port between the check and the bind
                raise AssertionError(self._start_failure(e.subFailure))
        for node in self.nodes:
            node.node_id = yield self._own_id(node)
        yield self.wait_discovery(self.nodes)
        return self

    # -- the bus -------------------------------------------------------------------

    SERVICE, NAMESPACE = "exposr-e2e-headless", "e2e"

    def _start_dns(self):
        from tests.test_cluster_discovery import Zone, start_dns

        self.zone = Zone()
        self.zone.set(self.headless, *ADDRESSES[:self.n])
        self.dns = "%s:%d" % start_dns(self.test, self.zone)
        self.namespace_file = os.path.abspath(self.test.mktemp())
        with open(self.namespace_file, "w") as f:
            f.write(self.NAMESPACE)

    headless = property(lambda self: f"{self.SERVICE}.{self.NAMESPACE}.svc.cluster.local")

    def bus_argv(self):
        """The options selecting this run's bus (the same on every node)."""
        if self.bus == "redis":
            return ["--cluster", "redis", "--cluster-redis-url", self.bus_url,
                    "--cluster-redis-channel", self.channel]
        args = ["--cluster", "udp", "--cluster-udp-port", str(self.udp_port)]
        if self.bus == "udp-multicast":
            return args + ["--cluster-udp-discovery", "multicast",
                           "--cluster-udp-discovery-multicast-group", self.group,
                           "--cluster-udp-discovery-multicast-ttl", "0"]
        return args + ["--cluster-udp-discovery", "kubernetes",
                       "--cluster-udp-discovery-kubernetes-service", self.SERVICE,
                       "--cluster-udp-discovery-kubernetes-namespace", self.NAMESPACE,
                       "--cluster-udp-discovery-kubernetes-namespace-file", self.namespace_file,
                       "--dns-server", self.dns]

    def _bus_address(self):
        m = re.match(r"redis://([^:/]+):(\d+)", self.bus_url)
        return m.group(1), int(m.group(2))

    def _start_failure(self, failure):
        lines = [f"a node did not become ready: {failure.getErrorMessage()}"]
        for node in self.nodes:
            lines.append(f"--- node {node.name} ({node.ip}) output:")
            lines.append(node.proc.output.decode(errors="replace")[-2500:])
        return "\n".join(lines)

    @defer.inlineCallbacks
    def _own_id(self, node):
        m = yield node.proc.wait_for(rb"node ([0-9a-f]{40})", 5)
        return m.group(1).decode()

    @defer.inlineCallbacks
    def add_node(self, key=CLUSTER_KEY, ip=None):
        """One more node (same ports, storage, channel), e.g. with a wrong ``key``."""
        node = Node(self, len(self.nodes), ip or ADDRESSES[len(self.nodes)], key)
        self.nodes.append(node)
        if self.bus == "udp-kubernetes":
            self.zone.set(self.headless, *sorted({n.ip for n in self.nodes}))
        try:
            yield node.start()
        except Exception as e:
            raise AssertionError(f"node {node.name} did not become ready: {e}\n{node.proc.output.decode(errors='replace')[-2500:]}")
        node.node_id = yield self._own_id(node)
        return node

    @defer.inlineCallbacks
    def wait_discovery(self, nodes, seconds=30):
        """Until each of ``nodes`` lists exactly these nodes' ids (plus nothing else) as not stale."""
        want = {n.node_id for n in nodes}
        views = {}

        @defer.inlineCallbacks
        def poll():
            deadline = reactor.seconds() + seconds
            while True:
                done = True
                for node in nodes:
                    listed = yield node.cluster_view()
                    views[node.name] = sorted((n["node_id"][:8], n["ip"], n["is_stale"]) for n in listed)
                    if {n["node_id"] for n in listed if not n["is_stale"]} != want:
                        done = False
                if done:
                    return
                if reactor.seconds() > deadline:
                    raise AssertionError(
                        f"nodes did not discover each other within {seconds} s; want "
                        f"{sorted((n.node_id[:8], n.ip) for n in nodes)}, views: {views}")
                yield pause(0.2)

        yield poll()

    @defer.inlineCallbacks
    def _kill_all(self):
        for node in self.nodes:
            if node.proc is not None and node.running:
                yield node.proc.kill("KILL")

    @defer.inlineCallbacks
    def cleanup(self):
        errors = []
        for client in self.clients:
            yield client.stop()
        for node in self.nodes:
            if node.killed or node.proc is None:
                continue
            try:
                yield node.stop()
            except AssertionError as e:
                errors.append(str(e))
        if self.tap is not None and self.tap.transport is not None:
            self.tap.transport.loseConnection()
        yield self._close_storage()
        if errors:
            raise AssertionError("\n".join(errors))

    # -- storage -------------------------------------------------------------------

    @defer.inlineCallbacks
    def _open_storage(self):
        if self.storage == "redis":
            self.storage_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
        elif self.storage == "postgres":
            from txpostgres import txpostgres

            _counter[0] += 1
            self.schema = f"exposr_e2e_{self.token}_{os.getpid()}_{_counter[0]}"
            self.pg = txpostgres.Connection(reactor=reactor)
            yield within(self.pg.connect(**PG))
            yield self.pg.runOperation("CREATE SCHEMA %s" % self.schema)
            self.storage_url = f"postgres://postgres@127.0.0.1:5432/test?options=-c%20search_path%3D{self.schema}"
        else:
            raise ValueError(self.storage)

    @defer.inlineCallbacks
    def _close_storage(self):
        if self.storage == "postgres":
            yield self.pg.runOperation("DROP SCHEMA IF EXISTS %s CASCADE" % self.schema)
            self.pg.close()
            return
        left = yield self.storage_keys()
        if left:
            redis = yield redis_connect(RedisCommands(), db=REDIS_DB)
            yield redis.command("DEL", *left)
            redis.transport.loseConnection()
        left = yield self.storage_keys()
        if left:
            raise AssertionError(f"Redis keys of this run left behind: {left}")

    @defer.inlineCallbacks
    def storage_keys(self):
        """The Redis storage keys of this run: its tunnels, their locks, its accounts."""
        redis = yield redis_connect(RedisCommands(), db=REDIS_DB)
        try:
            keys = yield redis.keys(f"*{self.token}*")
            for account in self.accounts:
                keys += (yield redis.keys(f"*{account}*"))
        finally:
            redis.transport.loseConnection()
        return sorted(set(keys))

    # -- accounts, tunnels, clients ----------------------------------------------

    @defer.inlineCallbacks
    def create_account(self, node=None):
        """A new account (registration through ``node``'s API): (account id, bearer headers)."""
        from tests import procs

        node = node or self.nodes[0]
        status, data = yield procs.http("POST", node.url + "v1/account", b"{}")
        if status != 201:
            raise AssertionError(f"account creation answered {status}: {data!r}")
        account = json.loads(data)["account_id"]
        self.accounts.append(account)
        status, data = yield procs.http("GET", node.url + f"v1/account/{account}/token")
        token = json.loads(data)["token"]
        return account, {"Authorization": "Bearer " + token}

    @defer.inlineCallbacks
    def api(self, node, method, path, body=None, headers=None):
        from tests import procs

        status, data = yield procs.http(method, node.url + path.lstrip("/"),
                                        json.dumps(body).encode() if body is not None else None, headers)
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, data

    def client(self, node, account, tunnel_id, target_url, *settings):
        """``exposr -s <node> -a <account> tunnel connect <id> <target> [KEY VALUE ...]``."""
        proc = e2e.spawn("-c", "from exposr.client.cli import main; main()", "-s", node.url, "-a", account,
                         "tunnel", "connect", tunnel_id, target_url, *settings)
        client = Client(node, tunnel_id, proc)
        self.clients.append(client)
        return client

    @defer.inlineCallbacks
    def wait_alive(self, nodes, tunnel_id, count, seconds=25):
        """Until every one of ``nodes`` counts ``count`` alive connections of the tunnel."""
        seen = {}

        def check():
            return all(seen.get(n.name) == count for n in nodes)

        deadline = reactor.seconds() + seconds
        while True:
            for node in nodes:
                seen[node.name] = len((yield node.alive_connections(tunnel_id)))
            if check():
                return seen
            if reactor.seconds() > deadline:
                raise AssertionError(f"alive connections of {tunnel_id} not {count} on every node "
                                     f"within {seconds} s: {seen}")
            yield pause(0.2)


def pause(seconds):
    """A Deferred firing after ``seconds`` (the poll interval of bounded waits)."""
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@defer.inlineCallbacks
def poll_until(fetch, accept, seconds, interval=0.2, what="condition"):
    """Calls ``fetch()`` (a Deferred) until ``accept(result)``; the last result, or AssertionError."""
    deadline = reactor.seconds() + seconds
    last = None
    while True:
        try:
            last = yield fetch()
        except Exception as e:
            last = e
        if not isinstance(last, Exception) and accept(last):
            return last
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what} not reached within {seconds} s; last: {last!r}")
        yield pause(interval)
