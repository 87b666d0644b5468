"""The Redis database of this test process: leased, so that concurrent runs never share one.

The Redis tests flush their database before and after each test, and the
storage keeps no key prefix of its own, so each test process (``trial``, or
each ``trial -j`` worker) needs a database nobody else uses. `REDIS_DB` is
leased once per process from the Redis at 127.0.0.1:6379:

* a candidate comes from ``INCR exposr-test-db-counter`` (mod 15, giving 1-15;
  db 0 is left to people), so concurrent runs start at different databases;
* it is ours once ``SET exposr-test-db-lock:<n> <token> NX EX 60`` succeeds;
  a thread renews the lease every 15 s while the process lives, and it is
  released at exit (only if still ours), or expires 60 s after a crash.

``EXPOSR_TEST_REDIS_DB`` forces a database (nothing is leased);
``EXPOSR_TEST_REDIS_DBS`` (e.g. ``3,4,12-15``) narrows the databases a lease may
take, to leave out those that something else on this Redis flushes. Without a
reachable Redis, db 9 is used and the Redis tests fail on their own.
"""

import atexit
import os
import socket
import threading
import time
import uuid

HOST, PORT = "127.0.0.1", 6379


def parse_databases(text):
    """``"3,4,12-15"`` -> (3, 4, 12, 13, 14, 15)."""
    dbs = []
    for item in text.split(","):
        first, _, last = item.strip().partition("-")
        dbs += range(int(first), int(last or first) + 1)
    return tuple(dict.fromkeys(dbs))


DATABASES = parse_databases(os.environ.get("EXPOSR_TEST_REDIS_DBS") or "1-15")
LEASE_SECONDS = 60
RENEW_SECONDS = 15
WAIT_SECONDS = 120  # for a free database, when every one is leased
_FALLBACK = 9

# deletes the lock only while it holds our token
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_RENEW = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
          "return redis.call('EXPIRE', KEYS[1], ARGV[2]) end return 0")


class _Redis:
    """A blocking RESP client for the few commands of the lease (the tests use txredisapi)."""

    def __init__(self, host=HOST, port=PORT, timeout=5):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def __call__(self, *args):
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = str(arg).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(parts))
        return self._reply()

    def _reply(self):
        line = self.file.readline()
        if not line:
            raise ConnectionError("Redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self.file.read(size + 2)[:-2]
            return data.decode()
        if kind == b"*":
            return [self._reply() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected Redis reply {line!r}")

    def close(self):
        self.file.close()
        self.sock.close()


def lock_key(db):
    return f"exposr-test-db-lock:{db}"


def lease(connect=_Redis, token=None, wait=WAIT_SECONDS, sleep=time.sleep):
    """Lease a free database: (db, token). Raises RuntimeError when none frees up in ``wait`` s."""
    token = token or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    redis = connect()
    try:
        deadline = time.monotonic() + wait
        while True:
            for _ in DATABASES:
                db = DATABASES[redis("INCR", "exposr-test-db-counter") % len(DATABASES)]
                if redis("SET", lock_key(db), token, "NX", "EX", LEASE_SECONDS) == "OK":
                    return db, token
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no free Redis test database among {','.join(map(str, DATABASES))}")
            sleep(1)
    finally:
        redis.close()


def renew(db, token, connect=_Redis):
    """Extend our lease; False when it is no longer ours."""
    redis = connect()
    try:
        return redis("EVAL", _RENEW, 1, lock_key(db), token, LEASE_SECONDS) == 1
    finally:
        redis.close()


def release(db, token, connect=_Redis):
    redis = connect()
    try:
        return redis("EVAL", _RELEASE, 1, lock_key(db), token) == 1
    finally:
        redis.close()


def _keep(db, token, stop):
    while not stop.wait(RENEW_SECONDS):
        try:
            renew(db, token)
        except (OSError, RuntimeError):
            pass  # Redis down for a moment: the tests will say so


def _process_db():
    if os.environ.get("EXPOSR_TEST_REDIS_DB"):
        return int(os.environ["EXPOSR_TEST_REDIS_DB"])
    try:
        db, token = lease()
    except OSError:
        return _FALLBACK
    stop = threading.Event()
    threading.Thread(target=_keep, args=(db, token, stop), name="redis-db-lease", daemon=True).start()

    def done():
        stop.set()
        try:
            release(db, token)
        except (OSError, RuntimeError):
            pass

    atexit.register(done)
    return db


REDIS_DB = _process_db()
