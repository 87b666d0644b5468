"""Logging: one record per line on stdout, filtered by `--log-level`.

``--log-format json`` (the default) writes one JSON object per line;
``--log-format text`` writes the same record for a terminal reader:
``<timestamp> <LEVEL> <logger>: <message> key=value ...`` (a traceback
follows on its own lines).

JSON records look like the original's: ``timestamp``, ``level`` (upper case),
``logger`` (the component), ``pid``, ``host`` and ``data`` (an object; a plain
message is wrapped as ``{"message": ...}``). Extra keys of a log call that are
JSON-able and do not start with ``log_`` go into ``data``.

Nothing logged may carry a secret: callers pass tunnel ids, never account
numbers, tokens or keys.

`observer` is the factory that `twistd --logger exposr.log.observer` (and the
``exposrd`` command) installs; `set_level`, `set_format` and `use_reactor` are
called by the service maker (the entry point, which knows the reactor) once
the options are known. Until a reactor is given, every line is written at once.

Twisted's own chatter is logged at debug level, not info: the lines of its
legacy logging API at info level ("Door starting on 8080", "(TCP Port 8080
Closed)") and factories' "Starting factory" / "Stopping factory".

Access records (`AccessLog`, one per proxied request) are the hot case: once
`observer` has installed the process's JSON output, they are written to it as
pre-formatted lines, without a twisted.logger event (building, publishing,
filtering and formatting one costs several times more than the line). The
record is the same as the event's would be. Without an installed observer
(tests, embedding) they are ordinary twisted.logger events. `access_writer`
gives the installed output, so that a caller can hand it to an `AccessLog`
explicitly (``AccessLog(namespace, sink=writer)``: anything with
``write_line(line)``).
"""

import datetime
import json
import os
import socket
import string
import sys
import threading
import time
from threading import get_ident
from json.encoder import encode_basestring as _quote

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
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

FORMATS = ("json", "text")

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_off = False
_text = False  # --log-format text (`set_format`)
_sink = None  # the JSONLineObserver installed by `observer`, for access records
_reactor = None  # the reactor given by the entry point (`use_reactor`)
_info_on = {}  # namespace -> whether info passes `_predicate` (reset by set_level)
_MAIN_THREAD = threading.main_thread().ident


def set_level(name):
    """Apply a `--log-level` choice to every observer made by `observer`."""
    global _off
    _off = name == "off"
    _predicate.setLogLevelForNamespace(None, LEVELS.get(name, LogLevel.info))
    _info_on.clear()


def set_format(name):
    """Apply a `--log-format` choice (json, text) to every output made by `observer`."""
    global _text
    if name not in FORMATS:
        raise ValueError(f"unknown log format {name!r}")
    _text = name == "text"


def use_reactor(reactor):
    """The reactor whose turns the JSON output batches its lines by (from the entry point).

    Applies to the installed output and to the one `observer` makes later
    (``twistd`` builds the service before it starts logging).
    """
    global _reactor
    _reactor = reactor
    if _sink is not None:
        _sink.use_reactor(reactor)


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


def _named_fields(log_format):
    """The names a format string uses ("Tunnel {tunnel_id} connected" -> {"tunnel_id"})."""
    try:
        return {name.split(".")[0].split("[")[0]
                for _, name, _, _ in string.Formatter().parse(log_format) if name}
    except ValueError:
        return set()


def _text_value(value):
    if isinstance(value, str) and value and not any(c.isspace() or c in "\"=" for c in value):
        return value
    return json.dumps(value, ensure_ascii=False)


def record_as_text(record, named=()):
    """One record (`event_as_record`) as text: the message, then the data it does not name."""
    data = record["data"]
    parts = [record["timestamp"], f"{record['level']:<5}", record["logger"] + ":", data.get("message", "")]
    parts += [f"{key}={_text_value(value)}" for key, value in data.items()
              if key not in ("message", "stack") and key not in named]
    line = " ".join(part for part in parts if part != "")
    stack = data.get("stack")
    return line + "\n" + stack.rstrip("\n") if stack else line


def _quiet_chatter(observer):
    """Pass events on, Twisted's info chatter (see the module docstring) as debug."""

    def observe(event):
        if event.get("log_level") == LogLevel.info and (
            event.get("log_format") in _CHATTER
            or (event.get("log_namespace") == "log_legacy" and not event.get("isError"))
        ):
            event = dict(event, log_level=LogLevel.debug)
        observer(event)

    return observe


_CHATTER = frozenset(("Starting factory {factory!r}", "Stopping factory {factory!r}"))


class JSONLineObserver:
    """Writes records as lines (JSON, or text after ``set_format("text")``): the
    lines of one reactor turn with one write.

    The lines are kept here, not in the stream's buffer: with
    ``PYTHONUNBUFFERED=1`` (usual in containers, set in the Docker image)
    every ``write`` of the stream is a system call, which was one more per
    proxied request. Outside a running reactor (start-up, shutdown, other
    threads, or before a reactor is given) every line is written at once;
    what is pending when the reactor stops is written by a shutdown trigger.
    """

    def __init__(self, out, reactor=None):
        self._out = out
        self._pending = []
        self._reactor = None
        if reactor is not None:
            self._use(reactor)

    def use_reactor(self, reactor):
        """Batch by the turns of ``reactor`` from now on (unless one was given already)."""
        if self._reactor is None:
            self._use(reactor)

    def _use(self, reactor):
        self._reactor = reactor
        reactor.addSystemEventTrigger("after", "shutdown", self.flush)

    def __call__(self, event):
        if _off:
            return
        try:
            record = event_as_record(event)
            if _text:
                line = record_as_text(record, _named_fields(event.get("log_format") or ""))
            else:
                line = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
        except Exception as e:  # never let logging break the server
            line = json.dumps({"level": "ERROR", "data": {"message": f"unloggable event: {e!r}"}})
        self.write_line(line)

    def write_line(self, line):
        pending = self._pending
        if get_ident() != _MAIN_THREAD:
            self._write(line + "\n")  # (not kept: flush runs in the reactor's thread)
        elif pending:
            pending.append(line)
        else:
            reactor = self._reactor
            if reactor is None:  # no reactor given (yet): nothing to batch by
                self._write(line + "\n")
                return
            if getattr(reactor, "running", False):
                pending.append(line)
                reactor.callLater(0, self.flush)
            else:
                self._write(line + "\n")

    def flush(self):
        """Write the pending lines now."""
        pending = self._pending
        if pending:
            self._pending = []
            pending.append("")
            self._write("\n".join(pending))

    def _write(self, text):
        try:
            self._out.write(text)
            self._out.flush()
        except (OSError, ValueError):
            pass


def access_writer():
    """The JSON output installed by `observer` (what `AccessLog` writes to), or None."""
    return _sink


def observer(out=None):
    """The `twistd --logger` factory: lines on stdout, level-filtered, chatter as debug.

    The output it makes also becomes the one `AccessLog` writes to.
    """
    global _sink
    _sink = JSONLineObserver(out or sys.stdout, _reactor)
    return _quiet_chatter(FilteringLogObserver(_sink, [_predicate]))


class AccessLog:
    """One record per proxied request: ``access(method, path, status, ...)``.

    The record is the one an ``info`` event of namespace ``namespace`` would
    give (``data``: message, method, path, status, tunnel, client, bytes,
    duration_ms), written straight to ``sink`` (an object with
    ``write_line(line)``, e.g. a `JSONLineObserver`) when one is given, else
    to the installed JSON output when there is one (see the module
    docstring).
    """

    def __init__(self, namespace, sink=None, host=socket.gethostname(), pid=os.getpid()):
        self.namespace = namespace
        self.sink = sink
        self.logger = Logger(namespace=namespace)
        self._head = (',"level":"INFO","logger":%s,"host":%s,"pid":%s,"data":{"message":'
                      % (_quote(namespace), _quote(host), json.dumps(pid)))
        self._second = None
        self._stamp = ""

    def _enabled(self):
        on = _info_on.get(self.namespace)
        if on is None:
            on = _info_on[self.namespace] = _predicate(
                {"log_namespace": self.namespace, "log_level": LogLevel.info}) != PredicateResult.no
        return on

    def __call__(self, method, path, status, tunnel, client, nbytes, duration_ms):
        sink = self.sink
        if sink is None:
            sink = _sink
        if sink is None:
            message = f"{method} {path} {status}"
            if "{" in message or "}" in message:
                message = message.replace("{", "{{").replace("}", "}}")
            self.logger.info(message, method=method, path=path, status=status, tunnel=tunnel,
                             client=client, bytes=nbytes, duration_ms=duration_ms)
            return
        if _off or not self._enabled():
            return
        now = time.time()
        if _text:
            sink.write_line(self._text_line(now, method, path, status, tunnel, client, nbytes, duration_ms))
            return
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = datetime.datetime.fromtimestamp(second, datetime.UTC).strftime('{"timestamp":"%Y-%m-%dT%H:%M:%S.')
        qpath = _quote(path)
        sstatus = "null" if status is None else str(status)
        sink.write_line("".join((
            self._stamp, "%03dZ\"" % (int((now - second) * 1000) % 1000), self._head,
            _quote(f"{method} {path} {status}"),
            ',"method":', _quote(method), ',"path":', qpath, ',"status":', sstatus,
            ',"tunnel":', "null" if tunnel is None else _quote(tunnel),
            ',"client":', "null" if client is None else _quote(client),
            ',"bytes":', str(nbytes), ',"duration_ms":', repr(duration_ms), "}}",
        )))

    def _text_line(self, now, method, path, status, tunnel, client, nbytes, duration_ms):
        ts = datetime.datetime.fromtimestamp(now, datetime.UTC)
        record = {
            "timestamp": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "level": "INFO", "logger": self.namespace,
            "data": {"message": f"{method} {path} {status}", "tunnel": tunnel, "client": client,
                     "bytes": nbytes, "duration_ms": duration_ms},
        }
        return record_as_text(record)
