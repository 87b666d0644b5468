"""A separate storage client process for the cross-process tests
(tests/test_storage_cluster.py).

    python tests/storage_worker.py <storage-url> <namespace> <key> <count> [unlocked]

Opens the backend with `storage_from_url`, prints ``ready``, waits for a line
``go`` on stdin (so that both processes start together), then runs ``count``
concurrent ``update(namespace, key, fn)`` calls, each incrementing the integer
``counter`` of the record (the read and the write are separated by a turn of
the reactor, so an update without a lock would be lost). Prints
``done <json list of the counter values each update saw>`` and exits 0, or
``failed <reason>`` and exits 1. With ``unlocked`` it does get + put instead
of ``update`` (the control that shows the test can see lost updates).
"""

import json
import sys

from twisted.internet import defer, stdio, task
from twisted.protocols.basic import LineReceiver


class Go(LineReceiver):
    delimiter = b"\n"

    def __init__(self):
        self.go = defer.Deferred()

    def lineReceived(self, line):
        if line.strip() == b"go" and not self.go.called:
            self.go.callback(None)


def say(text):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


@defer.inlineCallbacks
def main(reactor, url, ns, key, count, mode="update"):
    from exposr.storage import storage_from_url

    count = int(count)
    storage = storage_from_url(url, reactor, pool_size=10)
    yield storage.open()
    seen = []

    def increment(record):
        seen.append(record["counter"])

        def write():
            new = dict(record)
            new["counter"] = record["counter"] + 1
            return new

        # the write happens on a later reactor turn: without a lock another
        # update would read the same value meanwhile
        return task.deferLater(reactor, 0.001, write)

    @defer.inlineCallbacks
    def unlocked_update(ns, key, fn):
        new = yield fn((yield storage.get(ns, key)))
        yield storage.put(ns, key, new)
        return new

    update = unlocked_update if mode == "unlocked" else storage.update

    proto = Go()
    stdio.StandardIO(proto)
    say("ready")
    yield proto.go
    try:
        results = yield defer.gatherResults(
            [update(ns, key, increment) for _ in range(count)], consumeErrors=True
        )
        if any(r is None for r in results):
            raise RuntimeError("an update returned None")
        say("done " + json.dumps(seen))
    except Exception as e:
        first = getattr(e, "subFailure", None)
        say("failed %s" % (first.value if first is not None else e,))
        raise
    finally:
        yield storage.close()


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
