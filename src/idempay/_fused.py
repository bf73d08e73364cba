"""The webhook's two steps, written over the operations of any payment transaction.

Backends that can do better (one round trip each, as the SQL store does on PostgreSQL) have
their own; these define the behaviour every backend must match.
"""

from __future__ import annotations

from dataclasses import replace

from idempay.core.models import AuditHead, EventCommit, EventReception, InboxEvent, OrderRecord
from idempay.errors import ConcurrentUpdateError
from idempay.protocols import PaymentTransaction

__all__ = ["audit_head", "commit_event", "receive_event"]

_MOVED = "the event, the order or its audit trail changed since they were read"


def audit_head(tx: PaymentTransaction, tenant: str, order_id: str) -> AuditHead:
    """The end of an order's audit trail."""
    trail = tx.audit_trail(tenant, order_id)
    return AuditHead(trail[-1].seq, trail[-1].hash) if trail else AuditHead()


def receive_event(
    tx: PaymentTransaction, event: InboxEvent, *, tenant: str | None, order_id: str | None
) -> EventReception:
    """Read the stored inbox row, the order the event concerns and its trail's end; no write."""
    stored = tx.get_event(event.account, event.event_id)
    order = None
    if event.payment_intent_id is not None:
        order = tx.find_order_by_payment_intent(event.payment_intent_id)
    if order is None and tenant is not None and order_id is not None:
        order = tx.get_order(tenant, order_id)
    head = audit_head(tx, order.tenant, order.order_id) if order is not None else AuditHead()
    return EventReception(event=stored, order=order, audit_head=head)


def commit_event(tx: PaymentTransaction, commit: EventCommit) -> OrderRecord | None:
    """Write one event's changes; ConcurrentUpdateError if the inbox row, the order or its
    trail moved since they were read (the transaction then rolls back whole)."""
    event = commit.event
    stored = tx.get_event(event.account, event.event_id)
    if (None if stored is None else stored.status) is not commit.expected_status:
        raise ConcurrentUpdateError(_MOVED)
    order = commit.order
    moved = order is not None and (
        audit_head(tx, order.tenant, order.order_id) != commit.audit_head
    )
    if commit.audit and moved:
        raise ConcurrentUpdateError(_MOVED)
    if order is not None and commit.new_state is not None:
        order = tx.update_order(order, commit.new_state)
    head = commit.audit_head
    for draft in commit.audit:
        entry = tx.append_audit(draft)
        if entry.seq != head.seq + 1:  # appended after another writer's entry
            raise ConcurrentUpdateError(_MOVED)
        head = AuditHead(entry.seq, entry.hash)
    for effect in commit.effects:
        tx.enqueue_effect(effect)
    if stored is None:
        # Stored as received (no attempt yet), then given its outcome like an existing row:
        # one attempt, the same fields set, in the same transaction.
        fresh = replace(event, attempts=0, processed_at=None, error=None)
        if not tx.insert_event(fresh)[1]:  # a backend whose transactions run side by side
            raise ConcurrentUpdateError(_MOVED)
    tx.set_event_status(
        event.account,
        event.event_id,
        commit.status,
        error=commit.error,
        order_id=commit.order_id,
    )
    return order
