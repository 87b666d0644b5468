"""``exposrd-migrate SOURCE DEST [--dry-run] [--namespace NS ...]``.

Copies every key of each namespace from one storage to another in batches of
100, overwriting what the destination holds (upsert), then deletes destination
keys that the source does not have. Running it again converges (nothing left
to copy or delete); ``--dry-run`` only counts. URL schemes: ``sqlite:``,
``postgres:`` (or ``pgsql:``), ``redis:``; ``memory:`` makes no sense for a
separate process and is refused.
"""

import argparse
import sys

from twisted.internet import defer, task

from exposr.storage.base import NAMESPACES, StorageError

BATCH = 100


def _url(url):
    if url.lower().startswith("pgsql:"):
        return "postgres:" + url[len("pgsql:"):]
    return url


@defer.inlineCallbacks
def _all_keys(storage, ns):
    keys, cursor = [], None
    while True:
        page, cursor = yield storage.list_keys(ns, cursor, BATCH)
        keys.extend(page)
        if cursor is None:
            break
    # Redis SCAN may repeat a key
    return list(dict.fromkeys(keys))


@defer.inlineCallbacks
def migrate_namespace(src, dst, ns, dry_run=False):
    """Counts for one namespace: copied, unchanged, deleted."""
    counts = {"copied": 0, "unchanged": 0, "deleted": 0}
    source_keys = set()
    cursor = None
    while True:
        page, cursor = yield src.list_keys(ns, cursor, BATCH)
        page = [k for k in dict.fromkeys(page) if k not in source_keys]
        for i in range(0, len(page), BATCH):
            batch = page[i:i + BATCH]
            values = yield src.get_multi(ns, batch)
            current = yield dst.get_multi(ns, batch)
            writes = []
            for key, value, old in zip(batch, values, current):
                if value is None:
                    # deleted or expired since it was listed
                    continue
                source_keys.add(key)
                if old == value:
                    counts["unchanged"] += 1
                    continue
                counts["copied"] += 1
                if not dry_run:
                    writes.append(dst.put(ns, key, value))
            if writes:
                yield defer.gatherResults(writes, consumeErrors=True)
        if cursor is None:
            break
    # collect first, delete afterwards: deleting while paging moves offset cursors
    stale = [k for k in (yield _all_keys(dst, ns)) if k not in source_keys]
    for i in range(0, len(stale), BATCH):
        batch = stale[i:i + BATCH]
        counts["deleted"] += len(batch)
        if not dry_run:
            yield defer.gatherResults([dst.delete(ns, k) for k in batch], consumeErrors=True)
    return counts


@defer.inlineCallbacks
def migrate(src, dst, namespaces=NAMESPACES, dry_run=False):
    """Migrate opened storages; fires with ``{namespace: {copied, unchanged, deleted}}``."""
    result = {}
    for ns in namespaces:
        result[ns] = yield migrate_namespace(src, dst, ns, dry_run)
    return result


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="exposrd-migrate",
        description="Copy exposrd storage from SOURCE to DEST (upsert), then delete DEST keys absent in SOURCE.",
    )
    parser.add_argument("source", metavar="SOURCE", help="storage URL (sqlite://, postgres://, redis://)")
    parser.add_argument("destination", metavar="DEST", help="storage URL (sqlite://, postgres://, redis://)")
    parser.add_argument("--dry-run", action="store_true", help="count what would change, write nothing")
    parser.add_argument(
        "--namespace",
        action="append",
        dest="namespaces",
        metavar="NS",
        help="namespace to migrate (repeatable; default: %s)" % " ".join(NAMESPACES),
    )
    parser.add_argument(
        "--connect-attempts",
        type=int,
        default=3,
        metavar="N",
        help="connection attempts per PostgreSQL/Redis storage before giving up (default 3)",
    )
    return parser.parse_args(argv)


@defer.inlineCallbacks
def run(reactor, argv, out=None):
    """The tool; fires with the exit status."""
    from exposr.storage import storage_from_url

    out = out or sys.stdout
    args = parse_args(argv)
    namespaces = args.namespaces or list(NAMESPACES)
    opened = []
    try:
        storages = []
        for url in (args.source, args.destination):
            if url.lower().startswith("memory:"):
                raise StorageError("memory:// storage cannot be migrated (it lives inside a running exposrd)")
            url = _url(url)
            kwargs = {}
            if url.lower().startswith(("postgres:", "redis:")):
                kwargs["open_attempts"] = max(1, args.connect_attempts)
            s = storage_from_url(url, reactor, **kwargs)
            yield s.open()
            opened.append(s)
            storages.append(s)
        src, dst = storages
        counts = yield migrate(src, dst, namespaces, args.dry_run)
    except StorageError as e:
        out.write("exposrd-migrate: %s\n" % e)
        return 1
    finally:
        for s in opened:
            yield s.close()
    prefix = "[dry run] " if args.dry_run else ""
    for ns in namespaces:
        c = counts[ns]
        out.write(
            "%s%s: %d copied, %d unchanged, %d deleted\n" % (prefix, ns, c["copied"], c["unchanged"], c["deleted"])
        )
    return 0


def main(argv=None):
    """Console entry point (``exposrd-migrate``)."""
    argv = sys.argv[1:] if argv is None else argv

    def _main(reactor):
        return run(reactor, argv).addCallback(_exit)

    task.react(_main)


def _exit(code):
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
