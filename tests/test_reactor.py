"""exposr's reactor: Twisted's epoll reactor without the per-event log context.

Each test runs its own `Reactor` instance (not the global one trial runs on)
over a real socket pair, turning it by hand with ``iterate``.
"""

import socket

from twisted.internet import protocol
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from exposr import reactor as exposr_reactor


class _Collect(protocol.Protocol):
    def __init__(self, fail_on_lost=False):
        self.data = b""
        self.lost = None
        self.fail_on_lost = fail_on_lost

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = reason
        if self.fail_on_lost:
            raise RuntimeError("boom in connectionLost")


class ReactorTests(unittest.TestCase):
    def setUp(self):
        if exposr_reactor.Reactor is None:
            raise unittest.SkipTest("no epoll here")
        self.reactor = exposr_reactor.Reactor()
        self.addCleanup(self._close)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def _close(self):
        for selectable in self.reactor.removeAll():
            selectable.socket.close()
        self.reactor._poller.close()

    def _pair(self, proto):
        """A Twisted TCP-like transport on one end of a socket pair, and the other end."""
        from twisted.internet import unix

        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        transport = unix.Server(ours, proto, ("", 0), None, 1, self.reactor)
        proto.makeConnection(transport)
        transport.startReading()
        return transport, theirs

    def _turn(self, times=3):
        for _ in range(times):
            self.reactor.doPoll(0)

    def test_reads_reach_the_protocol(self):
        proto = _Collect()
        transport, peer = self._pair(proto)
        peer.sendall(b"hello")
        self._turn()
        self.assertEqual(proto.data, b"hello")
        transport.write(b"back")
        self._turn()
        self.assertEqual(peer.recv(10), b"back")
        transport.loseConnection()
        self._turn()

    def test_close_by_peer_reaches_connection_lost(self):
        proto = _Collect()
        self._pair(proto)[1].close()
        self._turn()
        self.assertIsNotNone(proto.lost)

    def test_an_exception_from_connection_lost_is_logged_and_other_sockets_still_served(self):
        failing, other = _Collect(fail_on_lost=True), _Collect()
        _, failing_peer = self._pair(failing)
        _, other_peer = self._pair(other)
        failing_peer.close()
        other_peer.sendall(b"still served")
        self._turn()
        self.assertEqual(other.data, b"still served")
        self.assertIsNotNone(failing.lost)
        failures = [e for e in self.events if e.get("log_failure") is not None]
        self.assertTrue(failures, "the exception was not logged")
        self.flushLoggedErrors(RuntimeError)

    def test_install_if_none_keeps_an_installed_reactor(self):
        from twisted.internet import reactor as installed

        exposr_reactor.install_if_none()
        from twisted.internet import reactor as after

        self.assertIs(installed, after)
