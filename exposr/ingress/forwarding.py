"""What the HTTP ingress changes in a request head (docs/protocol.rst, "Forwarding headers").

Pure functions over `httphead.RequestHead`: the client address (believing
``X-Forwarded-For`` only from trusted proxies), loop detection through
``exposr-via``, and the rewritten head sent to the tunnel.
"""

from urllib.parse import urlsplit

from exposr import clientaddr
from exposr.clientaddr import is_trusted, parse_networks  # noqa: F401  (the ingress's names)
from exposr.ingress import httphead

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def client_ip(peer_ip, head, networks, trusted=None):
    """The public client's address (`exposr.clientaddr.client_ip`) for a request head."""
    peer = clientaddr.normalise_ip(peer_ip) or ""
    if trusted is None:
        trusted = bool(peer) and is_trusted(peer, networks)
    if not (peer and trusted):
        return peer  # the head is not read (it may be None)
    return clientaddr.client_ip(peer, head.get(b"x-forwarded-for"), networks, True)


def is_loop(head, node_id):
    via = head.get(b"exposr-via")
    if not via:
        return False
    node = node_id.encode()
    return any(part.strip() == node for part in via.split(b","))


def base_url(head, trusted):
    """The (scheme, host, port) the client used, proxy headers only if trusted."""
    if trusted:
        parts = httphead.derive_base_url(head)
    else:
        parts = httphead.derive_base_url([(n, v) for n, v in head.headers if n.lower() == b"host"])
    return parts


def _hostport(host, port, scheme):
    if port is None or _DEFAULT_PORTS.get(scheme) == port:
        return host
    return f"{host}:{port}"


def _rewrite_toward_target(value, original_host, target):
    """Host/Origin/Referer rewrite toward the target: a URL whose host is the
    request's Host gets the target's scheme and host[:port] (values starting with
    "http" included, no "/" added), any other value becomes the target's host[:port]."""
    text = value.decode("latin-1")
    t_hostport = _hostport(target.hostname or "", target.port, target.scheme)
    if "://" in text:
        try:
            url = urlsplit(text)
            url_hostport = url.netloc.rsplit("@", 1)[-1].lower()
        except ValueError:
            return value
        if url_hostport != original_host:
            return value
        scheme = target.scheme
        rebuilt = f"{scheme}://{t_hostport}{url.path}"
        if url.query:
            rebuilt += "?" + url.query
        if url.fragment:
            rebuilt += "#" + url.fragment
        return rebuilt.encode("latin-1")
    return t_hostport.encode("latin-1")


class Rewriter:
    """Rewrites request heads for one tunnel on this node."""

    def __init__(self, node_id):
        self.node_id = node_id
        self._node = node_id.encode()
        self._targets = {}
        self._plans = {}

    def rewrite(self, head, ip, base, target_url, local=True, upgrade=None):
        """Mutate ``head`` (docs/protocol.rst, "Forwarding headers"); `base` from `base_url`; ``target_url`` str or None.

        One pass to read, one pass to write (this runs for every request):
        each replaced header takes the position of its first occurrence,
        under its lower-case name; new ones are appended in a fixed order.
        ``upgrade``: ``head.is_upgrade`` if the caller knows it.

        The new values depend on a few inputs only (address, base URL,
        target, and the Host/Referer/Origin/exposr-via values): they are
        memoised per combination, a keep-alive client repeats them.
        """
        headers = head.headers
        host = referer = origin = via = conn = None
        for name, value in headers:
            lname = name.lower()
            if lname in _READ:
                if lname == b"connection":
                    conn = value if conn is None else conn + b", " + value
                elif lname == b"host":
                    host = value if host is None else host + b", " + value
                elif lname == b"referer":
                    referer = value if referer is None else referer + b", " + value
                elif lname == b"origin":
                    origin = value if origin is None else origin + b", " + value
                else:
                    via = value if via is None else via + b", " + value
        if upgrade is None:
            upgrade = head.is_upgrade
        key = (ip, base, target_url, local, upgrade, host, referer, origin, via, conn)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(ip, base, target_url, local, upgrade, host, referer, origin, via, conn)
            if len(self._plans) >= PLAN_CACHE_MAX:
                self._plans.clear()
            self._plans[key] = plan
        new, drop, tail = plan
        out = []
        placed = None
        for pair in headers:
            lname = pair[0].lower()
            if lname in new:
                if placed is None:
                    placed = {lname}
                elif lname in placed:
                    continue
                else:
                    placed.add(lname)
                out.append((lname, new[lname]))
            elif lname not in drop:
                out.append(pair)
        if placed is None:
            out += tail
        else:
            out += [pair for pair in tail if pair[0] not in placed]
        headers[:] = out
        return head

    def _plan(self, ip, base, target_url, local, upgrade, host, referer, origin, via, conn):
        """(new values by name, the names to drop, new values in append order).

        Toward the target, hop-by-hop headers are dropped: the standard ones,
        and those the client named in ``Connection`` (never the framing
        headers). An upgrade keeps ``Upgrade`` and says ``Connection: Upgrade``.
        """
        ipb = ip.encode()
        new = {
            b"x-forwarded-for": ipb,
            b"x-real-ip": ipb,
            b"exposr-via": self._node + b"," + via if via else self._node,
        }
        # hop-by-hop headers are about the client's own connection: they do
        # not go on, to the target or to the node holding the tunnel (whose
        # kept-alive connection is shared by every request, so a client's
        # Connection: close must not end it)
        drop = set(_HOP_BY_HOP)
        if conn:
            drop.update(t.strip(b" \t").lower() for t in conn.split(b","))
        drop -= _NEVER_DROP
        if upgrade:
            drop.discard(b"upgrade")
            if conn is not None:
                new[b"connection"] = b"Upgrade"
        else:
            drop.update((b"connection", b"upgrade"))
        drop = frozenset(drop)
        if local:
            if base is not None:
                scheme, bhost, port = base
                hostport = bhost if port is None else f"{bhost}:{port}"
                new[b"x-forwarded-host"] = hostport.encode("latin-1")
                if port is not None:
                    new[b"x-forwarded-port"] = str(port).encode()
                new[b"x-forwarded-proto"] = scheme.encode()
                ip_part = ip if ":" not in ip else f'"[{ip}]"'
                new[b"forwarded"] = f"by=_exposr;for={ip_part};host={hostport};proto={scheme}".encode("latin-1")
            target = self._target(target_url)
            if target is not None:
                original = (host or b"").decode("latin-1").lower()
                for name, value in ((b"host", host), (b"referer", referer), (b"origin", origin)):
                    if value is not None:
                        rewritten = _rewrite_toward_target(value, original, target)
                        if _safe(rewritten):
                            new[name] = rewritten
        return new, drop, list(new.items())

    def _target(self, target_url):
        """The parsed target URL when the target rewrite applies (http/https), else None."""
        if not target_url:
            return None
        try:
            return self._targets[target_url]
        except KeyError:
            pass
        target = None
        if target_url.lower().startswith("http"):
            try:
                target = urlsplit(target_url)
                target.port  # noqa: B018  (raises on a bad port)
            except ValueError:
                target = None
        if len(self._targets) > 1024:
            self._targets.clear()
        self._targets[target_url] = target
        return target


PLAN_CACHE_MAX = 4096
_READ = frozenset((b"exposr-via", b"host", b"referer", b"origin", b"connection"))
# hop-by-hop headers a proxy does not forward (besides those named in Connection)
_HOP_BY_HOP = frozenset((b"keep-alive", b"te", b"proxy-authorization", b"proxy-connection", b"proxy-authenticate"))
# never dropped for being named in Connection: the message's framing and route
_NEVER_DROP = frozenset((b"host", b"content-length", b"transfer-encoding", b"", b"close"))


def _safe(value):
    return b"\r" not in value and b"\n" not in value and b"\x00" not in value
