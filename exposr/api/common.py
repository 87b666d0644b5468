"""What the public and admin APIs share: responses, body parsing, the
Joi-like validation (``BAD_INPUT``, see docs/protocol.rst, "Validation"), tokens in
``Authorization``, the transport blocks of tunnel JSON."""

import base64
import binascii
import functools
import json
import re
from http import HTTPStatus
from urllib.parse import quote

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from werkzeug.exceptions import HTTPException

from exposr import access, clientaddr, httpauth
from exposr.errors import StorageUnavailable
from exposr.model import describe_error

log = Logger(namespace="exposr.api")

MAX_BODY = 64 * 1024


# -- responses ---------------------------------------------------------------


def _prepare(request, code):
    request.setResponseCode(code)
    request.responseHeaders.removeHeader(b"server")


def json_body(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def json_response(request, code, obj):
    body = json_body(obj)
    _prepare(request, code)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % (len(body),))
    return body


def status_response(request, code):
    """A status-only answer: the reason phrase as text (204: nothing)."""
    _prepare(request, code)
    if code == 204:
        return b""
    try:
        body = HTTPStatus(code).phrase.encode("ascii")
    except ValueError:
        body = b""
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % (len(body),))
    return body


def bad_input(request, field):
    return json_response(request, 400, {"error": "BAD_INPUT", "field": field})


def handler(fn):
    """
    Wrap a route handler (``async def`` or returning a Deferred): never a
    traceback to the client. `StorageUnavailable` → 503 JSON, anything else
    unexpected → 500 JSON, logged.
    """

    @functools.wraps(fn)
    def wrapper(request, *args, **kwargs):
        d = defer.maybeDeferred(fn, request, *args, **kwargs)

        def failed(failure):
            if failure.check(defer.CancelledError):
                return failure
            if failure.check(StorageUnavailable):
                log.warn("Storage unavailable: {error}", error=failure.getErrorMessage())
                return json_response(
                    request, 503, {"error": "UNKNOWN_ERROR", "details": "storage_unavailable"}
                )
            log.error("Unhandled error in API handler: {error}", error=describe_error(failure))
            return json_response(request, 500, {"error": "UNKNOWN_ERROR"})

        return d.addErrback(failed)

    return wrapper


class SafeResource(Resource):
    """
    Serves a klein app's resource; a path that is not UTF-8 (which klein
    would answer with an HTML 400 and a logged error) is a plain 404.
    """

    isLeaf = True

    def __init__(self, inner):
        Resource.__init__(self)
        self._inner = inner

    def render(self, request):
        try:
            b"/".join(request.prepath + request.postpath).decode("utf-8")
        except UnicodeDecodeError:
            return status_response(request, 404)
        # Routing never depends on the host; the handlers derive it from the
        # headers themselves. Hide it from klein/werkzeug, which answer a
        # host they cannot IDNA-encode with an exception.
        request.getRequestHostname = lambda: b"localhost"
        return self._inner.render(request)


def app_resource(app):
    return SafeResource(app.resource())


def install_not_found(app):
    """Unknown path or method → 404 ``Not Found`` (text), as the original (no 405)."""

    @app.handle_errors(HTTPException)
    def not_found(request, failure):
        return status_response(request, 404)


# -- bodies ------------------------------------------------------------------


class BadInput(Exception):
    """A validation failure; ``field`` is the BAD_INPUT message."""

    def __init__(self, field):
        Exception.__init__(self, field)
        self.field = field


def _is_json_type(request):
    raw = request.getHeader(b"content-type")
    if not raw:
        return False
    mime = raw.split(b";", 1)[0].strip().lower()
    if mime == b"application/json":
        return True
    return mime.startswith(b"application/") and mime.endswith(b"+json") and len(mime) > 17


def _reject_constant(name):
    raise ValueError("Unexpected token %s in JSON" % (name[0],))


def parse_json_body(request):
    """
    The JSON object/array of a request body (koa-bodyparser, strict).
    Raises `BadInput` with the ``content-type: ...`` messages (not JSON,
    malformed, over 64 KiB).
    """
    content = request.content
    if content is not None:
        content.seek(0)
        raw = content.read(MAX_BODY + 1)
    else:
        raw = b""
    if len(raw) > MAX_BODY:
        raise BadInput("content-type: request entity too large")
    if not _is_json_type(request):
        raise BadInput("content-type: expected json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput("content-type: invalid utf-8 in JSON body")
    if text.startswith("\ufeff"):
        text = text[1:]
    text = text.strip(" \t\r\n")
    if not text:
        return {}
    if text[0] not in "{[":
        raise BadInput("content-type: invalid JSON, only supports object and array")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        if e.pos >= len(text):
            raise BadInput("content-type: Unexpected end of JSON input")
        raise BadInput(
            "content-type: Unexpected token %s in JSON at position %d" % (text[e.pos], e.pos)
        )
    except (ValueError, RecursionError) as e:
        raise BadInput("content-type: %s" % (str(e) or "invalid JSON",))


# -- validation (Joi-like messages) -------------------------------------------


def _label(path):
    return '"%s"' % (path,)


def check_object(value, path, allowed):
    """A dict with only ``allowed`` keys (unknown keys are reported after known ones)."""
    if not isinstance(value, dict):
        raise BadInput("%s must be of type object" % (_label(path),))
    return value


def reject_unknown(value, path, allowed):
    for key in value:
        if key not in allowed:
            full = "%s.%s" % (path, key) if path != "value" and path else key
            raise BadInput("%s is not allowed" % (_label(full),))


def to_bool(value, path):
    """Booleans, or the strings ``true``/``false`` in any case."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.lower()
        if low == "true":
            return True
        if low == "false":
            return False
    raise BadInput("%s must be a boolean" % (_label(path),))


_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?")
_TLD_RE = re.compile(r"[a-z](?:[a-z0-9\-]*[a-z0-9])?")


def is_valid_domain(name):
    """A syntactically valid domain name of at least two labels.

    Any top-level domain that is a name (not all digits, so never an IPv4
    address) is accepted: private ones too (``.test``, ``.internal``,
    ``.lan``, ``.home.arpa``, ``.localhost``). Ownership of an alt name is
    proven by its CNAME, not by its top-level domain.
    """
    if not isinstance(name, str) or not name or len(name) > 256:
        return False
    try:
        ascii_name = name.encode("idna").decode("ascii").lower() if not name.isascii() else name.lower()
    except UnicodeError:
        return False
    labels = ascii_name.split(".")
    if len(labels) < 2:
        return False
    for label in labels:
        if not label or len(label) > 63 or not _LABEL_RE.fullmatch(label):
            return False
    tld = labels[-1]
    return bool(_TLD_RE.fullmatch(tld))


_UNRESERVED = r"A-Za-z0-9\-._~"
_SUBDELIMS = r"!$&'()*+,;="
_PCT = r"%[0-9A-Fa-f]{2}"
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+\-.]*):(.*)", re.S)
_PATH_RE = re.compile(r"(?:[%s%s:@/]|%s)*" % (_UNRESERVED, _SUBDELIMS, _PCT))
_QUERY_RE = re.compile(r"(?:[%s%s:@/?]|%s)*" % (_UNRESERVED, _SUBDELIMS, _PCT))
_USERINFO_RE = re.compile(r"(?:[%s%s:]|%s)*" % (_UNRESERVED, _SUBDELIMS, _PCT))
_REGNAME_RE = re.compile(r"(?:[%s%s]|%s)*" % (_UNRESERVED, _SUBDELIMS, _PCT))
_IPFUTURE_RE = re.compile(r"v[0-9A-Fa-f]+\.[%s%s:]+" % (_UNRESERVED, _SUBDELIMS))


def _valid_ipv6(text):
    import ipaddress

    addr, _, zone = text.partition("%25")
    try:
        ipaddress.IPv6Address(addr)
    except ValueError:
        return False
    return not zone or re.fullmatch(r"(?:[%s]|%s)+" % (_UNRESERVED, _PCT), zone) is not None


def is_valid_uri(value):
    """An RFC 3986 URI with a scheme."""
    m = _SCHEME_RE.fullmatch(value)
    if m is None:
        return False
    rest = m.group(2)
    rest, hsep, fragment = rest.partition("#")
    if hsep and not _QUERY_RE.fullmatch(fragment):
        return False
    rest, qsep, query = rest.partition("?")
    if qsep and not _QUERY_RE.fullmatch(query):
        return False
    if rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        path = slash + path
        if "@" in authority:
            userinfo, _, hostport = authority.rpartition("@")
            if not _USERINFO_RE.fullmatch(userinfo):
                return False
        else:
            hostport = authority
        if hostport.startswith("["):
            end = hostport.find("]")
            if end < 0:
                return False
            literal, after = hostport[1:end], hostport[end + 1:]
            if not (_valid_ipv6(literal) or _IPFUTURE_RE.fullmatch(literal)):
                return False
            if after and not re.fullmatch(r":[0-9]*", after):
                return False
        else:
            host, _, port = hostport.partition(":")
            if not _REGNAME_RE.fullmatch(host) or not re.fullmatch(r"[0-9]*", port):
                return False
        return bool(_PATH_RE.fullmatch(path))
    return bool(_PATH_RE.fullmatch(rest))


def validate_tunnel_body(body):
    """
    The PUT/PATCH tunnel body (every key optional, unknown keys refused),
    converted (booleans, lower-cased alt names). Raises `BadInput` with the first violation.
    """
    check_object(body, "value", None)
    out = {}
    if "ingress" in body:
        ingress = check_object(body["ingress"], "ingress", None)
        out["ingress"] = {}
        if "http" in ingress:
            http = check_object(ingress["http"], "ingress.http", None)
            res = out["ingress"]["http"] = {}
            if "enabled" in http:
                res["enabled"] = to_bool(http["enabled"], "ingress.http.enabled")
            if "alt_names" in http:
                res["alt_names"] = _alt_names(http["alt_names"], "ingress.http.alt_names")
            reject_unknown(http, "ingress.http", ("enabled", "alt_names"))
        if "sni" in ingress:
            sni = check_object(ingress["sni"], "ingress.sni", None)
            res = out["ingress"]["sni"] = {}
            if "enabled" in sni:
                res["enabled"] = to_bool(sni["enabled"], "ingress.sni.enabled")
            if "passthrough" in sni:
                res["passthrough"] = to_bool(sni["passthrough"], "ingress.sni.passthrough")
            reject_unknown(sni, "ingress.sni", ("enabled", "passthrough"))
        reject_unknown(ingress, "ingress", ("http", "sni"))
    if "target" in body:
        target = check_object(body["target"], "target", None)
        out["target"] = {}
        if "url" in target:
            out["target"]["url"] = _uri(target["url"], "target.url")
        reject_unknown(target, "target", ("url",))
    if "transport" in body:
        transport = check_object(body["transport"], "transport", None)
        out["transport"] = {}
        for kind in ("ws", "ssh"):
            if kind in transport:
                path = "transport.%s" % (kind,)
                flags = check_object(transport[kind], path, None)
                res = out["transport"][kind] = {}
                if "enabled" in flags:
                    res["enabled"] = to_bool(flags["enabled"], path + ".enabled")
                reject_unknown(flags, path, ("enabled",))
        reject_unknown(transport, "transport", ("ws", "ssh"))
    if "access" in body:
        rules = check_object(body["access"], "access", None)
        out["access"] = {}
        if "allow" in rules:
            out["access"]["allow"] = _allow_list(rules["allow"], "access.allow")
        if "http_auth" in rules:
            out["access"]["http_auth"] = _http_auth(rules["http_auth"], "access.http_auth")
        reject_unknown(rules, "access", ("allow", "http_auth"))
    reject_unknown(body, "", ("ingress", "target", "transport", "access"))
    return out


def _http_auth(value, path):
    """``{"user", "password"}`` (checked, not yet hashed); None removes basic auth."""
    if value is None:
        return None
    auth = check_object(value, path, None)
    reject_unknown(auth, path, ("user", "password"))
    for key, valid, rule in (("user", httpauth.valid_user, "1 to %d characters, no colon" % httpauth.MAX_USER),
                             ("password", httpauth.valid_password, "1 to %d bytes" % httpauth.MAX_PASSWORD)):
        item = auth.get(key)
        if not isinstance(item, str):
            raise BadInput("%s must be a string" % (_label(path + "." + key),))
        if not valid(item):
            raise BadInput("%s must be %s" % (_label(path + "." + key), rule))
    return {"user": auth["user"], "password": auth["password"]}


def _allow_list(value, path):
    """A list of CIDRs (IPv4, IPv6), normalised; None or [] clears the list."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise BadInput("%s must be an array" % (_label(path),))
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise BadInput("%s must be a string" % (_label("%s[%d]" % (path, i)),))
    try:
        nets = access.normalise_allow(value)
    except ValueError as e:
        raise BadInput("%s must be a valid CIDR" % (_label("%s[%d]" % (path, e.args[0])),))
    if len(nets) > access.MAX_ENTRIES:
        raise BadInput("%s must contain less than or equal to %d items" % (_label(path), access.MAX_ENTRIES))
    return nets


def _alt_names(value, path):
    if value is None:
        return None
    if not isinstance(value, list):
        raise BadInput("%s must be an array" % (_label(path),))
    names = []
    for i, item in enumerate(value):
        ipath = "%s[%d]" % (path, i)
        if not isinstance(item, str):
            raise BadInput("%s must be a string" % (_label(ipath),))
        if item == "":
            raise BadInput("%s is not allowed to be empty" % (_label(ipath),))
        item = item.lower()
        if not is_valid_domain(item):
            raise BadInput("%s must contain a valid domain name" % (_label(ipath),))
        names.append(item)
    if len(names) > 10:
        raise BadInput("%s must contain less than or equal to 10 items" % (_label(path),))
    return names


def _uri(value, path):
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadInput("%s must be a string" % (_label(path),))
    if value == "":
        raise BadInput("%s is not allowed to be empty" % (_label(path),))
    if not is_valid_uri(value):
        raise BadInput("%s must be a valid uri" % (_label(path),))
    return value


# -- Authorization -------------------------------------------------------------


def authorization_credential(request):
    """
    The base64-decoded second word of ``Authorization`` as text, or None when
    there is none (or it decodes to nothing). Decoding is lenient like
    Node's: url-safe alphabet accepted, other characters skipped.
    """
    raw = request.getHeader(b"authorization")
    if raw is None:
        return None
    words = raw.decode("latin-1").split(" ")
    if len(words) < 2 or not words[1]:
        return None
    data = lenient_b64decode(words[1])
    if not data:
        return None
    return data.decode("utf-8", "replace")


def lenient_b64decode(text):
    text = text.split("=", 1)[0]
    chars = "".join(ch for ch in text if ch.isascii() and (ch.isalnum() or ch in "+/-_"))
    chars = chars.replace("-", "+").replace("_", "/")
    if len(chars) % 4 == 1:
        chars = chars[:-1]
    chars += "=" * (-len(chars) % 4)
    try:
        return base64.b64decode(chars)
    except (binascii.Error, ValueError):
        return b""


# -- tunnel JSON pieces ----------------------------------------------------------


def ssh_endpoint(config, base, ssh_port=None):
    """``(host, port)`` advertised for SSH, host None if unknown: host and port
    of ``--transport-ssh-host`` when given, else the base URL's host and the
    SSH port.

    ``ssh_port()`` gives the bound port when the configured one is 0."""
    host, port = None, config.transport_ssh_port
    if port == 0 and ssh_port is not None:
        port = ssh_port()
    if config.transport_ssh_host:
        from exposr.api.baseurl import split_host_port

        value = config.transport_ssh_host
        if "://" in value:
            value = value.split("://", 1)[1].split("/", 1)[0]
        try:
            host, port_text = split_host_port(value)
            if port_text:
                port = int(port_text)
        except ValueError:
            host = value
    if host is None and base is not None:
        host = base.host
    return host, port


def transport_blocks(config, tunnel, base, ssh_fingerprint=None, ssh_port=None):
    """The ``ws`` and ``ssh`` objects of tunnel JSON (those enabled on the server)."""
    tunnel_id = tunnel["id"]
    token = tunnel["transport"].get("token") or ""
    out = {}
    if base is None:
        return out
    if config.ws_transport_enabled:
        scheme = "wss" if base.scheme == "https" else "ws"
        url = "%s/v1/tunnel/%s/ws-endpoint?t=%s" % (
            base.url(scheme),
            quote(tunnel_id, safe=""),
            quote(token, safe=""),
        )
        out["ws"] = {"enabled": bool(tunnel["transport"]["ws"].get("enabled")), "url": url}
    if config.ssh_transport_enabled:
        host, port = ssh_endpoint(config, base, ssh_port)
        ssh = {
            "enabled": bool(tunnel["transport"]["ssh"].get("enabled")),
            "host": host,
            "port": port,
            "username": tunnel_id,
            "password": token,
            "url": "ssh://%s:%s@%s:%d" % (tunnel_id, token, host, port),
        }
        fingerprint = ssh_fingerprint() if ssh_fingerprint is not None else None
        if fingerprint:
            ssh["fingerprint"] = fingerprint
        out["ssh"] = ssh
    return out


def source_address(request, trusted):
    """The client's address of an API request (``trusted``: networks of trusted proxies)."""
    peer = getattr(request.getClientAddress(), "host", "") or ""
    return clientaddr.client_ip(peer, request.getHeader(b"x-forwarded-for"), trusted) or peer


def too_many(request):
    """429: too many failed attempts from this address."""
    request.setHeader(b"retry-after", b"1")
    return json_response(request, 429, {"error": "TOO_MANY_REQUESTS"})
