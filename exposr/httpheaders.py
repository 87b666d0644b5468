"""HTTP header helpers shared by the REST API and the ingress: the base URL a client used.

`parse_forwarded` (RFC 7239), `derive_base_url` (docs/protocol.rst, "Base URL", with proper
parsing: first element of comma lists, quoted values, case-insensitive
``Forwarded`` parameter names) and `format_base_url`. Pure functions on
header values, no Twisted: the API (`exposr.api.baseurl`), the WebSocket
endpoint and the ingress (`exposr.ingress.httphead` re-exports them) agree on
one parsing.
"""

import ipaddress
import re

__all__ = ["HeadFields", "parse_forwarded", "derive_base_url", "format_base_url"]


class HeadFields:
    """Base of a parsed message head whose ``get_all(lower_name)`` gives the raw values (bytes).

    The ingress's heads (`exposr.ingress.httphead`) derive from it, so that
    `derive_base_url` reads them directly.
    """

    __slots__ = ()

    def get_all(self, name):
        raise NotImplementedError


_FWD_PAIR = re.compile(
    r'[ \t]*([^\s=;,"]+)[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|([^\s;,"]*))[ \t]*'
)
_FWD_SEP = re.compile(r"[;,]")
_QUOTED_PAIR = re.compile(r"\\(.)")


def parse_forwarded(value):
    """Parse a ``Forwarded`` header value (RFC 7239).

    Returns one dict per comma-separated element, in order, mapping
    lower-cased parameter names to unquoted string values (first occurrence
    of a parameter wins).  Malformed pairs (up to the next ``;`` or ``,``)
    are skipped; empty elements are left out.
    """
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1")
    elements = []
    current = {}
    pos = 0
    n = len(value)
    while pos < n:
        m = _FWD_PAIR.match(value, pos)
        if m is not None and (m.end() == n or value[m.end()] in ";,"):
            quoted = m.group(2)
            if quoted is not None:
                val = _QUOTED_PAIR.sub(r"\1", quoted)
            else:
                val = m.group(3)
            current.setdefault(m.group(1).lower(), val)
            pos = m.end()
            if pos >= n:
                break
        c = value[pos]
        if c != ";" and c != ",":
            sep = _FWD_SEP.search(value, pos)
            if sep is None:
                break
            pos = sep.start()
            c = value[pos]
        if c == "," and current:
            elements.append(current)
            current = {}
        pos += 1
    if current:
        elements.append(current)
    return elements


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21}
_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]*")
_REG_NAME = re.compile(r"[a-z0-9\-._~!$&'()*+,;=]+")


def _getter(headers):
    """A function name(bytes, lower) -> list of str values, for any headers."""
    if isinstance(headers, HeadFields):
        return lambda name: [v.decode("latin-1") for v in headers.get_all(name)]
    if hasattr(headers, "getRawHeaders"):  # twisted.web.http_headers.Headers
        return lambda name: [
            v.decode("latin-1") if isinstance(v, bytes) else v
            for v in (headers.getRawHeaders(name) or ())
        ]
    if hasattr(headers, "items"):
        headers = headers.items()
    pairs = []
    for name, value in headers:
        if isinstance(name, str):
            name = name.encode("latin-1")
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value).decode("latin-1")
        pairs.append((name.lower(), value))
    return lambda name: [v for n, v in pairs if n == name]


def _first_element(values):
    """First non-empty element of comma-separated list values, unquoted."""
    for value in values:
        for item in value.split(","):
            item = item.strip(" \t")
            if len(item) >= 2 and item[0] == '"' and item[-1] == '"':
                item = item[1:-1].strip(" \t")
            if item:
                return item
    return None


def _split_host(value):
    """(host, port string or None) of ``host[:port]``; host None if invalid."""
    value = value.strip(" \t").lower()
    if value.startswith("["):
        close = value.find("]")
        if close == -1:
            return None, None
        host, rest = value[: close + 1], value[close + 1 :]
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None, None
        if not rest:
            return host, None
        if rest[0] != ":":
            return None, None
        return host, rest[1:] or None
    host, sep, port = value.partition(":")
    if not _REG_NAME.fullmatch(host):
        return None, None
    return host, (port or None) if sep else None


def derive_base_url(headers):
    """The base URL a client used to reach us (see docs/protocol.rst, "Base URL").

    ``headers``: a `RequestHead`, a Twisted ``Headers``, a mapping or an
    iterable of ``(name, value)`` pairs.  Returns ``(scheme, host, port)``
    with ``port`` an int or None (None also when it is the scheme's default),
    or None when there is no host or the result is not a valid URL (the
    listener answers 400).  Parsing is the recommended proper one: first
    element of comma lists, quoted values, case-insensitive ``Forwarded``
    parameter names.
    """
    get = _getter(headers)
    forwarded = {}
    fvalues = get(b"forwarded")
    if fvalues:
        elements = parse_forwarded(", ".join(fvalues))
        if elements:
            forwarded = elements[0]

    scheme = (
        forwarded.get("proto")
        or _first_element(get(b"x-forwarded-proto"))
        or _first_element(get(b"x-scheme"))
        or "http"
    ).lower()
    if not _SCHEME.fullmatch(scheme):
        return None

    host_values = get(b"host")
    host_header = host_values[0] if host_values else ""
    hhost, hport = _split_host(host_header) if host_header.strip() else (None, None)

    fport = None
    if forwarded.get("host"):
        host, fport = _split_host(forwarded["host"])
    else:
        if not host_header.strip():
            return None
        host = hhost
    if not host:
        return None

    port = fport or _first_element(get(b"x-forwarded-port")) or hport
    if port is not None:
        if not port.isdigit() or len(port) > 5 or not port.isascii():
            return None
        port = int(port)
        if port > 65535:
            return None
        if _DEFAULT_PORTS.get(scheme) == port:
            port = None
    return scheme, host, port


def format_base_url(parts):
    """``scheme://host[:port]`` of a `derive_base_url` result."""
    scheme, host, port = parts
    if port is None:
        return "%s://%s" % (scheme, host)
    return "%s://%s:%d" % (scheme, host, port)
