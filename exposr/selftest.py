"""``EXPOSR_SELF_TEST=1 exposrd``: check this installation's own dependencies and exit.

The original's three checks need Internet access; these keep
its interface and output format but test what this server depends on locally:
name resolution, the TLS stack (a loopback handshake in memory) and SQLite.
"""

import datetime
import os
import socket
import ssl
import sqlite3
import tempfile


def _dns():
    socket.getaddrinfo("localhost", 80)


def _tls():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self-test.invalid")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(minutes=5))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("self-test.invalid")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    with tempfile.TemporaryDirectory() as d:
        cpath, kpath = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
        with open(cpath, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(kpath, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cpath, kpath)
        client_ctx = ssl.create_default_context(cafile=cpath)
    bios = [ssl.MemoryBIO() for _ in range(4)]
    server = server_ctx.wrap_bio(bios[0], bios[1], server_side=True)
    client = client_ctx.wrap_bio(bios[2], bios[3], server_hostname="self-test.invalid")
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        bios[0].write(bios[3].read())
        bios[2].write(bios[1].read())
        if client.version() and server.version():
            try:
                client.do_handshake()
                server.do_handshake()
                return
            except ssl.SSLWantReadError:
                continue
    raise RuntimeError("TLS handshake did not complete")


def _sqlite():
    path = "self-test.db"
    try:
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES ('x')")
        conn.commit()
        conn.close()
    finally:
        if os.path.exists(path):
            os.remove(path)


CHECKS = (("DNS lookup test", _dns), ("HTTPS connection test", _tls), ("SQLite3 module test", _sqlite))


def run(out=print):
    ok = True
    for name, check in CHECKS:
        try:
            check()
            out(f"{name}: PASS")
        except Exception as e:
            ok = False
            out(f"{name}: FAIL")
            out(f"  {type(e).__name__}: {e}")
    out(f"All tests: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 255
