"""Idempotency records, leases, and the decision taken when a key is claimed.

A request with an idempotency key goes through one *claim*: a single atomic write in the store
that either makes the caller the owner of the key (:class:`Claimed`) or returns what is already
there (:class:`Existing`). :func:`decide` turns that result into what the caller must do:
execute, replay the stored response, answer 409 (in flight) or 422 (the key was used for another
request). The claim is the only place where concurrency is decided; everything here is pure.

Record lifecycle::

    (absent) --claim--> IN_PROGRESS --complete--> COMPLETED | FAILED --expiry--> (absent)
                          |   ^
             release /    |   |  claim by the same request after the lease ran out,
             crash        v   |  or after a release: a takeover, with a higher fence
                         UNKNOWN (or IN_PROGRESS with an expired lease)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final, assert_never

from idempay.errors import ConfigurationError, FingerprintMismatchError, RequestInFlightError

__all__ = [
    "MAX_RETRY_AFTER",
    "ClaimResult",
    "Claimed",
    "Decision",
    "Execute",
    "Existing",
    "IdempotencyRecord",
    "InFlight",
    "Lease",
    "Mismatch",
    "RecordState",
    "Replay",
    "StoredResponse",
    "decide",
    "raise_for_decision",
]

MAX_RETRY_AFTER: Final = 60
"""Upper bound, in seconds, of the ``Retry-After`` advertised for a request in flight."""


class RecordState(StrEnum):
    """Where an idempotency record is in its lifecycle."""

    IN_PROGRESS = "in_progress"
    """Owned by the holder of a lease; the work is running (or its owner died)."""
    COMPLETED = "completed"
    """Finished; the stored response is replayed to every repeat."""
    FAILED = "failed"
    """Finished with a deterministic error response, stored and replayed like a success."""
    UNKNOWN = "unknown"
    """Released without an outcome (an error, an unknown payment outcome): the next request
    with the same fingerprint takes it over at once and resumes from its recovery point."""


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response kept with a completed record and replayed byte for byte."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 599:
            raise ConfigurationError("a stored response needs an HTTP status between 100 and 599")


@dataclass(frozen=True, slots=True)
class Lease:
    """Proof of ownership of a record or a lock, valid until ``expires_at``.

    ``token`` is unique to one owner; ``fence`` increases by one at every change of owner, so a
    write carrying an older fence can be refused even if the old owner still believes it holds
    the lease (a paused process, an expired Redis key).
    """

    token: str
    fence: int
    expires_at: datetime

    def remaining(self, now: datetime) -> timedelta:
        """Return how long the lease has left at ``now`` (negative once expired)."""
        return self.expires_at - now


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """What the store knows about one (scope, key).

    ``scope`` is :meth:`idempay.core.keys.Scope.encode` output; ``key`` is kept exactly as the
    client sent it (never truncated or case-folded). ``recovery_point`` names the last durable
    step a previous owner reached, and ``resource_id`` what it created (an order id), so that a
    takeover resumes rather than repeats.
    """

    scope: str
    key: str
    fingerprint: str
    state: RecordState
    fence: int
    created_at: datetime
    expires_at: datetime
    lease: Lease | None = None
    recovery_point: str | None = None
    resource_id: str | None = None
    response: StoredResponse | None = None

    def lease_expired(self, now: datetime) -> bool:
        """Return True if the record is in progress but its owner's lease has run out."""
        return self.state is RecordState.IN_PROGRESS and (
            self.lease is None or self.lease.expires_at <= now
        )


@dataclass(frozen=True, slots=True)
class Claimed:
    """The caller owns the key and must do the work, then complete or release the record.

    ``resumed`` is True when the record was taken over from an owner that crashed, lost its
    lease or released it; ``record.recovery_point`` then says where to resume.
    """

    record: IdempotencyRecord
    lease: Lease
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class Existing:
    """Someone else holds, or has finished, this key; the caller must not do the work."""

    record: IdempotencyRecord


ClaimResult = Claimed | Existing


@dataclass(frozen=True, slots=True)
class Execute:
    """Do the work: the caller holds ``lease`` on the record."""

    lease: Lease
    resumed: bool
    recovery_point: str | None
    resource_id: str | None


@dataclass(frozen=True, slots=True)
class Replay:
    """Return the stored response with ``Idempotent-Replayed: true``."""

    response: StoredResponse


@dataclass(frozen=True, slots=True)
class InFlight:
    """Another request with this key is running: answer 409 with ``Retry-After``."""

    retry_after: int


@dataclass(frozen=True, slots=True)
class Mismatch:
    """The key was first used for a different request: answer 422 and execute nothing."""


Decision = Execute | Replay | InFlight | Mismatch


def decide(result: ClaimResult, fingerprint: str, now: datetime) -> Decision:
    """Decide what to do with the result of a claim.

    Guarantees:
        - A claim for a different fingerprint never executes and never replays another
          request's response (:class:`Mismatch`), whatever the record's state.
        - Only :class:`Claimed` leads to :class:`Execute`.
        - A finished record replays its stored response; anything else is :class:`InFlight`
          with a ``retry_after`` between 1 and :data:`MAX_RETRY_AFTER` seconds.
    """
    match result:
        case Claimed(record=record, lease=lease, resumed=resumed):
            return Execute(
                lease=lease,
                resumed=resumed,
                recovery_point=record.recovery_point,
                resource_id=record.resource_id,
            )
        case Existing(record=record):
            if record.fingerprint != fingerprint:
                return Mismatch()
            if record.state in (RecordState.COMPLETED, RecordState.FAILED):
                if record.response is None:
                    # A finished record always carries its response; one without is treated
                    # as still in flight rather than replayed empty.
                    return InFlight(retry_after=1)
                return Replay(response=record.response)
            return InFlight(retry_after=_retry_after(record, now))
        case _:
            assert_never(result)


def _retry_after(record: IdempotencyRecord, now: datetime) -> int:
    if record.lease is None:
        return 1
    seconds = math.ceil(record.lease.remaining(now).total_seconds())
    return max(1, min(MAX_RETRY_AFTER, seconds))


def raise_for_decision(decision: Decision) -> Execute | Replay:
    """Return ``decision`` if it is :class:`Execute` or :class:`Replay`, else raise its error.

    Raises:
        RequestInFlightError: for :class:`InFlight` (409, with ``Retry-After``).
        FingerprintMismatchError: for :class:`Mismatch` (422).
    """
    match decision:
        case Execute() | Replay():
            return decision
        case InFlight(retry_after=retry_after):
            raise RequestInFlightError(
                "a request with this idempotency key is still being processed",
                retry_after=retry_after,
            )
        case Mismatch():
            raise FingerprintMismatchError(
                "this idempotency key was already used with a different request"
            )
        case _:
            assert_never(decision)
