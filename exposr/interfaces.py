"""The seams between the wings of the server.

A tunnel resolves to an endpoint. Whatever carries a tunnel (a ws-multiplex
channel, an SSH ``forwarded-tcpip`` channel, a hop to the cluster node that
holds the client) is a `ITunnelConnection`; the connection registry picks one
and hands the ingress an `IStreamClientEndpoint` whose ``connect(factory)``
gives a connected protocol on a transport that supports producers. Ingress code
never knows which transport carries the stream, and transports never know which
ingress opened it.
"""

from zope.interface import Attribute, Interface


class ITunnelConnection(Interface):
    """One client connection carrying a tunnel (a WebSocket, an SSH session)."""

    connection_id = Attribute("'<node id>:<uuid4>'")
    tunnel_id = Attribute("The tunnel this connection carries.")
    peer = Attribute("The client's IP address as a string.")
    local = Attribute("True when this node holds the transport.")

    def open_stream(protocolFactory):
        """
        Open one upstream stream to the tunnel client.

        Same contract as ``IStreamClientEndpoint.connect``: a Deferred firing
        with the protocol built by ``protocolFactory`` once the stream is
        connected, or failing with one of the errors of `exposr.errors`
        (`ChannelLimitError`, `StreamRefusedError`, `StreamOpenTimeoutError`,
        `TransportClosedError`).
        """

    def disconnect(reason):
        """
        Close the transport towards the client (server-side disconnect).

        The connection unregisters itself from the registry when it is gone.
        """
