"""Running exposrd as a real process in tests: spawn, wait for a port, stop."""

import json
import os
import signal
import socket
import sys

from twisted.internet import defer, error, protocol, reactor
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers


def free_port():
    """A TCP port nobody listens on right now (for subprocesses that need a number)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra):
    e = {k: v for k, v in os.environ.items() if not k.startswith("EXPOSR_")}
    # tests stop their servers at once (the shutdown tests set a grace themselves)
    e["EXPOSR_SHUTDOWN_GRACE"] = "0"
    e.update(extra)
    return e


class Collect(protocol.ProcessProtocol):
    def __init__(self):
        self.out = []
        self.ended = defer.Deferred()
        self.lines_waiters = []

    def outReceived(self, data):
        self.out.append(data)
        for pattern, d in list(self.lines_waiters):
            if pattern in self.output:
                self.lines_waiters.remove((pattern, d))
                d.callback(None)

    errReceived = outReceived

    @property
    def output(self):
        return b"".join(self.out)

    def wait_for(self, pattern, timeout=20):
        d = defer.Deferred()
        if pattern in self.output:
            d.callback(None)
        else:
            self.lines_waiters.append((pattern, d))
        def timed_out(f):
            f.trap(defer.TimeoutError)
            raise AssertionError(f"{pattern!r} not seen in {timeout} s; output:\n{self.output.decode(errors='replace')[-3000:]}")

        return d.addTimeout(timeout, reactor).addErrback(timed_out)

    def processEnded(self, reason):
        self.status = reason.value.exitCode
        self.signal = reason.value.signal
        self.ended.callback(self.status)


class _Run(protocol.ProcessProtocol):
    def __init__(self, stdin):
        self.stdin = stdin
        self.out, self.err = [], []
        self.done = defer.Deferred()

    def connectionMade(self):
        if self.stdin:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data):
        self.out.append(data)

    def errReceived(self, data):
        self.err.append(data)

    def processEnded(self, reason):
        self.done.callback((reason.value.exitCode, b"".join(self.out), b"".join(self.err)))


def run(argv, timeout=30, *, stdin=b""):
    """(exit code, stdout, stderr) of a short-lived command (curl, openssl, ssh), bounded."""
    proc = _Run(stdin)
    reactor.spawnProcess(proc, "/usr/bin/timeout", ["timeout", str(timeout), *argv], env=os.environ)
    return proc.done.addTimeout(timeout + 5, reactor)


def spawn(args, environ=None, executable=None):
    """Run `python -m ...`-style argv from the venv; returns (protocol, transport)."""
    proto = Collect()
    argv = [executable or sys.executable, *args]
    transport = reactor.spawnProcess(proto, argv[0], argv, env=environ or env(), path=os.getcwd())
    return proto, transport


def exposrd(*options, environ=None):
    """Start `exposrd` (the console script's code) with options."""
    return spawn(["-c", "from exposr.script import main; main()", *options], environ=environ)


def twistd(*args, environ=None):
    return spawn(["-c", "from twisted.scripts.twistd import run; run()", *args], environ=environ)


@defer.inlineCallbacks
def http(method, url, body=None, headers=None):
    """(status, body bytes) of one request."""
    hdrs = Headers({k: [v] for k, v in (headers or {}).items()})
    producer = None
    if body is not None:
        from twisted.web.client import FileBodyProducer
        from io import BytesIO

        producer = FileBodyProducer(BytesIO(body))
        hdrs.setRawHeaders("content-type", ["application/json"])
    resp = yield Agent(reactor).request(method.encode(), url.encode(), hdrs, producer).addTimeout(10, reactor)
    data = yield readBody(resp)
    return resp.code, data


def stop(transport, sig=signal.SIGTERM):
    try:
        transport.signalProcess({signal.SIGTERM: "TERM", signal.SIGKILL: "KILL", signal.SIGINT: "INT"}[sig])
    except error.ProcessExitedAlready:
        pass


def jsonof(data):
    return json.loads(data)
