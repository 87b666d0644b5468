"""The admin interface (``/ping``, ``/health``) and the admin API (``/v1/admin/...``).

* ``AdminInterface(readiness, metrics=None)``: ``/ping`` 200 once started,
  ``/health`` 200 while ready, ``/metrics`` the Prometheus text exposition of
  ``metrics`` (a ``prometheus_client`` registry; 404 without one), everything
  else 404. No key is asked for any of them.
* ``AdminAPI(config, accounts, tunnels, registry, nodes=None,
  ssh_fingerprint=None)``: the ``/v1/admin/...`` routes.
* ``admin_resource(interface=None, api=None)``: one resource routing by path,
  for both on one port (the original let the interface answer everything).
"""

import hmac

from klein import Klein
from twisted.logger import Logger
from twisted.web.resource import Resource

from exposr import access, clientaddr, model
from exposr.api.baseurl import request_base_url
from exposr.api.common import (
    app_resource,
    source_address,
    too_many,
    BadInput,
    authorization_credential,
    bad_input,
    handler,
    install_not_found,
    json_response,
    lenient_b64decode,
    parse_json_body,
    status_response,
    to_bool,
    transport_blocks,
)
from exposr.errors import InvalidCursor, StorageError, StorageUnavailable
from exposr.readiness import Readiness  # noqa: F401  (the admin interface reads it)
from exposr.tunnels import TunnelNotFound

log = Logger(namespace="exposr.api.admin")


class AdminInterface:
    def __init__(self, readiness, metrics=None):
        self.readiness = readiness
        self.metrics = metrics
        self.app = app = Klein()
        install_not_found(app)

        @app.route("/ping", methods=["GET"])
        def ping(request):
            return status_response(request, 200 if self.readiness.started else 404)

        @app.route("/health", methods=["GET"])
        def health(request):
            return status_response(request, 200 if self.readiness.ready else 404)

        @app.route("/metrics", methods=["GET"])
        def metrics(request):
            if self.metrics is None:
                return status_response(request, 404)
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            body = generate_latest(self.metrics)
            request.setResponseCode(200)
            request.responseHeaders.removeHeader(b"server")
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.setHeader(b"content-length", b"%d" % len(body))
            return body

    def resource(self):
        return app_resource(self.app)


def local_node_view(node, clock):
    """A ``nodes`` callable listing only this node (no cluster bus yet)."""

    def nodes():
        now = clock.seconds()
        return [
            {
                "node_id": node.id,
                "host": node.host,
                "ip": node.ip,
                "alive_at": model.iso_timestamp(now),
                "alive_age": 0,
                "is_stale": False,
            }
        ]

    return nodes


def _iso(ms):
    return model.iso_from_ms(ms)


class AdminAPI:
    def __init__(self, config, accounts, tunnels, registry, nodes=None, ssh_fingerprint=None, ssh_port=None,
                 limiter=None):
        self.ssh_port = ssh_port
        self.config = config
        self.accounts = accounts
        self.tunnels = tunnels
        self.registry = registry
        self.nodes = nodes if nodes is not None else (lambda: [])
        self.ssh_fingerprint = ssh_fingerprint
        key = config.admin_api_key or None
        self._key = key.encode("utf-8") if key else None
        # failed admin keys per client address (`exposr.ratelimit.FailureLimiter`)
        self.limiter = limiter
        self._trusted = clientaddr.parse_networks(config.ingress_http_trusted_proxies)
        self.app = app = Klein()
        install_not_found(app)
        route = app.route
        g = self._guard
        route("/v1/admin/account", methods=["POST"])(g(self.create_account))
        route("/v1/admin/account", methods=["GET"])(g(self.list_accounts))
        route("/v1/admin/account/<account_id>", methods=["GET"])(g(self.get_account))
        route("/v1/admin/account/<account_id>", methods=["DELETE"])(g(self.delete_account))
        route("/v1/admin/account/<account_id>/disable", methods=["PUT"])(g(self.disable_account))
        route("/v1/admin/tunnel", methods=["GET"])(g(self.list_tunnels))
        route("/v1/admin/tunnel/<tunnel_id>", methods=["GET"])(g(self.get_tunnel))
        route("/v1/admin/tunnel/<tunnel_id>", methods=["DELETE"])(g(self.delete_tunnel))
        route("/v1/admin/tunnel/<tunnel_id>/disconnect", methods=["POST"])(
            g(self.disconnect_tunnel)
        )
        route("/v1/admin/cluster", methods=["GET"])(g(self.cluster))

    def resource(self):
        return app_resource(self.app)

    # -- authentication (before validation) ------------------------------------

    def _authorized(self, request):
        """None when allowed, else the response bytes (404 no key / 403 bad key)."""
        if self._key is None:
            if self.config.admin_api_allow_access_without_key:
                return None
            return status_response(request, 404)
        source = source_address(request, self._trusted) if self.limiter is not None else None
        if source is not None and self.limiter.blocked(source):
            return too_many(request)
        presented = authorization_credential(request)
        if presented is not None:
            raw = request.getHeader(b"authorization").decode("latin-1").split(" ")[1]
            if hmac.compare_digest(lenient_b64decode(raw), self._key):
                return None
        if source is not None:
            self.limiter.failed(source)
        return status_response(request, 403)

    def _guard(self, fn):
        @handler
        def route(request, **kwargs):
            denied = self._authorized(request)
            if denied is not None:
                return denied
            return fn(request, **kwargs)

        route.__name__ = fn.__name__
        return route

    # -- representations ----------------------------------------------------------

    @staticmethod
    def account_props(account):
        out = {
            "account_id": account["id"],
            "account_id_hr": model.format_account_id(account["id"]),
            "tunnels": account["tunnels"],
            "status": account["status"],
        }
        for key in ("created_at", "updated_at"):
            if account.get(key):
                out[key] = account[key]
        return out

    def tunnel_props(self, tunnel, base):
        state = self.registry.state(tunnel["id"]) if self.registry is not None else {}
        connection = {"connected": bool(state.get("connected"))}
        for key in ("connected_at", "disconnected_at", "alive_at"):
            if state.get(key) is not None:
                connection[key] = _iso(state[key])
        connections = []
        for c in state.get("connections", []):
            entry = {
                "connection_id": c["connection_id"],
                "node_id": c["node"],
                "peer": c["peer"],
                "connected": c["connected"],
            }
            for key in ("connected_at", "disconnected_at", "alive_at"):
                if c.get(key) is not None:
                    entry[key] = _iso(c[key])
            connections.append(entry)
        transport = {
            "token": tunnel["transport"].get("token"),
            "max_connections": self.config.transport_max_connections,
        }
        transport.update(transport_blocks(self.config, tunnel, base, self.ssh_fingerprint, self.ssh_port))
        out = {
            "tunnel_id": tunnel["id"],
            "account_id": tunnel.get("account"),
            "connection": connection,
            "connections": connections,
            "transport": transport,
            "ingress": tunnel["ingress"],
            "target": tunnel.get("target") or {},
        }
        rules = access.public_view(tunnel)
        if rules:  # beyond the original: shown only when the tunnel has rules
            out["access"] = rules
        for key in ("created_at", "updated_at"):
            if tunnel.get(key):
                out[key] = tunnel[key]
        return out

    # -- query validation -------------------------------------------------------------

    @staticmethod
    def _list_query(request):
        """``(cursor, count, verbose)`` from the query string; raises BadInput."""
        args = {}
        for raw_key, values in (request.args or {}).items():
            key = raw_key.decode("utf-8", "replace")
            value = values[-1].decode("utf-8", "replace") if values else ""
            args[key] = value
        for key in args:
            if key not in ("cursor", "count", "verbose"):
                raise BadInput('"%s" is not allowed' % (key,))
        cursor = args.get("cursor") or None
        count = 25
        if "count" in args:
            text = args["count"].strip()
            try:
                count = int(text)
            except ValueError:
                raise BadInput('"count" must be a number')
            if count < 1:
                raise BadInput('"count" must be greater than or equal to 1')
            if count > 100:
                raise BadInput('"count" must be less than or equal to 100')
        verbose = False
        if "verbose" in args:
            verbose = to_bool(args["verbose"], "verbose")
        return cursor, count, verbose

    # -- accounts ---------------------------------------------------------------------

    async def create_account(self, request):
        account = await self.accounts.create()
        if account is None:
            return status_response(request, 503)
        return json_response(request, 201, self.account_props(account))

    async def list_accounts(self, request):
        try:
            cursor, count, verbose = self._list_query(request)
        except BadInput as e:
            return bad_input(request, e.field)
        try:
            next_cursor, accounts = await self.accounts.list(cursor, count, verbose)
        except InvalidCursor:
            return bad_input(request, '"cursor" is not a valid cursor')
        return json_response(request, 200, {"cursor": next_cursor, "accounts": accounts})

    async def get_account(self, request, account_id):
        account = await self.accounts.get(account_id)
        if account is None:
            return json_response(request, 404, {})
        return json_response(request, 200, self.account_props(account))

    async def delete_account(self, request, account_id):
        try:
            deleted = await self.tunnels.delete_account(account_id)
        except StorageUnavailable:
            raise
        except Exception:
            log.error("Could not delete an account: {error}", error=model.describe_error())
            return json_response(request, 500, {})
        if not deleted:
            return json_response(request, 404, {})
        return status_response(request, 204)

    async def disable_account(self, request, account_id):
        try:
            body = parse_json_body(request)
            if not isinstance(body, dict):
                raise BadInput('"value" must be of type object')
            if "disable" not in body:
                raise BadInput('"disable" is required')
            disable = to_bool(body["disable"], "disable")
            reason = body.get("reason")
            if reason is not None:
                if not isinstance(reason, str):
                    raise BadInput('"reason" must be a string')
                if reason == "":
                    raise BadInput('"reason" is not allowed to be empty')
                if len(reason) > 256:
                    raise BadInput(
                        '"reason" length must be less than or equal to 256 characters long'
                    )
            for key in body:
                if key not in ("disable", "reason"):
                    raise BadInput('"%s" is not allowed' % (key,))
        except BadInput as e:
            return bad_input(request, e.field)
        account = await self.tunnels.set_account_disabled(account_id, disable, reason)
        if account is None:
            return status_response(request, 404)
        return json_response(request, 200, self.account_props(account))

    # -- tunnels ----------------------------------------------------------------------

    def _tunnel_id_error(self, request, tunnel_id):
        if model.is_valid_tunnel_id(tunnel_id):
            return None
        return bad_input(request, model.tunnel_id_error(tunnel_id))

    async def list_tunnels(self, request):
        try:
            cursor, count, verbose = self._list_query(request)
        except BadInput as e:
            return bad_input(request, e.field)
        try:
            next_cursor, tunnels = await self.tunnels.list(cursor, count, verbose)
        except InvalidCursor:
            return bad_input(request, '"cursor" is not a valid cursor')
        if verbose:
            base = request_base_url(request)
            tunnels = [self.tunnel_props(t, base) for t in tunnels]
        return json_response(request, 200, {"cursor": next_cursor, "tunnels": tunnels})

    async def get_tunnel(self, request, tunnel_id):
        error = self._tunnel_id_error(request, tunnel_id)
        if error is not None:
            return error
        try:
            tunnel = await self.tunnels.get(tunnel_id)
        except StorageUnavailable:
            raise
        except StorageError as e:
            return json_response(
                request, 500, {"error": "TUNNEL_NOT_FOUND", "details": e.__class__.__name__}
            )
        if tunnel is None:
            return json_response(request, 404, {"error": "TUNNEL_NOT_FOUND"})
        return json_response(request, 200, self.tunnel_props(tunnel, request_base_url(request)))

    async def delete_tunnel(self, request, tunnel_id):
        error = self._tunnel_id_error(request, tunnel_id)
        if error is not None:
            return error
        try:
            deleted = await self.tunnels.delete(tunnel_id)
        except StorageUnavailable:
            raise
        except Exception as e:
            return json_response(request, 403, {"error": "UNKNOWN_ERROR", "details": str(e)})
        if not deleted:
            return status_response(request, 403)
        return status_response(request, 204)

    async def disconnect_tunnel(self, request, tunnel_id):
        error = self._tunnel_id_error(request, tunnel_id)
        if error is not None:
            return error
        try:
            result = await self.tunnels.disconnect(tunnel_id)
        except TunnelNotFound as e:
            return json_response(request, 403, {"details": str(e)})
        return json_response(request, 200, {"result": bool(result)})

    # -- cluster ----------------------------------------------------------------------

    def cluster(self, request):
        return json_response(request, 200, {"nodes": list(self.nodes())})


class _PathRouter(Resource):
    """Routes ``/ping``, ``/health`` and ``/metrics`` to the interface, the rest to the API."""

    isLeaf = True

    def __init__(self, interface, api):
        Resource.__init__(self)
        self._interface = interface.resource() if interface is not None else None
        self._api = api.resource() if api is not None else None

    def render(self, request):
        path = request.path.split(b"?", 1)[0]
        if path in (b"/ping", b"/health", b"/metrics"):
            target = self._interface
        else:
            target = self._api
        if target is None:
            return status_response(request, 404)
        return target.render(request)


def admin_resource(interface=None, api=None):
    """
    One resource for the admin port: ``interface`` (`AdminInterface`) answers
    ``/ping``, ``/health`` and ``/metrics``, ``api`` (`AdminAPI`) everything else; either
    may be None (disabled), which answers 404.
    """
    return _PathRouter(interface, api)
