"""Header rewriting and loop detection of the HTTP ingress with plain bytes."""

from twisted.trial import unittest

from exposr.config import DEFAULT_TRUSTED_PROXIES
from exposr.ingress import forwarding, httphead

NODE = "a" * 40
TRUSTED = forwarding.parse_networks(DEFAULT_TRUSTED_PROXIES)


def head_of(*lines, target=b"/"):
    data = b"GET " + target + b" HTTP/1.1\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
    events = httphead.RequestParser().feed(data)
    return events[0].head


def rewritten(*lines, peer="127.0.0.2", target_url="https://echo.localhost.example", networks=TRUSTED, local=True):
    head = head_of(*lines)
    trusted = forwarding.is_trusted(peer, networks)
    ip = forwarding.client_ip(peer, head, networks)
    base = forwarding.base_url(head, trusted)
    forwarding.Rewriter(NODE).rewrite(head, ip, base, target_url, local=local)
    return head


class ForwardedHeadersTests(unittest.TestCase):
    def test_reference_vectors_without_proxy_headers(self):
        h = rewritten(b"Host: T.localhost.example")
        self.assertEqual(h.get(b"x-forwarded-for"), b"127.0.0.2")
        self.assertEqual(h.get(b"x-real-ip"), b"127.0.0.2")
        self.assertEqual(h.get(b"x-forwarded-proto"), b"http")
        self.assertEqual(h.get(b"x-forwarded-host"), b"t.localhost.example")
        self.assertEqual(h.get(b"forwarded"), b"by=_exposr;for=127.0.0.2;host=t.localhost.example;proto=http")
        self.assertEqual(h.get(b"exposr-via"), NODE.encode())
        self.assertIsNone(h.get(b"x-forwarded-port"))

    def test_reference_vectors_with_proxy_headers(self):
        h = rewritten(b"Host: T.localhost.example", b"X-Forwarded-For: 127.0.0.3", b"X-Forwarded-Proto: https")
        self.assertEqual(h.get(b"x-forwarded-for"), b"127.0.0.3")
        self.assertEqual(h.get(b"x-real-ip"), b"127.0.0.3")
        self.assertEqual(h.get(b"x-forwarded-proto"), b"https")
        self.assertEqual(h.get(b"forwarded"), b"by=_exposr;for=127.0.0.3;host=t.localhost.example;proto=https")

    def test_chain_collapsed_to_first_element(self):
        h = rewritten(b"Host: T.localhost.example", b"X-Forwarded-For: 10.0.0.1 , 10.0.0.2", b"X-Forwarded-For: 10.0.0.3")
        self.assertEqual(h.get_all(b"x-forwarded-for"), [b"10.0.0.1"])

    def test_invalid_forwarded_for_gives_empty(self):
        h = rewritten(b"Host: T.localhost.example", b"X-Forwarded-For: not-an-ip")
        self.assertEqual(h.get(b"x-forwarded-for"), b"")
        self.assertEqual(h.get(b"forwarded"), b"by=_exposr;for=;host=t.localhost.example;proto=http")

    def test_untrusted_peer_cannot_spoof(self):
        h = rewritten(b"Host: T.localhost.example", b"X-Forwarded-For: 1.2.3.4", b"X-Forwarded-Proto: https",
                      b"X-Forwarded-Host: evil.example", b"Forwarded: for=5.6.7.8;proto=https",
                      peer="203.0.113.9")
        self.assertEqual(h.get(b"x-forwarded-for"), b"203.0.113.9")
        self.assertEqual(h.get(b"x-real-ip"), b"203.0.113.9")
        self.assertEqual(h.get(b"x-forwarded-proto"), b"http")
        self.assertEqual(h.get(b"x-forwarded-host"), b"t.localhost.example")
        self.assertEqual(h.get(b"forwarded"), b"by=_exposr;for=203.0.113.9;host=t.localhost.example;proto=http")

    def test_no_trusted_networks(self):
        h = rewritten(b"Host: T.localhost.example", b"X-Forwarded-For: 1.2.3.4", networks=())
        self.assertEqual(h.get(b"x-forwarded-for"), b"127.0.0.2")

    def test_ipv4_mapped_peer_unmapped_and_ipv6_quoted(self):
        h = rewritten(b"Host: T.localhost.example", peer="::ffff:127.0.0.5")
        self.assertEqual(h.get(b"x-forwarded-for"), b"127.0.0.5")
        h = rewritten(b"Host: T.localhost.example", b"X-Forwarded-For: 2001:db8::1")
        self.assertEqual(h.get(b"x-forwarded-for"), b"2001:db8::1")
        self.assertEqual(h.get(b"forwarded"), b'by=_exposr;for="[2001:db8::1]";host=t.localhost.example;proto=http')

    def test_non_default_port(self):
        h = rewritten(b"Host: T.localhost.example:8080")
        self.assertEqual(h.get(b"x-forwarded-host"), b"t.localhost.example:8080")
        self.assertEqual(h.get(b"x-forwarded-port"), b"8080")

    def test_via_prepended(self):
        h = rewritten(b"Host: T.localhost.example", b"exposr-via: " + b"b" * 40)
        self.assertEqual(h.get(b"exposr-via"), NODE.encode() + b"," + b"b" * 40)

    def test_connection_removed_except_upgrade(self):
        h = rewritten(b"Host: T.localhost.example", b"Connection: keep-alive, x-foo", b"Keep-Alive: 5",
                      b"X-Foo: 1", b"TE: trailers", b"Proxy-Authorization: Basic eDp5", b"X-Bar: 2")
        # hop-by-hop: the standard ones and those named in Connection
        for name in (b"connection", b"keep-alive", b"x-foo", b"te", b"proxy-authorization"):
            self.assertIsNone(h.get(name), name)
        self.assertEqual(h.get(b"x-bar"), b"2")
        # framing headers are never dropped for being named in Connection
        h = rewritten(b"Host: T.localhost.example", b"Connection: content-length, host", b"Content-Length: 0")
        self.assertEqual(h.get(b"content-length"), b"0")
        self.assertIsNotNone(h.get(b"host"))
        h = rewritten(b"Host: T.localhost.example", b"Connection: Upgrade", b"Upgrade: websocket")
        self.assertEqual(h.get(b"connection"), b"Upgrade")
        self.assertEqual(h.get(b"upgrade"), b"websocket")

    def test_remote_hop_adds_only_the_always_headers(self):
        h = rewritten(b"Host: T.localhost.example", b"Connection: close", local=False)
        self.assertEqual(h.get(b"host"), b"T.localhost.example")
        # the client's wish is about its own connection: the peer hop stays kept alive
        self.assertIsNone(h.get(b"connection"))
        self.assertIsNone(h.get(b"forwarded"))
        self.assertEqual(h.get(b"x-forwarded-for"), b"127.0.0.2")

    def test_order_and_other_headers_kept(self):
        h = rewritten(b"Accept: */*", b"Host: T.localhost.example", b"X-Real-IP: 9.9.9.9", b"Cookie: a=1",
                      b"Set-Cookie: x", b"Set-Cookie: y")
        names = [n.lower() for n, _ in h.headers]
        self.assertEqual(names[:5], [b"accept", b"host", b"x-real-ip", b"cookie", b"set-cookie"])
        self.assertEqual(h.get_all(b"set-cookie"), [b"x", b"y"])
        self.assertEqual(len(h.get_all(b"x-real-ip")), 1)
        self.assertIn(b"\r\nx-forwarded-for: 127.0.0.2\r\n", h.serialize())


class TargetRewriteTests(unittest.TestCase):
    def test_reference_vectors(self):
        h = rewritten(b"Host: T.localhost.example", b"Origin: T.localhost.example",
                      b"Referer: https://T.localhost.example/page")
        self.assertEqual(h.get(b"host"), b"echo.localhost.example")
        self.assertEqual(h.get(b"origin"), b"echo.localhost.example")
        self.assertEqual(h.get(b"referer"), b"https://echo.localhost.example/page")

    def test_tcps_target_not_rewritten(self):
        h = rewritten(b"Host: T.localhost.example", b"Origin: T.localhost.example",
                      b"Referer: https://T.localhost.example/page", target_url="tcps://echo.localhost.example")
        self.assertEqual(h.get(b"host"), b"T.localhost.example")
        self.assertEqual(h.get(b"origin"), b"T.localhost.example")
        self.assertEqual(h.get(b"referer"), b"https://T.localhost.example/page")

    def test_target_port_and_foreign_referer(self):
        h = rewritten(b"Host: t.example:8080", b"Referer: http://other.example/x?q=1",
                      b"Origin: http://t.example:8080", target_url="http://127.0.0.1:3000")
        self.assertEqual(h.get(b"host"), b"127.0.0.1:3000")
        self.assertEqual(h.get(b"referer"), b"http://other.example/x?q=1")
        self.assertEqual(h.get(b"origin"), b"http://127.0.0.1:3000")

    def test_host_starting_with_http_rewritten(self):
        # the original skipped tunnel ids like "httpbin" (a Host starting with "http")
        h = rewritten(b"Host: httpbin.localhost.example")
        self.assertEqual(h.get(b"host"), b"echo.localhost.example")

    def test_bad_target_urls(self):
        for url in ("http://host:99999", "http://[::1", "", None, "ftp://x"):
            h = rewritten(b"Host: T.localhost.example", target_url=url)
            self.assertEqual(h.get(b"host"), b"T.localhost.example", url)


class LoopTests(unittest.TestCase):
    def test_is_loop(self):
        self.assertFalse(forwarding.is_loop(head_of(b"Host: x"), NODE))
        self.assertFalse(forwarding.is_loop(head_of(b"exposr-via: " + b"b" * 40), NODE))
        self.assertTrue(forwarding.is_loop(head_of(b"exposr-via: " + b"b" * 40 + b" , " + NODE.encode()), NODE))
        self.assertTrue(forwarding.is_loop(head_of(b"exposr-via: x", b"exposr-via: " + NODE.encode()), NODE))
