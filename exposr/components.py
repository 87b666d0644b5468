"""Wiring: the one place that knows every wing (transports, ingresses, APIs).

`build(server)` creates storage, the domain services, the listeners and the
transports for the server's `Config` and attaches them to the root service in
start-up order (storage first, so that it stops last).
"""

from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.web.server import Request, Site
from zope.interface import implementer

from exposr.accounts import AccountService
from exposr.api.admin import AdminAPI, AdminInterface, admin_resource, local_node_view
from exposr.api.common import MAX_BODY
from exposr.api.public import PublicAPI
from exposr.connections import ConnectionRegistry
from exposr.endpoint import TunnelEndpoint
from exposr.listen import Listener, tcp_endpoint
from exposr.listener import Door
from exposr.storage import storage_from_url
from exposr.tunnels import TunnelService


class BoundedRequest(Request):
    """A request whose body is kept only up to what the API accepts.

    twisted.web would otherwise store any body (in memory, then a temporary
    file) before a resource sees it. Bytes past the limit are read and
    dropped; one byte over is kept so the API answers its "request entity too
    large" error.
    """

    max_body = MAX_BODY

    def gotLength(self, length):
        super().gotLength(None if length is None or length > self.max_body else length)

    def handleContentChunk(self, data):
        room = self.max_body + 1 - self.content.tell()
        if room > 0:
            self.content.write(data[:room])


class _QuietSite(Site):
    noisy = False
    requestFactory = BoundedRequest


    def log(self, request):
        pass


def build(server):
    config = server.config
    reactor = server.reactor
    node = server.node
    server.start_hooks = []
    server.stop_hooks = []

    storage = storage_from_url(config.storage_url, reactor, pool_size=config.storage_pgsql_connection_pool_size)
    storage.setServiceParent(server)
    server.storage = storage

    accounts = AccountService(storage, reactor)
    altnames = _altnames(config, storage, reactor)
    tunnels = TunnelService(config, storage, accounts, reactor, altnames=altnames)
    registry = ConnectionRegistry(config, tunnels, node.id, reactor)
    registry.setServiceParent(server)
    server.accounts, server.tunnels, server.registry = accounts, tunnels, registry
    server.stop_hooks.append(registry.stop)

    ssh = None
    if config.ssh_transport_enabled:
        from exposr.transport.ssh import SSHTransportService

        ssh = SSHTransportService(config, tunnels, registry, node.id, reactor)
        ssh.setServiceParent(server)
        server.start_hooks.append(ssh.listen)
    server.ssh = ssh
    fingerprint = (lambda: ssh.fingerprint) if ssh is not None else None
    ssh_port = (lambda: ssh.port) if ssh is not None else None

    public = PublicAPI(config, accounts, tunnels, registry, ssh_fingerprint=fingerprint, ssh_port=ssh_port)
    site = _QuietSite(public.resource())

    ws = None
    if config.ws_transport_enabled:
        from exposr.transport.ws import WSTransport

        ws = WSTransport(reactor, registry, node.id)

    ingress = None
    if config.http_ingress_enabled:
        from exposr.ingress.http import HTTPIngress

        ingress = HTTPIngress(config, tunnels, registry, node.id, reactor, altnames=altnames)
    server.http_ingress = ingress

    address = config.listen_address
    shared = config.ingress_http_port == config.api_port
    door = Door(config, reactor, site, ingress=ingress if shared else None, ws=ws, tunnels=tunnels)
    server.add_listener(Listener("api", tcp_endpoint(reactor, config.api_port, address), door))
    if ingress is not None and not shared:
        ingress_door = Door(config, reactor, None, ingress=ingress, ws=None, tunnels=tunnels)
        server.add_listener(
            Listener("ingress-http", tcp_endpoint(reactor, config.ingress_http_port, address), ingress_door)
        )

    if config.sni_ingress_enabled:
        sni = _SNIWiring(server, config, tunnels, registry, reactor)
        server.start_hooks.append(sni.start)
        server.stop_hooks.append(lambda: [c.shut_down() for c in list(sni.factory.connections)])
        server.add_listener(Listener("ingress-sni", tcp_endpoint(reactor, config.ingress_sni_port, address), sni.factory))

    interface = AdminInterface(server.readiness) if config.admin_enable else None
    admin_api = None
    if config.admin_api_enable:
        admin_api = AdminAPI(
            config, accounts, tunnels, registry,
            nodes=local_node_view(node, reactor),
            ssh_fingerprint=fingerprint, ssh_port=ssh_port,
        )
    if interface is not None and admin_api is not None and config.admin_port == config.admin_api_port:
        server.add_listener(
            Listener("admin", tcp_endpoint(reactor, config.admin_port, address),
                     _QuietSite(admin_resource(interface, admin_api)))
        )
    else:
        if interface is not None:
            server.add_listener(
                Listener("admin", tcp_endpoint(reactor, config.admin_port, address),
                         _QuietSite(admin_resource(interface, None)))
            )
        if admin_api is not None:
            server.add_listener(
                Listener("admin-api", tcp_endpoint(reactor, config.admin_api_port, address),
                         _QuietSite(admin_resource(None, admin_api)))
            )


@implementer(IOpenSSLServerConnectionCreator)
class _SNIWiring:
    """SNI ingress: the certificate (loaded at start, so a bad one fails start-up
    with one line), the routing of a server name to a tunnel endpoint."""

    def __init__(self, server, config, tunnels, registry, reactor):
        from exposr.ingress.sni import SNIIngressFactory

        self.server = server
        self.config = config
        self.tunnels = tunnels
        self.registry = registry
        self.reactor = reactor
        self.watcher = None
        self.factory = SNIIngressFactory(self.resolve, self, reactor)

    def start(self):
        from exposr.ingress.certificate import CertificateWatcher

        config = self.config
        self.watcher = CertificateWatcher(
            config.ingress_sni_cert, config.ingress_sni_key, self.reactor, sni_host=config.ingress_sni_host
        )
        self.watcher.setServiceParent(self.server)
        self.tunnels.sni_url_for = lambda tunnel_id: self.watcher.url(tunnel_id, self.port())

    def port(self):
        """The advertised SNI port: the configured one, or the bound one for port 0."""
        port = self.config.ingress_sni_port
        listener = self.server.listeners.get("ingress-sni")
        if port == 0 and listener is not None and listener.address is not None:
            port = listener.address.port
        return port

    def serverConnectionForTLS(self, tlsProtocol):
        return self.watcher.serverConnectionForTLS(tlsProtocol)

    @defer.inlineCallbacks
    def resolve(self, tunnel_id):
        from exposr.ingress.sni import Route, SNIRefused

        tunnel = yield self.tunnels.get(tunnel_id)
        if tunnel is None:
            raise SNIRefused(f"unknown tunnel {tunnel_id}")
        sni = tunnel.get("ingress", {}).get("sni", {})
        if not sni.get("enabled"):
            raise SNIRefused(f"SNI ingress not enabled for {tunnel_id}")
        if not self.registry.is_connected(tunnel_id):
            raise SNIRefused(f"tunnel {tunnel_id} is not connected")
        return Route(TunnelEndpoint(self.registry, tunnel_id), passthrough=bool(sni.get("passthrough")))


def _altnames(config, storage, reactor):
    try:
        from exposr.altnames import AltNames
    except ImportError:
        return None
    return AltNames(config, storage, reactor)
