"""Logging: one JSON object per line on stdout, filtered by `--log-level`.

Records look like the original's: ``timestamp``, ``level`` (upper case),
``logger`` (the component), ``pid``, ``host`` and ``data`` (an object; a plain
message is wrapped as ``{"message": ...}``). Extra keys of a log call that are
JSON-able and do not start with ``log_`` go into ``data``.

Nothing logged may carry a secret: callers pass tunnel ids, never account
numbers, tokens or keys.

`observer` is the factory that `twistd --logger exposr.log.observer` (and the
``exposrd`` command) installs; `set_level` is called by the service maker once
the options are known.
"""

import datetime
import json
import os
import socket
import sys
import threading

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)

LEVELS = {
    "all": LogLevel.debug,
    "trace": LogLevel.debug,
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "fatal": LogLevel.critical,
}
_NAMES = {
    LogLevel.debug: "DEBUG",
    LogLevel.info: "INFO",
    LogLevel.warn: "WARN",
    LogLevel.error: "ERROR",
    LogLevel.critical: "FATAL",
}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_off = False


def set_level(name):
    """Apply a `--log-level` choice to every observer made by `observer`."""
    global _off
    _off = name == "off"
    _predicate.setLogLevelForNamespace(None, LEVELS.get(name, LogLevel.info))


_PLAIN = (str, int, float, bool, type(None))


def _jsonable(value):
    if type(value) in _PLAIN:
        return value
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def event_as_record(event, host=socket.gethostname(), pid=os.getpid()):
    """Turn a twisted.logger event into the record dict written as JSON."""
    data = {}
    text = formatEvent(event) if event.get("log_format") else None
    if text:
        data["message"] = text
    for key, value in event.items():
        if key.startswith("log_") or key in ("format", "message", "isError", "why", "system", "time"):
            continue
        data[key] = _jsonable(value)
    failure = event.get("log_failure")
    if failure is not None:
        data["error"] = failure.getErrorMessage()
        data["stack"] = failure.getTraceback()
    namespace = event.get("log_namespace", "exposr")
    ts = datetime.datetime.fromtimestamp(event.get("log_time", 0), datetime.UTC)
    return {
        "timestamp": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
        "level": _NAMES.get(event.get("log_level"), "INFO"),
        "logger": namespace,
        "host": host,
        "pid": pid,
        "data": data,
    }


class JSONLineObserver:
    """Writes records as JSON lines; flushes once per reactor turn, not per line."""

    def __init__(self, out):
        self._out = out
        self._flush_pending = False

    def __call__(self, event):
        if _off:
            return
        try:
            line = json.dumps(event_as_record(event), separators=(",", ":"), ensure_ascii=False)
        except Exception as e:  # never let logging break the server
            line = json.dumps({"level": "ERROR", "data": {"message": f"unloggable event: {e!r}"}})
        self._out.write(line + "\n")
        self._schedule_flush()

    def _schedule_flush(self):
        if self._flush_pending:
            return
        from twisted.internet import reactor

        if getattr(reactor, "running", False) and threading.current_thread() is threading.main_thread():
            self._flush_pending = True
            reactor.callLater(0, self._flush)
        else:
            self._out.flush()

    def _flush(self):
        self._flush_pending = False
        try:
            self._out.flush()
        except (OSError, ValueError):
            pass


def observer(out=None):
    """The `twistd --logger` factory: JSON lines on stdout, level-filtered."""
    return FilteringLogObserver(JSONLineObserver(out or sys.stdout), [_predicate])
