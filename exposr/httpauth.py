"""HTTP basic auth per tunnel (``access.http_auth`` of the tunnel record).

The record keeps a user name and a bcrypt hash of the password (never the
password). `Authorizer.check` decides a request by its ``Authorization``
value: bcrypt is slow on purpose, so its verdicts are cached per (user,
hash, header value) in bounded memory: a kept-alive client (or a browser
that repeats the header on every request) is hashed once. The hashing
itself runs in the reactor's thread pool, so a request that needs it does
not stall the others. Failed attempts count per client address in a
`FailureLimiter`: an address that used up its failures is refused (429)
without hashing until it may try again. A request without credentials is
not a failure (a browser asks first without them).
"""

import binascii

import bcrypt
from twisted.internet import defer, threads

from exposr.ratelimit import FailureLimiter

ROUNDS = 10  # bcrypt cost of new hashes (2^10 iterations: tens of milliseconds)
CACHE_MAX = 10000  # cached verdicts (cleared when full)
MAX_USER = 64
MAX_PASSWORD = 72  # bytes: bcrypt uses no more

OK, MISSING, WRONG, LIMITED = "ok", "missing", "wrong", "limited"


def blocking(reactor, f, *args):
    """``f(*args)`` in the reactor's thread pool (synchronously without one): a Deferred."""
    if hasattr(reactor, "getThreadPool"):
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
    return defer.maybeDeferred(f, *args)


def hash_password(password):
    """The bcrypt hash (str) of a password (str); blocking: run it in a thread."""
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(ROUNDS)).decode("ascii")


def valid_user(user):
    return isinstance(user, str) and 0 < len(user) <= MAX_USER and ":" not in user and user.isprintable()


def valid_password(password):
    return isinstance(password, str) and 0 < len(password.encode("utf-8", "surrogatepass")) <= MAX_PASSWORD


def credentials(value):
    """(user, password) of an ``Authorization: Basic`` value (bytes), or None."""
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = binascii.a2b_base64(token.strip()).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    if not colon:
        return None
    return user, password


def _verify(user, hashed, value):
    creds = credentials(value)
    if creds is None or creds[0] != user:
        return False
    try:
        return bcrypt.checkpw(creds[1].encode("utf-8", "surrogatepass"), hashed.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError):
        return False  # a malformed stored hash lets no one in


class Authorizer:
    """``Authorizer(reactor, limiter=None)``: the ingress's basic-auth checks."""

    def __init__(self, reactor, limiter=None):
        self.reactor = reactor
        self.limiter = limiter if limiter is not None else FailureLimiter(reactor, "tunnel basic auth")
        self._verdicts = {}

    def check(self, auth, value, client_ip):
        """`OK`, `MISSING`, `WRONG` or `LIMITED`, or a Deferred of one.

        ``auth``: the record's rule; ``value``: the ``Authorization`` header
        (bytes) or None; ``client_ip``: whose failures count.
        """
        if value is None:
            return MISSING
        user, hashed = auth.get("user"), auth.get("hash")
        key = (user, hashed, value)
        try:
            verdict = self._verdicts.get(key)
        except TypeError:  # a hand-edited rule
            return WRONG
        if verdict is True:
            return OK
        if not isinstance(user, str) or not isinstance(hashed, str):
            return WRONG
        source = client_ip or ""
        if self.limiter.blocked(source):
            return LIMITED
        if verdict is False:
            self.limiter.failed(source)
            return WRONG
        return blocking(self.reactor, _verify, user, hashed, value).addCallback(self._verified, key, source)

    def _verified(self, ok, key, source):
        if len(self._verdicts) >= CACHE_MAX:
            self._verdicts.clear()
        self._verdicts[key] = ok
        if ok:
            return OK
        self.limiter.failed(source)
        return WRONG
