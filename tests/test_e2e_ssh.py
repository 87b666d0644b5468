"""End to end over real sockets: public HTTP client -> ingress -> SSH -> OpenSSH `ssh -R` -> target.

The server is the full `ExposrService` (in process) except where its memory is
measured (an `exposrd` subprocess). Tunnel credentials come from the REST API
(`transport.ssh.url`), exactly as a user would copy them; the tunnel client is
the real OpenSSH client; the public side is a raw HTTP client or curl.
Waiting is always on a Deferred with a bounded timeout.
"""

import functools
import hashlib
import json
import os
import shutil
import tempfile

from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from exposr.client.rest import ApiClient
from tests import e2e_support as e2e
from tests import procs
from tests.e2e_support import within

run = functools.partial(procs.run, timeout=60)  # (exit code, stdout, stderr), bounded

SSH = shutil.which("ssh") or "/usr/bin/ssh"
CURL = shutil.which("curl") or "/usr/bin/curl"
TID = "ssh-tunnel"


# -- helpers shared with test_e2e_sni ------------------------------------------------


def ssh_options(port, loglevel="ERROR"):
    return [
        "-F", "/dev/null",
        "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null",
        "-o", f"LogLevel={loglevel}",
        "-o", "ConnectTimeout=10",
        "-o", "ExitOnForwardFailure=yes",
        "-o", "BatchMode=yes",
        "-p", str(port),
    ]


def spawn_ssh(testcase, *args, home=None):
    """The OpenSSH client with ``args`` (after the common options); killed at cleanup."""
    if home is None:
        home = os.path.abspath(testcase.mktemp())
        os.makedirs(home)
    proc = e2e.Proc()
    argv = [SSH, *args]
    reactor.spawnProcess(proc, SSH, argv, env={"HOME": home, "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    testcase.addCleanup(proc.kill)
    return proc


def ssh_tunnel(testcase, info, forward, *extra, loglevel="ERROR"):
    """``ssh -N -R <forward> <transport.ssh.url>`` with the URL the API gave."""
    ssh = info["transport"]["ssh"]
    return spawn_ssh(testcase, *ssh_options(ssh["port"], loglevel), "-N", "-R", forward, *extra, ssh["url"])


class LogWatch:
    """Every log event while a test runs; tracebacks are whatever carries a failure."""

    def __init__(self, testcase):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def failures(self):
        return [e for e in self.events if e.get("log_failure") is not None]

    def text(self, namespace_prefix):
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if str(e.get("log_namespace", "")).startswith(namespace_prefix)]


@defer.inlineCallbacks
def new_tunnel(server, tunnel_id, target_url=None, http=True, sni=False, ws=False, ssh=True, api=None):
    """Account (by registration) + tunnel through the REST API; returns (api, tunnel info)."""
    if api is None:
        api = ApiClient(reactor, server.url)
        acct = yield within(api.create_account())
        api.account = acct["account_id"]
    yield within(api.put_tunnel(tunnel_id, {}))
    body = {"ingress": {"http": {"enabled": http}}, "transport": {"ssh": {"enabled": ssh}, "ws": {"enabled": ws}}}
    if sni:
        body["ingress"]["sni"] = {"enabled": True}
    if target_url:
        body["target"] = {"url": target_url}
    yield within(api.patch_tunnel(tunnel_id, body))
    info = yield within(api.get_tunnel(tunnel_id))
    return api, info


@defer.inlineCallbacks
def wait_forwards(server, tunnel_id, count=1, seconds=15):
    """The tunnel's SSH connection once the client has ``count`` forwards active."""
    yield e2e.wait_until(lambda: server.local_connections(tunnel_id), seconds)
    conn = server.local_connections(tunnel_id)[0]
    yield within(conn.when_forwarded(count), seconds)
    return conn


def ssh_server(**overrides):
    overrides.setdefault("transport", ("ws", "ssh"))
    overrides.setdefault("transport_ssh_port", procs.free_port())
    return e2e.Server(**overrides)


# -- tests -----------------------------------------------------------------------------


class _Base(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.logs = LogWatch(self)
        self.server = yield ssh_server().start()
        self.addCleanup(self.server.stop)
        self.target = yield e2e.HTTPTarget().start()
        self.addCleanup(self.target.stop)

    def tearDown(self):
        self.assertEqual(self.logs.failures(), [], "no traceback may be logged")

    @defer.inlineCallbacks
    def ask(self, method, path, tunnel_id=TID, body=None, port=None, headers=()):
        """One request on a new public connection: (head, body)."""
        conn = yield e2e.raw_connect(port or self.server.port)
        self.addCleanup(conn.transport.abortConnection)
        host = f"{tunnel_id}.localhost:{port or self.server.port}"
        conn.request(e2e.request(method, path, host, body=body, headers=headers), method)
        head, data, _ = yield conn.response(seconds=20)
        return head, data

    @defer.inlineCallbacks
    def connected(self, forward=None, target_url=None, tunnel_id=TID, **kw):
        """Tunnel + `ssh -R` + forward active; returns (api, info used, ssh process, connection)."""
        api, info = yield new_tunnel(self.server, tunnel_id, target_url, **kw)
        proc = ssh_tunnel(self, info, forward or f"0:127.0.0.1:{self.target.port}")
        conn = yield wait_forwards(self.server, tunnel_id)
        return api, info, proc, conn


class ProxyTests(_Base):
    @defer.inlineCallbacks
    def test_port_zero_get_and_post_byte_exact(self):
        """`ssh -R 0:host:port` (target from the API): GET and POST byte-exact, raw client and curl."""
        api, info, proc, conn = yield self.connected(target_url=self.target.url)
        ssh = info["transport"]["ssh"]
        self.assertEqual(ssh["url"], f"ssh://{TID}:{ssh['password']}@127.0.0.1:{self.server.config.transport_ssh_port}")
        self.assertEqual(ssh["username"], TID)
        self.assertEqual(ssh["fingerprint"], self.server.service.ssh.fingerprint)
        # OpenSSH binds "localhost" for `-R 0:...`; the channel announces what it asked for
        self.assertEqual(conn.forwards, [("localhost", 0, self.target.port)])

        head, body = yield self.ask(b"GET", b"/bytes/3000000")
        self.assertEqual(head.status, 200)
        self.assertEqual(body, e2e.expected_bytes(3000000))
        payload = os.urandom(2_000_000)
        head, body = yield self.ask(b"POST", b"/echo-body?x=1", body=payload)
        self.assertEqual(head.status, 200)
        self.assertEqual(body, payload)
        self.assertEqual(self.target.requests[-1].uri, b"/echo-body?x=1")

        # curl on the public side
        port = self.server.port
        url = f"http://{TID}.localhost:{port}/bytes/1000000"
        code, out, err = yield run([CURL, "-sS", "--resolve", f"{TID}.localhost:{port}:127.0.0.1", url])
        self.assertEqual(code, 0, err)
        self.assertEqual(hashlib.sha256(out).hexdigest(), hashlib.sha256(e2e.expected_bytes(1000000)).hexdigest())
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(payload)
        code, out, err = yield run([CURL, "-sS", "--resolve", f"{TID}.localhost:{port}:127.0.0.1",
                                    "--data-binary", "@" + path, "-H", "content-type: application/octet-stream",
                                    f"http://{TID}.localhost:{port}/echo-body"])
        self.assertEqual(code, 0, err)
        self.assertEqual(out, payload)

    @defer.inlineCallbacks
    def test_bind_form_sets_the_target(self):
        """`ssh -R localhost:P:127.0.0.1:P` on a tunnel without target: the target becomes tcp://localhost:P."""
        p = self.target.port
        api, info, proc, conn = yield self.connected(forward=f"localhost:{p}:127.0.0.1:{p}")
        self.assertEqual(conn.forwards, [("localhost", p, p)])
        info = yield within(api.get_tunnel(TID))
        self.assertEqual(info["target"]["url"], f"tcp://localhost:{p}")
        head, body = yield self.ask(b"GET", b"/bytes/100000")
        self.assertEqual((head.status, body), (200, e2e.expected_bytes(100000)))
        head, body = yield self.ask(b"POST", b"/echo-body", body=b"x" * 70000)
        self.assertEqual((head.status, body), (200, b"x" * 70000))

    @defer.inlineCallbacks
    def test_second_forward_on_the_same_connection(self):
        """A forward added later over the live connection (`ssh -O forward`) takes new streams."""
        other = yield e2e.HTTPTarget().start()
        self.addCleanup(other.stop)
        api, info = yield new_tunnel(self.server, TID, self.target.url)
        ssh = info["transport"]["ssh"]
        # a short path: unix socket names are limited to 108 bytes
        tmp = tempfile.mkdtemp(prefix="e2essh")
        self.addCleanup(shutil.rmtree, tmp, True)
        sock = os.path.join(tmp, "ctl")
        proc = spawn_ssh(self, *ssh_options(ssh["port"]), "-M", "-S", sock, "-N",
                         "-R", f"0:127.0.0.1:{self.target.port}", ssh["url"])
        conn = yield wait_forwards(self.server, TID)
        head, body = yield self.ask(b"GET", b"/first")
        self.assertEqual(head.status, 200)
        self.assertEqual(len(self.target.requests), 1)
        # retire the pooled upstream stream (as the idle timeout does): only its
        # channel closes, not the SSH connection
        self.server.ingress.pools[TID].close()
        yield e2e.wait_until(lambda: not conn._streams)
        self.assertIs(self.server.local_connections(TID)[0], conn)

        self.assertFalse(proc.ended.called, proc.output)
        code, out, err = yield run([SSH, *ssh_options(ssh["port"]), "-S", sock, "-O", "forward",
                                    "-R", f"0:127.0.0.1:{other.port}", ssh["url"]], timeout=20)
        self.assertEqual(code, 0, err)
        yield within(conn.when_forwarded(2))
        self.assertEqual(len(conn.forwards), 2)
        self.assertEqual(len(self.server.local_connections(TID)), 1, "still one SSH connection")
        head, body = yield self.ask(b"GET", b"/second")
        self.assertEqual(head.status, 200)
        self.assertEqual(json.loads(body)["path"], "/second")
        self.assertEqual([r.uri for r in other.requests], [b"/second"])
        self.assertEqual(len(self.target.requests), 1)
        yield run([SSH, "-S", sock, "-O", "exit", "x"], timeout=10)


class LoginTests(_Base):
    @defer.inlineCallbacks
    def test_token_rotates_and_a_reused_token_is_refused(self):
        api, info, proc, conn = yield self.connected(target_url=self.target.url)
        old = info["transport"]["ssh"]["password"]
        after = yield within(api.get_tunnel(TID))
        self.assertNotEqual(after["transport"]["ssh"]["password"], old, "token rotated on login")
        self.assertEqual(after["connection"]["connected"], True)

        again = ssh_tunnel(self, info, f"0:127.0.0.1:{self.target.port}")
        code = yield within(again.ended, 20)
        self.assertEqual(code, 255)
        self.assertIn(b"Permission denied", again.output)
        self.assertEqual(len(self.server.local_connections(TID)), 1)

        # the fresh token works (max_connections is 2)
        second = ssh_tunnel(self, after, f"0:127.0.0.1:{self.target.port}")
        yield e2e.wait_until(lambda: len(self.server.local_connections(TID)) == 2, 15)
        head, body = yield self.ask(b"GET", b"/ok")
        self.assertEqual(head.status, 200)
        self.assertFalse(second.ended.called)


class DisconnectTests(_Base):
    @defer.inlineCallbacks
    def test_ssh_exit_gives_503_tunnel_not_connected(self):
        api, info, proc, conn = yield self.connected(target_url=self.target.url)
        head, body = yield self.ask(b"GET", b"/before")
        self.assertEqual(head.status, 200)
        logs = LogWatch(self)
        yield proc.kill("TERM")
        yield e2e.wait_until(lambda: not self.server.local_connections(TID), 10)
        # a client's disconnect is no server error (conch logged it at error level)
        from twisted.logger import LogLevel, formatEvent

        errors = [formatEvent(e) for e in logs.events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]
        self.assertEqual(errors, [])
        head, body = yield self.ask(b"GET", b"/after")
        self.assertEqual(head.status, 503)
        self.assertEqual(json.loads(body)["error"], "TUNNEL_NOT_CONNECTED")
        info = yield within(api.get_tunnel(TID))
        self.assertEqual(info["connection"]["connected"], False)


class BadInputTests(_Base):
    @defer.inlineCallbacks
    def test_garbage_and_stalled_handshakes_do_not_disturb_others(self):
        api, info, proc, conn = yield self.connected(target_url=self.target.url)
        svc = self.server.service.ssh
        svc.login_grace = 1.0  # for connections accepted from now on
        port = svc.port

        garbage = yield e2e.raw_bytes_connect(port, os.urandom(8192) + b"\n" * 10 + os.urandom(8192))
        not_ssh = yield e2e.raw_bytes_connect(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"A" * 5000)
        bad_packet = yield e2e.raw_bytes_connect(port, b"SSH-2.0-evil\r\n" + b"\xff\xff\xff\xff" + os.urandom(100))
        stalled_silent = yield e2e.raw_bytes_connect(port)  # connects, says nothing
        stalled_after_version = yield e2e.raw_bytes_connect(port, b"SSH-2.0-slow\r\n")  # never sends KEXINIT

        # meanwhile the tunnel works
        head, body = yield self.ask(b"GET", b"/bytes/500000")
        self.assertEqual((head.status, body), (200, e2e.expected_bytes(500000)))

        for p in (garbage, not_ssh, bad_packet):
            yield within(p.closed, 10)
        for p in (stalled_silent, stalled_after_version):
            yield within(p.closed, 10)  # login grace
            self.assertTrue(p.received.startswith(b"SSH-2.0-exposr/"))

        # a new client still gets in, the old one still serves
        api2, info2 = yield new_tunnel(self.server, "other-tunnel", self.target.url)
        ssh_tunnel(self, info2, f"0:127.0.0.1:{self.target.port}")
        yield wait_forwards(self.server, "other-tunnel")
        head, _ = yield self.ask(b"GET", b"/x", tunnel_id="other-tunnel")
        self.assertEqual(head.status, 200)
        head, _ = yield self.ask(b"GET", b"/y")
        self.assertEqual(head.status, 200)
        self.assertFalse(proc.ended.called)


class MemoryTests(unittest.TestCase):
    """1 GB through an `exposrd` subprocess: its resident memory stays flat."""

    timeout = 120
    SIZE = 1024 ** 3

    @defer.inlineCallbacks
    def test_1gb_download_flat_memory(self):
        target = yield e2e.HTTPTarget().start()
        self.addCleanup(target.stop)
        ssh_port = procs.free_port()
        server, port = yield e2e.exposrd_process("--transport", "ws,ssh", "--transport-ssh-port", str(ssh_port))
        self.addCleanup(server.kill)
        api = ApiClient(reactor, f"http://127.0.0.1:{port}/")
        acct = yield within(api.create_account())
        api.account = acct["account_id"]
        yield within(api.put_tunnel(TID, {}))
        yield within(api.patch_tunnel(TID, {"target": {"url": target.url}, "ingress": {"http": {"enabled": True}},
                                            "transport": {"ssh": {"enabled": True}}}))
        info = yield within(api.get_tunnel(TID))
        self.assertEqual(info["transport"]["ssh"]["port"], ssh_port)
        proc = ssh_tunnel(self, info, f"0:127.0.0.1:{target.port}", loglevel="INFO")
        # OpenSSH reports the port the server allocated once the forward is up
        yield proc.wait_for(rb"Allocated port \d+ for remote forward", 20)

        host = f"{TID}.localhost:{port}"
        resolve = f"{TID}.localhost:{port}:127.0.0.1"

        @defer.inlineCallbacks
        def fetch(size):
            code, out, err = yield run([CURL, "-sS", "-o", "/dev/null", "--resolve", resolve,
                                        "-w", "%{http_code} %{size_download}", f"http://{host}/bytes/{size}"], timeout=100)
            return code, out, err

        code, out, err = yield fetch(1_000_000)  # warm up
        self.assertEqual(out, b"200 1000000", err)
        before = e2e.rss_kb(server.pid)
        peak = [before]

        def sample():
            peak[0] = max(peak[0], e2e.rss_kb(server.pid))

        from twisted.internet import task

        sampler = task.LoopingCall(sample)
        sampler.start(0.1)
        started = reactor.seconds()
        try:
            code, out, err = yield fetch(self.SIZE)
        finally:
            sampler.stop()
        after = e2e.rss_kb(server.pid)
        self.assertEqual((code, out), (0, b"200 %d" % self.SIZE), err)
        self.assertEqual(target.sent, self.SIZE + 1_000_000)
        growth_mb = (max(peak[0], after) - before) / 1024
        took = reactor.seconds() - started
        print(f"\n1 GB in {took:.1f} s ({self.SIZE / took / 1e6:.0f} MB/s); exposrd RSS before {before / 1024:.1f} MB, "
              f"peak {peak[0] / 1024:.1f} MB, after {after / 1024:.1f} MB")
        self.assertLess(growth_mb, 50)
        self.assertFalse(proc.ended.called)
        server.transport.signalProcess("TERM")
        yield within(server.ended, 20)
        self.assertNotIn(b"Traceback", server.output)
