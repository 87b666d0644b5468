"""The derived base URL of a request: "where did the client reach us"
(see docs/protocol.rst, "Base URL").

Built from ``Forwarded``, ``X-Forwarded-Proto``, ``X-Scheme``, ``Host`` and
``X-Forwarded-Port`` in the original's order of precedence, parsed properly
by `exposr.httpheaders.derive_base_url`. Used for
the ``--api-url`` host check and for the WS and SSH endpoint URLs handed to
clients.
"""

import re

import attrs

from exposr import httpheaders

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

_REG_NAME_RE = re.compile(r"(?:[a-z0-9\-._~!$&'()*+,;=]|%[0-9a-f]{2})+")
_IPV6_RE = re.compile(r"\[[0-9a-f:.]+(?:%25[a-z0-9\-._~]+)?\]|\[v[0-9a-f]+\.[a-z0-9\-._~!$&'()*+,;=:]+\]")


@attrs.frozen
class BaseURL:
    scheme: str
    host: str  # lower case; IPv6 literals keep their brackets
    port: int = None  # None when absent or the scheme's default

    @property
    def hostport(self):
        return self.host if self.port is None else "%s:%d" % (self.host, self.port)

    def url(self, scheme=None):
        """``scheme://host[:port]`` (default port of ``scheme`` omitted)."""
        scheme = scheme or self.scheme
        port = self.port
        if port is not None and DEFAULT_PORTS.get(scheme) == port:
            port = None
        if port is None:
            return "%s://%s" % (scheme, self.host)
        return "%s://%s:%d" % (scheme, self.host, port)

    def __str__(self):
        return self.url()


def split_host_port(value):
    """
    ``(host, port_text)`` of ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``;
    host lower-cased; ``port_text`` None when absent. Raises ValueError.
    """
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError("bad IPv6 literal")
        host, rest = value[: end + 1], value[end + 1:]
        if not _IPV6_RE.fullmatch(host):
            raise ValueError("bad IPv6 literal")
        if rest == "":
            return host, None
        if not rest.startswith(":"):
            raise ValueError("bad host")
        return host, rest[1:] or None
    host, sep, port = value.partition(":")
    if not host or not _REG_NAME_RE.fullmatch(host):
        raise ValueError("bad host")
    return host, (port or None) if sep else None


def derive_base_url(headers):
    """
    The `BaseURL` of a request, or None when it cannot be derived (no host,
    invalid scheme, host or port). ``headers``: a Twisted ``Headers``, a
    mapping or ``(name, value)`` pairs. The parsing is the ingress's
    (`exposr.httpheaders.derive_base_url`), so the API, the WS endpoint and
    the ingress agree on it.
    """
    parts = httpheaders.derive_base_url(headers)
    if parts is None:
        return None
    scheme, host, port = parts
    return BaseURL(scheme=scheme, host=host, port=port)


def request_base_url(request):
    """The `BaseURL` of a twisted.web request, or None."""
    return derive_base_url(request.requestHeaders)


def url_host(url):
    """``host[:port]`` of a configured URL (port only when not the default), lower case."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = "[%s]" % (host,)
    try:
        port = parts.port
    except ValueError:
        port = None
    scheme = (parts.scheme or "http").lower()
    if port is None or DEFAULT_PORTS.get(scheme) == port:
        return host
    return "%s:%d" % (host, port)
