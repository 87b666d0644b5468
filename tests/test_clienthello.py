"""Tests of exposr.ingress.clienthello (sans-I/O ClientHello parser)."""

import os
import random
import shutil
import socket
import ssl
import struct
import subprocess
import time

from twisted.trial import unittest

from exposr.ingress.clienthello import (
    MAX_RECORD_LENGTH,
    ClientHello,
    ClientHelloError,
    ClientHelloParser,
)

# -- ClientHello sources ------------------------------------------------------


def python_hello(server_name="t1.example.test", alpn=("h2", "http/1.1"), tls13=True):
    """The first flight of Python's ssl module, produced with MemoryBIOs."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if not tls13:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def openssl_hello(*args, timeout=10.0):
    """The bytes `openssl s_client` sends first, captured on a local socket."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise unittest.SkipTest("openssl not installed")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(timeout)
    port = listener.getsockname()[1]
    proc = subprocess.Popen(
        [openssl, "s_client", "-connect", f"127.0.0.1:{port}", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        conn, _ = listener.accept()
        conn.settimeout(timeout)
        parser = ClientHelloParser()
        deadline = time.monotonic() + timeout
        data = b""
        while time.monotonic() < deadline:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
            hello = parser.feed(chunk)
            if hello is not None:
                conn.close()
                return hello.raw
        raise AssertionError(f"no ClientHello from openssl (got {data!r})")
    finally:
        listener.close()
        proc.stdin.close()
        proc.kill()
        proc.wait(timeout)


def build_hello(
    server_name="t1.example.test",
    alpn=(b"http/1.1",),
    padding=0,
    extensions=None,
    session_id=b"\x00" * 32,
    ciphers=b"\x13\x01\x13\x02",
    compression=b"\x00",
):
    """A synthetic ClientHello handshake message (no record header)."""
    if extensions is None:
        extensions = []
        if server_name is not None:
            name = server_name.encode("ascii")
            entry = b"\x00" + struct.pack("!H", len(name)) + name
            extensions.append((0, struct.pack("!H", len(entry)) + entry))
        if alpn:
            lst = b"".join(bytes([len(p)]) + p for p in alpn)
            extensions.append((16, struct.pack("!H", len(lst)) + lst))
        if padding:
            extensions.append((21, b"\x00" * padding))
    ext = b"".join(struct.pack("!HH", t, len(d)) + d for t, d in extensions)
    body = (
        b"\x03\x03"
        + os.urandom(32)
        + bytes([len(session_id)])
        + session_id
        + struct.pack("!H", len(ciphers))
        + ciphers
        + bytes([len(compression)])
        + compression
        + struct.pack("!H", len(ext))
        + ext
    )
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(handshake, sizes=None, version=b"\x03\x01"):
    """Wrap handshake bytes into records of the given fragment sizes."""
    out = b""
    pos = 0
    sizes = list(sizes or [])
    while pos < len(handshake):
        n = sizes.pop(0) if sizes else MAX_RECORD_LENGTH
        frag = handshake[pos : pos + n]
        out += b"\x16" + version + struct.pack("!H", len(frag)) + frag
        pos += n
    return out


def unwrap(raw):
    """The handshake bytes of a captured flight made of handshake records."""
    hs = b""
    pos = 0
    while pos < len(raw):
        assert raw[pos] == 0x16, raw[pos]
        (n,) = struct.unpack("!H", raw[pos + 3 : pos + 5])
        hs += raw[pos + 5 : pos + 5 + n]
        pos += 5 + n
    return hs


def feed_bytewise(parser, data):
    result = None
    for i in range(len(data)):
        result = parser.feed(data[i : i + 1])
        if result is not None and i != len(data) - 1:
            raise AssertionError(f"result after {i + 1} of {len(data)} bytes")
    return result


# -- tests --------------------------------------------------------------------


class RealClientHelloTests(unittest.TestCase):
    def check(self, raw, server_name, alpn):
        for name, feed in [
            ("whole", lambda p, d: p.feed(d)),
            ("bytewise", feed_bytewise),
        ]:
            parser = ClientHelloParser()
            hello = feed(parser, raw)
            self.assertIsInstance(hello, ClientHello, name)
            self.assertEqual(hello.server_name, server_name, name)
            self.assertEqual(hello.alpn, alpn, name)
            self.assertEqual(hello.consumed, len(raw), name)
            self.assertEqual(hello.raw, raw, name)
            self.assertEqual(hello.trailing, b"", name)
        # Split across two and three records, whole and byte by byte.
        hs = unwrap(raw)
        for sizes in ([1], [3], [4], [5, 7], [len(hs) // 2], [len(hs) // 3, len(hs) // 3], [len(hs) - 1]):
            split = records(hs, sizes)
            expected_records = len(sizes) + 1
            for feed in (lambda p, d: p.feed(d), feed_bytewise):
                hello = feed(ClientHelloParser(), split)
                self.assertIsNotNone(hello, sizes)
                self.assertEqual(hello.server_name, server_name)
                self.assertEqual(hello.alpn, alpn)
                self.assertEqual(hello.consumed, len(split))
                self.assertEqual(hello.records, expected_records)
        return hs

    def test_python_tls13(self):
        raw = python_hello("t1.example.test", ("h2", "http/1.1"))
        self.check(raw, "t1.example.test", [b"h2", b"http/1.1"])

    def test_python_tls12_no_alpn(self):
        raw = python_hello("abc.Example.COM", None, tls13=False)
        self.check(raw, "abc.Example.COM", [])

    def test_python_no_sni(self):
        raw = python_hello(None, ("http/1.1",))
        self.check(raw, None, [b"http/1.1"])

    def test_openssl_s_client(self):
        raw = openssl_hello("-servername", "x.example.com")
        self.check(raw, "x.example.com", [])

    def test_openssl_s_client_alpn(self):
        raw = openssl_hello("-servername", "x.example.com", "-alpn", "h2,http/1.1")
        self.check(raw, "x.example.com", [b"h2", b"http/1.1"])

    def test_openssl_s_client_tls12(self):
        raw = openssl_hello("-servername", "t2.example.test", "-tls1_2")
        self.check(raw, "t2.example.test", [])

    def test_trailing_bytes_kept(self):
        """Bytes after the hello (e.g. TLS 1.3 early data) are kept, not parsed."""
        raw = python_hello()
        parser = ClientHelloParser()
        hello = parser.feed(raw + b"\x14\x03\x03\x00\x01\x01")
        self.assertEqual(hello.consumed, len(raw))
        self.assertEqual(hello.trailing, b"\x14\x03\x03\x00\x01\x01")
        again = parser.feed(b"more")
        self.assertEqual(again.trailing, b"\x14\x03\x03\x00\x01\x01more")
        self.assertEqual(again.raw, raw)
        self.assertEqual(parser.buffered, raw + b"\x14\x03\x03\x00\x01\x01")

    def test_every_truncation_needs_more(self):
        raw = python_hello()
        for i in range(len(raw)):
            self.assertIsNone(ClientHelloParser().feed(raw[:i]), i)

    def test_large_hello_across_records(self):
        hs = build_hello("big.example.test", padding=40000)
        raw = records(hs)
        self.assertGreater(len(raw), 2 * MAX_RECORD_LENGTH)
        hello = ClientHelloParser(max_size=65536).feed(raw)
        self.assertEqual(hello.server_name, "big.example.test")
        self.assertEqual(hello.records, 3)

    def test_no_extensions(self):
        hs = build_hello(extensions=[])
        # Drop the (empty) extensions block entirely, as SSLv3-era clients did.
        body = hs[4:-2]
        hello = ClientHelloParser().feed(records(b"\x01" + len(body).to_bytes(3, "big") + body))
        self.assertEqual((hello.server_name, hello.alpn), (None, []))

    def test_unknown_name_type_ignored(self):
        entry = b"\x01\x00\x03abc" + b"\x00\x00\x05a.b.c"
        ext = [(0, struct.pack("!H", len(entry)) + entry)]
        hello = ClientHelloParser().feed(records(build_hello(extensions=ext)))
        self.assertEqual(hello.server_name, "a.b.c")


class RejectTests(unittest.TestCase):
    def assertRejects(self, data, fragment, max_size=16384, bytewise=False):
        parser = ClientHelloParser(max_size=max_size)
        with self.assertRaises(ClientHelloError) as cm:
            if bytewise:
                feed_bytewise(parser, data)
            else:
                parser.feed(data)
        self.assertIn(fragment, cm.exception.reason)
        self.assertIn(fragment, str(cm.exception))
        # Sticky: every later feed fails the same way.
        self.assertRaises(ClientHelloError, parser.feed, b"\x16")
        return cm.exception

    def test_plain_http(self):
        self.assertRejects(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "plain HTTP")
        # Rejected on the first byte.
        self.assertRejects(b"G", "plain HTTP")

    def test_garbage(self):
        self.assertRejects(b"\x00\x01\x02\x03\x04\x05", "not a TLS handshake record")
        self.assertRejects(b"\x17\x03\x03\x00\x10" + b"x" * 16, "content type 0x17")
        self.assertRejects(b"\x16\x02\x00\x00\x10", "record version")
        self.assertRejects(b"SSH-2.0-OpenSSH_9.6\r\n", "not a TLS handshake record")

    def test_sslv2(self):
        v2 = b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + b"\x07\x00\xc0" * 7 + os.urandom(16)
        self.assertRejects(v2, "SSLv2")
        self.assertRejects(v2, "SSLv2", bytewise=True)

    def test_not_client_hello(self):
        server_hello = b"\x02" + build_hello()[1:]
        self.assertRejects(records(server_hello), "not a ClientHello")
        self.assertRejects(records(server_hello), "not a ClientHello", bytewise=True)

    def test_record_lengths(self):
        self.assertRejects(b"\x16\x03\x01\x00\x00", "empty handshake record")
        self.assertRejects(b"\x16\x03\x01\x40\x01", "exceeds 16384")

    def test_too_large(self):
        hs = build_hello(padding=20000)
        self.assertRejects(records(hs), "too large")
        self.assertRejects(records(hs)[:9], "too large")  # known from the header alone
        self.assertRejects(records(build_hello(padding=200)), "too large", max_size=200)

    def test_interrupted_by_other_record(self):
        hs = build_hello()
        data = records(hs[:10]) + b"\x15\x03\x03\x00\x02\x02\x28" + records(hs[10:])
        self.assertRejects(data, "interrupted")

    def test_trailing_data_in_record(self):
        self.assertRejects(records(build_hello() + b"\x0f\x00\x00\x00"), "trailing data")

    def test_malformed_body(self):
        cases = {
            "session id longer": build_hello(session_id=b"x" * 33),
            "cipher_suites": build_hello(ciphers=b"\x13"),
            "no compression": build_hello(compression=b""),
            "duplicate extension": build_hello(extensions=[(5, b""), (5, b"")]),
            "empty host_name": build_hello(server_name=""),
            "more than one host_name": build_hello(
                extensions=[(0, b"\x00\x0a" + b"\x00\x00\x02ab" + b"\x00\x00\x02cd")]
            ),
            "not ASCII": build_hello(extensions=[(0, b"\x00\x05\x00\x00\x02\xc3\xa9")]),
            "invalid characters": build_hello(extensions=[(0, b"\x00\x06\x00\x00\x03a b")]),
            "empty ALPN list": build_hello(extensions=[(16, b"\x00\x00")]),
            "empty ALPN protocol": build_hello(extensions=[(16, b"\x00\x01\x00")]),
        }
        body = build_hello()[4:] + b"xx"
        cases["after the extensions"] = b"\x01" + len(body).to_bytes(3, "big") + body
        for fragment, hs in cases.items():
            with self.subTest(fragment):
                self.assertRejects(records(hs), fragment)

    def test_length_overflow(self):
        hs = bytearray(build_hello())
        # Inflate the extensions length (last two bytes before the extensions).
        body_len = int.from_bytes(hs[1:4], "big")
        ext_len_at = 4 + 2 + 32 + 1 + 32 + 2 + 4 + 1 + 1
        hs[ext_len_at : ext_len_at + 2] = struct.pack("!H", body_len)
        self.assertRejects(records(bytes(hs)), "malformed ClientHello")


class FuzzTests(unittest.TestCase):
    """Nothing but ClientHelloError (or None / a result) on any input."""

    def feed_all(self, data, chunk):
        parser = ClientHelloParser()
        try:
            for i in range(0, len(data), chunk):
                parser.feed(data[i : i + chunk])
        except ClientHelloError as e:
            # The defensive catch-all in feed() must never be what answered.
            self.assertNotIn("internal", e.reason, data)

    def test_random_bytes(self):
        rng = random.Random(1234)
        for _ in range(3000):
            n = rng.randrange(0, 300)
            data = bytes(rng.randrange(256) for _ in range(n))
            if rng.random() < 0.7:  # make it look like a record often
                data = b"\x16\x03" + data
            self.feed_all(data, rng.choice([1, 3, 7, 1000]))

    def test_mutated_real_hello(self):
        rng = random.Random(4321)
        seeds = [python_hello(), python_hello(None, None, tls13=False), records(build_hello(), [50])]
        for _ in range(3000):
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 6)):
                i = rng.randrange(len(data))
                data[i] = rng.randrange(256)
            if rng.random() < 0.3:
                data = data[: rng.randrange(len(data))]
            self.feed_all(bytes(data), rng.choice([1, 5, 10000]))

    def test_truncations_and_extensions(self):
        raw = python_hello()
        for i in range(len(raw)):
            self.feed_all(raw[:i], 1)
            self.feed_all(raw[:i] + b"\xff" * 8, 10000)
