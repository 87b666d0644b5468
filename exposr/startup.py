"""Start-up of the process: the open files limit, and the ready summary.

`raise_open_files_limit` is called by the entry points (`exposr.tap`,
`exposr.tapfile`), which own the process; `log_open_files_limit` logs both
values.

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


def raise_open_files_limit(getrlimit=None, setrlimit=None, nr_open="/proc/sys/fs/nr_open"):
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (before, after, hard).

    Every tunnel stream and ingress connection is a file descriptor, and the
    usual soft default (1024) is far below what one node serves. An unlimited
    hard limit is capped at the kernel's ``nr_open``. ``after`` is ``before``
    when the limit could not be raised.
    """
    import resource

    getrlimit = getrlimit or resource.getrlimit
    setrlimit = setrlimit or resource.setrlimit
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open(nr_open) as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft, soft, hard
        return soft, target, hard
    return soft, soft, hard


def log_open_files_limit(log, limits):
    import resource

    before, after, hard = limits
    if hard == resource.RLIM_INFINITY:
        hard = "unlimited"
    if after != before:
        log.info("Open files limit raised from {before} to {after} (hard limit {hard})",
                 before=before, after=after, hard=hard)
    else:
        log.info("Open files limit {after} (hard limit {hard})", after=after, hard=hard)
