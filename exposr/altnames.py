"""Bring your own domain: alt names of the HTTP ingress
(docs/protocol.rst, "Alt names"; routing: "Routing").

A user points ``example.net CNAME <tunnel id>.<ingress host>`` and asks for
``example.net`` as an alt name of the tunnel. `AltNames` verifies the CNAME
with ``twisted.names``, registers the name first-come-first-served in the
``ingress-altnames`` namespace (key ``http-<name>``, value
``{"tunnelId": ..., "created_at": ...}``) and answers the ingress's "which
tunnel serves this host" question from a short-lived cache.
"""

import ipaddress
import re

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import client, dns

from exposr import model
from exposr.storage.base import NotFound
from exposr.tunnels import BadAltNames

log = Logger(namespace="exposr.altnames")

NS = "ingress-altnames"
TUNNEL_NS = "tunnel"

# Per-try timeouts of one CNAME query (seconds): at most 4 s per name, the
# names of one update being checked in parallel.
DNS_TIMEOUT = (1, 3)
CACHE_TTL = 5.0
MISS_TTL = 1.0  # seconds an unregistered host is remembered
CACHE_MAX = 10000

_HOST_RE = re.compile(r"^(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*$")


def storage_key(name):
    return "http-" + name.lower()


def parse_dns_server(text):
    """
    ``(ip, port)`` of ``--dns-server``: ``ip``, ``ip:port``, a bare IPv6
    address or ``[ipv6]:port``. Port 53 by default.
    """
    text = text.strip()
    try:
        ipaddress.ip_address(text)
        return (text, dns.PORT)
    except ValueError:
        pass
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError("Invalid DNS server %r" % (text,))
        port = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError("Invalid DNS server %r" % (text,))
    else:
        host, _, port = text.rpartition(":")
    ipaddress.ip_address(host)
    port = int(port) if port else dns.PORT
    if not 0 < port < 65536:
        raise ValueError("Invalid DNS server port in %r" % (text,))
    return (host, port)


def cname_targets(answers, name):
    """
    The CNAME targets of ``name`` itself in an answer section (lower case,
    no trailing dot). Records owned by other names (the rest of a chain a
    recursive server may add) are ignored: no chain following.
    """
    owner = name.lower().rstrip(".")
    targets = []
    for rr in answers:
        if rr.type != dns.CNAME:
            continue
        rr_name = rr.name.name.decode("ascii", "replace").lower().rstrip(".")
        if rr_name != owner:
            continue
        targets.append(rr.payload.name.name.decode("ascii", "replace").lower().rstrip("."))
    return targets


class AltNames:
    """
    The alt-name service (the interface of `exposr.tunnels.NoAltNames`).

    ``resolver`` is an `IResolver`; by default a resolver on
    ``config.dns_server`` (only that server: no hosts file, no cache), or the
    system resolver when that is unset. ``clock`` times the lookup cache and
    the ``created_at`` of registrations.
    """

    def __init__(self, config, storage, clock, resolver=None, dns_timeout=DNS_TIMEOUT,
                 cache_ttl=CACHE_TTL, cache_max=CACHE_MAX):
        self.config = config
        self.storage = storage
        self.clock = clock
        self._resolver = resolver
        self.dns_timeout = tuple(dns_timeout)
        self.cache_ttl = cache_ttl
        self.cache_max = cache_max
        self._cache = {}  # host -> (tunnel id or None, expires at)
        self._epoch = 0

    # -- DNS -----------------------------------------------------------------

    @property
    def resolver(self):
        if self._resolver is None:
            if self.config.dns_server:
                self._resolver = client.Resolver(servers=[parse_dns_server(self.config.dns_server)])
            else:
                self._resolver = client.getResolver()
        return self._resolver

    def expected_target(self, tunnel_id):
        """``<tunnel id>.<ingress host>``, or None without an HTTP ingress URL."""
        host = model.ingress_http_host(self.config)
        if not host:
            return None
        return ("%s.%s" % (tunnel_id, host)).lower()

    @defer.inlineCallbacks
    def verify(self, name, tunnel_id):
        """True when ``name`` has a CNAME to the tunnel's ingress host; never fails."""
        target = self.expected_target(tunnel_id)
        if target is None:
            return False
        try:
            answers, _, _ = yield self.resolver.lookupCanonicalName(name, timeout=self.dns_timeout)
        except Exception as e:
            log.info("Alt name {name} of {tunnel_id} not verified: {error}",
                     name=name, tunnel_id=tunnel_id, error=e.__class__.__name__)
            return False
        targets = cname_targets(answers, name)
        if target in targets:
            return True
        log.info("Alt name {name} of {tunnel_id} not verified: CNAME {targets}, expected {target}",
                 name=name, tunnel_id=tunnel_id, targets=targets, target=target)
        return False

    # -- registration --------------------------------------------------------

    @defer.inlineCallbacks
    def _register(self, name, tunnel_id):
        """(granted, created here) for one verified name, first come first served."""
        key = storage_key(name)
        value = {"tunnelId": tunnel_id, "created_at": model.iso_timestamp(self.clock.seconds())}
        created = yield self.storage.create(NS, key, value)
        if created:
            return True, True
        current = yield self.storage.get(NS, key)
        owner = (current or {}).get("tunnelId")
        if owner == tunnel_id:
            return True, False
        if current is not None and owner:
            # A registration left behind by a deleted tunnel is not "another
            # tunnel": take it over, atomically against a concurrent claim.
            other = yield self.storage.get(TUNNEL_NS, owner)
            if other is None:
                def take(stored):
                    if (stored or {}).get("tunnelId") != owner:
                        return None
                    return value
                try:
                    written = yield self.storage.update(NS, key, take)
                except NotFound:
                    written = None
                if written is not None:
                    log.info("Alt name {name} taken over from deleted tunnel {owner}",
                             name=name, owner=owner)
                    return True, True
        if current is None:
            # deleted between create and get: try once more
            created = yield self.storage.create(NS, key, value)
            if created:
                return True, True
        log.info("Alt name {name} not granted to {tunnel_id}: registered to another tunnel",
                 name=name, tunnel_id=tunnel_id)
        return False, False

    @defer.inlineCallbacks
    def _unregister(self, name, tunnel_id):
        """Remove the registration of ``name`` if it points to ``tunnel_id``."""
        key = storage_key(name)
        current = yield self.storage.get(NS, key)
        if current is not None and current.get("tunnelId") == tunnel_id:
            yield self.storage.delete(NS, key)
            return True
        return False

    # -- the NoAltNames interface --------------------------------------------

    @defer.inlineCallbacks
    def update(self, tunnel, requested):
        """
        Fire with the list to store (kept ∪ granted, in requested order) or
        fail with `BadAltNames` when a new name does not verify (nothing is
        registered then). Removed names are unregistered.
        """
        tunnel_id = tunnel["id"]
        current = list(tunnel.get("ingress", {}).get("http", {}).get("alt_names") or [])
        wanted = []
        for name in requested:
            name = name.lower()
            if name not in wanted:
                wanted.append(name)
        new = [name for name in wanted if name not in current]
        removed = [name for name in current if name not in wanted]

        results = yield defer.gatherResults([self.verify(name, tunnel_id) for name in new])
        failed = [name for name, ok in zip(new, results) if not ok]
        if failed:
            raise BadAltNames(failed)

        self._invalidate(new + removed)
        granted = []
        created = []
        try:
            for name in new:
                ok, made = yield self._register(name, tunnel_id)
                if ok:
                    granted.append(name)
                if made:
                    created.append(name)
            for name in removed:
                yield self._unregister(name, tunnel_id)
        except Exception:
            for name in created:
                try:
                    yield self._unregister(name, tunnel_id)
                except Exception:
                    log.failure("Could not roll back alt name {name}", name=name)
            raise
        finally:
            self._invalidate(new + removed)
        if granted or removed:
            log.info("Alt names of {tunnel_id}: granted {granted}, removed {removed}",
                     tunnel_id=tunnel_id, granted=granted, removed=removed)
        return [name for name in wanted if name in current or name in granted]

    @defer.inlineCallbacks
    def release(self, tunnel):
        """Unregister every alt name of a deleted tunnel (those pointing to it)."""
        tunnel_id = tunnel["id"]
        names = list(tunnel.get("ingress", {}).get("http", {}).get("alt_names") or [])
        self._invalidate(names)
        try:
            for name in names:
                yield self._unregister(name, tunnel_id)
        finally:
            self._invalidate(names)

    # -- routing: the tunnel of a Host that is a registered alt name ---------

    def lookup(self, host):
        """
        Fire with the id of the tunnel ``host`` is registered to, or None.
        ``host`` is the Host header value, lower-cased and cut at ``:``.
        Answers (hits and misses) are cached for ``cache_ttl`` seconds;
        storage errors propagate and are not cached.
        """
        if not isinstance(host, str):
            return defer.succeed(None)
        host = host.lower()
        if host.endswith("."):
            host = host[:-1]
        if not _HOST_RE.match(host):
            return defer.succeed(None)
        now = self.clock.seconds()
        hit = self._cache.get(host)
        if hit is not None and hit[1] > now:
            return defer.succeed(hit[0])
        epoch = self._epoch

        def got(value):
            tunnel_id = value.get("tunnelId") if isinstance(value, dict) else None
            if not isinstance(tunnel_id, str) or not tunnel_id:
                tunnel_id = None
            if epoch == self._epoch:
                self._remember(host, tunnel_id)
            return tunnel_id

        return self.storage.get(NS, storage_key(host)).addCallback(got)

    def _remember(self, host, tunnel_id):
        now = self.clock.seconds()
        if len(self._cache) >= self.cache_max:
            self._cache = {h: e for h, e in self._cache.items() if e[1] > now}
            if len(self._cache) >= self.cache_max:
                self._cache.clear()
        # a miss is kept shorter: a name registered through another node
        # must start routing here soon
        ttl = self.cache_ttl if tunnel_id is not None else min(self.cache_ttl, MISS_TTL)
        self._cache[host] = (tunnel_id, now + ttl)

    def _invalidate(self, names):
        self._epoch += 1
        for name in names:
            self._cache.pop(name.lower(), None)
