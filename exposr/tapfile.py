"""Tap files: ``exposrd-mktap exposrd.tap [options]``, then ``twistd -n -f exposrd.tap``.

A tap is a pickled twisted ``Application``. Listening ports cannot be pickled,
so the tap holds only the resolved `Config`: `ConfiguredService` builds the
real `ExposrService` when it starts. Options are checked when the tap is
written, with the same one-line errors as ``exposrd``.
"""

import sys

from twisted.application import service
from twisted.persisted import sob
from twisted.python import usage


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

        from exposr import log
        from exposr.server import ExposrService

        log.set_level(self.config.log_level)
        log.use_reactor(reactor)
        self.server = ExposrService(self.config, reactor, handle_signals=True)
        self.server.setServiceParent(self)
        service.MultiService.startService(self)


def make_application(config):
    application = service.Application("exposrd")
    ConfiguredService(config).setServiceParent(application)
    return application


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        print("usage: exposrd-mktap FILE [exposrd options]", file=sys.stderr)
        return sys.exit(2)
    path, options = args[0], args[1:]
    from exposr.options import parse_config

    try:
        import os

        config = parse_config(options, os.environ)
    except usage.UsageError as e:
        print(f"exposrd-mktap: {e}", file=sys.stderr)
        return sys.exit(2)
    sob.IPersistable(make_application(config)).save(filename=path)
    print(f"wrote {path}; run it with: twistd -n -f {path}")
    return sys.exit(0)
