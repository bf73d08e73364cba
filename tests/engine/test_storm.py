"""Storms: several processes, many orders, double clicks, every webhook duplicated and shuffled.

Real PostgreSQL (+ Redis locks), MariaDB and SQLite, localstripe as Stripe, with the lock
provider on and off. At the end the invariants are measured from the stores and from Stripe:
one PaymentIntent per order, every order where its history leads, each effect once, every audit
trail intact, and no 5xx anywhere.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import random
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from idempay.backends import (
    idempotency_store_from_url,
    lock_provider_from_url,
    payment_store_from_url,
)
from idempay.core.audit import verify_trail
from idempay.core.orders import OrderStatus
from idempay.core.signature import sign_payload
from idempay.engine import (
    CheckoutRequest,
    EffectContext,
    Guard,
    GuardConfig,
    GuardRequest,
    OrderSpec,
)
from idempay.gateway import StripeGateway

SECRET = "whsec_storm"
PROCESSES = 4
ORDERS = 200


def _redis_options(url: str, urls: dict[str, str]) -> dict[str, Any]:
    return {"prefix": urls["prefix"]} if url.startswith("redis") else {}


def _guard(urls: dict[str, str]) -> Guard:
    guard = Guard(
        payments=payment_store_from_url(urls["db"]),
        records=idempotency_store_from_url(
            urls["records"], **_redis_options(urls["records"], urls)
        ),
        locks=lock_provider_from_url(urls["locks"], **_redis_options(urls["locks"], urls)),
        gateway=StripeGateway.from_settings("sk_test_storm", api_base=urls["stripe"]),
        config=GuardConfig(webhook_secrets=(SECRET,), livemode=False),
    )

    # Every process registers the same effects, as every process of an application runs the
    # same code: the transition that fires a trigger writes one outbox row per effect.
    @guard.effect("receipt", on="paid")
    def receipt(ctx: EffectContext) -> None:
        with open(urls["effects"], "a", encoding="utf-8") as out:
            out.write(ctx.dedup_key + "\n")

    return guard


def _checkout_child(
    barrier: Any, results: Any, urls: dict[str, str], clicks: list[tuple[str, str, bool]]
) -> None:
    guard = _guard(urls)

    @guard.checkout()
    def checkout(request: CheckoutRequest) -> OrderSpec:
        return OrderSpec(
            order_id=request.fields.identifier("order_id"),
            amount=request.fields.integer("amount"),
            currency="eur",
            payment_method=request.fields.optional_string("payment_method"),
        )

    statuses: list[int] = []
    barrier.wait(timeout=120)
    for order_id, key, confirm in clicks:
        body: dict[str, Any] = {"order_id": order_id, "amount": 1000 + len(order_id)}
        if confirm:
            body["payment_method"] = "pm_card_visa"
        request = GuardRequest(
            method="POST",
            route="/checkout",
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Idempotency-Key": key},
            tenant="storm",
        )
        statuses.append(checkout(request).status)
    results.put(statuses)


def _webhook_child(barrier: Any, results: Any, urls: dict[str, str], bodies: list[bytes]) -> None:
    guard = _guard(urls)
    statuses: list[int] = []
    barrier.wait(timeout=120)
    for body in bodies:
        request = GuardRequest(
            method="POST",
            route="/stripe/webhook",
            body=body,
            headers={
                "Content-Type": "application/json",
                "Stripe-Signature": sign_payload(body, SECRET, timestamp=int(time.time())),
            },
        )
        statuses.append(guard.handle_webhook(request).status)
    results.put(statuses)


def _dispatch_child(barrier: Any, results: Any, urls: dict[str, str], _share: None) -> None:
    guard = _guard(urls)
    barrier.wait(timeout=120)
    done = 0
    while (report := guard.dispatch_effects(limit=10)).done or report.retried:
        done += report.done
    results.put([done])


def _run(target: Any, per_process: list[Any], urls: dict[str, str], *extra: Any) -> list[Any]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(per_process))
    results = ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(barrier, results, urls, share, *extra))
        for share in per_process
    ]
    for proc in procs:
        proc.start()
    collected: list[Any] = []
    deadline = time.monotonic() + 600
    while len(collected) < len(procs):
        try:
            collected.append(results.get(timeout=1))
        except queue.Empty:
            crashed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not crashed, f"a storm process died: exit codes {crashed}"
            assert time.monotonic() < deadline, "the storm did not finish in time"
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    return [item for batch in collected for item in batch]


def _split(items: list[Any], n: int) -> list[list[Any]]:
    return [items[i::n] for i in range(n)]


def _event(event_id: str, kind: str, intent: str, order_id: str, status: str, at: int) -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": kind,
            "created": at,
            "livemode": False,
            "data": {
                "object": {
                    "id": intent,
                    "object": "payment_intent",
                    "status": status,
                    "amount": 1000 + len(order_id),
                    "currency": "eur",
                    "livemode": False,
                    "metadata": {"order_id": order_id, "idempay_tenant": "storm"},
                }
            },
        }
    ).encode()


def _intents_by_order(gateway: StripeGateway, orders: set[str]) -> dict[str, list[str]]:
    """Every PaymentIntent the Stripe server holds for ``orders``, by ``metadata.order_id``."""
    found: dict[str, list[str]] = {o: [] for o in orders}
    for intent in gateway.client.v1.payment_intents.list(params={"limit": 100}).auto_paging_iter():
        order_id = (intent.metadata.to_dict() if intent.metadata else {}).get("order_id")
        if order_id in found:
            found[order_id].append(intent.id)
    return found


def _charges_by_intent(gateway: StripeGateway, intents: set[str]) -> Counter[str]:
    """Count Stripe's charges per PaymentIntent, read from the Stripe server itself."""
    found: Counter[str] = Counter()
    for charge in gateway.client.v1.charges.list(params={"limit": 100}).auto_paging_iter():
        if charge.payment_intent in intents and charge.status == "succeeded":
            found[str(charge.payment_intent)] += 1
    return found


def storm(urls: dict[str, str], tmp_path: Path, *, orders_count: int = ORDERS) -> None:
    rng = random.Random(secrets.randbits(32))
    tag = secrets.token_hex(3)
    effects_file = str(tmp_path / f"effects-{tag}.txt")
    Path(effects_file).touch()
    urls = urls | {"effects": effects_file}
    orders = [f"s{tag}-{n}" for n in range(orders_count)]
    confirmed = {o for o in orders if rng.random() < 0.5}
    clicks = [(o, f"key-{o}", o in confirmed) for o in orders for _ in range(rng.randint(1, 3))]
    rng.shuffle(clicks)
    statuses = _run(_checkout_child, _split(clicks, PROCESSES), urls)
    assert all(s in (201, 409) for s in statuses), Counter(statuses)

    payments = payment_store_from_url(urls["db"])
    gateway = StripeGateway.from_settings("sk_test_storm", api_base=urls["stripe"])
    intents: dict[str, str] = {}
    with payments.transaction() as tx:
        for o in orders:
            record = tx.get_order("storm", o)
            # One click per order at least executed: the others got the replay or a 409.
            assert record is not None, o
            assert record.state.payment_intent_id is not None
            intents[o] = record.state.payment_intent_id

    # Stripe's side of the story for every order: processing, then succeeded (late
    # deliveries of the older event must not regress it).
    bodies: list[bytes] = []
    for o, intent in intents.items():
        history = [
            _event(f"evt_{o}_p", "payment_intent.processing", intent, o, "processing", 100),
            _event(f"evt_{o}_s", "payment_intent.succeeded", intent, o, "succeeded", 200),
        ]
        for body in history:
            bodies.extend([body] * rng.randint(1, 4))
    rng.shuffle(bodies)
    statuses = _run(_webhook_child, _split(bodies, PROCESSES), urls)
    assert all(s == 200 for s in statuses), Counter(statuses)

    _run(_dispatch_child, [None] * PROCESSES, urls)
    sent = Counter(Path(effects_file).read_text(encoding="utf-8").split())

    with payments.transaction() as tx:
        for o, _intent in intents.items():
            record = tx.get_order("storm", o)
            assert record is not None
            assert record.state.status is OrderStatus.PAID, (o, record.state.status)
            trail = tx.audit_trail("storm", o)
            assert verify_trail(trail).ok
            started = [e for e in trail if e.step.value == "started"]
            assert len(started) == 1
    # Read Stripe's side once (one pass over the server's list, not one search per order).
    per_order = _intents_by_order(gateway, set(intents))
    for o in intents:
        assert len(per_order[o]) == 1, (o, per_order[o])
    # One charge for every order paid in the checkout call, none for the others (their
    # success came from the simulated webhooks alone).
    charges = _charges_by_intent(gateway, set(intents.values()))
    assert charges == Counter({intents[o]: 1 for o in confirmed}), charges
    assert len(sent) == len(intents)
    assert set(sent.values()) == {1}
    gateway.close()
    payments.close()  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.parametrize("locks", ["on", "off"])
def test_storm_on_postgres_and_redis(
    locks: str,
    own_postgres_url: str,
    redis_url: str,
    redis_prefix: str,
    localstripe_url: str,
    tmp_path: Path,
) -> None:
    from idempay.backends.sql import upgrade

    upgrade(own_postgres_url)
    urls = {
        "db": own_postgres_url,
        "records": own_postgres_url,
        "locks": redis_url if locks == "on" else "none://",
        "stripe": localstripe_url,
        "prefix": f"{redis_prefix}storm",
    }
    storm(urls, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("locks", ["on", "off"])
def test_storm_on_mariadb(
    locks: str,
    own_mysql_url: str,
    redis_url: str,
    redis_prefix: str,
    localstripe_url: str,
    tmp_path: Path,
) -> None:
    from idempay.backends.sql import upgrade

    upgrade(own_mysql_url)
    urls = {
        "db": own_mysql_url,
        "records": redis_url,
        "locks": redis_url if locks == "on" else "none://",
        "stripe": localstripe_url,
        "prefix": f"{redis_prefix}storm",
    }
    storm(urls, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("locks", ["on", "off"])
def test_storm_on_sqlite(locks: str, localstripe_url: str, tmp_path: Path) -> None:
    from idempay.backends.sql import upgrade

    url = f"sqlite:///{tmp_path / 'storm.db'}"
    upgrade(url)
    urls = {
        "db": url,
        "records": url,
        "locks": "memory://" if locks == "on" else "none://",
        "stripe": localstripe_url,
        "prefix": "",
    }
    storm(urls, tmp_path)
