"""The deployment files in deploy/ hold together without an engine to run them.

Every YAML file parses; the environment each file gives exposrd is a valid
configuration (parsed by the server's own option parser); the ports, probes and
addresses the files declare are the ones that configuration listens on.
"""

import os
import re
import shutil
import subprocess
import sys
from urllib.parse import urlsplit

from twisted.trial.unittest import SkipTest, TestCase

from exposr.options import parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")

try:
    import yaml
except ImportError:  # bash .ci/run installs PyYAML
    yaml = None


def load_all(name):
    if yaml is None:
        raise SkipTest("PyYAML is not installed (bash .ci/run installs it)")
    with open(os.path.join(DEPLOY, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load(name):
    (doc,) = load_all(name)
    return doc


def interpolate(value):
    """Compose's ${VAR:?message} / ${VAR:-default} / ${VAR}, with a stand-in value."""
    return re.sub(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}", lambda m: f"stand-in-{m.group(1).lower()}", str(value))


def config_of(environ):
    return parse_config([], {k: str(v) for k, v in environ.items()})


class YamlTests(TestCase):
    def test_every_yaml_file_parses(self):
        names = []
        for dirpath, _, files in os.walk(DEPLOY):
            for f in files:
                if f.endswith((".yaml", ".yml")):
                    names.append(os.path.relpath(os.path.join(dirpath, f), DEPLOY))
        self.assertIn("compose.yaml", names)
        self.assertIn("helm-values.yaml", names)
        for name in names:
            self.assertTrue(load_all(name), name)


class ComposeTests(TestCase):
    def setUp(self):
        self.compose = load("compose.yaml")
        self.services = self.compose["services"]
        self.nodes = {n: s for n, s in self.services.items() if n.startswith("exposrd-")}

    def test_every_service_has_an_image_and_a_network_address(self):
        subnet = self.compose["networks"]["exposr"]["ipam"]["config"][0]["subnet"]
        prefix = subnet.rsplit(".", 1)[0] + "."
        addresses = []
        for name, service in self.services.items():
            self.assertTrue(service.get("image") or service.get("build"), name)
            address = service["networks"]["exposr"]["ipv4_address"]
            self.assertTrue(address.startswith(prefix), (name, address))
            addresses.append(address)
        self.assertEqual(len(addresses), len(set(addresses)))

    def test_three_nodes_share_redis_and_advertise_their_own_address(self):
        self.assertEqual(len(self.nodes), 3)
        ports = set()
        for name, service in self.nodes.items():
            config = config_of({k: interpolate(v) for k, v in service["environment"].items()})
            self.assertEqual(config.cluster, "redis", name)
            for url in (config.storage_url, config.cluster_redis_url):
                self.assertEqual(urlsplit(url).scheme, "redis")
                self.assertIn(urlsplit(url).hostname, self.services)
            self.assertEqual(config.cluster_node_ip, service["networks"]["exposr"]["ipv4_address"])
            self.assertTrue(config.admin_enable)
            self.assertEqual(config.api_port, config.ingress_http_port)
            node_ports = (config.api_port, config.admin_port, config.transport_ssh_port)
            self.assertEqual(sorted(int(p) for p in service["expose"]), sorted(node_ports), name)
            ports.add(node_ports)
            self.assertTrue(service["depends_on"]["redis"])
        self.assertEqual(len(ports), 1, "the nodes listen on the same ports")

    def test_haproxy_balances_every_node_and_checks_health_on_the_admin_port(self):
        haproxy = self.services["haproxy"]
        volume = next(v for v in haproxy["volumes"] if "haproxy.cfg" in v)
        self.assertTrue(os.path.exists(os.path.join(DEPLOY, volume.split(":")[0])))
        with open(os.path.join(DEPLOY, "haproxy.cfg")) as f:
            cfg = f.read()
        any_node = next(iter(self.nodes.values()))
        config = config_of({k: interpolate(v) for k, v in any_node["environment"].items()})
        for name in self.nodes:
            self.assertIn(f"server {name} {name}:{config.api_port}", cfg)
            self.assertIn(f"server {name} {name}:{config.transport_ssh_port}", cfg)
        self.assertIn(f"check port {config.admin_port}", cfg)
        self.assertIn("uri /health", cfg)
        published = {p.split(":")[1] for p in haproxy["ports"]}
        self.assertLessEqual({str(config.api_port), str(config.transport_ssh_port)}, published)
        # X-Forwarded-For from HAProxy is trusted, and only from it
        self.assertIn("option forwardfor", cfg)
        trusted = [str(n) for n in config.ingress_http_trusted_proxies]
        self.assertEqual(trusted, [haproxy["networks"]["exposr"]["ipv4_address"] + "/32"])


class KubernetesTests(TestCase):
    def setUp(self):
        docs = []
        for name in sorted(os.listdir(os.path.join(DEPLOY, "kubernetes"))):
            docs += load_all(os.path.join("kubernetes", name))
        self.kinds = {}
        for d in docs:
            self.assertTrue({"apiVersion", "kind", "metadata"} <= set(d), d)
            self.kinds.setdefault(d["kind"], []).append(d)
        (self.deployment,) = self.kinds["Deployment"]
        self.pod = self.deployment["spec"]["template"]
        (self.container,) = self.pod["spec"]["containers"]
        self.configmaps = {c["metadata"]["name"]: c["data"] for c in self.kinds["ConfigMap"]}

    def container_env(self):
        env = {}
        for source in self.container.get("envFrom", []):
            env.update(self.configmaps[source["configMapRef"]["name"]])
        for item in self.container.get("env", []):
            env[item["name"]] = item.get("value", f"from-{item['name'].lower()}")
        return env

    def test_the_environment_is_the_charts_and_a_valid_configuration(self):
        env = self.container_env()
        self.assertEqual({"POD_NAME", "POD_NAMESPACE", "SERVICE_NAME"} - set(env), set())
        config = config_of(env)
        self.assertTrue(config.admin_enable)
        self.assertEqual((config.api_port, config.admin_port), (8080, 9000))
        self.assertEqual(config.ingress_http_url, env["EXPOSR_INGRESS_HTTP_DOMAIN"])

    def test_ports_and_probes_match_the_configuration(self):
        config = config_of(self.container_env())
        ports = {p["name"]: (p["containerPort"], p.get("protocol", "TCP")) for p in self.container["ports"]}
        self.assertEqual(ports["http"], (config.api_port, "TCP"))
        self.assertEqual(ports["admin"], (config.admin_port, "TCP"))
        self.assertEqual(ports["cluster"], (config.cluster_udp_port, "UDP"))
        probes = {kind: self.container[kind + "Probe"]["httpGet"] for kind in ("readiness", "liveness", "startup")}
        self.assertEqual({k: p["path"] for k, p in probes.items()},
                         {"readiness": "/health", "liveness": "/ping", "startup": "/ping"})
        for probe in probes.values():
            port = probe["port"]
            self.assertEqual(ports[port][0] if isinstance(port, str) else port, config.admin_port)

    def test_services_select_the_pods_and_name_their_ports(self):
        labels = self.pod["metadata"]["labels"]
        self.assertEqual(self.deployment["spec"]["selector"]["matchLabels"].items() - labels.items(), set())
        names = {p["name"] for p in self.container["ports"]}
        services = {s["metadata"]["name"]: s for s in self.kinds["Service"]}
        for name, service in services.items():
            self.assertEqual(service["spec"]["selector"].items() - labels.items(), set(), name)
            for port in service["spec"]["ports"]:
                self.assertIn(port["targetPort"], names, name)
        headless = services[self.container_env()["SERVICE_NAME"]]
        self.assertEqual(headless["spec"]["clusterIP"], "None")
        self.assertEqual([p["protocol"] for p in headless["spec"]["ports"]], ["UDP"])

    def test_runs_as_the_images_user_without_privileges(self):
        self.assertEqual(self.pod["spec"]["securityContext"]["runAsUser"], 10001)
        self.assertFalse(self.container["securityContext"]["allowPrivilegeEscalation"])


class HelmValuesTests(TestCase):
    def test_points_the_chart_at_this_image(self):
        values = load("helm-values.yaml")
        self.assertTrue(values["image"]["repository"])
        self.assertIn(values["exposr"]["cluster"]["type"], ("udp", "redis", "single-node"))
        self.assertEqual(values["podSecurityContext"]["runAsUser"], 10001)


class DockerfileTests(TestCase):
    def test_exposes_the_charts_ports_and_has_a_healthcheck(self):
        with open(os.path.join(ROOT, "Dockerfile")) as f:
            text = f.read()
        exposed = set(re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split())
        self.assertEqual({"8080", "8081", "9000", "2200", "4430", "1025/udp"} - exposed, set())
        self.assertRegex(text, r"(?m)^HEALTHCHECK .*")
        self.assertRegex(text, r"(?m)^USER 10001$")
        self.assertRegex(text, r"(?m)^ARG BASE=python:3\.11-slim$")


class SystemdTests(TestCase):
    unit = os.path.join(DEPLOY, "exposrd.service")

    def test_unit_is_hardened(self):
        with open(self.unit) as f:
            lines = [l.strip() for l in f if l.strip() and not l.startswith("#")]
        for setting in ("DynamicUser=yes", "ProtectSystem=strict", "ProtectHome=yes",
                        "NoNewPrivileges=yes", "PrivateTmp=yes", "CapabilityBoundingSet=",
                        "EnvironmentFile=-/etc/exposrd/env"):
            self.assertIn(setting, lines)
        self.assertNotIn("AmbientCapabilities=CAP_NET_BIND_SERVICE", lines)  # only if asked

    def test_example_environment_file_is_a_valid_configuration(self):
        env = {}
        with open(os.path.join(DEPLOY, "exposrd.env")) as f:
            for line in f:
                if line.strip() and not line.startswith("#"):
                    key, _, value = line.strip().partition("=")
                    env[key] = value
        config = config_of(env)
        self.assertTrue(config.admin_enable)
        self.assertTrue(config.storage_url.startswith("sqlite:///var/lib/exposrd/"))

    def test_systemd_analyze_verify(self):
        analyze = shutil.which("systemd-analyze")
        if not analyze:
            raise SkipTest("systemd-analyze is not installed")
        # the unit runs /opt/exposr/bin/exposrd; here, the one of this Python
        exe = os.path.join(os.path.dirname(sys.executable), "exposrd")
        if not os.access(exe, os.X_OK):
            exe = sys.executable
        with open(self.unit) as f:
            text = f.read().replace("/opt/exposr/bin/exposrd", exe)
        tmp = self.mktemp()
        os.makedirs(tmp)
        path = os.path.join(tmp, "exposrd.service")
        with open(path, "w") as f:
            f.write(text)
        result = subprocess.run([analyze, "verify", path], capture_output=True, text=True, timeout=60)
        # unknown keys and bad values are only warnings: any output is a failure here
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))
