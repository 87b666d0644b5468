"""Over real sockets: refused upgrades, slow clients and protocol hygiene on the HTTP paths.

Each test drives an in-process server (`e2e.Server`, port 0) from a raw TCP
client; timeouts are set small on the running parts, and every wait is bounded
(`within`).
"""

from twisted.internet import defer, task
from twisted.trial import unittest

from tests import e2e_support as e2e
from tests.e2e_support import within

TID = "hard-tunnel"
UPGRADE = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]


class _HeadsTarget:
    """A raw target that answers every request head (no bodies) with ``answer``.

    ``heads`` collects every head received, as bytes, on any connection.
    """

    def __init__(self, answer=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"):
        # (a POST is never answered: its body is awaited)
        self.heads = []
        self.answer = answer
        self.buffers = {}
        self.target = e2e.RawTarget(on_data=self._data)

    def _data(self, p, data):
        buf = self.buffers.get(p, b"") + data
        while b"\r\n\r\n" in buf:
            head, buf = buf.split(b"\r\n\r\n", 1)
            self.heads.append(head)
            if head.startswith(b"POST "):
                continue
            answer = self.answer(head) if callable(self.answer) else self.answer
            p.transport.write(answer)
        self.buffers[p] = buf

    @defer.inlineCallbacks
    def start(self):
        yield self.target.start()
        self.url = self.target.url
        return self

    def stop(self):
        return self.target.stop()


def _header(head, name):
    """Values of header ``name`` (lower-case bytes) in a raw head."""
    out = []
    for line in head.split(b"\r\n")[1:]:
        n, _, v = line.partition(b":")
        if n.strip().lower() == name:
            out.append(v.strip())
    return out


def trickle(conn, data=b"x", interval=0.05):
    """Write ``data`` every ``interval`` seconds until the connection closes."""
    loop = task.LoopingCall(lambda: conn.transport.write(data))
    loop.start(interval, now=False)
    conn.closed.addBoth(lambda r: loop.running and loop.stop() or r)
    return loop


class _Base(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.addCleanup(e2e.autobahn_settled)
        # the test client is an untrusted peer: its X-Forwarded-For is not believed
        self.server = yield e2e.Server(ingress_http_trusted_proxies=()).start()
        self.addCleanup(self.server.stop)

    @defer.inlineCallbacks
    def serve(self, target_url):
        connector = yield e2e.connect_client(self.server, TID, target_url)
        self.addCleanup(lambda: within(connector.stop()))

    def req(self, method, target, **kw):
        return e2e.request(method, target, self.server.host(TID), **kw)

    @defer.inlineCallbacks
    def connect(self, port=None):
        conn = yield e2e.raw_connect(port or self.server.port)
        self.addCleanup(conn.transport.abortConnection)
        return conn


class RefusedUpgradeTests(_Base):
    @defer.inlineCallbacks
    def test_upgrade_answered_200_keeps_parsing_http(self):
        """A refused upgrade (200, not 101) leaves the connection in HTTP: the next request is rewritten."""
        target = yield _HeadsTarget().start()
        self.addCleanup(target.stop)
        yield self.serve(target.url)
        conn = yield self.connect()
        conn.request(self.req(b"GET", b"/ws", headers=UPGRADE))
        head, body, _ = yield conn.response()
        self.assertEqual((head.status, body), (200, b"ok"))
        spoofed = [(b"X-Forwarded-For", b"198.51.100.66"), (b"exposr-via", b"spoofed-node")]
        conn.request(self.req(b"GET", b"/second", headers=spoofed))
        head, body, _ = yield conn.response()
        self.assertEqual((head.status, body), (200, b"ok"))
        second = [h for h in target.heads if h.startswith(b"GET /second ")]
        self.assertEqual(len(second), 1, target.heads)
        self.assertEqual(_header(second[0], b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(_header(second[0], b"exposr-via"), [self.server.node_id.encode() + b",spoofed-node"])

    @defer.inlineCallbacks
    def test_upgrade_answered_101_is_spliced_raw(self):
        """A 101 switches the connection to raw bytes both ways, bytes sent with the 101 included."""
        def answer(head):
            return b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\nhello"

        target = yield _HeadsTarget(answer).start()
        self.addCleanup(target.stop)
        yield self.serve(target.url)
        conn = yield self.connect()
        conn.request(self.req(b"GET", b"/ws", headers=UPGRADE))
        yield e2e.wait_until(lambda: conn.data.endswith(b"hello"))
        self.assertTrue(conn.data.startswith(b"HTTP/1.1 101 "))
        # raw from now on: bytes that look like a head reach the target as sent
        conn.transport.write(b"GET /raw HTTP/1.1\r\nX-Forwarded-For: 198.51.100.66\r\n\r\n")
        yield e2e.wait_until(lambda: any(h.startswith(b"GET /raw ") for h in target.heads))
        raw = [h for h in target.heads if h.startswith(b"GET /raw ")][0]
        self.assertEqual(_header(raw, b"x-forwarded-for"), [b"198.51.100.66"])


class SlowClientTests(_Base):
    @defer.inlineCallbacks
    def test_ingress_body_trickle_is_cut(self):
        """A request body trickled below the minimum rate is cut after the body timeout."""
        target = yield _HeadsTarget().start()
        self.addCleanup(target.stop)
        yield self.serve(target.url)
        self.server.ingress.body_timeout = 0.3
        self.server.ingress.body_min_rate = 100  # the trickle brings 20 bytes/s
        conn = yield self.connect()
        conn.transport.write(self.req(b"POST", b"/upload", headers=[(b"Content-Length", b"100000")]))
        trickle(conn)
        yield within(conn.closed, 10)

    @defer.inlineCallbacks
    def test_ingress_idle_upgraded_stream_is_cut(self):
        """An upgraded stream with no byte either way is closed after the tunnel idle timeout."""
        def answer(head):
            return b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n"

        target = yield _HeadsTarget(answer).start()
        self.addCleanup(target.stop)
        yield self.serve(target.url)
        self.server.ingress.tunnel_idle_timeout = 0.3
        conn = yield self.connect()
        conn.request(self.req(b"GET", b"/ws", headers=UPGRADE))
        yield e2e.wait_until(lambda: conn.data.startswith(b"HTTP/1.1 101 "))
        yield within(conn.closed, 10)

    @defer.inlineCallbacks
    def test_api_second_head_trickle_is_cut(self):
        """On a kept-alive API connection, a head trickled past the head timeout is cut."""
        self.server.door.site.head_timeout = 0.3
        conn = yield self.connect()
        host = b"Host: 127.0.0.1:%d\r\n" % self.server.port
        conn.request(b"GET /v1/nothing HTTP/1.1\r\n" + host + b"\r\n")
        head, _, _ = yield conn.response()
        self.assertEqual(head.status, 404)
        conn.transport.write(b"GET /v1/nothing HTTP/1.1\r\n" + host)
        trickle(conn, b"X")
        yield within(conn.closed, 10)

    @defer.inlineCallbacks
    def test_api_body_trickle_is_cut(self):
        """An API request body trickled below the minimum rate is cut after the body timeout."""
        self.server.door.site.body_timeout = 0.3
        self.server.door.site.body_min_rate = 100  # the trickle brings 20 bytes/s
        conn = yield self.connect()
        host = b"Host: 127.0.0.1:%d\r\n" % self.server.port
        conn.transport.write(b"POST /v1/account HTTP/1.1\r\n" + host + b"Content-Length: 60000\r\n\r\n")
        trickle(conn)
        yield within(conn.closed, 10)


class HygieneTests(_Base):
    @defer.inlineCallbacks
    def setUp(self):
        yield _Base.setUp(self)
        self.target = yield _HeadsTarget().start()
        self.addCleanup(self.target.stop)
        yield self.serve(self.target.url)

    @defer.inlineCallbacks
    def forwarded(self, data, path):
        """Send ``data``; the head the target received for ``path``."""
        conn = yield self.connect()
        conn.request(data)
        head, body, _ = yield conn.response()
        self.assertEqual((head.status, body), (200, b"ok"))
        heads = [h for h in self.target.heads if h.split(b" ")[1] == path]
        self.assertEqual(len(heads), 1, self.target.heads)
        return heads[0]

    @defer.inlineCallbacks
    def test_content_length_list_is_forwarded_as_one_value(self):
        head = yield self.forwarded(self.req(b"PUT", b"/cl", headers=[(b"Content-Length", b"5, 5")]) + b"hello", b"/cl")
        self.assertEqual(_header(head, b"content-length"), [b"5"])
        head = yield self.forwarded(self.req(b"PUT", b"/cl2", headers=[(b"Content-Length", b"5")] * 2) + b"hello",
                                    b"/cl2")
        self.assertEqual(_header(head, b"content-length"), [b"5"])
        conn = yield self.connect()
        conn.request(self.req(b"PUT", b"/cl3", headers=[(b"Content-Length", b"5, 6")]) + b"hello")
        head, _, _ = yield conn.response()
        self.assertEqual(head.status, 400)

    @defer.inlineCallbacks
    def test_hop_by_hop_headers_are_not_forwarded(self):
        hop = [(b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"s"), (b"Keep-Alive", b"timeout=5"),
               (b"TE", b"trailers"), (b"Proxy-Authorization", b"Basic eDp5"), (b"Upgrade", b"h2c"),
               (b"X-Kept", b"k")]
        head = yield self.forwarded(self.req(b"GET", b"/hop", headers=hop), b"/hop")
        for name in (b"connection", b"x-secret", b"keep-alive", b"te", b"proxy-authorization", b"upgrade"):
            self.assertEqual(_header(head, name), [], name)
        self.assertEqual(_header(head, b"x-kept"), [b"k"])

    @defer.inlineCallbacks
    def test_upgrade_keeps_connection_upgrade_only(self):
        up = [(b"Connection", b"keep-alive, Upgrade, X-Secret"), (b"Upgrade", b"websocket"), (b"X-Secret", b"s")]
        head = yield self.forwarded(self.req(b"GET", b"/up", headers=up), b"/up")
        self.assertEqual(_header(head, b"connection"), [b"Upgrade"])
        self.assertEqual(_header(head, b"upgrade"), [b"websocket"])
        self.assertEqual(_header(head, b"x-secret"), [])

    @defer.inlineCallbacks
    def test_absolute_form_is_routed_and_forwarded_by_its_authority(self):
        authority = self.server.host(TID).encode()
        data = b"GET http://" + authority + b"/abs?q=1 HTTP/1.1\r\nHost: elsewhere.localhost\r\n\r\n"
        head = yield self.forwarded(data, b"/abs?q=1")
        self.assertTrue(head.startswith(b"GET /abs?q=1 HTTP/1.1\r\n"), head)
        self.assertEqual(_header(head, b"x-forwarded-host"), [authority])


class TunnelIdTests(_Base):
    @defer.inlineCallbacks
    def api(self, data):
        conn = yield self.connect()
        conn.request(data, data.split(b" ", 1)[0])
        resp = yield conn.response()
        return resp

    @defer.inlineCallbacks
    def test_new_tunnel_id_longer_than_a_dns_label_is_refused(self):
        import base64
        import json

        host = b"Host: 127.0.0.1:%d\r\n" % self.server.port
        head, body, _ = yield self.api(b"POST /v1/account HTTP/1.1\r\n" + host + b"Content-Length: 0\r\n\r\n")
        self.assertEqual(head.status, 201)
        token = base64.b64encode(json.loads(body)["account_id"].encode())
        auth = b"Authorization: Bearer " + token + b"\r\n"
        for n, status in ((63, 200), (64, 400), (65, 400)):
            put = b"PUT /v1/tunnel/" + b"a" * n + b" HTTP/1.1\r\n" + host + auth
            head, body, _ = yield self.api(put + b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
            self.assertEqual(head.status, status, (n, body))
            if status == 400:
                self.assertEqual(json.loads(body)["error"], "BAD_INPUT")
