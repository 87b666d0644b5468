"""txredisapi internals exposr relies on. Checked against txredisapi 1.6.0.

The Redis backend picks a connection of the factory's pool itself (round
robin over the usable ones) instead of txredisapi's handler, so it needs to
know which pooled connection is usable: ``connected`` only says that the
socket is up, the private ``_ready`` that connectionMade (AUTH, SELECT)
finished (`READY_ATTR`). It also reads the factory's ``pool`` list and its
``deferred`` (fired once the pool is connected), plain attributes.
"""

CHECKED_AGAINST = "1.6.0"

READY_ATTR = "_ready"


def usable(factory):
    """The connections of ``factory``'s pool that can take a command now, in pool order."""
    return [c for c in factory.pool if c.connected and c._ready]
