"""Sans-I/O part of the SSH transport: what a ``tcpip-forward`` means for the
tunnel target (docs/protocol.rst, "Remote forwarding") and how target URLs
are rendered.

The original turns the bind pair into ``tcp://<address>[:<port>]``, renames the
scheme after the IANA service of the port and lets WHATWG URL rules drop the
default port of special schemes; the only observable effect of the renaming is
that ports 80, 443 and 21 are elided (and then never adopted). This module
adopts them too, so only a small table of service ports is needed: the one
used to compute the reply port of a target whose URL has no explicit port.
"""

import ipaddress
import re

import attrs

# WHATWG special schemes and their default ports.
SPECIAL_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21}

# Scheme → port for a target URL without an explicit port (IANA service names
# for the schemes people put in a target; ws/wss as the original maps them).
SCHEME_PORTS = dict(
    SPECIAL_PORTS,
    ssh=22,
    telnet=23,
    smtp=25,
    domain=53,
    gopher=70,
    pop3=110,
    imap=143,
    ldap=389,
    smtps=465,
    submission=587,
    ldaps=636,
    imaps=993,
    pop3s=995,
    mysql=3306,
    postgresql=5432,
    postgres=5432,
    amqp=5672,
    redis=6379,
    mqtt=1883,
    git=9418,
    irc=194,
)

TLS_SCHEMES = frozenset(("https", "wss", "tcps", "tls"))

# Never adopted as the target host when a target is already configured.
_WILDCARD_HOSTS = frozenset(("localhost", "0.0.0.0", "", "*", "::", "[::]"))

_URL = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://"
    r"(?:(?P<userinfo>[^@/?#]*)@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]*\]|[^:/?#\[\]@]*)"
    r"(?::(?P<port>[0-9]*))?"
    r"(?P<rest>[/?#].*)?$",
    re.DOTALL,
)
_HOST = re.compile(r"^[A-Za-z0-9_.\-]{1,253}$")


@attrs.frozen
class Url:
    scheme: str
    host: str = ""
    port: int | None = None
    userinfo: str | None = None
    rest: str = ""

    @property
    def special(self):
        return self.scheme in SPECIAL_PORTS

    @property
    def effective_port(self):
        """The explicit port, else the scheme's service port, else 0."""
        if self.port is not None:
            return self.port
        return SCHEME_PORTS.get(self.scheme, 0)

    def __str__(self):
        out = self.scheme + "://"
        if self.userinfo is not None:
            out += self.userinfo + "@"
        out += self.host
        if self.port is not None and not (self.special and SPECIAL_PORTS[self.scheme] == self.port):
            out += ":%d" % (self.port,)
        rest = self.rest
        if self.special and not rest.startswith("/"):
            rest = "/" + rest
        return out + rest


def parse_url(text):
    """A `Url`, or None when ``text`` is not an authority URL we understand."""
    if not isinstance(text, str):
        return None
    m = _URL.match(text.strip())
    if m is None:
        return None
    scheme = m.group("scheme").lower()
    port = m.group("port")
    if port:
        port = int(port)
        if port > 65535:
            return None
    else:
        port = None
    host = m.group("host")
    if scheme in SPECIAL_PORTS:
        host = host.lower()
    return Url(scheme, host, port, m.group("userinfo"), m.group("rest") or "")


def render_target(text):
    """The target URL as printed by the session banner (``tcp://`` when unset)."""
    url = parse_url(text) if text else None
    if url is None:
        return text if text else "tcp://"
    return str(url)


def bind_host(address):
    """The URL host for an SSH bind address, or None when it cannot be one."""
    if not address or len(address) > 253:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        pass
    else:
        return "[%s]" % (ip.compressed,) if ip.version == 6 else ip.compressed
    if not _HOST.match(address):
        return None
    return address.lower()


def valid_bind(address, port):
    """A forward request we can record: a sane bind address and a TCP port."""
    if not 0 <= port <= 65535:
        return False
    if address in ("", "*"):
        return True
    return bind_host(address) is not None


@attrs.frozen
class ForwardDecision:
    new_target: str | None  # the URL to store, or None: target unchanged
    reply_port: int  # port of the (possibly updated) target, 0 when none


def forward_target(current, address, port):
    """
    Apply the rules of docs/protocol.rst, "Remote forwarding", to the current target URL
    (a string or None) for a forward request (bind ``address``, ``port``).
    """
    cur = parse_url(current) if current else None
    configured = cur is not None and bool(cur.host)
    host = bind_host(address)
    new = None
    if host and 0 < port <= 65535:
        if configured:
            same = (host, port) == (cur.host.lower(), cur.effective_port)
            if not same and host not in _WILDCARD_HOSTS:
                new = attrs.evolve(cur, host=host, port=port)
        else:
            scheme = {80: "http", 443: "https"}.get(port, "tcp")
            new = Url(scheme, host, port)
    final = new if new is not None else cur
    reply = final.effective_port if final is not None else 0
    return ForwardDecision(str(new) if new is not None else None, reply)
