"""The tunnel service: create, read, update, delete,
disconnect, authorize, rotate the connection token, list.

Tokens are secrets: they never appear in log lines.
"""

import os

from twisted.internet import defer
from twisted.logger import Logger

from exposr import httpauth, model
from exposr.storage.base import NotFound, list_page

log = Logger(namespace="exposr.tunnels")

NS = "tunnel"


class TunnelError(Exception):
    """A tunnel operation was refused."""


class TunnelNotFound(TunnelError):
    """The tunnel does not exist (``no_such_tunnel``)."""

    def __str__(self):
        return "no_such_tunnel"


class PermissionDenied(TunnelError):
    """The tunnel belongs to another account."""

    def __str__(self):
        return "permission_denied"


class IngressAdministrativelyDisabled(TunnelError):
    """The update enables an ingress that is off on this server."""

    def __str__(self):
        return "ingress_administratively_disabled"


class BadAltNames(TunnelError):
    """Alt names that could not be granted (TUNNEL_INGRESS_BAD_ALT_NAMES)."""

    def __init__(self, names):
        TunnelError.__init__(self, list(names))
        self.names = list(names)

    def __str__(self):
        return ", ".join(self.names)


class _TokenUsed(TunnelError):
    """The connection token changed between its check and its use."""


class NoAltNames:
    """
    The alt-name service until CNAME verification exists: names already on
    the tunnel may be kept or removed, no new name is granted.

    The interface: ``update(tunnel, requested)`` fires with the list to
    store (kept and newly granted names) or fails with `BadAltNames`;
    ``release(tunnel)`` unregisters every name of a deleted tunnel.
    """

    def update(self, tunnel, requested):
        current = tunnel["ingress"]["http"].get("alt_names") or []
        new = [name for name in requested if name not in current]
        if new:
            return defer.fail(BadAltNames(new))
        return defer.succeed(list(requested))

    def release(self, tunnel):
        return defer.succeed(None)


def _dedupe(names):
    seen = []
    for name in names:
        if name not in seen:
            seen.append(name)
    return seen


class TunnelService:
    """
    Tunnels over an `IStorage`, with their account (`AccountService`) and
    their connections (`ConnectionRegistry`): transports `register` the
    connections they authorised here, deletes and disconnects close them.
    ``sni_url_for(tunnel_id)`` gives the SNI URL advertised in ``ingress.sni``
    (None while there is none). ``cluster`` (`exposr.cluster.service.
    ClusterService`) carries disconnects to every node; without it they are
    this node's only.
    """

    def __init__(self, config, storage, accounts, registry, clock, altnames=None, sni_url_for=None,
                 cluster=None, randbytes=os.urandom):
        self.config = config
        self.cluster = cluster
        self.storage = storage
        self.accounts = accounts
        self.registry = registry
        self.clock = clock
        self.altnames = altnames if altnames is not None else NoAltNames()
        self.sni_url_for = sni_url_for
        self._observers = []
        self._randbytes = randbytes

    def _now(self):
        return self.clock.seconds()

    def new_token(self):
        return model.generate_token(self._randbytes)

    def _recompute(self, record):
        record["ingress"] = model.compute_ingress(record, self.config, self.sni_url_for)
        return record

    # -- create / read -----------------------------------------------------

    @defer.inlineCallbacks
    def create(self, tunnel_id, account_id):
        """
        Create a tunnel for an account: the new record, or None when the id is
        taken (by anyone) or the account does not exist.
        """
        record = model.new_tunnel(tunnel_id, account_id, self._now(), self.new_token())
        self._recompute(record)
        created = yield self.storage.create(NS, tunnel_id, record)
        if not created:
            return None
        try:
            account = yield self.accounts.add_tunnel(account_id, tunnel_id)
            if account is None:
                # add_tunnel answers None both for "no account" and "already listed"
                account = yield self.accounts.get(account_id)
            ok = account is not None
        except Exception:
            log.error("Could not add tunnel {tunnel_id} to its account: {error}", tunnel_id=tunnel_id,
                error=model.describe_error())
            ok = False
        if not ok:
            yield self.storage.delete(NS, tunnel_id)
            return None
        log.info("Tunnel {tunnel_id} created", tunnel_id=tunnel_id)
        return record

    @defer.inlineCallbacks
    def get(self, tunnel_id):
        if not isinstance(tunnel_id, str) or not tunnel_id:
            return None
        stored = yield self.storage.get(NS, tunnel_id)
        return model.read_tunnel(stored)

    @defer.inlineCallbacks
    def get_owned(self, tunnel_id, account_id):
        """The tunnel if it exists and belongs to the account, else None."""
        record = yield self.get(tunnel_id)
        if record is None or record.get("account") != account_id:
            return None
        return record

    # -- update ------------------------------------------------------------

    @defer.inlineCallbacks
    def update(self, tunnel_id, fn, account_id=None):
        """
        Read-modify-write under the storage lock. ``fn(record)`` changes the
        record in place (or returns a Deferred). The derived ingress fields
        and ``updated_at`` are refreshed. Fails with `TunnelNotFound`, or
        `PermissionDenied` when ``account_id`` is given and is not the owner.
        """

        @defer.inlineCallbacks
        def apply(current):
            record = model.read_tunnel(current)
            if account_id is not None and record.get("account") != account_id:
                raise PermissionDenied()
            yield fn(record)
            self._recompute(record)
            record["updated_at"] = model.iso_timestamp(self._now())
            return model.serialize(record)

        try:
            written = yield self.storage.update(NS, tunnel_id, apply)
        except NotFound:
            raise TunnelNotFound()
        self._changed(tunnel_id)
        return model.read_tunnel(written)

    def on_change(self, callback):
        """``callback(tunnel_id)`` after this node updated or deleted a tunnel record."""
        self._observers.append(callback)

    def _changed(self, tunnel_id):
        for callback in list(self._observers):
            try:
                callback(tunnel_id)
            except Exception:
                log.failure("tunnel change observer failed")

    def update_config(self, tunnel_id, account_id, changes):
        """
        Apply a validated API body (PUT/PATCH): ``changes`` is a dict with the
        optional nested keys ``ingress.http.enabled``, ``ingress.http.alt_names``
        (list or None), ``ingress.sni.enabled``, ``target.url`` (str or None),
        ``transport.ws.enabled``, ``transport.ssh.enabled``, ``access.allow``
        (list of normalised CIDRs; None or empty removes it),
        ``access.http_auth`` ({"user", "password"}, stored as the user and a
        bcrypt hash; None removes it).
        """
        ingress = changes.get("ingress") or {}
        http = ingress.get("http") or {}
        sni = ingress.get("sni") or {}
        target = changes.get("target") or {}
        transport = changes.get("transport") or {}
        rules = changes.get("access") or {}

        if http.get("enabled") is True and not (
            self.config.http_ingress_enabled and self.config.ingress_http_url
        ):
            return defer.fail(IngressAdministrativelyDisabled())
        if sni.get("enabled") is True and not self.config.sni_ingress_enabled:
            return defer.fail(IngressAdministrativelyDisabled())

        auth = rules.get("http_auth")
        if auth:
            # bcrypt is slow on purpose: hashed once, in a thread, before the update
            d = httpauth.blocking(self.clock, httpauth.hash_password, auth["password"])
            return d.addCallback(lambda hashed: self._update_config(tunnel_id, account_id, http, sni, target,
                                                                    transport, rules, hashed))
        return self._update_config(tunnel_id, account_id, http, sni, target, transport, rules, None)

    def _update_config(self, tunnel_id, account_id, http, sni, target, transport, rules, hashed):
        @defer.inlineCallbacks
        def change(record):
            if "enabled" in http:
                record["ingress"]["http"]["enabled"] = http["enabled"]
            if "alt_names" in http:
                requested = _dedupe([n.lower() for n in (http["alt_names"] or [])])
                current = record["ingress"]["http"].get("alt_names") or []
                if set(requested) != set(current):
                    granted = yield self.altnames.update(record, requested)
                    record["ingress"]["http"]["alt_names"] = list(granted)
            if "enabled" in sni:
                record["ingress"]["sni"]["enabled"] = sni["enabled"]
            if "passthrough" in sni:
                if sni["passthrough"]:
                    record["ingress"]["sni"]["passthrough"] = True
                else:
                    record["ingress"]["sni"].pop("passthrough", None)
            if "url" in target:
                if target["url"] is None:
                    record["target"].pop("url", None)
                else:
                    record["target"]["url"] = target["url"]
            for kind in ("ws", "ssh"):
                flags = transport.get(kind) or {}
                if "enabled" in flags:
                    record["transport"][kind]["enabled"] = flags["enabled"]
            current = record.get("access")
            current = dict(current) if isinstance(current, dict) else {}
            if "allow" in rules:
                if rules["allow"]:
                    current["allow"] = list(rules["allow"])
                else:
                    current.pop("allow", None)
            if "http_auth" in rules:
                if rules["http_auth"]:
                    current["http_auth"] = {"user": rules["http_auth"]["user"], "hash": hashed}
                else:
                    current.pop("http_auth", None)
            if "allow" in rules or "http_auth" in rules:
                if current:
                    record["access"] = current
                else:
                    record.pop("access", None)

        return self.update(tunnel_id, change, account_id=account_id)

    def rotate_token(self, tunnel_id):
        """Replace the connection token (after a successful transport connect)."""

        def change(record):
            record["transport"]["token"] = self.new_token()

        return self.update(tunnel_id, change)

    def set_target(self, tunnel_id, url):
        """Set ``target.url`` (SSH bind address adoption)."""

        def change(record):
            record["target"]["url"] = url

        return self.update(tunnel_id, change)

    # -- delete / disconnect -----------------------------------------------

    @defer.inlineCallbacks
    def delete(self, tunnel_id, account_id=None, update_account=True):
        """
        Disconnect, release alt names, delete the record, remove it from the
        account. True when the record was deleted. Fails with `TunnelNotFound`
        or `PermissionDenied` (``account_id`` given and not the owner).
        """
        record = yield self.get(tunnel_id)
        if record is None:
            raise TunnelNotFound()
        if account_id is not None and record.get("account") != account_id:
            raise PermissionDenied()
        try:
            yield self._disconnect(tunnel_id)
        except Exception:
            log.error("Could not disconnect tunnel {tunnel_id}: {error}", tunnel_id=tunnel_id,
                error=model.describe_error())
        try:
            yield self.altnames.release(record)
        except Exception:
            log.error("Could not release alt names of {tunnel_id}: {error}", tunnel_id=tunnel_id,
                error=model.describe_error())
        deleted = yield self.storage.delete(NS, tunnel_id)
        self._changed(tunnel_id)
        if update_account and record.get("account"):
            try:
                yield self.accounts.remove_tunnel(record["account"], tunnel_id)
            except Exception:
                log.error("Could not remove {tunnel_id} from its account: {error}", tunnel_id=tunnel_id,
                    error=model.describe_error())
        if deleted:
            log.info("Tunnel {tunnel_id} deleted", tunnel_id=tunnel_id)
        return bool(deleted)

    def _disconnect(self, tunnel_id):
        if self.cluster is not None:
            # every node closes its connections of the tunnel (this one too)
            return self.cluster.disconnect(tunnel_id)
        return self.registry.disconnect(tunnel_id)

    @defer.inlineCallbacks
    def disconnect(self, tunnel_id, account_id=None):
        """
        Drop every connection of the tunnel: True when it is no longer
        connected. A foreign tunnel (``account_id`` not the owner) answers
        False (as the original); a missing one fails with `TunnelNotFound`.
        """
        record = yield self.get(tunnel_id)
        if record is None:
            raise TunnelNotFound()
        if account_id is not None and record.get("account") != account_id:
            return False
        result = yield self._disconnect(tunnel_id)
        return bool(result)

    # -- accounts and their tunnels -----------------------------------------

    @defer.inlineCallbacks
    def delete_account(self, account_id):
        """
        Delete an account and all its tunnels. True when deleted, False when
        the account does not exist.
        """
        record = yield self.accounts.get(account_id)
        if record is None:
            return False
        canonical = record["id"] if "id" in record else model.normalize_account_id(account_id)
        for tunnel_id in list(record["tunnels"]):
            try:
                yield self.delete(tunnel_id, canonical, update_account=False)
            except Exception:
                log.warn("Could not delete tunnel {tunnel_id}: {error}", tunnel_id=tunnel_id,
                         error=model.describe_error())
        return (yield self.accounts.delete(canonical))

    @defer.inlineCallbacks
    def set_account_disabled(self, account_id, disabled, reason=None):
        """
        Disable (with an optional reason) or enable an account; disabling
        disconnects every tunnel of the account. The updated account, or None
        when it does not exist.
        """
        record = yield self.accounts.set_disabled(account_id, disabled, reason)
        if record is not None and disabled:
            for tunnel_id in list(record["tunnels"]):
                try:
                    yield self.disconnect(tunnel_id)
                except Exception:
                    log.error("Could not disconnect tunnel {tunnel_id}: {error}", tunnel_id=tunnel_id,
                              error=model.describe_error())
        return record

    # -- transport connections -----------------------------------------------

    @defer.inlineCallbacks
    def register(self, conn, account_id):
        """
        A transport authorised ``conn`` (an `ITunnelConnection`) for the
        account (`authorize` consumed its token): True when it may carry the
        tunnel. Refused (False) when the tunnel does not exist or is not the
        account's, or by the registry (stopping, or the cluster-wide limit
        reached).
        """
        if self.registry.stopping:
            return False
        tunnel = yield self.get(conn.tunnel_id)
        if tunnel is None or tunnel.get("account") != account_id:
            return False
        # synchronous from here: other registrations may have run meanwhile
        return self.registry.add(conn)

    def unregister(self, conn):
        """The transport connection is gone (closed by either side)."""
        return self.registry.unregister(conn)

    # -- transport login ---------------------------------------------------

    @defer.inlineCallbacks
    def authorize(self, tunnel_id, token):
        """
        ``(tunnel, account)`` when the tunnel exists, its account exists and is
        not disabled and ``token`` is its current connection token; else None.

        The token is good for one connection: it is replaced in the same
        locked read-modify-write of storage that compares it, so of two logins
        with one token at the same moment only one is authorised, on every
        backend.
        """
        if not isinstance(token, str) or not token:
            return None
        tunnel = yield self.get(tunnel_id)
        if tunnel is None:
            return None
        account = yield self.accounts.get(tunnel.get("account"))
        if account is None or account["status"].get("disabled"):
            return None
        if not model.tokens_equal(token, tunnel["transport"].get("token")):
            return None

        def consume(record):
            if not model.tokens_equal(token, record["transport"].get("token")):
                raise _TokenUsed()
            record["transport"]["token"] = self.new_token()

        try:
            tunnel = yield self.update(tunnel_id, consume)
        except (_TokenUsed, TunnelNotFound):
            return None
        if tunnel_id not in account["tunnels"]:
            try:
                healed = yield self.accounts.add_tunnel(account["id"], tunnel_id)
                if healed is not None:
                    account = healed
            except Exception:
                log.error("Could not re-add {tunnel_id} to its account: {error}", tunnel_id=tunnel_id,
                    error=model.describe_error())
        return tunnel, account

    # -- list --------------------------------------------------------------

    @defer.inlineCallbacks
    def list(self, cursor=None, count=25, verbose=False):
        """One page: ``(cursor, tunnels)``: ids, or records when verbose."""
        keys, next_cursor = yield list_page(self.storage, NS, cursor, count)
        if not verbose:
            return next_cursor, list(keys)
        values = (yield self.storage.get_multi(NS, keys)) if keys else []
        return next_cursor, [model.read_tunnel(v) for v in values if v is not None]
