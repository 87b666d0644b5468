"""The root service: builds every part from a `Config` and runs the life cycle.

One `MultiService` holds storage, the domain, every listener, transport and
ingress. Start-up follows reference/lifecycle.md 12.1 and is asynchronous:
storage is opened (and must answer) before anything listens, listeners are
bound before the node is marked ready, and any failure logs one line
``Failed to start up: <reason>``, stops the reactor and makes the process exit
255. Shutdown (SIGTERM/SIGINT through twistd) follows 12.3: stop accepting
tunnel connections and disconnect the local ones, readiness off, close every
listener and transport, close storage.
"""

import os
import sys

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from exposr import __version__
from exposr.node import Node
from exposr.readiness import Readiness

log = Logger(namespace="exposr.server")

_exit_code = 0


def exit_code():
    """The status the process should exit with once the reactor has stopped."""
    return _exit_code


class ExposrService(MultiService):
    """Everything one exposrd process runs."""

    def __init__(self, config, reactor):
        MultiService.__init__(self)
        self.config = config
        self.reactor = reactor
        self.node = Node.create(config.cluster_node_ip)
        self.readiness = Readiness()
        self.listeners = {}
        self._build()
        self._started = None

    # -- construction ------------------------------------------------------

    def _build(self):
        from exposr import components

        components.build(self)

    def add_listener(self, listener):
        self.listeners[listener.name] = listener
        listener.setServiceParent(self)

    # -- life cycle --------------------------------------------------------

    def startService(self):
        MultiService.startService(self)
        self._started = defer.ensureDeferred(self._start())
        self._started.addErrback(self._failed)

    def when_started(self):
        """A Deferred that fires once the server is ready (for tests)."""
        d = defer.Deferred()
        self._started.addBoth(lambda r: (d.callback(r), r)[1])
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
        await self.storage.open()
        for hook in self.start_hooks:
            await defer.maybeDeferred(hook)
        for listener in self.listeners.values():
            port = await listener.listen()
            host = port.getHost()
            log.info("{name} listening on {addr}:{port}", name=listener.name, addr=host.host, port=host.port)
        self.readiness.started = True
        self.readiness.ready = True
        log.info("exposrd ready")
        return self

    def _failed(self, failure):
        global _exit_code
        _exit_code = 255
        reason = failure.getErrorMessage() or failure.type.__name__
        log.critical("Failed to start up: {reason}", reason=reason)
        if "exposr.script" not in sys.modules:
            # plain `twistd exposrd`: it has no exit-status hook of its own
            self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 255)
        self.reactor.callWhenRunning(self.reactor.stop)
        return failure

    @defer.inlineCallbacks
    def stopService(self):
        started = self.readiness.started
        log.info("exposrd shutting down")
        # twistd re-raises SIGTERM/SIGINT at exit so the status shows the
        # signal; a graceful shutdown of exposrd exits 0 (lifecycle.md 12.3)
        if hasattr(self.reactor, "_exitSignal"):
            self.reactor._exitSignal = None
        self.readiness.ready = False
        for hook in self.stop_hooks:
            try:
                yield defer.maybeDeferred(hook)
            except Exception:
                log.failure("error while draining")
        # children are stopped in reverse order: listeners and transports
        # first, storage (added first) last
        yield defer.maybeDeferred(MultiService.stopService, self)
        if started:
            log.info("Shutdown complete")
