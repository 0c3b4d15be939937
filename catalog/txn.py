"""MongoDB multi-document transactions, started, committed and retried as MongoDB advises.

Every face that offers transactions (the snapshot metastore, ManagedStorage's
content transactions) needs the same three things, so they live here once:

* a transaction reads one majority-committed snapshot and commits with
  w="majority" (read concern "snapshot"): otherwise a committed transaction
  could still be rolled back by a failover, and reads inside it could see
  writes that a failover later undoes;
* a commit whose outcome is unknown (UnknownTransactionCommitResult) is
  retried: commitTransaction is idempotent, and giving up early would report a
  failure for a transaction that may have committed;
* a transaction aborted by the server for a passing reason
  (TransientTransactionError: a write conflict, a failover, a network error)
  is retried from its start, with jittered backoff so that two losers of the
  same conflict do not collide again in lockstep.

The 120 s budget is the one pymongo's ``ClientSession.with_transaction`` uses.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pymongo import MongoClient, ReadPreference, WriteConcern
from pymongo.client_session import ClientSession
from pymongo.errors import OperationFailure, PyMongoError
from pymongo.read_concern import ReadConcern

T = TypeVar("T")

TRANSIENT = "TransientTransactionError"
UNKNOWN_COMMIT = "UnknownTransactionCommitResult"
RETRY_SECONDS = 120.0
_MAX_TIME_MS_EXPIRED = 50


def start(client: MongoClient[Any]) -> ClientSession:
    """A new session with a transaction started on it (the server learns of it lazily)."""
    session = client.start_session()
    try:
        session.start_transaction(
            read_concern=ReadConcern("snapshot"),
            write_concern=WriteConcern("majority"),
            read_preference=ReadPreference.PRIMARY,
        )
    except BaseException:
        session.end_session()
        raise
    return session


def transient(exc: BaseException) -> bool:
    """True when the server aborted the transaction and a retry from its start may succeed."""
    return isinstance(exc, PyMongoError) and exc.has_error_label(TRANSIENT)


def _max_time_expired(exc: PyMongoError) -> bool:
    # A commit that ran out of maxTimeMS must not be retried: the caller set the limit.
    if isinstance(exc, OperationFailure):
        if exc.code == _MAX_TIME_MS_EXPIRED:
            return True
        details = exc.details or {}
        wce = details.get("writeConcernError") or {}
        return bool(wce.get("code") == _MAX_TIME_MS_EXPIRED)
    return False


def commit(session: ClientSession, timeout: float = RETRY_SECONDS) -> None:
    """Commit, retrying while the outcome is unknown; raise if it is known to have failed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            session.commit_transaction()
            return
        except PyMongoError as exc:
            if (
                exc.has_error_label(UNKNOWN_COMMIT)
                and not _max_time_expired(exc)
                and time.monotonic() < deadline
            ):
                continue
            raise


def retry(
    attempt: Callable[[], T],
    retryable: Callable[[BaseException], bool],
    timeout: float = RETRY_SECONDS,
) -> T:
    """Run attempt() until it returns, raises something not retryable, or time runs out.

    attempt must run a whole transaction from its start each time; backoff
    grows from 2 ms to 0.5 s with jitter.
    """
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        try:
            return attempt()
        except Exception as exc:
            if not retryable(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, 0.5)
