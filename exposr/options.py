"""Command line and ``EXPOSR_*`` environment parsing (docs/protocol.rst, "Configuration").

`Options` is the options class of the ``twistd exposrd`` plugin; after
`parseOptions` its ``config`` attribute holds the resolved `Config`.
`parse_config` does the same for programmatic use.

Rules: every option ``--some-name`` can also be given as
``EXPOSR_SOME_NAME`` (the part after the exact prefix ``EXPOSR_`` is
case-insensitive); the command line beats the environment, which beats the
default.  An empty value means "not set".  Boolean environment values are true
only for exactly ``true``.  Every error is one line naming the option.
"""

import base64
import binascii
import ipaddress
import os
import re
import sys
from urllib.parse import urlsplit

import attrs
from twisted.python import usage

from exposr import __version__
from exposr.config import Config

ENV_PREFIX = "EXPOSR_"


class ConfigError(usage.UsageError):
    """The configuration is invalid (one line naming the option)."""


# -- value converters: text -> value, raising ValueError(<what is wrong>) -----


def _port(text):
    value = int(text) if re.fullmatch(r"[0-9]{1,5}", text) else -1
    if not 0 <= value <= 65535:
        raise ValueError(f"expected a port number 0-65535, got {text!r}")
    return value


def _positive_int(text):
    value = int(text) if re.fullmatch(r"[0-9]{1,9}", text) else 0
    if value < 1:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return value


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ValueError(f"expected a number of seconds, got {text!r}")
    return value


def _positive_seconds(text):
    value = _seconds(text)
    if not value > 0:
        raise ValueError(f"expected a positive number of seconds, got {text!r}")
    return value


def _count(text):
    if not re.fullmatch(r"[0-9]{1,9}", text):
        raise ValueError(f"expected a whole number 0 or more, got {text!r}")
    return int(text)


def _text(text):
    return text


def _choice(*choices):
    def convert(text):
        if text not in choices:
            raise ValueError(f"invalid choice {text!r} (choose from {', '.join(choices)})")
        return text

    return convert


def _choices(*choices):
    """Multi-value option: a list of raw values, each possibly comma separated."""

    def convert(values):
        items = [item.strip() for value in values for item in value.split(",")]
        check = _choice(*choices)
        return tuple(dict.fromkeys(check(item) for item in items if item))

    return convert


def _url(*schemes, host=True):
    def convert(text):
        try:
            parts = urlsplit(text)
            parts.port  # raises ValueError for a bad port
        except ValueError:
            parts = None
        if not parts or parts.scheme not in schemes or (host and not parts.hostname):
            raise ValueError(f"expected a {'/'.join(schemes)} URL with a host, got {text!r}")
        return text

    return convert


def _storage_url(text):
    scheme = urlsplit(text).scheme
    if not scheme:
        raise ValueError(f"invalid URL {text!r}")
    if scheme not in ("memory", "sqlite", "postgres", "redis"):
        raise ValueError(
            f"Unsupported storage type {scheme}:. Valid options are redis, postgres or sqlite"
        )
    return _url("redis")(text) if scheme == "redis" else text


def _ip(text):
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"expected an IP address, got {text!r}") from None


def _cidrs(text):
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(
            str(ipaddress.ip_network(item.strip(), strict=False))
            for item in text.split(",")
            if item.strip()
        )
    except ValueError as e:
        raise ValueError(f"expected a comma list of CIDRs: {e}") from None


def _split_host_port(text):
    """``host``, ``host:port`` or ``[v6]:port`` -> (host, port or None)."""
    parts = urlsplit("//" + text)
    port = parts.port  # ValueError when out of range
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise ValueError
    if parts.path or parts.query or parts.fragment:
        raise ValueError
    return parts.hostname, port


_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?$")


def _ssh_host(text):
    """``host[:port]`` as the host part of ``ssh://<value>``."""
    try:
        host, _ = _split_host_port(text)
        if not _HOSTNAME.match(host):
            ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"Invalid hostname {text}") from None
    return text


def _dns_server(text):
    """``ip[:port]`` (IPv6 with a port in brackets) of a DNS server."""
    try:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            ipaddress.ip_address(_split_host_port(text)[0])
    except ValueError:
        raise ValueError(f"expected ip[:port] of a DNS server, got {text!r}") from None
    return text


def _multicast_group(text):
    try:
        group = ipaddress.IPv4Address(text)
    except ValueError:
        raise ValueError(f"expected an IPv4 address, got {text!r}") from None
    if group not in ipaddress.IPv4Network("239.0.0.0/8"):
        raise ValueError(f"{text} is not within the private multicast range 239.0.0.0/8")
    return text


def _ttl(text):
    value = int(text) if re.fullmatch(r"[0-9]{1,3}", text) else -1
    if not 0 <= value <= 255:
        raise ValueError(f"expected a TTL 0-255, got {text!r}")
    return value


_PRIVATE_KEY = re.compile(r"BEGIN OPENSSH PRIVATE KEY", re.IGNORECASE)


def _ssh_key(text):
    """Key text, a readable file holding it, or base64 of it (the original took no file)."""
    if _PRIVATE_KEY.search(text):
        return text
    if os.path.isfile(text):
        try:
            with open(text, encoding="utf-8") as f:
                content = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {text}: {getattr(e, 'strerror', e)}") from None
        if _PRIVATE_KEY.search(content):
            return content
    try:
        decoded = base64.b64decode("".join(text.split()), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        decoded = ""
    if _PRIVATE_KEY.search(decoded):
        return decoded
    shown = text if len(text) <= 60 and "\n" not in text else repr(text[:60]) + "..."
    raise ValueError(f"transport-ssh-key requires either path to key or key content, got {shown}")


def _bool_env(text):
    return text == "true"


# -- the option table ----------------------------------------------------------

BOOL = "bool"
FROM_CONFIG = "<Config's default>"


@attrs.frozen
class Opt:
    name: str
    convert: object  # text -> value; BOOL for booleans
    doc: str
    default: object = FROM_CONFIG
    short: str | None = None
    multi: bool = False
    group: str | None = None  # heading in --help; None: from the name (see `group_of`)

    @property
    def field(self):
        return self.name.replace("-", "_")


_CONFIG_FIELDS = attrs.fields_dict(Config)


def _default(opt):
    if opt.default is not FROM_CONFIG:
        return opt.default
    return _CONFIG_FIELDS[opt.field].default


O = Opt
OPTIONS = (
    # Ingress
    O("ingress", _choices("http", "sni"), "Ingress methods to enable: http, sni.", multi=True),
    O("ingress-http-url", _url("http", "https"),
      "Base URL of the HTTP ingress (https://tun.example.com gives https://<id>.tun.example.com/);"
      " required when HTTP ingress is enabled."),
    O("ingress-http-port", _port,
      "Port of the HTTP ingress; the same as --api-port shares that port. [default: --api-port]",
      default=None),
    O("ingress-http-agent-idle-timeout", _seconds,
      "Idle timeout (seconds) of upstream keep-alive pools."),
    O("ingress-http-tunnel-idle-timeout", _positive_seconds,
      "Seconds an upgraded HTTP ingress connection (WebSocket, CONNECT) may pass no byte either way (300)."),
    O("http-head-timeout", _positive_seconds,
      "Seconds a client has to send a request head (ingress, API; on the ingress also the idle"
      " time of a kept-alive connection) (30)."),
    O("http-body-timeout", _positive_seconds,
      "Window (seconds) over which a request body must keep up --http-body-min-rate; a body"
      " with no byte for this long is cut (60)."),
    O("http-body-min-rate", _count,
      "Bytes/s a request body must average over each --http-body-timeout window (10; 0: only"
      " require a byte per window)."),
    O("ingress-http-trusted-proxies", _cidrs,
      "Comma list of CIDRs whose X-Forwarded-For/Forwarded is believed ('none': nobody)."),
    O("ingress-sni-port", _port, "Port of the SNI (TLS) ingress."),
    O("ingress-sni-host", _text, "host[:port] advertised for SNI ingress."),
    O("ingress-sni-cert", _text, "PEM certificate file; required with SNI ingress."),
    O("ingress-sni-key", _text, "PEM private key file; required with SNI ingress."),
    # Transport
    O("transport", _choices("ws", "ssh"), "Transports to enable: ws, ssh.", multi=True),
    O("transport-max-connections", _positive_int,
      "Maximum client connections per tunnel (cluster-wide)."),
    O("transport-ssh-port", _port, "Port of the SSH transport."),
    O("transport-ssh-host", _ssh_host, "host[:port] advertised in SSH URLs."),
    O("transport-ssh-key", _ssh_key,
      "SSH host key: OpenSSH PEM text, base64 of it, or a file path (default: generated)."),
    O("transport-ssh-allow-insecure-target", BOOL,
      "Do not verify TLS targets of SSH tunnels."),
    # Admin
    O("admin-enable", BOOL, "Enable the admin interface (/ping, /health)."),
    O("admin-port", _port, "Port of the admin interface."),
    O("admin-api-enable", BOOL, "Enable the admin API."),
    O("admin-api-port", _port, "Port of the admin API."),
    O("admin-api-key", _text, "Key of the admin API."),
    O("admin-api-allow-access-without-key", BOOL,
      "Open the admin API to anyone when no key is set."),
    # API
    O("api-url", _url("http", "https"), "Only serve the API on this URL's host."),
    O("api-port", _port, "Port of the public API and WS transport.", short="p"),
    O("allow-registration", BOOL, "Allow anyone to create accounts."),
    # Cluster
    O("cluster", _choice("auto", "single-node", "udp", "redis"),
      "Cluster mode: auto, single-node, udp, redis.", default="auto"),
    O("cluster-key", _text, "Signing key of cluster messages (same on every node)."),
    O("cluster-udp-discovery", _choice("auto", "multicast", "kubernetes"),
      "UDP peer discovery: auto, multicast, kubernetes."),
    O("cluster-udp-port", _port, "UDP port of the cluster bus."),
    O("cluster-udp-discovery-multicast-group", _multicast_group,
      "Multicast group (within 239.0.0.0/8)."),
    O("cluster-udp-discovery-multicast-ttl", _ttl,
      "TTL of multicast datagrams (0: this host only, 1: one subnet)."),
    O("cluster-udp-discovery-kubernetes-service", _text,
      "Headless service name."),
    O("cluster-udp-discovery-kubernetes-namespace", _text, "Namespace."),
    O("cluster-udp-discovery-kubernetes-service-env", _text,
      "Env var holding the service name."),
    O("cluster-udp-discovery-kubernetes-namespace-env", _text,
      "Env var holding the namespace."),
    O("cluster-udp-discovery-kubernetes-cluster-domain", _text,
      "Kubernetes cluster domain."),
    O("cluster-udp-discovery-kubernetes-namespace-file", _text,
      "File whose presence makes Kubernetes discovery eligible."),
    O("cluster-redis-url", _url("redis", "rediss"),
      "Redis URL of the cluster bus; required with --cluster redis."),
    O("cluster-node-ip", _ip, "IP address this node advertises (default: automatic)."),
    O("cluster-redis-channel", _text,
      "Redis pub/sub channel of the cluster bus (every node the same)."),
    O("cluster-discovery-wait", _seconds,
      "Seconds a multi-node server waits for peers before it is ready (20).", default=None),
    # Storage
    O("storage-url", _storage_url, "Storage: memory://, sqlite://, postgres://, redis://."),
    O("storage-timeout", _seconds,
      "Seconds a storage call may take (waits included) before it is answered as unavailable."),
    O("storage-pgsql-connection-pool-size", _positive_int,
      "PostgreSQL connection pool size."),
    # Deprecated
    O("redis-url", _url("redis", "rediss"),
      "Deprecated: Redis for storage and cluster.", default=None, group="Deprecated"),
    O("ingress-http-domain", _url("http", "https"),
      "Deprecated: same as --ingress-http-url.", default=None, group="Deprecated"),
    # Misc
    O("dns-server", _dns_server,
      "ip[:port] of the DNS server used to verify alt names and for Kubernetes peer discovery."),
    O("listen-address", _ip, "IP address every listener binds (default: all)."),
    O("shutdown-grace", _seconds,
      "Seconds a server keeps serving after SIGTERM with readiness off, so load balancers move away (5)."),
    O("shutdown-drain-timeout", _seconds,
      "Seconds in-flight requests and streams may take to finish at shutdown (30)."),
    O("log-level", _choice("all", "trace", "debug", "info", "warn", "error", "fatal", "off"),
      "Log level: all, trace, debug, info, warn, error, fatal, off."),
    O("log-format", _choice("json", "text"),
      "Log format: json (one object per line) or text (for a terminal)."),
)
del O
SPEC = {opt.name: opt for opt in OPTIONS}


def _show(value):
    if isinstance(value, tuple):
        value = ",".join(value)
    return value if value != "" else None


# -- --help: every option, grouped, at most HELP_WIDTH columns -------------------

HELP_WIDTH = 100
GROUPS = ("Ingress", "Transports", "API", "Admin", "Cluster", "Storage", "Logging", "Misc",
          "Deprecated")
_PREFIX_GROUPS = (
    ("ingress", "Ingress"), ("transport", "Transports"), ("api-", "API"),
    ("allow-registration", "API"), ("admin", "Admin"), ("cluster", "Cluster"),
    ("storage", "Storage"), ("log-", "Logging"),
)
_METAVARS = {
    "_port": "PORT", "_positive_int": "N", "_seconds": "SECONDS", "_text": "TEXT",
    "_choice": "CHOICE", "_choices": "LIST", "_url": "URL", "_storage_url": "URL", "_ip": "IP",
    "_cidrs": "CIDRS", "_ssh_host": "HOST[:PORT]", "_dns_server": "IP[:PORT]",
    "_multicast_group": "IP", "_ssh_key": "KEY",
}


def group_of(opt):
    """The --help heading of an option: its own, else by name prefix, else Misc."""
    if opt.group:
        return opt.group
    for prefix, group in _PREFIX_GROUPS:
        if opt.name.startswith(prefix):
            return group
    return "Misc"


def _metavar(opt):
    return _METAVARS.get(opt.convert.__qualname__.split(".")[0], "VALUE")


def _help_entry(names, doc, width, column=36):
    """Lines of one entry: names, then the doc wrapped beside them (or below, if too long)."""
    import textwrap

    text = textwrap.wrap(doc, width - column) or [""]
    head = "  " + names
    if len(head) + 2 <= column:
        return [(head.ljust(column) + text[0]).rstrip()] + [" " * column + t for t in text[1:]]
    return [head] + [" " * column + t for t in text]


def help_text(width=HELP_WIDTH):
    """Every option, under its group's heading, in table order (``--help`` without the usage line)."""
    import textwrap

    lines = [""] + textwrap.wrap(Options.longdesc, width)
    for group in GROUPS + ("Help",):
        entries = [opt for opt in OPTIONS if group_of(opt) == group]
        if not entries and group != "Help":
            continue
        lines += ["", f"{group}:"]
        for opt in entries:
            short = f"-{opt.short}, " if opt.short else "    "
            if opt.convert is BOOL:
                names = f"{short}--{opt.name}"
                shown = "true" if _default(opt) else None
            else:
                names = f"{short}--{opt.name}={_metavar(opt)}"
                default = _default(opt)
                shown = ", ".join(default) if isinstance(default, tuple) else _show(default)
            doc = opt.doc + (f" [default: {shown}]" if shown else "")
            lines += _help_entry(names, doc, width)
        if group == "Help":
            lines += _help_entry("-h, --help", "Display this help and exit.", width)
            lines += _help_entry("    --version", "Display the version and exit.", width)
            lines += _help_entry("    --show-hidden", "Accepted for compatibility (every option is listed).", width)
    return "\n".join(lines) + "\n"


# -- argv normalisation --------------------------------------------------------


def _normalise(argv):
    """Rewrite argv into what usage.Options/getopt accepts.

    Booleans: ``--x``, ``--x true``, ``--x=true`` -> ``--x``;
    ``--x false``, ``--x=false`` -> ``--no-x`` (``--no-x`` itself is a flag).
    Multi-value: ``--ingress a b,c`` -> ``--ingress=a,b,c``.
    """
    out, args = [], list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            out.append(arg)
            out.extend(args)
            break
        name, eq, value = arg[2:].partition("=")
        opt = SPEC.get(name) if arg.startswith("--") else None
        if opt is None:
            out.append(arg)
        elif opt.convert is BOOL:
            if not eq and args and args[0] in ("true", "false"):
                value, eq = args.pop(0), "="
            if eq and value not in ("true", "false"):
                raise ConfigError(f"--{name}: expected true or false, got {value!r}")
            out.append(f"--no-{name}" if value == "false" else f"--{name}")
        elif opt.multi:
            values = [value] if eq else []
            while args and not args[0].startswith("-"):
                values.append(args.pop(0))
            if not values:
                raise ConfigError(f"--{name}: requires a value")
            out.append(f"--{name}={','.join(values)}")
        else:
            out.append(arg)
    return out


# -- the twistd options class -------------------------------------------------


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Every option can also be set as an environment variable EXPOSR_<NAME> "
        "(e.g. EXPOSR_INGRESS_HTTP_URL); the command line wins. Boolean flags accept "
        "--flag, --flag true|false, --flag=false and --no-flag; in the environment only "
        "'true' is true. --ingress and --transport take several values, repeated or "
        "comma separated. An empty value means 'not set'."
    )
    optFlags = [["show-hidden", None, "Accepted for compatibility (every option is listed)."]]
    for _o in OPTIONS:
        if _o.convert is BOOL:
            optFlags += [[_o.name, None, _o.doc], ["no-" + _o.name, None, None]]
    optParameters = [
        [o.name, o.short, _show(_default(o)), o.doc] for o in OPTIONS if o.convert is not BOOL
    ]
    del _o

    def __init__(self, environ=None):
        super().__init__()
        self.environ = os.environ if environ is None else environ
        self.config = None
        self._cli = {}
        for opt in OPTIONS:
            if opt.convert is not BOOL:
                self._dispatch[opt.name] = self._record

    def _record(self, name, value):
        if SPEC[name].multi:
            self._cli.setdefault(name, []).append(value)
        else:
            self._cli[name] = value

    def _generic_flag(self, flagName, value=None):
        super()._generic_flag(flagName, value)
        if flagName in SPEC:
            self._cli[flagName] = True
        elif flagName.startswith("no-") and flagName[3:] in SPEC:
            self._cli[flagName[3:]] = False

    def opt_version(self):
        """Display the version and exit."""
        print(f"version: {__version__} (pkg {__version__})")
        sys.exit(0)

    def parseOptions(self, options=None):
        if options is None:
            options = sys.argv[1:]
        super().parseOptions(_normalise(options))

    def parseArgs(self, *args):
        if args:
            raise ConfigError(f"unexpected argument {args[0]!r}")

    def getSynopsis(self):
        if self.parent is None:
            return "Usage: exposrd [options]"
        return super().getSynopsis()

    def getUsage(self, width=None):
        """Every option, grouped (--show-hidden is accepted and changes nothing)."""
        return help_text(min(width or HELP_WIDTH, HELP_WIDTH))

    def postOptions(self):
        self.config = resolve(self._cli, self.environ)


def parse_config(argv, environ):
    """Parse argv and environ into a `Config`; raise `ConfigError`."""
    options = Options(environ)
    try:
        options.parseOptions(list(argv))
    except ConfigError:
        raise
    except usage.UsageError as e:
        raise ConfigError(str(e)) from None
    return options.config


# -- resolution ----------------------------------------------------------------


def _given(cli, environ):
    """{name: (raw value, label)}: environment first, then the command line over it."""
    given = {}
    for key in sorted(environ):
        name = key[len(ENV_PREFIX):].lower().replace("_", "-")
        if key.startswith(ENV_PREFIX) and name in SPEC and environ[key] != "":
            opt = SPEC[name]
            value = environ[key]
            if opt.convert is BOOL:
                value = _bool_env(value)
            elif opt.multi:
                value = [value]
            given[name] = (value, key)
    for name, value in cli.items():
        if value != "" and value != [""]:
            given[name] = (value, "--" + name)
    return given


def _read_check(name, path):
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ConfigError(f"--{name}: cannot read {path}: {e.strerror}") from None


# deprecated option -> the options that replace it (named in a start-up warning)
DEPRECATED = {
    "ingress-http-domain": ("ingress-http-url",),
    "redis-url": ("storage-url", "cluster-redis-url"),
}


def _replacement(label, names):
    """The replacements of a deprecated option, spelled as ``label`` was (option or variable)."""
    if label.startswith("--"):
        return " and ".join("--" + name for name in names)
    return " and ".join(ENV_PREFIX + name.upper().replace("-", "_") for name in names)


def resolve(cli, environ):
    """Typed values of every option, then the two-phase rules (docs/protocol.rst, "Configuration")."""
    v = {opt.name: _default(opt) for opt in OPTIONS}
    given = _given(cli, environ)
    deprecated = tuple(
        (given[name][1], _replacement(given[name][1], names)) for name, names in DEPRECATED.items() if name in given
    )
    for name, (raw, label) in given.items():
        opt = SPEC[name]
        try:
            value = raw if opt.convert is BOOL else opt.convert(raw)
        except ValueError as e:
            raise ConfigError(f"{label}: {e}") from None
        if opt.multi and not value:
            continue  # only empty elements: not set
        v[name] = value

    if v["ingress-http-port"] is None:  # -p moves the whole shared port
        v["ingress-http-port"] = v["api-port"]
    if not v["admin-api-key"]:
        v["admin-api-key"] = None
    if v["ingress-http-url"] is None:
        v["ingress-http-url"] = v["ingress-http-domain"]
    if v["redis-url"]:
        if v["cluster-redis-url"] is None:
            v["cluster-redis-url"] = v["redis-url"]
        if urlsplit(v["storage-url"]).scheme == "memory":
            v["storage-url"] = v["redis-url"]
    storage = urlsplit(v["storage-url"]).scheme
    cluster_why = None
    if v["cluster"] == "auto":
        if v["redis-url"]:
            v["cluster"] = "redis"
            cluster_why = "--redis-url is set"
        elif storage not in ("memory", "sqlite"):
            v["cluster"] = "udp"
            cluster_why = f"the {storage}: storage can be shared by several nodes"
        else:
            v["cluster"] = "single-node"
            cluster_why = f"the {storage}: storage belongs to this process alone"

    if v["cluster"] == "redis" and not v["cluster-redis-url"]:
        raise ConfigError("Missing required argument: cluster-redis-url")
    # (udp with memory:// is what the original's Helm chart renders by default, for
    # one replica: it starts, and the server warns that nothing is shared)
    if storage == "memory" and v["cluster"] == "redis":
        raise ConfigError(
            f"--cluster {v['cluster']}: nodes of a cluster must share their storage, "
            "set --storage-url to a postgres:// or redis:// URL (memory:// is per process)"
        )
    if storage == "sqlite" and v["cluster"] != "single-node":
        raise ConfigError("--storage-url: SQlite storage can only be used in single-node mode")
    if "http" in v["ingress"] and not v["ingress-http-url"]:
        raise ConfigError("--ingress-http-url: required when HTTP ingress is enabled")
    if "sni" in v["ingress"]:
        for name in ("ingress-sni-cert", "ingress-sni-key"):
            if not v[name]:
                raise ConfigError(f"--{name}: required when SNI ingress is enabled")
            _read_check(name, v[name])

    return Config(cluster_why=cluster_why, deprecated=deprecated,
                  **{opt.field: v[opt.name] for opt in OPTIONS if opt.field in _CONFIG_FIELDS})
