"""Sans-I/O HTTP/1.x message framing for the ingress proxy.

The ingress parses only message *heads* (to route and rewrite headers) and
splices bodies.  This module is the pure-bytes core of that: no Twisted, no
sockets.

Parsers
-------
``RequestParser`` (client side) and ``ResponseParser`` (upstream side) are fed
byte chunks with ``feed(data)`` and return a list of events:

``Head(head)``
    A complete message head (`RequestHead` / `ResponseHead`).  ``head.raw``
    holds the head bytes as received (for forwarding unchanged); the one
    exception is a response with both ``Transfer-Encoding: chunked`` and
    ``Content-Length``, whose ``Content-Length`` is dropped from ``headers``
    and ``raw`` (RFC 9112 6.3).  ``head.persistent`` says, as received,
    whether the sender lets the connection persist after this message (the
    version's default and the ``Connection`` tokens): unlike the
    ``keep_alive`` property it stays true to what was received when headers
    are edited afterwards (the ingress drops ``Connection`` when it forwards
    a request).
``Body(data)``
    Body bytes, always a slice of the input (the input object itself when a
    whole chunk is body: zero copies; a bytes-like input that is not
    ``bytes``, a view of a frame, is then passed on as it is).  Chunked bodies are passed through
    *raw*: chunk-size lines, extensions, chunk CRLFs, the last chunk and the
    trailer section are all inside ``Body`` events, unchanged, so forwarding
    every ``Body`` verbatim re-creates the chunked stream.  Consecutive raw
    bytes of one ``feed`` call are coalesced into one ``Body``.
``End(trailers)``
    The message is complete; the next message (pipelining / keep-alive) may
    follow on the same connection.  ``trailers`` is the list of trailer fields
    of a chunked body (empty otherwise).
``Raw(data)``
    After the head of a ``101`` response (or of a 2xx answer to
    ``CONNECT``), the response parser stops parsing and passes everything on
    as ``Raw``, including bytes that arrived in the same chunk as the head.
    An upgrade or ``CONNECT`` request is framed like any request (its body,
    if any, then ``End``); after it the request parser holds what follows
    until the proxy knows the answer: ``upgraded()`` (a 101, or a 2xx to
    ``CONNECT``) switches it to ``Raw`` and returns the held bytes,
    ``refused()`` (any other final response) resumes HTTP parsing with them.
    A connection is spliced raw only once the target agreed.

A response with no length and no chunked coding is delimited by the end of
the connection: call ``feed_eof()`` to get its ``End``.  ``ResponseParser``
must be told the request method of each response in order (``expect``) so
that responses to ``HEAD`` have no body.  Interim responses (1xx except 101)
produce a ``Head`` (``head.is_interim``) without ``End``; the final response
follows.

Any framing error raises `HeadError` (``status``, ``reason``): 400 / 431 /
501 / 505 for requests, 502 for responses (the proxy answers
``TUNNEL_TARGET_CON_FAILED`` or aborts).  ``HeadError.events`` holds the
events the failing ``feed`` completed before the error (earlier pipelined
messages).  No other exception escapes a parser for any input; after an
error the parser stays failed (every call raises the same error).

Helpers for the header rewriting of the ingress: `host_of`,
`parse_forwarded`, `derive_base_url` (with proper parsing) and
`format_base_url` (the last three live in `exposr.httpheaders`, shared with
the REST API; they are the same functions here).
"""

import re
from collections import deque

from exposr.httpheaders import HeadFields, derive_base_url, format_base_url, parse_forwarded  # noqa: F401  (ingress names)

__all__ = [
    "HeadError",
    "RequestHead",
    "ResponseHead",
    "Head",
    "Body",
    "End",
    "Raw",
    "RequestParser",
    "ResponseParser",
    "host_of",
    "parse_forwarded",
    "derive_base_url",
    "format_base_url",
    "DEFAULT_MAX_HEAD_SIZE",
    "DEFAULT_MAX_HEADERS",
]

DEFAULT_MAX_HEAD_SIZE = 16 * 1024
DEFAULT_MAX_HEADERS = 100
#: A chunk-size line (size + extensions) longer than this is refused.
MAX_CHUNK_LINE = 4096

REASONS = {
    400: "Bad Request",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    505: "HTTP Version Not Supported",
}


class HeadError(Exception):
    """A message cannot be framed; ``status`` is the HTTP status to answer."""

    def __init__(self, status, reason):
        Exception.__init__(self, status, reason)
        self.status = status
        self.reason = reason
        #: Events completed by the failing ``feed`` before the error (e.g.
        #: earlier pipelined requests), to be handled before answering.
        self.events = []

    def __str__(self):
        return "%d %s" % (self.status, self.reason)

    def response(self):
        """A minimal ``Connection: close`` error response for the client."""
        phrase = REASONS.get(self.status, "Error").encode("ascii")
        return b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % (
            self.status,
            phrase,
        )


# --- grammar (RFC 9110 / 9112) ------------------------------------------------

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_REQUEST_LINE = re.compile(
    rb"(" + _TOKEN + rb") ([\x21-\x7e\x80-\xff]+) (HTTP/([0-9])\.([0-9]))"
)
_STATUS_LINE = re.compile(rb"(HTTP/([0-9])\.[0-9]) ([0-9]{3})(?: ([^\r\n]*))?")
# One header line, anchored at a line start (MULTILINE), value without OWS.
_FIELD_LINE = re.compile(
    rb"^(" + _TOKEN + rb"):[ \t]*((?:[^ \t\r\n]+(?:[ \t]+[^ \t\r\n]+)*)?)[ \t]*\r\n",
    re.M,
)
# Control characters other than HTAB, CR and LF (CR/LF are counted apart).
_CTL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# The fast path: header lines that are all plainly well formed (a token, a
# colon, then no control character but HTAB, each ended by CRLF), checked by
# one match; anything else takes the line-by-line path and its exact errors.
_PLAIN_FIELDS = re.compile(rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*")
_PLAIN_STATUS_LINE = re.compile(rb"(HTTP/([0-9])\.[0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})((?:[ \t]*;[ \t]*"
    + _TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:"
    + _TOKEN
    + rb"|"
    + _QUOTED
    + rb"))?)*)"
)

_KNOWN_CODINGS = frozenset(
    [b"chunked", b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"]
)
_FRAMING_NAMES = frozenset(
    [b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"host"]
)

# framing modes decided from a head
_NONE, _LENGTH, _CHUNKED, _EOF, _RAW, _INTERIM = range(6)
_FRAMING = ("none", "length", "chunked", "eof", "raw", "interim")
# parser states
(
    _S_HEAD,
    _S_LENGTH,
    _S_CHUNK_SIZE,
    _S_CHUNK_DATA,
    _S_CHUNK_CRLF,
    _S_TRAILERS,
    _S_EOF,
    _S_RAW,
    _S_UPGRADE,
    _S_CLOSED,
    _S_ERROR,
) = range(11)


def _b(value):
    if isinstance(value, str):
        return value.encode("latin-1")
    return bytes(value)


def _tokens(values):
    """Lower-cased, trimmed, non-empty elements of comma-separated lists."""
    out = []
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if item:
                out.append(item.lower())
    return out


def _codings(values):
    """Transfer codings (parameters dropped), lower-cased, in order."""
    return [c.split(b";", 1)[0].rstrip(b" \t") for c in _tokens(values)]


def _content_length(values, status):
    """The one Content-Length of ``values`` (list of raw header values)."""
    if len(values) == 1:
        value = values[0]
        if value.isdigit() and len(value) <= 18:
            return int(value)
    result = None
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if not item.isdigit() or len(item) > 18:
                raise HeadError(status, "invalid Content-Length")
            n = int(item)
            if result is not None and n != result:
                raise HeadError(status, "conflicting Content-Length")
            result = n
    return result


# --- heads ------------------------------------------------------------------


class _HeadBase(HeadFields):
    """Headers as an ordered list of ``(name, value)`` bytes pairs."""

    __slots__ = ("version", "headers", "raw", "persistent")

    def _values(self, lname):
        return [v for n, v in self.headers if n.lower() == lname]

    def get(self, name, default=None):
        """Value of ``name`` (case-insensitive); repeats joined with ``, ``."""
        values = self._values(_b(name).lower())
        if not values:
            return default
        if len(values) == 1:
            return values[0]
        return b", ".join(values)

    def get_all(self, name):
        """Every value of ``name`` (case-insensitive), in order."""
        return self._values(_b(name).lower())

    def __contains__(self, name):
        lname = _b(name).lower()
        for n, _ in self.headers:
            if n.lower() == lname:
                return True
        return False

    def add(self, name, value):
        """Append a header line."""
        self.headers.append((_check_name(name), _check_value(value)))

    def set(self, name, value):
        """Replace every ``name`` line by one, at the first one's position."""
        name = _check_name(name)
        value = _check_value(value)
        lname = name.lower()
        out = []
        placed = False
        for pair in self.headers:
            if pair[0].lower() == lname:
                if not placed:
                    out.append((name, value))
                    placed = True
            else:
                out.append(pair)
        if not placed:
            out.append((name, value))
        self.headers[:] = out

    def remove(self, name):
        """Remove every ``name`` line; returns how many were removed."""
        lname = _b(name).lower()
        before = len(self.headers)
        self.headers[:] = [p for p in self.headers if p[0].lower() != lname]
        return before - len(self.headers)

    @property
    def connection_tokens(self):
        """Lower-cased tokens of all ``Connection`` headers."""
        return _tokens(self._values(b"connection"))

    @property
    def keep_alive(self):
        """Persistent connection by the version default and ``Connection``."""
        tokens = self.connection_tokens
        if b"close" in tokens:
            return False
        if self.version == b"HTTP/1.0":
            return b"keep-alive" in tokens
        return True

    @property
    def is_upgrade(self):
        """``Connection`` has the ``upgrade`` token and ``Upgrade`` is present."""
        return b"upgrade" in self.connection_tokens and b"upgrade" in self

    @property
    def content_length(self):
        """The Content-Length as an int, None if absent; HeadError if bad."""
        return _content_length(self._values(b"content-length"), 400)

    @property
    def chunked(self):
        """True if the final transfer coding is ``chunked``."""
        codings = _codings(self._values(b"transfer-encoding"))
        return bool(codings) and codings[-1] == b"chunked"

    def _serialize(self, start):
        parts = [start, b"\r\n"]
        for name, value in self.headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return all(
            getattr(self, s) == getattr(other, s)
            for s in self._compare
        )

    __hash__ = None


def _check_name(name):
    name = _b(name)
    if not re.fullmatch(_TOKEN, name):
        raise ValueError("invalid header name %r" % (name,))
    return name


def _check_value(value):
    value = _b(value)
    if b"\r" in value or b"\n" in value or b"\x00" in value:
        raise ValueError("invalid header value %r" % (value,))
    return value


class RequestHead(_HeadBase):
    """A request head: ``method``, ``target``, ``version`` and ``headers``."""

    __slots__ = ("method", "target", "has_body")
    _compare = ("method", "target", "version", "headers")

    def __init__(self, method, target, version=b"HTTP/1.1", headers=None, raw=None):
        self.method = method
        self.target = target
        self.version = version
        self.headers = [] if headers is None else headers
        self.raw = raw
        self.persistent = None  # set by the parsers (see the module docstring)
        self.has_body = None  # set by the parser: whether a body follows (None: not parsed)

    def serialize(self):
        """The head as bytes: request line, header lines, blank line."""
        return self._serialize(b"%s %s %s" % (self.method, self.target, self.version))

    def __repr__(self):
        return "RequestHead(%r, %r, %r, %r)" % (
            self.method,
            self.target,
            self.version,
            self.headers,
        )


class ResponseHead(_HeadBase):
    """A response head: ``status`` (int), ``reason``, ``version``, ``headers``."""

    __slots__ = ("status", "reason")
    _compare = ("status", "reason", "version", "headers")

    def __init__(self, status, reason=b"", version=b"HTTP/1.1", headers=None, raw=None):
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = [] if headers is None else headers
        self.raw = raw
        self.persistent = None  # set by the parsers (see the module docstring)

    @property
    def is_interim(self):
        """1xx other than 101: the final response is still to come."""
        return 100 <= self.status < 200 and self.status != 101

    def serialize(self):
        """The head as bytes: status line, header lines, blank line."""
        return self._serialize(b"%s %d %s" % (self.version, self.status, self.reason))

    def __repr__(self):
        return "ResponseHead(%r, %r, %r, %r)" % (
            self.status,
            self.reason,
            self.version,
            self.headers,
        )


# --- events -----------------------------------------------------------------


class _Event:
    __slots__ = ()

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in self.__slots__)

    __hash__ = None

    def __repr__(self):
        return "%s(%s)" % (
            type(self).__name__,
            ", ".join(repr(getattr(self, s)) for s in self.__slots__),
        )


class Head(_Event):
    __slots__ = ("head",)

    def __init__(self, head):
        self.head = head


class Body(_Event):
    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data


class End(_Event):
    __slots__ = ("trailers",)

    def __init__(self, trailers=()):
        self.trailers = list(trailers)


_END = End()  # the End of every message without trailers (events are never changed)


class Raw(_Event):
    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data


# --- parsers ----------------------------------------------------------------


class _Parser:
    _error_status = 400

    def __init__(self, max_head_size=DEFAULT_MAX_HEAD_SIZE, max_headers=DEFAULT_MAX_HEADERS):
        self.max_head_size = max_head_size
        self.max_headers = max_headers
        self._state = _S_HEAD
        self._buf = bytearray()
        self._scan = 0
        self._remaining = 0
        self._error = None
        # an upgrade (or CONNECT) request is framed: its decision waits after its End
        self._upgrade_next = False
        #: Framing of the last head: "none", "length", "chunked", "eof"
        #: (close-delimited), "raw" or "interim"; None before the first head.
        self.framing = None

    @property
    def in_message(self):
        """True between a head and its End (or in a partial head)."""
        return self._state != _S_HEAD or bool(self._buf.strip(b"\r\n"))

    @property
    def raw_mode(self):
        return self._state == _S_RAW

    def _fail(self, status, reason):
        self._state = _S_ERROR
        self._error = HeadError(status, reason)
        raise self._error

    def feed(self, data):
        """Parse ``data``; returns the list of events it completes."""
        state = self._state
        if state >= _S_CLOSED:
            if state == _S_ERROR:
                raise self._error
            self._fail(self._error_status, "data after end of stream")
        if not data:
            return []
        if state == _S_RAW:
            return [Raw(data)]
        buf = self._buf
        if not buf and (state == _S_EOF or state == _S_LENGTH and len(data) < self._remaining):
            # body bytes only: passed on as they are (bytes-like: a view of a
            # frame is not copied)
            if state == _S_LENGTH:
                self._remaining -= len(data)
            return [Body(data)]
        if type(data) is not bytes:
            data = bytes(data)
        if state == _S_UPGRADE:
            # bytes after an upgrade request wait for `upgraded` or `refused`
            buf += data
            return []
        if buf:
            if state == _S_HEAD or state == _S_TRAILERS:
                buf += data
                # Head or trailer section still incomplete: only scan the new
                # bytes (no copies: linear when it arrives byte by byte).
                if not (state == _S_TRAILERS and buf.startswith(b"\r\n")) and buf.find(b"\r\n\r\n", self._scan) == -1:
                    if state == _S_HEAD:
                        self._check_partial_head(len(buf))
                    elif len(buf) >= self.max_head_size:
                        self._fail(self._error_status, "trailer section too large")
                    self._scan = max(0, len(buf) - 3)
                    return []
                data = bytes(buf)
            elif state == _S_CHUNK_SIZE:
                buf += data
                if buf.find(b"\r\n", self._scan) == -1:
                    if len(buf) > MAX_CHUNK_LINE + 1:
                        self._fail(self._error_status, "chunk-size line too long")
                    self._scan = max(0, len(buf) - 1)
                    return []
                data = bytes(buf)
            else:
                data = bytes(buf) + data
            self._buf = bytearray()
        events = []
        try:
            self._run(data, events)
        except HeadError as e:
            self._state = _S_ERROR
            self._error = e
            e.events = events
            raise
        except Exception as e:  # pragma: no cover - defensive, never expected
            self._state = _S_ERROR
            self._error = HeadError(
                self._error_status, "unparseable message (%s)" % (type(e).__name__,)
            )
            self._error.events = events
            raise self._error
        return events

    def _check_partial_head(self, size):
        if size >= self.max_head_size:
            self._fail(self._too_large, "message head too large")

    def _run(self, data, events):
        pos = 0
        end = len(data)
        state = self._state
        while pos < end:
            if state == _S_HEAD:
                if self._upgrade_next:
                    # the upgrade request is complete: the rest waits for the decision
                    self._upgrade_next = False
                    state = _S_UPGRADE
                    self._buf = bytearray(memoryview(data)[pos:])
                    break
                # Empty lines before a request/status line are ignored.
                while data.startswith(b"\r\n", pos):
                    pos += 2
                if pos >= end:
                    break
                idx = data.find(b"\r\n\r\n", pos)
                if idx == -1:
                    self._check_partial_head(end - pos)
                    self._buf = bytearray(memoryview(data)[pos:])
                    self._scan = max(0, end - pos - 3)
                    break
                hend = idx + 4
                if hend - pos > self.max_head_size:
                    raise HeadError(self._too_large, "message head too large")
                head, mode, length = self._parse_head(data, pos, idx)
                if head.raw is None:
                    head.raw = data[pos:hend]
                self.framing = _FRAMING[mode]
                events.append(Head(head))
                pos = hend
                if mode == _NONE:
                    events.append(_END)
                elif mode == _LENGTH:
                    self._remaining = length
                    state = _S_LENGTH
                elif mode == _CHUNKED:
                    state = _S_CHUNK_SIZE
                elif mode == _EOF:
                    state = _S_EOF
                elif mode == _RAW:
                    state = _S_RAW
                # _INTERIM: another head follows
            elif state == _S_LENGTH:
                rem = self._remaining
                if end - pos <= rem:
                    events.append(Body(data[pos:] if pos else data))
                    rem -= end - pos
                    pos = end
                else:
                    events.append(Body(data[pos : pos + rem]))
                    pos += rem
                    rem = 0
                self._remaining = rem
                if not rem:
                    events.append(_END)
                    state = _S_HEAD
            elif state == _S_EOF:
                events.append(Body(data[pos:] if pos else data))
                pos = end
            elif state == _S_RAW:
                events.append(Raw(data[pos:] if pos else data))
                pos = end
            else:
                pos, state = self._chunked(data, pos, end, state, events)
        if state == _S_HEAD and self._upgrade_next:
            self._upgrade_next = False
            state = _S_UPGRADE
        self._state = state

    def _chunked(self, data, pos, end, state, events):
        """Walk chunked framing; the raw bytes go out as one Body."""
        start = pos
        status = self._error_status
        while True:
            if state == _S_CHUNK_SIZE:
                i = data.find(b"\r\n", pos, pos + MAX_CHUNK_LINE + 2)
                if i == -1:
                    if end - pos > MAX_CHUNK_LINE + 1:
                        raise HeadError(status, "chunk-size line too long")
                    break
                m = _CHUNK_LINE.fullmatch(data, pos, i)
                if m is None:
                    raise HeadError(status, "invalid chunk-size line")
                size = int(m.group(1), 16)
                pos = i + 2
                if size:
                    self._remaining = size
                    state = _S_CHUNK_DATA
                else:
                    state = _S_TRAILERS
            elif state == _S_CHUNK_DATA:
                rem = self._remaining
                if end - pos < rem:
                    self._remaining = rem - (end - pos)
                    pos = end
                    break
                pos += rem
                self._remaining = 0
                state = _S_CHUNK_CRLF
            elif state == _S_CHUNK_CRLF:
                if end - pos < 2:
                    if pos < end and data[pos] != 13:
                        raise HeadError(status, "chunk data not followed by CRLF")
                    break
                if not data.startswith(b"\r\n", pos):
                    raise HeadError(status, "chunk data not followed by CRLF")
                pos += 2
                state = _S_CHUNK_SIZE
            else:  # _S_TRAILERS
                if end - pos < 2:
                    break
                if data.startswith(b"\r\n", pos):
                    trailers = []
                    pos += 2
                else:
                    idx = data.find(b"\r\n\r\n", pos)
                    if idx == -1:
                        if end - pos >= self.max_head_size:
                            raise HeadError(status, "trailer section too large")
                        break
                    if idx + 4 - pos > self.max_head_size:
                        raise HeadError(status, "trailer section too large")
                    trailers = self._parse_fields(data, pos, idx, "trailer")
                    pos = idx + 4
                if pos > start:
                    events.append(Body(data[start:pos] if start or pos < end else data))
                events.append(End(trailers))
                return pos, _S_HEAD
        if pos > start:
            events.append(Body(data[start:pos] if start or pos < end else data))
        if pos < end:
            # A partial chunk-size line, CRLF or trailer section: keep it.
            self._buf = bytearray(memoryview(data)[pos:])
            self._scan = 0
            pos = end
        return pos, state

    def _check_chars(self, data, pos, idx, nlines):
        crlf = nlines - 1
        if data.count(b"\n", pos, idx) != crlf or data.count(b"\r", pos, idx) != crlf:
            raise HeadError(self._error_status, "bare CR or LF in message head")
        if _CTL.search(data, pos, idx) is not None:
            raise HeadError(self._error_status, "control character in message head")

    def _parse_fields(self, data, start, idx, what="header"):
        """Header lines from ``start`` up to the CRLFCRLF at ``idx``."""
        expected = data.count(b"\r\n", start, idx) + 1
        if expected > self.max_headers:
            raise HeadError(self._too_large, "too many %s fields" % what)
        self._check_chars(data, start, idx, expected)
        fields = _FIELD_LINE.findall(data, start, idx + 2)
        if len(fields) != expected:
            raise HeadError(self._error_status, "malformed %s line" % what)
        return fields

    def _head_parts(self, data, pos, idx):
        """(start line match, header fields) of the head ``data[pos:idx]``.

        A plainly well-formed head takes `_plain_head`; anything else is
        checked line by line, with the exact error.
        """
        plain = self._plain_head(data, pos, idx)
        if plain is not None:
            return plain
        le, fields = self._split_head(data, pos, idx)
        m = self._start_line.fullmatch(data, pos, le)
        if m is None:
            raise HeadError(self._error_status, self._bad_start_line)
        return m, fields

    def _plain_head(self, data, pos, idx):
        """(start line match, header fields) of a plainly well-formed head, else None.

        ``_plain_line`` is the start line's pattern, which admits no control
        character; one match checks every header line (`_PLAIN_FIELDS`).
        """
        line = self._plain_line
        le = data.find(b"\r\n", pos, idx)
        if le == -1:
            m = line.fullmatch(data, pos, idx)
            return None if m is None else (m, [])
        m = line.fullmatch(data, pos, le)
        if m is None or _PLAIN_FIELDS.fullmatch(data, le + 2, idx + 2) is None:
            return None
        fields = _FIELD_LINE.findall(data, le + 2, idx + 2)
        if len(fields) > self.max_headers:
            raise HeadError(self._too_large, "too many header fields")
        return m, fields

    def _split_head(self, data, pos, idx):
        """(start line end, header fields) of the head ``data[pos:idx]``."""
        le = data.find(b"\r\n", pos, idx)
        if le == -1:
            self._check_chars(data, pos, idx, 1)
            return idx, []
        if (
            _CTL.search(data, pos, le) is not None
            or data.find(b"\r", pos, le) != -1
            or data.find(b"\n", pos, le) != -1
        ):
            raise HeadError(self._error_status, "control character in start line")
        return le, self._parse_fields(data, le + 2, idx)

    def feed_eof(self):
        """The connection was closed by the peer: events it completes."""
        state = self._state
        if state == _S_ERROR:
            raise self._error
        self._state = _S_CLOSED
        if state == _S_EOF:
            return [_END]
        if state == _S_RAW or state == _S_CLOSED or state == _S_UPGRADE:
            return []
        if state == _S_HEAD:
            if self._buf.strip(b"\r\n"):
                self._fail(self._error_status, "connection closed inside a message head")
            return []
        self._fail(self._error_status, "connection closed inside a message body")


def _framing_headers(fields):
    """(content-length values, transfer-encoding values, connection values,
    has upgrade, host count) of a header list."""
    cl = te = conn = None
    upgrade = False
    hosts = 0
    for name, value in fields:
        lname = name.lower()
        if lname in _FRAMING_NAMES:
            if lname == b"content-length":
                if cl is None:
                    cl = [value]
                else:
                    cl.append(value)
            elif lname == b"transfer-encoding":
                if te is None:
                    te = [value]
                else:
                    te.append(value)
            elif lname == b"connection":
                if conn is None:
                    conn = [value]
                else:
                    conn.append(value)
            elif lname == b"upgrade":
                upgrade = True
            else:
                hosts += 1
    return cl, te, conn, upgrade, hosts


class RequestParser(_Parser):
    """Frames requests received from a client (see the module docstring).

    Errors: 400 malformed, 431 head or header count too large, 501 unknown
    transfer coding, 505 HTTP version other than 1.x.  A request with both
    ``Transfer-Encoding`` and ``Content-Length``, with conflicting
    ``Content-Length`` values, with ``Transfer-Encoding`` in HTTP/1.0, or with
    several ``Host`` lines is refused (400) to rule out request smuggling.
    """

    _error_status = 400
    _too_large = 431
    _start_line = _plain_line = _REQUEST_LINE  # (admits no control character)
    _bad_start_line = "malformed request line"

    def _parse_head(self, data, pos, idx):
        m, fields = self._head_parts(data, pos, idx)
        method, target, version, major, minor = m.groups()
        if major != b"1":
            raise HeadError(505, "HTTP version not supported")
        head = RequestHead(method, target, version, fields)
        cl, te, conn, upgrade, hosts = _framing_headers(fields)
        tokens = _tokens(conn) if conn is not None else ()
        head.persistent = b"close" not in tokens and (minor != b"0" or b"keep-alive" in tokens)
        if hosts > 1:
            raise HeadError(400, "more than one Host header")
        if te is not None:
            if minor == b"0":
                raise HeadError(400, "Transfer-Encoding in an HTTP/1.0 request")
            if cl is not None:
                raise HeadError(400, "both Transfer-Encoding and Content-Length")
            codings = _codings(te)
            for coding in codings:
                if coding not in _KNOWN_CODINGS:
                    raise HeadError(501, "unknown transfer coding")
            if not codings or codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
                raise HeadError(400, "request body not chunked last")
            mode, length = _CHUNKED, 0
        elif cl is not None:
            length = _content_length(cl, 400)
            mode = _LENGTH if length else _NONE
            if len(cl) > 1 or not cl[0].isdigit():
                # "5, 5" or repeated equal lines: forwarded as one plain value
                head.set(b"Content-Length", b"%d" % length)
                head.raw = head.serialize()
        else:
            mode, length = _NONE, 0
        if target[0] != 47 and method != b"CONNECT" and target != b"*":  # not origin-form ("/...")
            _origin_form(head)
        if method == b"CONNECT" or (upgrade and b"upgrade" in tokens):
            # framed as any request; after its End the parser waits (`upgraded`, `refused`)
            self._upgrade_next = True
        head.has_body = mode != _NONE
        return head, mode, length

    @property
    def awaiting_upgrade(self):
        """True once an upgrade (or CONNECT) request is complete, until `upgraded` or `refused`."""
        return self._state == _S_UPGRADE

    def upgraded(self):
        """The upgrade was accepted (101, or 2xx to CONNECT): raw from now on.

        Returns the bytes received since the request as ``[Raw(data)]`` (or ``[]``).
        """
        if self._state != _S_UPGRADE:
            raise ValueError("no upgrade request is waiting")
        data, self._buf = bytes(self._buf), bytearray()
        self._state = _S_RAW
        return [Raw(data)] if data else []

    def refused(self):
        """The upgrade was answered by any other final response: HTTP goes on.

        Returns the events of the bytes received since the request (a
        `HeadError` for bad ones, as `feed`).
        """
        if self._state != _S_UPGRADE:
            raise ValueError("no upgrade request is waiting")
        data, self._buf = bytes(self._buf), bytearray()
        self._state = _S_HEAD
        return self.feed(data) if data else []


_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)([^#]*)(?:#.*)?", re.S)


def _origin_form(head):
    """An absolute-form request target becomes origin-form, its authority the Host.

    The request is routed by its target's authority and the target must see
    the same (a server must ignore Host for an absolute-form request):
    ``GET http://a.example/x`` with ``Host: b.example`` is forwarded as
    ``GET /x`` with ``Host: a.example``. Anything else that is not
    origin-form (nor ``*``, nor CONNECT's authority-form) is refused.
    """
    m = _ABSOLUTE.fullmatch(head.target)
    if m is None or m.group(1).lower() not in (b"http", b"https"):
        raise HeadError(400, "request target not in origin or absolute form")
    authority, rest = m.group(2), m.group(3)
    if not authority or b"@" in authority or not re.fullmatch(rb"[A-Za-z0-9.\-_~:\[\]]+", authority):
        raise HeadError(400, "invalid authority in the request target")
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    head.target = rest
    head.set(b"Host", authority)
    head.raw = head.serialize()


class ResponseParser(_Parser):
    """Frames responses received from the upstream (see the module docstring).

    Call ``expect(method)`` for every request sent, in order, before its
    response is fed.  Without an expectation a response is framed as a
    response to ``GET``.  All errors are `HeadError` with status 502.
    """

    _error_status = 502
    _too_large = 502
    _start_line, _plain_line = _STATUS_LINE, _PLAIN_STATUS_LINE
    _bad_start_line = "malformed status line"

    def __init__(self, max_head_size=DEFAULT_MAX_HEAD_SIZE, max_headers=DEFAULT_MAX_HEADERS):
        _Parser.__init__(self, max_head_size, max_headers)
        self._methods = deque()

    def expect(self, method):
        """Queue the method of a request whose response is to be parsed."""
        self._methods.append(_b(method))

    @property
    def pending(self):
        """Number of expected responses not yet started."""
        return len(self._methods)

    def _parse_head(self, data, pos, idx):
        m, fields = self._head_parts(data, pos, idx)
        version, major, code, reason = m.groups()
        if major != b"1":
            raise HeadError(502, "HTTP version not supported")
        status = int(code)
        if status < 100:
            raise HeadError(502, "invalid status code")
        head = ResponseHead(status, reason or b"", version, fields)
        cl, te, conn, upgrade, hosts = _framing_headers(fields)
        if conn is None:
            head.persistent = version != b"HTTP/1.0"
        else:
            tokens = _tokens(conn)
            head.persistent = b"close" not in tokens and (version != b"HTTP/1.0" or b"keep-alive" in tokens)
        if status < 200:
            if status == 101:
                if self._methods:
                    self._methods.popleft()
                return head, _RAW, 0
            return head, _INTERIM, 0
        method = self._methods.popleft() if self._methods else None
        if method == b"HEAD" or status == 204 or status == 304:
            return head, _NONE, 0
        if method == b"CONNECT" and status < 300:
            return head, _RAW, 0
        if te is not None:
            codings = _codings(te)
            if codings and codings[-1] == b"chunked":
                if codings.count(b"chunked") > 1:
                    raise HeadError(502, "chunked applied twice")
                if cl is not None:
                    # RFC 9112 6.3: chunked wins; an intermediary must drop
                    # the Content-Length, so raw is the cleaned head.
                    head.remove(b"content-length")
                    head.raw = head.serialize()
                return head, _CHUNKED, 0
            return head, _EOF, 0
        if cl is not None:
            length = _content_length(cl, 502)
            return head, (_LENGTH if length else _NONE), length
        return head, _EOF, 0


# --- header helpers for the ingress -------------------------------------------


def host_of(head):
    """The ``Host`` of a request, lower-cased, without port; None if absent.

    Only the first ``Host`` line counts.  ``[v6]:port`` keeps the brackets.
    """
    values = head.get_all(b"host")
    if not values:
        return None
    host = values[0].decode("latin-1").strip().lower()
    if host.startswith("["):
        close = host.find("]")
        if close != -1:
            return host[: close + 1]
    return host.split(":", 1)[0]
