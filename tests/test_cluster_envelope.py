"""
The cluster envelope: exact signed bytes as a Node.js node produces them,
verification, every way a message is refused, and the per-sender replay
window with the original's vectors.
"""

import hashlib
import hmac
import json

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from exposr.cluster import envelope
from exposr.cluster.envelope import (
    MAX_SIZE,
    EnvelopeError,
    Message,
    SequenceWindow,
    Verifier,
    decode,
    encode,
)
from exposr.node import Node

KEY = "cluster-secret"
NODE = Node(id="0123456789abcdef0123456789abcdef01234567", host="4242@node-a", ip="10.0.0.1")
TS = 1707560000123


def hmac_hex(text, key=KEY):
    return hmac.new(key.encode(), text.encode("utf-8"), hashlib.sha256).hexdigest()


def sign_text(body_text, key=KEY):
    """The wire text for an unsigned compact JSON object text, signed independently."""
    return (body_text[:-1] + ',"s":"%s"}' % hmac_hex(body_text, key)).encode("utf-8")


def sign_obj(obj, key=KEY):
    """Any object signed as a sender would (compact, key order as given)."""
    return sign_text(json.dumps(obj, separators=(",", ":"), ensure_ascii=False), key)


def envelope_obj(**overrides):
    obj = {
        "event": "cluster:heartbeat",
        "message": {},
        "node": {"id": NODE.id, "host": NODE.host, "ip": NODE.ip},
        "ts": TS,
        "seq": 0,
    }
    obj.update(overrides)
    return obj


class EncodeTests(unittest.TestCase):
    def test_exact_bytes(self):
        """Key order, compact separators, signature appended before the final brace."""
        body = (
            '{"event":"tunnel:disconnect","message":{"tunnel_id":"my-tunnel"},'
            '"node":{"id":"0123456789abcdef0123456789abcdef01234567","host":"4242@node-a","ip":"10.0.0.1"},'
            '"ts":1707560000123,"seq":7}'
        )
        expected = (body[:-1] + ',"s":"' + hmac_hex(body) + '"}').encode()
        got = encode("tunnel:disconnect", {"tunnel_id": "my-tunnel"}, NODE, TS, 7, KEY)
        self.assertEqual(got, expected)
        # bytes keys give the same result as the str key's UTF-8
        self.assertEqual(encode("tunnel:disconnect", {"tunnel_id": "my-tunnel"}, NODE, TS, 7, KEY.encode()), expected)

    def test_announce_array_payload(self):
        payload = [{"tunnel_id": "t", "connections": [{"connection_id": "n:u", "node": "n", "peer": "203.0.113.9",
                                                       "connected": True, "connected_at": 1}]}]
        body = json.dumps(envelope_obj(event="tunnel:announce", message=payload, seq=3), separators=(",", ":"))
        self.assertEqual(encode("tunnel:announce", payload, NODE, TS, 3, KEY), sign_text(body))

    def test_non_ascii_not_escaped(self):
        got = encode("e", {"name": "g\u00e5rd \u2603 \U0001f600"}, NODE, TS, 0, KEY)
        self.assertIn("g\u00e5rd \u2603 \U0001f600".encode("utf-8"), got)
        self.assertNotIn(b"\\u", got)
        self.assertEqual(decode(got, KEY).message, {"name": "g\u00e5rd \u2603 \U0001f600"})

    def test_index_keys_first_like_javascript(self):
        """A JS peer re-serialises {"b":..,"2":..,"10":..} with index keys first, ascending."""
        got = encode("e", {"b": 1, "10": 2, "2": 3, "02": 4, "a": {"1": 0, "z": 0}}, NODE, TS, 0, KEY)
        self.assertIn(b'"message":{"2":3,"10":2,"b":1,"02":4,"a":{"1":0,"z":0}}', got)
        decode(got, KEY)

    def test_refuses_what_javascript_cannot_carry(self):
        for bad in (1.5, float("nan"), float("inf"), {"x": [0.0]}, 2**53, -(2**53), {1: "x"}, "\ud800", object(), {"k": {1, 2}}):
            self.assertRaises(ValueError, encode, "e", bad, NODE, TS, 0, KEY)
        self.assertRaises(ValueError, encode, 1, {}, NODE, TS, 0, KEY)
        self.assertRaises(ValueError, encode, "e", {}, NODE, 1.0, 0, KEY)
        self.assertRaises(ValueError, encode, "e", {}, NODE, TS, -1, KEY)
        self.assertRaises(ValueError, encode, "e", {}, NODE, TS, True, KEY)
        self.assertRaises(ValueError, encode, "e", {}, Node(id=None, host="h", ip="i"), TS, 0, KEY)
        # the edges JavaScript keeps exact are fine
        decode(encode("e", [2**53 - 1, -(2**53 - 1), None, True, False, "", [], {}], NODE, TS, 0, KEY), KEY)

    def test_round_trip(self):
        data = encode("tunnel:announce", [{"tunnel_id": "x", "connections": []}], NODE, TS, 12, KEY)
        self.assertEqual(
            decode(data, KEY),
            Message(event="tunnel:announce", message=[{"tunnel_id": "x", "connections": []}],
                    node_id=NODE.id, host=NODE.host, ip=NODE.ip, ts=TS, seq=12),
        )


class DecodeTests(unittest.TestCase):
    def assertRejected(self, data, reason, key=KEY):
        with self.assertRaises(EnvelopeError) as cm:
            decode(data, key)
        self.assertEqual(cm.exception.reason, reason, str(cm.exception))

    def test_original_text_verifies(self):
        """A message exactly as a Node.js node sends it (signature computed here)."""
        msg = decode(sign_obj(envelope_obj(seq=5)), KEY)
        self.assertEqual((msg.event, msg.message, msg.node_id, msg.host, msg.ip, msg.ts, msg.seq),
                         ("cluster:heartbeat", {}, NODE.id, NODE.host, NODE.ip, TS, 5))

    def test_received_key_order_is_kept(self):
        """Verification re-serialises in the order received, not in a canonical one."""
        obj = {"seq": 1, "ts": TS, "node": {"ip": NODE.ip, "id": NODE.id, "host": NODE.host},
               "message": {"z": 1, "a": 2}, "event": "e"}
        self.assertEqual(decode(sign_obj(obj), KEY).seq, 1)
        # the signature placed first is fine too
        text = json.dumps(obj, separators=(",", ":"))
        data = ('{"s":"%s",' % hmac_hex(text) + text[1:]).encode()
        self.assertEqual(decode(data, KEY).seq, 1)

    def test_extra_keys_are_signed_and_accepted(self):
        self.assertEqual(decode(sign_obj(envelope_obj(extra=[1])), KEY).event, "cluster:heartbeat")

    def test_not_json(self):
        for data in (b"", b"hello", b"{", b'{"event":}', b"NaN", b'{"a":NaN}', b'{"ts":Infinity}', b"\xef\xbb\xbf{}"):
            self.assertRejected(data, "malformed")

    def test_not_an_object(self):
        for data in (b"[]", b"[1,2]", b"1", b'"s"', b"null", b"true", json.dumps([envelope_obj()]).encode()):
            self.assertRejected(data, "malformed")

    def test_non_utf8(self):
        self.assertRejected(b'{"event":"\xff"}', "malformed")
        self.assertRejected(sign_obj(envelope_obj())[:-3] + b"\xc3", "malformed")

    def test_deep_nesting(self):
        self.assertRejected(b"[" * 60000 + b"]" * 60000, "oversized")
        self.assertRejected(b"[" * 30000 + b"]" * 30000, "malformed")

    def test_oversized(self):
        big = sign_obj(envelope_obj(message={"pad": "x" * MAX_SIZE}))
        self.assertRejected(big, "oversized")
        # the limit is inclusive
        obj = envelope_obj(message={"pad": ""})
        pad = MAX_SIZE - len(sign_obj(obj))
        data = sign_obj(envelope_obj(message={"pad": "x" * pad}))
        self.assertEqual(len(data), MAX_SIZE)
        decode(data, KEY)

    def test_unsigned(self):
        self.assertRejected(json.dumps(envelope_obj()).encode(), "unsigned")
        self.assertRejected(b"{}", "unsigned")

    def test_missing_each_field(self):
        for name in envelope.FIELDS:
            obj = envelope_obj()
            del obj[name]
            self.assertRejected(sign_obj(obj), "missing-field")
        for name in envelope.NODE_FIELDS:
            obj = envelope_obj()
            del obj["node"][name]
            self.assertRejected(sign_obj(obj), "missing-field")

    def test_wrong_types(self):
        cases = [
            dict(event=1), dict(event=None), dict(node="n"), dict(node=[NODE.id]),
            dict(node={"id": 1, "host": "h", "ip": "i"}), dict(node={"id": "x", "host": None, "ip": "i"}),
            dict(node={"id": "x", "host": "h", "ip": ["i"]}),
            dict(ts="1"), dict(ts=1.5), dict(ts=True), dict(ts=None),
            dict(seq="1"), dict(seq=1.5), dict(seq=True), dict(seq=False), dict(seq=-1), dict(seq=None),
        ]
        for overrides in cases:
            self.assertRejected(sign_obj(envelope_obj(**overrides)), "malformed")

    def test_tampered_message(self):
        data = encode("tunnel:disconnect", {"tunnel_id": "a"}, NODE, TS, 0, KEY)
        self.assertRejected(data.replace(b'"tunnel_id":"a"', b'"tunnel_id":"b"'), "bad-signature")
        self.assertRejected(data.replace(b'"seq":0', b'"seq":1'), "bad-signature")
        # whitespace is not signed: the receiver re-serialises compactly, as the original does
        self.assertEqual(decode(data.replace(b'"tunnel_id":"a"', b'"tunnel_id" : "a"'), KEY).message, {"tunnel_id": "a"})

    def test_tampered_signature(self):
        data = encode("e", {}, NODE, TS, 0, KEY)
        sig = data[-66:-2]
        flipped = (b"1" if sig[:1] != b"1" else b"2") + sig[1:]
        self.assertRejected(data.replace(sig, flipped), "bad-signature")
        self.assertRejected(data.replace(sig, sig.upper()), "bad-signature")
        self.assertRejected(data.replace(sig, sig[:-2]), "bad-signature")
        self.assertRejected(data.replace(sig, b"z" * 64), "bad-signature")
        self.assertRejected(data.replace(b'"' + sig + b'"', b"12"), "bad-signature")
        self.assertRejected(data.replace(b'"' + sig + b'"', b"null"), "bad-signature")

    def test_wrong_key(self):
        self.assertRejected(encode("e", {}, NODE, TS, 0, "another key"), "bad-signature")

    def test_escaped_lone_surrogate(self):
        """JSON may escape a lone surrogate; it cannot be re-serialised as UTF-8: refused."""
        data = b'{"event":"\\ud800","message":{},"node":{"id":"a","host":"h","ip":"i"},"ts":1,"seq":0,"s":"' + b"0" * 64 + b'"}'
        self.assertRejected(data, "malformed")

    def test_reference_unicode_round_trip(self):
        obj = envelope_obj(message={"peer": "\u00e9\u4e2d\U0001f680", "ctl": "\n\t\x01\u2028"})
        data = sign_obj(obj)
        self.assertIn("\u00e9\u4e2d\U0001f680".encode(), data)
        self.assertEqual(decode(data, KEY).message, obj["message"])


class SequenceWindowTests(unittest.TestCase):
    def mask(self, w):
        return format(w.mask, "b")

    def test_reference_vectors(self):
        w = SequenceWindow()
        self.assertTrue(w.accept(2))
        self.assertEqual(self.mask(w), "1")
        self.assertTrue(w.accept(0))
        self.assertEqual(self.mask(w), "101")
        self.assertTrue(w.accept(1))
        self.assertEqual(self.mask(w), "111")

    def test_sequential_then_gap(self):
        w = SequenceWindow()
        for seq in range(35):
            self.assertTrue(w.accept(seq), seq)
        self.assertTrue(w.accept(37))
        self.assertEqual(self.mask(w), "1111111111111001")
        self.assertTrue(w.accept(35))
        self.assertEqual(self.mask(w), "1111111111111101")
        self.assertEqual(w.check(35), "replayed")
        self.assertTrue(w.accept(36))

    def test_duplicate(self):
        w = SequenceWindow()
        self.assertTrue(w.accept(0))
        self.assertTrue(w.accept(1))
        self.assertFalse(w.accept(1))
        self.assertEqual(w.check(1), "replayed")
        self.assertEqual(w.check(0), "replayed")

    def test_too_old_and_edge(self):
        w = SequenceWindow()
        self.assertTrue(w.accept(100))
        self.assertEqual(w.check(83), "too-old")
        self.assertEqual(w.check(-1), "too-old")
        # top - 16 is accepted once
        self.assertIsNone(w.check(84))
        self.assertEqual(w.check(84), "replayed")
        self.assertIsNone(w.check(85))
        self.assertIsNone(w.check(99))

    def test_big_gap_clears_mask(self):
        w = SequenceWindow()
        for seq in range(20):
            w.accept(seq)
        self.assertTrue(w.accept(36))  # gap of exactly 16
        self.assertEqual(self.mask(w), "1")
        self.assertTrue(w.accept(35))
        self.assertTrue(w.accept(10**12))  # a huge gap does not overflow anything
        self.assertEqual(self.mask(w), "1")
        self.assertEqual(w.check(10**12 - 17), "too-old")
        self.assertIsNone(w.check(10**12 - 16))

    def test_reorder_within_window(self):
        w = SequenceWindow()
        order = [0, 3, 1, 2, 7, 5, 4, 6, 15, 10, 9, 8]
        self.assertEqual([w.check(s) for s in order], [None] * 12)
        self.assertEqual([w.check(s) for s in order], ["replayed"] * 12)
        self.assertEqual([w.check(s) for s in (14, 11, 12, 13)], [None] * 4)
        # the window moves on: 3 falls out, 4 sits on the edge (accepted once more, as the original does)
        self.assertIsNone(w.check(20))
        self.assertEqual([w.check(s) for s in (3, 4, 4, 5)], ["too-old", None, "replayed", "replayed"])


class VerifierTests(unittest.TestCase):
    def test_replay_and_reorder(self):
        v = Verifier(KEY)
        msgs = [encode("e", {"n": i}, NODE, TS, i, KEY) for i in range(5)]
        self.assertEqual(v.check(msgs[1]).message, {"n": 1})
        self.assertEqual(v.check(msgs[0]).message, {"n": 0})
        self.assertEqual(v.check(msgs[4]).seq, 4)
        self.assertEqual(v.check(msgs[2]).seq, 2)
        for data in (msgs[0], msgs[1], msgs[4]):
            with self.assertRaises(EnvelopeError) as cm:
                v.check(data)
            self.assertEqual(cm.exception.reason, "replayed")
        self.assertEqual(v.check(msgs[3]).seq, 3)

    def test_too_old(self):
        v = Verifier(KEY)
        v.check(encode("e", {}, NODE, TS, 40, KEY))
        with self.assertRaises(EnvelopeError) as cm:
            v.check(encode("e", {}, NODE, TS, 3, KEY))
        self.assertEqual(cm.exception.reason, "too-old")

    def test_windows_per_sender_and_forget(self):
        other = Node(id="f" * 40, host="1@b", ip="10.0.0.2")
        v = Verifier(KEY)
        a0 = encode("e", {}, NODE, TS, 0, KEY)
        v.check(a0)
        v.check(encode("e", {}, other, TS, 0, KEY))
        self.assertRaises(EnvelopeError, v.check, a0)
        v.forget(NODE.id)
        self.assertEqual(v.senders(), [other.id])
        self.assertEqual(v.check(a0).seq, 0)

    def test_forged_messages_do_not_create_windows(self):
        v = Verifier(KEY)
        self.assertRaises(EnvelopeError, v.check, encode("e", {}, NODE, TS, 0, "wrong"))
        self.assertEqual(v.senders(), [])

    def test_bounded_senders(self):
        v = Verifier(KEY, max_senders=3)
        nodes = [Node(id="%040x" % i, host="h", ip="i") for i in range(5)]
        for n in nodes[:3]:
            v.check(encode("e", {}, n, TS, 0, KEY))
        v.check(encode("e", {}, nodes[0], TS, 1, KEY))  # heard again: most recent
        v.check(encode("e", {}, nodes[3], TS, 0, KEY))
        self.assertEqual(v.senders(), [nodes[2].id, nodes[0].id, nodes[3].id])
        # a forgotten sender starts over
        self.assertEqual(v.check(encode("e", {}, nodes[1], TS, 0, KEY)).seq, 0)
        self.assertEqual(len(v.senders()), 3)


_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53 - 1), 2**53 - 1),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=20),
)
_json = st.recursive(
    _json_leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(st.characters(exclude_categories=("Cs",)), max_size=8), children, max_size=5),
    ),
    max_leaves=30,
)


class PropertyTests(unittest.TestCase):
    @settings(derandomize=True, max_examples=200, deadline=None)
    @given(st.binary(max_size=400))
    def test_decode_arbitrary_bytes(self, data):
        try:
            decode(data, KEY)
        except EnvelopeError:
            pass

    @settings(derandomize=True, max_examples=200, deadline=None)
    @given(st.one_of(
        st.binary(max_size=200).map(lambda b: sign_text(json.dumps(envelope_obj(message=b.hex())))[:-1] + b),
        st.builds(lambda m, s: json.dumps({"message": m, "s": s}).encode(), _json, st.text(max_size=70)),
    ))
    def test_decode_near_misses(self, data):
        try:
            decode(data, KEY)
        except EnvelopeError:
            pass

    @settings(derandomize=True, max_examples=200, deadline=None)
    @given(
        st.text(max_size=20).filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s)),
        _json,
        st.integers(0, 2**53 - 1),
        st.integers(-(2**53 - 1), 2**53 - 1),
    )
    def test_round_trip(self, event, message, seq, ts):
        data = encode(event, message, NODE, ts, seq, KEY)
        msg = decode(data, KEY)
        self.assertEqual((msg.event, msg.seq, msg.ts, msg.node_id), (event, seq, ts, NODE.id))
        self.assertEqual(msg.message, message)
        # and the signature is the one an original node computes over the received order
        obj = json.loads(data)
        sig = obj.pop("s")
        self.assertEqual(sig, hmac_hex(json.dumps(obj, separators=(",", ":"), ensure_ascii=False)))
