from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

exposrd = ServiceMaker(
    "exposrd",
    "exposr.tap",
    "Self-hosted reverse tunnel relay (HTTP/SNI ingress, WebSocket/SSH transports)",
    "exposrd",
)

# ``twistd --reactor exposr``: the epoll reactor the ``exposrd`` command runs on
exposr_reactor = Reactor("exposr", "exposr.reactor", "epoll, without a log context per I/O event (exposrd's)")
