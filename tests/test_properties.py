"""Property-based tests of the sans-I/O cores of the HTTP paths (hypothesis).

HTTP heads and body framing (`exposr.ingress.httphead`), the TLS ClientHello
parser (`exposr.ingress.clienthello`), account numbers and tunnel ids
(`exposr.model`) and option parsing (`exposr.options`): for any input they
raise nothing but their own errors, give the same answer however the input is
split, and round-trip what they produce. (Time linear in byte-by-byte input is
checked in tests/test_httphead.py, ``LinearTimeTests``.)

In CI every property runs a fixed, derandomised set of examples. A longer run
with fresh random examples:

    EXPOSR_HYPOTHESIS=long .venv/bin/python -m twisted.trial --reactor=exposr tests.test_properties
"""

import os
import re

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial import unittest

from exposr import model
from exposr.ingress import clienthello, httphead
from exposr.ingress.httphead import Body, Head, HeadError, Raw, RequestParser, ResponseParser
from exposr.options import ConfigError, parse_config

settings.register_profile("ci", derandomize=True, max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile(os.environ.get("EXPOSR_HYPOTHESIS", "ci"))


def _split(data, cuts):
    """``data`` cut at the given positions (sorted, deduplicated)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


def _normal(events):
    """Events as comparable tuples, consecutive Body (and Raw) data joined."""
    out = []
    for ev in events:
        if type(ev) in (Body, Raw) and out and out[-1][0] == type(ev).__name__:
            out[-1] = (out[-1][0], out[-1][1] + bytes(ev.data))
        elif type(ev) is Body or type(ev) is Raw:
            out.append((type(ev).__name__, bytes(ev.data)))
        elif type(ev) is Head:
            out.append(("Head", ev.head.serialize()))
        else:
            out.append(("End", tuple(ev.trailers)))
    return out


def _run(parser, chunks):
    """(normalised events, error status or None) of feeding ``chunks``."""
    events = []
    try:
        for chunk in chunks:
            events += parser.feed(chunk)
        if isinstance(parser, RequestParser) and parser.awaiting_upgrade:
            events += parser.upgraded()
        events += parser.feed_eof()
    except HeadError as e:
        return _normal(events + e.events), e.status
    return _normal(events), None


# -- HTTP framing ----------------------------------------------------------------

_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~",
                 min_size=1, max_size=12).map(str.encode)
_value = st.binary(max_size=30).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F).strip())
_fields = st.lists(st.tuples(_token, _value), max_size=8).map(
    lambda fs: [(n, v) for n, v in fs if n.lower() not in (b"content-length", b"transfer-encoding", b"host",
                                                            b"connection", b"upgrade")])
# pieces HTTP parsers care about, to reach deep states more often than random bytes would
_pieces = st.lists(st.sampled_from([
    b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\n", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 101 S\r\n",
    b"Host: a\r\n", b"Content-Length: 3\r\n", b"Content-Length: 3, 3\r\n", b"Transfer-Encoding: chunked\r\n",
    b"Connection: upgrade\r\n", b"Upgrade: x\r\n", b"\r\n", b"3\r\nabc\r\n", b"0\r\n", b"X: y\r\n",
    b"CONNECT a:1 HTTP/1.1\r\n", b"GET http://a/ HTTP/1.1\r\n", b"\n", b"\r", b" ", b"abc", b"\x00",
]), max_size=20).map(b"".join)
_input = st.one_of(st.binary(max_size=300), _pieces)


class HTTPFramingProperties(unittest.TestCase):
    @PROFILE
    @given(_input, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
    def test_request_parser_any_bytes_any_split(self, data, cuts):
        """Only HeadError, and the same events and error for every split of the input."""
        whole = _run(RequestParser(), [data])
        self.assertEqual(_run(RequestParser(), _split(data, cuts)), whole)

    @PROFILE
    @given(_input, st.lists(st.integers(min_value=0, max_value=400), max_size=8),
           st.lists(st.sampled_from([b"GET", b"HEAD", b"CONNECT", b"POST"]), max_size=4))
    def test_response_parser_any_bytes_any_split(self, data, cuts, methods):
        def parser():
            p = ResponseParser()
            for m in methods:
                p.expect(m)
            return p

        whole = _run(parser(), [data])
        self.assertEqual(_run(parser(), _split(data, cuts)), whole)

    @PROFILE
    @given(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE"]),
           st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/?=&", max_size=20).map(lambda t: b"/" + t.encode()),
           _fields, st.binary(max_size=200), st.sampled_from(["length", "chunked", "none"]),
           st.lists(st.integers(min_value=0, max_value=600), max_size=6))
    def test_request_round_trip(self, method, target, fields, body, framing, cuts):
        """A well-formed request parses to its head and body, and the head re-serialises to itself."""
        headers = [(b"Host", b"t.example")] + fields
        if framing == "length":
            headers.append((b"Content-Length", b"%d" % len(body)))
            wire_body = body
        elif framing == "chunked":
            headers.append((b"Transfer-Encoding", b"chunked"))
            wire_body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
        else:
            body = wire_body = b""
        head = httphead.RequestHead(method, target, b"HTTP/1.1", headers)
        data = head.serialize() + wire_body
        events = []
        p = RequestParser()
        for chunk in _split(data, cuts):
            events += p.feed(chunk)
        normal = _normal(events)
        self.assertEqual(normal[0], ("Head", head.serialize()))
        self.assertEqual(normal[-1][0], "End")
        got = b"".join(d for kind, d in normal[1:-1] if kind == "Body")
        self.assertEqual(got, wire_body)
        self.assertFalse(p.in_message)
        again = RequestParser().feed(events[0].head.serialize())
        self.assertEqual(again[0].head, events[0].head)


# -- ClientHello -----------------------------------------------------------------

_hello_pieces = st.lists(st.one_of(
    st.sampled_from([b"\x16\x03\x01", b"\x16\x03\x03", b"\x01\x00", b"\x00\x00", b"\x03\x03", b"\x00",
                     b"\x00\x10", b"\xff", b"\x00\x05"]),
    st.binary(max_size=40)), max_size=12).map(b"".join)


class ClientHelloProperties(unittest.TestCase):
    def outcome(self, chunks):
        p = clienthello.ClientHelloParser()
        result = None
        try:
            for chunk in chunks:
                result = p.feed(chunk)
        except clienthello.ClientHelloError as e:
            return ("error", str(e))
        if result is None:
            return None
        return ("hello", result.server_name, tuple(result.alpn or ()), result.trailing)

    @PROFILE
    @given(st.one_of(st.binary(max_size=400), _hello_pieces), st.lists(st.integers(0, 500), max_size=8))
    def test_any_bytes_any_split(self, data, cuts):
        """Only ClientHelloError, and the same answer for every split of the input."""
        self.assertEqual(self.outcome(_split(data, cuts)), self.outcome([data]))


# -- account numbers and tunnel ids ---------------------------------------------

_ACCOUNT = st.text(alphabet=model.ACCOUNT_ALPHABET, min_size=model.ACCOUNT_ID_LENGTH,
                   max_size=model.ACCOUNT_ID_LENGTH)
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class ModelProperties(unittest.TestCase):
    @PROFILE
    @given(_ACCOUNT)
    def test_account_number_round_trips(self, account):
        self.assertTrue(model.is_valid_account_id(account))
        self.assertEqual(model.normalize_account_id(model.format_account_id(account)), account)
        self.assertEqual(model.normalize_account_id(model.format_account_id(account).lower()), account)

    @PROFILE
    @given(st.one_of(st.text(max_size=40), st.none(), st.integers(), st.binary(max_size=20)))
    def test_account_number_any_input(self, value):
        out = model.normalize_account_id(value)
        self.assertTrue(out is None or model.is_valid_account_id(out))

    @PROFILE
    @given(st.one_of(st.text(max_size=80), st.text(alphabet="abcz09-", max_size=70), st.none(), st.integers()))
    def test_tunnel_id_any_input(self, value):
        valid = model.is_valid_tunnel_id(value)
        self.assertIsInstance(valid, bool)
        if model.is_valid_new_tunnel_id(value):
            # a new tunnel id is a DNS label
            self.assertTrue(valid)
            self.assertIsNotNone(_LABEL.fullmatch(value), value)


# -- options -----------------------------------------------------------------------

_NAMES = ["http-head-timeout", "http-body-timeout", "http-body-min-rate", "ingress-http-tunnel-idle-timeout",
          "api-port", "ingress", "transport", "storage-url", "transport-max-connections", "log-level",
          "ingress-http-trusted-proxies", "listen-address", "cluster", "admin-enable", "dns-server"]


class OptionProperties(unittest.TestCase):
    @PROFILE
    @given(st.lists(st.tuples(st.sampled_from(_NAMES), st.text(max_size=12)), max_size=5))
    def test_any_values_give_a_config_or_a_config_error(self, pairs):
        argv = ["--ingress-http-url", "http://t.example"]
        for name, value in pairs:
            argv.append(f"--{name}={value}")
        try:
            parse_config(argv, {})
        except ConfigError as e:
            self.assertNotIn("\n", str(e).strip())

    @PROFILE
    @given(st.floats(min_value=0.001, max_value=1e6, allow_nan=False), st.integers(0, 10 ** 6))
    def test_time_limits_round_trip(self, seconds, rate):
        config = parse_config(["--ingress-http-url", "http://t.example", f"--http-body-timeout={seconds!r}",
                               f"--http-body-min-rate={rate}"], {"EXPOSR_HTTP_HEAD_TIMEOUT": repr(seconds)})
        self.assertEqual((config.http_body_timeout, config.http_head_timeout, config.http_body_min_rate),
                         (seconds, seconds, rate))
