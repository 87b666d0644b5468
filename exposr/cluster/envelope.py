"""The signed envelope of every cluster bus message (sans-I/O).

A message is one JSON object, byte-compatible with the original Node.js nodes::

    {"event":"<name>","message":<any JSON>,"node":{"id":"<node id>","host":"<host>","ip":"<ip>"},"ts":<epoch ms>,"seq":<int>,"s":"<hex>"}

* ``s`` is the lower-case hex HMAC-SHA256, keyed with the UTF-8 bytes of the
  cluster key, of the compact JSON of the object without ``s`` (keys in that
  order, no whitespace, non-ASCII characters not escaped). The text sent is
  that same JSON with ``,"s":"<hex>"`` inserted before the final ``}``.
* A receiver parses the JSON, removes ``s``, re-serialises the rest compactly
  in the order the keys arrived, and compares HMACs in constant time.
* ``ts`` (sender's wall clock, ms) is not checked for freshness. ``seq`` counts
  from 0 per sender process; `SequenceWindow` drops replays and anything more
  than 16 behind the highest seen.

`encode` refuses what a JavaScript peer would re-serialise differently: floats
(and NaN/Infinity), integers beyond +/-(2**53 - 1), non-string object keys and
lone surrogates. Object keys that look like array indices ("0", "17") are put
first in ascending order, as JavaScript objects keep them, so that a Node.js
peer's re-serialisation matches what was signed.

`decode` never raises anything but an `EnvelopeError`, whose ``reason`` is a
short word for metrics and logs.
"""

import collections
import hashlib
import hmac
import json
import re

import attrs

#: Largest envelope accepted, checked before parsing (UDP datagrams are smaller).
MAX_SIZE = 64 * 1024

#: Window of the replay check: seqs more than this far below the highest are too old.
WINDOW = 16

#: Senders whose replay windows are kept at most (the least recently heard is forgotten).
MAX_SENDERS = 4096

FIELDS = ("event", "message", "node", "ts", "seq")
NODE_FIELDS = ("id", "host", "ip")

_MAX_SAFE_INT = 2**53 - 1
_MAX_INDEX = 2**32 - 2
_INDEX = re.compile(r"0|[1-9][0-9]{0,9}")
_HEX_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_SEPARATORS = (",", ":")


class EnvelopeError(Exception):
    """A message that is dropped; ``reason`` names why."""

    reason = "invalid"


class Oversized(EnvelopeError):
    reason = "oversized"


class Malformed(EnvelopeError):
    reason = "malformed"


class Unsigned(EnvelopeError):
    reason = "unsigned"


class BadSignature(EnvelopeError):
    reason = "bad-signature"


class MissingField(EnvelopeError):
    reason = "missing-field"


class Replayed(EnvelopeError):
    reason = "replayed"


class TooOld(EnvelopeError):
    reason = "too-old"


@attrs.frozen(hash=False)
class Message:
    """A verified bus message."""

    event: str
    message: object
    node_id: str
    host: str
    ip: str
    ts: int
    seq: int


def key_bytes(key):
    """The HMAC key: a str cluster key as UTF-8, bytes as they are."""
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, (bytes, bytearray)):
        return bytes(key)
    raise TypeError("the cluster key must be str or bytes")


def _sign(body, key):
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def _is_index(key):
    return _INDEX.fullmatch(key) is not None and int(key) <= _MAX_INDEX


def _portable(value):
    """A copy of ``value`` that serialises as JavaScript would, else ValueError."""
    cls = type(value)
    # the common exact types first (an announcement of thousands of tunnels is
    # copied every few seconds)
    if cls is str or value is None or value is True or value is False:
        return value
    if cls is dict:
        return _portable_object(value)
    if cls is list:
        return [_portable(v) for v in value]
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        if -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT:
            return int(value)
        raise ValueError("integer out of the range JavaScript keeps exact: %d" % value)
    if isinstance(value, float):
        raise ValueError("floats are not allowed in bus messages: %r" % value)
    if isinstance(value, dict):
        return _portable_object(value)
    if isinstance(value, (list, tuple)):
        return [_portable(v) for v in value]
    raise ValueError("not JSON-able: %s" % type(value).__name__)


def _portable_object(value):
    """An object's copy with JavaScript's key order: array-index keys first, ascending."""
    indices = []
    for k in value:
        if type(k) is not str and not isinstance(k, str):
            raise ValueError("object keys must be strings, not %r" % (k,))
        if k[:1].isdigit() and _is_index(k):
            indices.append(k)
    if not indices:
        return {(k if type(k) is str else str(k)): _portable(v) for k, v in value.items()}
    indices.sort(key=int)
    out = {str(k): _portable(value[k]) for k in indices}
    for k, v in value.items():
        if k not in out:
            out[str(k)] = _portable(v)
    return out


def _strict_int(value, name):
    if type(value) is not int:
        raise ValueError("%s must be an integer" % name)
    return value


def encode(event, message, node, ts, seq, key):
    """
    The signed UTF-8 JSON text of one message from ``node`` (an object with
    ``id``, ``host`` and ``ip``); ``key`` is the cluster key (str or bytes).
    Raises ValueError for anything that cannot be sent faithfully.
    """
    if not isinstance(event, str):
        raise ValueError("event must be a string")
    ident = {}
    for name in NODE_FIELDS:
        v = getattr(node, name)
        if not isinstance(v, str):
            raise ValueError("node.%s must be a string" % name)
        ident[name] = str(v)
    _strict_int(ts, "ts")
    if _strict_int(seq, "seq") < 0:
        raise ValueError("seq must not be negative")
    obj = {"event": str(event), "message": _portable(message), "node": ident, "ts": ts, "seq": seq}
    try:
        body = json.dumps(obj, separators=_SEPARATORS, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("strings must not contain lone surrogates")
    return b"%s,\"s\":\"%s\"}" % (body[:-1], _sign(body, key_bytes(key)).encode("ascii"))


def _reject_constant(name):
    raise ValueError("%s is not JSON" % name)


def decode(data, key):
    """
    Verify one received envelope (bytes) and return its `Message`; raises an
    `EnvelopeError` subclass otherwise. The replay check is `Verifier`'s.
    """
    if len(data) > MAX_SIZE:
        raise Oversized("%d bytes, more than %d" % (len(data), MAX_SIZE))
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("not UTF-8")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise Malformed("not JSON")
    if type(obj) is not dict:
        raise Malformed("not a JSON object")
    if "s" not in obj:
        raise Unsigned("no signature")
    signature = obj.pop("s")
    if type(signature) is not str or _HEX_SIGNATURE.fullmatch(signature) is None:
        raise BadSignature("signature is not 64 lower-case hex digits")
    try:
        body = json.dumps(obj, separators=_SEPARATORS, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, RecursionError):
        # a lone surrogate or an out-of-range number: not something a peer signs
        raise Malformed("cannot be re-serialised")
    if not hmac.compare_digest(_sign(body, key_bytes(key)), signature):
        raise BadSignature("signature does not match")
    for name in FIELDS:
        if name not in obj:
            raise MissingField(name)
    node = obj["node"]
    if type(node) is not dict:
        raise Malformed("node is not an object")
    for name in NODE_FIELDS:
        if name not in node:
            raise MissingField("node." + name)
        if type(node[name]) is not str:
            raise Malformed("node.%s is not a string" % name)
    if type(obj["event"]) is not str:
        raise Malformed("event is not a string")
    if type(obj["ts"]) is not int:
        raise Malformed("ts is not an integer")
    seq = obj["seq"]
    if type(seq) is not int or seq < 0:
        raise Malformed("seq is not a non-negative integer")
    return Message(
        event=obj["event"],
        message=obj["message"],
        node_id=node["id"],
        host=node["host"],
        ip=node["ip"],
        ts=obj["ts"],
        seq=seq,
    )


class SequenceWindow:
    """
    One sender's replay window: ``top`` is the highest seq accepted (0 at
    first), bit k of ``mask`` set means seq ``top - k`` was accepted.

    A seq below ``top - 16`` is too old; a seq above ``top`` shifts the mask
    (a jump of 16 or more clears it); a seq whose bit is set is a replay.
    ``top - 16`` itself is accepted once, as the original does.
    """

    __slots__ = ("top", "mask")

    def __init__(self):
        self.top = 0
        self.mask = 0

    def check(self, seq):
        """Record ``seq``: None when accepted, else ``"too-old"`` or ``"replayed"``."""
        if seq < 0 or seq < self.top - WINDOW:
            return "too-old"
        if seq > self.top:
            gap = seq - self.top
            self.mask = (self.mask << gap) & 0xFFFF if gap < WINDOW else 0
            self.top = seq
        bit = 1 << (self.top - seq)
        if self.mask & bit:
            return "replayed"
        self.mask |= bit
        return None

    def accept(self, seq):
        """Record ``seq``; True when it is new."""
        return self.check(seq) is None


class Verifier:
    """
    Verifies envelopes and keeps one `SequenceWindow` per sender node id.

    Only messages with a valid signature create or touch a window; at most
    ``max_senders`` windows are kept, the least recently heard sender is
    forgotten first.
    """

    def __init__(self, key, max_senders=MAX_SENDERS):
        self._key = key_bytes(key)
        self.max_senders = max(1, max_senders)
        self._windows = collections.OrderedDict()

    def check(self, data):
        """The verified, new `Message` in ``data``, else an `EnvelopeError`."""
        msg = decode(data, self._key)
        windows = self._windows
        window = windows.get(msg.node_id)
        if window is None:
            window = windows[msg.node_id] = SequenceWindow()
            while len(windows) > self.max_senders:
                windows.popitem(last=False)
        else:
            windows.move_to_end(msg.node_id)
        reason = window.check(msg.seq)
        if reason == "replayed":
            raise Replayed("seq %d from %s already received" % (msg.seq, msg.node_id))
        if reason is not None:
            raise TooOld("seq %d from %s is behind %d" % (msg.seq, msg.node_id, window.top))
        return msg

    def forget(self, node_id):
        """Drop a sender's window (it was removed from the cluster)."""
        self._windows.pop(node_id, None)

    def senders(self):
        """The node ids with a window, least recently heard first."""
        return list(self._windows)
