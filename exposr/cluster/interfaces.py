"""The cluster event bus as the rest of the server sees it.

Every bus is also a `twisted.application.service.IService`: ``startService``
connects it (``stopService`` returns a Deferred that fires once it is closed).
Whatever carries the messages, every message is signed and verified, and a
message published by this node is delivered to this node's subscribers too.
"""

from zope.interface import Attribute, Interface


class IEventBus(Interface):
    node = Attribute("This node's identity (``id``, ``host``, ``ip``).")
    rejected = Attribute("Counters of dropped incoming messages: {reason: count}.")

    def publish(event, message):
        """
        Sign and send one message (``message``: JSON-able, no floats) to every
        node, this one included.

        Returns a Deferred that fires once the transport has taken the
        message, or fails with `exposr.cluster.bus.BusUnavailable` when it
        cannot (not started, stopped, too many messages waiting). Raises
        ValueError at once for a message that cannot be encoded.
        """

    def subscribe(callback):
        """
        Call ``callback(Message)`` for every verified message from now on.

        Returns a function that unsubscribes. A callback that raises is logged
        and does not affect the others.
        """
