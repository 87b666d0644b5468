"""The client's request inspector (HTTP mode): capture, JSON API, live page, replay.

`Capture(clock, limit=100, body_limit=64 KiB)` keeps the last `limit` exchanges
in memory. Each holds the request head as it was sent to the target (after the
HTTP mode rewriting), the response head, both bodies (the first `body_limit`
bytes, `truncated` past that), the status and the duration. ``listeners`` are
called with the exchange's summary when it appears, gets its response, and ends.

`Capture.taps(rules, on_request, on_response)` -> (rewriter, watcher): the HTTP
mode pair of `exposr.client.httpmode`, subclassed to keep references to the bytes
already passing. Only a tunnel with an inspector uses them: without one the
plain `RequestRewriter`/`ResponseWatcher` run and nothing here costs anything.

`Inspector(reactor, capture, target)` is the twisted.web resource served on
127.0.0.1:4040 by default (``tunnel connect --inspect ADDR:PORT``):

* ``GET /``: the page (self-contained HTML, live list, Replay button);
* ``GET /api/requests``: summaries, newest first; ``GET /api/requests/ID``: one
  exchange with heads and bodies (text, or base64 when binary);
* ``POST /api/requests/ID/replay``: the captured request sent to the target
  again on a new connection, optionally with ``{"headers": [[name, value], ...],
  "body": "text"}`` replacing its headers or body; the replay is captured as a
  new exchange (``replay_of``) and its summary is the answer;
* ``GET /api/events``: server-sent events, one ``data: {summary}`` per change.
"""

import base64
import collections
import itertools
import json

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.web import resource, server

from exposr.client import httpmode

LIMIT = 100
BODY_LIMIT = 64 * 1024
REPLAY_TIMEOUT = 30.0
_HOP = {"connection", "content-length", "transfer-encoding", "keep-alive"}


class Exchange:
    def __init__(self, xid, started, head, replay_of=None):
        self.id = xid
        self.started = started
        self.request_head = head
        start = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        self.method, self.path = start[0], start[1] if len(start) > 1 else ""
        self.request_body = _Body()
        self.response_head = None
        self.response_body = _Body()
        self.status = None
        self.duration_ms = None
        self.done = False
        self.replay_of = replay_of

    def summary(self):
        return {"id": self.id, "method": self.method, "path": self.path,
                "status": self.status, "duration_ms": self.duration_ms, "done": self.done,
                "started": self.started, "replay_of": self.replay_of,
                "request_size": self.request_body.size,
                "response_size": self.response_body.size}

    def detail(self):
        doc = self.summary()
        req_start, req_headers = _parse_head(self.request_head)
        doc["request"] = {"start": req_start, "headers": req_headers,
                          "body": self.request_body.describe(req_headers)}
        if self.response_head is not None:
            start, headers = _parse_head(self.response_head)
            doc["response"] = {"start": start, "headers": headers,
                               "body": self.response_body.describe(headers)}
        else:
            doc["response"] = None
        return doc


class _Body:
    """The first BODY_LIMIT bytes of a body as the chunks that passed (references)."""

    def __init__(self):
        self.chunks = []
        self.kept = 0
        self.size = 0
        self.truncated = False

    def add(self, data):
        self.size += len(data)
        room = BODY_LIMIT - self.kept
        if room <= 0:
            self.truncated = True
            return
        if len(data) > room:
            data = data[:room]
            self.truncated = True
        self.chunks.append(data)
        self.kept += len(data)

    def raw(self):
        if len(self.chunks) > 1:
            self.chunks = [b"".join(self.chunks)]
        return self.chunks[0] if self.chunks else b""

    def content(self, headers):
        """The body bytes without chunked framing."""
        data = self.raw()
        if any(n.lower() == "transfer-encoding" and "chunked" in v.lower() for n, v in headers):
            data = _dechunk(data)
        return data

    def describe(self, headers):
        data = self.content(headers)
        doc = {"size": self.size, "truncated": self.truncated}
        try:
            text = data.decode("utf-8")
            if any(ord(c) < 32 and c not in "\t\r\n" for c in text):
                raise ValueError
            doc.update(binary=False, text=text)
        except ValueError:
            doc.update(binary=True, base64=base64.b64encode(data).decode())
        return doc


def _dechunk(data):
    out, pos = [], 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        if end < 0:
            break
        try:
            size = int(data[pos:end].split(b";")[0], 16)
        except ValueError:
            break
        if not size:
            break
        out.append(data[end + 2:end + 2 + size])
        pos = end + 2 + size + 2
    return b"".join(out)


def _parse_head(head):
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.append([name, value.strip()])
    return lines[0], headers


class Capture:
    def __init__(self, clock, limit=LIMIT):
        self.clock = clock
        self.exchanges = collections.OrderedDict()
        self.limit = limit
        self.listeners = []
        self._ids = itertools.count(1)

    def open(self, head, replay_of=None):
        ex = Exchange(next(self._ids), self.clock.seconds(), head, replay_of)
        self.exchanges[ex.id] = ex
        while len(self.exchanges) > self.limit:
            self.exchanges.popitem(last=False)
        self.notify(ex)
        return ex

    def respond(self, ex, head, status):
        ex.response_head = head
        ex.status = status
        ex.duration_ms = round((self.clock.seconds() - ex.started) * 1000, 1)
        self.notify(ex)

    def finish(self, ex):
        if not ex.done:
            ex.done = True
            self.notify(ex)

    def notify(self, ex):
        summary = ex.summary()
        for listener in list(self.listeners):
            listener(summary)

    def newest_first(self):
        return [ex.summary() for ex in reversed(self.exchanges.values())]

    def taps(self, rules, on_request=None, on_response=None, replay_of=None):
        pending = collections.deque()
        return (_CapturingRewriter(self, pending, rules, on_request, replay_of),
                _CapturingWatcher(self, pending, on_response or (lambda status: None)))


class _Tracker(httpmode._BodyTracker):
    """A body tracker that also hands the body bytes it skips to `sink(bytes)`."""

    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def consume(self, data, pos):
        end = super().consume(data, pos)
        if end > pos:
            self.sink(data[pos:end])
        return end


class _CapturingRewriter(httpmode.RequestRewriter):
    def __init__(self, capture, pending, rules, on_request, replay_of):
        super().__init__(rules, on_request)
        self.capture = capture
        self.pending = pending
        self.replay_of = replay_of
        self.current = None
        self._body = _Tracker(self._sink)

    def _sink(self, data):
        if self.current is not None:
            self.current.request_body.add(data)

    def _request(self, head):
        out = super()._request(head)
        self.current = self.capture.open(out[:-4], self.replay_of)
        self.pending.append(self.current)
        return out


class _CapturingWatcher(httpmode.ResponseWatcher):
    def __init__(self, capture, pending, on_response):
        super().__init__(self._seen)
        self.capture = capture
        self.pending = pending
        self.forward = on_response
        self.current = None
        self._head_bytes = None
        self._body = _Tracker(self._sink)

    def _sink(self, data):
        ex = self.current
        if ex is not None:
            ex.response_body.add(data)
            if self._body.mode is None:
                self.capture.finish(ex)

    def _response(self, head):
        self._head_bytes = head
        super()._response(head)
        ex = self.current
        if ex is not None and not ex.done and self._body.mode is None:
            self.capture.finish(ex)  # a response without a body

    def _seen(self, status):
        if self.current is not None:
            self.capture.finish(self.current)
        self.current = self.pending.popleft() if self.pending else None
        if self.current is not None:
            self.capture.respond(self.current, self._head_bytes, status)
        self.forward(status)

    def closed(self):
        """The target connection ended: a body read until close is complete."""
        if self.current is not None:
            self.capture.finish(self.current)


# -- replay ------------------------------------------------------------------------


def replay_request(ex, edits):
    """The bytes of the captured request, edited: (head + body, with Content-Length)."""
    start, headers = _parse_head(ex.request_head)
    if edits.get("headers") is not None:
        given = edits["headers"]
        headers = [[str(n), str(v)] for n, v in (given.items() if isinstance(given, dict)
                                                 else given)]
    if edits.get("body") is not None:
        body = str(edits["body"]).encode("utf-8")
    else:
        if ex.request_body.truncated:
            raise ValueError("the captured body was truncated: give a body to replay it")
        body = ex.request_body.content(_parse_head(ex.request_head)[1])
    for name, value in headers:
        if any(c in name + value for c in "\r\n") or not name.strip():
            raise ValueError("bad header")
    headers = [[n, v] for n, v in headers if n.lower() not in _HOP]
    headers += [["Content-Length", str(len(body))], ["Connection", "close"]]
    if len(body) == 0 and ex.method in ("GET", "HEAD", "DELETE", "OPTIONS"):
        headers = headers[:-2] + headers[-1:]
    lines = [start] + [f"{n}: {v}" for n, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Replay(Protocol):
    def __init__(self, data, watcher, done):
        self.data = data
        self.watcher = watcher
        self.done = done

    def connectionMade(self):
        self.transport.write(self.data)

    def dataReceived(self, data):
        self.watcher.feed(data)

    def connectionLost(self, reason):
        self.watcher.closed()
        if not self.done.called:
            self.done.callback(None)


def replay(reactor, capture, ex, edits, target_url, endpoint):
    """Send a captured request again; Deferred -> the new exchange (captured too)."""
    data = replay_request(ex, edits)
    rules = httpmode.HeaderRules(target_url, rewrite=(), replace={})
    rewriter, watcher = capture.taps(rules, replay_of=ex.id)
    data = rewriter.feed(data)
    new = rewriter.current
    done = defer.Deferred()
    d = endpoint.connect(Factory.forProtocol(lambda: _Replay(data, watcher, done)))

    def connected(proto):
        timer = reactor.callLater(REPLAY_TIMEOUT, proto.transport.abortConnection)
        done.addBoth(lambda r: (timer.active() and timer.cancel(), r)[1])
        return done

    d.addCallback(connected)

    def ended(result):
        capture.finish(new)
        return new

    return d.addCallback(ended)


# -- the web server -----------------------------------------------------------------


def _json(request, doc, code=200):
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(doc).encode()


class Inspector(resource.Resource):
    """The page and the API (`target()` -> (target URL, client endpoint) for replays)."""

    def __init__(self, reactor, capture, target):
        super().__init__()
        self.reactor = reactor
        self.capture = capture
        self.target = target
        self.putChild(b"", _Page())
        api = resource.Resource()
        self.putChild(b"api", api)
        api.putChild(b"requests", _Requests(self))
        self.events = _Events(capture)
        api.putChild(b"events", self.events)

    def close(self):
        """End the live feeds (the listening port is closed by its owner)."""
        for request in list(self.events.open):
            if not request.finished and not request._disconnected:
                request.finish()


class _Page(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return PAGE.encode()


class _Requests(resource.Resource):
    isLeaf = True

    def __init__(self, inspector):
        super().__init__()
        self.inspector = inspector

    def _find(self, request):
        parts = [p for p in request.postpath if p]
        try:
            ex = self.inspector.capture.exchanges.get(int(parts[0])) if parts else None
        except ValueError:
            ex = None
        return parts, ex

    def render_GET(self, request):
        parts, ex = self._find(request)
        if not parts:
            return _json(request, self.inspector.capture.newest_first())
        if ex is None or len(parts) != 1:
            return _json(request, {"error": "not found"}, 404)
        return _json(request, ex.detail())

    def render_POST(self, request):
        parts, ex = self._find(request)
        if ex is None or parts[1:] != [b"replay"]:
            return _json(request, {"error": "not found"}, 404)
        raw = request.content.read()
        try:
            edits = json.loads(raw) if raw.strip() else {}
            if not isinstance(edits, dict):
                raise ValueError("the body must be a JSON object")
            target_url, endpoint = self.inspector.target()
            d = replay(self.inspector.reactor, self.inspector.capture, ex, edits,
                       target_url, endpoint)
        except (ValueError, TypeError) as e:
            return _json(request, {"error": str(e)}, 400)

        def answer(new):
            if not request._disconnected:
                request.write(_json(request, new.summary()))
                request.finish()

        def failed(failure):
            if not request._disconnected:
                request.write(_json(request, {"error": failure.getErrorMessage() or
                                              failure.type.__name__}, 502))
                request.finish()

        d.addCallbacks(answer, failed)
        return server.NOT_DONE_YET


class _Events(resource.Resource):
    isLeaf = True

    def __init__(self, capture):
        super().__init__()
        self.capture = capture
        self.open = set()

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-store")
        request.write(b": exposr inspector\n\n")

        def send(summary):
            request.write(b"data: " + json.dumps(summary).encode() + b"\n\n")

        self.capture.listeners.append(send)
        self.open.add(request)

        def gone(_):
            self.capture.listeners.remove(send)
            self.open.discard(request)

        request.notifyFinish().addBoth(gone)
        return server.NOT_DONE_YET


def site(inspector):
    s = server.Site(inspector)
    s.noisy = False
    s.log = lambda request: None
    return s


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>exposr inspector</title>
<style>
body{font:14px system-ui,sans-serif;margin:0;color:#222;background:#f6f7f9}
header{background:#1f2937;color:#fff;padding:10px 16px;font-weight:600}
header small{font-weight:400;opacity:.7;margin-left:8px}
main{display:flex;height:calc(100vh - 40px)}
#list{width:56%;overflow:auto;border-right:1px solid #ddd;background:#fff}
#detail{flex:1;overflow:auto;padding:12px 16px}
table{border-collapse:collapse;width:100%}
td,th{padding:6px 8px;border-bottom:1px solid #eee;text-align:left;white-space:nowrap}
tr.row{cursor:pointer} tr.row:hover{background:#eef4ff} tr.sel{background:#dbe8ff}
td.path{max-width:300px;overflow:hidden;text-overflow:ellipsis}
.s2{color:#15803d}.s3{color:#0369a1}.s4{color:#b45309}.s5{color:#b91c1c}
.tag{font-size:11px;background:#e5e7eb;border-radius:3px;padding:1px 4px;margin-left:4px}
button{font:inherit;padding:2px 10px;border:1px solid #2563eb;background:#2563eb;color:#fff;border-radius:4px;cursor:pointer}
pre{background:#fff;border:1px solid #e5e7eb;padding:8px;white-space:pre-wrap;word-break:break-all;max-height:320px;overflow:auto}
h3{margin:14px 0 4px}
#empty{padding:16px;color:#666}
</style></head><body>
<header>exposr inspector<small id="conn">connecting&hellip;</small></header>
<main><div id="list"><table><thead><tr><th>#</th><th>Method</th><th>Path</th><th>Status</th><th>Time</th><th></th></tr></thead>
<tbody id="rows"></tbody></table><div id="empty">No requests yet: make one through the tunnel.</div></div>
<div id="detail"><p>Select a request.</p></div></main>
<script>
"use strict";
const rows = document.getElementById("rows"), detail = document.getElementById("detail");
let selected = null;
function esc(s){return String(s).replace(/[&<>"]/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));}
function upsert(r){
  let tr = document.getElementById("r" + r.id);
  if (!tr){
    tr = document.createElement("tr"); tr.id = "r" + r.id; tr.className = "row";
    tr.dataset.id = r.id; rows.insertBefore(tr, rows.firstChild);
    tr.addEventListener("click", e => { if (e.target.tagName !== "BUTTON") show(r.id); });
    document.getElementById("empty").style.display = "none";
  }
  const st = r.status == null ? "&hellip;" : r.status;
  const cls = r.status ? "s" + String(r.status)[0] : "";
  tr.innerHTML = `<td>${r.id}</td><td>${esc(r.method)}</td><td class="path" title="${esc(r.path)}">${esc(r.path)}` +
    (r.replay_of ? `<span class="tag">replay of #${r.replay_of}</span>` : "") +
    `</td><td class="status ${cls}">${st}</td><td>${r.duration_ms == null ? "" : Math.round(r.duration_ms) + " ms"}</td>` +
    `<td><button class="replay" data-id="${r.id}">Replay</button></td>`;
  tr.querySelector("button").addEventListener("click", () => replay(r.id));
  if (selected === r.id) tr.classList.add("sel");
}
function body(b){
  if (!b) return "";
  if (b.size === 0) return "<small>no body</small>";
  let note = b.size + " bytes" + (b.truncated ? " (truncated)" : "");
  if (!b.binary) return `<pre>${esc(b.text)}</pre><small>${note}</small>`;
  const bin = atob(b.base64); let hex = "";
  for (let i = 0; i < Math.min(bin.length, 512); i++){
    hex += bin.charCodeAt(i).toString(16).padStart(2, "0") + ((i % 16 == 15) ? "\\n" : " ");
  }
  return `<pre>${hex}${bin.length > 512 ? "\\n..." : ""}</pre><small>binary, ${note}</small>`;
}
function head(start, headers){return esc(start) + "\\n" + headers.map(h => esc(h[0]) + ": " + esc(h[1])).join("\\n");}
async function show(id){
  selected = id;
  document.querySelectorAll("tr.sel").forEach(t => t.classList.remove("sel"));
  const tr = document.getElementById("r" + id); if (tr) tr.classList.add("sel");
  const r = await (await fetch("/api/requests/" + id)).json();
  let html = `<h2>${esc(r.method)} ${esc(r.path)}</h2><button class="replay" onclick="replay(${r.id})">Replay</button>` +
    `<h3>Request</h3><pre>${head(r.request.start, r.request.headers)}</pre>${body(r.request.body)}`;
  if (r.response) html += `<h3>Response</h3><pre>${head(r.response.start, r.response.headers)}</pre>${body(r.response.body)}`;
  detail.innerHTML = html;
}
async function replay(id){
  const res = await fetch("/api/requests/" + id + "/replay", {method: "POST", body: "{}"});
  const r = await res.json();
  if (r.id) { upsert(r); } else { alert("Replay failed: " + (r.error || res.status)); }
}
async function load(){
  const list = await (await fetch("/api/requests")).json();
  list.reverse().forEach(upsert);
}
// the feed first, then the list: nothing captured in between is missed
const ev = new EventSource("/api/events");
ev.onopen = () => load().then(() => { document.getElementById("conn").textContent = "live"; });
ev.onerror = () => { document.getElementById("conn").textContent = "reconnecting..."; };
ev.onmessage = m => upsert(JSON.parse(m.data));
</script></body></html>
"""
