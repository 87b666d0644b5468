"""TLS client connection creators for the exposr client (verified or not)."""

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedCreator:
    """TLS without certificate verification (``--insecure``); still sends SNI."""

    def __init__(self, hostname):
        self._hostname = hostname.encode("idna") if isinstance(hostname, str) else hostname
        self._ctx = ssl.CertificateOptions(verify=False).getContext()

    def clientConnectionForTLS(self, tlsProtocol):
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        try:
            conn.set_tlsext_host_name(self._hostname)
        except (ValueError, SSL.Error):  # pragma: no cover - e.g. an IP literal
            pass
        return conn


def client_creator(hostname, insecure=False):
    """A connection creator for ``wrapClientTLS``/``connectSSL`` to `hostname`."""
    if insecure:
        return _UnverifiedCreator(hostname)
    return ssl.optionsForClientTLS(hostname)


@implementer(IPolicyForHTTPS)
class InsecurePolicy:
    """`Agent` TLS policy that skips certificate verification."""

    def creatorForNetloc(self, hostname, port):
        return _UnverifiedCreator(hostname.decode("ascii") if isinstance(hostname, bytes) else hostname)
