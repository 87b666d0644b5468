"""Helpers the bench scripts share: a free port, waiting for a listener, a process's memory and
descriptors, starting a process of the run with its own log."""

import os
import socket
import subprocess
import time


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


def wait_port(port, proc=None, timeout=30):
    """Return once something listens on 127.0.0.1:``port``; exit if ``proc`` (a Popen) ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited at start-up")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def start_logged(procs, tmp, argv, name, cwd=None):
    """Start ``argv`` with its output in ``tmp/name.log`` and no ``EXPOSR_*`` variables
    (each process of a run is configured by its arguments only); append it to ``procs``.

    Returns (the Popen, the log's path).
    """
    log = open(os.path.join(tmp, name + ".log"), "wb")
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                         env={k: v for k, v in os.environ.items() if not k.startswith("EXPOSR_")})
    procs.append(p)
    return p, log.name
