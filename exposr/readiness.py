"""Whether the server has started and is ready: set by the server, read by the admin interface."""


class Readiness:
    """What `/ping` (started) and `/health` (ready) report."""

    def __init__(self, started=False, ready=False):
        self.started = started
        self.ready = ready
