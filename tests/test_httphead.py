"""Tests for exposr.ingress.httphead: plain bytes in, events out."""

import random

from twisted.trial import unittest

from exposr.ingress.httphead import (
    MAX_CHUNK_LINE,
    Body,
    End,
    Head,
    HeadError,
    Raw,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    derive_base_url,
    format_base_url,
    host_of,
    parse_forwarded,
)


def merged(events):
    """Events with consecutive Body (and Raw) events joined, for comparison."""
    out = []
    for ev in events:
        if out and type(ev) in (Body, Raw) and type(out[-1]) is type(ev):
            out[-1] = type(ev)(bytes(out[-1].data) + bytes(ev.data))
        else:
            out.append(ev)
    return out


def feed_all(parser, chunks, eof=False):
    events = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    if eof:
        events.extend(parser.feed_eof())
    return events


def splits(data):
    """Every 2-part split of data."""
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]


def req(data, **kw):
    return RequestParser(**kw).feed(data)


def heads(events):
    return [ev.head for ev in events if type(ev) is Head]


GET = b"GET /path?q=1 HTTP/1.1\r\nHost: Foo.Example.com\r\nAccept: */*\r\n\r\n"
CHUNKED_BODY = (
    b"5;name=value;q=\"a \\\"b\\\"\"\r\nhello\r\n"
    b"6\r\n world\r\n"
    b"A ; ext\r\n0123456789\r\n"
    b"0\r\nX-Checksum: abc\r\nX-Other:  two words \r\n\r\n"
)
POST_CHUNKED = (
    b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY
)
POST_LENGTH = b"POST /form HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world"
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: t.example.com\r\nConnection: keep-alive, Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class HeadHelpersTests(unittest.TestCase):
    def head(self):
        return RequestHead(
            b"GET",
            b"/",
            b"HTTP/1.1",
            [
                (b"Host", b"a.example"),
                (b"X-Multi", b"one"),
                (b"Accept", b"*/*"),
                (b"x-multi", b"two"),
            ],
        )

    def test_get(self):
        h = self.head()
        self.assertEqual(h.get(b"host"), b"a.example")
        self.assertEqual(h.get("HOST"), b"a.example")
        self.assertEqual(h.get(b"X-MULTI"), b"one, two")
        self.assertIsNone(h.get(b"missing"))
        self.assertEqual(h.get(b"missing", b"d"), b"d")
        self.assertEqual(h.get_all(b"x-multi"), [b"one", b"two"])
        self.assertEqual(h.get_all(b"missing"), [])
        self.assertIn(b"ACCEPT", h)
        self.assertNotIn(b"cookie", h)

    def test_set_replaces_all_at_first_position(self):
        h = self.head()
        h.set(b"X-Multi", b"three")
        self.assertEqual(
            h.headers,
            [(b"Host", b"a.example"), (b"X-Multi", b"three"), (b"Accept", b"*/*")],
        )
        h.set("x-new", "v")
        self.assertEqual(h.headers[-1], (b"x-new", b"v"))

    def test_remove_and_add(self):
        h = self.head()
        self.assertEqual(h.remove(b"X-MULTI"), 2)
        self.assertEqual(h.remove(b"x-multi"), 0)
        h.add(b"X-Multi", b"again")
        h.add(b"X-Multi", b"more")
        self.assertEqual(h.get(b"x-multi"), b"again, more")
        self.assertEqual(len(h.headers), 4)

    def test_injection_refused(self):
        h = self.head()
        self.assertRaises(ValueError, h.set, b"X", b"a\r\nEvil: 1")
        self.assertRaises(ValueError, h.add, b"X", b"a\nb")
        self.assertRaises(ValueError, h.add, b"Bad Name", b"v")
        self.assertRaises(ValueError, h.set, b"", b"v")

    def test_keep_alive(self):
        cases = [
            (b"HTTP/1.1", [], True),
            (b"HTTP/1.1", [(b"Connection", b"close")], False),
            (b"HTTP/1.1", [(b"Connection", b"Keep-Alive, CLOSE")], False),
            (b"HTTP/1.1", [(b"Connection", b"upgrade")], True),
            (b"HTTP/1.0", [], False),
            (b"HTTP/1.0", [(b"Connection", b"Keep-Alive")], True),
            (b"HTTP/1.0", [(b"connection", b"foo"), (b"connection", b"keep-alive")], True),
        ]
        for version, headers, expected in cases:
            head = RequestHead(b"GET", b"/", version, headers)
            self.assertEqual(head.keep_alive, expected, (version, headers))
            resp = ResponseHead(200, b"OK", version, list(headers))
            self.assertEqual(resp.keep_alive, expected, (version, headers))

    def test_is_upgrade(self):
        def up(headers):
            return RequestHead(b"GET", b"/", b"HTTP/1.1", headers).is_upgrade

        self.assertTrue(up([(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]))
        self.assertTrue(
            up([(b"connection", b"keep-alive, upgrade"), (b"UPGRADE", b"h2c")])
        )
        self.assertFalse(up([(b"Upgrade", b"websocket")]))
        self.assertFalse(up([(b"Connection", b"upgrade")]))
        self.assertFalse(up([(b"Connection", b"upgrades"), (b"Upgrade", b"x")]))

    def test_content_length_and_chunked(self):
        def h(*headers):
            return RequestHead(b"POST", b"/", b"HTTP/1.1", list(headers))

        self.assertIsNone(h().content_length)
        self.assertEqual(h((b"Content-Length", b"42")).content_length, 42)
        self.assertEqual(h((b"Content-Length", b"7, 7")).content_length, 7)
        self.assertEqual(h((b"content-length", b"007")).content_length, 7)
        e = self.assertRaises(HeadError, lambda: h((b"Content-Length", b"-1")).content_length)
        self.assertEqual(e.status, 400)
        self.assertFalse(h().chunked)
        self.assertTrue(h((b"Transfer-Encoding", b"chunked")).chunked)
        self.assertTrue(h((b"Transfer-Encoding", b"gzip, Chunked")).chunked)
        self.assertTrue(
            h((b"Transfer-Encoding", b"gzip"), (b"transfer-encoding", b"chunked")).chunked
        )
        self.assertFalse(h((b"Transfer-Encoding", b"chunked, gzip")).chunked)

    def test_serialize_request(self):
        head = RequestHead(
            b"POST", b"/a?b=c", b"HTTP/1.1", [(b"Host", b"x"), (b"X-Mixed-Case", b"V a")]
        )
        self.assertEqual(
            head.serialize(),
            b"POST /a?b=c HTTP/1.1\r\nHost: x\r\nX-Mixed-Case: V a\r\n\r\n",
        )
        self.assertEqual(RequestHead(b"GET", b"/").serialize(), b"GET / HTTP/1.1\r\n\r\n")

    def test_serialize_response(self):
        self.assertEqual(
            ResponseHead(404, b"Not Found", headers=[(b"Content-Length", b"0")]).serialize(),
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        )
        self.assertEqual(
            ResponseHead(200, b"", b"HTTP/1.0").serialize(), b"HTTP/1.0 200 \r\n\r\n"
        )

    def test_parse_serialize_round_trip(self):
        data = (
            b"PUT /x%20y HTTP/1.1\r\nHost: h\r\nX-Empty:\r\nX-Sp:   padded\t \r\n"
            b"cOnTeNt-LeNgTh: 0\r\n\r\n"
        )
        head = req(data)[0].head
        self.assertEqual(head.raw, data)
        self.assertEqual(
            head.headers,
            [
                (b"Host", b"h"),
                (b"X-Empty", b""),
                (b"X-Sp", b"padded"),
                (b"cOnTeNt-LeNgTh", b"0"),
            ],
        )
        again = req(head.serialize())[0].head
        self.assertEqual(again, head)

    def test_host_of(self):
        def h(*values):
            return RequestHead(b"GET", b"/", headers=[(b"Host", v) for v in values])

        self.assertEqual(host_of(h(b"Foo.Example.COM:8080")), "foo.example.com")
        self.assertEqual(host_of(h(b"foo.localhost")), "foo.localhost")
        self.assertEqual(host_of(h(b"[::1]:8080")), "[::1]")
        self.assertEqual(host_of(h(b"first", b"second")), "first")
        self.assertEqual(host_of(h(b"")), "")
        self.assertIsNone(host_of(RequestHead(b"GET", b"/")))

    def test_repr(self):
        self.assertEqual(
            repr(Head(RequestHead(b"GET", b"/"))),
            "Head(RequestHead(b'GET', b'/', b'HTTP/1.1', []))",
        )
        self.assertEqual(
            repr(Head(ResponseHead(200, b"OK"))),
            "Head(ResponseHead(200, b'OK', b'HTTP/1.1', []))",
        )
        self.assertEqual(repr(End()), "End([])")
        self.assertNotEqual(Body(b"x"), Raw(b"x"))
        self.assertNotEqual(RequestHead(b"GET", b"/"), ResponseHead(200))

    def test_head_error_response(self):
        e = HeadError(431, "too big")
        self.assertEqual(e.status, 431)
        self.assertEqual(e.reason, "too big")
        self.assertEqual(str(e), "431 too big")
        self.assertEqual(
            e.response(),
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"Content-Length: 0\r\nConnection: close\r\n\r\n",
        )


class RequestFramingTests(unittest.TestCase):
    def test_no_body(self):
        events = req(GET)
        self.assertEqual(len(events), 2)
        head = events[0].head
        self.assertEqual(
            (head.method, head.target, head.version), (b"GET", b"/path?q=1", b"HTTP/1.1")
        )
        self.assertEqual(head.headers, [(b"Host", b"Foo.Example.com"), (b"Accept", b"*/*")])
        self.assertEqual(head.raw, GET)
        self.assertEqual(events[1], End())

    def test_content_length(self):
        events = req(POST_LENGTH)
        self.assertEqual(
            [type(e) for e in events], [Head, Body, End]
        )
        self.assertEqual(events[1].data, b"hello world")
        self.assertIsInstance(events[1].data, bytes)

    def test_content_length_zero(self):
        events = req(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual([type(e) for e in events], [Head, End])

    def test_content_length_body_chunks_are_not_copied(self):
        p = RequestParser()
        p.feed(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nab")
        chunk = b"cdefg"
        events = p.feed(chunk)
        self.assertEqual(len(events), 1)
        self.assertIs(events[0].data, chunk)
        last = b"hijGET / HTTP/1.1\r\n\r\n"
        events = p.feed(last)
        self.assertEqual(events[0], Body(b"hij"))
        self.assertEqual(events[1], End())
        self.assertEqual(events[2].head.method, b"GET")
        self.assertEqual(events[3], End())

    def test_repeated_equal_content_length(self):
        events = req(
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 3, 3\r\n\r\nabc"
        )
        self.assertEqual(merged(events)[1:], [Body(b"abc"), End()])

    def test_chunked_raw_passthrough(self):
        events = req(POST_CHUNKED)
        self.assertEqual([type(e) for e in events], [Head, Body, End])
        self.assertEqual(events[1].data, CHUNKED_BODY)
        self.assertEqual(
            events[2].trailers, [(b"X-Checksum", b"abc"), (b"X-Other", b"two words")]
        )

    def test_chunked_without_trailers(self):
        body = b"3\r\nabc\r\n0\r\n\r\n"
        events = req(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + body)
        self.assertEqual(events[1:], [Body(body), End()])

    def test_chunked_uppercase_hex_and_large(self):
        data = b"x" * 0x1AB
        body = b"1aB\r\n" + data + b"\r\n0\r\n\r\n"
        events = req(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        self.assertEqual(merged(events)[1:], [Body(body), End()])

    def test_chunked_every_split(self):
        reference = merged(req(POST_CHUNKED + GET))
        for parts in splits(POST_CHUNKED + GET):
            self.assertEqual(merged(feed_all(RequestParser(), parts)), reference, parts)

    def test_chunked_byte_by_byte(self):
        data = POST_CHUNKED + GET
        reference = merged(req(data))
        parts = [data[i : i + 1] for i in range(len(data))]
        self.assertEqual(merged(feed_all(RequestParser(), parts)), reference)

    def test_chunked_aligned_reads_one_body_per_read(self):
        p = RequestParser()
        p.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):
            read = b"4\r\nabcd\r\n"
            events = p.feed(read)
            self.assertEqual(len(events), 1)
            self.assertIs(events[0].data, read)
        self.assertEqual(p.feed(b"0\r\n\r\n"), [Body(b"0\r\n\r\n"), End()])

    def test_every_split_point(self):
        messages = [GET, POST_LENGTH, POST_CHUNKED, b"DELETE /x HTTP/1.0\r\n\r\n"]
        for message in messages:
            data = message + GET
            reference = merged(req(data))
            for parts in splits(data):
                self.assertEqual(
                    merged(feed_all(RequestParser(), parts)), reference, parts
                )

    def test_every_three_part_split_of_a_head(self):
        data = b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\n"
        reference = req(data)
        for i in range(len(data) + 1):
            for j in range(i, len(data) + 1):
                parts = [data[:i], data[i:j], data[j:]]
                self.assertEqual(feed_all(RequestParser(), parts), reference)

    def test_pipelined_in_one_feed(self):
        data = GET + POST_LENGTH + POST_CHUNKED + b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n"
        events = merged(req(data))
        self.assertEqual(
            [type(e) for e in events],
            [Head, End, Head, Body, End, Head, Body, End, Head, End],
        )
        self.assertEqual(
            [h.method for h in heads(events)], [b"GET", b"POST", b"POST", b"HEAD"]
        )
        self.assertEqual(events[3].data, b"hello world")
        self.assertEqual(events[6].data, CHUNKED_BODY)

    def test_leading_empty_lines_ignored(self):
        events = req(b"\r\n\r\n" + GET + b"\r\n" + GET)
        self.assertEqual([type(e) for e in events], [Head, End, Head, End])
        p = RequestParser()
        self.assertEqual(p.feed(b"\r"), [])
        self.assertEqual(p.feed(b"\n\r\n"), [])
        self.assertFalse(p.in_message)
        self.assertEqual(len(p.feed(GET)), 2)

    def test_http10(self):
        head = req(b"GET / HTTP/1.0\r\n\r\n")[0].head
        self.assertEqual(head.version, b"HTTP/1.0")
        self.assertFalse(head.keep_alive)

    def test_no_host_is_left_to_the_listener(self):
        self.assertIsNone(host_of(req(b"GET / HTTP/1.1\r\n\r\n")[0].head))

    def test_upgrade_waits_then_switches_to_raw(self):
        after = b"\x81\x05hello GET / HTTP/1.1\r\n\r\n"
        p = RequestParser()
        events = p.feed(UPGRADE + after)
        self.assertEqual([type(e) for e in events], [Head, End])
        self.assertTrue(events[0].head.is_upgrade)
        # nothing after the request is parsed (or passed on) before the answer
        self.assertTrue(p.awaiting_upgrade)
        self.assertTrue(p.in_message)
        self.assertEqual(p.feed(b"more"), [])
        self.assertEqual(p.upgraded(), [Raw(after + b"more")])
        self.assertTrue(p.raw_mode)
        more = b"\x00anything\r\n\r\n"
        events = p.feed(more)
        self.assertEqual(events, [Raw(more)])
        self.assertIs(events[0].data, more)
        self.assertEqual(p.feed_eof(), [])

    def test_refused_upgrade_goes_on_parsing_http(self):
        p = RequestParser()
        self.assertEqual([type(e) for e in p.feed(UPGRADE + GET[:5])], [Head, End])
        self.assertEqual(p.feed(GET[5:]), [])
        events = p.refused()
        self.assertEqual([type(e) for e in events], [Head, End])
        self.assertFalse(p.awaiting_upgrade)
        self.assertEqual([type(e) for e in p.feed(GET)], [Head, End])

    def test_upgrade_request_body_is_framed_first(self):
        p = RequestParser()
        data = UPGRADE[:-2] + b"Content-Length: 3\r\n\r\nabcRAW"
        events = p.feed(data)
        self.assertEqual([type(e) for e in events], [Head, Body, End])
        self.assertEqual(events[1], Body(b"abc"))
        self.assertEqual(p.upgraded(), [Raw(b"RAW")])

    def test_upgrade_without_trailing_bytes(self):
        p = RequestParser()
        self.assertEqual([type(e) for e in p.feed(UPGRADE)], [Head, End])
        self.assertTrue(p.awaiting_upgrade)
        self.assertEqual(p.upgraded(), [])

    def test_upgrade_every_split(self):
        data = UPGRADE + b"frame-bytes\r\n\r\nmore"
        for parts in splits(data):
            p = RequestParser()
            events = merged(feed_all(p, parts))
            self.assertEqual([type(e) for e in events], [Head, End])
            self.assertEqual(p.upgraded(), [Raw(b"frame-bytes\r\n\r\nmore")])

    def test_upgrade_header_alone_is_not_an_upgrade(self):
        events = req(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n" + GET)
        self.assertEqual([type(e) for e in events], [Head, End, Head, End])

    def test_connect_waits_for_its_answer(self):
        p = RequestParser()
        events = p.feed(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03")
        self.assertEqual(events[0].head.target, b"example.com:443")
        self.assertEqual(events[1:], [End()])
        self.assertEqual(p.upgraded(), [Raw(b"\x16\x03")])

    def test_feed_eof(self):
        p = RequestParser()
        p.feed(GET)
        self.assertEqual(p.feed_eof(), [])
        e = self.assertRaises(HeadError, p.feed, GET)
        self.assertEqual(e.status, 400)

    def test_feed_eof_inside_message(self):
        for data in [b"GET / HT", POST_LENGTH[:-1], POST_CHUNKED[:-2]]:
            p = RequestParser()
            p.feed(data)
            self.assertTrue(p.in_message)
            e = self.assertRaises(HeadError, p.feed_eof)
            self.assertEqual(e.status, 400)

    def test_accepts_bytearray_and_memoryview(self):
        self.assertEqual(req(bytearray(GET)), req(GET))
        self.assertEqual(req(memoryview(GET)), req(GET))
        self.assertEqual(RequestParser().feed(b""), [])

    def test_limits_at_the_edge(self):
        start = b"GET / HTTP/1.1\r\n"
        filler = b"X: " + b"a" * (100 - len(start) - 3 - 4) + b"\r\n\r\n"
        data = start + filler
        self.assertEqual(len(data), 100)
        self.assertEqual(len(req(data, max_head_size=100)), 2)
        e = self.assertRaises(HeadError, req, data, max_head_size=99)
        self.assertEqual(e.status, 431)
        many = start + b"".join(b"H%d: v\r\n" % i for i in range(5)) + b"\r\n"
        self.assertEqual(len(req(many, max_headers=5)), 2)
        e = self.assertRaises(HeadError, req, many, max_headers=4)
        self.assertEqual(e.status, 431)

    def test_default_limits(self):
        big = b"GET / HTTP/1.1\r\nX: " + b"a" * 16384 + b"\r\n\r\n"
        self.assertEqual(self.assertRaises(HeadError, req, big).status, 431)
        many = b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n"
        self.assertEqual(self.assertRaises(HeadError, req, many).status, 431)
        ok = b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n"
        self.assertEqual(len(req(ok)), 2)

    def test_unterminated_head_too_large(self):
        p = RequestParser(max_head_size=1000)
        p.feed(b"GET / HTTP/1.1\r\n")
        for _ in range(109):  # 16 + 109 * 9 = 997 bytes, never a CRLFCRLF
            self.assertEqual(p.feed(b"X: 12345\n"), [])
        e = self.assertRaises(HeadError, p.feed, b"X: 12345\n")
        self.assertEqual(e.status, 431)
        # and the parser stays failed
        self.assertRaises(HeadError, p.feed, b"\r\n\r\n")

    def test_unterminated_head_too_large_single_feed(self):
        e = self.assertRaises(HeadError, req, b"GET / HTTP/1.1\r\nX: " + b"a" * 20000)
        self.assertEqual(e.status, 431)


BAD_REQUESTS = [
    # request line
    (b"GET /\r\n\r\n", 400),
    (b"GET  / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1 \r\n\r\n", 400),
    (b" GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / http/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1\r\n\r\n", 400),
    (b"G(T / HTTP/1.1\r\n\r\n", 400),
    (b"GET /a b HTTP/1.1\r\n\r\n", 400),
    (b"GET /\x01 HTTP/1.1\r\n\r\n", 400),
    (b"GET\t/ HTTP/1.1\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    # header lines
    (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost\t: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\r\n\tfolded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n Host: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX(: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\nY: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\nX: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\rY: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\x1bb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\x7f\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", 400),
    # Content-Length
    (b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 1 0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 5,\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: \xd9\xa3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n", 400),
    # Transfer-Encoding
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding:\r\n\r\n", 400),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: foo, chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n", 501),
]

TE = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
BAD_CHUNKS = [
    b"zz\r\n",
    b"-1\r\n",
    b"0x5\r\n",
    b" 5\r\nhello\r\n0\r\n\r\n",
    b"5 \r\nhello\r\n0\r\n\r\n",
    b"\r\n",
    b"5\nhello\r\n0\r\n\r\n",
    b"5\r\nhelloXX0\r\n\r\n",
    b"5\r\nhello\n0\r\n\r\n",
    b"5\r\nhello0\r\n\r\n",
    b"1" * 17 + b"\r\n",
    b"5;\r\nhello\r\n",
    b"5;=x\r\nhello\r\n",
    b"5;a=\r\nhello\r\n",
    b"5;a=\"open\r\nhello\r\n",
    b"5;a\nb\r\nhello\r\n",
    b"5;a\x00\r\nhello\r\n",
    b"5;" + b"a" * (MAX_CHUNK_LINE + 10),
    b"5;" + b"a" * (MAX_CHUNK_LINE + 10) + b"\r\nhello\r\n",
    b"0\r\nBad Trailer: x\r\n\r\n",
    b"0\r\nNoColon\r\n\r\n",
    b"0\r\nX: a\x00\r\n\r\n",
    b"0\r\nX: a\r\n folded\r\n\r\n",
]


class RequestErrorTests(unittest.TestCase):
    def test_bad_requests(self):
        for data, status in BAD_REQUESTS:
            e = self.assertRaises(HeadError, req, data)
            self.assertEqual(e.status, status, (data, e))

    def test_bad_requests_split(self):
        for data, status in BAD_REQUESTS:
            for parts in splits(data):
                p = RequestParser()
                e = self.assertRaises(HeadError, feed_all, p, parts)
                self.assertEqual(e.status, status, (parts, e))

    def test_bad_chunks(self):
        for body in BAD_CHUNKS:
            p = RequestParser()
            p.feed(TE)
            e = self.assertRaises(HeadError, p.feed, body)
            self.assertEqual(e.status, 400, body)
            # once failed, always failed
            e2 = self.assertRaises(HeadError, p.feed, b"0\r\n\r\n")
            self.assertIs(e2, e)

    def test_bad_chunks_split(self):
        for body in BAD_CHUNKS:
            data = TE + body
            for parts in splits(data):
                e = self.assertRaises(HeadError, feed_all, RequestParser(), parts)
                self.assertEqual(e.status, 400, parts)

    def test_trailer_section_limits(self):
        big = b"0\r\nX: " + b"a" * 200 + b"\r\n\r\n"
        e = self.assertRaises(HeadError, req, TE + big, max_head_size=100)
        self.assertEqual(e.status, 400)
        p = RequestParser(max_head_size=100)
        p.feed(TE)
        self.assertRaises(HeadError, p.feed, big[:150])
        many = b"0\r\n" + b"X: y\r\n" * 5 + b"\r\n"
        self.assertEqual(len(req(TE + many, max_headers=5)[2].trailers), 5)
        e = self.assertRaises(HeadError, req, TE + many, max_headers=4)
        self.assertEqual(e.status, 431)

    def test_error_keeps_earlier_pipelined_events(self):
        e = self.assertRaises(HeadError, req, GET + POST_LENGTH + b"BAD\r\n\r\n" + GET)
        self.assertEqual(e.status, 400)
        self.assertEqual(
            [type(ev) for ev in e.events], [Head, End, Head, Body, End]
        )
        e = self.assertRaises(HeadError, req, b"BAD\r\n\r\n")
        self.assertEqual(e.events, [])

    def test_feed_eof_after_error(self):
        p = RequestParser()
        e = self.assertRaises(HeadError, p.feed, b"BAD\r\n\r\n")
        self.assertIs(self.assertRaises(HeadError, p.feed_eof), e)

    def test_good_chunk_extensions(self):
        for line in [b"5;a", b"5 ; a", b"5;a=b", b"5;a = b;c", b"5;a=\"x;y,z\\\"\"", b"5\t;a"]:
            body = line + b"\r\nhello\r\n0\r\n\r\n"
            events = req(TE + body)
            self.assertEqual(merged(events)[1:], [Body(body), End()], line)


def response_events(data, methods=(b"GET",), eof=False, parts=None):
    p = ResponseParser()
    for m in methods:
        p.expect(m)
    return feed_all(p, parts if parts is not None else [data], eof)


class ResponseFramingTests(unittest.TestCase):
    def test_content_length(self):
        events = response_events(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        head = events[0].head
        self.assertEqual((head.status, head.reason, head.version), (200, b"OK", b"HTTP/1.1"))
        self.assertEqual(events[1:], [Body(b"ok"), End()])

    def test_body_views_are_passed_on_as_they_are_and_heads_in_views_parse(self):
        # the ingress feeds a large body read as a view of an unmasked frame
        for framing, head in ((b"length", b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"),
                              (b"eof", b"HTTP/1.1 200 OK\r\n\r\n")):
            p = ResponseParser()
            p.expect(b"GET")
            events = p.feed(memoryview(bytearray(head + b"ab")))
            self.assertEqual(events[0].head.status, 200, framing)
            self.assertEqual(events[1], Body(b"ab"))
            chunk = memoryview(bytearray(b"cdefghij"))
            events = p.feed(chunk)
            self.assertEqual(len(events), 1)
            self.assertIs(events[0].data, chunk, framing)  # no copy
            events = p.feed(memoryview(bytearray(b"kl")))
            self.assertEqual(events[0], Body(b"kl"))
            if framing == b"length":
                self.assertEqual(events[1:], [End()])
                # the next response, in a view too
                p.expect(b"GET")
                events = p.feed(memoryview(bytearray(b"HTTP/1.1 204 No Content\r\n\r\n")))
                self.assertEqual((events[0].head.status, events[1:]), (204, [End()]))
            else:
                self.assertEqual(p.feed_eof(), [End()])

    def test_status_line_without_reason(self):
        for line in [b"HTTP/1.1 200", b"HTTP/1.1 200 "]:
            events = response_events(line + b"\r\nContent-Length: 0\r\n\r\n")
            self.assertEqual(events[0].head.reason, b"")
            self.assertEqual(events[1], End())

    def test_framing_attribute(self):
        p = ResponseParser()
        self.assertIsNone(p.framing)
        for method, data, framing in [
            (None, b"HTTP/1.1 100 Continue\r\n\r\n", "interim"),
            (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", "length"),
            (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n", "none"),
            (
                b"GET",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                "chunked",
            ),
            (b"GET", b"HTTP/1.1 200 OK\r\n\r\n", "eof"),
        ]:
            if method is not None:
                p.expect(method)
            p.feed(data)
            self.assertEqual(p.framing, framing)
        self.assertEqual(p.pending, 0)
        p = RequestParser()
        p.feed(UPGRADE)
        self.assertEqual(p.framing, "none")  # an upgrade request is framed as any request

    def test_head_response_has_no_body(self):
        data = (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        events = response_events(data, [b"HEAD", b"GET"])
        self.assertEqual(
            [type(e) for e in events], [Head, End, Head, Body, End]
        )

    def test_204_304_no_body(self):
        for status in (b"204 No Content", b"304 Not Modified"):
            data = (
                b"HTTP/1.1 " + status + b"\r\nContent-Length: 10\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
            )
            events = response_events(data, [b"GET", b"GET"])
            self.assertEqual(
                [type(e) for e in events], [Head, End, Head, Body, End], status
            )

    def test_interim_responses(self):
        data = (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 204 No Content\r\n\r\n"
        )
        p = ResponseParser()
        p.expect(b"POST")
        p.expect(b"GET")
        events = p.feed(data)
        self.assertEqual(
            [type(e) for e in events], [Head, Head, Head, Body, End, Head, End]
        )
        self.assertEqual([h.status for h in heads(events)], [100, 103, 200, 204])
        self.assertEqual([h.is_interim for h in heads(events)], [True, True, False, False])
        self.assertEqual(p.pending, 0)

    def test_101_switches_to_raw(self):
        data = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\n\x81\x11ws echo connected"
        )
        p = ResponseParser()
        p.expect(b"GET")
        events = p.feed(data)
        self.assertEqual(events[0].head.status, 101)
        self.assertFalse(events[0].head.is_interim)
        self.assertEqual(events[1], Raw(b"\x81\x11ws echo connected"))
        self.assertEqual(p.feed(b"HTTP/1.1 200 OK\r\n\r\n"), [Raw(b"HTTP/1.1 200 OK\r\n\r\n")])
        self.assertEqual(p.feed_eof(), [])

    def test_connect_2xx_is_raw(self):
        events = response_events(b"HTTP/1.1 200 Connection established\r\n\r\nxyz", [b"CONNECT"])
        self.assertEqual(events[1], Raw(b"xyz"))
        events = response_events(
            b"HTTP/1.1 407 Auth\r\nContent-Length: 1\r\n\r\nx", [b"CONNECT"]
        )
        self.assertEqual(events[1:], [Body(b"x"), End()])

    def test_close_delimited(self):
        p = ResponseParser()
        p.expect(b"GET")
        events = p.feed(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nsome")
        self.assertEqual(events[1:], [Body(b"some")])
        chunk = b" more HTTP/1.1 200 OK\r\n\r\n"
        events = p.feed(chunk)
        self.assertEqual(events, [Body(chunk)])
        self.assertIs(events[0].data, chunk)
        self.assertEqual(p.feed_eof(), [End()])
        self.assertRaises(HeadError, p.feed, b"x")

    def test_close_delimited_http11(self):
        events = response_events(b"HTTP/1.1 200 OK\r\n\r\nbody", eof=True)
        self.assertEqual(events[1:], [Body(b"body"), End()])

    def test_te_without_final_chunked_is_close_delimited(self):
        events = response_events(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\nabcdef",
            eof=True,
        )
        self.assertEqual(merged(events)[1:], [Body(b"abcdef"), End()])

    def test_chunked_wins_over_content_length(self):
        raw = (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n"
            b"X: y\r\n\r\n"
        )
        events = response_events(raw + b"4\r\nabcd\r\n0\r\n\r\n")
        head = events[0].head
        self.assertEqual(
            head.raw, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX: y\r\n\r\n"
        )
        self.assertNotIn(b"content-length", head)
        self.assertEqual(head.headers, [(b"Transfer-Encoding", b"chunked"), (b"X", b"y")])
        self.assertEqual(events[1:], [Body(b"4\r\nabcd\r\n0\r\n\r\n"), End()])

    def test_no_expectation_means_get(self):
        p = ResponseParser()
        events = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
        self.assertEqual(events[1:], [Body(b"x"), End()])

    def test_every_split_point(self):
        data = (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + CHUNKED_BODY
            + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
            + b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n"
            + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcd"
            + b"HTTP/1.0 200 OK\r\n\r\nuntil the end\r\n\r\n"
        )
        methods = [b"POST", b"HEAD", b"GET", b"GET", b"GET"]
        reference = merged(response_events(data, methods, eof=True))
        self.assertEqual(
            [type(e) for e in reference],
            [Head, Head, Body, End, Head, End, Head, End, Head, Body, End, Head, Body, End],
        )
        for parts in splits(data):
            self.assertEqual(
                merged(response_events(None, methods, eof=True, parts=parts)), reference
            )

    def test_eof_inside_message(self):
        for data in [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            b"HTTP/1.1 200 O",
        ]:
            e = self.assertRaises(HeadError, response_events, data, eof=True)
            self.assertEqual(e.status, 502)

    def test_eof_between_responses(self):
        self.assertEqual(len(response_events(b"HTTP/1.1 204 No Content\r\n\r\n", eof=True)), 2)

    def test_bad_responses(self):
        for data in [
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 099 Low\r\n\r\n",
            b"HTTP/2.0 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\x01\r\n\r\n",
            b"http/1.1 200 OK\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX : y\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: y\r\n z\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nq\r\n",
            b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n",
            b"HTTP/1.1 200 OK\r\nX: " + b"y" * 17000 + b"\r\n\r\n",
        ]:
            e = self.assertRaises(HeadError, response_events, data)
            self.assertEqual(e.status, 502, data)


class FuzzTests(unittest.TestCase):
    """Any byte input gives events or HeadError, nothing else."""

    SEEDS = [
        GET,
        POST_LENGTH,
        POST_CHUNKED,
        UPGRADE + b"raw",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY,
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.0 200 OK\r\n\r\nbody",
    ]
    ALPHABET = b"\r\n:; ,\t\"=0123456789abcdefABCDEFxX-/HTTP1.\x00\x7f\xff"

    def mutate(self, rng, data):
        data = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            i = rng.randint(0, len(data))
            if op < 0.3 and data:
                del data[min(i, len(data) - 1)]
            elif op < 0.6:
                data[i:i] = bytes([rng.choice(self.ALPHABET)])
            elif op < 0.8 and data:
                data[min(i, len(data) - 1)] = rng.randrange(256)
            else:
                j = rng.randint(0, len(data))
                data[i:i] = data[min(i, j) : max(i, j)][:64]
        return bytes(data)

    def check(self, parser_factory, data, rng):
        parser = parser_factory()
        cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 4)))
        parts = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        try:
            for part in parts:
                for ev in parser.feed(part):
                    self.assertIn(type(ev), (Head, Body, End, Raw))
            parser.feed_eof()
        except HeadError as e:
            self.assertIn(e.status, (400, 431, 501, 502, 505))
            self.assertNotIn("unparseable", e.reason)

    def response_parser(self, rng):
        def make():
            p = ResponseParser(max_head_size=512, max_headers=8)
            for _ in range(3):
                p.expect(rng.choice([b"GET", b"HEAD", b"CONNECT", b"POST"]))
            return p

        return make

    def test_random_bytes(self):
        rng = random.Random(1234)
        for _ in range(3000):
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
            self.check(RequestParser, data, rng)
            self.check(self.response_parser(rng), data, rng)

    def test_random_alphabet(self):
        rng = random.Random(99)
        for _ in range(3000):
            data = bytes(rng.choice(self.ALPHABET) for _ in range(rng.randint(0, 200)))
            self.check(lambda: RequestParser(max_head_size=256, max_headers=6), data, rng)
            self.check(self.response_parser(rng), b"HTTP/1.1 200 OK\r\n" + data, rng)

    def test_mutated_messages(self):
        rng = random.Random(7)
        for _ in range(6000):
            data = self.mutate(rng, rng.choice(self.SEEDS) + rng.choice(self.SEEDS))
            self.check(RequestParser, data, rng)
            self.check(self.response_parser(rng), data, rng)


class PlainPathTests(unittest.TestCase):
    """The one-match fast path for plain heads decides exactly as the line-by-line path."""

    SEEDS, ALPHABET, mutate = FuzzTests.SEEDS, FuzzTests.ALPHABET, FuzzTests.mutate

    def outcome(self, parser, data):
        try:
            events = parser.feed(data)
            events += parser.feed_eof()
        except HeadError as e:
            return ("error", e.status, e.reason)
        return [(type(ev).__name__, getattr(ev, "head", None), bytes(getattr(ev, "data", b"")),
                 getattr(getattr(ev, "head", None), "persistent", None)) for ev in events]

    def compare(self, make, data):
        fast = self.outcome(make(), data)
        slow_parser = make()
        slow_parser._plain_head = lambda *args: None
        self.assertEqual(fast, self.outcome(slow_parser, data), data)

    def test_fast_and_slow_paths_agree(self):
        rng = random.Random(2024)
        for _ in range(6000):
            data = self.mutate(rng, rng.choice(self.SEEDS))
            self.compare(lambda: RequestParser(max_head_size=512, max_headers=4), data)
            methods = [rng.choice([b"GET", b"HEAD", b"CONNECT"]) for _ in range(3)]

            def response_parser():
                parser = ResponseParser(max_head_size=512, max_headers=4)
                for method in methods:
                    parser.expect(method)
                return parser

            self.compare(response_parser, data)

    def test_the_fast_path_is_taken_for_plain_heads(self):
        parser = RequestParser()
        calls = []
        slow = parser._split_head
        parser._split_head = lambda *args: calls.append(args) or slow(*args)
        parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-A:  b c \t\r\n\r\n")
        self.assertEqual(calls, [])
        with self.assertRaises(HeadError):
            parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: \x01\r\n\r\n")
        self.assertEqual(len(calls), 1)


class ForwardedTests(unittest.TestCase):
    def test_parse_forwarded(self):
        self.assertEqual(
            parse_forwarded(b"for=192.0.2.60;proto=http;by=203.0.113.43"),
            [{"for": "192.0.2.60", "proto": "http", "by": "203.0.113.43"}],
        )
        self.assertEqual(
            parse_forwarded('For="[2001:db8:cafe::17]:4711", for=192.0.2.43'),
            [{"for": "[2001:db8:cafe::17]:4711"}, {"for": "192.0.2.43"}],
        )
        self.assertEqual(
            parse_forwarded('host="a,b;c" ; PROTO = https , for=x'),
            [{"host": "a,b;c", "proto": "https"}, {"for": "x"}],
        )
        self.assertEqual(parse_forwarded(r'x="a\"b\\c"'), [{"x": 'a"b\\c'}])
        self.assertEqual(parse_forwarded(", ,for=a"), [{"for": "a"}])
        self.assertEqual(parse_forwarded("garbage;proto=https"), [{"proto": "https"}])
        self.assertEqual(parse_forwarded("for=a b;proto=https"), [{"proto": "https"}])
        self.assertEqual(parse_forwarded('for="a"b, for=c'), [{"for": "c"}])
        self.assertEqual(parse_forwarded("proto=http;proto=https"), [{"proto": "http"}])
        self.assertEqual(parse_forwarded(""), [])
        self.assertEqual(parse_forwarded(None), [])
        self.assertEqual(parse_forwarded('for="unterminated'), [])

    def test_parse_forwarded_never_fails(self):
        rng = random.Random(5)
        alphabet = '=;,"\\ \tabc:[]'
        for _ in range(2000):
            value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
            for element in parse_forwarded(value):
                self.assertTrue(element)


def base(*pairs):
    return derive_base_url([(n.encode(), v.encode()) for n, v in pairs])


class DeriveBaseUrlTests(unittest.TestCase):
    def test_host_only(self):
        self.assertEqual(base(("Host", "Foo.Example.com")), ("http", "foo.example.com", None))
        self.assertEqual(base(("Host", "x.com:8080")), ("http", "x.com", 8080))
        self.assertEqual(base(("Host", "x.com:80")), ("http", "x.com", None))
        self.assertEqual(base(("Host", "x.com:")), ("http", "x.com", None))

    def test_x_forwarded_proto(self):
        self.assertEqual(
            base(("Host", "x.com:443"), ("X-Forwarded-Proto", "https")), ("https", "x.com", None)
        )
        self.assertEqual(
            base(("Host", "x.com"), ("X-Forwarded-Proto", "https,http")), ("https", "x.com", None)
        )
        self.assertEqual(
            base(("Host", "x.com"), ("X-Forwarded-Proto", " HTTPS , http")),
            ("https", "x.com", None),
        )
        self.assertEqual(
            base(("Host", "x.com"), ("X-Forwarded-Proto", '"https"')), ("https", "x.com", None)
        )
        self.assertEqual(base(("Host", "x.com"), ("X-Scheme", "https")), ("https", "x.com", None))
        self.assertEqual(
            base(("Host", "x.com"), ("X-Forwarded-Proto", "http"), ("X-Scheme", "https")),
            ("http", "x.com", None),
        )

    def test_forwarded(self):
        self.assertEqual(
            base(
                ("Host", "internal:8080"),
                ("Forwarded", 'for="[::1]";Proto="HTTPS";Host="Example.com:8443"'),
                ("X-Forwarded-Proto", "http"),
                ("X-Forwarded-Port", "9999"),
            ),
            ("https", "example.com", 8443),
        )
        # first element of the list only
        self.assertEqual(
            base(("Host", "h"), ("Forwarded", "proto=https;host=a.com, proto=http;host=b.com")),
            ("https", "a.com", None),
        )
        # repeated header lines: first line wins
        self.assertEqual(
            base(("Host", "h"), ("Forwarded", "host=a.com"), ("Forwarded", "host=b.com")),
            ("http", "a.com", None),
        )
        # Forwarded host without port: X-Forwarded-Port, then the Host port (docs/protocol.rst, "Base URL")
        self.assertEqual(
            base(("Host", "h:8080"), ("Forwarded", "host=a.com"), ("X-Forwarded-Port", "9000")),
            ("http", "a.com", 9000),
        )
        self.assertEqual(
            base(("Host", "h:8080"), ("Forwarded", "host=a.com")), ("http", "a.com", 8080)
        )
        # empty proto/host fall through
        self.assertEqual(
            base(("Host", "h"), ("Forwarded", 'proto="";host=""'), ("X-Forwarded-Proto", "https")),
            ("https", "h", None),
        )
        self.assertEqual(
            base(("Forwarded", 'host="[::1]:8443"')), ("http", "[::1]", 8443)
        )

    def test_x_forwarded_port(self):
        self.assertEqual(
            base(("Host", "x.com:8080"), ("X-Forwarded-Port", "8443")), ("http", "x.com", 8443)
        )
        self.assertEqual(
            base(
                ("Host", "x.com:8080"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Port", "443, 8080"),
            ),
            ("https", "x.com", None),
        )

    def test_ipv6(self):
        self.assertEqual(base(("Host", "[::1]:8080")), ("http", "[::1]", 8080))
        self.assertEqual(base(("Host", "[2001:DB8::1]")), ("http", "[2001:db8::1]", None))
        self.assertIsNone(base(("Host", "[zz]:80")))
        self.assertIsNone(base(("Host", "[::1")))
        self.assertIsNone(base(("Host", "[::1]x")))

    def test_invalid(self):
        self.assertIsNone(base())
        self.assertIsNone(base(("Host", "")))
        self.assertIsNone(base(("Host", "  ")))
        self.assertIsNone(base(("Host", "x.com:abc")))
        self.assertIsNone(base(("Host", "x.com:70000")))
        self.assertIsNone(base(("Host", "x.com:-1")))
        self.assertIsNone(base(("Host", "a b")))
        self.assertIsNone(base(("Host", "a/b")))
        self.assertIsNone(base(("Host", "x.com"), ("X-Forwarded-Proto", "ht tp")))
        self.assertIsNone(base(("Host", "x.com"), ("X-Forwarded-Proto", "1http")))
        self.assertIsNone(base(("Host", "x.com"), ("X-Forwarded-Port", "eighty")))
        self.assertIsNone(base(("Host", "x.com"), ("Forwarded", "host=a:b:c")))

    def test_header_sources(self):
        head = RequestParser().feed(
            b"GET / HTTP/1.1\r\nHost: A.com:8443\r\nX-Forwarded-Proto: https\r\n\r\n"
        )[0].head
        self.assertEqual(derive_base_url(head), ("https", "a.com", 8443))
        self.assertEqual(
            derive_base_url({"Host": "a.com", "x-forwarded-proto": "https"}),
            ("https", "a.com", None),
        )
        from twisted.web.http_headers import Headers

        self.assertEqual(
            derive_base_url(Headers({b"host": [b"a.com:80"], b"forwarded": [b"proto=https"]})),
            ("https", "a.com", 80),
        )

    def test_format(self):
        self.assertEqual(format_base_url(("https", "a.com", None)), "https://a.com")
        self.assertEqual(format_base_url(("http", "[::1]", 8080)), "http://[::1]:8080")


class PersistentTests(unittest.TestCase):
    """``head.persistent``: the sender's keep-alive wish as received, kept when headers are edited."""

    def _request(self, version, connection=None):
        extra = b"Connection: %s\r\n" % connection if connection else b""
        events = RequestParser().feed(b"GET / %s\r\nHost: a\r\n%s\r\n" % (version, extra))
        return events[0].head

    def _response(self, version, connection=None):
        extra = b"Connection: %s\r\n" % connection if connection else b""
        events = ResponseParser().feed(b"%s 200 OK\r\nContent-Length: 0\r\n%s\r\n" % (version, extra))
        return events[0].head

    def test_by_version_and_connection_tokens(self):
        for parse in (self._request, self._response):
            self.assertTrue(parse(b"HTTP/1.1").persistent)
            self.assertFalse(parse(b"HTTP/1.1", b"Close").persistent)
            self.assertFalse(parse(b"HTTP/1.1", b"keep-alive, close").persistent)
            self.assertFalse(parse(b"HTTP/1.0").persistent)
            self.assertTrue(parse(b"HTTP/1.0", b"Keep-Alive").persistent)

    def test_survives_header_edits_unlike_keep_alive(self):
        head = self._request(b"HTTP/1.1", b"close")
        head.remove(b"connection")
        self.assertTrue(head.keep_alive)
        self.assertFalse(head.persistent)

    def test_unset_on_heads_built_by_hand(self):
        self.assertIsNone(RequestHead(b"GET", b"/").persistent)


class _Counted(bytearray):
    """A bytearray that counts the bytes its searches look at and its copies take."""

    work = 0

    def find(self, sub, start=0, end=None):
        stop = len(self) if end is None else min(end, len(self))
        _Counted.work += max(0, stop - max(0, start))
        return bytearray.find(self, sub, start, stop)

    def __bytes__(self):
        _Counted.work += len(self)
        return bytes(memoryview(self))


class LinearTimeTests(unittest.TestCase):
    """Input arriving byte by byte costs work linear in its size.

    The parser's buffers are counting bytearrays: every byte a search looks
    at and every byte copied out counts, so the measure is the parser's own
    work, whatever else the machine is doing (quadratic work was 0.9 s for a
    50 KB trailer section, 158 s for 400 KB).
    """

    def work(self, prefix, data):
        from unittest import mock

        from exposr.ingress import httphead

        events = []
        with mock.patch.object(httphead, "bytearray", _Counted, create=True):
            p = RequestParser(max_head_size=1 << 22)
            events += p.feed(prefix) if prefix else []
            _Counted.work = 0
            for i in range(len(data)):
                events += p.feed(data[i:i + 1])
        return _Counted.work, events

    def assert_linear(self, make):
        small, _ = self.work(*make(20000))
        large, events = self.work(*make(160000))
        # 8 times the bytes: 8 times the work (quadratic: 64 times)
        self.assertGreater(small, 20000)  # (the counting saw the parser's buffer)
        self.assertLess(large / small, 10, (small, large))
        return events

    def test_trailer_section_byte_by_byte(self):
        def make(n):
            return (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n",
                    b"X-T: " + b"a" * n + b"\r\n\r\n")

        events = self.assert_linear(make)
        self.assertEqual(events[-1], End([(b"X-T", b"a" * 160000)]))

    def test_head_byte_by_byte(self):
        events = self.assert_linear(lambda n: (b"", b"GET / HTTP/1.1\r\nX-H: " + b"a" * n + b"\r\n\r\n"))
        self.assertEqual(events[0].head.get_all(b"x-h"), [b"a" * 160000])


class TargetFormTests(unittest.TestCase):
    def test_absolute_form_becomes_origin_form(self):
        head = req(b"GET HTTP://A.example:8080?x=1 HTTP/1.1\r\nHost: b.example\r\n\r\n")[0].head
        self.assertEqual(head.target, b"/?x=1")
        self.assertEqual(head.get_all(b"host"), [b"A.example:8080"])
        self.assertEqual(host_of(head), "a.example")
        self.assertIn(b"GET /?x=1 HTTP/1.1\r\n", head.raw)

    def test_other_forms_are_refused(self):
        for target in (b"ftp://a.example/", b"http://user@a.example/", b"http:///x", b"x/y"):
            p = RequestParser()
            e = self.assertRaises(HeadError, p.feed, b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
            self.assertEqual(e.status, 400, target)

    def test_asterisk_and_connect_forms_stay(self):
        self.assertEqual(req(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")[0].head.target, b"*")
        head = req(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n")[0].head
        self.assertEqual(head.target, b"a.example:443")

    def test_content_length_list_normalised(self):
        for lines in ([b"Content-Length: 3, 3"], [b"Content-Length: 3", b"Content-Length: 3"]):
            events = req(b"PUT / HTTP/1.1\r\nHost: a\r\n" + b"\r\n".join(lines) + b"\r\n\r\nabc")
            head = events[0].head
            self.assertEqual(head.get_all(b"content-length"), [b"3"])
            self.assertIn(b"\r\nContent-Length: 3\r\n", head.raw)
            self.assertEqual(events[1], Body(b"abc"))
