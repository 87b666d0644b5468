"""The SSH listener: host key, Conch factory, and the `SSHTransportService`
that opens it and tracks live connections."""

import base64
import collections
import hashlib

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.application.service import Service
from twisted.conch.ssh import factory, keys
from twisted.internet import defer
from twisted.python.failure import Failure

from exposr.listen import tcp_endpoint
from exposr.transport.ssh.auth import UserAuth
from exposr.transport.ssh.connection import ForwardingConnection
from exposr.transport.ssh.shared import (
    KEEPALIVE_INTERVAL,
    KEEPALIVE_MAX_MISSED,
    LOGIN_GRACE,
    MAX_UNAUTHENTICATED_PER_IP,
    STREAM_OPEN_TIMEOUT,
    log,
)
from exposr.transport.ssh.transport import ServerTransport


def fingerprint(key):
    """``SHA256:<unpadded base64>`` of the public key blob (what ssh-keygen -l prints)."""
    digest = hashlib.sha256(key.public().blob()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def load_host_key(text):
    """A private `keys.Key` from PEM text (OpenSSH or PKCS#8/PEM)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    try:
        key = keys.Key.fromString(data)
    except Exception as e:
        raise ValueError("transport-ssh-key: unusable host key (%s)" % (e,)) from None
    if key.isPublic():
        raise ValueError("transport-ssh-key: a private key is required")
    return key


def generate_host_key():
    return keys.Key(ed25519.Ed25519PrivateKey.generate())



class SSHTransportService(Service):
    """
    ``SSHTransportService(config, tunnels, connections, node_id, reactor)``:
    ``tunnels`` authorises logins and adopts targets; ``connections``
    registers and unregisters the tunnel connections (``register(conn,
    account_id)`` → Deferred of bool, ``unregister(conn)``): the
    `TunnelService`.

    `listen` (awaited by the start-up sequence; `startService` calls it too,
    once) loads or generates the host key and opens the listener on
    ``config.transport_ssh_port``. Afterwards ``port`` is the bound port number
    and ``fingerprint`` the host key's ``SHA256:...``.
    """

    name = "transport-ssh"

    def __init__(
        self,
        config,
        tunnels,
        connections,
        node_id,
        reactor,
        *,
        login_grace=LOGIN_GRACE,
        keepalive_interval=KEEPALIVE_INTERVAL,
        keepalive_max_missed=KEEPALIVE_MAX_MISSED,
        stream_open_timeout=STREAM_OPEN_TIMEOUT,
        endpoint=None,
        limiter=None,
    ):
        self.config = config
        self.tunnels = tunnels
        self.connections = connections
        self.limiter = limiter  # failed logins per client address (`exposr.ratelimit.FailureLimiter`)
        self.node_id = node_id
        self.reactor = reactor
        self.login_grace = login_grace
        self.keepalive_interval = keepalive_interval
        self.keepalive_max_missed = keepalive_max_missed
        self.stream_open_timeout = stream_open_timeout
        self.endpoint = endpoint
        self.host_key = None
        self.fingerprint = None
        self.port = None
        self.listening_port = None
        self.protocols = set()  # live ServerTransport instances
        self.max_unauthenticated_per_ip = MAX_UNAUTHENTICATED_PER_IP
        self.unauthenticated = collections.Counter()  # peer IP -> connections not yet logged in
        self.logins_in_progress = {}  # peer IP -> its ServerTransports not yet logged in, oldest first
        self._listening = None
        self._waiting_close = []

    # -- key ---------------------------------------------------------------

    def _load_key(self):
        if self.host_key is not None:
            return
        text = self.config.transport_ssh_key
        if text:
            self.host_key = load_host_key(text)
            origin = "configured"
        else:
            self.host_key = generate_host_key()
            origin = "generated"
        self.fingerprint = fingerprint(self.host_key)
        log.info(
            "SSH host key {origin}: {key_type} {fingerprint}",
            origin=origin,
            key_type=self.host_key.sshType().decode("ascii"),
            fingerprint=self.fingerprint,
        )

    # -- listening ---------------------------------------------------------

    def listen(self):
        """Open the listener (once); a Deferred firing with the `IListeningPort`."""
        if self._listening is None:
            self._listening = []
            self._outcome = None

            def done(result):
                self._outcome = result
                waiters, self._listening = self._listening, ()
                for d in waiters:
                    (d.errback if isinstance(result, Failure) else d.callback)(result)

            defer.maybeDeferred(self._listen).addBoth(done)
        if self._outcome is not None:
            if isinstance(self._outcome, Failure):
                return defer.fail(self._outcome)
            return defer.succeed(self._outcome)
        d = defer.Deferred()
        self._listening.append(d)
        return d

    @defer.inlineCallbacks
    def _listen(self):
        self._load_key()
        endpoint = self.endpoint or tcp_endpoint(
            self.reactor, self.config.transport_ssh_port, self.config.listen_address
        )
        port = yield endpoint.listen(_Factory(self))
        self.listening_port = port
        self.port = port.getHost().port
        return port

    @property
    def address(self):
        return self.listening_port.getHost() if self.listening_port is not None else None

    def startService(self):
        Service.startService(self)
        if self._listening is None:
            self.listen().addErrback(
                lambda f: log.failure("SSH transport failed to listen", failure=f)
            )

    def stopService(self):
        Service.stopService(self)
        port, self.listening_port = self.listening_port, None
        stopped = defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
        closing = [p.close_for_shutdown() for p in list(self.protocols)]
        return defer.gatherResults([stopped] + closing, consumeErrors=True).addCallback(lambda _: None)


class _Factory(factory.SSHFactory):
    # no /etc/ssh/moduli: fixed groups and curves only
    primes = None

    def __init__(self, service):
        self.exposr = service
        key = service.host_key
        self.publicKeys = {key.sshType(): key.public()}
        self.privateKeys = {key.sshType(): key}
        self.services = {b"ssh-userauth": UserAuth, b"ssh-connection": ForwardingConnection}
        self.noisy = False

    def getPrimes(self):
        return None

    def getService(self, transport, service):
        if service == b"ssh-userauth" and getattr(transport, "avatar", None) is None:
            return UserAuth
        return None  # ssh-connection is started by UserAuth itself


_Factory.protocol = ServerTransport
