"""The inspector page in a real browser: Debian's headless chromium driven by playwright-core.

tests/browser/inspector.mjs opens the page, waits for the row of a request made
through the tunnel (made after the page loaded: it arrives by the live feed),
clicks Replay, waits for the replayed row and saves a screenshot. Needs
/usr/bin/chromium, node and `npm ci --prefix tests/browser` (`.ci/run` installs
them); the test fails, not skips, without them.
"""

import os
import shutil

from twisted.internet import defer, protocol, reactor

from tests.e2e_support import within
from tests.test_inspector import InspectorTestBase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BROWSER_DIR = os.path.join(ROOT, "tests", "browser")
SCRIPT = os.path.join(BROWSER_DIR, "inspector.mjs")
SCREENSHOT = os.path.join(BROWSER_DIR, "artifacts", "inspector.png")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
BROWSER_TIMEOUT = 90


class _Node(protocol.ProcessProtocol):
    def __init__(self, on_line):
        self.output = []
        self.on_line = on_line
        self.ended = defer.Deferred()
        self._buf = b""

    def outReceived(self, data):
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            text = line.decode("utf-8", "replace")
            self.output.append(text)
            self.on_line(text)

    def errReceived(self, data):
        self.output.append(data.decode("utf-8", "replace").rstrip())

    def processEnded(self, reason):
        self.ended.callback(getattr(reason.value, "exitCode", None))


class InspectorBrowserTests(InspectorTestBase):
    timeout = BROWSER_TIMEOUT + 30

    @defer.inlineCallbacks
    def test_page_shows_live_request_and_replays_it(self):
        node = shutil.which("node")
        self.assertIsNotNone(node, "node is not installed (.ci/run installs nodejs)")
        self.assertTrue(os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing (apt-get install chromium)")
        self.assertTrue(os.path.isdir(os.path.join(BROWSER_DIR, "node_modules", "playwright-core")),
                        "playwright-core is missing: npm ci --prefix tests/browser")
        os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
        if os.path.exists(SCREENSHOT):
            os.remove(SCREENSHOT)

        c = yield self.connect("--http-mode", "--inspect", "127.0.0.1:0")
        self.assertTrue(c.inspector_url)
        loaded = defer.Deferred()

        def on_line(text):
            if text == "page loaded" and not loaded.called:
                loaded.callback(None)

        proc = _Node(on_line)
        transport = reactor.spawnProcess(proc, node, [node, SCRIPT, c.inspector_url, SCREENSHOT],
                                         env={**os.environ, "CHROMIUM": CHROMIUM},
                                         path=BROWSER_DIR)

        def kill():
            if transport.pid is not None:
                transport.signalProcess("KILL")
            return proc.ended

        ended = within(proc.ended, BROWSER_TIMEOUT)
        ended.addErrback(lambda f: (kill(), f)[1])
        try:
            yield within(loaded, BROWSER_TIMEOUT)
        except Exception:
            yield kill()
            self.fail("the page did not load:\n" + "\n".join(proc.output))
        code, _ = yield self.through("/from-the-browser-test?n=1")  # after load: the live feed
        self.assertEqual(code, 200)
        exit_code = yield ended
        log = "\n".join(proc.output)
        self.assertEqual(exit_code, 0, log)
        paths = [r.uri for r in self.target.requests]
        self.assertEqual(paths, [b"/from-the-browser-test?n=1"] * 2, log)
        self.assertTrue(os.path.getsize(SCREENSHOT) > 0)
        print(f"inspector browser test: screenshot {os.path.relpath(SCREENSHOT, ROOT)}")
