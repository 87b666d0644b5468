"""Who the client is: its address, believing proxies only when they are trusted.

Shared by the ingress (forwarding headers) and the APIs (rate limits). The
socket peer is the client, unless the peer is a trusted proxy (a load
balancer in front of us), whose ``X-Forwarded-For`` (first element) names its
client. A public client cannot spoof its address.
"""

import functools
import ipaddress


def parse_networks(cidrs):
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def parse_ip(text):
    """An IP literal as an address object (IPv4-mapped IPv6 unmapped), or None."""
    try:
        addr = ipaddress.ip_address(text.strip().strip("[]"))
    except (ValueError, AttributeError):
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr


@functools.lru_cache(maxsize=1024)
def normalise_ip(text):
    """An IP literal as a normalised string (IPv4-mapped IPv6 unmapped), or None.

    Remembered for the last 1,024 texts (a client's address is parsed for
    each of its requests)."""
    addr = parse_ip(text)
    return None if addr is None else str(addr)


def is_trusted(peer_ip, networks):
    """Whether the socket peer is one of the trusted proxies (IPv4-mapped peers unmapped)."""
    if not networks:
        return False
    try:
        addr = ipaddress.ip_address(peer_ip.strip("[]"))
    except (ValueError, AttributeError):
        return False
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


def client_ip(peer_ip, forwarded_for, networks, trusted=None):
    """The public client's address.

    ``forwarded_for``: the request's ``X-Forwarded-For`` value (bytes) or
    None; ``trusted``: the result of `is_trusted` for this peer, if known.
    """
    peer = normalise_ip(peer_ip) or ""
    if trusted is None:
        trusted = bool(peer) and is_trusted(peer, networks)
    if peer and trusted and forwarded_for:
        first = forwarded_for.split(b",", 1)[0].decode("latin-1")
        return normalise_ip(first) or ""
    return peer
