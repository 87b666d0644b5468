"""The resolved server configuration.

`Config` is what every part of the server reads. It is produced by
`exposr.options` from the command line and `EXPOSR_*` environment variables
(docs/protocol.rst, "Configuration"), after the two-phase resolution of dependent defaults:
by the time a `Config` exists, `cluster` is never ``"auto"``, the deprecated
`--redis-url` / `--ingress-http-domain` have been folded into the options they
default, and every cross-option check has passed.

Attribute names are the long option names with ``-`` replaced by ``_``.
Tests build one with ``Config(**overrides)``; the defaults below are the
original's defaults (with ``ingress_http_url`` left unset, which only the
option parser rejects).
"""

import attrs

DEFAULT_TRUSTED_PROXIES = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
)


@attrs.frozen(kw_only=True)
class Config:
    # Ingress
    ingress: tuple = ("http",)
    ingress_http_url: str | None = None
    ingress_http_port: int = 8080  # the option parser defaults it to api_port
    ingress_http_agent_idle_timeout: float = 60.0
    # Time limits of public HTTP reads (beyond the original; docs/reliability.rst).
    # A request head (front door, ingress, API) must be complete within
    # http_head_timeout; on the ingress it runs from the connection's start
    # or the previous response's end, bounding an idle kept-alive connection.
    http_head_timeout: float = 30.0
    # A request body (ingress, API) must bring at least http_body_min_rate
    # bytes/s, and at least one byte, over each http_body_timeout window.
    http_body_timeout: float = 60.0
    http_body_min_rate: int = 10
    # An upgraded ingress connection (WebSocket, CONNECT) with no byte
    # either way for this long is closed.
    ingress_http_tunnel_idle_timeout: float = 300.0
    # CIDRs whose X-Forwarded-For / Forwarded is believed (beyond the original).
    ingress_http_trusted_proxies: tuple = DEFAULT_TRUSTED_PROXIES
    ingress_sni_port: int = 4430
    ingress_sni_host: str | None = None
    ingress_sni_cert: str | None = None
    ingress_sni_key: str | None = None

    # Transport
    transport: tuple = ("ws",)
    transport_max_connections: int = 2
    transport_ssh_port: int = 2200
    transport_ssh_host: str | None = None
    transport_ssh_key: str | None = None  # resolved key text (PEM), not a path
    transport_ssh_allow_insecure_target: bool = False

    # Admin
    admin_enable: bool = False
    admin_port: int = 8081
    admin_api_enable: bool = False
    admin_api_port: int = 8081
    admin_api_key: str | None = None  # "" is normalised to None
    admin_api_allow_access_without_key: bool = False

    # API
    api_url: str | None = None
    api_port: int = 8080
    allow_registration: bool = False

    # Cluster ("auto" is resolved before a Config is built)
    cluster: str = "single-node"
    cluster_key: str = "secret-signing-key"
    cluster_udp_discovery: str = "auto"
    cluster_udp_port: int = 1025
    cluster_udp_discovery_multicast_group: str = "239.0.0.1"
    cluster_udp_discovery_multicast_ttl: int = 1
    cluster_udp_discovery_kubernetes_service: str | None = None
    cluster_udp_discovery_kubernetes_namespace: str | None = None
    cluster_udp_discovery_kubernetes_service_env: str = "SERVICE_NAME"
    cluster_udp_discovery_kubernetes_namespace_env: str = "POD_NAMESPACE"
    cluster_udp_discovery_kubernetes_cluster_domain: str = "cluster.local"
    # the file whose presence means "running in Kubernetes" (tests point it elsewhere)
    cluster_udp_discovery_kubernetes_namespace_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    cluster_redis_url: str | None = None
    cluster_node_ip: str | None = None  # override of the advertised node IP (auto-detected otherwise)
    cluster_redis_channel: str = "exposr"
    cluster_discovery_wait: float | None = None  # None: 20 s in multi-node modes, 0 for one node
    # why `--cluster auto` resolved to `cluster` (None when the mode was given); for the start-up log
    cluster_why: str | None = attrs.field(default=None, eq=False)

    # Storage
    storage_url: str = "memory://"
    storage_timeout: float = 5.0  # seconds a storage call may take, waits included
    storage_pgsql_connection_pool_size: int = 10

    # DNS used to verify alt names and by Kubernetes peer discovery: "host[:port]", or None for the system resolver.
    dns_server: str | None = None

    # Logging
    log_level: str = "info"
    log_format: str = "json"

    # Listen address for every TCP listener (beyond the original, which binds all).
    listen_address: str = ""
    shutdown_grace: float = 5.0  # seconds still served after SIGTERM, readiness off
    shutdown_drain_timeout: float = 30.0  # seconds in-flight requests may take to finish

    # Deprecated options in use, as (option or variable given, its replacement): warned at start.
    deprecated: tuple = ()

    @property
    def http_ingress_enabled(self):
        return "http" in self.ingress

    @property
    def sni_ingress_enabled(self):
        return "sni" in self.ingress

    @property
    def ws_transport_enabled(self):
        return "ws" in self.transport

    @property
    def ssh_transport_enabled(self):
        return "ssh" in self.transport
