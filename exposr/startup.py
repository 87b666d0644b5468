"""What the server tells its operator at start-up, as text: the ready summary.

`summary` names where each part listens once the listeners are bound: the
API (and WebSocket transport), the HTTP ingress (its tunnel URLs), the SNI
ingress, the SSH transport and the admin ports. It is one line, logged once.
"""

from urllib.parse import urlsplit

_WILDCARDS = ("", "0.0.0.0", "::")


def _http_url(host, port):
    if host in _WILDCARDS:
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def tunnel_url_pattern(ingress_http_url):
    """``https://tun.example.com`` -> ``https://<tunnel>.tun.example.com/``."""
    parts = urlsplit(ingress_http_url)
    return f"{parts.scheme}://<tunnel>.{parts.netloc}{parts.path or '/'}"


def summary(config, bound, ssh_port=None):
    """The ready line's list of what listens where.

    ``bound``: {listener name: (host, port)} of the bound listeners;
    ``ssh_port``: the SSH transport's bound port, or None.
    """
    texts = []
    api = bound.get("api")
    if api is not None:
        url = config.api_url or _http_url(*api)
        transport = " and WebSocket transport" if config.ws_transport_enabled else ""
        texts.append(f"API{transport} {url} (port {api[1]})")
    if config.http_ingress_enabled:
        host_port = bound.get("ingress-http", api)
        if host_port is not None:
            pattern = tunnel_url_pattern(config.ingress_http_url)
            texts.append(f"HTTP ingress {pattern} (port {host_port[1]})")
    sni = bound.get("ingress-sni")
    if sni is not None:
        texts.append(f"SNI ingress port {sni[1]}")
    if ssh_port is not None:
        texts.append(f"SSH transport port {ssh_port}")
    for name, label in (("admin", "admin"), ("admin-api", "admin API")):
        if name in bound:
            texts.append(f"{label} port {bound[name][1]}")
    if "admin" in bound and config.admin_api_enable and "admin-api" not in bound:
        texts[-1] = f"admin and admin API port {bound['admin'][1]}"
    return ", ".join(texts)
