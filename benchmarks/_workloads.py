"""The two operations measured on every backend, through idempay's public store APIs.

``claim+complete``: one protected request with a key never seen before: ``claim`` a fresh
(scope, key), then ``complete`` it with a small JSON response.

``webhook apply``: what the webhook flow writes for one event, in one transaction run by
``run_transaction``: insert the event into the inbox (already marked processed), read the
order, compare-and-set its new state (version + 1), append one audit entry chained to the
previous one, enqueue one outbox effect. Each worker applies events to its own order, so
concurrent workers measure the store, not lost compare-and-sets.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

from idempay.core.audit import AuditDraft, AuditSource, AuditStep
from idempay.core.models import InboxEvent, InboxStatus, NewEffect
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

            def work(tx: PaymentTransaction) -> object:
                now = tx.now()
                event = InboxEvent(
                    account="",
                    event_id=event_id,
                    type="payment_intent.processing",
                    created=1_767_225_600 + i,
                    payload=EVENT_PAYLOAD,
                    received_at=now,
                    status=InboxStatus.PROCESSED,
                    object_id="pi_3Bench",
                    payment_intent_id=None,
                    order_id=order_id,
                    processed_at=now,
                )
                _, inserted = tx.insert_event(event)
                if not inserted:
                    raise AssertionError("a new event was taken for a duplicate")
                record = tx.get_order(tenant, order_id)
                if record is None:
                    raise AssertionError("the order vanished")
                after = replace(record.state, observed_at=record.state.observed_at + 1)
                updated = tx.update_order(record, after)
                tx.append_audit(
                    AuditDraft(
                        tenant=tenant,
                        order_id=order_id,
                        step=AuditStep.PROCESSING,
                        source=AuditSource.WEBHOOK,
                        at=now,
                        from_status=record.state.status.value,
                        to_status=after.status.value,
                        event_id=event_id,
                        details={"reason": "observed"},
                    )
                )
                tx.enqueue_effect(
                    NewEffect(tenant, order_id, "processing", event_id, '{"attempt":1}')
                )
                return updated.version

            return store.run_transaction(work)

        return op

    return factory
