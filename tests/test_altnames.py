"""Alt names (BYOD): CNAME verification against a real in-process DNS server,
first-come-first-served registration, release and the ingress lookup
(docs/protocol.rst, "Alt names": the stored list is kept plus granted names)."""

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import DatagramProtocol
from twisted.names import authority, common, dns, server
from twisted.trial import unittest

from exposr import model
from exposr.altnames import NS, AltNames, cname_targets, parse_dns_server
from exposr.config import Config
from exposr.storage.memory import MemoryStorage
from exposr.tunnels import BadAltNames
from tests.support import Stack

INGRESS_URL = "http://tunnel.example.com:8080"
RIGHT = "my-tunnel.tunnel.example.com"
OTHER = "other-tunnel.tunnel.example.com"
FAST = (0.3, 0.5)  # per-try DNS timeouts of the tests: at most 0.8 s per name

SOA = dns.Record_SOA(
    mname=b"ns.example.net", rname=b"root.example.net",
    serial=1, refresh=1, retry=1, expire=1, minimum=1, ttl=1,
)


class BrokenZone(Exception):
    """Makes the test server answer SERVFAIL."""


class TestAuthority(authority.FileAuthority):
    """
    An in-memory zone ``example.net``. CNAME answers carry the whole chain
    (as a recursive server would send it); names in ``silent`` are never
    answered; names in ``broken`` answer SERVFAIL.
    """

    def __init__(self, cnames):
        common.ResolverBase.__init__(self)
        self.soa = (b"example.net", SOA)
        self.records = {b"example.net": [SOA]}
        self.silent = set()
        self.broken = set()
        self.queries = []
        for name, targets in cnames.items():
            self.set(name, targets)

    def set(self, name, targets):
        if isinstance(targets, str):
            targets = [targets]
        self.records[name.encode("ascii")] = [dns.Record_CNAME(t.encode("ascii"), ttl=1) for t in targets]

    def set_a(self, name):
        self.records[name.encode("ascii")] = [dns.Record_A("127.0.0.1", ttl=1)]

    def _lookup(self, name, cls, type, timeout=None):
        self.queries.append(name.decode("ascii"))
        if name.lower() in self.silent:
            return defer.Deferred()
        if name.lower() in self.broken:
            return defer.fail(BrokenZone(name))
        d = authority.FileAuthority._lookup(self, name, cls, type, timeout)
        if type == dns.CNAME:
            d.addCallback(self._with_chain)
        return d

    def _with_chain(self, result):
        answers, auth, additional = result
        answers = list(answers)
        seen = set()
        while answers and answers[-1].type == dns.CNAME:
            target = answers[-1].payload.name.name.lower()
            nxt = [r for r in self.records.get(target, ()) if r.TYPE == dns.CNAME]
            if target in seen or not nxt:
                break
            seen.add(target)
            answers.append(dns.RRHeader(target, dns.CNAME, dns.IN, 1, nxt[0], auth=True))
        return answers, auth, additional


def start_dns(test, zone):
    """Serve ``zone`` on 127.0.0.1, UDP, port 0: ``host:port``."""
    factory = server.DNSServerFactory(authorities=[zone])
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return "127.0.0.1:%d" % (port.getHost().port,)


def start_silent(test):
    """A UDP port that never answers."""
    port = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return "127.0.0.1:%d" % (port.getHost().port,)


def tunnel(tunnel_id="my-tunnel", alt_names=()):
    return {"id": tunnel_id, "ingress": {"http": {"enabled": True, "alt_names": list(alt_names)}}}


class Base(unittest.TestCase):
    timeout = 20

    def setUp(self):
        self.zone = TestAuthority({
            "right.example.net": RIGHT,
            "upper.example.net": "My-Tunnel.Tunnel.Example.COM",
            "wrong.example.net": OTHER,
            "wrong-host.example.net": "my-tunnel.evil.example.com",
            "suffix.example.net": RIGHT + ".evil.net",
            "prefix.example.net": "x" + RIGHT,
            "chain.example.net": "mid.example.net",
            "mid.example.net": RIGHT,
            "several.example.net": [OTHER, RIGHT],
            "kept.example.net": OTHER,
        })
        self.zone.set_a("a-only.example.net")
        self.zone.silent.add(b"slow.example.net")
        self.zone.broken.add(b"servfail.example.net")
        self.clock = task.Clock()
        self.clock.advance(1707560000.123)
        self.storage = MemoryStorage(self.clock)
        self.config = Config(ingress_http_url=INGRESS_URL, dns_server=start_dns(self, self.zone))
        self.altnames = AltNames(self.config, self.storage, self.clock, dns_timeout=FAST)

    def registered(self, name):
        return self.storage.get(NS, "http-" + name)

    @defer.inlineCallbacks
    def assertRefused(self, requested, failing, record=None):
        record = record or tunnel()
        try:
            yield self.altnames.update(record, requested)
        except BadAltNames as e:
            self.assertEqual(e.names, failing)
        else:
            self.fail("%r was accepted" % (requested,))
        for name in requested:
            if name not in (record["ingress"]["http"]["alt_names"]):
                self.assertIsNone((yield self.registered(name)), name)


class VerificationTests(Base):
    @defer.inlineCallbacks
    def test_right_cname_accepted_and_registered(self):
        granted = yield self.altnames.update(tunnel(), ["right.example.net"])
        self.assertEqual(granted, ["right.example.net"])
        stored = yield self.registered("right.example.net")
        self.assertEqual(stored, {"tunnelId": "my-tunnel", "created_at": model.iso_timestamp(self.clock.seconds())})
        self.assertEqual(stored["created_at"], "2024-02-10T10:13:20.123Z")

    @defer.inlineCallbacks
    def test_target_case_does_not_matter(self):
        granted = yield self.altnames.update(tunnel(), ["upper.example.net"])
        self.assertEqual(granted, ["upper.example.net"])

    @defer.inlineCallbacks
    def test_answer_list_containing_the_target_accepted(self):
        granted = yield self.altnames.update(tunnel(), ["several.example.net"])
        self.assertEqual(granted, ["several.example.net"])

    def test_cname_to_another_tunnel_refused(self):
        return self.assertRefused(["wrong.example.net"], ["wrong.example.net"])

    @defer.inlineCallbacks
    def test_cname_to_another_host_refused(self):
        for name in ("wrong-host.example.net", "suffix.example.net", "prefix.example.net"):
            yield self.assertRefused([name], [name])

    def test_nxdomain_refused(self):
        return self.assertRefused(["missing.example.net"], ["missing.example.net"])

    def test_no_cname_refused(self):
        """An A record is no fallback."""
        return self.assertRefused(["a-only.example.net"], ["a-only.example.net"])

    @defer.inlineCallbacks
    def test_chain_refused(self):
        """CNAME -> CNAME -> the right name: refused even with the whole chain in the answer."""
        self.assertEqual(
            cname_targets((yield self.altnames.resolver.lookupCanonicalName("chain.example.net"))[0],
                          "chain.example.net"),
            ["mid.example.net"],
        )
        answers = (yield self.altnames.resolver.lookupCanonicalName("chain.example.net"))[0]
        self.assertIn(RIGHT, [str(rr.payload.name) for rr in answers])
        yield self.assertRefused(["chain.example.net"], ["chain.example.net"])

    @defer.inlineCallbacks
    def test_servfail_refused(self):
        yield self.assertRefused(["servfail.example.net"], ["servfail.example.net"])
        self.flushLoggedErrors(BrokenZone)

    @defer.inlineCallbacks
    def test_timeout_refused(self):
        start = reactor.seconds()
        yield self.assertRefused(["slow.example.net"], ["slow.example.net"])
        self.assertLess(reactor.seconds() - start, sum(FAST) + 2)

    @defer.inlineCallbacks
    def test_server_never_answering_refused(self):
        config = Config(ingress_http_url=INGRESS_URL, dns_server=start_silent(self))
        self.altnames = AltNames(config, self.storage, self.clock, dns_timeout=FAST)
        start = reactor.seconds()
        yield self.assertRefused(["right.example.net"], ["right.example.net"])
        self.assertLess(reactor.seconds() - start, sum(FAST) + 2)

    def test_without_ingress_url_refused(self):
        self.altnames = AltNames(Config(dns_server=self.config.dns_server), self.storage, self.clock)
        return self.assertRefused(["right.example.net"], ["right.example.net"])

    @defer.inlineCallbacks
    def test_one_failure_registers_nothing(self):
        yield self.assertRefused(
            ["right.example.net", "wrong.example.net", "slow.example.net", "missing.example.net"],
            ["wrong.example.net", "slow.example.net", "missing.example.net"],
        )
        self.assertIsNone((yield self.registered("right.example.net")))

    @defer.inlineCallbacks
    def test_only_changed_names_verified(self):
        """Kept names are not checked (kept.example.net points elsewhere) and stay."""
        record = tunnel(alt_names=["kept.example.net"])
        granted = yield self.altnames.update(record, ["right.example.net", "kept.example.net"])
        self.assertEqual(granted, ["right.example.net", "kept.example.net"])
        self.assertEqual(self.zone.queries, ["right.example.net"])

    @defer.inlineCallbacks
    def test_injected_resolver(self):
        class Resolver:
            def lookupCanonicalName(self, name, timeout=None):
                rr = dns.RRHeader(name, dns.CNAME, dns.IN, 1, dns.Record_CNAME(RIGHT))
                return defer.succeed(([rr], [], []))

        altnames = AltNames(Config(ingress_http_url=INGRESS_URL), self.storage, self.clock,
                            resolver=Resolver())
        self.assertEqual((yield altnames.update(tunnel(), ["x.example.org"])), ["x.example.org"])


class RegistrationTests(Base):
    def setUp(self):
        Base.setUp(self)
        self.other = AltNames(self.config, self.storage, self.clock, dns_timeout=FAST)

    @defer.inlineCallbacks
    def test_first_come_first_served(self):
        """The domain owner repoints the CNAME; the first tunnel keeps the name."""
        yield self.storage.create("tunnel", "my-tunnel", {"id": "my-tunnel"})
        yield self.storage.create("tunnel", "other-tunnel", {"id": "other-tunnel"})
        first = tunnel("my-tunnel")
        self.assertEqual((yield self.altnames.update(first, ["right.example.net"])), ["right.example.net"])
        first["ingress"]["http"]["alt_names"] = ["right.example.net"]

        self.zone.set("right.example.net", OTHER)
        second = tunnel("other-tunnel")
        granted = yield self.other.update(second, ["right.example.net"])
        self.assertEqual(granted, [])  # silently not granted, never stolen
        self.assertEqual((yield self.registered("right.example.net"))["tunnelId"], "my-tunnel")

        # the first tunnel drops it: the name is free for the second one
        self.assertEqual((yield self.altnames.update(first, [])), [])
        self.assertIsNone((yield self.registered("right.example.net")))
        self.assertEqual((yield self.other.update(second, ["right.example.net"])), ["right.example.net"])
        self.assertEqual((yield self.registered("right.example.net"))["tunnelId"], "other-tunnel")

    @defer.inlineCallbacks
    def test_registered_to_this_tunnel_granted(self):
        """A registration left over for this tunnel (the original lost kept names) is granted again."""
        yield self.storage.create(NS, "http-right.example.net",
                                  {"tunnelId": "my-tunnel", "created_at": "2020-01-01T00:00:00.000Z"})
        self.assertEqual((yield self.altnames.update(tunnel(), ["right.example.net"])), ["right.example.net"])
        self.assertEqual((yield self.registered("right.example.net"))["created_at"], "2020-01-01T00:00:00.000Z")

    @defer.inlineCallbacks
    def test_registration_of_deleted_tunnel_taken_over(self):
        yield self.storage.create(NS, "http-right.example.net",
                                  {"tunnelId": "gone-tunnel", "created_at": "2020-01-01T00:00:00.000Z"})
        self.assertEqual((yield self.altnames.update(tunnel(), ["right.example.net"])), ["right.example.net"])
        self.assertEqual((yield self.registered("right.example.net"))["tunnelId"], "my-tunnel")

    @defer.inlineCallbacks
    def test_registration_of_live_tunnel_kept(self):
        yield self.storage.create("tunnel", "other-tunnel", {"id": "other-tunnel"})
        yield self.storage.create(NS, "http-right.example.net",
                                  {"tunnelId": "other-tunnel", "created_at": "2020-01-01T00:00:00.000Z"})
        self.assertEqual((yield self.altnames.update(tunnel(), ["right.example.net"])), [])
        self.assertEqual((yield self.registered("right.example.net"))["tunnelId"], "other-tunnel")

    @defer.inlineCallbacks
    def test_removing_frees_only_own_names(self):
        self.zone.set("one.example.net", RIGHT)
        self.zone.set("two.example.net", RIGHT)
        record = tunnel(alt_names=[])
        granted = yield self.altnames.update(record, ["one.example.net", "two.example.net"])
        self.assertEqual(granted, ["one.example.net", "two.example.net"])
        # a stale entry in the list that is registered to someone else
        yield self.storage.create(NS, "http-theirs.example.net", {"tunnelId": "other-tunnel"})
        record["ingress"]["http"]["alt_names"] = granted + ["theirs.example.net"]

        self.assertEqual((yield self.altnames.update(record, ["two.example.net"])), ["two.example.net"])
        self.assertIsNone((yield self.registered("one.example.net")))
        self.assertEqual((yield self.registered("two.example.net"))["tunnelId"], "my-tunnel")
        self.assertEqual((yield self.registered("theirs.example.net"))["tunnelId"], "other-tunnel")

    @defer.inlineCallbacks
    def test_release_frees_all_own_names(self):
        self.zone.set("one.example.net", RIGHT)
        record = tunnel()
        granted = yield self.altnames.update(record, ["one.example.net", "right.example.net"])
        yield self.storage.create(NS, "http-theirs.example.net", {"tunnelId": "other-tunnel"})
        record["ingress"]["http"]["alt_names"] = granted + ["theirs.example.net"]
        yield self.altnames.release(record)
        self.assertIsNone((yield self.registered("one.example.net")))
        self.assertIsNone((yield self.registered("right.example.net")))
        self.assertEqual((yield self.registered("theirs.example.net"))["tunnelId"], "other-tunnel")

    @defer.inlineCallbacks
    def test_release_without_names(self):
        yield self.altnames.release(tunnel())
        yield self.altnames.release({"id": "bare-tunnel"})


class LookupTests(Base):
    @defer.inlineCallbacks
    def test_lookup_registered_and_unknown(self):
        yield self.altnames.update(tunnel(), ["right.example.net"])
        self.assertEqual((yield self.altnames.lookup("right.example.net")), "my-tunnel")
        self.assertEqual((yield self.altnames.lookup("Right.Example.NET")), "my-tunnel")
        self.assertIsNone((yield self.altnames.lookup("unknown.example.net")))

    @defer.inlineCallbacks
    def test_garbage_hosts_are_not_looked_up(self):
        calls = []
        get = self.storage.get
        self.storage.get = lambda ns, key: calls.append(key) or get(ns, key)
        for host in ("", "a b", "x" * 300, "exa\x00mple.net", "a..b", None, "http-x/../y"):
            self.assertIsNone((yield self.altnames.lookup(host)))
        self.assertEqual(calls, [])

    @defer.inlineCallbacks
    def test_hits_and_misses_are_cached(self):
        calls = []
        get = self.storage.get
        self.storage.get = lambda ns, key: calls.append(key) or get(ns, key)

        self.assertIsNone((yield self.altnames.lookup("foreign.example.net")))
        # registered by another node: a miss is remembered for one second only
        yield self.storage.create(NS, "http-foreign.example.net", {"tunnelId": "other-tunnel"})
        self.assertIsNone((yield self.altnames.lookup("foreign.example.net")))
        self.clock.advance(0.9)
        self.assertIsNone((yield self.altnames.lookup("foreign.example.net")))
        self.assertEqual(calls, ["http-foreign.example.net"])
        self.clock.advance(0.2)
        self.assertEqual((yield self.altnames.lookup("foreign.example.net")), "other-tunnel")
        self.assertEqual(len(calls), 2)
        self.assertEqual((yield self.altnames.lookup("foreign.example.net")), "other-tunnel")
        self.assertEqual(len(calls), 2)

        # a hit is kept for five seconds
        yield self.storage.delete(NS, "http-foreign.example.net")
        self.clock.advance(4.9)
        self.assertEqual((yield self.altnames.lookup("foreign.example.net")), "other-tunnel")
        self.clock.advance(0.2)
        self.assertIsNone((yield self.altnames.lookup("foreign.example.net")))

    @defer.inlineCallbacks
    def test_own_update_and_release_invalidate(self):
        self.assertIsNone((yield self.altnames.lookup("right.example.net")))
        record = tunnel()
        record["ingress"]["http"]["alt_names"] = yield self.altnames.update(record, ["right.example.net"])
        self.assertEqual((yield self.altnames.lookup("right.example.net")), "my-tunnel")
        yield self.altnames.release(record)
        self.assertIsNone((yield self.altnames.lookup("right.example.net")))
        record = tunnel()
        record["ingress"]["http"]["alt_names"] = yield self.altnames.update(record, ["right.example.net"])
        self.assertEqual((yield self.altnames.lookup("right.example.net")), "my-tunnel")
        yield self.altnames.update(record, [])
        self.assertIsNone((yield self.altnames.lookup("right.example.net")))

    @defer.inlineCallbacks
    def test_lookup_in_flight_during_invalidation_not_cached(self):
        pending = defer.Deferred()
        self.storage.get = lambda ns, key: pending
        d = self.altnames.lookup("right.example.net")
        self.altnames._invalidate(["right.example.net"])
        pending.callback(None)
        self.assertIsNone((yield d))
        self.assertNotIn("right.example.net", self.altnames._cache)

    @defer.inlineCallbacks
    def test_cache_is_bounded(self):
        self.altnames.cache_max = 10
        for i in range(25):
            yield self.altnames.lookup("host%d.example.net" % i)
        self.assertLessEqual(len(self.altnames._cache), 10)


class TunnelServiceTests(Base):
    """Wired into the tunnel service as ``altnames``."""

    def setUp(self):
        Base.setUp(self)
        self.stack = Stack(config=self.config, clock=self.clock, storage=self.storage,
                           altnames=self.altnames)
        return self.stack.open()

    @defer.inlineCallbacks
    def test_update_delete(self):
        account, _ = yield self.stack.account_and_tunnel("my-tunnel")
        changes = {"ingress": {"http": {"enabled": True, "alt_names": ["right.example.net"]}}}
        record = yield self.stack.tunnels.update_config("my-tunnel", account["id"], changes)
        self.assertEqual(record["ingress"]["http"]["alt_names"], ["right.example.net"])
        self.assertIn("http://right.example.net:8080/", record["ingress"]["http"]["urls"])
        self.assertEqual((yield self.altnames.lookup("right.example.net")), "my-tunnel")

        bad = {"ingress": {"http": {"alt_names": ["right.example.net", "wrong.example.net"]}}}
        yield self.assertFailure(self.stack.tunnels.update_config("my-tunnel", account["id"], bad),
                                 BadAltNames)
        record = yield self.stack.tunnels.get("my-tunnel")
        self.assertEqual(record["ingress"]["http"]["alt_names"], ["right.example.net"])

        yield self.stack.tunnels.delete("my-tunnel", account["id"])
        self.assertIsNone((yield self.registered("right.example.net")))
        self.assertIsNone((yield self.altnames.lookup("right.example.net")))


    @defer.inlineCallbacks
    def test_first_come_first_served_between_accounts(self):
        mine, _ = yield self.stack.account_and_tunnel("my-tunnel")
        theirs, _ = yield self.stack.account_and_tunnel("other-tunnel")
        self.assertNotEqual(mine["id"], theirs["id"])
        add = {"ingress": {"http": {"alt_names": ["right.example.net"]}}}
        record = yield self.stack.tunnels.update_config("my-tunnel", mine["id"], add)
        self.assertEqual(record["ingress"]["http"]["alt_names"], ["right.example.net"])

        self.zone.set("right.example.net", OTHER)
        record = yield self.stack.tunnels.update_config("other-tunnel", theirs["id"], add)
        self.assertEqual(record["ingress"]["http"]["alt_names"], [])
        self.assertEqual((yield self.altnames.lookup("right.example.net")), "my-tunnel")

        yield self.stack.tunnels.update_config(
            "my-tunnel", mine["id"], {"ingress": {"http": {"alt_names": None}}})
        record = yield self.stack.tunnels.update_config("other-tunnel", theirs["id"], add)
        self.assertEqual(record["ingress"]["http"]["alt_names"], ["right.example.net"])
        self.assertEqual((yield self.altnames.lookup("right.example.net")), "other-tunnel")


class ParseTests(unittest.TestCase):
    def test_parse_dns_server(self):
        self.assertEqual(parse_dns_server("10.0.0.1"), ("10.0.0.1", 53))
        self.assertEqual(parse_dns_server("10.0.0.1:5353"), ("10.0.0.1", 5353))
        self.assertEqual(parse_dns_server("::1"), ("::1", 53))
        self.assertEqual(parse_dns_server("[::1]:5353"), ("::1", 5353))
        self.assertEqual(parse_dns_server("[fd00::1]"), ("fd00::1", 53))
        for bad in ("example.com", "10.0.0.1:0", "10.0.0.1:x", "[::1]x", "[::1"):
            self.assertRaises(ValueError, parse_dns_server, bad)
