"""The root service: builds every part from a `Config` and runs the life cycle.

One `MultiService` holds storage, the domain, every listener, transport and
ingress. Start-up (docs/protocol.rst, "Life cycle") is asynchronous:
storage is opened (and must answer) before anything listens, listeners are
bound before the node is marked ready, and any failure logs one line
``Failed to start up: <reason>``, stops the reactor and makes the process exit
255. Shutdown (SIGTERM/SIGINT through twistd): stop accepting
tunnel connections and disconnect the local ones, readiness off, close every
listener and transport, close storage.
"""

import os
import signal
import sys

import attrs
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from exposr import __version__, startup
from exposr.compat.twisted import clear_exit_signal
from exposr.node import Node
from exposr.readiness import Readiness

log = Logger(namespace="exposr.server")


@attrs.define
class ExitStatus:
    """The status the process exits with once the reactor has stopped.

    ``caller_exits`` is True when the caller (the ``exposrd`` command) reads
    ``code`` and exits with it after twistd returns; otherwise (plain
    ``twistd exposrd``, which has no exit-status hook of its own) a start-up
    failure ends the process with ``code`` after the reactor's shutdown.
    """

    code: int = 0
    caller_exits: bool = False


def _within(d, seconds, clock):
    """A Deferred firing True once ``d`` fires (its errors are logged), False
    after ``seconds`` if it has not; ``d`` itself is left alone."""
    done = defer.Deferred()

    def fired(result):
        if isinstance(result, Failure):
            log.failure("error while draining", result)
        if not done.called:
            done.callback(True)

    d.addBoth(fired)
    timer = clock.callLater(seconds, lambda: done.callback(False) if not done.called else None)
    done.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
    return done


def _sleep(clock, seconds):
    d = defer.Deferred()
    clock.callLater(seconds, d.callback, None)
    return d


def _exit_on_second_signal():
    """From now on SIGTERM or SIGINT ends the process at once (non-graceful: 255)."""

    def force(signum, frame):
        log.warn("Second signal {signum} while shutting down: exiting now", signum=signum)
        _exit_now(255)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, force)


def _exit_now(code):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class ExposrService(MultiService):
    """Everything one exposrd process runs.

    ``ExposrService(config, reactor, exit_status=None, node=None,
    handle_signals=False)``: the parts come from `exposr.components.build`
    and are this service's children.
    """

    def __init__(self, config, reactor, exit_status=None, node=None, handle_signals=False):
        from exposr import components

        MultiService.__init__(self)
        self.config = config
        self.reactor = reactor
        self.exit_status = exit_status if exit_status is not None else ExitStatus()
        # the process's own server (twistd): a second SIGTERM/SIGINT while
        # draining ends it at once
        self.handle_signals = handle_signals
        self.node = node if node is not None else Node.create(config.cluster_node_ip)
        self.readiness = Readiness()
        self.parts = components.build(config, reactor, self.node, self.readiness)
        for child in self.parts.services:
            child.setServiceParent(self)
        self._started = None
        self._start_failure = None

    # -- the parts, by name (for tests and tools) ----------------------------

    storage = property(lambda self: self.parts.storage)
    accounts = property(lambda self: self.parts.accounts)
    tunnels = property(lambda self: self.parts.tunnels)
    registry = property(lambda self: self.parts.registry)
    router = property(lambda self: self.parts.router)
    cluster = property(lambda self: self.parts.cluster)
    http_ingress = property(lambda self: self.parts.http_ingress)
    ssh = property(lambda self: self.parts.ssh)
    listeners = property(lambda self: self.parts.listeners)

    # -- life cycle --------------------------------------------------------

    def startService(self):
        MultiService.startService(self)
        self._started = defer.ensureDeferred(self._start())
        self._started.addErrback(self._failed)

    def when_started(self):
        """A Deferred that fires once the server is ready (for tests)."""
        d = defer.Deferred()
        self._started.addCallback(lambda r: (d.callback(self._start_failure or r), r)[1])
        return d

    async def _start(self):
        config = self.config
        log.info(
            "exposrd {version} starting, node {node_id} ({node_host}, {node_ip}), reactor {reactor}",
            version=__version__,
            reactor=f"{type(self.reactor).__module__}.{type(self.reactor).__name__}",
            node_id=self.node.id,
            node_host=self.node.host,
            node_ip=self.node.ip,
        )
        if config.allow_registration:
            log.warn("Public account registration is enabled (--allow-registration)")
        for given, replacement in config.deprecated:
            log.warn("{given} is deprecated, use {replacement}", given=given, replacement=replacement)
        await self.parts.storage.open()
        for hook in self.parts.start_hooks:
            await defer.maybeDeferred(hook)
        for listener in self.parts.listeners.values():
            port = await listener.listen()
            host = port.getHost()
            log.info("{name} listening on {addr}:{port}", name=listener.name, addr=host.host, port=host.port)
        for hook in self.parts.ready_hooks:
            await defer.maybeDeferred(hook)
        self.readiness.started = True
        self.readiness.ready = True
        log.info("exposrd ready: {summary}", summary=self._summary())
        return self

    def _summary(self):
        bound = {name: (listener.address.host, listener.address.port)
                 for name, listener in self.parts.listeners.items() if listener.address is not None}
        ssh = self.parts.ssh
        return startup.summary(self.config, bound, ssh.port if ssh is not None else None)

    def _failed(self, failure):
        self.exit_status.code = 255
        reason = failure.getErrorMessage() or failure.type.__name__
        log.critical("Failed to start up: {reason}", reason=reason)
        if not self.exit_status.caller_exits:
            self.reactor.addSystemEventTrigger("after", "shutdown", _exit_now, 255)
        self.reactor.callWhenRunning(self.reactor.stop)
        # handled (logged above): kept for `when_started`, never an "Unhandled error in Deferred"
        self._start_failure = failure

    @defer.inlineCallbacks
    def stopService(self):
        """Drain, then stop: readiness off at once; keep serving for the grace
        period (load balancers move away); stop accepting; let in-flight
        requests and streams finish, up to the drain timeout; disconnect the
        tunnel clients (WebSockets get 1001, so they reconnect elsewhere);
        close everything else, storage last. A second SIGTERM/SIGINT meanwhile
        ends the process at once."""
        started = self.readiness.started
        config = self.config
        log.info("exposrd shutting down")
        # twistd re-raises SIGTERM/SIGINT at exit so the status shows the
        # signal; a graceful shutdown of exposrd exits 0
        clear_exit_signal(self.reactor)
        self.readiness.ready = False
        if self.handle_signals:
            _exit_on_second_signal()
        if started and config.shutdown_grace > 0 and self.handle_signals:
            log.info("Still serving for {seconds} s (not ready) so load balancers move away",
                     seconds=config.shutdown_grace)
            yield _sleep(self.reactor, config.shutdown_grace)
        for listener in self.parts.listeners.values():
            yield defer.maybeDeferred(listener.stopService)
        if started and self.parts.drain_hooks:
            drained = yield _within(
                defer.gatherResults([defer.maybeDeferred(h) for h in self.parts.drain_hooks], consumeErrors=True),
                config.shutdown_drain_timeout, self.reactor,
            )
            if not drained:
                log.warn("In-flight requests still running after {seconds} s: closing them",
                         seconds=config.shutdown_drain_timeout)
        for hook in self.parts.stop_hooks:
            try:
                yield defer.maybeDeferred(hook)
            except Exception:
                log.failure("error while draining")
        # children are stopped in reverse order: listeners and transports
        # first, storage (added first) last
        yield defer.maybeDeferred(MultiService.stopService, self)
        if started:
            log.info("Shutdown complete")
