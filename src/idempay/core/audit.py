"""The vocabulary of the audit log: every step of a payment and every decision of the guard.

An audit entry records one :class:`AuditStep`. The first group follows the life of a payment
(the brief's *started, pending, succeeded, failed* and the rest of the lifecycle); the second
names the guard's own decisions, so that a duplicate click or a stale webhook is as visible in
an order's trail as a payment is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Final

from idempay.errors import ConfigurationError

__all__ = [
    "GENESIS_HASH",
    "AuditDraft",
    "AuditEntry",
    "AuditSource",
    "AuditStep",
    "TrailCheck",
    "seal",
    "verify_trail",
]

GENESIS_HASH: Final = "0" * 64
"""The ``prev_hash`` of the first entry of every order's trail."""


class AuditStep(StrEnum):
    """One recorded step. The values are stable: they are stored and exported."""

    # The payment's lifecycle.
    STARTED = "started"
    """An order was created by a checkout; no PaymentIntent yet."""
    PENDING = "pending"
    """A PaymentIntent exists and waits for the customer (payment method, confirmation)."""
    ACTION_REQUIRED = "action_required"
    """The customer must authenticate (3-D Secure, redirect, micro-deposits)."""
    PROCESSING = "processing"
    """The payment was submitted and its outcome is pending (bank debits: days)."""
    AUTHORIZED = "authorized"
    """Funds are held and wait for a capture."""
    SUCCEEDED = "succeeded"
    """The payment succeeded; the order is paid."""
    FAILED = "failed"
    """A payment attempt failed; the customer may try again."""
    CANCELED = "canceled"
    """The order or its PaymentIntent was canceled before any success."""
    PARTIALLY_REFUNDED = "partially_refunded"
    """Part of the amount was refunded (cumulative)."""
    REFUNDED = "refunded"
    """The whole amount was refunded."""
    DISPUTE_OPENED = "dispute_opened"
    """The customer disputed the charge."""
    DISPUTE_CLOSED = "dispute_closed"
    """A dispute was closed (won or lost)."""
    NEEDS_REVIEW = "needs_review"
    """The order needs a human decision (money after a cancel, amount mismatch...)."""

    # The guard's decisions.
    DUPLICATE = "duplicate"
    """A webhook event already received was delivered again and not applied again."""
    REPLAYED = "replayed"
    """A checkout repeated with the same key got the stored response."""
    CONFLICT = "conflict"
    """A request arrived while another with the same key was in flight."""
    MISMATCH = "mismatch"
    """An idempotency key was reused with a different request."""
    IGNORED_STALE = "ignored_stale"
    """An observation older than, or regressing from, the order's state was ignored."""
    IGNORED = "ignored"
    """An event of a type idempay does not act upon was acknowledged and ignored."""
    ORPHANED = "orphaned"
    """An event arrived before its order existed and was kept for later."""
    RECOVERED = "recovered"
    """Work left unfinished by a crash or an expired lease was resumed."""
    REJECTED = "rejected"
    """A request was refused (bad signature, malformed body, invalid field...)."""
    LEASE_LOST = "lease_lost"
    """A worker lost its lease and stopped; another owner finishes the work."""
    OUTCOME_UNKNOWN = "outcome_unknown"
    """A payment-provider call timed out or failed in transit; its outcome is unknown."""
    CHECKED = "checked"
    """The reconciler compared the order with Stripe and found nothing to change."""


class AuditSource(StrEnum):
    """Who caused an audited step."""

    CHECKOUT = "checkout"
    WEBHOOK = "webhook"
    RECONCILER = "reconciler"
    OPERATOR = "operator"


@dataclass(frozen=True, slots=True)
class AuditDraft:
    """An audit entry before the store gives it its place in the order's trail.

    ``details`` holds short, non-personal facts (a reason, an amount, a status); never a raw
    idempotency key (``key_digest`` is its hash), a secret, a card or an e-mail address.
    ``at`` must be timezone-aware.
    """

    tenant: str
    order_id: str
    step: AuditStep
    source: AuditSource
    at: datetime
    from_status: str | None = None
    to_status: str | None = None
    event_id: str | None = None
    key_digest: str | None = None
    details: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.at.tzinfo is None:
            raise ConfigurationError("audit times must be timezone-aware")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One sealed entry of an order's trail.

    ``seq`` counts from 1 within the order; ``hash`` covers every field and ``prev_hash``, so a
    changed, removed or reordered entry breaks the chain (see :func:`verify_trail`).
    """

    tenant: str
    order_id: str
    seq: int
    step: AuditStep
    source: AuditSource
    at: datetime
    from_status: str | None
    to_status: str | None
    event_id: str | None
    key_digest: str | None
    details: tuple[tuple[str, str], ...]
    prev_hash: str
    hash: str


def _entry_hash(draft_fields: Mapping[str, object], prev_hash: str) -> str:
    payload = json.dumps(draft_fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(f"{prev_hash}\n{payload}".encode()).hexdigest()


def _fields(
    entry: AuditDraft | AuditEntry, *, seq: int, details: tuple[tuple[str, str], ...]
) -> dict[str, object]:
    return {
        "tenant": entry.tenant,
        "order_id": entry.order_id,
        "seq": seq,
        "step": entry.step.value,
        "source": entry.source.value,
        # Microseconds in UTC: what every backend can store and give back unchanged.
        "at": entry.at.astimezone(UTC).isoformat(timespec="microseconds"),
        "from_status": entry.from_status,
        "to_status": entry.to_status,
        "event_id": entry.event_id,
        "key_digest": entry.key_digest,
        "details": [list(pair) for pair in details],
    }


def seal(draft: AuditDraft, *, seq: int, prev_hash: str) -> AuditEntry:
    """Give ``draft`` its place ``seq`` after the entry whose hash is ``prev_hash``."""
    if seq < 1:
        raise ConfigurationError("audit sequence numbers start at 1")
    details = tuple(sorted((str(k), str(v)) for k, v in draft.details.items()))
    fields = _fields(draft, seq=seq, details=details)
    return AuditEntry(
        tenant=draft.tenant,
        order_id=draft.order_id,
        seq=seq,
        step=draft.step,
        source=draft.source,
        at=draft.at,
        from_status=draft.from_status,
        to_status=draft.to_status,
        event_id=draft.event_id,
        key_digest=draft.key_digest,
        details=details,
        prev_hash=prev_hash,
        hash=_entry_hash(fields, prev_hash),
    )


@dataclass(frozen=True, slots=True)
class TrailCheck:
    """The result of :func:`verify_trail`: ``ok``, or the first broken ``seq`` and why."""

    ok: bool
    entries: int
    broken_at: int | None = None
    problem: str | None = None


def verify_trail(entries: Iterable[AuditEntry]) -> TrailCheck:
    """Check that ``entries`` (one order's trail, in order) form an unbroken hash chain.

    Detects an edited entry (its hash no longer matches), a removed or inserted entry (a gap in
    ``seq`` or a ``prev_hash`` that is not the previous hash) and entries of another order.
    """
    prev_hash = GENESIS_HASH
    count = 0
    owner: tuple[str, str] | None = None
    for count, entry in enumerate(entries, start=1):
        owner = owner or (entry.tenant, entry.order_id)
        problem = _entry_problem(entry, expected_seq=count, prev_hash=prev_hash, owner=owner)
        if problem is not None:
            return TrailCheck(ok=False, entries=count, broken_at=entry.seq, problem=problem)
        prev_hash = entry.hash
    return TrailCheck(ok=True, entries=count)


def _entry_problem(
    entry: AuditEntry, *, expected_seq: int, prev_hash: str, owner: tuple[str, str]
) -> str | None:
    if (entry.tenant, entry.order_id) != owner:
        return "entry of another order"
    if entry.seq != expected_seq:
        return "sequence gap"
    if entry.prev_hash != prev_hash:
        return "chain broken"
    fields = _fields(entry, seq=entry.seq, details=entry.details)
    if _entry_hash(fields, prev_hash) != entry.hash:
        return "entry altered"
    return None
