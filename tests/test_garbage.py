"""Garbage on every port of a real exposrd process: clean closes, no errors, still serving.

The server runs as a subprocess with every listener on (API + WS endpoint +
HTTP ingress, SNI, SSH, admin interface and admin API). Each port gets random
bytes, truncated protocol openings and oversized lines from many clients at
once; afterwards the server must still answer, and its log must hold no
error-level record and no traceback.
"""

import json
import os
import random
import signal

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

from tests import procs
from tests.test_certificate import cert_pem, key_pem, make_cert


class _Spray(protocol.Protocol):
    """Sends one payload, then waits (bounded) for the server to close."""

    def __init__(self, payload, done):
        self.payload = payload
        self.done = done

    def connectionMade(self):
        self.transport.write(self.payload)
        self.timer = reactor.callLater(5, self.transport.abortConnection)

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        if self.timer.active():
            self.timer.cancel()
        self.done.callback(None)


def _payloads(rnd):
    yield rnd.randbytes(1)
    yield rnd.randbytes(4096)
    yield b"\x00" * 70000
    yield b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 70000 + b"\r\n\r\n"
    yield b"GET /v1/tunnel/x/ws-endpoint?t=zz HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    yield b"SSH-2.0-x\r\n" + rnd.randbytes(2000)
    yield b"\x16\x03\x01\x00\x05" + rnd.randbytes(5)  # a TLS record too short to be a hello
    yield b"\x16\x03\x01\xff\xff" + rnd.randbytes(3000)  # a hello record claiming 64 KiB
    yield b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    yield b"POST /v1/tunnel/abcd HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    for _ in range(4):
        yield rnd.randbytes(rnd.randint(1, 20000))


class GarbageTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_every_port_survives_garbage(self):
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        cert, key = make_cert("*.example.test")
        cpath, kpath = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
        with open(cpath, "wb") as f:
            f.write(cert_pem(cert))
        with open(kpath, "wb") as f:
            f.write(key_pem(key))
        ports = {name: procs.free_port() for name in ("api", "sni", "ssh", "admin", "admin_api")}
        proto, transport = procs.exposrd(
            "--ingress", "http,sni", "--transport", "ws,ssh",
            "--ingress-http-url", f"http://example.test:{ports['api']}",
            "--api-port", str(ports["api"]), "--ingress-http-port", str(ports["api"]),
            "--ingress-sni-port", str(ports["sni"]), "--ingress-sni-cert", cpath, "--ingress-sni-key", kpath,
            "--transport-ssh-port", str(ports["ssh"]),
            "--admin-enable", "--admin-port", str(ports["admin"]),
            "--admin-api-enable", "--admin-api-port", str(ports["admin_api"]), "--admin-api-key", "k",
            "--allow-registration", "--listen-address", "127.0.0.1", "--log-level", "info",
        )
        self.addCleanup(procs.stop, transport, signal.SIGKILL)
        yield proto.wait_for(b"exposrd ready")

        rnd = random.Random(7)
        payloads = list(_payloads(rnd))
        waits = []
        for port in ports.values():
            for payload in payloads:
                done = defer.Deferred()
                endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
                d = endpoint.connect(protocol.Factory.forProtocol(lambda p=payload, dn=done: _Spray(p, dn)))
                d.addErrback(lambda f, dn=done: dn.callback(None))
                waits.append(done)
        yield defer.gatherResults(waits)

        # still serving, on every kind of listener
        status, _ = yield procs.http("GET", f"http://127.0.0.1:{ports['admin']}/ping")
        self.assertEqual(status, 200)
        status, body = yield procs.http("POST", f"http://127.0.0.1:{ports['api']}/v1/account", b"{}")
        self.assertEqual(status, 201)
        status, _ = yield procs.http("GET", f"http://127.0.0.1:{ports['api']}/", headers={"Host": "nope.example.test"})
        self.assertEqual(status, 404)

        procs.stop(transport, signal.SIGTERM)
        code = yield proto.ended.addTimeout(30, reactor)
        self.assertEqual(code, 0)
        out = proto.output
        self.assertNotIn(b"Traceback", out)
        levels = {json.loads(line)["level"] for line in out.splitlines() if line.startswith(b"{")}
        self.assertIn("INFO", levels)  # the log was read
        self.assertFalse(levels & {"ERROR", "FATAL"}, out.decode(errors="replace")[-4000:])
