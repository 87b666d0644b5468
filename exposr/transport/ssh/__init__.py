"""The SSH transport: tunnels carried by plain ``ssh -R``.

``ssh -R 0:localhost:3000 <tunnel>:<token>@host -p 2200`` logs in with the
tunnel's connection token, asks for a remote forward, and from then on every
upstream stream an ingress needs is one ``forwarded-tcpip`` channel the server
opens towards that client. Conch pieces, one job per module (nothing of
``twisted.conch.unix``):

* `service`: host key, factory, listener; tracks live connections.
* `transport`: the hardened server transport (identification string, login
  grace timer, garbage tolerance, back-pressure from the TCP socket,
  disconnects, registration of the logged-in connection).
* `auth`: user authentication and `TunnelAvatar`, what a logged-in client may
  do (forward requests, a few ``session`` channels).
* `connection`: the ``ssh-connection`` service, Conch's with only what
  forwarding needs on top (see its docstring).
* `channels`: the ``session`` and ``forwarded-tcpip`` channels.
* `tunnel`: `SSHTunnelConnection`, the `ITunnelConnection` the registry holds.
* `target`: forward requests to target URLs and back.
* `conch_private`: the Conch internals still relied on, in one place.
"""

from exposr.transport.ssh.auth import TunnelAvatar
from exposr.transport.ssh.service import (
    SSHTransportService,
    fingerprint,
    generate_host_key,
    load_host_key,
)
from exposr.transport.ssh.shared import LOCAL_WINDOW, MAX_REMOTE_PACKET
from exposr.transport.ssh.tunnel import SSHTunnelConnection

__all__ = [
    "LOCAL_WINDOW",
    "MAX_REMOTE_PACKET",
    "SSHTransportService",
    "SSHTunnelConnection",
    "TunnelAvatar",
    "fingerprint",
    "generate_host_key",
    "load_host_key",
]
