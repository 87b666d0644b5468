"""Helpers of the end-to-end tests: a real server, the real client, real targets.

Everything listens on 127.0.0.1 port 0 and is driven by the global reactor.
Waiting is always on a Deferred with a bounded timeout (`within`).
"""

import hashlib
import json
import os
import re
import signal
import sys

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.web import resource, server
from zope.interface import implementer

from exposr.client.connect import TunnelConnector
from exposr.client.rest import ApiClient
from exposr.config import Config
from exposr.ingress import httphead
from exposr.server import ExposrService

HOST = "127.0.0.1"


def within(d, seconds=10):
    """``d`` with a timeout on the real reactor."""
    return d.addTimeout(seconds, reactor)


def wait_until(predicate, seconds=10, interval=0.01):
    """A Deferred that fires once ``predicate()`` is true (polled), else times out."""
    d = defer.Deferred()

    def check():
        try:
            ok = predicate()
        except Exception:
            ok = False
        if ok:
            loop.stop()
            if not d.called:
                d.callback(None)

    loop = task.LoopingCall(check)
    loop.start(interval, now=True)

    def cancel(result):
        if loop.running:
            loop.stop()
        return result

    return within(d, seconds).addBoth(cancel)


def autobahn_settled(seconds=3):
    """Fires once autobahn's batched timers (close handshakes) have run out."""
    def idle():
        return not any("_BatchedTimer" in repr(c.func) or "_notify_bucket" in repr(c.func)
                       for c in reactor.getDelayedCalls() if c.active())
    return wait_until(idle, seconds, 0.05)


# -- the server, in process --------------------------------------------------------


class Server:
    """An in-process `ExposrService` on one shared port (API + WS + ingress)."""

    def __init__(self, **overrides):
        overrides.setdefault("ingress_http_url", "http://localhost")
        overrides.setdefault("api_port", 0)
        overrides.setdefault("ingress_http_port", 0)
        overrides.setdefault("allow_registration", True)
        overrides.setdefault("listen_address", HOST)
        self.config = Config(**overrides)
        self.service = ExposrService(self.config, reactor)

    @defer.inlineCallbacks
    def start(self):
        self.service.startService()
        yield within(self.service.when_started())
        self.port = self.service.listeners["api"].address.port
        self.url = f"http://{HOST}:{self.port}/"
        return self

    def stop(self):
        return within(defer.maybeDeferred(self.service.stopService), 15)

    @property
    def door(self):
        return self.service.listeners["api"].factory

    @property
    def ws(self):
        return self.door.ws

    @property
    def ingress(self):
        return self.service.http_ingress

    @property
    def node_id(self):
        return self.service.node.id

    def host(self, tunnel_id):
        return f"{tunnel_id}.localhost:{self.port}"

    def local_connections(self, tunnel_id):
        state = self.service.registry._tunnels.get(tunnel_id)
        if state is None:
            return []
        return [c.conn for c in state.connections.values() if c.local and c.connected and c.conn is not None]


@defer.inlineCallbacks
def make_tunnel(server, tunnel_id, target_url, api=None, http_enabled=True):
    """Account (registration) + tunnel configured as the exposr client does."""
    if api is None:
        api = ApiClient(reactor, server.url)
        acct = yield within(api.create_account())
        api.account = acct["account_id"]
    yield within(api.put_tunnel(tunnel_id, {}))
    yield within(api.patch_tunnel(tunnel_id, {"target": {"url": target_url}}))
    yield within(api.patch_tunnel(tunnel_id, {"ingress": {"http": {"enabled": http_enabled}}}))
    yield within(api.patch_tunnel(tunnel_id, {"transport": {"ws": {"enabled": True}}}))
    return api


@defer.inlineCallbacks
def connect_client(server, tunnel_id, target_url, connections=None, api=None, http_enabled=True):
    """A tunnel served by the real client (`TunnelConnector`); waits for its WebSockets."""
    api = yield make_tunnel(server, tunnel_id, target_url, api=api, http_enabled=http_enabled)
    connector = TunnelConnector(reactor, api, tunnel_id)
    yield within(connector.start())
    want = connections if connections is not None else server.config.transport_max_connections
    yield within(connector.wait_connections(want))
    yield wait_until(lambda: len(server.local_connections(tunnel_id)) >= want)
    return connector


# -- targets ---------------------------------------------------------------------


def _digest(data):
    return hashlib.sha256(data).hexdigest()


class EchoResource(resource.Resource):
    """Answers JSON: method, path, headers (raw, in order), body size and sha256."""

    isLeaf = True

    def __init__(self, target):
        super().__init__()
        self.target = target

    def render(self, request):
        self.target.requests.append(request)
        self.target.channels.append(id(request.channel))
        path = request.uri.decode("latin-1")
        if path.startswith("/hang"):
            self.target.hanging.append(request)
            return server.NOT_DONE_YET
        if path.startswith("/bytes/"):
            return self._stream(request, int(path.split("/")[2]))
        body = request.content.read()
        out = {
            "method": request.method.decode(),
            "path": path,
            "headers": [[k.decode("latin-1").lower(), v.decode("latin-1")]
                        for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs],
            "body_len": len(body),
            "body_sha256": _digest(body),
            "client": request.getClientAddress().host,
        }
        data = json.dumps(out).encode()
        request.setHeader(b"content-type", b"application/json")
        if path.startswith("/echo-body"):
            request.setHeader(b"content-type", b"application/octet-stream")
            return body
        return data

    def _stream(self, request, size):
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % size)
        producer = _Bytes(request, size, self.target)
        request.registerProducer(producer, True)
        producer.resumeProducing()
        request.notifyFinish().addErrback(lambda _: producer.stopProducing())
        return server.NOT_DONE_YET


_CHUNK = os.urandom(256 * 1024)


@implementer(IPushProducer)
class _Bytes:
    """Writes ``size`` pseudo-random bytes while not paused."""

    def __init__(self, request, size, target):
        self.request = request
        self.left = size
        self.target = target
        self.paused = False
        self.stopped = False
        self._scheduled = None

    def resumeProducing(self):
        self.paused = False
        self.target.producer_paused = False
        self._schedule()

    def _schedule(self):
        if self._scheduled is None and not self.stopped:
            self._scheduled = reactor.callLater(0, self._run)

    def _run(self):
        self._scheduled = None
        for _ in range(16):
            if self.paused or self.stopped:
                return
            if self.left <= 0:
                self.stopped = True
                self.request.unregisterProducer()
                self.request.finish()
                return
            n = min(self.left, len(_CHUNK))
            self.left -= n
            self.target.sent += n
            self.request.write(_CHUNK if n == len(_CHUNK) else _CHUNK[:n])
        self._schedule()

    def pauseProducing(self):
        self.paused = True
        self.target.producer_paused = True
        self.target.pauses += 1

    def stopProducing(self):
        self.stopped = True


def expected_bytes(size):
    """The bytes `/bytes/<size>` sends (for comparisons)."""
    reps, rest = divmod(size, len(_CHUNK))
    return _CHUNK * reps + _CHUNK[:rest]


class HTTPTarget:
    """A twisted.web target on port 0 (see `EchoResource`)."""

    def __init__(self):
        self.requests = []
        self.channels = []
        self.hanging = []
        self.sent = 0
        self.pauses = 0
        self.producer_paused = False

    @defer.inlineCallbacks
    def start(self):
        site = server.Site(EchoResource(self))
        site.noisy = False
        site.log = lambda request: None
        self.listening = yield TCP4ServerEndpoint(reactor, 0, interface=HOST).listen(site)
        self.port = self.listening.getHost().port
        self.url = f"http://{HOST}:{self.port}"
        return self

    def stop(self):
        for request in self.hanging:
            if not request.finished and not request._disconnected:
                request.finish()
        return self.listening.stopListening()


class _RawTargetProtocol(protocol.Protocol):
    def connectionMade(self):
        self.factory.connections.append(self)
        self.factory.on_connect(self)

    def dataReceived(self, data):
        self.factory.on_data(self, data)


class RawTarget(protocol.Factory):
    """A TCP target whose behaviour is given by callbacks (for malformed answers)."""

    protocol = _RawTargetProtocol

    def __init__(self, on_connect=None, on_data=None):
        self.connections = []
        self.on_connect = on_connect or (lambda p: None)
        self.on_data = on_data or (lambda p, d: None)

    @defer.inlineCallbacks
    def start(self):
        self.listening = yield TCP4ServerEndpoint(reactor, 0, interface=HOST).listen(self)
        self.port = self.listening.getHost().port
        self.url = f"http://{HOST}:{self.port}"
        return self

    def stop(self):
        for p in self.connections:
            p.transport.abortConnection()
        return self.listening.stopListening()


class _EchoWS(WebSocketServerProtocol):
    def onOpen(self):
        self.sendMessage(b"ws echo connected", isBinary=False)

    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)


class WSTarget:
    """An autobahn echo server greeting with ``ws echo connected``."""

    @defer.inlineCallbacks
    def start(self):
        factory = WebSocketServerFactory()
        factory.protocol = _EchoWS
        factory.noisy = False
        self.listening = yield TCP4ServerEndpoint(reactor, 0, interface=HOST).listen(factory)
        self.port = self.listening.getHost().port
        self.url = f"http://{HOST}:{self.port}"
        return self

    def stop(self):
        return self.listening.stopListening()


class WSClient(WebSocketClientProtocol):
    def __init__(self):
        super().__init__()
        self.messages = []
        self.opened = defer.Deferred()
        self.closed = defer.Deferred()
        self._waiters = []

    def onOpen(self):
        self.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.messages.append(payload)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(payload)

    def next_message(self):
        d = defer.Deferred()
        self._waiters.append(d)
        return within(d)

    def onClose(self, wasClean, code, reason):
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"WebSocket failed: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback((code, reason))


@defer.inlineCallbacks
def ws_connect(port, url):
    """An autobahn client for ``url`` over a TCP connection to 127.0.0.1:``port``."""
    factory = WebSocketClientFactory(url)
    factory.protocol = WSClient
    factory.noisy = False
    proto = yield within(TCP4ClientEndpoint(reactor, HOST, port).connect(factory))
    return proto


@defer.inlineCallbacks
def raw_ws(case, server, tunnel_id):
    """A bare autobahn client authorised on a new tunnel's endpoint (no multiplexer of its
    own), aborted at ``case``'s cleanup; returns (it, the server's connection for it)."""
    api = yield make_tunnel(server, tunnel_id, "http://127.0.0.1:1")
    info = yield api.read_tunnel(tunnel_id)
    ws = yield ws_connect(server.port, info["transport"]["ws"]["url"])
    case.addCleanup(ws.transport.abortConnection)
    yield within(ws.opened)
    yield wait_until(lambda: server.local_connections(tunnel_id))
    return ws, server.local_connections(tunnel_id)[0]


# -- a raw HTTP client -------------------------------------------------------------


class RawHTTP(protocol.Protocol):
    """Sends bytes as given; parses responses with `httphead.ResponseParser`."""

    def __init__(self, keep_body=True, hash_body=False):
        self.parser = httphead.ResponseParser()
        self.keep_body = keep_body
        self.hash_body = hash_body
        self.responses = []  # [head, body bytes or size, sha256]
        self._current = None
        self._waiters = []
        self.received = []
        self.raw = False
        self.closed = defer.Deferred()
        self.body_bytes = 0

    def request(self, data, method=b"GET"):
        self.parser.expect(method)
        self.transport.write(data)

    def dataReceived(self, data):
        self.received.append(data)
        if self.raw:
            return
        try:
            events = self.parser.feed(data)
        except httphead.HeadError as e:
            self.error = e
            self.raw = True
            return
        for ev in events:
            t = type(ev)
            if t is httphead.Head:
                if ev.head.is_interim:
                    continue
                self._current = [ev.head, [] if self.keep_body else 0, hashlib.sha256() if self.hash_body else None]
            elif t is httphead.Body or t is httphead.Raw:
                cur = self._current
                self.body_bytes += len(ev.data)
                if cur is None:
                    continue
                if self.keep_body:
                    cur[1].append(bytes(ev.data))
                else:
                    cur[1] += len(ev.data)
                if cur[2] is not None:
                    cur[2].update(ev.data)
            elif t is httphead.End:
                self._finish()

    def _finish(self):
        cur, self._current = self._current, None
        if cur is None:
            return
        head, body, h = cur
        if self.keep_body:
            body = b"".join(body)
            if head.chunked:
                body = dechunk(body)
        self.responses.append((head, body, h.hexdigest() if h is not None else None))
        self._notify()

    def _notify(self):
        for item in list(self._waiters):
            n, d = item
            if len(self.responses) >= n:
                self._waiters.remove(item)
                d.callback(self.responses[n - 1])

    def response(self, n=None, seconds=10):
        """Deferred of the ``n``-th response (1-based; default: the next one)."""
        if n is None:
            n = len(self.responses) + 1 + sum(1 for _ in self._waiters)
        d = defer.Deferred()
        self._waiters.append((n, d))
        self._notify()
        return within(d, seconds)

    @property
    def data(self):
        return b"".join(self.received)

    def connectionLost(self, reason):
        try:
            for ev in self.parser.feed_eof():
                if type(ev) is httphead.End:
                    self._finish()
        except httphead.HeadError:
            pass
        for n, d in self._waiters:
            d.errback(ConnectionError("connection closed before response %d" % n))
        self._waiters = []
        self.closed.callback(reason.value)


def dechunk(data):
    out, pos = [], 0
    while True:
        eol = data.index(b"\r\n", pos)
        size = int(data[pos:eol].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(data[eol + 2:eol + 2 + size])
        pos = eol + 2 + size + 2


@defer.inlineCallbacks
def raw_connect(port, **kw):
    proto = RawHTTP(**kw)
    yield within(TCP4ClientEndpoint(reactor, HOST, port).connect(_Once(proto)))
    return proto


class _Once(protocol.Factory):
    def __init__(self, proto):
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto


def request(method, target, host, headers=(), body=None, version=b"HTTP/1.1"):
    lines = [b"%s %s %s" % (method, target, version), b"Host: " + host.encode()]
    lines += [b"%s: %s" % (k, v) for k, v in headers]
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


@implementer(IPullProducer)
class ChunkedUpload:
    """Pull producer writing ``size`` bytes as a chunked body, 64 KiB per chunk."""

    def __init__(self, transport, size, chunk=64 * 1024):
        self.transport = transport
        self.left = size
        self.block = os.urandom(chunk)
        self.hash = hashlib.sha256()
        self.done = defer.Deferred()

    def resumeProducing(self):
        if self.left <= 0:
            return
        n = min(self.left, len(self.block))
        data = self.block[:n]
        self.left -= n
        self.hash.update(data)
        self.transport.write(b"%x\r\n" % n + data + b"\r\n")
        if self.left <= 0:
            self.transport.write(b"0\r\n\r\n")
            self.transport.unregisterProducer()
            self.done.callback(self.hash.hexdigest())

    def stopProducing(self):
        self.left = 0


# -- subprocesses --------------------------------------------------------------------


class Proc(protocol.ProcessProtocol):
    def __init__(self):
        self.out = []
        self.ended = defer.Deferred()
        self._waiters = []

    def outReceived(self, data):
        self.out.append(data)
        text = self.output
        for item in list(self._waiters):
            pattern, d = item
            m = re.search(pattern, text)
            if m:
                self._waiters.remove(item)
                d.callback(m)

    errReceived = outReceived

    @property
    def output(self):
        return b"".join(self.out)

    def wait_for(self, pattern, seconds=20):
        d = defer.Deferred()
        m = re.search(pattern, self.output)
        if m:
            d.callback(m)
        else:
            self._waiters.append((pattern, d))
        return within(d, seconds)

    def processEnded(self, reason):
        for _, d in self._waiters:
            if not d.called:
                d.errback(ConnectionError("process ended:\n" + self.output.decode(errors="replace")[-2000:]))
        self._waiters = []
        self.ended.callback(reason.value.exitCode)

    def kill(self, sig="KILL"):
        try:
            self.transport.signalProcess(sig)
        except error.ProcessExitedAlready:
            pass
        return within(self.ended, 15)

    @property
    def pid(self):
        return self.transport.pid


def _env():
    e = {k: v for k, v in os.environ.items() if not k.startswith("EXPOSR_")}
    e["EXPOSR_SHUTDOWN_GRACE"] = "0"  # tests stop their servers at once
    return e


def spawn(*argv):
    proc = Proc()
    reactor.spawnProcess(proc, sys.executable, [sys.executable, *argv], env=_env(), path=os.getcwd())
    return proc


@defer.inlineCallbacks
def exposrd_process(*options):
    """`exposrd` as a subprocess on port 0; returns (proc, port)."""
    proc = spawn("-c", "from exposr.script import main; main()",
                 "--allow-registration", "--ingress-http-url", "http://localhost",
                 "--api-port", "0", "--ingress-http-port", "0", "--listen-address", HOST, *options)
    m = yield proc.wait_for(rb'api listening on [0-9.]+:(\d+)', 30)
    return proc, int(m.group(1))


def exposr_process(server_url, tunnel_id, target_url):
    """The `exposr tunnel connect` CLI as a subprocess."""
    return spawn("-c", "from exposr.client.cli import main; main()", "-s", server_url,
                 "tunnel", "connect", tunnel_id, target_url)


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


__all__ = [name for name in dir() if not name.startswith("_")] + ["signal"]


class RawClient(protocol.Protocol):
    """Writes ``data`` on connect, keeps what it receives; ``closed`` fires with the reason."""

    def __init__(self, data=b""):
        self.data = data
        self.received = b""
        self.closed = defer.Deferred()

    def connectionMade(self):
        if self.data:
            self.transport.write(self.data)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback(reason.value)


@defer.inlineCallbacks
def raw_bytes_connect(port, data=b""):
    """A `RawClient` connected to 127.0.0.1:``port``."""
    proto = RawClient(data)
    yield within(TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(_Once(proto)))
    return proto
