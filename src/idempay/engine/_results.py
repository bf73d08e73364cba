"""What the engine reports: webhook outcomes, effect contexts, dispatch reports."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from idempay.core.audit import AuditEntry, TrailCheck
from idempay.core.models import OrderRecord, OutboxEntry

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
