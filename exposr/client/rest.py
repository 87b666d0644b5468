"""The exposr client's REST calls (the public API's routes), over `twisted.web.client.Agent`.

Every method returns a Deferred. Failures are `ApiError(status, code, field)`;
`str(error)` is the one-line message the original client prints.
"""

import base64
import json
from urllib.parse import quote

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.error import TimeoutError
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from exposr import __version__
from exposr.client._tls import InsecurePolicy

USER_AGENT = f"exposr-cli/{__version__}"
TIMEOUT = 5.0

_MESSAGES = {
    "TUNNEL_NOT_FOUND": "Tunnel not found",
    "TUNNEL_NOT_CONNECTED": "Tunnel not connected",
    "TUNNEL_ALREADY_CONNECTED": "Tunnel already connected",
    "TUNNEL_HTTP_INGRESS_DISABLED": "HTTP ingress not enabled for tunnel",
    "TUNNEL_TRANSPORT_REQUEST_LIMIT": "Tunnel transport concurrent connection limit",
    "TUNNEL_TRANSPORT_CON_TIMEOUT": "Tunnel transport connection timeout",
    "TUNNEL_TARGET_CON_RESET": "Target connection refused",
    "TUNNEL_TARGET_CON_FAILED": "Target connection failed",
    "HTTP_INGRESS_REQUEST_LOOP": "Request loop at ingress",
    "UNKNOWN_ERROR": "Unknown server error",
    "AUTH_NO_TOKEN": "Access token missing",
    "PERMISSION_DENIED": "Permission denied",
    # client-side codes
    "ACCOUNT_REGISTRATION_DISABLED": "Account registration not enabled",
    "TIMEOUT": "Timeout",
    "NO_ACCOUNT": "No account was provided",
    "NO_TUNNEL": "No tunnel was provided",
    "NO_TUNNEL_ENDPOINT": "No tunnel endpoint available",
    "NO_TUNNEL_TARGET": "No target URL configured for tunnel",
}


class ApiError(Exception):
    """An API call failed: HTTP `status` (None if no response), error `code`, detail `field`."""

    def __init__(self, status, code, field=None):
        super().__init__(status, code, field)
        self.status = status
        self.code = code
        self.field = field

    @property
    def message(self):
        if self.code == "BAD_INPUT":
            return f"Bad input: {self.field}" if self.field else "Bad input"
        if self.code == "TUNNEL_INGRESS_BAD_ALT_NAMES":
            if self.field:
                return f"The altname {self.field} can not be configured for this tunnel"
            return "Ingress altname can not be configured"
        if self.code == "SERVER_UNREACHABLE":
            return f"Could not reach server: {self.field}"
        if self.code == "HTTP_ERROR":
            return f"Unexpected server response (HTTP {self.status})"
        return _MESSAGES.get(self.code, f"Unknown error ({self.code})")

    def __str__(self):
        return self.message


def account_token(account_id):
    """The API bearer token of an account: base64 of its canonical number."""
    canonical = account_id.replace("-", "").replace(" ", "").upper()
    return base64.b64encode(canonical.encode("ascii")).decode("ascii")


class ApiClient:
    """Calls of the public API for one server and (optionally) one account."""

    def __init__(self, reactor, server_url, account=None, insecure=False, timeout=TIMEOUT,
                 clock=None):
        self.reactor = reactor
        self.clock = clock or reactor
        self.base = server_url.rstrip("/")
        self.account = account
        self.token = None
        self.timeout = timeout
        policy = InsecurePolicy() if insecure else BrowserLikePolicyForHTTPS()
        self._agent = Agent(reactor, contextFactory=policy)

    # -- plumbing ---------------------------------------------------------------
    def _request(self, method, path, body=None, auth=False, ok=201):
        headers = Headers({"Accept": ["application/json, text/plain, */*"],
                           "User-Agent": [USER_AGENT]})
        producer = None
        if body is not None:
            headers.addRawHeader("Content-Type", "application/json")
            producer = _BytesProducer(json.dumps(body, separators=(",", ":")).encode())
        if auth:
            headers.addRawHeader("Authorization", f"Bearer {self.token}")
        url = (self.base + path).encode("ascii")

        d = self._agent.request(method.encode("ascii"), url, headers, producer)

        def got(response):
            return readBody(response).addCallback(lambda data: (response.code, data))

        d.addCallback(got)
        expired = []

        def expire():
            expired.append(True)
            d.cancel()

        timer = self.clock.callLater(self.timeout, expire)

        def settled(result):
            if timer.active():
                timer.cancel()
            if expired and isinstance(result, Failure):
                raise ApiError(None, "TIMEOUT")
            return result

        d.addBoth(settled)
        d.addCallbacks(lambda r: _decode(method, path, r, ok), _transport_error)
        return d

    def _need_account(self):
        if not self.account:
            raise ApiError(None, "NO_ACCOUNT")
        return self.account

    def _authed(self, method, path, body=None, ok=201):
        """Request with the account token, fetching one first if none is cached."""
        d = defer.succeed(self.token) if self.token else self.refresh_token()
        return d.addCallback(lambda _: self._request(method, path, body, auth=True, ok=ok))

    # -- account ------------------------------------------------------------------
    def create_account(self):
        """POST /v1/account -> ``{account_id, account_id_hr}``."""
        d = self._request("POST", "/v1/account", body={})

        def failed(f):
            f.trap(ApiError)
            if f.value.status == 404 and f.value.code == "HTTP_ERROR":
                raise ApiError(404, "ACCOUNT_REGISTRATION_DISABLED")
            return f

        return d.addErrback(failed)

    @defer.inlineCallbacks
    def refresh_token(self):
        """GET /v1/account/<account>/token; caches and returns the token."""
        account = self._need_account()
        res = yield self._request("GET", f"/v1/account/{quote(account, safe='')}/token")
        self.token = res["token"]
        return self.token

    # -- tunnels --------------------------------------------------------------------
    def _path(self, tunnel_id):
        if not tunnel_id:
            raise ApiError(None, "NO_TUNNEL")
        return f"/v1/tunnel/{quote(tunnel_id, safe='')}"

    def get_tunnel(self, tunnel_id):
        return defer.maybeDeferred(self._path, tunnel_id).addCallback(
            lambda p: self._authed("GET", p))

    def read_tunnel(self, tunnel_id):
        """Fresh read: GET token, then GET tunnel (what the client does before each WS)."""
        return defer.maybeDeferred(self.refresh_token).addCallback(
            lambda _: self.get_tunnel(tunnel_id))

    def put_tunnel(self, tunnel_id, body=None):
        return defer.maybeDeferred(self._path, tunnel_id).addCallback(
            lambda p: self._authed("PUT", p, {} if body is None else body))

    def patch_tunnel(self, tunnel_id, body):
        return defer.maybeDeferred(self._path, tunnel_id).addCallback(
            lambda p: self._authed("PATCH", p, body))

    def delete_tunnel(self, tunnel_id):
        return defer.maybeDeferred(self._path, tunnel_id).addCallback(
            lambda p: self._authed("DELETE", p, ok=204))

    def disconnect_tunnel(self, tunnel_id):
        """POST .../disconnect -> the ``result`` boolean."""
        d = defer.maybeDeferred(self._path, tunnel_id).addCallback(
            lambda p: self._authed("POST", p + "/disconnect", {}, ok=204))
        return d.addCallback(lambda res: bool((res or {}).get("result")))


def _decode(method, path, result, ok):
    status, data = result
    try:
        doc = json.loads(data) if data else None
    except ValueError:
        doc = None
    if status <= ok:
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        field = doc.get("field", doc.get("details"))
        if isinstance(field, list):
            field = ", ".join(map(str, field))
        raise ApiError(status, doc["error"], field)
    raise ApiError(status, "HTTP_ERROR")


def _transport_error(failure):
    if failure.check(ApiError):
        return failure
    if failure.check(defer.TimeoutError, TimeoutError, defer.CancelledError):
        raise ApiError(None, "TIMEOUT")
    reasons = getattr(failure.value, "reasons", None)  # ResponseNeverReceived/Failed
    if reasons:
        failure = reasons[0]
    message = failure.getErrorMessage()
    if failure.check(SSL.Error):
        message = f"TLS failure ({message}); --insecure skips certificate verification"
    raise ApiError(None, "SERVER_UNREACHABLE", message)


@implementer(IBodyProducer)
class _BytesProducer:
    def __init__(self, data):
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass
