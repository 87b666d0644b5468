"""What the HTTP ingress changes in a request head (reference ingress-http.md 8.4).

Pure functions over `httphead.RequestHead`: the client address (believing
``X-Forwarded-For`` only from trusted proxies), loop detection through
``exposr-via``, and the rewritten head sent to the tunnel.
"""

import ipaddress
from urllib.parse import urlsplit

from exposr.ingress import httphead

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def parse_networks(cidrs):
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _ip(text):
    """An IP literal as a normalised string (IPv4-mapped IPv6 unmapped), or None."""
    try:
        addr = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def is_trusted(peer_ip, networks):
    try:
        addr = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    return any(addr in net for net in networks)


def client_ip(peer_ip, head, networks):
    """The public client's address.

    The socket peer, unless the peer is a trusted proxy (a load balancer in
    front of us) that says who its client was in ``X-Forwarded-For`` (first
    element). A public client cannot spoof its address.
    """
    peer = _ip(peer_ip) or ""
    if peer and is_trusted(peer, networks):
        xff = head.get(b"x-forwarded-for")
        if xff:
            first = xff.split(b",", 1)[0].decode("latin-1")
            return _ip(first) or ""
    return peer


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
    """Host/Origin/Referer rewrite of 8.4 (with the original's quirks H6 fixed)."""
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

    def rewrite(self, head, ip, base, target_url, local=True):
        """Mutate ``head`` as 8.4 says; `base` from `base_url`; ``target_url`` str or None."""
        ipb = ip.encode()
        head.set(b"x-forwarded-for", ipb)
        head.set(b"x-real-ip", ipb)
        via = head.get(b"exposr-via")
        head.set(b"exposr-via", self._node + b"," + via if via else self._node)
        if not local:
            return head
        upgrade = head.is_upgrade
        if not upgrade:
            head.remove(b"connection")
        if base is not None:
            scheme, host, port = base
            hostport = host if port is None else f"{host}:{port}"
            head.set(b"x-forwarded-host", hostport.encode("latin-1"))
            if port is not None:
                head.set(b"x-forwarded-port", str(port).encode())
            head.set(b"x-forwarded-proto", scheme.encode())
            ip_part = ip if ":" not in ip else f'"[{ip}]"'
            head.set(
                b"forwarded",
                f"by=_exposr;for={ip_part};host={hostport};proto={scheme}".encode("latin-1"),
            )
        if target_url and target_url.lower().startswith("http"):
            try:
                target = urlsplit(target_url)
                target.port  # noqa: B018  (raises on a bad port)
            except ValueError:
                return head
            original = (head.get(b"host") or b"").decode("latin-1").lower()
            for name in (b"host", b"referer", b"origin"):
                value = head.get(name)
                if value is not None:
                    head.set(name, _rewrite_toward_target(value, original, target))
        return head
