"""HTTP mode of the client, sans I/O: requests rewritten one by one toward the target.

`RequestRewriter(rules)` sits on the channel -> target byte stream: ``feed(data)``
returns the bytes to write to the target, in which every request head has its
headers rewritten by `HeaderRules`; bodies (Content-Length or chunked) pass
through untouched. After an upgrade request (WebSocket...) or a CONNECT, the
stream is passed through raw. A head over `MAX_HEAD` bytes, or one that is not
HTTP/1, raises `HttpModeError` (the channel is then closed).

`ResponseWatcher(on_response)` reads the target -> channel stream without
changing it and calls ``on_response(status)`` for each final response head, in
request order, so the caller can time and report requests.

`HeaderRules(target_url, rewrite, replace)`: headers named in ``rewrite`` (default
host, referer, origin) that hold a URL get the target's scheme and host (Host gets
the target's host[:port]); ``replace`` ({name: value}) sets headers to fixed values.
"""

from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024
DEFAULT_REWRITE = ("host", "referer", "origin")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class HttpModeError(Exception):
    pass


def parse_replace(values):
    """['Name:Value', ...] -> {name-lowercase: (Name, Value)}; ValueError if malformed."""
    out = {}
    for item in values or ():
        name, sep, value = item.partition(":")
        name = name.strip()
        if not sep or not name or any(c in name for c in " \t\r\n"):
            raise ValueError(f"Invalid header replacement: {item} (use NAME:VALUE)")
        out[name.lower()] = (name, value.strip())
    return out


def parse_rewrite(values):
    """['host', 'referer,origin'] -> ('host', 'referer', 'origin')."""
    names = []
    for item in values or ():
        names += [n.strip().lower() for n in item.split(",") if n.strip()]
    return tuple(names)


class HeaderRules:
    def __init__(self, target_url, rewrite=DEFAULT_REWRITE, replace=None):
        parts = urlsplit(target_url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"HTTP mode needs an http:// or https:// target: {target_url}")
        host = parts.hostname
        if ":" in host:
            host = f"[{host}]"
        if parts.port and parts.port != _DEFAULT_PORTS[scheme]:
            host = f"{host}:{parts.port}"
        self.scheme = scheme
        self.host = host
        self.rewrite = frozenset(n.lower() for n in rewrite)
        self.replace = dict(replace or {})

    def rewrite_url(self, value):
        parts = urlsplit(value)
        if not parts.scheme or not parts.netloc:
            return value
        return parts._replace(scheme=self.scheme, netloc=self.host).geturl()

    def apply(self, headers):
        """[(name, value)] -> [(name, value)], as str."""
        out = []
        for name, value in headers:
            key = name.lower()
            if key in self.replace:
                continue
            if key in self.rewrite:
                value = self.host if key == "host" else self.rewrite_url(value)
            out.append((name, value))
        out += list(self.replace.values())
        return out


def _split_head(head):
    """b'start line\\r\\nName: v\\r\\n...' -> (start line, [(name, value)]) as str."""
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t" and headers:  # obsolete folding: joined to the previous value
            headers[-1] = (headers[-1][0], headers[-1][1] + " " + line.strip())
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpModeError(f"malformed header line: {line[:60]!r}")
        headers.append((name, value.strip()))
    return lines[0], headers


def _framing(headers):
    """('chunked' | 'length', n): how the body after this head ends."""
    te = ",".join(v for n, v in headers if n.lower() == "transfer-encoding").lower()
    if te:
        return ("chunked", 0) if te.replace(" ", "").endswith("chunked") else ("close", 0)
    lengths = {v.strip() for n, v in headers if n.lower() == "content-length"}
    if len(lengths) > 1 or (lengths and not next(iter(lengths)).isdigit()):
        raise HttpModeError("bad Content-Length")
    return ("length", int(lengths.pop()) if lengths else 0)


class _BodyTracker:
    """Finds where a message body ends in a stream (the bytes are not changed)."""

    def __init__(self):
        self.mode = None      # None (between messages), 'length', 'chunked', 'raw'
        self.remaining = 0
        self.chunk_state = None  # 'size', 'data', 'trailer'
        self.line = b""

    def start(self, kind, length):
        if kind == "length":
            self.mode, self.remaining = ("length", length) if length else (None, 0)
        elif kind == "chunked":
            self.mode, self.chunk_state, self.line = "chunked", "size", b""
        else:
            self.mode = "raw"

    def consume(self, data, pos):
        """Skip body bytes from `pos`; returns the position after the body (or len(data))."""
        if self.mode == "raw":
            return len(data)
        if self.mode == "length":
            take = min(self.remaining, len(data) - pos)
            self.remaining -= take
            if not self.remaining:
                self.mode = None
            return pos + take
        while pos < len(data) and self.mode == "chunked":
            if self.chunk_state == "data":
                take = min(self.remaining, len(data) - pos)
                self.remaining -= take
                pos += take
                if not self.remaining:
                    self.chunk_state = "size"
                continue
            end = data.find(b"\n", pos)
            if end < 0:
                self.line += data[pos:]
                if len(self.line) > MAX_HEAD:
                    raise HttpModeError("chunk line too long")
                return len(data)
            line, self.line = (self.line + data[pos:end]).strip(), b""
            pos = end + 1
            if self.chunk_state == "size":
                if not line:  # the CRLF after a chunk's data
                    continue
                try:
                    size = int(line.split(b";")[0], 16)
                except ValueError:
                    raise HttpModeError("bad chunk size") from None
                if size:
                    self.chunk_state, self.remaining = "data", size
                else:
                    self.chunk_state = "trailer"
            elif not line:  # the empty line that ends the trailer
                self.mode = self.chunk_state = None
        return pos


class RequestRewriter:
    def __init__(self, rules, on_request=None):
        self.rules = rules
        self.on_request = on_request  # (method, path) for each request head
        self._head = b""
        self._body = _BodyTracker()

    def feed(self, data):
        out = []
        pos = 0
        data = bytes(data)
        while pos < len(data):
            if self._body.mode is not None:
                end = self._body.consume(data, pos)
                out.append(data[pos:end])
                pos = end
                continue
            buf = self._head + data[pos:]
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise HttpModeError("request head too large")
                self._head = buf
                break
            used = end + 4 - len(self._head)
            self._head = b""
            pos += used
            head = buf[:end].lstrip(b"\r\n")
            out.append(self._request(head))
        return b"".join(out)

    def _request(self, head):
        start, headers = _split_head(head)
        parts = start.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise HttpModeError(f"not an HTTP/1 request: {start[:60]!r}")
        method, path = parts[0], parts[1]
        if self.on_request is not None:
            self.on_request(method, path)
        kind, length = _framing(headers)
        upgrade = method == "CONNECT" or any(n.lower() == "upgrade" for n, _ in headers)
        if kind == "close":
            raise HttpModeError("request body without a known length")
        self._body.start(kind, length)
        if upgrade and self._body.mode is None:
            self._body.start("raw", 0)
        lines = [start] + [f"{n}: {v}" for n, v in self.rules.apply(headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class ResponseWatcher:
    def __init__(self, on_response):
        self.on_response = on_response  # (status) per final response
        self.methods = []  # request methods awaiting their response (HEAD has no body)
        self._head = b""
        self._body = _BodyTracker()

    def request(self, method):
        self.methods.append(method)

    def feed(self, data):
        pos = 0
        while pos < len(data):
            if self._body.mode is not None:
                pos = self._body.consume(data, pos)
                continue
            buf = self._head + data[pos:]
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._body.start("raw", 0)  # not HTTP as we know it: stop watching
                else:
                    self._head = bytes(buf)
                return
            pos += end + 4 - len(self._head)
            self._head = b""
            self._response(bytes(buf[:end]).lstrip(b"\r\n"))

    def _response(self, head):
        try:
            start, headers = _split_head(head)
            status = int(start.split(" ")[1])
            kind, length = _framing(headers)
        except (HttpModeError, ValueError, IndexError):
            self._body.start("raw", 0)
            return
        if 100 <= status < 200 and status != 101:
            return
        method = self.methods.pop(0) if self.methods else "GET"
        self.on_response(status)
        delimited = any(n.lower() in ("content-length", "transfer-encoding")
                        for n, _ in headers)
        if status == 101 or (method == "CONNECT" and 200 <= status < 300):
            self._body.start("raw", 0)
        elif method == "HEAD" or status in (204, 304):
            pass
        elif not delimited:  # the body ends when the target closes
            self._body.start("raw", 0)
        else:
            self._body.start(kind, length)
