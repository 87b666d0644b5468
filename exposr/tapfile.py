"""Tap files: ``exposrd-mktap exposrd.tap [options]``, then ``twistd -n -f exposrd.tap``.

A tap is a pickled twisted ``Application``. Listening ports cannot be pickled,
so the tap holds only the resolved `Config`: `ConfiguredService` builds the
real `ExposrService` when it starts. Options are checked when the tap is
written, with the same one-line errors as ``exposrd``.

The file holds every option, secrets included (``--admin-api-key``,
``--cluster-key``, storage passwords), so it is written readable by its
owner only (mode 0600), replacing any older file atomically.
"""

import os
import pickle
import sys
import tempfile

from twisted.application import service
from twisted.python import usage

USAGE = "usage: exposrd-mktap FILE [exposrd options]"


class ConfiguredService(service.MultiService):
    """Picklable: holds a Config; builds the server on start."""

    def __init__(self, config):
        service.MultiService.__init__(self)
        self.config = config
        self.setName("exposrd")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["services"] = []
        state["namedServices"] = {}
        state["running"] = 0
        state.pop("server", None)
        return state

    def startService(self):
        from twisted.internet import reactor

        from twisted.logger import Logger

        from exposr import log, startup
        from exposr.server import ExposrService

        log.set_level(self.config.log_level)
        log.set_format(self.config.log_format)
        startup.log_open_files_limit(Logger(namespace="exposr.startup"), startup.raise_open_files_limit())
        log.use_reactor(reactor)
        self.server = ExposrService(self.config, reactor, handle_signals=True)
        self.server.setServiceParent(self)
        service.MultiService.startService(self)


def make_application(config):
    application = service.Application("exposrd")
    ConfiguredService(config).setServiceParent(application)
    return application


def save(application, path):
    """Pickle ``application`` to ``path`` (as twistd -f reads it), mode 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=".exposrd-mktap-", dir=directory)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(application, f, 2)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def _help():
    from exposr.options import help_text

    return (
        f"{USAGE}\n\nWrites FILE, a tap that `twistd -n --reactor exposr -f FILE` runs, holding\n"
        "the resolved configuration (mode 0600: it holds secrets).\n" + help_text()
    )


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(_help())
        return sys.exit(0)
    if not args or args[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return sys.exit(2)
    path, options = args[0], args[1:]
    from exposr.options import parse_config

    try:
        config = parse_config(options, os.environ)
    except usage.UsageError as e:
        print(f"exposrd-mktap: {e}", file=sys.stderr)
        return sys.exit(2)
    try:
        save(make_application(config), path)
    except OSError as e:
        print(f"exposrd-mktap: cannot write {path}: {e.strerror}", file=sys.stderr)
        return sys.exit(1)
    print(f"wrote {path}; run it with: twistd -n --reactor exposr -f {path}")
    return sys.exit(0)
