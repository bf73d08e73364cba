"""What one webhook costs on the wire: PostgreSQL round trips and writes, Redis commands.

A sync Guard on real PostgreSQL, with real Redis locks, both behind idempay.testing.wire's
counting proxy. Deliveries are sequential and the pool warm (connections open, scripts loaded,
statements prepared), so the counts are exact, and each kind of delivery is measured several
times to show they do not drift. The bounds are regression limits: the floor for a webhook is
one round trip and one durable commit.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest

from idempay.backends import lock_provider_from_url, payment_store_from_url
from idempay.core.orders import OrderState, OrderStatus
from idempay.core.signature import sign_payload
from idempay.engine import EffectContext, Guard, GuardConfig, GuardRequest, WebhookOutcome
from idempay.testing.wire import WireProxy, WireStats

SECRET = "whsec_round_trips"
TENANT = "wire"
# psycopg prepares a statement the 5th time a connection runs it, which costs one more round
# trip that once: every kind of delivery is made more often than that before it is measured.
WARM_UP = 6
MEASURED = 4
JOURNAL_HELD = 10_000


@dataclass(frozen=True)
class Cost:
    outcome: str
    pg: WireStats
    redis: WireStats


class Shop:
    """Orders with their PaymentIntent, and a guard whose both wires are counted."""

    def __init__(
        self, pg: WireProxy, redis: WireProxy, postgres_url: str, redis_url: str, prefix: str
    ) -> None:
        self.pg, self.redis = pg, redis
        self.tag = secrets.token_hex(4)
        self.payments = payment_store_from_url(pg.url_for(postgres_url))
        self.locks = lock_provider_from_url(redis.url_for(redis_url), prefix=prefix)
        self.guard = Guard(
            payments=self.payments,
            locks=self.locks,
            config=GuardConfig(
                webhook_secrets=(SECRET,),
                livemode=False,
                # Decisions that change nothing (duplicates) are journaled in batches, which
                # one delivery in a batch pays for: here they wait for flush_journal(), so
                # that each delivery is measured alone and the batch apart.
                journal_batch=JOURNAL_HELD,
                journal_interval=timedelta(days=1),
            ),
        )

        @self.guard.effect("receipt", on="paid")
        def receipt(ctx: EffectContext) -> None:  # pragma: no cover - never dispatched here
            raise AssertionError("not dispatched in this test")

    def close(self) -> None:
        self.payments.close()  # type: ignore[attr-defined]
        self.locks.close()  # type: ignore[attr-defined]

    def orders(self, count: int) -> list[str]:
        ids = [f"{self.tag}-{n}" for n in range(count)]
        with self.payments.transaction() as tx:
            for order_id in ids:
                state = OrderState(
                    OrderStatus.AWAITING_PAYMENT, 1999, "eur", payment_intent_id=f"pi_{order_id}"
                )
                tx.insert_order(TENANT, order_id, state)
        return ids

    def event(self, order_id: str, event_type: str = "payment_intent.succeeded") -> bytes:
        return json.dumps(
            {
                "id": f"evt_{event_type}_{order_id}",
                "object": "event",
                "type": event_type,
                "created": 1_767_225_600,
                "livemode": False,
                "data": {
                    "object": {
                        "id": f"pi_{order_id}",
                        "object": "payment_intent",
                        "status": "succeeded",
                        "amount": 1999,
                        "amount_received": 1999,
                        "currency": "eur",
                        "livemode": False,
                        "metadata": {"order_id": order_id, "idempay_tenant": TENANT},
                    }
                },
            }
        ).encode()

    def deliver(self, body: bytes) -> Cost:
        request = GuardRequest(
            method="POST",
            route="/stripe/webhook",
            body=body,
            headers={
                "Content-Type": "application/json",
                "Stripe-Signature": sign_payload(body, SECRET, timestamp=int(time.time())),
            },
        )
        self.pg.reset()
        self.redis.reset()
        response = self.guard.handle_webhook(request)
        assert response.status == 200
        return Cost(response.json()["outcome"], self.pg.stats(), self.redis.stats())

    def costs(self, bodies: list[bytes]) -> list[Cost]:
        """Deliver every body; the first WARM_UP deliveries are not measured."""
        costs = [self.deliver(body) for body in bodies]
        measured = costs[WARM_UP:]
        assert measured, "nothing measured"
        for cost in measured:
            # Warm: no connection opened, no script loaded, nothing prepared while measuring.
            assert cost.pg.connections == cost.redis.connections == 0
            assert "SCRIPT" not in cost.redis.statements
        # Deterministic: every measured delivery of a kind costs the same.
        shapes = {
            (c.outcome, c.pg.round_trips, len(c.pg.statements), len(c.pg.writes),
             c.redis.round_trips, c.redis.statements)
            for c in measured
        }  # fmt: skip
        assert len(shapes) == 1, shapes
        return measured


@pytest.fixture
def shop(postgres_url: str, redis_url: str, redis_prefix: str) -> Iterator[Shop]:
    from idempay.backends.sql import upgrade

    upgrade(postgres_url)
    with WireProxy.from_url(postgres_url) as pg, WireProxy.from_url(redis_url) as redis:
        shop = Shop(pg, redis, postgres_url, redis_url, f"{redis_prefix}rt{secrets.token_hex(3)}")
        try:
            yield shop
        finally:
            shop.close()


def _no_transaction(stats: WireStats) -> bool:
    """Every statement ran by itself in autocommit: each write is its own durable commit."""
    return not {"BEGIN", "COMMIT", "ROLLBACK"} & {s.split()[0].upper() for s in stats.statements}


def test_a_first_delivery_costs_at_most_three_round_trips_and_one_commit(shop: Shop) -> None:
    orders = shop.orders(WARM_UP + MEASURED)
    costs = shop.costs([shop.event(o) for o in orders])
    cost = costs[0]
    assert cost.outcome == WebhookOutcome.APPLIED
    # Measured today: 2 round trips (the read, then one statement that writes the inbox row,
    # the order, its audit entry and the outbox row), and the lock taken and released.
    assert cost.pg.round_trips <= 3
    assert len(cost.pg.statements) <= 2
    assert len(cost.pg.writes) == 1
    assert _no_transaction(cost.pg)
    assert cost.redis.round_trips <= 2
    assert cost.redis.statements == ("EVALSHA", "EVALSHA")
    assert cost.redis.writes == ()


def test_a_duplicate_costs_one_read_and_writes_nothing(shop: Shop) -> None:
    orders = shop.orders(WARM_UP + MEASURED)
    bodies = [shop.event(o) for o in orders]
    for body in bodies:
        assert shop.deliver(body).outcome == WebhookOutcome.APPLIED
    cost = shop.costs(bodies)[0]
    assert cost.outcome == WebhookOutcome.DUPLICATE
    # Measured today: one read, answered before any lock is taken (its journal entry waits for
    # a batch: see the journal's test below).
    assert cost.pg.round_trips <= 2
    assert len(cost.pg.statements) <= 1
    assert cost.pg.writes == ()
    assert cost.redis.round_trips == 0
    assert cost.redis.statements == ()


def test_an_orphan_is_kept_in_two_round_trips(shop: Shop) -> None:
    # Events for orders that do not exist (yet): kept in the inbox for when they appear.
    bodies = [shop.event(f"{shop.tag}-missing-{n}") for n in range(WARM_UP + MEASURED)]
    cost = shop.costs(bodies)[0]
    assert cost.outcome == WebhookOutcome.ORPHANED
    assert cost.pg.round_trips <= 2
    assert len(cost.pg.writes) == 1
    assert _no_transaction(cost.pg)
    assert cost.redis.round_trips <= 2
    assert len(cost.redis.statements) <= 2


def test_an_orphan_delivered_again_writes_nothing(shop: Shop) -> None:
    bodies = [shop.event(f"{shop.tag}-missing-{n}") for n in range(WARM_UP + MEASURED)]
    for body in bodies:
        assert shop.deliver(body).outcome == WebhookOutcome.ORPHANED
    cost = shop.costs(bodies)[0]
    assert cost.outcome == WebhookOutcome.ORPHANED
    assert cost.pg.round_trips <= 1
    assert cost.pg.writes == ()
    # Answered from the read, like a duplicate: no lock taken.
    assert cost.redis.statements == ()


def test_an_event_type_not_acted_upon_is_recorded_in_two_round_trips(shop: Shop) -> None:
    orders = shop.orders(WARM_UP + MEASURED)
    costs = shop.costs([shop.event(o, "payment_intent.updated") for o in orders])
    cost = costs[0]
    assert cost.outcome == WebhookOutcome.IGNORED
    assert cost.pg.round_trips <= 2
    assert len(cost.pg.writes) == 1
    assert _no_transaction(cost.pg)
    assert len(cost.redis.statements) <= 2


def test_the_journal_of_duplicates_is_one_batch_that_does_not_wait_for_the_disk(
    shop: Shop,
) -> None:
    orders = shop.orders(WARM_UP + MEASURED)
    bodies = [shop.event(o) for o in orders]
    for body in bodies:
        assert shop.deliver(body).outcome == WebhookOutcome.APPLIED
    for body in bodies:
        assert shop.deliver(body).outcome == WebhookOutcome.DUPLICATE
    shop.guard.flush_journal()  # the warm-up's batch: statements prepared
    for body in bodies:
        assert shop.deliver(body).outcome == WebhookOutcome.DUPLICATE
    shop.pg.reset()
    assert shop.guard.flush_journal() == len(bodies)
    flush = shop.pg.stats()
    # Measured today: one transaction (BEGIN, synchronous_commit off, the entries, COMMIT) in
    # four round trips, one INSERT per entry (psycopg pipelines an executemany).
    assert flush.round_trips <= 4
    assert 1 <= len(flush.writes) <= len(bodies)
    assert all(w.lstrip().upper().startswith("INSERT INTO IDEMPAY_JOURNAL") for w in flush.writes)
    assert "SET LOCAL synchronous_commit TO OFF" in flush.statements
