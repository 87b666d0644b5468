"""
The cluster buses: the single-node `LocalBus` on a `Clock`, and `RedisBus`
against the real Redis at 127.0.0.1:6379 on a channel of its own per test
(concurrent runs on this machine never see each other's messages).
"""

import hashlib
import hmac
import json
import os
import signal
import uuid

from twisted.internet import defer, reactor, task
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from exposr.cluster.bus import BusUnavailable, LocalBus
from exposr.cluster.envelope import encode
from exposr.cluster.interfaces import IEventBus
from exposr.cluster.redisbus import RedisAddress, RedisBus, parse_redis_url
from exposr.node import Node
from tests import procs

KEY = "cluster-key"
NODE_A = Node(id="a" * 40, host="100@node-a", ip="10.0.0.1")
NODE_B = Node(id="b" * 40, host="200@node-b", ip="10.0.0.2")
REDIS_URL = "redis://127.0.0.1:6379"


def within(d, seconds=10):
    return d.addTimeout(seconds, reactor)


class LogCapture:
    def __init__(self, test, namespace):
        self.events = []
        self.namespace = namespace
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event):
        if event.get("log_namespace") == self.namespace:
            self.events.append(event)

    def warnings(self):
        return [e for e in self.events if e["log_level"] == LogLevel.warn]


class LocalBusTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1707560000.123)
        self.bus = LocalBus(NODE_A, KEY, self.clock)
        self.bus.startService()
        self.got = []
        self.bus.subscribe(self.got.append)

    def test_provides_interface(self):
        verifyObject(IEventBus, self.bus)

    def test_own_messages_next_turn(self):
        d = self.bus.publish("tunnel:disconnect", {"tunnel_id": "t"})
        self.assertIsNone(self.successResultOf(d))
        self.bus.publish("cluster:heartbeat", {})
        self.assertEqual(self.got, [])
        self.clock.advance(0)
        self.assertEqual([(m.event, m.message, m.seq) for m in self.got],
                         [("tunnel:disconnect", {"tunnel_id": "t"}, 0), ("cluster:heartbeat", {}, 1)])
        m = self.got[0]
        self.assertEqual((m.node_id, m.host, m.ip, m.ts), (NODE_A.id, NODE_A.host, NODE_A.ip, 1707560000123))
        self.assertEqual(self.bus.seq, 2)
        self.assertEqual(self.bus.rejected, {})

    def test_published_from_a_subscriber_arrives_a_turn_later(self):
        seen_at_publish = []

        def republish(msg):
            if msg.seq == 0:
                self.bus.publish("again", {})
                seen_at_publish.append([m.event for m in self.got])

        self.bus.subscribe(republish)
        self.bus.publish("first", {})
        self.clock.advance(0)
        self.assertEqual(seen_at_publish, [["first"]])  # never delivered re-entrantly
        self.assertEqual([(m.event, m.seq) for m in self.got], [("first", 0), ("again", 1)])

    def test_bad_envelopes_dropped_and_counted(self):
        self.bus._deliver(b"garbage")
        self.bus._deliver(encode("e", {}, NODE_B, 1, 0, "wrong key"))
        self.bus._deliver(encode("e", {}, NODE_B, 1, 0, KEY))
        self.bus._deliver(encode("e", {}, NODE_B, 1, 0, KEY))
        self.bus._deliver(b"x" * 70000)
        self.assertEqual([m.node_id for m in self.got], [NODE_B.id])
        self.assertEqual(self.bus.rejected, {"malformed": 1, "bad-signature": 1, "replayed": 1, "oversized": 1})

    def test_forget_resets_window(self):
        data = encode("e", {}, NODE_B, 1, 0, KEY)
        self.bus._deliver(data)
        self.bus.forget(NODE_B.id)
        self.bus._deliver(data)
        self.assertEqual(len(self.got), 2)

    def test_subscriber_exception_does_not_stop_others(self):
        later = []

        def broken(msg):
            raise RuntimeError("boom")

        self.bus.subscribe(broken)
        self.bus.subscribe(later.append)
        self.bus.publish("e", {})
        self.clock.advance(0)
        self.assertEqual(len(self.got), 1)
        self.assertEqual(len(later), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_unsubscribe(self):
        other = []
        unsubscribe = self.bus.subscribe(other.append)
        self.bus.subscribe(other.append)  # the same callable twice: two subscriptions
        unsubscribe()
        unsubscribe()
        self.bus.publish("e", {})
        self.clock.advance(0)
        self.assertEqual(len(other), 1)

    def test_rate_limited_warning(self):
        logs = LogCapture(self, "exposr.cluster.bus")
        for _ in range(3):
            self.bus._deliver(b"garbage")
            self.clock.advance(10)
        self.bus._deliver(b"{}")
        self.assertEqual([(e["reason"], e["count"]) for e in logs.warnings()], [("malformed", 1), ("unsigned", 1)])
        self.clock.advance(30)  # 60 s after the first malformed one
        self.bus._deliver(b"[]")
        self.assertEqual([(e["reason"], e["count"]) for e in logs.warnings()][2:], [("malformed", 3)])
        self.bus._deliver(b"[]")
        self.assertEqual(len(logs.warnings()), 3)
        self.assertEqual(self.bus.rejected, {"malformed": 5, "unsigned": 1})

    def test_not_running(self):
        bus = LocalBus(NODE_A, KEY, self.clock)
        self.failureResultOf(bus.publish("e", {}), BusUnavailable)
        self.bus.publish("e", {})
        self.successResultOf(self.bus.stopService())
        self.clock.advance(0)
        self.assertEqual(self.got, [])
        self.failureResultOf(self.bus.publish("e", {}), BusUnavailable)

    def test_unencodable(self):
        self.assertRaises(ValueError, self.bus.publish, "e", {"x": 0.5})
        self.assertEqual(self.bus.seq, 0)


class RedisUrlTests(unittest.TestCase):
    def test_parse(self):
        self.assertEqual(parse_redis_url("redis://:p%40ss@cache.example:6380/3"),
                         RedisAddress("cache.example", 6380, "p@ss", None, 3))
        self.assertEqual(parse_redis_url("redis://u:p@h"), RedisAddress("h", 6379, "p", "u", None))
        self.assertEqual(parse_redis_url("redis://localhost"), RedisAddress("localhost"))
        for bad in ("http://h", "redis://h/x", "redis://h:port"):
            self.assertRaises(ValueError, parse_redis_url, bad)


def unique_channel():
    return "exposr-test-%d-%s" % (os.getpid(), uuid.uuid4().hex)


class Inbox:
    """Collects a bus's messages; `wait(n)` fires once n have arrived."""

    def __init__(self, bus):
        self.messages = []
        self._waiters = []
        self.bus = bus
        bus.subscribe(self._got)

    def _got(self, msg):
        self.messages.append(msg)
        for n, d in list(self._waiters):
            if len(self.messages) >= n:
                self._waiters.remove((n, d))
                d.callback(self.messages)

    def wait(self, n, seconds=10):
        if len(self.messages) >= n:
            return defer.succeed(self.messages)
        d = defer.Deferred()
        self._waiters.append((n, d))
        return within(d, seconds)

    def wait_for(self, event, seconds=10):
        """Fires once a message of ``event`` has arrived."""
        d = defer.Deferred()
        unsubscribe = None

        def check(msg):
            if msg.event == event and not d.called:
                unsubscribe()
                d.callback(msg)

        if any(m.event == event for m in self.messages):
            return defer.succeed(None)
        unsubscribe = self.bus.subscribe(check)
        return within(d, seconds)

    def seen(self):
        return [(m.node_id, m.event, m.seq) for m in self.messages]


class RedisBusTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        import txredisapi

        self.channel = unique_channel()
        self.admin = yield within(txredisapi.Connection("127.0.0.1", 6379, reconnect=False, convertNumbers=False))
        self.addCleanup(self.admin.disconnect)

    @defer.inlineCallbacks
    def start(self, node, key=KEY, **kwargs):
        bus = RedisBus(node, key, REDIS_URL, reactor, channel=self.channel, **kwargs)
        ready = bus.startService()
        self.addCleanup(bus.stopService)
        self.assertIs((yield within(ready)), bus)
        return bus

    def kill(self, bus, which):
        """CLIENT KILL one of the bus's own connections (never other clients of this Redis)."""
        factory = bus._factories[0 if which == "subscriber" else 1]
        host = factory.pool[0].transport.getHost()
        return self.admin.execute_command("CLIENT", "KILL", "ADDR", "%s:%d" % (host.host, host.port))

    @defer.inlineCallbacks
    def test_two_nodes_each_receive_both(self):
        a, b = yield defer.gatherResults([self.start(NODE_A), self.start(NODE_B)])
        verifyObject(IEventBus, a)
        inbox_a, inbox_b = Inbox(a), Inbox(b)
        self.assertEqual((yield within(a.publish("tunnel:disconnect", {"tunnel_id": "t\u00e9"}))), 2)
        yield within(b.publish("cluster:heartbeat", {}))
        for inbox in (inbox_a, inbox_b):
            yield inbox.wait(2)
            self.assertEqual(sorted(inbox.seen()),
                             [(NODE_A.id, "tunnel:disconnect", 0), (NODE_B.id, "cluster:heartbeat", 0)])
        self.assertEqual(inbox_b.messages[[m.node_id for m in inbox_b.messages].index(NODE_A.id)].message,
                         {"tunnel_id": "t\u00e9"})
        self.assertEqual((a.rejected, b.rejected), ({}, {}))

    @defer.inlineCallbacks
    def test_wrong_key_dropped(self):
        a = yield self.start(NODE_A)
        b = yield self.start(NODE_B)
        intruder = yield self.start(Node(id="c" * 40, host="3@c", ip="10.0.0.3"), key="not the key")
        inbox = Inbox(a)
        yield within(intruder.publish("tunnel:disconnect", {"tunnel_id": "t"}))
        # one stream from Redis to a: b's message arrives after the intruder's
        yield within(b.publish("cluster:heartbeat", {}))
        yield inbox.wait(1)
        self.assertEqual(inbox.seen(), [(NODE_B.id, "cluster:heartbeat", 0)])
        self.assertEqual(a.rejected, {"bad-signature": 1})

    @defer.inlineCallbacks
    def test_subscriber_killed_resubscribes(self):
        a = yield self.start(NODE_A)
        b = yield self.start(NODE_B)
        inbox = Inbox(a)
        again = a.next_subscription()
        yield within(self.kill(a, "subscriber"))
        yield within(again)
        self.assertEqual(a.subscriptions, 2)
        yield within(b.publish("after", {"n": 1}))
        yield inbox.wait(1)
        self.assertEqual(inbox.seen(), [(NODE_B.id, "after", 0)])

    @defer.inlineCallbacks
    def test_publisher_killed_messages_resent(self):
        a = yield self.start(NODE_A)
        b = yield self.start(NODE_B)
        inbox = Inbox(b)
        yield within(a.publish("before", {}))
        yield inbox.wait(1)
        yield within(self.kill(a, "publisher"))
        # published at once, while the client may not know its connection is gone
        published = [a.publish("after", {"n": n}) for n in range(3)]
        yield within(defer.gatherResults(published))
        yield inbox.wait(4)
        self.assertEqual([(m.event, m.seq) for m in inbox.messages],
                         [("before", 0), ("after", 1), ("after", 2), ("after", 3)])

    @defer.inlineCallbacks
    def test_message_from_an_original_node(self):
        """PUBLISH by redis-cli of the exact text a Node.js node sends (signed here)."""
        a = yield self.start(NODE_A)
        inbox = Inbox(a)
        body = json.dumps({
            "event": "tunnel:announce",
            "message": [{"tunnel_id": "my-tunnel", "connections": [{
                "connection_id": "%s:6f9619ff-8b86-d011-b42d-00cf4fc964ff" % ("d" * 40), "node": "d" * 40,
                "peer": "203.0.113.9", "connected": True, "connected_at": 1707560000123}]}],
            "node": {"id": "d" * 40, "host": "7@gr\u00fcn", "ip": "10.0.0.4"},
            "ts": 1707560000456,
            "seq": 41,
        }, separators=(",", ":"), ensure_ascii=False)
        sig = hmac.new(KEY.encode(), body.encode("utf-8"), hashlib.sha256).hexdigest()
        text = body[:-1] + ',"s":"%s"}' % sig
        code, out, err = yield procs.run(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "PUBLISH", self.channel, text])
        self.assertEqual((code, out.strip()), (0, b"1"), err)
        yield inbox.wait(1)
        m = inbox.messages[0]
        self.assertEqual((m.event, m.node_id, m.host, m.ip, m.ts, m.seq),
                         ("tunnel:announce", "d" * 40, "7@gr\u00fcn", "10.0.0.4", 1707560000456, 41))
        self.assertEqual(m.message[0]["connections"][0]["peer"], "203.0.113.9")

    @defer.inlineCallbacks
    def test_other_channels_ignored(self):
        a = yield self.start(NODE_A)
        inbox = Inbox(a)
        yield self.admin.execute_command("PUBLISH", self.channel + "-other", encode("x", {}, NODE_B, 1, 0, KEY))
        yield self.admin.execute_command("PUBLISH", self.channel, b"not json")
        yield self.admin.execute_command("PUBLISH", self.channel, encode("y", {}, NODE_B, 1, 1, KEY))
        yield inbox.wait(1)
        self.assertEqual(inbox.seen(), [(NODE_B.id, "y", 1)])
        self.assertEqual(a.rejected, {"malformed": 1})


class RedisRestartTests(unittest.TestCase):
    """A private redis-server on a free port, stopped and started again."""

    timeout = 60

    @defer.inlineCallbacks
    def start_redis(self, port):
        workdir = self.mktemp()
        os.makedirs(workdir)
        proto, transport = procs.spawn(
            ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
            executable="/usr/bin/redis-server",
        )
        def stop():
            procs.stop(transport, signal.SIGKILL)
            return within(proto.ended)

        self.addCleanup(stop)
        yield proto.wait_for(b"Ready to accept connections", 20)
        return proto, transport

    @defer.inlineCallbacks
    def test_redis_restart(self):
        port = procs.free_port()
        proto, transport = yield self.start_redis(port)
        url = "redis://127.0.0.1:%d" % port
        a = RedisBus(NODE_A, KEY, url, reactor, channel="exposr")
        b = RedisBus(NODE_B, KEY, url, reactor, channel="exposr")
        for bus in (a, b):
            self.addCleanup(bus.stopService)
        yield within(defer.gatherResults([a.startService(), b.startService()]))
        inbox = Inbox(a)
        yield within(b.publish("before", {}))
        yield inbox.wait(1)

        again = a.next_subscription()
        procs.stop(transport, signal.SIGKILL)
        yield within(proto.ended)
        during = b.publish("during", {})  # queued until Redis is back
        proto, transport = yield self.start_redis(port)
        yield within(again)
        yield within(during)
        yield within(b.publish("after", {}))
        yield inbox.wait_for("after")
        # "during" reached a only if a had subscribed again first: pub/sub keeps nothing
        self.assertIn(inbox.seen(), ([(NODE_B.id, "before", 0), (NODE_B.id, "after", 2)],
                                     [(NODE_B.id, "before", 0), (NODE_B.id, "during", 1), (NODE_B.id, "after", 2)]))


class FakePublisher:
    """Stands for the publisher connection: records commands, answers when told."""

    connected = 1

    def __init__(self):
        self.sent = []

    def execute_command(self, *args):
        d = defer.Deferred()
        self.sent.append((args, d))
        return d


class RedisBusPublishQueueTests(unittest.TestCase):
    """The publish queue without a network: order, re-sending, failures."""

    def test_resent_in_order_on_the_next_connection(self):
        import txredisapi

        clock = task.Clock()
        bus = RedisBus(NODE_A, KEY, REDIS_URL, clock, channel="c")
        bus.running = 1  # the connections themselves are not under test here
        published = [bus.publish("e", {"n": n}) for n in range(3)]
        first = FakePublisher()
        bus._publisher_up(first)
        self.assertEqual([args[:2] for args, _ in first.sent], [("PUBLISH", "c")] * 3)
        first.sent[0][1].callback(2)
        self.assertEqual(self.successResultOf(published[0]), 2)
        first.sent[1][1].errback(txredisapi.TimeoutError("no answer"))
        bus._publisher_down(first)
        first.sent[2][1].errback(txredisapi.ConnectionError("Lost connection"))
        published.append(bus.publish("e", {"n": 3}))
        self.assertNoResult(published[1])
        second = FakePublisher()
        bus._publisher_up(second)
        self.assertEqual([args[2] for args, _ in second.sent],
                         [encode("e", {"n": n}, NODE_A, 0, n, KEY) for n in (1, 2, 3)])
        second.sent[0][1].callback(1)
        second.sent[1][1].errback(txredisapi.ResponseError("NOPERM"))
        second.sent[2][1].callback(1)
        self.assertEqual(self.successResultOf(published[1]), 1)
        self.failureResultOf(published[2], BusUnavailable)
        self.assertEqual(self.successResultOf(published[3]), 1)
        self.assertEqual((bus._queue, bus._inflight), ([], []))


class RedisBusUnreachableTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_publishes_queue_up_to_a_bound(self):
        url = "redis://127.0.0.1:%d" % procs.free_port()
        bus = RedisBus(NODE_A, KEY, url, reactor, channel=unique_channel(), max_pending=2)
        ready = bus.startService()
        first, second = bus.publish("e", {}), bus.publish("e", {})
        third = bus.publish("e", {})
        yield self.assertFailure(third, BusUnavailable)
        self.assertFalse(ready.called or first.called or second.called)
        yield within(bus.stopService())
        for d in (first, second):
            yield self.assertFailure(d, BusUnavailable)
        yield self.assertFailure(bus.publish("e", {}), BusUnavailable)
        self.assertFalse(ready.called)

    @defer.inlineCallbacks
    def test_wrong_password_fails_ready(self):
        bus = RedisBus(NODE_A, KEY, "redis://:wrong-password@127.0.0.1:6379", reactor, channel=unique_channel())
        ready = bus.startService()
        self.addCleanup(bus.stopService)
        yield self.assertFailure(within(ready), BusUnavailable)
