"""SSH transport and SNI ingress figures against a direct baseline, in one run.

Starts a fast local target (Node: HTTP and HTTPS with a generated wildcard
certificate), an `exposrd` subprocess (HTTP + SNI ingress, WS + SSH
transports), an OpenSSH `ssh -R` tunnel and the Python `exposr` client (WS),
then prints:

* HTTP: req/s and p50/p99 latency with wrk (10 and 50 connections), and MB/s
  of a 100 MB download (curl), direct vs through SSH (and WS for reference);
* SNI: TLS handshakes/s (new TLS connection + one small request, 10 in
  parallel) and MB/s of a 100 MB download, TLS direct to a TLS target vs
  through the SNI ingress + WS tunnel (and + SSH tunnel);
* ratios tunnel/direct, and exposrd RSS.

    .venv/bin/python bench/ssh_sni_bench.py [seconds-per-wrk-run] [--prelude=FILE]

``--prelude=FILE`` runs the Python code in FILE inside exposrd before it
starts: a way to try a patch (a monkeypatch of a method, say) against the
code as it is, with the same bench.

Needs node, wrk, curl and ssh on PATH.
"""

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from benchlib import free_port, rss_mb  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
DOMAIN = "example.test"
SIZE = 100 * 1024 * 1024

TARGET_JS = r"""
const http = require('http'), https = require('https'), fs = require('fs');
const [httpPort, httpsPort, cert, key] = process.argv.slice(2);
const block = Buffer.alloc(1 << 20, 'x');
function handler(req, res) {
  const m = req.url.match(/^\/bytes\/(\d+)/);
  if (!m) { res.writeHead(200, {'content-type': 'text/plain', 'content-length': 13}); res.end('hello, world\n'); return; }
  let left = parseInt(m[1]);
  res.writeHead(200, {'content-type': 'application/octet-stream', 'content-length': left});
  (function more() {
    while (left > 0) {
      const n = Math.min(left, block.length); left -= n;
      if (!res.write(n === block.length ? block : block.subarray(0, n))) { res.once('drain', more); return; }
    }
    res.end();
  })();
}
http.createServer({keepAliveTimeout: 60000}, handler).listen(+httpPort, '127.0.0.1');
https.createServer({cert: fs.readFileSync(cert), key: fs.readFileSync(key), keepAliveTimeout: 60000}, handler)
  .listen(+httpsPort, '127.0.0.1', () => console.log('target ready'));
"""

# new TLS connection (SNI, verified) + one small request + close, `conc` in parallel
HANDSHAKES_JS = r"""
const tls = require('tls'), fs = require('fs');
const [port, servername, ca, conc, seconds] = process.argv.slice(2);
const caPem = fs.readFileSync(ca);
let done = 0, errors = 0, running = true;
const req = `GET / HTTP/1.1\r\nHost: ${servername}\r\nConnection: close\r\n\r\n`;
function one() {
  if (!running) return;
  const s = tls.connect({host: '127.0.0.1', port: +port, servername, ca: caPem});
  let got = '';
  s.on('secureConnect', () => s.write(req));
  s.on('data', d => { got += d; });
  s.on('error', () => { errors++; });
  s.on('close', () => { if (got.startsWith('HTTP/1.1 200')) done++; else errors++; one(); });
}
const start = process.hrtime.bigint();
for (let i = 0; i < +conc; i++) one();
setTimeout(() => {
  running = false;
  const t = Number(process.hrtime.bigint() - start) / 1e9;
  console.log(JSON.stringify({rate: done / t, done, errors}));
  process.exit(0);
}, +seconds * 1000);
"""


def make_cert(directory):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"*.{DOMAIN}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"*.{DOMAIN}"), x509.DNSName("localhost"),
                                                    x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = os.path.join(directory, "tls.crt"), os.path.join(directory, "tls.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def rest(method, url, body=None, token=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def wait_for(predicate, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def curl_ok(url, *extra):
    r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", *extra, url],
                       capture_output=True, timeout=10)
    return r.stdout == b"200"


def wrk(url, conns, seconds, host=None):
    args = ["wrk", "-t", "2", "-c", str(conns), "-d", f"{seconds}s", "--latency"]
    if host:
        args += ["-H", f"Host: {host}"]
    out = subprocess.run(args + [url], capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    return {"rps": rps, "p50": pct(50), "p99": pct(99), "errors": errors.group(0) if errors else ""}


def download(url, *extra):
    best = 0.0
    for _ in range(2):
        r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{speed_download}",
                            *extra, url], capture_output=True, text=True, timeout=120)
        code, size, speed = r.stdout.split()
        if code != "200" or int(size) != SIZE:
            raise SystemExit(f"download of {url} failed: {r.stdout} {r.stderr}")
        best = max(best, float(speed) / 1e6)
    return best


def handshakes(js, port, servername, ca, conc=10, seconds=5):
    out = subprocess.run(["node", js, str(port), servername, ca, str(conc), str(seconds)],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    return json.loads(out)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    preludes = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--prelude=")]
    seconds = int(args[0]) if args else 5
    for tool in ("node", "wrk", "curl", "ssh"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found")
    tmp = tempfile.mkdtemp(prefix="ssh_sni_bench")
    procs = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPOSR_")}

    def start(argv, **kw):
        p = subprocess.Popen(argv, stdout=kw.pop("stdout", subprocess.DEVNULL), stderr=subprocess.STDOUT,
                             env=kw.pop("env", env), start_new_session=True, **kw)
        procs.append(p)
        return p

    try:
        cert, key = make_cert(tmp)
        target_js, hs_js = os.path.join(tmp, "target.js"), os.path.join(tmp, "hs.js")
        with open(target_js, "w") as f:
            f.write(TARGET_JS)
        with open(hs_js, "w") as f:
            f.write(HANDSHAKES_JS)
        http_port, https_port = free_port(), free_port()
        start(["node", target_js, str(http_port), str(https_port), cert, key])
        wait_for(lambda: curl_ok(f"http://127.0.0.1:{http_port}/"), 10, "the target")

        api, ssh_port, sni_port = free_port(), free_port(), free_port()
        log = open(os.path.join(tmp, "exposrd.log"), "wb")
        prelude = "".join(open(path).read() + "\n" for path in preludes)
        server = start([PY, "-c", prelude + "from exposr.script import main; main()",
                        "--allow-registration", "--listen-address", "127.0.0.1",
                        "--api-port", str(api), "--ingress-http-port", str(api),
                        "--ingress-http-url", f"http://localhost:{api}",
                        "--ingress", "http,sni", "--transport", "ws,ssh",
                        "--transport-ssh-port", str(ssh_port),
                        "--ingress-sni-port", str(sni_port), "--ingress-sni-cert", cert, "--ingress-sni-key", key,
                        "--log-level", "warn"], stdout=log, cwd=ROOT)
        base = f"http://127.0.0.1:{api}"
        wait_for(lambda: urllib.request.urlopen(base + "/v1/account", data=b"{}", timeout=2), 20, "exposrd")
        account = rest("POST", base + "/v1/account", {})["account_id"]
        token = rest("GET", f"{base}/v1/account/{account}/token")["token"]
        target = f"http://127.0.0.1:{http_port}"
        for tid in ("sshbench", "wsbench"):
            rest("PUT", f"{base}/v1/tunnel/{tid}", {}, token)
            rest("PATCH", f"{base}/v1/tunnel/{tid}", {
                "target": {"url": target}, "ingress": {"http": {"enabled": True}, "sni": {"enabled": True}},
                "transport": {"ssh": {"enabled": tid == "sshbench"}, "ws": {"enabled": tid == "wsbench"}}}, token)
        info = rest("GET", f"{base}/v1/tunnel/sshbench", token=token)
        home = os.path.join(tmp, "home")
        os.makedirs(home)
        start(["ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "LogLevel=ERROR", "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes",
               "-p", str(info["transport"]["ssh"]["port"]), "-N", "-R", f"0:127.0.0.1:{http_port}",
               info["transport"]["ssh"]["url"]], env={"HOME": home, "PATH": os.environ["PATH"]})
        start([PY, "-c", "from exposr.client.cli import main; main()", "-s", base + "/", "-a", account,
               "tunnel", "connect", "wsbench", target], cwd=ROOT)

        via = {name: (f"http://127.0.0.1:{api}", f"{name}.localhost:{api}") for name in ("sshbench", "wsbench")}
        for name, (url, host) in via.items():
            wait_for(lambda: curl_ok(url + "/", "-H", f"Host: {host}"), 20, f"tunnel {name}")
        sni = {name: f"{name}.{DOMAIN}" for name in via}
        for name, host in sni.items():
            wait_for(lambda: curl_ok(f"https://{host}:{sni_port}/", "--cacert", cert, "--resolve",
                                     f"{host}:{sni_port}:127.0.0.1"), 20, f"SNI {name}")

        rss_start = rss_mb(server.pid)
        print(f"exposrd {server.pid}: RSS {rss_start:.1f} MB after start; {os.cpu_count()} CPUs; "
              f"wrk {seconds} s per run{'; prelude: ' + ', '.join(preludes) if preludes else ''}\n")

        rows = []
        print("100 MB download (curl)        MB/s")
        dl = {
            "direct": download(f"{target}/bytes/{SIZE}"),
            "through SSH": download(f"{via['sshbench'][0]}/bytes/{SIZE}", "-H", f"Host: {via['sshbench'][1]}"),
            "through WS": download(f"{via['wsbench'][0]}/bytes/{SIZE}", "-H", f"Host: {via['wsbench'][1]}"),
        }
        for label, v in dl.items():
            print(f"  {label:<26} {v:>8.1f}")
        rows.append(f"  download SSH/direct: {dl['through SSH'] / dl['direct']:.2f}; WS/direct: "
                    f"{dl['through WS'] / dl['direct']:.2f}")

        print("\nSNI (TLS)                    handshakes/s (+1 request, 10 parallel)   100 MB MB/s")
        direct_host = "localhost"
        hs = {
            "TLS direct": handshakes(hs_js, https_port, direct_host, cert, seconds=seconds),
            "SNI + WS tunnel": handshakes(hs_js, sni_port, sni["wsbench"], cert, seconds=seconds),
            "SNI + SSH tunnel": handshakes(hs_js, sni_port, sni["sshbench"], cert, seconds=seconds),
        }
        tls_dl = {
            "TLS direct": download(f"https://localhost:{https_port}/bytes/{SIZE}", "--cacert", cert),
            "SNI + WS tunnel": download(f"https://{sni['wsbench']}:{sni_port}/bytes/{SIZE}", "--cacert", cert,
                                        "--resolve", f"{sni['wsbench']}:{sni_port}:127.0.0.1"),
            "SNI + SSH tunnel": download(f"https://{sni['sshbench']}:{sni_port}/bytes/{SIZE}", "--cacert", cert,
                                         "--resolve", f"{sni['sshbench']}:{sni_port}:127.0.0.1"),
        }
        for label in hs:
            err = f" ({hs[label]['errors']} errors)" if hs[label]["errors"] else ""
            print(f"  {label:<26} {hs[label]['rate']:>10.0f}{err:<32} {tls_dl[label]:>8.1f}")
        d_hs, d_dl = hs["TLS direct"]["rate"], tls_dl["TLS direct"]
        rows.append(f"  TLS handshakes WS/direct: {hs['SNI + WS tunnel']['rate'] / d_hs:.2f}; "
                    f"SSH/direct: {hs['SNI + SSH tunnel']['rate'] / d_hs:.2f}")
        rows.append(f"  TLS download WS/direct: {tls_dl['SNI + WS tunnel'] / d_dl:.2f}; "
                    f"SSH/direct: {tls_dl['SNI + SSH tunnel'] / d_dl:.2f}")

        print("\nHTTP ingress                 conns    req/s    p50 ms   p99 ms")
        results = {}
        for conns in (10, 50):
            for label, url, host in (("direct", target + "/", None),
                                     ("through SSH", via["sshbench"][0] + "/", via["sshbench"][1]),
                                     ("through WS", via["wsbench"][0] + "/", via["wsbench"][1])):
                r = wrk(url, conns, seconds, host)
                results[(label, conns)] = r
                print(f"  {label:<26} {conns:>5} {r['rps']:>8.0f} {r['p50']:>9.2f} {r['p99']:>8.2f}  {r['errors']}")
        for conns in (10, 50):
            d = results[("direct", conns)]["rps"]
            rows.append(f"  req/s SSH/direct ({conns} conns): {results[('through SSH', conns)]['rps'] / d:.2f}; "
                        f"WS/direct: {results[('through WS', conns)]['rps'] / d:.2f}")

        again = download(f"{via['wsbench'][0]}/bytes/{SIZE}", "-H", f"Host: {via['wsbench'][1]}")
        again_ssh = download(f"{via['sshbench'][0]}/bytes/{SIZE}", "-H", f"Host: {via['sshbench'][1]}")
        print(f"\n100 MB download again after the wrk runs: through SSH {again_ssh:.1f} MB/s, through WS {again:.1f} MB/s")
        print("\nRatios (tunnel / direct)")
        print("\n".join(rows))
        print(f"\nexposrd RSS: {rss_start:.1f} MB at start, {rss_mb(server.pid):.1f} MB at the end")
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
