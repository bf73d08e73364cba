"""The webhook's two atomic steps, written over the operations of any payment transaction.

Backends that can do better (one round trip each, as the SQL store does on PostgreSQL) have
their own; these define the behaviour every backend must match.
"""

from __future__ import annotations

from idempay.core.models import AuditHead, EventCommit, EventReception, InboxEvent, OrderRecord
from idempay.errors import ConcurrentUpdateError
from idempay.protocols import PaymentTransaction

__all__ = ["audit_head", "commit_event", "receive_event"]


def audit_head(tx: PaymentTransaction, tenant: str, order_id: str) -> AuditHead:
    """The end of an order's audit trail."""
    trail = tx.audit_trail(tenant, order_id)
    return AuditHead(trail[-1].seq, trail[-1].hash) if trail else AuditHead()


def receive_event(
    tx: PaymentTransaction, event: InboxEvent, *, tenant: str | None, order_id: str | None
) -> EventReception:
    """Insert unless present; read the order the event concerns and its trail's end."""
    stored, inserted = tx.insert_event(event)
    order = None
    if event.payment_intent_id is not None:
        order = tx.find_order_by_payment_intent(event.payment_intent_id)
    if order is None and tenant is not None and order_id is not None:
        order = tx.get_order(tenant, order_id)
    head = audit_head(tx, order.tenant, order.order_id) if order is not None else AuditHead()
    return EventReception(event=stored, inserted=inserted, order=order, audit_head=head)


def commit_event(tx: PaymentTransaction, commit: EventCommit) -> OrderRecord | None:
    """Write one event's changes; ConcurrentUpdateError if the order or its trail moved."""
    order = commit.order
    moved = order is not None and (
        audit_head(tx, order.tenant, order.order_id) != commit.audit_head
    )
    if commit.audit and moved:
        raise ConcurrentUpdateError("the order's audit trail changed since it was read")
    if order is not None and commit.new_state is not None:
        order = tx.update_order(order, commit.new_state)
    head = commit.audit_head
    for draft in commit.audit:
        entry = tx.append_audit(draft)
        if entry.seq != head.seq + 1:  # appended after another writer's entry
            raise ConcurrentUpdateError("the order's audit trail changed since it was read")
        head = AuditHead(entry.seq, entry.hash)
    for effect in commit.effects:
        tx.enqueue_effect(effect)
    tx.set_event_status(
        commit.event.account,
        commit.event.event_id,
        commit.status,
        error=commit.error,
        order_id=commit.order_id,
    )
    return order
