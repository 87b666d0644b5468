"""Test doubles for the client tests: recorded-API fake, ws-multiplex opener server, targets.

Everything listens on 127.0.0.1 port 0. Waiting is done with Deferreds that the
fakes fire, each bounded by `within` (no sleeps).
"""

import json
import os
import re

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.web import resource, server
from zope.interface import implementer

from exposr.transport import multiplex

VECTORS = os.environ.get("EXPOSR_VECTORS", os.path.join(os.path.dirname(__file__), "vectors"))
TIMEOUT = 5.0


def within(d, seconds=TIMEOUT):
    """Bound a Deferred in real time (fails with TimeoutError)."""
    return d.addTimeout(seconds, reactor)


def until(predicate, seconds=TIMEOUT):
    """Deferred firing once ``predicate()`` holds, checked every reactor turn (bounded)."""
    d = defer.Deferred()

    def check():
        if d.called:
            return
        if predicate():
            d.callback(None)
        else:
            reactor.callLater(0.005, check)

    check()
    return within(d, seconds)


# -- the recordings ---------------------------------------------------------------------


def parse_session(name):
    """Exchanges of a vectors file: dicts method, path, headers, body, status, resp_body."""
    path = os.path.join(VECTORS, name)
    exchanges, cur, side = [], None, None
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n")
            m = re.match(r"^  >>> (\S+) (\S+) HTTP/1\.1$", line)
            if m:
                cur = {"method": m.group(1), "path": m.group(2), "headers": {}, "body": None,
                       "status": None, "resp_headers": {}, "resp_body": None}
                exchanges.append(cur)
                side = "req"
                continue
            m = re.match(r"^  <<< HTTP/1\.1 (\d+)", line)
            if m and cur is not None:
                cur["status"] = int(m.group(1))
                side = "resp"
                continue
            if line.startswith("  ---") or line.startswith("====") or line.startswith("CONNECTION"):
                side = None
                continue
            if cur is None or side is None:
                continue
            m = re.match(r"^      ([A-Za-z-]+): (.*)$", line)
            if m:
                cur["headers" if side == "req" else "resp_headers"][m.group(1).lower()] = m.group(2)
                continue
            m = re.match(r"^    body: (.*)$", line)
            if m:
                cur["body" if side == "req" else "resp_body"] = m.group(1)
    return [e for e in exchanges if not e["path"].endswith("/ws-endpoint") and
            "ws-endpoint?" not in e["path"] and e["path"].startswith("/v1/")]


# -- a fake API that answers with recorded responses ------------------------------------------


class FakeApi(resource.Resource):
    """
    Records every request; answers ``(method, path)`` with the queued responses
    (the last one repeats). ``localhost:8080`` in bodies becomes this server's
    address. Upgrades to ``.../ws-endpoint`` go to ``ws`` (a `WSHub`).
    """

    isLeaf = True

    def __init__(self, ws=None):
        super().__init__()
        self.requests = []
        self.responses = {}
        self.ws = ws
        self.host = None
        self.hang = False
        self._ws_resource = WebSocketResource(ws.factory) if ws is not None else None

    def add(self, method, path, status, body, content_type="application/json; charset=utf-8"):
        if isinstance(body, (dict, list)):
            body = json.dumps(body, separators=(",", ":"))
        self.responses.setdefault((method, path), []).append((status, body, content_type))

    def add_recorded(self, exchanges):
        for e in exchanges:
            ctype = e["resp_headers"].get("content-type", "application/json; charset=utf-8")
            self.add(e["method"], e["path"], e["status"], e["resp_body"] or "", ctype)

    def render(self, request):
        path = request.uri.decode()
        if path.split("?")[0].endswith("/ws-endpoint") and self._ws_resource is not None:
            self.ws.upgrade_paths.append(path)
            return self._ws_resource.render(request)
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        body = request.content.read().decode()
        self.requests.append({"method": request.method.decode(), "path": path,
                              "headers": headers, "body": body or None})
        if self.hang:
            return server.NOT_DONE_YET
        queue = self.responses.get((request.method.decode(), path))
        if not queue:
            request.setResponseCode(404)
            request.setHeader("content-type", "text/plain; charset=utf-8")
            return b"Not Found"
        status, body, ctype = queue.pop(0) if len(queue) > 1 else queue[0]
        request.setResponseCode(status)
        if status != 204:
            request.setHeader("content-type", ctype)
            return body.replace("localhost:8080", self.host).encode()
        return b""

    def listen(self, tls=False):
        site = server.Site(self)
        site.noisy = False
        if tls:
            port = reactor.listenSSL(0, site, self_signed(), interface="127.0.0.1")
        else:
            port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.host = f"127.0.0.1:{port.getHost().port}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        return port


# -- the tunnel server side: autobahn + the multiplexer as OPENER ----------------------------


class Probe:
    """Server-side view of one channel: collected bytes and events as Deferreds."""

    def __init__(self, channel):
        self.channel = channel
        self.data = bytearray()
        self.acked = defer.Deferred()
        self.closed = defer.Deferred()
        self.paused = defer.Deferred()
        self.resumed = defer.Deferred()
        self._waiters = []
        channel.on_open = lambda: self.acked.callback(channel)
        channel.on_data = self._data
        channel.on_close = self._close
        channel.on_pause = lambda: self.paused.called or self.paused.callback(None)
        channel.on_resume = lambda: self.resumed.called or self.resumed.callback(None)

    def _data(self, data):
        self.data += data
        for w in list(self._waiters):
            pred, d = w
            if pred(bytes(self.data)):
                self._waiters.remove(w)
                d.callback(bytes(self.data))

    def _close(self, error):
        if not self.closed.called:
            self.closed.callback(error)

    def wait_for(self, pred):
        d = defer.Deferred()
        if pred(bytes(self.data)):
            d.callback(bytes(self.data))
        else:
            self._waiters.append((pred, d))
        return within(d)

    def wait_bytes(self, n):
        return self.wait_for(lambda data: len(data) >= n)


class ServerWS(WebSocketServerProtocol):
    def onConnect(self, request):
        token = (request.params.get("t") or [None])[0]
        self.hub.tokens.append(token)
        if self.hub.valid_tokens is not None and token not in self.hub.valid_tokens:
            raise ConnectionDeny(401, "Unauthorized")
        return None

    def onOpen(self):
        self.mux = multiplex.Multiplexer(self._send, role=multiplex.SERVER, clock=reactor)
        self.closed = defer.Deferred()
        self.pings = 0
        self.hub._opened(self)

    def _send(self, data):
        if self.state == self.STATE_OPEN:
            self.sendMessage(data, isBinary=True)

    def onMessage(self, payload, isBinary):
        self.mux.receive(payload)

    def onPing(self, payload):
        self.pings += 1
        if self.hub.answer_pings:
            super().onPing(payload)

    def onClose(self, wasClean, code, reason):
        if getattr(self, "mux", None) is not None:
            self.mux.teardown(multiplex.ERR_WS_SOCKET_CLOSED_UNEXPECTEDLY)
            if not self.closed.called:
                self.closed.callback((code, reason))

    def open(self):
        return Probe(self.mux.open_channel())


class WSHub:
    """The WebSocket endpoint of the fake server; hands out opened connections."""

    def __init__(self):
        self.factory = WebSocketServerFactory()
        self.factory.setProtocolOptions(perMessageCompressionAccept=lambda offers: None)
        hub = self

        class P(ServerWS):
            pass

        P.hub = hub
        self.factory.protocol = P
        self.connections = []
        self.tokens = []
        self.upgrade_paths = []
        self.valid_tokens = None
        self.answer_pings = True
        self._waiters = []

    def _opened(self, ws):
        self.connections.append(ws)
        if self._waiters:
            self._waiters.pop(0).callback(ws)

    def next_connection(self, index=None):
        """Deferred firing with connection number `index` (default: the next one)."""
        index = len(self.connections) + len(self._waiters) if index is None else index
        if index < len(self.connections):
            return defer.succeed(self.connections[index])
        d = defer.Deferred()
        self._waiters.append(d)
        return within(d)


def tunnel_info(host, tunnel_id="demo-tunnel", token="tok1", max_connections=1,
                target="http://127.0.0.1:9000/", ingress=True, scheme="ws"):
    info = {
        "id": tunnel_id,
        "connection": {"connected": False, "connections": 0},
        "transport": {"max_connections": max_connections,
                      "ws": {"enabled": True,
                             "url": f"{scheme}://{host}/v1/tunnel/{tunnel_id}/ws-endpoint?t={token}"}},
        "ingress": {"http": {"enabled": True, "url": f"http://{tunnel_id}.example.com/",
                             "urls": [f"http://{tunnel_id}.example.com/"], "alt_names": []}
                    if ingress else {}, "sni": {}},
        "target": {"url": target} if target else {},
    }
    return info


# -- targets ------------------------------------------------------------------------------


class Echo(Protocol):
    def connectionMade(self):
        self.factory.connections.append(self)

    def dataReceived(self, data):
        self.transport.write(data)

    def connectionLost(self, reason):
        self.factory.lost.append(reason)
        for d in self.factory.lost_waiters:
            d.callback(None)
        self.factory.lost_waiters = []


def echo_factory():
    f = Factory.forProtocol(Echo)
    f.connections, f.lost, f.lost_waiters = [], [], []
    return f


@implementer(IPushProducer)
class Flood(Protocol):
    """Writes 64 KiB chunks as fast as its transport accepts them; reads nothing."""

    chunk = b"x" * 65536

    def connectionMade(self):
        self.sent = 0
        self.paused = False
        self.stopped = False
        self.factory.instances.append(self)
        self.transport.registerProducer(self, True)
        if self.factory.on_connect is not None:
            self.factory.on_connect.callback(self)
        self.resumeProducing()

    def pauseProducing(self):
        self.paused = True
        for d in self.factory.pause_waiters:
            d.callback(self)
        self.factory.pause_waiters = []

    def resumeProducing(self):
        self.paused = False
        for d in self.factory.resume_waiters:
            d.callback(self)
        self.factory.resume_waiters = []
        while not self.paused and not self.stopped and self.sent < self.factory.limit:
            self.transport.write(self.chunk)
            self.sent += len(self.chunk)

    def stopProducing(self):
        self.stopped = True


def flood_factory(limit=256 * 1024 * 1024):
    f = Factory.forProtocol(Flood)
    f.instances, f.pause_waiters, f.resume_waiters = [], [], []
    f.on_connect = defer.Deferred()
    f.limit = limit
    return f


class Sink(Protocol):
    """Does not read until told to (its transport is paused on connect)."""

    def connectionMade(self):
        self.received = 0
        self.transport.pauseProducing()
        self.factory.on_connect.callback(self)

    def dataReceived(self, data):
        self.received += len(data)


def sink_factory():
    f = Factory.forProtocol(Sink)
    f.on_connect = defer.Deferred()
    return f


# -- TLS ----------------------------------------------------------------------------------------


def self_signed(hostname="127.0.0.1"):
    """A throwaway self-signed certificate: ``CertificateOptions`` for a TLS server."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from twisted.internet import ssl

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(hostname))]), critical=False)
            .sign(key, hashes.SHA256()))
    return ssl.CertificateOptions(privateKey=key, certificate=cert,
                                  acceptableProtocols=[b"http/1.1"])


def listen_tls(factory, testcase):
    port = reactor.listenSSL(0, factory, self_signed(), interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return port.getHost().port


@defer.inlineCallbacks
def real_server_and_target(case, body=b"hello", **config):
    """An in-process exposrd on port 0 and a twisted.web target serving ``/hello``.

    Sets ``case.service``, ``case.port``, ``case.server_url`` and ``case.target_url``;
    both stop at the end of the test.
    """
    from twisted.web import resource, server, static

    from exposr.config import Config
    from exposr.server import ExposrService

    config = Config(**{"api_port": 0, "ingress_http_port": 0, "admin_port": 0, "admin_api_port": 0,
                       "ingress_http_url": "http://localhost.test", "allow_registration": True, **config})
    case.service = ExposrService(config, reactor)
    case.service.startService()
    case.addCleanup(case.service.stopService)
    yield within(case.service.when_started())
    case.port = case.service.listeners["api"].port.getHost().port
    case.server_url = f"http://127.0.0.1:{case.port}/"
    root = resource.Resource()
    root.putChild(b"hello", static.Data(body, "text/plain"))
    target = reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")
    case.addCleanup(target.stopListening)
    case.target_url = f"http://127.0.0.1:{target.getHost().port}"
