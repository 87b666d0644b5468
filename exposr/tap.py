"""The twistd plugin's options and service maker (``twistd exposrd``).

`Options` comes from `exposr.options`; `makeService` builds the one
`MultiService` of the process. A tap file (``twistd -f exposrd.tap``) can hold
a pickled Application whose service is made here: endpoint listeners are only
bound when the service starts, so what is pickled is configuration.

The service maker owns the process: it applies the log level and format and
raises the open files limit to the hard limit (both logged).
"""

from twisted.logger import Logger

from exposr import log, startup
from exposr.options import Options  # noqa: F401  (twistd reads it from here)

_log = Logger(namespace="exposr.startup")


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from exposr.server import ExposrService

    config = options.config
    log.set_level(config.log_level)
    log.set_format(config.log_format)
    startup.log_open_files_limit(_log, startup.raise_open_files_limit())
    log.use_reactor(reactor)
    return ExposrService(config, reactor, exit_status=getattr(options, "exit_status", None), handle_signals=True)
