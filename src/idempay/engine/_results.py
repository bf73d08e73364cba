"""What the engine reports: webhook outcomes, effect contexts, dispatch reports."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from idempay.core.audit import AuditEntry, TrailCheck
from idempay.core.models import JournalEntry, OrderRecord, OutboxEntry, OutboxStatus

__all__ = ["DispatchReport", "EffectContext", "OrderView", "WebhookOutcome"]


class WebhookOutcome(StrEnum):
    """What became of one webhook delivery (all of them are acknowledged with 2xx)."""

    APPLIED = "applied"
    """The event changed its order."""
    UNCHANGED = "unchanged"
    """The event said nothing new about its order."""
    STALE = "stale"
    """The event was older than the order's state, or regressive: audited, ignored."""
    DUPLICATE = "duplicate"
    """The event had been processed already."""
    ORPHANED = "orphaned"
    """The event's order does not exist yet: kept, applied when it appears."""
    IGNORED = "ignored"
    """An event type idempay does not act upon."""


@dataclass(frozen=True, slots=True)
class EffectContext:
    """What an effect function receives.

    ``dedup_key`` is the same on every attempt of this effect: pass it to your provider as
    its idempotency key. ``payload`` holds the order's status, amount, currency, refunded
    amount and PaymentIntent id at the transition that justified the effect.
    """

    tenant: str
    order_id: str
    effect: str
    discriminator: str
    dedup_key: str
    attempt: int
    payload: dict[str, Any]


@dataclass(slots=True)
class DispatchReport:
    """What one :meth:`~idempay.engine.AsyncGuard.dispatch_effects` call did."""

    done: int = 0
    retried: int = 0
    dead: int = 0
    lost: int = 0
    """Entries another dispatcher took over after this one's lease ran out."""


@dataclass(frozen=True, slots=True)
class OrderView:
    """One order as it stands: its state, its audit trail (checked), and its effects.

    ``trail_check`` says whether the trail's hash chain is intact; a broken chain means a row
    was edited, removed or inserted outside idempay.
    """

    order: OrderRecord
    audit: tuple[AuditEntry, ...]
    trail_check: TrailCheck
    effects: tuple[OutboxEntry, ...]
    decisions: tuple[JournalEntry, ...] = ()

    def to_document(self) -> dict[str, Any]:
        """The order as a JSON-ready document (what ``GET /orders/{id}`` answers).

        ``audit`` lists every step in time order: the hash-chained trail (``"durable":
        true``) merged with the journal of decisions that changed nothing (duplicates,
        replays: ``"durable": false``). ``effects`` lists the effects carried out (``kind`` is
        the registered effect's name), and ``pending_effects`` those still to run or
        dead-lettered. Nothing in it is secret: key digests, not keys; no payloads.
        """
        state = self.order.state
        done = [e for e in self.effects if e.status is OutboxStatus.DONE]
        return {
            "order_id": self.order.order_id,
            "status": state.status.value,
            "payment_intent_id": state.payment_intent_id,
            "amount": state.amount,
            "currency": state.currency,
            "amount_refunded": state.amount_refunded,
            "review_reason": None if state.review_reason is None else state.review_reason.value,
            "dispute": state.dispute.value,
            "audit": _timeline(self.audit, self.decisions),
            "audit_verified": self.trail_check.ok,
            "effects": [_effect_document(entry) for entry in done],
            "pending_effects": [
                _effect_document(entry)
                for entry in self.effects
                if entry.status is not OutboxStatus.DONE
            ],
        }


def _timeline(
    trail: tuple[AuditEntry, ...], decisions: tuple[JournalEntry, ...]
) -> list[dict[str, Any]]:
    timed = [(entry.at, 0, _audit_document(entry)) for entry in trail]
    timed += [(entry.at, 1, _journal_document(entry)) for entry in decisions]
    # A stable sort: the trail keeps its own order, a decision follows what it saw at its time.
    return [document for _, _, document in sorted(timed, key=lambda item: (item[0], item[1]))]


def _journal_document(entry: JournalEntry) -> dict[str, Any]:
    document: dict[str, Any] = {
        "step": entry.step.value,
        "at": entry.at.isoformat(),
        "source": entry.source.value,
        "durable": False,
    }
    optional = {"event_id": entry.event_id, "key_digest": entry.key_digest, "reason": entry.reason}
    document.update({k: v for k, v in optional.items() if v is not None})
    return document


def _audit_document(entry: AuditEntry) -> dict[str, Any]:
    document: dict[str, Any] = {
        "seq": entry.seq,
        "step": entry.step.value,
        "at": entry.at.isoformat(),
        "source": entry.source.value,
        "durable": True,
    }
    optional = {
        "from_status": entry.from_status,
        "to_status": entry.to_status,
        "event_id": entry.event_id,
    }
    document.update({k: v for k, v in optional.items() if v is not None})
    if entry.details:
        document["details"] = dict(entry.details)
    return document


def _effect_document(entry: OutboxEntry) -> dict[str, Any]:
    return {
        "kind": entry.effect,
        "at": entry.next_attempt_at.isoformat(),
        "status": entry.status.value,
        "attempts": entry.attempts,
        "dedup_key": entry.dedup_key,
    }
