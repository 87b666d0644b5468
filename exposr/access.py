"""Per-tunnel access rules: IP allow lists.

A tunnel record may carry ``access.allow``: a list of CIDRs (IPv4 and
IPv6; a bare address is a /32 or /128). When the list is present and not
empty, only client addresses inside one of its networks may use the tunnel,
on every ingress; a record without it is open, as before.

`allowed(tunnel, ip)` is what an ingress asks per request or connection.
It costs one dict lookup for a tunnel without rules. With rules, the
verdicts per client address are cached by the identity of the record's
list (the router reuses a record for a couple of seconds; the cache holds
the list, so its id is not reused meanwhile), and the parsed networks by
the tuple of CIDR strings (the list rarely changes): a kept-alive client
costs two dict lookups.
Entries that do not parse (a hand-edited record) match nothing, so a list
of garbage allows no one.
"""

import ipaddress

from exposr import clientaddr

MAX_ENTRIES = 50  # CIDRs per tunnel
CACHE_MAX = 10000  # cached parsed lists / verdicts (each cache is cleared when full)

_networks = {}
_by_list = {}  # id(allow list) -> (the list, {client address: verdict}, networks)


def parse_cidr(text):
    """An ``ip_network`` of a CIDR or address string (host bits allowed), or None."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    if not text or text != text.strip("[]"):
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def normalise_allow(values):
    """The canonical strings of a list of CIDRs (``203.0.113.7/24`` -> ``203.0.113.0/24``),
    deduplicated, in order. Raises ValueError naming the first bad entry's index."""
    out = []
    for i, value in enumerate(values):
        net = parse_cidr(value)
        if net is None:
            raise ValueError(i)
        text = str(net)
        if text not in out:
            out.append(text)
    return out


def networks(allow):
    """The parsed networks of an allow list (a tuple of strings), cached."""
    nets = _networks.get(allow)
    if nets is None:
        parsed = [parse_cidr(c) for c in allow]
        nets = tuple(n for n in parsed if n is not None)
        if len(_networks) >= CACHE_MAX:
            _networks.clear()
        _networks[allow] = nets
    return nets


def rule(tunnel, name, kind):
    """The record's ``access.<name>`` when it is a non-empty ``kind``, else None."""
    access = tunnel.get("access")
    if not access or type(access) is not dict:
        return None
    value = access.get(name)
    if not value or type(value) is not kind:
        return None
    return value


def allow_list(tunnel):
    """The record's allow list (a list of strings), or None when it has none."""
    return rule(tunnel, "allow", list)


def _entry(allow):
    try:
        nets = networks(tuple(allow))
    except TypeError:  # a hand-edited record with entries that are not strings
        nets = ()
    if len(_by_list) >= CACHE_MAX:
        _by_list.clear()
    entry = _by_list[id(allow)] = (allow, {}, nets)
    return entry


def allowed(tunnel, ip):
    """May the client address ``ip`` (a string; None or "" if unknown) use the tunnel of record ``tunnel``?"""
    access = tunnel.get("access")
    if not access or type(access) is not dict:
        return True
    allow = access.get("allow")
    if not allow or type(allow) is not list:
        return True
    entry = _by_list.get(id(allow))
    if entry is None or entry[0] is not allow:
        entry = _entry(allow)
    verdicts = entry[1]
    verdict = verdicts.get(ip)
    if verdict is None:
        addr = clientaddr.parse_ip(ip) if ip else None
        verdict = addr is not None and any(addr in net for net in entry[2])
        if len(verdicts) >= CACHE_MAX:
            verdicts.clear()
        verdicts[ip] = verdict
    return verdict


def public_view(tunnel):
    """The ``access`` object shown in tunnel JSON (no secrets)."""
    out = {}
    allow = allow_list(tunnel)
    if allow:
        out["allow"] = list(allow)
    auth = rule(tunnel, "http_auth", dict)
    if auth is not None and auth.get("user"):
        out["http_auth"] = {"user": auth["user"]}  # never the hash
    return out
