"""The two operations measured on every backend, through idempay's public store APIs.

``claim+complete``: one protected request with a key never seen before: ``claim`` a fresh
(scope, key), then ``complete`` it with a small JSON response.

``webhook apply``: what the webhook flow does for one first delivery of an event, through the
store's two webhook steps, as the guard engine calls them: ``receive_event`` (one read, no
write: the event is not stored yet, the order and its trail's end), then ``commit_event`` (one
atomic write: the inbox row marked processed, the order's compare-and-set (version + 1), one
audit entry chained to the previous one, one outbox effect). Each worker applies events to its
own order, so concurrent workers measure the store, not lost compare-and-sets.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from idempay.core.audit import AuditDraft, AuditSource, AuditStep
from idempay.core.models import EventCommit, InboxEvent, InboxStatus, NewEffect
from idempay.core.orders import OrderState, OrderStatus
from idempay.core.records import Claimed, StoredResponse
from idempay.protocols import IdempotencyStore, PaymentStore, PaymentTransaction

__all__ = [
    "EVENT_PAYLOAD",
    "LEASE",
    "RETAIN",
    "START_STATE",
    "claim_complete_op",
    "webhook_apply_op",
]

LEASE = timedelta(seconds=30)
RETAIN = timedelta(hours=24)
SCOPE = "tenant_1/user_42/checkout"
RESPONSE = json.dumps(
    {"order_id": "ord_1", "client_secret": "pi_3Bench_secret_x", "status": "pending"}
).encode()

START_STATE = OrderState(status=OrderStatus.PROCESSING, amount=1999, currency="eur")
EVENT_PAYLOAD = json.dumps(
    {
        "id": "evt_bench",
        "object": "event",
        "type": "payment_intent.processing",
        "created": 1_767_225_600,
        "livemode": False,
        "data": {
            "object": {
                "id": "pi_3Bench",
                "object": "payment_intent",
                "amount": 1999,
                "currency": "eur",
                "status": "processing",
                "metadata": {"order_id": "ord_bench"},
            }
        },
    }
).encode()
"""A realistic small event body (about 300 bytes), stored raw in the inbox by every contender."""


def claim_complete_op(store: IdempotencyStore) -> Callable[[int], Callable[[int], object]]:
    """Worker factory: each call claims a fresh key, then completes it."""

    def factory(w: int) -> Callable[[int], object]:
        tag = secrets.token_hex(4)

        def op(i: int) -> None:
            key = f"key-{tag}-{w}-{i}"
            fingerprint = hashlib.sha256(key.encode()).hexdigest()
            result = store.claim(SCOPE, key, fingerprint, lease_for=LEASE, retain_for=RETAIN)
            if not isinstance(result, Claimed):
                raise AssertionError("a fresh key was not claimed")
            store.complete(SCOPE, key, result.lease, StoredResponse(201, RESPONSE))

        return op

    return factory


def webhook_apply_op(
    store: PaymentStore, *, tenant: str = "bench"
) -> Callable[[int], Callable[[int], object]]:
    """Worker factory: each worker creates its own order, then applies one event per call."""

    def factory(w: int) -> Callable[[int], object]:
        tag = secrets.token_hex(4)
        order_id = f"ord-{tag}-{w}"

        def create(tx: PaymentTransaction) -> None:
            tx.insert_order(tenant, order_id, START_STATE)

        store.run_transaction(create)

        def op(i: int) -> Any:
            event_id = f"evt_{tag}_{w}_{i}"
            event = InboxEvent(
                account="",
                event_id=event_id,
                type="payment_intent.processing",
                created=1_767_225_600 + i,
                payload=EVENT_PAYLOAD,
                received_at=datetime.now(UTC),
                object_id="pi_3Bench",
                payment_intent_id=None,
                order_id=order_id,
            )
            got = store.receive_event(event, tenant=tenant, order_id=order_id)
            if got.event is not None:
                raise AssertionError("a new event was taken for a duplicate")
            record = got.order
            if record is None:
                raise AssertionError("the order vanished")
            after = replace(record.state, observed_at=record.state.observed_at + 1)
            draft = AuditDraft(
                tenant=tenant,
                order_id=order_id,
                step=AuditStep.PROCESSING,
                source=AuditSource.WEBHOOK,
                at=event.received_at,
                from_status=record.state.status.value,
                to_status=after.status.value,
                event_id=event_id,
                details={"reason": "observed"},
            )
            written = store.commit_event(
                EventCommit(
                    event=event,
                    status=InboxStatus.PROCESSED,
                    expected_status=got.stored_status,
                    audit_head=got.audit_head,
                    order=record,
                    new_state=after,
                    audit=(draft,),
                    effects=(NewEffect(tenant, order_id, "processing", event_id, '{"attempt":1}'),),
                    order_id=order_id,
                )
            )
            if written is None:
                raise AssertionError("the order was not written")
            return written.version

        return op

    return factory
