"""The account service: create, read, disable, delete, list.

Account numbers are secrets: they never appear in log lines.
"""

import os

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from exposr import model
from exposr.storage.base import NotFound, list_page

log = Logger(namespace="exposr.accounts")

NS = "account"

# One attempt plus up to 100 retries on id collision, then creation fails.
CREATE_ATTEMPTS = 101


class AccountService:
    """
    Account records over an `IStorage`. What also concerns an account's
    tunnels (deleting them with the account, disconnecting them when the
    account is disabled) is `TunnelService.delete_account` and
    `TunnelService.set_account_disabled`, built on this.
    """

    def __init__(self, storage, clock, randbytes=os.urandom):
        self.storage = storage
        self.clock = clock
        self._randbytes = randbytes
        # canonical number -> [(tunnel id, Deferred)]: `add_tunnel` calls
        # waiting for their account's next update
        self._appends = {}

    def _now(self):
        return self.clock.seconds()

    def generate_id(self):
        return model.generate_account_id(self._randbytes)

    @defer.inlineCallbacks
    def create(self):
        """A new account record, or None when no unique number was found."""
        for _ in range(CREATE_ATTEMPTS):
            account_id = self.generate_id()
            record = model.new_account(account_id, self._now())
            created = yield self.storage.create(NS, account_id, record)
            if created:
                log.info("Account created")
                return record
        log.error("Could not generate a unique account number")
        return None

    @defer.inlineCallbacks
    def get(self, account_id):
        """The account (any accepted spelling of its number), or None."""
        canonical = model.normalize_account_id(account_id)
        if canonical is None:
            return None
        stored = yield self.storage.get(NS, canonical)
        return model.read_account(stored)

    @defer.inlineCallbacks
    def _update(self, account_id, fn):
        canonical = model.normalize_account_id(account_id)
        if canonical is None:
            return None
        now = self._now()

        def apply(current):
            record = model.read_account(current)
            result = fn(record)
            if result is None:
                return None
            result["updated_at"] = model.iso_timestamp(now)
            return result

        try:
            written = yield self.storage.update(NS, canonical, apply)
        except NotFound:
            return None
        return model.read_account(written)

    @defer.inlineCallbacks
    def set_disabled(self, account_id, disabled, reason=None):
        """
        Disable (with an optional reason) or enable an account record. The
        updated account, or None when it does not exist.
        """
        now = self._now()

        def change(record):
            status = record["status"]
            status["disabled"] = bool(disabled)
            if disabled:
                status["disabled_at"] = model.iso_timestamp(now)
                if reason is not None:
                    status["disabled_reason"] = reason
                else:
                    status.pop("disabled_reason", None)
            else:
                status.pop("disabled_at", None)
                status.pop("disabled_reason", None)
            return record

        return (yield self._update(account_id, change))

    def add_tunnel(self, account_id, tunnel_id):
        """
        Append a tunnel id to the account's list if absent (never twice): the
        updated account, or None when there is no such account or the id was
        listed already.

        The account record lists every tunnel of the account, so writing it
        costs more the more tunnels it has, and its writes are serialised by
        the storage lock. Calls for the same account made while its update
        waits for the lock (or for the record) join that update: one write
        appends them all, in the order they were made.
        """
        canonical = model.normalize_account_id(account_id)
        if canonical is None:
            return defer.succeed(None)
        d = defer.Deferred()
        batch = self._appends.get(canonical)
        if batch is not None:
            batch.append((tunnel_id, d))
            return d
        batch = self._appends[canonical] = [(tunnel_id, d)]
        appended = []  # the calls whose id the update appended

        def close():
            if self._appends.get(canonical) is batch:
                del self._appends[canonical]

        def change(current):
            close()  # later calls wait for the next update
            del appended[:]
            record = model.read_account(current)
            tunnels = record["tunnels"]
            listed = set(tunnels) if len(batch) > 2 else tunnels
            for i, (tid, _) in enumerate(batch):
                if tid not in listed and all(tid != other for other, _ in batch[:i]):
                    tunnels.append(tid)
                    appended.append(i)
            if not appended:
                return None
            record["updated_at"] = model.iso_timestamp(self._now())
            return record

        def done(result):
            close()
            if isinstance(result, Failure) and not result.check(NotFound):
                for _, waiting in batch:
                    waiting.errback(result)
                return None
            written = None if isinstance(result, Failure) else result
            for i, (_, waiting) in enumerate(batch):
                waiting.callback(model.read_account(written) if written is not None and i in appended else None)
            return None

        defer.maybeDeferred(self.storage.update, NS, canonical, change).addBoth(done)
        return d

    def remove_tunnel(self, account_id, tunnel_id):
        def change(record):
            if tunnel_id not in record["tunnels"]:
                return None
            record["tunnels"] = [t for t in record["tunnels"] if t != tunnel_id]
            return record

        return self._update(account_id, change)

    @defer.inlineCallbacks
    def delete(self, canonical):
        """Delete an account record (its canonical number). True when deleted."""
        deleted = yield self.storage.delete(NS, canonical)
        if deleted:
            log.info("Account deleted")
        return bool(deleted)

    @defer.inlineCallbacks
    def list(self, cursor=None, count=25, verbose=False):
        """
        One page: ``(cursor, accounts)``. Non-verbose entries are the minimal
        objects of the admin account list; verbose entries the stored records.
        """
        keys, next_cursor = yield list_page(self.storage, NS, cursor, count)
        if verbose:
            values = yield self.storage.get_multi(NS, keys) if keys else defer.succeed([])
            accounts = [model.read_account(v) for v in values if v is not None]
        else:
            accounts = [
                {"accountId": k, "id": k, "tunnels": [], "status": {"disabled": False}}
                for k in keys
            ]
        return next_cursor, accounts
