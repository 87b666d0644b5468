"""Errors that cross module boundaries."""


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
