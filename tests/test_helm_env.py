"""`exposrd` started with exactly the environment the original's Helm chart renders.

The chart (exposr/helm-charts, chart `exposr`) configures the pod only through
environment variables: a ConfigMap of EXPOSR_* values and the Deployment's
POD_NAME / POD_NAMESPACE / SERVICE_NAME. Its probes are GET /health (readiness) and
GET /ping (liveness, start-up) on the admin port 9000. Only the ports are moved
to free ones here, through the same EXPOSR_* variables, so that tests can run side
by side, and the service-account namespace file Kubernetes mounts in every pod
(which makes Kubernetes peer discovery eligible) is a temporary file.
"""

import base64
import os
import signal
import socket

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests import procs
from tests.test_certificate import make_cert, write_pair

DOMAIN = "tunnel.example.com"

# What the chart's templates render for its default values.
CHART_DEFAULTS = {
    "EXPOSR_LOG_LEVEL": "info",
    "EXPOSR_ADMIN_ENABLE": "true",
    "EXPOSR_ADMIN_PORT": "9000",
    "EXPOSR_ALLOW_REGISTRATION": "false",
    "EXPOSR_API_PORT": "8080",
    "EXPOSR_CLUSTER": "udp",
    "EXPOSR_CLUSTER_KEY": "cluster-signing-key-change-me",
    "EXPOSR_CLUSTER_UDP_DISCOVERY": "kubernetes",
    "EXPOSR_STORAGE_URL": "memory://",
    "EXPOSR_INGRESS": "http",
    "EXPOSR_INGRESS_HTTP_DOMAIN": f"https://{DOMAIN}",  # the deprecated name, as the chart writes it
    "EXPOSR_INGRESS_HTTP_PORT": "8080",
    "EXPOSR_TRANSPORT": "ws",
    "EXPOSR_TRANSPORT_MAX_CONNECTIONS": "2",
    # from the Deployment (Kubernetes peer discovery reads them)
    "POD_NAME": "exposr-5d9c7b7f4-x2x9q",
    "POD_NAMESPACE": "default",
    "SERVICE_NAME": "exposr-headless",
}

# (the default test waits the start-up peer discovery out; the others skip it)
NO_PEER_WAIT = {"EXPOSR_CLUSTER_DISCOVERY_WAIT": "0"}


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chart_env(namespace_file, **values):
    """The chart's environment with `values` changed, ports moved to free ones,
    the pod's service-account namespace file written at `namespace_file`.

    Returns (environ, ports): ports maps "api", "admin", "udp" (and "admin_api",
    "sni", "ssh" when those are enabled) to the port numbers used.
    """
    e = dict(CHART_DEFAULTS, **values)
    # what Kubernetes mounts in every pod (Kubernetes peer discovery needs it), here
    # a file of the test's own
    with open(namespace_file, "w") as f:
        f.write(e["POD_NAMESPACE"])
    e["EXPOSR_CLUSTER_UDP_DISCOVERY_KUBERNETES_NAMESPACE_FILE"] = namespace_file
    ports = {"api": procs.free_port(), "admin": procs.free_port(), "udp": free_udp_port()}
    e["EXPOSR_API_PORT"] = e["EXPOSR_INGRESS_HTTP_PORT"] = str(ports["api"])
    e["EXPOSR_ADMIN_PORT"] = str(ports["admin"])
    # not rendered by the chart (the default 1025 is used); moved for side-by-side runs
    e["EXPOSR_CLUSTER_UDP_PORT"] = str(ports["udp"])
    for name, var in (("admin_api", "EXPOSR_ADMIN_API_PORT"), ("sni", "EXPOSR_INGRESS_SNI_PORT"),
                      ("ssh", "EXPOSR_TRANSPORT_SSH_PORT")):
        if var in e:
            ports[name] = procs.free_port()
            e[var] = str(ports[name])
    return procs.env(**e), ports


def ssh_host_key():
    """(an RSA host key in OpenSSH format base64-encoded as the chart passes it, its public key line)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return base64.b64encode(pem).decode(), public


class ChartEnvironmentTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def start(self, environ):
        proto, transport = procs.exposrd(environ=environ)
        self.addCleanup(lambda: proto.ended.addTimeout(30, reactor))
        self.addCleanup(procs.stop, transport, signal.SIGKILL)
        # a cluster node waits for its peers (20 s by default) before it is ready
        yield proto.wait_for(b"exposrd ready", timeout=45)
        return proto, transport

    @defer.inlineCallbacks
    def assert_probes_pass(self, ports):
        """The chart's readiness (/health) and liveness/start-up (/ping) probes."""
        for path in ("/ping", "/health"):
            status, _ = yield procs.http("GET", f"http://127.0.0.1:{ports['admin']}{path}")
            self.assertEqual(status, 200, path)

    @defer.inlineCallbacks
    def stop_cleanly(self, proto, transport):
        procs.stop(transport, signal.SIGTERM)
        code = yield proto.ended.addTimeout(30, reactor)
        self.assertEqual(code, 0)
        self.assertNotIn(b"Traceback", proto.output)
        self.assertNotIn(b'"level":"ERROR"', proto.output)

    @defer.inlineCallbacks
    def test_default_values_start_ready_and_serve(self):
        environ, ports = chart_env(self.mktemp())
        proto, transport = yield self.start(environ)
        yield self.assert_probes_pass(ports)

        api = f"http://127.0.0.1:{ports['api']}"
        # the public API answers (no token: 401), registration is off by default
        status, body = yield procs.http("GET", f"{api}/v1/tunnel/my-tunnel")
        self.assertEqual(status, 401)
        self.assertIn(b"error", body)
        status, _ = yield procs.http("POST", f"{api}/v1/account", b"{}")
        self.assertEqual(status, 404)
        # the HTTP ingress shares the API port and knows the domain from the deprecated name
        status, body = yield procs.http("GET", f"{api}/", headers={"Host": f"nothing.{DOMAIN}"})
        self.assertEqual((status, procs.jsonof(body)), (404, {"error": "TUNNEL_NOT_FOUND"}))
        # the admin interface is where the probes look, not on the API port
        status, _ = yield procs.http("GET", f"{api}/ping")
        self.assertEqual(status, 404)
        yield self.stop_cleanly(proto, transport)

    @defer.inlineCallbacks
    def test_admin_api_enabled_listens_beside_the_admin_port(self):
        # exposr.admin.enabled=true and exposr.admin.apiKey set
        environ, ports = chart_env(self.mktemp(), EXPOSR_ADMIN_API_ENABLE="true", EXPOSR_ADMIN_API_PORT="8081",
                                   EXPOSR_ADMIN_API_KEY="admin-key-for-test", **NO_PEER_WAIT)
        proto, transport = yield self.start(environ)
        yield self.assert_probes_pass(ports)
        admin_api = f"http://127.0.0.1:{ports['admin_api']}/v1/admin/cluster"
        status, _ = yield procs.http("GET", admin_api)
        self.assertEqual(status, 403)
        status, body = yield procs.http("GET", admin_api,
                                        headers={"Authorization": "Bearer " + base64.b64encode(b"admin-key-for-test").decode()})
        self.assertEqual(status, 200, body)
        yield self.stop_cleanly(proto, transport)

    @defer.inlineCallbacks
    def test_sni_secret_and_ssh_key_from_a_secret(self):
        # exposr.ingress.sni.enabled with its TLS secret mounted (here: files in a
        # temporary directory standing in for /etc/exposr/ingress/sni/cert), and
        # exposr.transport.ssh.enabled with a host key, base64-encoded
        certdir = self.mktemp()
        os.makedirs(certdir)
        cert_path, key_path = write_pair(certdir, *make_cert(cn=f"*.{DOMAIN}"))
        ssh_key, ssh_public = ssh_host_key()
        environ, ports = chart_env(
            self.mktemp(), EXPOSR_INGRESS="http,sni", EXPOSR_INGRESS_SNI_PORT="4430",
            EXPOSR_INGRESS_SNI_CERT=cert_path, EXPOSR_INGRESS_SNI_KEY=key_path,
            EXPOSR_TRANSPORT="ws,ssh", EXPOSR_TRANSPORT_SSH_PORT="2200",
            EXPOSR_TRANSPORT_SSH_KEY=ssh_key, **NO_PEER_WAIT,
        )
        proto, transport = yield self.start(environ)
        yield self.assert_probes_pass(ports)
        self.assertIn(f"sni listening on 0.0.0.0:{ports['sni']}".encode(), proto.output)
        # the SSH transport serves the host key given, not a generated one
        code, out, err = yield procs.run(
            ["ssh-keyscan", "-T", "10", "-t", "rsa", "-p", str(ports["ssh"]), "127.0.0.1"])
        self.assertEqual(code, 0, err)
        self.assertIn(ssh_public.split()[1], out.split())
        yield self.stop_cleanly(proto, transport)

