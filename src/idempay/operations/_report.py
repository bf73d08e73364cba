"""What a reconciler run or a purge did: plain values, with a JSON form for the CLI."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from idempay.core.models import OutboxBacklog
from idempay.core.orders import OrderStatus

__all__ = ["Checked", "OrderCheck", "Progress", "PurgeReport", "ReconcileReport"]

Progress = Callable[[str, int, int | None], None]
"""Called as work goes: ``(stage, done, total or None)``; the CLI draws its bars with it."""


class Checked(StrEnum):
    """What checking one order against Stripe found."""

    CHANGED = "changed"
    """Stripe knew more than the order: it was brought up to date (a webhook was missed)."""
    UNCHANGED = "unchanged"
    """The order already said what Stripe says (a bank debit still processing, a customer
    who has not paid yet)."""
    NO_PAYMENT = "no_payment"
    """No PaymentIntent at Stripe names the order: its checkout never got that far."""
    ABANDONED = "abandoned"
    """Still waiting for its customer at Stripe longer than ``abandoned_after`` after its
    creation: not asked about any more (a late payment still reaches it by webhook or by the
    backfill)."""
    ERROR = "error"
    """Stripe or the store failed for this order; it is checked again at a later run."""


@dataclass(frozen=True, slots=True)
class OrderCheck:
    """One order checked: its status before and after, and what was found."""

    tenant: str
    order_id: str
    before: OrderStatus
    after: OrderStatus
    result: Checked
    error: str | None = None


@dataclass(slots=True)
class ReconcileReport:
    """What one reconciler run did.

    ``checks`` lists every order checked; ``events`` counts what became of the unresolved
    inbox events looked at (by :class:`~idempay.engine.WebhookOutcome` value, plus ``error``);
    ``backfill`` the same for the events fetched from Stripe (``duplicate``: already here).
    ``orders`` and ``outbox`` describe the store at the end of the run.
    """

    checks: list[OrderCheck] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)
    backfill: Counter[str] = field(default_factory=Counter)
    orders: dict[OrderStatus, int] = field(default_factory=dict)
    outbox: OutboxBacklog | None = None

    def count(self, result: Checked) -> int:
        """How many orders were checked with this result."""
        return sum(1 for check in self.checks if check.result is result)

    @property
    def errors(self) -> int:
        """Orders and events that could not be checked (they are retried at a later run)."""
        return self.count(Checked.ERROR) + self.events["error"] + self.backfill["error"]

    def to_document(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        backlog = self.outbox
        return {
            "orders_checked": len(self.checks),
            "results": {result.value: self.count(result) for result in Checked},
            "checks": [
                {
                    "tenant": c.tenant,
                    "order_id": c.order_id,
                    "before": c.before.value,
                    "after": c.after.value,
                    "result": c.result.value,
                    "error": c.error,
                }
                for c in self.checks
            ],
            "events": dict(self.events),
            "backfill": dict(self.backfill),
            "orders": {status.value: n for status, n in sorted(self.orders.items())},
            "outbox": None
            if backlog is None
            else {
                "pending": backlog.pending,
                "due": backlog.due,
                "dead": backlog.dead,
                "oldest_due_at": None
                if backlog.oldest_due_at is None
                else backlog.oldest_due_at.isoformat(),
            },
            "errors": self.errors,
        }


@dataclass(slots=True)
class PurgeReport:
    """How many rows a purge deleted, per kind."""

    records: int = 0
    events: int = 0
    effects: int = 0
    journal: int = 0

    def to_document(self) -> dict[str, int]:
        """The report as JSON-ready data."""
        return {
            "records": self.records,
            "events": self.events,
            "effects": self.effects,
            "journal": self.journal,
        }
