"""Support for the SSH transport tests: fakes of the domain, a real OpenSSH
client driven with spawnProcess, HTTP and raw TCP targets, a Conch client for
the misbehaving-client cases. No test cases here."""

import copy
import os
import secrets
import shutil
import struct

from twisted.conch.ssh import common, connection, userauth
from twisted.conch.ssh import transport as sshtransport
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Site

from exposr.config import Config
from exposr.transport.ssh import SSHTransportService

SSH = shutil.which("ssh") or "/usr/bin/ssh"
SSHPASS = shutil.which("sshpass")


class Event:
    """A condition tests wait for: ``wait(pred)`` fires once ``pred()`` holds."""

    def __init__(self):
        self._waiters = []

    def wait(self, predicate):
        if predicate():
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append((predicate, d))
        return d

    def fire(self):
        ready = [(p, d) for p, d in self._waiters if p()]
        self._waiters = [(p, d) for p, d in self._waiters if (p, d) not in ready]
        for _, d in ready:
            d.callback(None)


# -- fakes of tunnels / registry ---------------------------------------------------


class FakeTunnels:
    def __init__(self):
        self.records = {}
        self.accounts = {}
        self.updates = []

    def add(self, tunnel_id, target=None, account="ACCOUNT1", http_url=None):
        token = secrets.token_urlsafe(32)
        record = {
            "id": tunnel_id,
            "account": account,
            "transport": {"token": token},
            "target": {"url": target} if target else {},
            "ingress": {
                "http": {"enabled": bool(http_url), "url": http_url} if http_url else {"enabled": False},
                "sni": {"enabled": False},
            },
        }
        self.records[tunnel_id] = record
        self.accounts.setdefault(account, {"id": account, "status": {"disabled": False}})
        return token

    def token(self, tunnel_id):
        return self.records[tunnel_id]["transport"]["token"]

    def rotate(self, tunnel_id):
        self.records[tunnel_id]["transport"]["token"] = secrets.token_urlsafe(32)

    def authorize(self, tunnel_id, token):
        record = self.records.get(tunnel_id)
        if record is None or record["transport"]["token"] != token:
            return defer.succeed(None)
        account = self.accounts[record["account"]]
        if account["status"]["disabled"]:
            return defer.succeed(None)
        return defer.succeed((copy.deepcopy(record), copy.deepcopy(account)))

    def get(self, tunnel_id):
        record = self.records.get(tunnel_id)
        return defer.succeed(copy.deepcopy(record) if record else None)

    def update(self, tunnel_id, fn, account_id=None):
        record = copy.deepcopy(self.records[tunnel_id])
        assert account_id is None or account_id == record["account"]
        fn(record)
        self.records[tunnel_id] = record
        self.updates.append((tunnel_id, copy.deepcopy(record)))
        return defer.succeed(copy.deepcopy(record))


class FakeRegistry:
    def __init__(self, tunnels):
        self.tunnels = tunnels
        self.conns = []
        self.registered = []  # every connection ever registered
        self.unregistered = []
        self.refuse = False
        self.changed = Event()

    def register(self, conn, account_id):
        if self.refuse:
            return defer.succeed(False)
        self.conns.append(conn)
        self.registered.append(conn)
        self.tunnels.rotate(conn.tunnel_id)
        self.changed.fire()
        return defer.succeed(True)

    def unregister(self, conn):
        if conn in self.conns:
            self.conns.remove(conn)
            self.unregistered.append(conn)
            self.changed.fire()
            return True
        return False

    def wait_registered(self, n=1):
        return self.changed.wait(lambda: len(self.registered) >= n).addCallback(
            lambda _: self.registered[n - 1]
        )

    def wait_unregistered(self, conn):
        return self.changed.wait(lambda: conn in self.unregistered)


# -- the server under test -------------------------------------------------------------


@defer.inlineCallbacks
def start_server(testcase, **kw):
    """A listening SSHTransportService on 127.0.0.1 with a Clock for its timers."""
    tunnels = kw.pop("tunnels", None) or FakeTunnels()
    registry = kw.pop("registry", None) or FakeRegistry(tunnels)
    clock = Clock()
    config = Config(transport=("ssh",), transport_ssh_port=0, **kw.pop("config", {}))
    service = SSHTransportService(
        config,
        tunnels,
        registry,
        "node1",
        clock,
        endpoint=TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
        **kw,
    )
    yield service.listen()
    service.running = 1

    @defer.inlineCallbacks
    def stop():
        closing = service.stopService()
        # the disconnect grace timers run on the fake clock
        for _ in range(3):
            clock.advance(10)
        yield closing

    testcase.addCleanup(stop)
    service.clock = clock
    return service, tunnels, registry


# -- OpenSSH client ------------------------------------------------------------------------


class SSHProcess(protocol.ProcessProtocol):
    def __init__(self):
        self.stdout = b""
        self.stderr = b""
        self.exit_code = None
        self.ended = defer.Deferred()
        self.output = Event()

    def outReceived(self, data):
        self.stdout += data
        self.output.fire()

    def errReceived(self, data):
        self.stderr += data
        self.output.fire()

    def processEnded(self, reason):
        self.exit_code = getattr(reason.value, "exitCode", None)
        self.ended.callback(self.exit_code)

    def wait_stdout(self, needle):
        return self.output.wait(lambda: needle in self.stdout)

    def kill(self):
        if self.exit_code is None and not self.ended.called:
            try:
                self.transport.signalProcess("KILL")
            except Exception:
                pass
        return self.ended


def ssh_args(port, user, *extra, batch=True):
    args = [
        SSH,
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "BatchMode=%s" % ("yes" if batch else "no"),
        "-p",
        str(port),
        "-l",
        user,
    ]
    args += list(extra)
    args.append("127.0.0.1")
    return args


def spawn(testcase, args, home):
    proc = SSHProcess()
    env = {"HOME": home, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    reactor.spawnProcess(proc, args[0], args, env=env)
    testcase.addCleanup(proc.kill)
    return proc


def spawn_ssh(testcase, port, user, *extra, home=None):
    return spawn(testcase, ssh_args(port, user, *extra), home or testcase.mktemp_home())


def spawn_sshpass(testcase, port, user, password, *extra):
    args = ssh_args(
        port,
        user,
        "-o",
        "PreferredAuthentications=password",
        "-o",
        "PubkeyAuthentication=no",
        "-o",
        "NumberOfPasswordPrompts=1",
        *extra,
        batch=False,
    )
    return spawn(testcase, [SSHPASS, "-p", password] + args, testcase.mktemp_home())


# -- targets --------------------------------------------------------------------------------


class HTTPTarget(Resource):
    isLeaf = True

    def __init__(self, body):
        Resource.__init__(self)
        self.body = body

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/octet-stream")
        return self.body

    def render_POST(self, request):
        return request.content.read()


@defer.inlineCallbacks
def http_target(testcase, body):
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(HTTPTarget(body)))
    testcase.addCleanup(port.stopListening)
    return port.getHost().port


class Collect(protocol.Protocol):
    """Sends ``request`` on connect; fires ``done`` with everything received."""

    def __init__(self, request=b""):
        self.request = request
        self.received = []
        self.count = 0
        self.done = defer.Deferred()
        self.event = Event()

    def connectionMade(self):
        if self.request:
            self.transport.write(self.request)

    def dataReceived(self, data):
        self.received.append(data)
        self.count += len(data)
        self.event.fire()

    def connectionLost(self, reason):
        self.reason = reason
        self.event.fire()
        self.done.callback(b"".join(self.received))


class OneShot(protocol.Factory):
    def __init__(self, proto):
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto


def split_http(response):
    head, _, body = response.partition(b"\r\n\r\n")
    return head, body


# -- a Conch client for the misbehaving cases ---------------------------------------------------


class _ClientTransport(sshtransport.SSHClientTransport):
    def verifyHostKey(self, hostKey, fingerprint):
        return defer.succeed(True)

    def connectionSecure(self):
        self.requestService(_ClientAuth(self.factory.user, _ClientConnection(self.factory.ready)))


class _ClientAuth(userauth.SSHUserAuthClient):
    def getPassword(self, prompt=None):
        return None

    def getPublicKey(self):
        return None

    def ssh_USERAUTH_BANNER(self, packet):
        pass


class _ClientConnection(connection.SSHConnection):
    def __init__(self, ready):
        connection.SSHConnection.__init__(self)
        self.ready = ready

    def serviceStarted(self):
        connection.SSHConnection.serviceStarted(self)
        self.ready.callback(self)

    def global_keepalive_openssh_com(self, data):
        return 0

    def open_raw(self, name, window, max_packet, extra=b""):
        """Send a CHANNEL_OPEN by hand; fires with the reply (type, payload)."""
        d = defer.Deferred()
        self._raw = d
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN,
            common.NS(name) + struct.pack(">3L", 999, window, max_packet) + extra,
        )
        return d

    def ssh_CHANNEL_OPEN_CONFIRMATION(self, packet):
        self._raw.callback(("confirm", packet))

    def ssh_CHANNEL_OPEN_FAILURE(self, packet):
        self._raw.callback(("failure", packet))


class _ClientFactory(protocol.ClientFactory):
    protocol = _ClientTransport

    def __init__(self, user):
        self.user = user
        self.ready = defer.Deferred()


@defer.inlineCallbacks
def conch_client(testcase, port, user):
    f = _ClientFactory(user.encode("utf-8"))
    proto = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(f)
    testcase.addCleanup(lambda: proto.transport.abortConnection())
    conn = yield f.ready
    return proto, conn
