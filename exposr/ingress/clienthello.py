"""Sans-I/O parser of a TLS ClientHello (to route on SNI before the handshake).

Feed it the first bytes a client sends on a TLS connection. It reassembles the
first handshake message from one or more TLS records (bytes may arrive one at
a time, the message may span records) and, once the ClientHello is complete,
returns a `ClientHello` with the server name (SNI) and the ALPN protocols.

It never interprets anything beyond the ClientHello and never raises anything
but `ClientHelloError`, whatever the input. No Twisted here; see
``exposr.ingress.sni`` for the protocol that drives it.

    parser = ClientHelloParser()
    hello = parser.feed(data)      # None: need more bytes
    hello.server_name, hello.alpn  # 'abc.example.com', [b'h2', b'http/1.1']
    hello.consumed                 # bytes of the records carrying the hello
    hello.raw, hello.trailing      # those bytes, and whatever came after them
"""

import attrs

# Record content types and handshake types (RFC 8446 5.1, 4).
_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
# Extensions (RFC 6066 3, RFC 7301 3.1).
_EXT_SERVER_NAME = 0x0000
_EXT_ALPN = 0x0010
_NAME_TYPE_HOST_NAME = 0
# A TLSPlaintext fragment is at most 2^14 bytes (RFC 8446 5.1).
MAX_RECORD_LENGTH = 1 << 14
DEFAULT_MAX_SIZE = 16384



class ClientHelloError(Exception):
    """The bytes are not (the start of) an acceptable TLS ClientHello."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason

    def __str__(self):
        return self.reason


@attrs.frozen
class ClientHello:
    """What the ingress needs from a ClientHello."""

    server_name: str | None
    alpn: list = attrs.field(factory=list)  # protocol names as bytes
    consumed: int = 0  # length of the records carrying the hello (== len(raw))
    raw: bytes = b""  # those records, as received
    trailing: bytes = b""  # bytes fed after them (to replay as well)
    legacy_version: int = 0  # ClientHello.legacy_version, e.g. 0x0303
    records: int = 1  # how many records carried the hello


class _Reader:
    """Bounds-checked cursor over a bytes-like object."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data, pos=0, end=None):
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def remaining(self):
        return self.end - self.pos

    def take(self, n, what):
        if n > self.end - self.pos:
            raise ClientHelloError(f"malformed ClientHello: truncated {what}")
        start = self.pos
        self.pos += n
        return self.data[start : self.pos]

    def uint(self, size, what):
        return int.from_bytes(self.take(size, what), "big")

    def take_rest(self):
        return self.take(self.remaining(), "vector")

    def sub(self, lensize, what):
        """A reader over a length-prefixed vector; skips it in this reader."""
        n = self.uint(lensize, what + " length")
        if n > self.end - self.pos:
            raise ClientHelloError(
                f"malformed ClientHello: {what} length {n} exceeds "
                f"the {self.end - self.pos} remaining bytes"
            )
        r = _Reader(self.data, self.pos, self.pos + n)
        self.pos += n
        return r


class ClientHelloParser:
    """
    Incremental ClientHello reader.

    `feed` returns None while more bytes are needed, the `ClientHello` once it
    is complete (and on every later call, with the new bytes appended to
    ``trailing``), or raises `ClientHelloError` (and again on every later
    call). At most about ``max_size`` bytes of handshake data are buffered.
    """

    def __init__(self, max_size=DEFAULT_MAX_SIZE):
        self.max_size = max_size
        self._buf = bytearray()  # every byte fed so far
        self._pos = 0  # parse position in _buf
        self._record_left = 0  # fragment bytes of the current record not yet read
        self._records = 0
        self._hs = bytearray()  # reassembled handshake bytes
        self._hs_len = None  # body length from the handshake header
        self._result = None
        self._error = None

    @property
    def buffered(self):
        """Every byte fed so far (to replay to a TLS implementation)."""
        return bytes(self._buf)

    def feed(self, data):
        if self._error is not None:
            raise self._error
        if self._result is not None:
            if data:
                self._result = attrs.evolve(
                    self._result, trailing=self._result.trailing + bytes(data)
                )
            return self._result
        self._buf += data
        try:
            result = self._advance()
        except ClientHelloError as e:
            self._error = e
            raise
        except Exception as e:  # pragma: no cover - defensive, see fuzz tests
            self._error = ClientHelloError(f"malformed ClientHello (internal: {e!r})")
            raise self._error from None
        if result is not None:
            self._result = result
        return result

    # -- record layer -----------------------------------------------------

    def _advance(self):
        buf = self._buf
        while True:
            available = len(buf) - self._pos
            if self._record_left == 0:
                if available == 0:
                    return None
                self._check_record_header(available)
                if available < 5:
                    return None
                p = self._pos
                length = (buf[p + 3] << 8) | buf[p + 4]
                if length == 0:
                    raise ClientHelloError("malformed TLS record: empty handshake record")
                if length > MAX_RECORD_LENGTH:
                    raise ClientHelloError(
                        f"malformed TLS record: length {length} exceeds {MAX_RECORD_LENGTH}"
                    )
                self._pos += 5
                self._record_left = length
                self._records += 1
                continue
            if available == 0:
                return None
            n = min(available, self._record_left)
            self._hs += buf[self._pos : self._pos + n]
            self._pos += n
            self._record_left -= n
            done = self._check_handshake()
            if done:
                return self._finish()

    def _check_record_header(self, available):
        buf, p = self._buf, self._pos
        first = p == 0
        b0 = buf[p]
        if b0 != _HANDSHAKE:
            if first:
                if b0 & 0x80:
                    if available < 3:
                        return
                    if buf[p + 2] == 0x01:
                        raise ClientHelloError("SSLv2-style ClientHello is not supported")
                    raise ClientHelloError("not a TLS handshake record")
                if 0x41 <= b0 <= 0x5A:  # "GET ", "POST", "PRI * HTTP/2.0"...
                    raise ClientHelloError("not a TLS handshake record (plain HTTP?)")
                raise ClientHelloError(
                    f"not a TLS handshake record (content type {b0:#04x})"
                )
            raise ClientHelloError(
                f"ClientHello interrupted by a record of content type {b0:#04x}"
            )
        if available >= 2 and buf[p + 1] != 0x03:
            raise ClientHelloError(
                f"not a TLS handshake record (record version {buf[p + 1]:#04x}..)"
            )

    # -- handshake layer --------------------------------------------------

    def _check_handshake(self):
        hs = self._hs
        if hs[0] != _CLIENT_HELLO:
            raise ClientHelloError(f"not a ClientHello (handshake type {hs[0]})")
        if self._hs_len is None:
            if len(hs) < 4:
                return False
            self._hs_len = int.from_bytes(hs[1:4], "big")
            if 4 + self._hs_len > self.max_size:
                raise ClientHelloError(
                    f"ClientHello too large ({4 + self._hs_len} > {self.max_size} bytes)"
                )
        total = 4 + self._hs_len
        if len(hs) < total:
            return False
        if len(hs) > total or self._record_left:
            raise ClientHelloError("malformed ClientHello: trailing data in its record")
        return True

    def _finish(self):
        server_name, alpn, version = _parse_body(_Reader(self._hs, 4))
        consumed = self._pos
        return ClientHello(
            server_name=server_name,
            alpn=alpn,
            consumed=consumed,
            raw=bytes(self._buf[:consumed]),
            trailing=bytes(self._buf[consumed:]),
            legacy_version=version,
            records=self._records,
        )


def _parse_body(r):
    version = r.uint(2, "legacy_version")
    r.take(32, "random")
    session_id = r.sub(1, "legacy_session_id")
    if session_id.remaining() > 32:
        raise ClientHelloError("malformed ClientHello: session id longer than 32 bytes")
    ciphers = r.sub(2, "cipher_suites")
    if ciphers.remaining() < 2 or ciphers.remaining() % 2:
        raise ClientHelloError("malformed ClientHello: bad cipher_suites length")
    compression = r.sub(1, "legacy_compression_methods")
    if compression.remaining() < 1:
        raise ClientHelloError("malformed ClientHello: no compression methods")
    server_name = None
    alpn = []
    if r.remaining() == 0:  # no extensions at all (old clients)
        return server_name, alpn, version
    extensions = r.sub(2, "extensions")
    if r.remaining():
        raise ClientHelloError("malformed ClientHello: data after the extensions")
    seen = set()
    while extensions.remaining():
        ext_type = extensions.uint(2, "extension type")
        ext = extensions.sub(2, "extension data")
        if ext_type in seen:
            raise ClientHelloError(f"malformed ClientHello: duplicate extension {ext_type}")
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            server_name = _parse_server_name(ext)
        elif ext_type == _EXT_ALPN:
            alpn = _parse_alpn(ext)
    return server_name, alpn, version


def _parse_server_name(ext):
    if ext.remaining() == 0:
        # A server's empty acknowledgement; tolerated from a client as "no name".
        return None
    names = ext.sub(2, "server_name_list")
    if ext.remaining():
        raise ClientHelloError("malformed ClientHello: data after server_name_list")
    host_name = None
    while names.remaining():
        name_type = names.uint(1, "server name type")
        name = names.sub(2, "server name").take_rest()
        if name_type != _NAME_TYPE_HOST_NAME:
            continue
        if host_name is not None:
            raise ClientHelloError("malformed ClientHello: more than one host_name")
        if not name:
            raise ClientHelloError("malformed ClientHello: empty host_name")
        try:
            host_name = bytes(name).decode("ascii")
        except UnicodeDecodeError:
            raise ClientHelloError("malformed ClientHello: host_name is not ASCII") from None
        if not host_name.isprintable() or " " in host_name:
            raise ClientHelloError("malformed ClientHello: invalid characters in host_name")
    return host_name


def _parse_alpn(ext):
    protocols = ext.sub(2, "protocol_name_list")
    if ext.remaining():
        raise ClientHelloError("malformed ClientHello: data after protocol_name_list")
    if protocols.remaining() == 0:
        raise ClientHelloError("malformed ClientHello: empty ALPN list")
    alpn = []
    while protocols.remaining():
        name = protocols.sub(1, "protocol name").take_rest()
        if not name:
            raise ClientHelloError("malformed ClientHello: empty ALPN protocol name")
        alpn.append(bytes(name))
    return alpn
