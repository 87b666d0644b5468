from twisted.application.service import ServiceMaker

exposrd = ServiceMaker(
    "exposrd",
    "exposr.tap",
    "Self-hosted reverse tunnel relay (HTTP/SNI ingress, WebSocket/SSH transports)",
    "exposrd",
)
