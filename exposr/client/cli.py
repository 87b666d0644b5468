"""The ``exposr`` command: the original exposr client's command line.

    exposr [-s URL] [-a ACCOUNT] [--insecure] [--non-interactive] [--log-level L]
           account create
           tunnel create [ID] [KEY VALUE ...]
           tunnel info|delete|disconnect ID
           tunnel configure ID set KEY VALUE [KEY VALUE ...] | unset KEY [KEY ...]
           tunnel connect [ID] [TARGET-URL] [KEY VALUE ...]
           config show | set KEY VALUE | unset KEY

The server and account come from -s/-a, else EXPOSR_SERVER/EXPOSR_ACCOUNT, else
the config file (`exposr.client.settings`), where `account create` and the
account `tunnel connect` creates when none is given are remembered.
"""

import argparse
import ipaddress
import os
import random
import sys
from urllib.parse import urlsplit

from twisted.internet import defer, task
from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                            globalLogBeginner)

from exposr import __version__
from exposr.client import httpmode, liveview, output, settings
from exposr.client.connect import TunnelClosed, TunnelConnector
from exposr.client.rest import ApiClient, ApiError

BOOLS = {"on": True, "true": True, "yes": True, "1": True,
         "off": False, "false": False, "no": False, "0": False}
_SPECIAL = ("http", "https", "ws", "wss", "ftp")
_NEEDS_PORT = ("tcp", "tls", "tcps")  # no default port to fall back on


DEFAULT_INSPECT = "127.0.0.1:4040"


class UsageError(Exception):
    pass


def normalize_url(value):
    """Validate a target URL and normalise it like WHATWG `URL.href` (path '/' for http...)."""
    parts = urlsplit(value)
    if not parts.scheme or not (parts.netloc or parts.path):
        raise UsageError(f"Invalid URL: {value}")
    if parts.scheme.lower() in _NEEDS_PORT:
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or not port:
            raise UsageError(f"Invalid URL: {value} ({parts.scheme}:// needs a host and a port)")
    if parts.scheme.lower() in _SPECIAL and parts.netloc and not parts.path:
        value = parts._replace(path="/").geturl()
    return value


def _bool(key, value):
    try:
        return BOOLS[str(value).lower()]
    except KeyError:
        raise UsageError(f"Invalid value for {key}: {value} (use on/off)") from None


def _altnames(key, value):
    return [n.strip() for n in value.split(",") if n.strip()]


def _cidrs(key, value):
    cidrs = [c.strip() for c in value.split(",") if c.strip()]
    for c in cidrs:
        try:
            ipaddress.ip_network(c, strict=False)
        except ValueError:
            raise UsageError(f"Invalid value for {key}: {c} (use CIDRs such as 203.0.113.0/24,2001:db8::/32)")
    return cidrs


def _user_password(key, value):
    user, colon, password = value.partition(":")
    if not (colon and user and password):
        raise UsageError(f"Invalid value for {key} (use user:password)")
    return {"user": user, "password": password}


# KEY -> (parse function, builder of the single nested PATCH body)
SETTINGS = {
    "target-url": (lambda k, v: normalize_url(v), lambda v: {"target": {"url": v}}),
    "transport-ws": (_bool, lambda v: {"transport": {"ws": {"enabled": v}}}),
    "transport-ssh": (_bool, lambda v: {"transport": {"ssh": {"enabled": v}}}),
    "ingress-http": (_bool, lambda v: {"ingress": {"http": {"enabled": v}}}),
    "ingress-http-altnames": (_altnames, lambda v: {"ingress": {"http": {"alt_names": v}}}),
    "ingress-sni": (_bool, lambda v: {"ingress": {"sni": {"enabled": v}}}),
    "ingress-sni-passthrough": (_bool, lambda v: {"ingress": {"sni": {"passthrough": v}}}),
    "ingress-allow": (_cidrs, lambda v: {"access": {"allow": v}}),
    "ingress-http-auth": (_user_password, lambda v: {"access": {"http_auth": v}}),
}
_ALIASES = {"upstream-url": "target-url"}


def setting_bodies(pairs, unset=False):
    """[(key, value)] -> [PATCH body], one per setting, in the given order."""
    bodies = []
    for key, value in pairs:
        key = _ALIASES.get(key, key)
        if key not in SETTINGS:
            raise UsageError(f"Unknown option: {key} (one of {', '.join(SETTINGS)})")
        parse, build = SETTINGS[key]
        bodies.append(build(None if unset else parse(key, value)))
    return bodies


def _pairs(args):
    if len(args) % 2:
        raise UsageError(f"Missing value for option {args[-1]}")
    return list(zip(args[0::2], args[1::2]))


def _looks_like_url(value):
    return "://" in value


_ADJ = ("silly brave calm eager fancy gentle happy jolly kind lucky mighty nice proud quick "
        "shiny swift tidy witty zesty bold bright clever cool cosy curly dizzy fuzzy giant "
        "grumpy humble icy lazy loud noisy odd plain quiet rapid rare round sleepy smart "
        "soft spicy sunny tall tiny warm wild young").split()
_NOUN = ("goose panda otter fox badger bear cat dog eagle falcon frog gecko hawk koala lemur "
         "lion llama moose mouse newt owl parrot penguin rabbit raccoon seal shark sloth snail "
         "swan tiger turtle walrus whale wolf yak zebra crab deer duck horse lynx mole").split()


def random_tunnel_id(rng=random):
    return f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}-{rng.randint(0, 99)}"


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-s", "--server", default=argparse.SUPPRESS,
                        help="exposr server URL (env EXPOSR_SERVER, else the config file)")
    common.add_argument("-a", "--account", default=argparse.SUPPRESS,
                        help="account ID (env EXPOSR_ACCOUNT, else the config file)")
    common.add_argument("--non-interactive", action="store_true", default=argparse.SUPPRESS,
                        help="plain line output (always the case here)")
    common.add_argument("--log-format", default=argparse.SUPPRESS, choices=["text", "json"],
                        help="plain lines (text, the default) or one JSON object per line")
    common.add_argument("-k", "--insecure", action="store_true", default=argparse.SUPPRESS,
                        help="skip TLS certificate verification (server and targets)")
    common.add_argument("--log-level", default=argparse.SUPPRESS,
                        choices=["debug", "info", "warn", "error", "critical"])

    p = argparse.ArgumentParser(prog="exposr", parents=[common],
                                description="exposr tunnel client")
    p.add_argument("--version", action="version", version=f"exposr-cli/{__version__}")
    groups = p.add_subparsers(dest="group", required=True, metavar="{account,tunnel,config}")

    acc = groups.add_parser("account", parents=[common], help="account commands")
    acc_cmds = acc.add_subparsers(dest="command", required=True)
    acc_cmds.add_parser("create", parents=[common], help="create an account")

    cfg = groups.add_parser("config", parents=[common],
                            help="remembered settings (server, account)")
    cfg_cmds = cfg.add_subparsers(dest="command", required=True)
    cfg_cmds.add_parser("show", parents=[common], help="show the settings and their source")
    s = cfg_cmds.add_parser("set", parents=[common], help="remember a setting")
    s.add_argument("key", choices=list(settings.KEYS))
    s.add_argument("value")
    u = cfg_cmds.add_parser("unset", parents=[common], help="forget a setting")
    u.add_argument("key", choices=list(settings.KEYS))

    tun = groups.add_parser("tunnel", parents=[common], help="tunnel commands")
    tc = tun.add_subparsers(dest="command", required=True)
    c = tc.add_parser("create", parents=[common], help="create a tunnel")
    c.add_argument("args", nargs="*", metavar="[ID] [KEY VALUE ...]")
    for name, text in (("info", "show a tunnel"), ("delete", "delete a tunnel"),
                       ("disconnect", "disconnect a tunnel's clients")):
        tc.add_parser(name, parents=[common], help=text).add_argument("tunnel_id", metavar="ID")
    cf = tc.add_parser("configure", parents=[common], help="set or unset tunnel options")
    cf.add_argument("tunnel_id", metavar="ID")
    cf.add_argument("action", choices=["set", "unset"])
    cf.add_argument("args", nargs="+", metavar="KEY [VALUE]")
    cn = tc.add_parser("connect", parents=[common], help="connect a tunnel to a target")
    cn.add_argument("args", nargs="*", metavar="[ID] [TARGET-URL] [KEY VALUE ...]")
    cn.add_argument("--http-mode", action="store_true",
                    help="parse HTTP locally and rewrite each request's headers toward the target")
    cn.add_argument("-H", "--http-header-replace", action="append", metavar="NAME:VALUE",
                    help="HTTP mode: set this request header to VALUE (repeatable)")
    cn.add_argument("-R", "--http-header-rewrite", action="append", metavar="NAME",
                    help="HTTP mode: request headers whose URL is rewritten to the target "
                         "(repeatable or comma-separated; default host, referer, origin)")
    cn.add_argument("--inspect", metavar="ADDR:PORT", default=DEFAULT_INSPECT,
                    help="HTTP mode: serve the request inspector here "
                         f"(default {DEFAULT_INSPECT}; port 0 picks a free one)")
    cn.add_argument("--no-inspect", action="store_true",
                    help="HTTP mode: no request inspector")
    return p


class Cli:
    """One invocation of the command line. `run(argv)` -> Deferred[exit code]."""

    def __init__(self, reactor, out=None, err=None, environ=None, config_path=None):
        self.reactor = reactor
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.environ = os.environ if environ is None else environ
        self.settings = settings.SettingsFile(config_path or settings.config_path(self.environ))
        self.connector = None
        self.inspector_port = None  # the inspector's listening port (HTTP mode)
        self.inspector_url = None
        self.connected = defer.Deferred()  # fires once `tunnel connect` is up
        self._stopping = False
        self._done = defer.Deferred()  # `tunnel connect` has cleaned up
        self.printer = output.LinePrinter(self.out, self.err, clock=reactor.seconds)

    def say(self, line, event="message", **fields):
        self.printer.message(line, event, **fields)

    def parse(self, argv):
        opts = build_parser().parse_args(argv)
        opts.given = {k: getattr(opts, k, None) for k in settings.KEYS}
        # command line, then environment; `run` falls back to the config file
        opts.server = getattr(opts, "server", None) or self.environ.get("EXPOSR_SERVER")
        opts.account = getattr(opts, "account", None) or self.environ.get("EXPOSR_ACCOUNT")
        opts.insecure = getattr(opts, "insecure", False)
        opts.log_level = getattr(opts, "log_level", "info")
        opts.log_format = getattr(opts, "log_format", "text")
        self.printer.fmt = opts.log_format
        # `tunnel connect` on a terminal: the live view instead of plain lines
        if (opts.group, opts.command) == ("tunnel", "connect") and opts.log_format == "text" \
                and not getattr(opts, "non_interactive", False) and self.out.isatty():
            self.printer = liveview.LiveView(self.out, self.err, self.reactor, opts,
                                             http_mode=getattr(opts, "http_mode", False))
        return opts

    @defer.inlineCallbacks
    def run(self, argv, opts=None):
        try:
            opts = opts or self.parse(argv)
            if opts.group == "config":
                self.stored = self.settings.load()
                return getattr(self, f"cmd_config_{opts.command}")(opts)
            self._resolve(opts)
            if not opts.server:
                raise UsageError("No server given: use -s/--server, EXPOSR_SERVER, or "
                                 "remember one with `exposr config set server URL`")
            api = ApiClient(self.reactor, opts.server, opts.account, insecure=opts.insecure)
            handler = getattr(self, f"cmd_{opts.group}_{opts.command}")
            yield handler(api, opts)
        except ApiError as e:
            message = str(e)
            if e.code == "NO_ACCOUNT":
                message += (": use -a/--account or EXPOSR_ACCOUNT, or get one with "
                            "`exposr account create` (it is remembered)")
            elif e.code == "PERMISSION_DENIED" and getattr(opts, "account_source", None) == "config file":
                # (a server with memory storage forgets every account when it restarts)
                message += (f": the account {opts.account} remembered in {self.settings.path} is not "
                            f"known to {opts.server}; `exposr config unset account` forgets it "
                            "(`tunnel connect` then creates a new one)")
            self.err.write(f"{message}\n")
            self.err.flush()
            return 1
        except (UsageError, TunnelClosed, settings.SettingsError) as e:
            self.err.write(f"{e}\n")
            self.err.flush()
            return 1
        return 0

    def _resolve(self, opts):
        """Fill in server and account: command line, then environment, then the file."""
        self.stored = self.settings.load()
        values = settings.resolve_all({"server": opts.server, "account": opts.account},
                                      self.environ, self.stored)
        opts.server, opts.account = values["server"][0], values["account"][0]
        opts.account_source = values["account"][1]

    def _remember(self, server, account):
        """Store a new account (and its server) in the config file, saying so."""
        if self.settings.path is None:
            return
        previous = self.stored.get("account")
        try:
            self.stored = self.settings.update(server=server, account=account)
        except settings.SettingsError as e:
            self.err.write(f"{e}\n")
            return
        note = f" (replacing {previous})" if previous and previous != account else ""
        self.say(f"Account saved in {self.settings.path}{note}", "account_saved",
                 path=self.settings.path)

    # -- config ------------------------------------------------------------------------
    def cmd_config_show(self, opts):
        self.say(f"Config file: {self.settings.path or '<none: no HOME or XDG_CONFIG_HOME>'}")
        values = settings.resolve_all(opts.given, self.environ, self.stored)
        for key in settings.KEYS:
            value, source = values[key]
            self.say(f"{key}: {value} ({source})" if value else f"{key}: <not set>")
        if self.stored.get("account") and values["account"][1] != "config file" \
                and not values["account"][0]:
            self.say(f"(the config file's account is for {self.stored.get('server')})")
        return 0

    def cmd_config_set(self, opts):
        value = settings.check(opts.key, opts.value)
        self.settings.update(**{opts.key: value})
        self.say(f"Set {opts.key} to {value}")
        return 0

    def cmd_config_unset(self, opts):
        self.settings.update(**{opts.key: None})
        self.say(f"Unset {opts.key}")
        return 0

    # -- commands -----------------------------------------------------------------
    @defer.inlineCallbacks
    def cmd_account_create(self, api, opts):
        acct = yield api.create_account()
        self.say(f"Created account {acct['account_id_hr']}")
        self._remember(opts.server, acct["account_id_hr"])

    @defer.inlineCallbacks
    def _configure(self, api, tunnel_id, bodies):
        for body in bodies:
            yield api.patch_tunnel(tunnel_id, body)

    @defer.inlineCallbacks
    def cmd_tunnel_create(self, api, opts):
        args = list(opts.args)
        tunnel_id = args.pop(0) if len(args) % 2 else random_tunnel_id()
        bodies = setting_bodies(_pairs(args))
        api._need_account()
        yield api.put_tunnel(tunnel_id, {})
        yield self._configure(api, tunnel_id, bodies)
        self.say(f"Created tunnel {tunnel_id}")

    @defer.inlineCallbacks
    def cmd_tunnel_info(self, api, opts):
        t = yield api.get_tunnel(opts.tunnel_id)
        for line in format_info(t):
            self.say(line)

    @defer.inlineCallbacks
    def cmd_tunnel_delete(self, api, opts):
        yield api.delete_tunnel(opts.tunnel_id)
        self.say(f"Tunnel {opts.tunnel_id} deleted")

    @defer.inlineCallbacks
    def cmd_tunnel_disconnect(self, api, opts):
        result = yield api.disconnect_tunnel(opts.tunnel_id)
        self.say(f"Tunnel {opts.tunnel_id} disconnected: {'true' if result else 'false'}")

    @defer.inlineCallbacks
    def cmd_tunnel_configure(self, api, opts):
        if opts.action == "set":
            pairs = _pairs(opts.args)
            bodies = setting_bodies(pairs)
        else:
            pairs = [(k, None) for k in opts.args]
            bodies = setting_bodies(pairs, unset=True)
        yield self._configure(api, opts.tunnel_id, bodies)
        for key, value in pairs:
            self.say(f"{'Set' if opts.action == 'set' else 'Unset'} {key}"
                     + (f" to {value}" if opts.action == "set" else ""))
        self.say(f"Tunnel {opts.tunnel_id} configured")

    @staticmethod
    def connect_args(args):
        """[ID] [TARGET-URL] [KEY VALUE ...] -> (id or None, target or None, pairs)."""
        args = list(args)
        tunnel_id = target = None
        if args and not _looks_like_url(args[0]) and args[0] not in SETTINGS:
            tunnel_id = args.pop(0)
        if args and _looks_like_url(args[0]):
            target = args.pop(0)
        if tunnel_id is None and target is None:
            raise UsageError("Need at least one of tunnel-id or target-url")
        return tunnel_id, target, _pairs(args)

    @staticmethod
    def http_mode(opts):
        """The connector's HTTP mode settings from the options (None when off)."""
        replace = getattr(opts, "http_header_replace", None)
        rewrite = getattr(opts, "http_header_rewrite", None)
        if not getattr(opts, "http_mode", False):
            if replace or rewrite:
                raise UsageError("-H/--http-header-replace and -R/--http-header-rewrite "
                                 "need --http-mode")
            return None
        try:
            replace = httpmode.parse_replace(replace)
        except ValueError as e:
            raise UsageError(str(e)) from None
        names = httpmode.parse_rewrite(rewrite) if rewrite else httpmode.DEFAULT_REWRITE
        return {"rewrite": names, "replace": replace}

    @staticmethod
    def inspect_address(opts):
        """(host, port) of the inspector, or None (off, or not in HTTP mode)."""
        if not getattr(opts, "http_mode", False) or getattr(opts, "no_inspect", False):
            return None
        value = getattr(opts, "inspect", None) or DEFAULT_INSPECT
        host, sep, port = value.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise UsageError(f"Invalid --inspect address: {value} (use ADDR:PORT)")
        return host, int(port)

    def _start_inspector(self, address):
        from twisted.internet.error import CannotListenError

        from exposr.client import inspector

        connector = self.connector
        connector.capture = inspector.Capture(self.reactor)
        page = inspector.Inspector(self.reactor, connector.capture,
                                   lambda: (connector.target_url, connector.target()))
        host, port = address
        self.inspector = page
        try:
            self.inspector_port = self.reactor.listenTCP(port, inspector.site(page),
                                                         interface=host)
        except CannotListenError as e:
            connector.capture = None
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            self.say(f"Inspector not started: cannot listen on {host}:{port} ({reason})",
                     "inspector_failed", address=f"{host}:{port}", reason=reason)
            return
        bound = self.inspector_port.getHost()
        shown = f"[{bound.host}]" if ":" in bound.host else bound.host
        self.inspector_url = f"http://{shown}:{bound.port}/"
        self.say(f"Inspector: {self.inspector_url}", "inspector", url=self.inspector_url)

    @defer.inlineCallbacks
    def cmd_tunnel_connect(self, api, opts):
        tunnel_id, target, pairs = self.connect_args(opts.args)
        http_mode = self.http_mode(opts)
        inspect = self.inspect_address(opts)
        if target:
            target = normalize_url(target)
            if http_mode is not None and urlsplit(target).scheme.lower() not in ("http", "https"):
                raise UsageError(f"--http-mode needs an http:// or https:// target: {target}")
        keys = [_ALIASES.get(k, k) for k, _ in pairs]
        if target:
            pairs.append(("target-url", target))
            if "ingress-http" not in keys and target.startswith("http"):
                pairs.append(("ingress-http", "on"))
        if "transport-ws" not in keys:
            pairs.append(("transport-ws", "on"))
        bodies = setting_bodies(pairs)

        if not api.account:
            acct = yield api.create_account()
            api.account = acct["account_id_hr"]
            self.say(f"Created account {api.account}", "account_created", account=api.account)
            self._remember(opts.server, api.account)

        created = False
        if tunnel_id is None:
            tunnel_id = random_tunnel_id()
            yield api.put_tunnel(tunnel_id, {})
            created = True
        else:
            yield api.refresh_token()
            try:
                yield api.get_tunnel(tunnel_id)
            except ApiError as e:
                if e.code != "TUNNEL_NOT_FOUND":
                    raise
                yield api.put_tunnel(tunnel_id, {})
                created = True
        if created:
            self.say(f"Created tunnel {tunnel_id}", "tunnel_created", tunnel=tunnel_id)

        trigger = self.reactor.addSystemEventTrigger("before", "shutdown", self.shutdown)
        try:
            yield self._configure(api, tunnel_id, bodies)
            if not self._stopping:
                self.connector = TunnelConnector(self.reactor, api, tunnel_id,
                                                 insecure=opts.insecure, http_mode=http_mode)
                self.connector.on_event = self.printer.event
                if inspect is not None:
                    self._start_inspector(inspect)
                yield self._hold(tunnel_id)
        finally:
            if self.inspector_port is not None:
                self.inspector.close()
                yield self.inspector_port.stopListening()
                self.inspector_port = None
            if not self._stopping:
                self.reactor.removeSystemEventTrigger(trigger)
            if created:
                yield self._delete_quietly(api, tunnel_id)
            self._done.callback(None)

    @defer.inlineCallbacks
    def _hold(self, tunnel_id):
        try:
            info = yield self.connector.start()
        except TunnelClosed:
            if self._stopping:
                return
            raise
        self.say(f"Tunnel {tunnel_id} connected to {self.connector.target_url}", "tunnel",
                 tunnel=tunnel_id, target=self.connector.target_url)
        for kind, url in ingress_urls(info):
            self.say(f"Ingress {kind.upper()}: {url}", "ingress", kind=kind, url=url)
        self.connected.callback(info)
        yield self.connector.finished
        self.say(f"Tunnel {tunnel_id} disconnected", "tunnel_disconnected", tunnel=tunnel_id)

    @defer.inlineCallbacks
    def _delete_quietly(self, api, tunnel_id):
        try:
            yield api.delete_tunnel(tunnel_id)
            self.say(f"Tunnel {tunnel_id} deleted", "tunnel_deleted", tunnel=tunnel_id)
        except ApiError as e:
            self.err.write(f"Could not delete tunnel {tunnel_id}: {e}\n")

    def shutdown(self):
        """Ctrl-C / SIGTERM (a before-shutdown trigger): close the WebSockets."""
        self._stopping = True
        if self.connector is not None:
            self.connector.stop()
        return self._done


def ingress_urls(info):
    for kind, ing in sorted((info.get("ingress") or {}).items()):
        urls = list(ing.get("urls") or ([ing["url"]] if ing.get("url") else []))
        for url in urls:
            yield kind, url


def format_info(t):
    conn = t.get("connection") or {}
    lines = [f"Tunnel: {t.get('id')}"]
    if "connected" in conn:
        lines.append(f"Connected: {'true' if conn['connected'] else 'false'}")
        for key, label in (("connections", "Connections"), ("connected_at", "Connected at"),
                           ("alive_at", "Alive at"), ("disconnected_at", "Disconnected at")):
            if conn.get(key) is not None:
                lines.append(f"{label}: {conn[key]}")
    if t.get("created_at"):
        lines.append(f"Created at: {t['created_at']}")
    lines.append("Transports")
    for name, tr in (t.get("transport") or {}).items():
        if isinstance(tr, dict) and tr.get("url"):
            lines.append(f"  {name.upper()}: {tr['url']}")
    lines.append("Ingress points")
    for kind, url in ingress_urls(t):
        lines.append(f"  {kind.upper()}: {url}")
    http = (t.get("ingress") or {}).get("http") or {}
    tr = t.get("transport") or {}

    def flag(v):
        return "<not set>" if v is None else ("on" if v else "off")

    lines += ["Configuration",
              f"  target-url: {(t.get('target') or {}).get('url') or '<not set>'}",
              f"  ingress-http: {flag(http.get('enabled'))}",
              f"  ingress-http-altnames: {','.join(http.get('alt_names') or []) or '<not set>'}",
              f"  ingress-sni: {flag(((t.get('ingress') or {}).get('sni') or {}).get('enabled'))}",
              f"  ingress-allow: {','.join((t.get('access') or {}).get('allow') or []) or '<not set>'}",
              f"  ingress-http-auth: {_auth_user(t)}",
              f"  transport-ws: {flag((tr.get('ws') or {}).get('enabled'))}",
              f"  transport-ssh: {flag((tr.get('ssh') or {}).get('enabled'))}"]
    return lines


def _auth_user(t):
    user = ((t.get("access") or {}).get("http_auth") or {}).get("user")
    return f"{user}:<password set>" if user else "<not set>"


_LEVEL_ORDER = [LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error,
                LogLevel.critical]
_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
           "error": LogLevel.error, "critical": LogLevel.critical}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cli = None
    from exposr import reactor

    reactor.install_if_none()

    def start(reactor):
        nonlocal cli
        cli = Cli(reactor)
        opts = cli.parse(argv)  # argparse errors exit here (code 2)
        # our own messages at the chosen level; library chatter only from warn on
        level = _LEVELS[opts.log_level]
        predicate = LogLevelFilterPredicate(defaultLogLevel=max(level, LogLevel.warn,
                                                                key=_LEVEL_ORDER.index))
        predicate.setLogLevelForNamespace("exposr", level)
        # our own one-line format (or JSON lines), never Twisted's
        globalLogBeginner.beginLoggingTo(
            [FilteringLogObserver(cli.printer.observer, [predicate])],
            redirectStandardIO=False)
        return cli.run(argv, opts).addCallback(_exit)

    task.react(start)


def _exit(code):
    if code:
        raise SystemExit(code)
