"""The derived base URL (docs/protocol.rst, "Base URL"), proxy headers parsed properly."""

from twisted.trial import unittest

from exposr.api.baseurl import BaseURL, derive_base_url, url_host


def derive(**headers):
    return derive_base_url({k.replace("_", "-"): v for k, v in headers.items()})


class DeriveTests(unittest.TestCase):
    def check(self, expected, **headers):
        base = derive(**headers)
        self.assertEqual(str(base) if base is not None else None, expected, headers)

    def test_host_only(self):
        self.check("http://localhost:8080", host="localhost:8080")
        self.check("http://example.com", host="Example.COM")
        self.check("http://example.com", host="example.com:80")

    def test_scheme_sources(self):
        self.check("https://example.com", host="example.com", x_forwarded_proto="https")
        self.check("https://example.com", host="example.com", x_scheme="https")
        self.check("https://example.com", host="example.com", forwarded="proto=https",
                   x_forwarded_proto="http")
        self.check("http://example.com", host="example.com", x_forwarded_proto="http",
                   x_scheme="https")

    def test_default_ports_disappear(self):
        self.check("https://x", host="x:443", x_forwarded_proto="https")
        self.check("https://x:8443", host="x:8443", x_forwarded_proto="https")
        self.check("http://x:443", host="x:443")

    def test_port_sources(self):
        self.check("http://a:1", host="b:3", forwarded="host=a:1", x_forwarded_port="2")
        self.check("http://a:2", host="b:3", forwarded="host=a", x_forwarded_port="2")
        self.check("http://a:3", host="b:3", forwarded="host=a")
        self.check("http://b:2", host="b:3", x_forwarded_port="2")

    def test_forwarded_parsed_properly(self):
        self.check("https://api.example.com",
                   host="backend:8080", forwarded='for=1.2.3.4;Proto=https;HOST="api.example.com"',
                   x_forwarded_port="443")
        self.check("https://first.example",
                   host="x", forwarded="proto=https;host=first.example, proto=http;host=second",
                   x_forwarded_port="443")
        self.check("http://[::1]:8080", host="[::1]:8080")

    def test_lists(self):
        self.check("https://example.com", host="example.com", x_forwarded_proto="https,http")
        self.check("https://example.com", host="example.com", x_forwarded_proto=" https , http")
        self.check("https://example.com:8443", host="example.com",
                   x_forwarded_proto="https", x_forwarded_port="8443, 443")

    def test_invalid(self):
        self.check(None)
        self.check(None, host="")
        self.check(None, host="bad host")
        self.check(None, host="example.com:99999")
        self.check(None, host="example.com:80a")
        self.check(None, host="example.com", x_forwarded_proto="ht tp")
        self.check(None, host="example.com", x_forwarded_port="-1")
        self.check(None, host="[::1")

    def test_base_url(self):
        base = BaseURL("https", "example.com", 8443)
        self.assertEqual(base.hostport, "example.com:8443")
        self.assertEqual(base.url("wss"), "wss://example.com:8443")
        self.assertEqual(BaseURL("https", "example.com").url("wss"), "wss://example.com")
        self.assertEqual(BaseURL("http", "example.com", 443).url("wss"), "wss://example.com")

    def test_url_host(self):
        self.assertEqual(url_host("http://API.example.com"), "api.example.com")
        self.assertEqual(url_host("https://api.example.com:443/"), "api.example.com")
        self.assertEqual(url_host("http://api.example.com:8080/v1"), "api.example.com:8080")
