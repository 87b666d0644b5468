"""Errors that cross module boundaries.

The storage errors are defined here (and re-exported by `exposr.storage`) so
that the APIs and the domain name them without importing a backend module.
"""


class ExposrError(Exception):
    """Base class of the server's own errors."""


class StreamError(ExposrError):
    """Opening an upstream stream to a tunnel client failed."""


class ChannelLimitError(StreamError):
    """The transport has no free channel (ws-multiplex EMFILE); HTTP 429."""


class StreamRefusedError(StreamError):
    """The client refused or reset the stream (ECONNREFUSED / ECONNRESET)."""


class StreamOpenTimeoutError(StreamError):
    """The client did not acknowledge the stream in time."""


class TransportClosedError(StreamError):
    """The transport connection is gone."""


class NoConnectionError(StreamError):
    """The tunnel has no usable transport connection."""


class StorageError(Exception):
    """A storage operation failed."""


class StorageUnavailable(StorageError):
    """The backend cannot be reached (the API answers 503)."""


class NotFound(StorageError):
    """The key does not exist (atomic update of a missing key)."""


class LockTimeout(StorageError):
    """The record lock could not be taken in time (Redis ``lock:<key>``)."""


class InvalidCursor(StorageError, ValueError):
    """A list cursor that this storage did not hand out."""
