"""The public REST API: accounts, tokens and tunnels, as a klein app.

``PublicAPI(config, accounts, tunnels, registry, ssh_fingerprint=None)``;
``.resource()`` is the IResource to serve; ``.claims(request)`` tells the
shared listener whether the request is for the API (``--api-url`` host check).
"""

from klein import Klein
from twisted.logger import Logger

from exposr import access, clientaddr, model
from exposr.api.baseurl import request_base_url, url_host
from exposr.api.common import (
    app_resource,
    source_address,
    too_many,
    BadInput,
    bad_input,
    handler,
    install_not_found,
    json_response,
    parse_json_body,
    status_response,
    transport_blocks,
    authorization_credential,
    validate_tunnel_body,
)
from exposr.errors import StorageUnavailable
from exposr.tunnels import (
    BadAltNames,
    IngressAdministrativelyDisabled,
    PermissionDenied,
    TunnelNotFound,
)

log = Logger(namespace="exposr.api.public")


class PublicAPI:
    def __init__(self, config, accounts, tunnels, registry, ssh_fingerprint=None, ssh_port=None,
                 limiter=None):
        self.config = config
        # failed account numbers per client address (`exposr.ratelimit.FailureLimiter`)
        self.limiter = limiter
        self._trusted = clientaddr.parse_networks(config.ingress_http_trusted_proxies)
        self.ssh_port = ssh_port
        self.accounts = accounts
        self.tunnels = tunnels
        self.registry = registry
        self.ssh_fingerprint = ssh_fingerprint
        self._api_host = url_host(config.api_url) if config.api_url else None
        self.app = app = Klein()
        install_not_found(app)
        route = app.route
        route("/v1/account", methods=["POST"])(self._guard(self.create_account))
        route("/v1/account/<account_id>/token", methods=["GET"])(self._guard(self.get_token))
        route("/v1/tunnel/<tunnel_id>", methods=["PUT"])(self._guard(self.put_tunnel))
        route("/v1/tunnel/<tunnel_id>", methods=["PATCH"])(self._guard(self.patch_tunnel))
        route("/v1/tunnel/<tunnel_id>", methods=["GET"])(self._guard(self.get_tunnel))
        route("/v1/tunnel/<tunnel_id>", methods=["DELETE"])(self._guard(self.delete_tunnel))
        route("/v1/tunnel/<tunnel_id>/disconnect", methods=["POST"])(
            self._guard(self.disconnect_tunnel)
        )

    def resource(self):
        return app_resource(self.app)

    def claims(self, request):
        """True when this request is for the API (its base URL host is ``--api-url``'s, if set)."""
        if self._api_host is None:
            return True
        base = request_base_url(request)
        return base is not None and base.hostport == self._api_host

    def _guard(self, fn):
        """Common pre-checks: base URL derivable (else 400, empty), API host."""

        @handler
        def route(request, **kwargs):
            base = request_base_url(request)
            if base is None:
                request.setResponseCode(400)
                request.responseHeaders.removeHeader(b"server")
                request.setHeader(b"content-length", b"0")
                return b""
            if self._api_host is not None and base.hostport != self._api_host:
                return status_response(request, 404)
            return fn(request, base, **kwargs)

        route.__name__ = fn.__name__
        return route

    # -- helpers -------------------------------------------------------------

    async def _account(self, request):
        """The authenticated account, or a response (401) as bytes."""
        credential = authorization_credential(request)
        if not credential:
            return None, json_response(request, 401, {"error": "AUTH_NO_TOKEN"})
        if self._blocked(request):
            return None, too_many(request)
        account = await self.accounts.get(credential)
        if account is None or _disabled(account):
            self._failed(request)
            return None, json_response(request, 401, {"error": "PERMISSION_DENIED"})
        return account, None

    def _blocked(self, request):
        """True when failures are limited and the client's address has none left."""
        limiter = self.limiter
        # (the address is worked out only when some address failed recently)
        if limiter is None or not limiter.tracking:
            return False
        return limiter.blocked(source_address(request, self._trusted))

    def _failed(self, request):
        """Count a failed attempt of the client's address (when failures are limited)."""
        if self.limiter is not None:
            self.limiter.failed(source_address(request, self._trusted))

    def tunnel_info(self, tunnel, base):
        """The public tunnel representation (``GET /v1/tunnel/<id>``)."""
        state = self.registry.state(tunnel["id"]) if self.registry is not None else {}
        connection = {
            "connected": bool(state.get("connected")),
            "connections": state.get("alive_connections", 0),
        }
        for key in ("connected_at", "disconnected_at", "alive_at"):
            if state.get(key) is not None:
                connection[key] = state[key]
        transport = {"max_connections": self.config.transport_max_connections}
        transport.update(transport_blocks(self.config, tunnel, base, self.ssh_fingerprint, self.ssh_port))
        ingress = tunnel.get("ingress", {})
        http = ingress.get("http", {})
        sni = ingress.get("sni", {})
        out = {
            "id": tunnel["id"],
            "connection": connection,
            "transport": transport,
            "ingress": {
                "http": http if http.get("enabled") else {},
                "sni": sni if sni.get("enabled") else {},
            },
            "target": tunnel.get("target") or {},
        }
        rules = access.public_view(tunnel)
        if rules:  # beyond the original: shown only when the tunnel has rules
            out["access"] = rules
        if tunnel.get("created_at"):
            out["created_at"] = tunnel["created_at"]
        return out

    def _tunnel_id_error(self, request, tunnel_id):
        if model.is_valid_tunnel_id(tunnel_id):
            return None
        return bad_input(request, model.tunnel_id_error(tunnel_id))

    async def _apply(self, request, base, tunnel_id, account, changes, missing_code):
        try:
            tunnel = await self.tunnels.update_config(tunnel_id, account["id"], changes)
        except PermissionDenied:
            return json_response(request, 403, {"error": "PERMISSION_DENIED"})
        except TunnelNotFound:
            if missing_code == 404:
                return json_response(request, 404, {"error": "TUNNEL_NOT_FOUND"})
            return json_response(request, 403, {"error": "PERMISSION_DENIED"})
        except BadAltNames as e:
            return json_response(
                request, 400, {"error": "TUNNEL_INGRESS_BAD_ALT_NAMES", "field": str(e)}
            )
        except IngressAdministrativelyDisabled:
            return json_response(
                request,
                500,
                {"error": "UNKNOWN_ERROR", "detailed": "ingress_administratively_disabled"},
            )
        except StorageUnavailable:
            raise
        except Exception:
            log.error("Could not update tunnel {tunnel_id}: {error}", tunnel_id=tunnel_id,
                      error=model.describe_error())
            return json_response(
                request, 500, {"error": "UNKNOWN_ERROR", "detailed": "could_not_update_tunnel"}
            )
        return json_response(request, 200, self.tunnel_info(tunnel, base))

    def _parse_update(self, request, tunnel_id):
        """Body, then path, then schema (before authentication): (changes, error)."""
        try:
            body = parse_json_body(request)
        except BadInput as e:
            return None, bad_input(request, e.field)
        error = self._tunnel_id_error(request, tunnel_id)
        if error is not None:
            return None, error
        try:
            return validate_tunnel_body(body), None
        except BadInput as e:
            return None, bad_input(request, e.field)

    async def _tunnel_caller(self, request, tunnel_id):
        """Path check (before authentication, as the original), then the caller's account."""
        error = self._tunnel_id_error(request, tunnel_id)
        if error is not None:
            return None, error
        return await self._account(request)

    async def _update_caller(self, request, tunnel_id):
        """The checked changes of a PUT/PATCH body (before authentication), then the caller's account."""
        changes, error = self._parse_update(request, tunnel_id)
        if error is not None:
            return None, None, error
        account, error = await self._account(request)
        return changes, account, error

    # -- routes --------------------------------------------------------------

    async def create_account(self, request, base):
        if not self.config.allow_registration:
            return status_response(request, 404)
        account = await self.accounts.create()
        if account is None:
            return status_response(request, 503)
        return json_response(
            request,
            201,
            {"account_id": account["id"], "account_id_hr": model.format_account_id(account["id"])},
        )

    async def get_token(self, request, base, account_id):
        if self._blocked(request):
            return too_many(request)
        account = await self.accounts.get(account_id)
        if account is None or _disabled(account):
            self._failed(request)
            return json_response(request, 403, {"error": "PERMISSION_DENIED"})
        return json_response(request, 201, {"token": model.account_token(account["id"])})

    async def put_tunnel(self, request, base, tunnel_id):
        changes, account, error = await self._update_caller(request, tunnel_id)
        if error is not None:
            return error
        tunnel = await self.tunnels.get(tunnel_id)
        if tunnel is None:
            if not model.is_valid_new_tunnel_id(tunnel_id):
                # longer than a DNS label: refused as any bad id
                return bad_input(request, model.tunnel_id_error(tunnel_id))
            # the record just created is ours; when creating failed (the id
            # was taken meanwhile), the record read back decides
            tunnel = await self.tunnels.create(tunnel_id, account["id"])
            if tunnel is None:
                tunnel = await self.tunnels.get(tunnel_id)
        if tunnel is None or tunnel.get("account") != account["id"]:
            return json_response(request, 403, {"error": "PERMISSION_DENIED"})
        return await self._apply(request, base, tunnel_id, account, changes, 403)

    async def patch_tunnel(self, request, base, tunnel_id):
        changes, account, error = await self._update_caller(request, tunnel_id)
        if error is not None:
            return error
        return await self._apply(request, base, tunnel_id, account, changes, 404)

    async def get_tunnel(self, request, base, tunnel_id):
        account, error = await self._tunnel_caller(request, tunnel_id)
        if error is not None:
            return error
        tunnel = await self.tunnels.get_owned(tunnel_id, account["id"])
        if tunnel is None:
            return json_response(request, 404, {"error": "TUNNEL_NOT_FOUND"})
        return json_response(request, 200, self.tunnel_info(tunnel, base))

    async def delete_tunnel(self, request, base, tunnel_id):
        account, error = await self._tunnel_caller(request, tunnel_id)
        if error is not None:
            return error
        try:
            deleted = await self.tunnels.delete(tunnel_id, account["id"])
        except (TunnelNotFound, PermissionDenied):
            deleted = False
        if not deleted:
            return json_response(request, 404, {"error": "TUNNEL_NOT_FOUND"})
        return status_response(request, 204)

    async def disconnect_tunnel(self, request, base, tunnel_id):
        account, error = await self._tunnel_caller(request, tunnel_id)
        if error is not None:
            return error
        try:
            result = await self.tunnels.disconnect(tunnel_id, account["id"])
        except TunnelNotFound:
            return json_response(request, 404, {"error": "TUNNEL_NOT_FOUND"})
        return json_response(request, 200, {"result": bool(result)})


def _disabled(account):
    """A disabled account gets the answers of an unknown one.

    The original refuses only its tunnel connections; here it can no longer
    fetch a token or manage tunnels either, and the exposr client handles
    these answers as for a wrong account number.
    """
    return bool((account.get("status") or {}).get("disabled"))
