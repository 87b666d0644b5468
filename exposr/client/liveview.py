"""The live terminal view of ``exposr tunnel connect`` (stdout is a TTY).

* `ViewState(clock)`: a pure state object fed by the same calls as
  `output.LinePrinter` (``message`` for command output, ``event`` for the
  connector's events): server, account, tunnel, target, public URLs, the state
  of each connection and its reconnect deadline, request count, p50/p99
  latency, and the last ``max_requests`` requests (HTTP mode only).
* `render(state)`: a rich renderable of the state; nothing is written.
* `LiveView(out, err, clock, opts)`: the driver. It has LinePrinter's interface
  (``message``, ``event``, ``observer``, ``fmt``) so the CLI swaps one for the
  other. It owns a `rich.live.Live` without its refresh thread and redraws at
  most ``max_rate`` times per second, driven by `clock` (the reactor): a change
  inside the interval is drawn at its end, once. While a connection waits to
  reconnect, the countdown is redrawn twice a second. When the tunnel is
  disconnected the view stops and later output is plain lines.
"""

import bisect
import collections

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text
from twisted.logger import formatEvent

from exposr.client.output import LinePrinter

MAX_REQUESTS = 10
LATENCY_SAMPLES = 1000  # percentiles are over the last this many requests
COUNTDOWN_TICK = 0.5


def mask_account(account):
    """Every symbol but the last 4 replaced by '*' (dashes kept for readability)."""
    if not account:
        return ""
    keep = 4
    out = []
    for ch in reversed(account):
        if ch == "-":
            out.append(ch)
        elif keep > 0:
            out.append(ch)
            keep -= 1
        else:
            out.append("*")
    return "".join(reversed(out))


def human_bytes(n):
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


class ViewState:
    def __init__(self, clock, max_requests=MAX_REQUESTS):
        self.clock = clock  # () -> seconds
        self.server = None
        self.account = None
        self.tunnel = None
        self.target = None
        self.urls = []  # [(kind, url)]
        self.http_mode = False
        self.connections = {}  # n -> 'up' | 'lost' | 'failed' | 'reconnecting' | 'refused'
        self.retry_at = {}  # n -> clock time of the next attempt
        self.disconnected = False
        self.requests = 0
        self.recent = collections.deque(maxlen=max_requests)  # (time, method, path, status, ms)
        self._samples = collections.deque(maxlen=LATENCY_SAMPLES)
        self.traffic = None  # None, or () -> (bytes to the target, bytes from it)

    def message(self, text, event="message", **fields):
        if event == "account_created":
            self.account = fields.get("account")
        elif event == "tunnel_created":
            self.tunnel = fields.get("tunnel")
        elif event == "tunnel":
            self.tunnel = fields.get("tunnel", self.tunnel)
            self.target = fields.get("target")
        elif event == "ingress":
            self.urls.append((fields.get("kind"), fields.get("url")))
        elif event == "tunnel_disconnected":
            self.disconnected = True

    def event(self, name, text, **fields):
        n = fields.get("connection")
        if name == "connected":
            self.connections[n] = "up"
            self.retry_at.pop(n, None)
        elif name in ("disconnected", "failed"):
            self.connections[n] = "lost" if name == "disconnected" else "failed"
        elif name == "reconnecting":
            self.connections[n] = "reconnecting"
            self.retry_at[n] = self.clock() + float(fields.get("delay") or 0)
        elif name == "refused":
            self.connections[n] = "refused"
            self.retry_at.pop(n, None)
        elif name == "request":
            self.requests += 1
            ms = float(fields.get("duration_ms") or 0)
            self._samples.append(ms)
            self.recent.append((self.clock(), fields.get("method"), fields.get("path"),
                                fields.get("status"), ms))

    @property
    def up(self):
        return sum(1 for s in self.connections.values() if s == "up")

    def countdown(self, n):
        """Seconds until connection `n` tries again (None when it is not waiting)."""
        if self.connections.get(n) != "reconnecting" or n not in self.retry_at:
            return None
        return max(0.0, self.retry_at[n] - self.clock())

    def waiting(self):
        return any(self.countdown(n) is not None for n in self.connections)

    def percentile(self, p):
        """Nearest-rank percentile of the recent latencies in ms (None without requests)."""
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        rank = max(1, -(-len(ordered) * p // 100))
        return ordered[min(len(ordered), int(rank)) - 1]


def _status_style(status):
    if not isinstance(status, int):
        return ""
    return "green" if status < 300 else "cyan" if status < 400 else \
        "yellow" if status < 500 else "red"


def render(state):
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold", no_wrap=True)
    head.add_column()
    head.add_row("Server", state.server or "-")
    head.add_row("Account", mask_account(state.account) or "-")
    head.add_row("Tunnel", (state.tunnel or "-")
                 + (f" -> {state.target}" if state.target else ""))
    for kind, url in state.urls or [(None, None)]:
        head.add_row(f"URL {kind.upper()}" if kind else "URL", url or "-")
    conns = Text()
    if state.disconnected:
        conns.append("disconnected", style="red")
    elif not state.connections:
        conns.append("connecting...", style="yellow")
    else:
        conns.append(f"{state.up}/{len(state.connections)} up",
                     style="green" if state.up == len(state.connections) else "yellow")
        for n in sorted(state.connections):
            st = state.connections[n]
            if st == "up":
                continue
            left = state.countdown(n)
            conns.append(f"  #{n} {st}" + (f" in {left:.0f} s" if left is not None else ""),
                         style="red" if st == "refused" else "yellow")
    head.add_row("Connections", conns)
    if state.http_mode:
        p50, p99 = state.percentile(50), state.percentile(99)
        lat = f"p50 {p50:.0f} ms  p99 {p99:.0f} ms" if p50 is not None else "p50 -  p99 -"
        line = f"{state.requests}  {lat}"
        if state.traffic is not None:
            sent, received = state.traffic()
            line += f"  in {human_bytes(sent)}  out {human_bytes(received)}"
        head.add_row("Requests", line)
    else:
        head.add_row("Requests", Text("(HTTP mode only)", style="dim"))
    parts = [head]
    if state.http_mode:
        table = Table(box=box.SIMPLE_HEAD, expand=False, pad_edge=False)
        for name, kw in (("Method", {}), ("Path", {"overflow": "ellipsis", "max_width": 60}),
                         ("Status", {"justify": "right"}), ("Time", {"justify": "right"})):
            table.add_column(name, no_wrap=True, **kw)
        for _, method, path, status, ms in reversed(state.recent):
            table.add_row(method or "", path or "", Text(str(status), _status_style(status)),
                          f"{ms:.0f} ms")
        parts.append(table)
    return Group(*parts)


class LiveView:
    def __init__(self, out, err, clock, opts=None, http_mode=False, max_rate=4,
                 max_requests=MAX_REQUESTS, console=None):
        self.fmt = "text"
        self.clock = clock  # IReactorTime
        self.opts = opts  # server and account are read from it when drawing
        self.state = ViewState(clock.seconds, max_requests)
        self.state.http_mode = http_mode
        self.console = console or Console(file=out)
        self.plain = LinePrinter(out, err, clock=clock.seconds)
        self.interval = 1.0 / max_rate
        self.live = None
        self.draws = 0
        self._last = None
        self._timer = None
        self._closed = False

    # the LinePrinter interface
    def message(self, text, event="message", **fields):
        if self._closed or (self.live is None and event not in _VIEW_EVENTS):
            self.state.message(text, event, **fields)
            self.plain.message(text, event, **fields)
            return
        self.state.message(text, event, **fields)
        if event == "tunnel_disconnected":
            self.close()
            self.plain.message(text, event, **fields)
            return
        self.changed()

    def event(self, name, text, **fields):
        if self._closed:
            self.plain.event(name, text, **fields)
            return
        self.state.event(name, text, **fields)
        self.changed()

    def observer(self, event):
        if self.live is None or self._closed:
            self.plain.observer(event)
            return
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}: {failure.getErrorMessage()}"
        level = getattr(event.get("log_level"), "name", "info")
        self.console.print(Text(f"{'warning' if level == 'warn' else level}: {text}",
                                style="yellow"))

    # drawing
    def changed(self):
        """Redraw now, or at the end of the current interval (once)."""
        if self._closed or self._timer is not None:
            return
        now = self.clock.seconds()
        if self._last is None or now - self._last >= self.interval:
            self.draw()
        else:
            self._timer = self.clock.callLater(self._last + self.interval - now, self._tick)

    def _tick(self):
        self._timer = None
        if not self._closed:
            self.draw()

    def draw(self):
        if self.opts is not None:
            self.state.server = self.state.server or getattr(self.opts, "server", None)
            self.state.account = self.state.account or getattr(self.opts, "account", None)
        if self.live is None:
            self.live = Live(console=self.console, auto_refresh=False,
                             redirect_stdout=False, redirect_stderr=False)
            self.live.start()
            if hasattr(self.clock, "addSystemEventTrigger"):  # the reactor: restore the cursor
                self.clock.addSystemEventTrigger("after", "shutdown", self.close)
        self.live.update(render(self.state), refresh=True)
        self.draws += 1
        self._last = self.clock.seconds()
        if self.state.waiting() and self._timer is None:
            self._timer = self.clock.callLater(max(COUNTDOWN_TICK, self.interval), self._tick)

    def close(self):
        """Draw the last state and leave it on the screen; later output is plain."""
        if self._closed:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.live is not None:
            self.live.update(render(self.state), refresh=True)
            self.live.stop()
        self._closed = True


# command output that starts the view (earlier output, e.g. "Created account", is plain)
_VIEW_EVENTS = ("tunnel", "ingress", "tunnel_disconnected")
