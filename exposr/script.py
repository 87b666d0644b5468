"""The ``exposrd`` command: ``twistd -n exposrd`` with JSON logging, one line errors.

``exposrd [options]`` runs the same service as ``twistd -n --pidfile= --logger
exposr.log.observer exposrd [options]``. Options are checked first so that a
bad value prints one line naming the option and exits 2, instead of twistd's
full usage text. A start-up failure (port in use, storage unreachable) exits 255
as the original does.
"""

import sys

from twisted.python import usage


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    import os

    from exposr import reactor

    reactor.install_if_none()
    if os.environ.get("EXPOSR_SELF_TEST"):
        from exposr import selftest

        return sys.exit(selftest.run())
    from exposr import options, server

    # (--help and --version print and exit here: "Usage: exposrd", not twistd's usage line)
    try:
        options.Options().parseOptions(args)
    except usage.UsageError as e:
        print(f"exposrd: {e}", file=sys.stderr)
        return sys.exit(2)

    from twisted.scripts import twistd

    config = twistd.ServerOptions()
    try:
        config.parseOptions(["--nodaemon", "--pidfile=", "--logger", "exposr.log.observer", "exposrd", *args])
    except usage.UsageError as e:
        print(f"exposrd: {e}", file=sys.stderr)
        return sys.exit(2)
    # the service records a start-up failure here; this command exits with it
    status = config.subOptions.exit_status = server.ExitStatus(caller_exits=True)
    twistd.runApp(config)
    sys.exit(status.code)


if __name__ == "__main__":
    main()
