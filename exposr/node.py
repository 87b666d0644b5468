"""This process's identity in a cluster: node id, host, advertised IP."""

import os
import secrets
import socket

import attrs


def _guess_ip():
    """The address of the interface the default route would use, else loopback.

    A UDP "connect" sends nothing; it only asks the kernel to pick a source.
    """
    for family, probe in ((socket.AF_INET, ("192.0.2.1", 9)), (socket.AF_INET6, ("2001:db8::1", 9))):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(probe)
                return s.getsockname()[0]
        except OSError:
            continue
    return "127.0.0.1"


@attrs.frozen
class Node:
    id: str
    host: str
    ip: str

    @classmethod
    def create(cls, ip=None):
        return cls(
            id=secrets.token_hex(20),
            host=f"{os.getpid()}@{socket.gethostname()}",
            ip=ip or _guess_ip(),
        )
