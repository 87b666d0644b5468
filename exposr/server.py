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
import sys

import attrs
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

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


def _exit_now(code):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class ExposrService(MultiService):
    """Everything one exposrd process runs.

    ``ExposrService(config, reactor, exit_status=None, node=None)``: the parts
    come from `exposr.components.build` and are this service's children.
    """

    def __init__(self, config, reactor, exit_status=None, node=None):
        from exposr import components

        MultiService.__init__(self)
        self.config = config
        self.reactor = reactor
        self.exit_status = exit_status if exit_status is not None else ExitStatus()
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
        started = self.readiness.started
        log.info("exposrd shutting down")
        # twistd re-raises SIGTERM/SIGINT at exit so the status shows the
        # signal; a graceful shutdown of exposrd exits 0
        clear_exit_signal(self.reactor)
        self.readiness.ready = False
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
