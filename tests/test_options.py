"""Tests for exposr.options: command line + EXPOSR_* environment -> Config."""

import base64
import io
import os
import sys

from twisted.python import usage
from twisted.trial.unittest import TestCase

from exposr import __version__
from exposr.config import DEFAULT_TRUSTED_PROXIES, Config
from exposr.options import OPTIONS, ConfigError, Options, parse_config

URL = "https://tun.example.com"
KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)


def parse(*argv, **environ):
    """Parse argv (HTTP ingress URL given unless the test is about it)."""
    return parse_config(argv, environ)


def ok(*argv, **environ):
    return parse("--ingress-http-url", URL, *argv, **environ)


class ErrorMixin:
    def assertError(self, message, *argv, **environ):
        """Parsing fails with exactly `message`, on one line."""
        e = self.assertRaises(ConfigError, parse_config, argv, environ)
        self.assertEqual(str(e), message)
        self.assertNotIn("\n", str(e))
        return e

    def assertErrorStartsWith(self, prefix, *argv, **environ):
        e = self.assertRaises(ConfigError, parse_config, argv, environ)
        self.assertTrue(str(e).startswith(prefix), str(e))
        self.assertNotIn("\n", str(e))


class DefaultsTests(TestCase, ErrorMixin):
    def test_no_options_at_all(self):
        """HTTP ingress is on by default, so its URL is required."""
        self.assertError("--ingress-http-url: required when HTTP ingress is enabled")

    def test_defaults_are_configs(self):
        self.assertEqual(ok(), Config(ingress_http_url=URL))

    def test_config_is_set_after_parse_options(self):
        options = Options(environ={})
        self.assertIsNone(options.config)
        options.parseOptions(["--ingress-http-url", URL])
        self.assertEqual(options.config.ingress_http_url, URL)

    def test_default_environ_is_os_environ(self):
        self.patch(os, "environ", {"EXPOSR_INGRESS_HTTP_URL": URL})
        options = Options()
        options.parseOptions([])
        self.assertEqual(options.config.ingress_http_url, URL)


class EnvironmentTests(TestCase, ErrorMixin):
    def test_env_name(self):
        self.assertEqual(parse(EXPOSR_INGRESS_HTTP_URL=URL).ingress_http_url, URL)
        self.assertEqual(ok(EXPOSR_TRANSPORT_SSH_PORT="2222").transport_ssh_port, 2222)

    def test_env_remainder_case_insensitive(self):
        self.assertEqual(parse(EXPOSR_ingress_Http_url=URL).ingress_http_url, URL)

    def test_env_prefix_exact(self):
        for key in ("exposr_INGRESS_HTTP_URL", "Exposr_INGRESS_HTTP_URL", "EXPOSRINGRESS_HTTP_URL"):
            self.assertError(
                "--ingress-http-url: required when HTTP ingress is enabled", **{key: URL}
            )

    def test_cli_beats_env_beats_default(self):
        self.assertEqual(ok().api_port, 8080)
        self.assertEqual(ok(EXPOSR_API_PORT="9000").api_port, 9000)
        self.assertEqual(ok("--api-port", "9001", EXPOSR_API_PORT="9000").api_port, 9001)
        config = parse("--ingress-http-url", URL, EXPOSR_INGRESS_HTTP_URL="http://other")
        self.assertEqual(config.ingress_http_url, URL)

    def test_unknown_env_ignored(self):
        config = ok(EXPOSR_SELF_TEST="1", EXPOSR_EMBEDDED="1", EXPOSR_NO_SUCH_OPTION="x")
        self.assertEqual(config, Config(ingress_http_url=URL))

    def test_empty_env_is_not_set(self):
        config = ok(
            EXPOSR_API_PORT="", EXPOSR_CLUSTER_KEY="", EXPOSR_TRANSPORT="", EXPOSR_LOG_LEVEL=""
        )
        self.assertEqual(config, Config(ingress_http_url=URL))

    def test_env_bad_value_names_variable(self):
        self.assertError(
            "EXPOSR_API_PORT: expected a port number 0-65535, got 'http'", EXPOSR_API_PORT="http"
        )

    def test_helm_environment(self):
        """What the helm chart writes, deprecated EXPOSR_INGRESS_HTTP_DOMAIN included."""
        config = parse(
            EXPOSR_LOG_LEVEL="info",
            EXPOSR_ADMIN_ENABLE="true",
            EXPOSR_ADMIN_PORT="9000",
            EXPOSR_ALLOW_REGISTRATION="false",
            EXPOSR_API_PORT="8080",
            EXPOSR_ADMIN_API_ENABLE="true",
            EXPOSR_ADMIN_API_PORT="8081",
            EXPOSR_CLUSTER="udp",
            EXPOSR_CLUSTER_KEY="cluster-signing-key-change-me",
            EXPOSR_CLUSTER_UDP_DISCOVERY="kubernetes",
            EXPOSR_STORAGE_URL="memory://",
            EXPOSR_INGRESS="http",
            EXPOSR_TRANSPORT="ws,ssh",
            EXPOSR_INGRESS_HTTP_DOMAIN="https://tunnel.example.com",
            EXPOSR_INGRESS_HTTP_PORT="8080",
            EXPOSR_INGRESS_SNI_PORT="4430",
            EXPOSR_TRANSPORT_MAX_CONNECTIONS="2",
            EXPOSR_TRANSPORT_SSH_PORT="2200",
            EXPOSR_TRANSPORT_SSH_KEY=base64.b64encode(KEY.encode()).decode(),
            POD_NAMESPACE="default",
            SERVICE_NAME="exposr-headless",
        )
        self.assertEqual(
            config,
            Config(
                ingress_http_url="https://tunnel.example.com",
                transport=("ws", "ssh"),
                transport_ssh_key=KEY,
                admin_enable=True,
                admin_port=9000,
                admin_api_enable=True,
                cluster="udp",
                cluster_key="cluster-signing-key-change-me",
                cluster_udp_discovery="kubernetes",
                deprecated=(("EXPOSR_INGRESS_HTTP_DOMAIN", "EXPOSR_INGRESS_HTTP_URL"),),
            ),
        )

    def test_helm_empty_ingress(self):
        """EXPOSR_INGRESS="" (helm with both ingresses off) counts as not set."""
        config = parse(EXPOSR_INGRESS="", EXPOSR_INGRESS_HTTP_DOMAIN=URL)
        self.assertEqual(config.ingress, ("http",))
        self.assertEqual(config.ingress_http_url, URL)
        self.assertError(
            "--ingress-http-url: required when HTTP ingress is enabled", EXPOSR_INGRESS=""
        )


class BooleanTests(TestCase, ErrorMixin):
    def test_cli_forms(self):
        for argv, expected in [
            ([], False),
            (["--admin-enable"], True),
            (["--admin-enable", "true"], True),
            (["--admin-enable=true"], True),
            (["--admin-enable", "false"], False),
            (["--admin-enable=false"], False),
            (["--no-admin-enable"], False),
            (["--admin-enable", "--no-admin-enable"], False),
            (["--no-admin-enable", "--admin-enable"], True),
        ]:
            self.assertEqual(ok(*argv).admin_enable, expected, argv)

    def test_cli_flag_followed_by_other_option(self):
        config = ok("--admin-enable", "--api-port", "1")
        self.assertEqual((config.admin_enable, config.api_port), (True, 1))

    def test_cli_bad_value(self):
        self.assertError(
            "--admin-enable: expected true or false, got 'yes'", "--admin-enable=yes"
        )

    def test_env_true_only_for_true(self):
        for value, expected in [
            ("true", True), ("false", False), ("1", False), ("yes", False),
            ("TRUE", False), ("True", False), ("", False),
        ]:
            self.assertEqual(ok(EXPOSR_ALLOW_REGISTRATION=value).allow_registration, expected)

    def test_cli_false_beats_env_true(self):
        config = ok("--no-admin-api-enable", EXPOSR_ADMIN_API_ENABLE="true")
        self.assertFalse(config.admin_api_enable)
        config = ok("--admin-api-enable", "false", EXPOSR_ADMIN_API_ENABLE="true")
        self.assertFalse(config.admin_api_enable)

    def test_every_boolean(self):
        names = [
            "transport-ssh-allow-insecure-target", "admin-enable", "admin-api-enable",
            "admin-api-allow-access-without-key", "allow-registration",
        ]
        config = ok(*["--" + name for name in names])
        for name in names:
            self.assertIs(getattr(config, name.replace("-", "_")), True, name)
        env = {"EXPOSR_" + name.upper().replace("-", "_"): "true" for name in names}
        config = ok(**env)
        for name in names:
            self.assertIs(getattr(config, name.replace("-", "_")), True, name)


class MultiValueTests(TestCase, ErrorMixin):
    def setUp(self):
        self.cert = self.mktemp()
        with open(self.cert, "w") as f:
            f.write("pem")
        self.sni = ["--ingress-sni-cert", self.cert, "--ingress-sni-key", self.cert]

    def test_forms(self):
        for argv in (
            ["--ingress", "http", "--ingress", "sni"],
            ["--ingress", "http", "sni"],
            ["--ingress", "http,sni"],
            ["--ingress=http", "sni"],
            ["--ingress", "http", "--ingress", "sni,http"],
        ):
            self.assertEqual(ok(*argv, *self.sni).ingress, ("http", "sni"), argv)
        self.assertEqual(ok(*self.sni, EXPOSR_INGRESS="http,sni").ingress, ("http", "sni"))

    def test_values_then_next_option(self):
        config = ok("--transport", "ws", "ssh", "-p", "1")
        self.assertEqual((config.transport, config.api_port), (("ws", "ssh"), 1))

    def test_cli_beats_env(self):
        self.assertEqual(ok("--transport", "ssh", EXPOSR_TRANSPORT="ws").transport, ("ssh",))

    def test_unknown_choice(self):
        self.assertError(
            "--transport: invalid choice 'tcp' (choose from ws, ssh)", "--transport", "ws,tcp"
        )
        self.assertError(
            "EXPOSR_INGRESS: invalid choice 'HTTP' (choose from http, sni)", EXPOSR_INGRESS="HTTP"
        )

    def test_missing_value(self):
        self.assertError("--ingress: requires a value", "--ingress", "--api-port", "1")

    def test_sni_only(self):
        config = parse("--ingress", "sni", *self.sni)
        self.assertEqual(config.ingress, ("sni",))
        self.assertIsNone(config.ingress_http_url)


class NumberTests(TestCase, ErrorMixin):
    def test_ports(self):
        self.assertEqual(ok("--ingress-sni-port", "0").ingress_sni_port, 0)
        self.assertEqual(ok("--ingress-sni-port", "65535").ingress_sni_port, 65535)
        for bad in ("65536", "-1", "80.5", "http", " 80", "+80"):
            self.assertError(
                f"--admin-port: expected a port number 0-65535, got {bad!r}", f"--admin-port={bad}"
            )

    def test_short_api_port(self):
        self.assertEqual(ok("-p", "9000").api_port, 9000)
        self.assertEqual(ok("-p9000").api_port, 9000)

    def test_api_port_moves_the_http_ingress(self):
        """The ingress shares the API port unless its own port is given (option or variable)."""
        self.assertEqual((ok().api_port, ok().ingress_http_port), (8080, 8080))
        for config in (ok("-p", "18080"), ok("--api-port", "18080"), ok(EXPOSR_API_PORT="18080")):
            self.assertEqual((config.api_port, config.ingress_http_port), (18080, 18080))
        config = ok("--api-port", "18080", "--ingress-http-port", "8000")
        self.assertEqual((config.api_port, config.ingress_http_port), (18080, 8000))
        config = ok("--api-port", "18080", EXPOSR_INGRESS_HTTP_PORT="8000")
        self.assertEqual((config.api_port, config.ingress_http_port), (18080, 8000))
        config = ok("--ingress-http-port", "9000", EXPOSR_API_PORT="18080", EXPOSR_INGRESS_HTTP_PORT="8000")
        self.assertEqual((config.api_port, config.ingress_http_port), (18080, 9000))

    def test_api_port_alone_gives_one_shared_listener(self):
        from twisted.internet.testing import MemoryReactorClock

        from exposr.node import Node
        from exposr.server import ExposrService

        def listeners(*argv):
            server = ExposrService(ok(*argv), MemoryReactorClock(), node=Node(id="a" * 40, host="1@t", ip="10.0.0.1"))
            return {name: listener.endpoint._port for name, listener in server.listeners.items()}

        self.assertEqual(listeners("--api-port", "18080"), {"api": 18080})
        self.assertEqual(listeners("--api-port", "18080", "--ingress-http-port", "8000"),
                         {"api": 18080, "ingress-http": 8000})

    def test_every_port(self):
        names = [
            "ingress-http-port", "ingress-sni-port", "transport-ssh-port", "admin-port",
            "admin-api-port", "api-port", "cluster-udp-port",
        ]
        config = ok(*[f"--{name}={i}" for i, name in enumerate(names, 1)])
        for i, name in enumerate(names, 1):
            self.assertEqual(getattr(config, name.replace("-", "_")), i)

    def test_counts(self):
        config = ok(
            "--transport-max-connections", "5", "--storage-pgsql-connection-pool-size", "3"
        )
        self.assertEqual(
            (config.transport_max_connections, config.storage_pgsql_connection_pool_size), (5, 3)
        )
        self.assertError(
            "--transport-max-connections: expected a positive integer, got '0'",
            "--transport-max-connections", "0", "--ingress-http-url", URL,
        )

    def test_idle_timeout(self):
        self.assertEqual(
            ok("--ingress-http-agent-idle-timeout", "1.5").ingress_http_agent_idle_timeout, 1.5
        )
        self.assertError(
            "--ingress-http-agent-idle-timeout: expected a number of seconds, got 'soon'",
            "--ingress-http-agent-idle-timeout", "soon", "--ingress-http-url", URL,
        )


class UrlTests(TestCase, ErrorMixin):
    def test_ingress_http_url(self):
        self.assertEqual(ok().ingress_http_url, URL)
        for bad in ("tun.example.com", "ftp://tun.example.com", "https://", "http://h:99999"):
            self.assertError(
                f"--ingress-http-url: expected a http/https URL with a host, got {bad!r}",
                "--ingress-http-url", bad,
            )

    def test_api_url(self):
        api = "https://api.example.com"
        self.assertEqual(ok("--api-url", api).api_url, api)
        self.assertErrorStartsWith("--api-url: ", "--api-url", "api.example.com")

    def test_redis_urls(self):
        self.assertEqual(
            ok("--cluster-redis-url", "rediss://r:6380/1").cluster_redis_url, "rediss://r:6380/1"
        )
        self.assertError(
            "--cluster-redis-url: expected a redis/rediss URL with a host, got 'http://r'",
            "--cluster-redis-url", "http://r",
        )
        self.assertErrorStartsWith("--redis-url: ", "--redis-url", "r:6379")

    def test_storage_url(self):
        for url in ("memory://", "sqlite:///tmp/db.sqlite", "postgres://u:p@db/exposr"):
            self.assertEqual(ok("--storage-url", url).storage_url, url)
        self.assertError(
            "--storage-url: Unsupported storage type postgresql:. "
            "Valid options are redis, postgres or sqlite",
            "--storage-url", "postgresql://db/x",
        )
        self.assertError("--storage-url: invalid URL 'nothing'", "--storage-url", "nothing")


class ResolutionTests(TestCase, ErrorMixin):
    """Two-phase resolution of dependent defaults (docs/protocol.rst, "Configuration")."""

    def test_redis_url_alone(self):
        config = ok("--redis-url", "redis://redis")
        self.assertEqual(config.cluster, "redis")
        self.assertEqual(config.cluster_redis_url, "redis://redis")
        self.assertEqual(config.storage_url, "redis://redis")

    def test_redis_url_keeps_explicit_values(self):
        config = ok(
            "--redis-url", "redis://a", "--cluster-redis-url", "redis://b",
            "--storage-url", "postgres://db/x", "--cluster", "udp",
        )
        self.assertEqual(
            (config.cluster, config.cluster_redis_url, config.storage_url),
            ("udp", "redis://b", "postgres://db/x"),
        )

    def test_auto_with_memory_storage(self):
        self.assertEqual(ok("--cluster", "auto").cluster, "single-node")

    def test_auto_with_sqlite_storage(self):
        self.assertEqual(ok("--storage-url", "sqlite://db.sqlite").cluster, "single-node")

    def test_auto_with_shared_storage(self):
        self.assertEqual(ok("--cluster", "auto", "--storage-url", "redis://r").cluster, "udp")
        self.assertEqual(ok("--storage-url", "postgres://db/x").cluster, "udp")

    def test_cluster_redis_requires_url(self):
        self.assertError(
            "Missing required argument: cluster-redis-url",
            "--cluster", "redis", "--ingress-http-domain", URL,
        )
        config = parse(
            "--cluster", "redis", "--ingress-http-domain", URL, "--redis-url", "redis://r"
        )
        self.assertEqual((config.cluster, config.cluster_redis_url), ("redis", "redis://r"))
        self.assertEqual(config.ingress_http_url, URL)

    def test_sqlite_needs_single_node(self):
        message = "--storage-url: SQlite storage can only be used in single-node mode"
        sqlite = ("--storage-url", "sqlite://db", "--ingress-http-url", URL)
        self.assertError(message, "--cluster", "udp", *sqlite)
        self.assertError(message, "--redis-url", "redis://r", *sqlite)
        self.assertEqual(ok("--cluster", "single-node", *sqlite).cluster, "single-node")

    def test_cluster_choices(self):
        for mode in ("single-node", "udp"):
            self.assertEqual(ok("--cluster", mode).cluster, mode)
        self.assertError(
            "--cluster: invalid choice 'multi' (choose from auto, single-node, udp, redis)",
            "--cluster", "multi",
        )

    def test_ingress_http_domain(self):
        self.assertEqual(parse("--ingress-http-domain", URL).ingress_http_url, URL)
        config = parse("--ingress-http-url", URL, "--ingress-http-domain", "https://old.example")
        self.assertEqual(config.ingress_http_url, URL)
        self.assertEqual(parse(EXPOSR_INGRESS_HTTP_DOMAIN=URL).ingress_http_url, URL)

    def test_http_url_not_required_without_http_ingress(self):
        cert = self.mktemp()
        with open(cert, "w") as f:
            f.write("pem")
        config = parse("--ingress", "sni", "--ingress-sni-cert", cert, "--ingress-sni-key", cert)
        self.assertEqual((config.ingress_sni_cert, config.ingress_sni_key), (cert, cert))


class SniTests(TestCase, ErrorMixin):
    def setUp(self):
        self.cert = self.mktemp()
        with open(self.cert, "w") as f:
            f.write("pem")

    def test_cert_and_key_required(self):
        self.assertError(
            "--ingress-sni-cert: required when SNI ingress is enabled",
            "--ingress", "sni", "--ingress-sni-key", self.cert,
        )
        self.assertError(
            "--ingress-sni-key: required when SNI ingress is enabled",
            "--ingress", "sni", "--ingress-sni-cert", self.cert,
        )

    def test_unreadable(self):
        missing = self.mktemp()
        self.assertError(
            f"--ingress-sni-key: cannot read {missing}: No such file or directory",
            "--ingress", "sni", "--ingress-sni-cert", self.cert, "--ingress-sni-key", missing,
        )

    def test_not_checked_when_sni_off(self):
        self.assertEqual(ok("--ingress-sni-cert", "/nonexistent").ingress_sni_cert, "/nonexistent")

    def test_sni_host(self):
        host = "tun.example.com:443"
        self.assertEqual(ok("--ingress-sni-host", host).ingress_sni_host, host)


class SshTests(TestCase, ErrorMixin):
    def test_key_inline(self):
        self.assertEqual(ok("--transport-ssh-key", KEY).transport_ssh_key, KEY)

    def test_key_base64(self):
        encoded = base64.b64encode(KEY.encode()).decode()
        self.assertEqual(ok("--transport-ssh-key", encoded).transport_ssh_key, KEY)
        self.assertEqual(ok(EXPOSR_TRANSPORT_SSH_KEY=encoded).transport_ssh_key, KEY)

    def test_key_path(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(KEY)
        self.assertEqual(ok("--transport-ssh-key", path).transport_ssh_key, KEY)

    def test_key_bad(self):
        self.assertError(
            "--transport-ssh-key: transport-ssh-key requires either path to key or key content,"
            " got /no/such/key",
            "--ingress-http-url", URL, "--transport-ssh-key", "/no/such/key",
        )
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a key\nat all")
        self.assertErrorStartsWith(
            "--transport-ssh-key: transport-ssh-key requires either path to key or key content",
            "--ingress-http-url", URL, "--transport-ssh-key", path,
        )

    def test_key_default_generated(self):
        self.assertIsNone(ok().transport_ssh_key)

    def test_ssh_host(self):
        for host in ("ssh.example.com", "ssh.example.com:2222", "10.0.0.1", "[::1]:22"):
            self.assertEqual(ok("--transport-ssh-host", host).transport_ssh_host, host)
        for bad in ("bad host", "a/b", "h:99999", "user@h"):
            self.assertError(
                f"--transport-ssh-host: Invalid hostname {bad}",
                "--ingress-http-url", URL, "--transport-ssh-host", bad,
            )


class OtherOptionTests(TestCase, ErrorMixin):
    def test_admin_api_key_empty_is_none(self):
        self.assertIsNone(ok("--admin-api-key", "").admin_api_key)
        self.assertIsNone(ok(EXPOSR_ADMIN_API_KEY="").admin_api_key)
        self.assertEqual(ok("--admin-api-key", "s3cret").admin_api_key, "s3cret")

    def test_multicast_group(self):
        name = "--cluster-udp-discovery-multicast-group"
        self.assertEqual(ok(name, "239.1.2.3").cluster_udp_discovery_multicast_group, "239.1.2.3")
        self.assertError(
            f"{name}: 224.0.0.1 is not within the private multicast range 239.0.0.0/8",
            "--ingress-http-url", URL, name, "224.0.0.1",
        )
        self.assertErrorStartsWith(f"{name}: ", "--ingress-http-url", URL, name, "group")

    def test_kubernetes_discovery(self):
        config = ok(
            "--cluster-udp-discovery", "kubernetes",
            "--cluster-udp-discovery-kubernetes-service", "svc",
            "--cluster-udp-discovery-kubernetes-namespace", "ns",
            "--cluster-udp-discovery-kubernetes-service-env", "SVC",
            "--cluster-udp-discovery-kubernetes-namespace-env", "NS",
            "--cluster-udp-discovery-kubernetes-cluster-domain", "k8s.local",
        )
        self.assertEqual(
            (
                config.cluster_udp_discovery,
                config.cluster_udp_discovery_kubernetes_service,
                config.cluster_udp_discovery_kubernetes_namespace,
                config.cluster_udp_discovery_kubernetes_service_env,
                config.cluster_udp_discovery_kubernetes_namespace_env,
                config.cluster_udp_discovery_kubernetes_cluster_domain,
            ),
            ("kubernetes", "svc", "ns", "SVC", "NS", "k8s.local"),
        )
        self.assertErrorStartsWith(
            "--cluster-udp-discovery: invalid choice 'dns'", "--cluster-udp-discovery", "dns"
        )

    def test_kubernetes_namespace_file(self):
        name = "--cluster-udp-discovery-kubernetes-namespace-file"
        self.assertEqual(ok().cluster_udp_discovery_kubernetes_namespace_file,
                         "/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        self.assertEqual(ok(name, "/tmp/ns").cluster_udp_discovery_kubernetes_namespace_file, "/tmp/ns")

    def test_multicast_ttl(self):
        name = "--cluster-udp-discovery-multicast-ttl"
        self.assertEqual(ok().cluster_udp_discovery_multicast_ttl, 1)
        self.assertEqual(ok(name, "0").cluster_udp_discovery_multicast_ttl, 0)
        self.assertEqual(ok(EXPOSR_CLUSTER_UDP_DISCOVERY_MULTICAST_TTL="32").cluster_udp_discovery_multicast_ttl, 32)
        for bad in ("256", "-1", "one"):
            self.assertError(f"{name}: expected a TTL 0-255, got {bad!r}", "--ingress-http-url", URL, name, bad)

    def test_trusted_proxies(self):
        self.assertEqual(ok().ingress_http_trusted_proxies, DEFAULT_TRUSTED_PROXIES)
        config = ok("--ingress-http-trusted-proxies", "10.1.0.0/16, 192.0.2.7,2001:db8::/32")
        self.assertEqual(
            config.ingress_http_trusted_proxies, ("10.1.0.0/16", "192.0.2.7/32", "2001:db8::/32")
        )
        config = ok("--ingress-http-trusted-proxies", "none")
        self.assertEqual(config.ingress_http_trusted_proxies, ())
        self.assertErrorStartsWith(
            "--ingress-http-trusted-proxies: expected a comma list of CIDRs",
            "--ingress-http-trusted-proxies", "10.0.0.0/33",
        )

    def test_cluster_node_ip(self):
        self.assertEqual(ok("--cluster-node-ip", "10.0.0.5").cluster_node_ip, "10.0.0.5")
        self.assertError(
            "--cluster-node-ip: expected an IP address, got 'node1'",
            "--ingress-http-url", URL, "--cluster-node-ip", "node1",
        )

    def test_dns_server(self):
        for server in ("8.8.8.8", "8.8.8.8:53", "::1", "[::1]:5353"):
            self.assertEqual(ok("--dns-server", server).dns_server, server)
        self.assertErrorStartsWith("--dns-server: ", "--dns-server", "dns.google")

    def test_listen_address(self):
        self.assertEqual(ok().listen_address, "")
        self.assertEqual(ok("--listen-address", "127.0.0.1").listen_address, "127.0.0.1")
        self.assertEqual(ok(EXPOSR_LISTEN_ADDRESS="::").listen_address, "::")
        self.assertErrorStartsWith("--listen-address: ", "--listen-address", "localhost")

    def test_logging(self):
        for level in ("all", "trace", "debug", "info", "warn", "error", "fatal", "off"):
            self.assertEqual(ok("--log-level", level).log_level, level)
        self.assertEqual(ok("--log-format", "json").log_format, "json")
        self.assertErrorStartsWith(
            "--log-level: invalid choice 'verbose'", "--log-level", "verbose"
        )
        self.assertEqual(ok("--log-format", "text").log_format, "text")
        self.assertEqual(ok(EXPOSR_LOG_FORMAT="text").log_format, "text")
        self.assertErrorStartsWith("--log-format: invalid choice 'yaml'", "--log-format", "yaml")

    def test_cluster_key(self):
        self.assertEqual(ok("--cluster-key", "k").cluster_key, "k")


class CommandLineTests(TestCase, ErrorMixin):
    def run_exiting(self, *argv):
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        e = self.assertRaises(SystemExit, Options(environ={}).parseOptions, list(argv))
        return e.code, out.getvalue()

    def test_unknown_option_rejected(self):
        self.assertError("option --ingress-http-uri not recognized", "--ingress-http-uri", URL)

    def test_positional_argument_rejected(self):
        self.assertError("unexpected argument 'http'", "--ingress-http-url", URL, "http")

    def test_usage_errors_are_config_errors(self):
        self.assertTrue(issubclass(ConfigError, usage.UsageError))
        self.assertRaises(ConfigError, parse_config, ["--api-port"], {})

    def test_version(self):
        code, out = self.run_exiting("--version")
        self.assertEqual((code, out), (0, f"version: {__version__} (pkg {__version__})\n"))

    def test_help_lists_every_option(self):
        code, out = self.run_exiting("--help")
        self.assertEqual(code, 0)
        self.assertTrue(out.startswith("Usage: exposrd [options]\n"), out[:80])
        for opt in OPTIONS:
            self.assertIn(f"--{opt.name}", out)
        for name in ("--ingress-http-url=URL", "--admin-enable ", "-p, --api-port=PORT", "--version",
                     "--transport-ssh-key=KEY", "--redis-url=URL", "--help"):
            self.assertIn(name, out)
        self.assertNotIn("--no-admin-enable", out)

    def test_help_is_grouped(self):
        code, out = self.run_exiting("--help")
        lines = out.splitlines()
        headings = [line for line in lines if line.endswith(":") and not line.startswith(" ")]
        self.assertEqual(headings, ["Ingress:", "Transports:", "API:", "Admin:", "Cluster:", "Storage:",
                                    "Logging:", "Misc:", "Deprecated:", "Help:"])

        def section(heading):
            start = lines.index(heading) + 1
            end = lines.index("", start) if "" in lines[start:] else len(lines)
            return "\n".join(lines[start:end])

        self.assertIn("--ingress-sni-cert=", section("Ingress:"))
        self.assertIn("--transport-ssh-port=", section("Transports:"))
        self.assertIn("--allow-registration", section("API:"))
        self.assertIn("--admin-api-key=", section("Admin:"))
        self.assertIn("--cluster-discovery-wait=", section("Cluster:"))
        self.assertIn("--storage-pgsql-connection-pool-size=", section("Storage:"))
        self.assertIn("--log-level=", section("Logging:"))
        self.assertIn("--dns-server=", section("Misc:"))
        deprecated = section("Deprecated:")
        self.assertIn("--redis-url=", deprecated)
        self.assertIn("--ingress-http-domain=", deprecated)
        self.assertNotIn("--redis-url=", section("Storage:"))

    def test_help_fits_100_columns(self):
        code, out = self.run_exiting("--help")
        self.assertEqual([line for line in out.splitlines() if len(line) > 100], [])
        self.assertGreater(len(out.splitlines()), len(OPTIONS))

    def test_show_hidden_is_accepted_and_changes_nothing(self):
        _, plain = self.run_exiting("--help")
        code, out = self.run_exiting("--help", "--show-hidden")
        self.assertEqual((code, out), (0, plain))
        self.assertEqual(ok("--show-hidden").api_port, 8080)

    def test_exposrd_help_names_the_command(self):
        from exposr import script

        out = io.StringIO()
        self.patch(sys, "stdout", out)
        e = self.assertRaises(SystemExit, script.main, ["--help"])
        self.assertEqual(e.code, 0)
        self.assertTrue(out.getvalue().startswith("Usage: exposrd [options]\n"), out.getvalue()[:80])
        self.assertIn("--cluster-redis-channel=", out.getvalue())

    def test_as_twistd_subcommand(self):
        """twistd hands the arguments after `exposrd` to a fresh Options."""

        class Twistd(usage.Options):
            subCommands = [
                ["exposrd", None, lambda: Options(environ={"EXPOSR_API_PORT": "7000"}), "exposrd"]
            ]

        parent = Twistd()
        parent.parseOptions(["exposrd", "--ingress-http-url", URL, "--admin-enable"])
        config = parent.subOptions.config
        self.assertEqual((config.api_port, config.admin_enable), (7000, True))


class ClusterOptionTests(TestCase, ErrorMixin):
    def test_redis_bus_needs_shared_storage(self):
        for argv in (("--cluster", "redis", "--cluster-redis-url", "redis://x"),
                     ("--cluster", "redis", "--cluster-redis-url", "redis://x", "--storage-url", "memory://")):
            e = self.assertRaises(ConfigError, parse_config, ("--ingress-http-url", URL) + argv, {})
            self.assertIn("--cluster", str(e))
            self.assertIn("--storage-url", str(e))
            self.assertNotIn("\n", str(e))
        e = self.assertRaises(ConfigError, parse_config, ("--ingress-http-url", URL),
                              {"EXPOSR_CLUSTER": "redis", "EXPOSR_CLUSTER_REDIS_URL": "redis://x"})
        self.assertIn("--storage-url", str(e))

    def test_redis_bus_with_shared_storage(self):
        for storage in ("redis://x/1", "postgres://db/x"):
            config = ok("--cluster", "redis", "--cluster-redis-url", "redis://x", "--storage-url", storage)
            self.assertEqual((config.cluster, config.cluster_redis_url, config.storage_url),
                             ("redis", "redis://x", storage))

    def test_udp_with_memory_storage_still_starts(self):
        self.assertEqual(ok("--cluster", "udp").cluster, "udp")

    def test_redis_channel(self):
        self.assertEqual(ok().cluster_redis_channel, "exposr")
        self.assertEqual(ok("--cluster-redis-channel", "exposr-test").cluster_redis_channel, "exposr-test")
        self.assertEqual(ok(EXPOSR_CLUSTER_REDIS_CHANNEL="from-env").cluster_redis_channel, "from-env")
        self.assertEqual(
            ok("--cluster-redis-channel", "cli", EXPOSR_CLUSTER_REDIS_CHANNEL="env").cluster_redis_channel, "cli"
        )

    def test_discovery_wait(self):
        self.assertIsNone(ok().cluster_discovery_wait)
        self.assertEqual(ok("--cluster-discovery-wait", "0").cluster_discovery_wait, 0.0)
        self.assertEqual(ok("--cluster-discovery-wait", "2.5").cluster_discovery_wait, 2.5)
        self.assertEqual(ok(EXPOSR_CLUSTER_DISCOVERY_WAIT="7").cluster_discovery_wait, 7.0)
        self.assertError(
            "--cluster-discovery-wait: expected a number of seconds, got 'soon'",
            "--ingress-http-url", URL, "--cluster-discovery-wait", "soon",
        )
        self.assertErrorStartsWith(
            "EXPOSR_CLUSTER_DISCOVERY_WAIT: expected a number of seconds",
            "--ingress-http-url", URL, EXPOSR_CLUSTER_DISCOVERY_WAIT="-1",
        )



class DeprecatedOptionTests(TestCase):
    def test_none_in_use(self):
        self.assertEqual(ok().deprecated, ())

    def test_each_deprecated_option_names_its_replacement(self):
        self.assertEqual(parse("--ingress-http-domain", URL).deprecated,
                         (("--ingress-http-domain", "--ingress-http-url"),))
        self.assertEqual(parse(EXPOSR_INGRESS_HTTP_DOMAIN=URL).deprecated,
                         (("EXPOSR_INGRESS_HTTP_DOMAIN", "EXPOSR_INGRESS_HTTP_URL"),))
        self.assertEqual(ok("--redis-url", "redis://r").deprecated,
                         (("--redis-url", "--storage-url and --cluster-redis-url"),))
        self.assertEqual(ok(EXPOSR_REDIS_URL="redis://r", EXPOSR_INGRESS_HTTP_DOMAIN=URL).deprecated,
                         (("EXPOSR_INGRESS_HTTP_DOMAIN", "EXPOSR_INGRESS_HTTP_URL"),
                          ("EXPOSR_REDIS_URL", "EXPOSR_STORAGE_URL and EXPOSR_CLUSTER_REDIS_URL")))
