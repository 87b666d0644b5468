"""TunnelConnector against an autobahn + ws-multiplex OPENER server and real targets."""

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web import resource, server, static

from exposr.client import connect
from exposr.client.connect import TunnelClosed, TunnelConnector, target_endpoint
from exposr.client.rest import ApiClient, account_token
from exposr.transport import multiplex
from tests.test_client_fakes import (FakeApi, WSHub, echo_factory, flood_factory, listen_tls,
                                     sink_factory, tunnel_info, until, within)

ACCOUNT = "F4PJ-RKCH-96WR-JDJ2"


class _Base(unittest.TestCase):
    max_connections = 1
    tls = False

    def setUp(self):
        self.hub = WSHub()
        self.api = FakeApi(self.hub)
        port = self.api.listen(tls=self.tls)
        self.addCleanup(port.stopListening)
        self.api.add("GET", f"/v1/account/{ACCOUNT}/token", 201,
                     {"token": account_token(ACCOUNT)})
        self.clock = task.Clock()

    def listen(self, factory):
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def set_info(self, target, tokens=("tok1",)):
        for tok in tokens:
            self.api.add("GET", "/v1/tunnel/t1234", 200,
                         tunnel_info(self.api.host, "t1234", tok, self.max_connections, target,
                                     scheme="wss" if self.tls else "ws"))

    @defer.inlineCallbacks
    def connector(self, target, **kw):
        self.set_info(target, kw.pop("tokens", ("tok1",)))
        api = ApiClient(reactor, self.api.url, ACCOUNT, insecure=kw.get("insecure", False))
        c = TunnelConnector(reactor, api, "t1234", clock=self.clock, **kw)
        self.addCleanup(self.stop, c)
        info = yield within(c.start())
        self.assertEqual(info["id"], "t1234")
        ws = yield self.hub.next_connection(0)
        yield until(lambda: ws.pings >= 1)  # the client pings on open
        return c, ws

    def stop(self, c):
        d = c.stop()
        # lingering server-side sockets close with the client's; bound it
        return within(d).addCallback(
            lambda _: defer.DeferredList([within(ws.closed) for ws in self.hub.connections]))


class SpliceTests(_Base):
    @defer.inlineCallbacks
    def test_echo(self):
        echo = echo_factory()
        port = self.listen(echo)
        c, ws = yield self.connector(f"tcp://127.0.0.1:{port}")
        probe = ws.open()
        ch = yield within(probe.acked)
        self.assertEqual(ch.remote, ch.id)  # lock-step numbering
        probe.channel.write(b"hello ")
        probe.channel.write(b"world")
        data = yield probe.wait_bytes(11)
        self.assertEqual(data, b"hello world")
        # big payload both ways
        blob = bytes(range(256)) * 4096  # 1 MiB
        probe.channel.write(blob)
        data = yield probe.wait_bytes(11 + len(blob))
        self.assertEqual(data[11:], blob)
        # server CLOSE -> the target connection ends
        lost = defer.Deferred()
        echo.lost_waiters.append(lost)
        probe.channel.close()
        yield within(lost)
        error = yield within(probe.closed)
        self.assertIsNone(error)

    @defer.inlineCallbacks
    def test_http_target_and_target_close(self):
        root = resource.Resource()
        root.putChild(b"hello", static.Data(b"hi there", "text/plain"))
        site = server.Site(root)
        port = self.listen(site)
        c, ws = yield self.connector(f"http://127.0.0.1:{port}/")
        probe = ws.open()
        probe.channel.write(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        error = yield within(probe.closed)  # the target closed -> CLOSE from the client
        self.assertIsNone(error)
        self.assertTrue(probe.data.startswith(b"HTTP/1.1 200 OK"))
        self.assertTrue(probe.data.endswith(b"hi there"))

    @defer.inlineCallbacks
    def test_two_channels(self):
        port = self.listen(echo_factory())
        c, ws = yield self.connector(f"tcp://127.0.0.1:{port}")
        p1, p2 = ws.open(), ws.open()
        p1.channel.write(b"one")
        p2.channel.write(b"two")
        self.assertEqual((yield p1.wait_bytes(3)), b"one")
        self.assertEqual((yield p2.wait_bytes(3)), b"two")

    @defer.inlineCallbacks
    def test_target_refused(self):
        probe_port = self.listen(echo_factory())
        c, ws = yield self.connector(f"tcp://127.0.0.1:{probe_port}")
        c.target_url = "tcp://127.0.0.1:1"
        probe = ws.open()
        yield within(probe.acked)  # ACKed first, then CLOSEd with an error
        error = yield within(probe.closed)
        self.assertEqual(error, multiplex.ERR_WSM_CHANNEL_CLOSED_BY_PEER)
        self.assertEqual(probe.channel.peer_error, "ECONNREFUSED")

    def test_target_endpoints(self):
        from twisted.internet.endpoints import HostnameEndpoint
        self.assertIsInstance(target_endpoint(reactor, "tcp://h:1"), HostnameEndpoint)
        self.assertIsInstance(target_endpoint(reactor, "http://h/"), HostnameEndpoint)
        for url in ("https://h/", "tls://h:2", "tcps://h:3", "wss://h/"):
            self.assertNotIsInstance(target_endpoint(reactor, url), HostnameEndpoint)
        self.assertRaises(ValueError, target_endpoint, reactor, "ftp://h/")
        self.assertRaises(ValueError, target_endpoint, reactor, "tcp://h")


class BackpressureTests(_Base):
    @defer.inlineCallbacks
    def test_server_pause_stops_target_reads(self):
        flood = flood_factory()
        port = self.listen(flood)
        c, ws = yield self.connector(f"tcp://127.0.0.1:{port}")
        probe = ws.open()
        yield within(flood.on_connect)
        yield probe.wait_bytes(256 * 1024)
        splice, = c.connections[0].splices
        target_socket = splice.target.transport
        self.assertIn(target_socket, reactor.getReaders())
        probe.channel.pause()  # PAUSE: the client stops reading the target
        yield until(lambda: target_socket not in reactor.getReaders())
        received = len(probe.data)
        probe.channel.resume()  # RESUME: it reads again and data flows
        yield until(lambda: target_socket in reactor.getReaders())
        yield probe.wait_bytes(received + 1024 * 1024)

    @defer.inlineCallbacks
    def test_websocket_backpressure_stops_target_reads(self):
        flood = flood_factory()
        port = self.listen(flood)
        c, ws = yield self.connector(f"tcp://127.0.0.1:{port}")
        probe = ws.open()
        yield within(flood.on_connect)
        yield probe.wait_bytes(64 * 1024)
        conn = c.connections[0]
        splice, = conn.splices
        target_socket = splice.target.transport
        ws.transport.pauseProducing()  # the server stops reading the WebSocket
        yield until(lambda: conn.carrier_paused, 20)  # the client's WS send buffer fills
        self.assertNotIn(target_socket, reactor.getReaders())
        self.assertFalse(probe.paused.called)  # no PAUSE involved
        received = len(probe.data)
        ws.transport.resumeProducing()
        yield until(lambda: not conn.carrier_paused, 20)
        yield probe.wait_bytes(received + 1024 * 1024)

    @defer.inlineCallbacks
    def test_slow_target_pauses_channel(self):
        sink = sink_factory()
        port = self.listen(sink)
        c, ws = yield self.connector(f"tcp://127.0.0.1:{port}")
        probe = ws.open()
        target = yield within(sink.on_connect)
        chunk = b"y" * 65536

        def pump():
            # write until the client PAUSEs the channel (the mux buffers after that)
            if not probe.paused.called and not probe.closed.called:
                probe.channel.write(chunk)
                reactor.callLater(0, pump)

        pump()
        yield within(probe.paused, 20)
        target.transport.resumeProducing()  # the target reads again -> RESUME
        yield within(probe.resumed, 20)
        # the target socket still holds data when the tunnel goes: the sink reads
        # it before it sees the end; wait for that, or the reactor is not clean
        yield self.stop(c)
        yield until(lambda: not target.transport.connected, 20)

    @defer.inlineCallbacks
    def test_target_writes_keep_order_through_a_full_socket(self):
        # the splice sends straight to an idle target socket and falls back to
        # Twisted's buffer once the socket is full: the bytes stay in order
        sink = sink_factory()
        port = self.listen(sink)
        c, ws = yield self.connector(f"tcp://127.0.0.1:{port}")
        probe = ws.open()
        target = yield within(sink.on_connect)
        got = []
        target.dataReceived = got.append
        sent = []

        def pump():
            if not probe.paused.called and not probe.closed.called:
                chunk = bytes([len(sent) % 251]) * 65536 + len(sent).to_bytes(4, "big")
                sent.append(chunk)
                probe.channel.write(chunk)
                reactor.callLater(0, pump)

        pump()
        yield within(probe.paused, 20)
        splice, = c.connections[0].splices
        self.assertIsNotNone(splice._direct)
        self.assertTrue(splice._direct.dataBuffer or splice._direct._tempDataLen)  # it did fill up
        target.transport.resumeProducing()
        total = sum(map(len, sent))
        yield until(lambda: sum(map(len, got)) >= total, 20)
        self.assertEqual(b"".join(got), b"".join(sent))
        yield self.stop(c)
        yield until(lambda: not target.transport.connected, 20)


class ReconnectTests(_Base):
    @defer.inlineCallbacks
    def test_reconnect_after_drop(self):
        port = self.listen(echo_factory())
        c, ws = yield self.connector(f"tcp://127.0.0.1:{port}", tokens=("tok0", "tok1", "tok2"))
        self.assertEqual(self.hub.tokens, ["tok1"])
        n_requests = len(self.api.requests)
        ws.transport.abortConnection()  # the server drops the WebSocket
        yield within(ws.closed)
        slot = c.slots[0]
        yield until(lambda: slot.ws is None)  # the client notices the drop
        self.assertEqual(slot.timer.getTime(), self.clock.seconds() + connect.BACKOFF_INITIAL)
        self.clock.advance(connect.BACKOFF_INITIAL)
        ws2 = yield self.hub.next_connection(1)
        self.assertEqual(self.hub.tokens, ["tok1", "tok2"])  # fresh token
        # a fresh GET token + GET tunnel before the new attempt
        self.assertEqual([r["path"] for r in self.api.requests[n_requests:]],
                         [f"/v1/account/{ACCOUNT}/token", "/v1/tunnel/t1234"])
        probe = ws2.open()
        probe.channel.write(b"again")
        self.assertEqual((yield probe.wait_bytes(5)), b"again")

    @defer.inlineCallbacks
    def test_no_reconnect_after_1008(self):
        port = self.listen(echo_factory())
        c, ws = yield self.connector(f"tcp://127.0.0.1:{port}")
        ws.sendCloseFrame(1008, b"unable to establish tunnel")
        with self.assertRaises(TunnelClosed):
            yield within(c.finished)
        self.assertTrue(c.slots[0].done)
        self.assertIsNone(c.slots[0].timer)
        n = len(self.api.requests)
        self.clock.advance(60)
        self.assertEqual(len(self.hub.connections), 1)
        self.assertEqual(len(self.api.requests), n)

    @defer.inlineCallbacks
    def test_backoff_on_refused_handshake(self):
        self.hub.valid_tokens = {"good"}
        port = self.listen(echo_factory())
        self.set_info(f"tcp://127.0.0.1:{port}", ["bad", "bad", "bad", "good"])
        api = ApiClient(reactor, self.api.url, ACCOUNT)
        c = TunnelConnector(reactor, api, "t1234", clock=self.clock)
        self.addCleanup(self.stop, c)
        started = c.start()
        delays = []
        while not started.called:
            slot = c.slots[0] if c.slots else None
            if slot is not None and slot.timer is not None and slot.timer.active():
                delays.append(slot.timer.getTime() - self.clock.seconds())
                self.clock.advance(delays[-1])
            else:
                yield until(lambda: started.called or (
                    c.slots and c.slots[0].timer is not None and c.slots[0].timer.active()))
        self.assertEqual(len(delays), 2)  # the startup read used 'bad' too
        self.assertAlmostEqual(delays[0], 1.0)
        self.assertAlmostEqual(delays[1], 1.0 * connect.BACKOFF_FACTOR)
        yield self.hub.next_connection(0)
        self.assertEqual(self.hub.tokens[-1], "good")

    def test_backoff_limit(self):
        slot = connect._Slot(TunnelConnector(reactor, None, "t1234", clock=self.clock), 0)
        for _ in range(40):
            slot._retry()
            slot.timer.cancel()
        self.assertEqual(slot.delay, connect.BACKOFF_MAX)


class KeepAliveTests(_Base):
    @defer.inlineCallbacks
    def test_ping_timeout_drops_and_reconnects(self):
        self.hub.answer_pings = False
        port = self.listen(echo_factory())
        c, ws = yield self.connector(f"tcp://127.0.0.1:{port}", tokens=("tok1", "tok2"))
        self.clock.advance(multiplex.PING_INTERVAL)
        yield until(lambda: ws.pings >= 2)
        self.assertIsNotNone(c.slots[0].ws)
        self.clock.advance(multiplex.PING_INTERVAL)  # 20 s without a pong
        code, _ = yield within(ws.closed)
        self.assertEqual(code, 1006)  # dropped, no close handshake
        self.assertIsNone(c.slots[0].ws)
        self.clock.advance(connect.BACKOFF_INITIAL)
        yield self.hub.next_connection(1)

    @defer.inlineCallbacks
    def test_pongs_keep_it_alive(self):
        port = self.listen(echo_factory())
        c, ws = yield self.connector(f"tcp://127.0.0.1:{port}")
        for _ in range(4):
            pings = ws.pings
            self.clock.advance(multiplex.PING_INTERVAL)
            yield until(lambda: ws.pings > pings and
                        c.slots[0].ws._keepalive.last_pong == self.clock.seconds())
        self.assertIs(c.slots[0].ws, c.connections[0])
        self.assertFalse(ws.closed.called)


class StartStopTests(_Base):
    max_connections = 2

    @defer.inlineCallbacks
    def test_two_slots_and_stop(self):
        port = self.listen(echo_factory())
        c, ws = yield self.connector(f"tcp://127.0.0.1:{port}", tokens=("tok0", "tok1", "tok2"))
        yield within(c.wait_connections(2))
        self.assertEqual(self.hub.tokens, ["tok1", "tok2"])  # one at a time, fresh tokens
        yield within(c.stop())
        closes = yield defer.gatherResults([within(w.closed) for w in self.hub.connections])
        self.assertEqual([code for code, _ in closes], [1000, 1000])
        self.assertIsNone((yield c.finished))

    @defer.inlineCallbacks
    def test_fatal_api_error(self):
        self.api.add("GET", "/v1/tunnel/t1234", 404, {"error": "TUNNEL_NOT_FOUND"})
        api = ApiClient(reactor, self.api.url, ACCOUNT)
        c = TunnelConnector(reactor, api, "t1234", clock=self.clock)
        with self.assertRaises(Exception) as cm:
            yield within(c.start())
        self.assertEqual(cm.exception.code, "TUNNEL_NOT_FOUND")


class TLSTargetTests(_Base):
    @defer.inlineCallbacks
    def test_tls_target_insecure(self):
        port = listen_tls(echo_factory(), self)
        c, ws = yield self.connector(f"tls://127.0.0.1:{port}", insecure=True)
        probe = ws.open()
        probe.channel.write(b"secret")
        self.assertEqual((yield probe.wait_bytes(6)), b"secret")

    @defer.inlineCallbacks
    def test_tls_target_verified_by_default(self):
        port = listen_tls(echo_factory(), self)
        c, ws = yield self.connector(f"https://127.0.0.1:{port}/")
        probe = ws.open()
        probe.channel.write(b"GET / HTTP/1.1\r\n\r\n")
        error = yield within(probe.closed)  # self-signed: the handshake fails
        self.assertEqual(error, multiplex.ERR_WSM_CHANNEL_CLOSED_BY_PEER)
        self.assertEqual(probe.data, b"")


class SecureServerTests(_Base):
    """An https API and a wss endpoint with a self-signed certificate."""

    tls = True

    @defer.inlineCallbacks
    def test_wss_insecure(self):
        port = self.listen(echo_factory())
        c, ws = yield self.connector(f"tcp://127.0.0.1:{port}", insecure=True)
        probe = ws.open()
        probe.channel.write(b"over wss")
        self.assertEqual((yield probe.wait_bytes(8)), b"over wss")

    @defer.inlineCallbacks
    def test_https_verified_by_default(self):
        api = ApiClient(reactor, self.api.url, ACCOUNT)
        with self.assertRaises(Exception) as cm:
            yield within(api.refresh_token())
        self.assertEqual(cm.exception.code, "SERVER_UNREACHABLE")
