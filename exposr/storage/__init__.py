"""Storage backends (docs/protocol.rst, "Storage layout") and `storage_from_url`."""

from exposr.storage.base import (  # noqa: F401
    NAMESPACES,
    IStorage,
    InvalidCursor,
    LockTimeout,
    NotFound,
    StorageError,
    StorageUnavailable,
    list_page,
)

_VALID = "Valid options are redis, postgres or sqlite"


def _scheme(url):
    scheme, sep, _ = url.partition(":")
    if not sep:
        return None
    return scheme.lower()


def storage_from_url(url, reactor, pool_size=10, **kwargs):
    """
    The backend for ``--storage-url``: ``memory://``, ``sqlite://<path>``
    (relative or absolute: everything after ``sqlite://``),
    ``postgres://user:password@host[:port]/database`` (``pool_size``
    connections) or ``redis://[:password@]host[:port][/db]``. Extra keyword
    arguments go to the backend's constructor.
    """
    scheme = _scheme(url or "")
    if scheme == "memory":
        from exposr.storage.memory import MemoryStorage

        return MemoryStorage(reactor=reactor, **kwargs)
    if scheme == "sqlite":
        from exposr.storage.sqlite import SqliteStorage

        path = url[len("sqlite://"):] if url.lower().startswith("sqlite://") else url[len("sqlite:"):]
        if not path:
            raise StorageError("sqlite storage needs a file path: sqlite://<path>")
        return SqliteStorage(path, reactor=reactor, **kwargs)
    if scheme == "postgres":
        from exposr.storage.postgres import PostgresStorage

        return PostgresStorage.from_url(url, reactor=reactor, pool_size=pool_size, **kwargs)
    if scheme == "redis":
        from exposr.storage.redis import RedisStorage

        return RedisStorage.from_url(url, reactor=reactor, **kwargs)
    raise StorageError("Unsupported storage type %s:. %s" % (scheme or url, _VALID))
