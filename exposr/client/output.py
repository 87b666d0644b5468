"""What the client prints: one plain line per event, or one JSON object per line.

`LinePrinter(out, err, fmt, clock)`:

* ``message(text, event, **fields)``: command output (created, connected, URLs...):
  the text as is, or ``{"time", "event", "message", ...fields}`` in JSON;
* ``event(name, text, **fields)``: something that happened while connected
  (connection up/lost, reconnecting, a request): the text after the local time
  ``[HH:MM:SS]``, or the same JSON object;
* ``observer``: a `twisted.logger` observer for everything else logged (library
  warnings): ``warning: TEXT`` on `err` (no traceback), or a JSON line on `out`.
  Twisted's own log format is never used.
"""

import json
import time

from twisted.logger import formatEvent

_LEVEL_NAMES = {"warn": "warning"}


class LinePrinter:
    def __init__(self, out, err, fmt="text", clock=time.time):
        if fmt not in ("text", "json"):
            raise ValueError(f"unknown output format: {fmt}")
        self.out = out
        self.err = err
        self.fmt = fmt
        self.clock = clock

    def _json(self, stream, doc):
        stream.write(json.dumps(doc, separators=(",", ":"), default=str) + "\n")
        stream.flush()

    def _stamp(self, seconds):
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + \
            f".{int(seconds * 1000) % 1000:03d}Z"

    def message(self, text, event="message", **fields):
        if self.fmt == "json":
            self._json(self.out, {"time": self._stamp(self.clock()), "event": event,
                                  "message": text, **fields})
        else:
            self.out.write(text + "\n")
            self.out.flush()

    def event(self, name, text, **fields):
        now = self.clock()
        if self.fmt == "json":
            self._json(self.out, {"time": self._stamp(now), "event": name, "message": text,
                                  **fields})
        else:
            self.out.write(time.strftime("[%H:%M:%S] ", time.localtime(now)) + text + "\n")
            self.out.flush()

    def observer(self, event):
        """twisted.logger observer: one line per log event, never a traceback."""
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            detail = failure.getErrorMessage()
            text = f"{text}: {detail}" if text and detail else (text or detail)
        level = event.get("log_level")
        name = _LEVEL_NAMES.get(getattr(level, "name", ""), getattr(level, "name", "info"))
        if self.fmt == "json":
            self._json(self.out, {"time": self._stamp(event.get("log_time") or self.clock()),
                                  "event": "log", "level": name,
                                  "namespace": event.get("log_namespace"), "message": text})
        else:
            self.err.write(f"{name}: {text}\n")
            self.err.flush()
