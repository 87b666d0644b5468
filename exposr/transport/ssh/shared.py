"""What every part of the SSH transport shares: limits, loggers, the version."""

from twisted.logger import Logger

from exposr import __version__

log = Logger(namespace="exposr.transport.ssh")


class _QuietLogger(Logger):
    """Conch's own per-connection info lines (kex, services, channels) as debug."""

    def info(self, format=None, **kwargs):
        self.debug(format, **kwargs)


conch_log = _QuietLogger(namespace="exposr.transport.ssh.conch")

VERSION = __version__ if __version__.startswith("v") else "v" + __version__
BANNER = ("exposr/%s\r\n" % (VERSION,)).encode("ascii")

LOGIN_GRACE = 30.0  # seconds from TCP accept to USERAUTH_SUCCESS
MAX_UNAUTHENTICATED_PER_IP = 10  # connections still in handshake/login from one address
KEEPALIVE_INTERVAL = 15.0
KEEPALIVE_MAX_MISSED = 3
STREAM_OPEN_TIMEOUT = 10.0  # forwarded-tcpip open → confirmation (or first forward)
DISCONNECT_GRACE = 5.0  # sendDisconnect → abort if the peer does not close
MAX_AUTH_FAILURES = 3
MAX_FORWARDS = 16
MAX_SESSIONS = 4
MAX_CHANNELS = 1024
MAX_VERSION_PREAMBLE = 4096

LOCAL_WINDOW = 1024 * 1024  # what one stream may have in flight towards us
LOCAL_MAX_PACKET = 32 * 1024
MAX_REMOTE_PACKET = 64 * 1024  # we never send larger data packets than this
MAX_WINDOW = 0xFFFFFFFF

MSG_USERAUTH_BANNER = 53


class ProtocolViolation(Exception):
    """The peer sent something we cannot make sense of."""
