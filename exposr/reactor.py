"""The reactor exposrd and the exposr client run on: Twisted's epoll reactor, leaner per event.

`EPollReactor.doPoll` hands every ready socket to ``_doReadOrWrite`` through
``log.callWithLogger``, which sets a legacy logging context (the ``system``
prefix of `twisted.python.log` messages) around the call: a ``logPrefix()``
call, a context dictionary and three more Python frames per event. exposr's
logs never show that prefix, and on the proxy's hot path (two or three ready
sockets per request) it cost about 5% of the server's CPU (bench/http_bench.py).

`Reactor` dispatches events straight to ``_doReadOrWrite``, which already turns
any exception of a read or write into a logged disconnection. What could still
escape (an exception from a protocol's ``connectionLost``) is logged here, as
``callWithLogger`` does, and the other events of the poll are still handled.

Everything else is Twisted's. `install` is what the ``exposrd`` and ``exposr``
commands call; ``twistd --reactor exposr`` picks it by name (the plugin in
``twisted/plugins/exposrd.py``). Where epoll is missing, Twisted's default
reactor is installed instead.
"""

import errno

from twisted.logger import Logger

log = Logger(namespace="exposr.reactor")

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # no epoll (not Linux)
    EPollReactor = None


if EPollReactor is not None:

    class Reactor(EPollReactor):
        def doPoll(self, timeout):
            if timeout is None:
                timeout = -1  # wait indefinitely
            try:
                events = self._poller.poll(timeout, len(self._selectables))
            except OSError as err:
                if err.errno == errno.EINTR:
                    return
                raise
            selectables = self._selectables
            handle = self._doReadOrWrite
            for fd, event in events:
                selectable = selectables.get(fd)
                if selectable is not None:
                    try:
                        handle(selectable, fd, event)
                    except Exception:
                        log.failure("unhandled error handling an event of {selectable!r}", selectable=selectable)

        doIteration = doPoll

else:  # pragma: no cover
    Reactor = None


def install():
    """Install `Reactor` as the global reactor (Twisted's default where there is no epoll)."""
    from twisted.internet import main

    if Reactor is None:  # pragma: no cover
        from twisted.internet import default

        default.install()
        return
    main.installReactor(Reactor())


def install_if_none():
    """`install`, unless a reactor is installed already (an embedding program's, a test's)."""
    import sys

    if "twisted.internet.reactor" not in sys.modules:
        install()

