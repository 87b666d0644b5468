"""Helpers the bench scripts share: a free port, a process's memory and descriptors."""

import os
import socket


def free_port():
    """A TCP port of 127.0.0.1 free at the moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    """VmRSS of a process, in KiB (0 when /proc does not say)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def rss_mb(pid):
    """VmRSS of a process, in MiB."""
    return rss_kib(pid) / 1024


def fds(pid):
    """Open descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))
