"""The live terminal view of `tunnel connect`: state, rendering, redraw rate, TTY choice."""

import io

from rich.console import Console
from twisted.internet import task
from twisted.trial import unittest

from exposr.client import cli, liveview, output


def console():
    return Console(file=io.StringIO(), width=100, force_terminal=True, color_system=None)


def text_of(renderable):
    c = console()
    c.print(renderable)
    return c.file.getvalue()


def feed_connected(target):
    target.message("Created account ABCD-EFGH-JKLM-NPQR", "account_created",
                   account="ABCD-EFGH-JKLM-NPQR")
    target.event("connected", "Connection 1 established", connection=1, connections=1)
    target.event("connected", "Connection 2 established", connection=2, connections=2)
    target.message("Tunnel t1 connected to http://127.0.0.1:8000/", "tunnel", tunnel="t1",
                   target="http://127.0.0.1:8000/")
    target.message("Ingress HTTP: http://t1.example.test/", "ingress", kind="http",
                   url="http://t1.example.test/")


class StateTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.state = liveview.ViewState(self.clock.seconds, max_requests=3)

    def test_connections_and_countdown(self):
        feed_connected(self.state)
        self.assertEqual((self.state.tunnel, self.state.up), ("t1", 2))
        self.assertEqual(self.state.urls, [("http", "http://t1.example.test/")])
        self.clock.advance(10)
        self.state.event("disconnected", "Connection 2 lost (1006)", connection=2, code=1006)
        self.state.event("reconnecting", "...", connection=2, delay=5.0)
        self.assertEqual(self.state.up, 1)
        self.assertEqual(self.state.countdown(2), 5.0)
        self.assertIsNone(self.state.countdown(1))
        self.clock.advance(3.5)
        self.assertEqual(self.state.countdown(2), 1.5)
        self.assertTrue(self.state.waiting())
        self.state.event("connected", "...", connection=2, connections=2)
        self.assertIsNone(self.state.countdown(2))
        self.assertFalse(self.state.waiting())
        self.assertEqual(self.state.up, 2)

    def test_requests_and_percentiles(self):
        self.assertIsNone(self.state.percentile(50))
        for i, ms in enumerate([10, 20, 30, 40, 1000]):
            self.state.event("request", "", method="GET", path=f"/p{i}", status=200,
                             duration_ms=ms)
        self.assertEqual(self.state.requests, 5)
        self.assertEqual(self.state.percentile(50), 30)
        self.assertEqual(self.state.percentile(99), 1000)
        # only the last 3 requests are kept for display
        self.assertEqual([r[2] for r in self.state.recent], ["/p2", "/p3", "/p4"])

    def test_mask_account(self):
        self.assertEqual(liveview.mask_account("ABCD-EFGH-JKLM-NPQR"), "****-****-****-NPQR")
        self.assertEqual(liveview.mask_account("abcdefgh"), "****efgh")
        self.assertEqual(liveview.mask_account(None), "")


class RenderTests(unittest.TestCase):
    def test_http_mode(self):
        state = liveview.ViewState(task.Clock().seconds)
        state.http_mode = True
        state.server = "http://api.example.test/"
        feed_connected(state)
        state.event("request", "", method="POST", path="/api/items", status=201,
                    duration_ms=12.3)
        state.event("request", "", method="GET", path="/missing", status=404, duration_ms=3)
        state.traffic = lambda: (2048, 10)
        out = text_of(liveview.render(state))
        self.assertIn("http://api.example.test/", out)
        self.assertIn("****-****-****-NPQR", out)
        self.assertNotIn("ABCD", out)
        self.assertIn("t1 -> http://127.0.0.1:8000/", out)
        self.assertIn("http://t1.example.test/", out)
        self.assertIn("2/2 up", out)
        self.assertIn("Requests     2  p50 3 ms  p99 12 ms  in 2.0 kB  out 10 B", out)
        lines = out.splitlines()
        post = [line for line in lines if "/api/items" in line]
        self.assertEqual(len(post), 1)
        self.assertRegex(post[0], r"POST\s+/api/items\s+201\s+12 ms")
        # newest first
        self.assertLess(out.index("/missing"), out.index("/api/items"))

    def test_plain_mode_and_countdown(self):
        clock = task.Clock()
        state = liveview.ViewState(clock.seconds)
        feed_connected(state)
        state.event("disconnected", "", connection=1, code=1006)
        state.event("reconnecting", "", connection=1, delay=4.0)
        clock.advance(1)
        out = text_of(liveview.render(state))
        self.assertIn("(HTTP mode only)", out)
        self.assertIn("1/2 up  #1 reconnecting in 3 s", out)


class LiveViewTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.out, self.err = io.StringIO(), io.StringIO()
        self.view = liveview.LiveView(self.out, self.err, self.clock, http_mode=True,
                                      max_rate=4, console=console())

    def test_output_before_the_tunnel_is_plain(self):
        self.view.message("Created tunnel t1", "tunnel_created", tunnel="t1")
        self.assertEqual((self.out.getvalue(), self.view.draws), ("Created tunnel t1\n", 0))
        self.assertEqual(self.view.state.tunnel, "t1")

    def test_redraws_at_most_max_rate(self):
        feed_connected(self.view)
        self.assertEqual(self.view.draws, 1)  # the first change is drawn at once
        for i in range(100):  # 100 requests within 2 seconds
            self.view.event("request", "", method="GET", path=f"/{i}", status=200,
                            duration_ms=1)
            self.clock.advance(0.02)
        self.assertLessEqual(self.view.draws, 1 + 2 * 4)
        self.assertGreaterEqual(self.view.draws, 2 * 4 - 1)
        self.clock.advance(1)
        self.assertEqual(self.view.state.requests, 100)
        # the last change is drawn at the end of its interval; then nothing is pending
        self.assertIn("/99", self.view.console.file.getvalue().rsplit("Server", 1)[1])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_countdown_ticks_while_waiting(self):
        feed_connected(self.view)
        self.view.event("disconnected", "", connection=1, code=1006)
        self.view.event("reconnecting", "", connection=1, delay=3.0)
        before = self.view.draws
        self.clock.pump([0.5] * 4)
        self.assertGreaterEqual(self.view.draws - before, 3)
        self.view.event("connected", "", connection=1, connections=2)
        self.clock.pump([0.5] * 4)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_disconnect_stops_the_view(self):
        feed_connected(self.view)
        self.view.message("Tunnel t1 disconnected", "tunnel_disconnected", tunnel="t1")
        self.view.message("Tunnel t1 deleted", "tunnel_deleted", tunnel="t1")
        self.assertIn("disconnected", self.view.console.file.getvalue())
        self.assertEqual(self.out.getvalue().splitlines()[-2:],
                         ["Tunnel t1 disconnected", "Tunnel t1 deleted"])
        self.assertFalse(self.view.live.is_started)


class _Tty(io.StringIO):
    def isatty(self):
        return True


class ChoiceTests(unittest.TestCase):
    def printer(self, out, *argv):
        c = cli.Cli(task.Clock(), out, io.StringIO(), environ={})
        c.parse(list(argv))
        return c.printer

    def test_terminal_gets_the_live_view(self):
        p = self.printer(_Tty(), "-s", "http://x.test/", "tunnel", "connect", "t1",
                         "http://127.0.0.1:1", "--http-mode")
        self.assertIsInstance(p, liveview.LiveView)
        self.assertTrue(p.state.http_mode)

    def test_plain_lines_otherwise(self):
        for out, argv in [(io.StringIO(), ["tunnel", "connect", "t1", "http://127.0.0.1:1"]),
                          (_Tty(), ["--non-interactive", "tunnel", "connect", "t1"]),
                          (_Tty(), ["--log-format", "json", "tunnel", "connect", "t1"]),
                          (_Tty(), ["tunnel", "info", "t1"])]:
            self.assertIsInstance(self.printer(out, *argv), output.LinePrinter, argv)


