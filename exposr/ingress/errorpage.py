"""HTML error pages for people in browsers (the ingress's errors are JSON otherwise).

`prefers_html(headers)` reads a request's ``Accept``: a client gets HTML
when it lists ``text/html`` with a q not lower than the q it gives JSON
(``application/json``, else ``application/*``, else ``*/*``; absent counts
as 0). So a browser (``text/html,...,*/*;q=0.8``) gets HTML; ``curl``
(``*/*``), API clients and clients that send no ``Accept`` keep JSON.

`html_page(status, code, tunnel_id)` is a small self-contained page (no
external resource): what happened and what the tunnel's owner can do.
Only the error path calls either: a request that reaches its target
never parses its ``Accept``.
"""

import html
import re

_ID = re.compile(r"\bID\b")

# code -> (title, what the visitor or the owner can do)
_TEXTS = {
    "TUNNEL_NOT_FOUND": (
        "No such tunnel",
        "There is no tunnel by this name. If it is yours, check the name, or create the tunnel with the exposr client.",
    ),
    "TUNNEL_NOT_CONNECTED": (
        "The tunnel's client is not connected",
        "The tunnel exists but no exposr client is connected to it. If it is yours, start the client "
        "(exposr tunnel connect ID).",
    ),
    "TUNNEL_HTTP_INGRESS_DISABLED": (
        "HTTP ingress is not enabled for this tunnel",
        "If the tunnel is yours, enable it: exposr tunnel configure ID set ingress-http on.",
    ),
    "TUNNEL_TARGET_CON_FAILED": (
        "The tunnel's target could not be reached",
        "The tunnel's client is connected but could not reach the service it forwards to. "
        "If the tunnel is yours, check that the target is running and that its address is right.",
    ),
    "TUNNEL_TARGET_CON_RESET": (
        "The connection to the tunnel's target was lost",
        "The service behind the tunnel closed the connection before answering. Try again; if the tunnel "
        "is yours, check the target's logs.",
    ),
    "TUNNEL_LOOKUP_UNAVAILABLE": (
        "Temporarily unavailable",
        "The server cannot look the tunnel up right now. Try again in a moment.",
    ),
    "TUNNEL_TRANSPORT_REQUEST_LIMIT": (
        "Too many requests",
        "The tunnel carries as many requests as it can at once. Try again in a moment.",
    ),
    "HTTP_INGRESS_REQUEST_LOOP": (
        "Request loop",
        "The request came back to this server through its own tunnel. If the tunnel is yours, check "
        "that its target is not the tunnel's own address.",
    ),
    "MISDIRECTED_REQUEST": (
        "Unknown host",
        "This server has no tunnel for this host name.",
    ),
    "TUNNEL_HTTP_AUTH_REQUIRED": (
        "Sign-in required",
        "This tunnel is protected by a user name and password. If it is yours, they are the ones set with "
        "exposr tunnel configure ID set ingress-http-auth USER:PASSWORD.",
    ),
    "TUNNEL_HTTP_AUTH_FAILED": (
        "Wrong user name or password",
        "The user name or password is not the tunnel's. Try again.",
    ),
    "TUNNEL_HTTP_AUTH_RATE_LIMITED": (
        "Too many failed sign-ins",
        "Too many wrong passwords came from your address. Wait a little before trying again.",
    ),
    "TUNNEL_ACCESS_DENIED": (
        "Access denied",
        "Your address is not allowed to use this tunnel. If the tunnel is yours, add the address to its "
        "allow list (exposr tunnel configure ID set ingress-allow CIDR,...).",
    ),
}

_DEFAULT = ("Error", "The request could not be forwarded through the tunnel.")

_PAGE = (
    "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
    "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
    "<title>{status} {title}</title>"
    "<style>body{{font-family:system-ui,sans-serif;max-width:40em;margin:4em auto;padding:0 1em;color:#222}}"
    "h1{{font-size:1.4em}}code{{background:#eee;padding:0 .2em}}p.meta{{color:#777;font-size:.9em}}</style>"
    "</head><body><h1>{title}</h1><p>{text}</p>"
    "<p class=\"meta\">{status} &middot; <code>{code}</code>{tunnel}</p></body></html>\n"
)


def _q(params):
    for p in params:
        name, _, value = p.partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return 0.0
            return q if 0.0 <= q <= 1.0 else 0.0
    return 1.0


def prefers_html(headers):
    """Does a request head's ``Accept`` (header list of (name, value) bytes) prefer HTML to JSON?"""
    values = [v for n, v in headers if n.lower() == b"accept"]
    if not values:
        return False
    qs = {}
    for value in values:
        for item in value.decode("latin-1").split(","):
            media, *params = item.split(";")
            media = media.strip().lower()
            if media and media not in qs:
                qs[media] = _q(params)
    html_q = qs.get("text/html", 0.0)
    if html_q <= 0.0:
        return False
    for media in ("application/json", "application/*", "*/*"):
        if media in qs:
            return html_q >= qs[media]
    return True


def html_page(status, code, tunnel_id=None):
    """The page (bytes) of an ingress error."""
    title, text = _TEXTS.get(code, _DEFAULT)
    if tunnel_id:
        text = _ID.sub(lambda _: tunnel_id, text)
    tunnel = f" &middot; tunnel <code>{html.escape(tunnel_id)}</code>" if tunnel_id else ""
    return _PAGE.format(status=status, title=html.escape(title, quote=False), text=html.escape(text, quote=False),
                        code=html.escape(code), tunnel=tunnel).encode()
