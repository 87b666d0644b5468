"""The SSH transport: tunnels carried by plain ``ssh -R`` (moved; split follows)."""

from exposr.transport.ssh.tunnel import *  # noqa: F401,F403
from exposr.transport.ssh.tunnel import LOCAL_WINDOW, MAX_REMOTE_PACKET  # noqa: F401
