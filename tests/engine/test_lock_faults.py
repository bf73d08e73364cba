"""Scenarios L1 and L3: the Redis lock expires, fails, hangs, restarts empty or loses its keys.

The lock provider only cuts contention; the database carries every guarantee. Each test takes
the lock away at an exact moment (a handler held on an event while the lock's TTL runs out, a
Redis server of the test's own that is killed, stopped with SIGSTOP, flushed or restarted) and
checks, from the stores and from localstripe, that a duplicate is still stopped: one order, one
PaymentIntent, one charge, audit trails intact, and the configured policy (fail closed with 503
and Retry-After, or carry on with the database guards alone) followed to the letter.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from idempay.backends import idempotency_store_from_url, payment_store_from_url
from idempay.backends.redis import RedisLockProvider
from idempay.core.audit import AuditStep, verify_trail
from idempay.core.keys import Scope
from idempay.core.models import OrderRecord
from idempay.core.orders import OrderStatus
from idempay.core.records import IdempotencyRecord, Lease, RecordState
from idempay.core.signature import sign_payload
from idempay.engine import (
    AsyncGuard,
    CheckoutRequest,
    FaultPoint,
    Guard,
    GuardConfig,
    GuardRequest,
    GuardResponse,
    LockFailurePolicy,
    OrderSpec,
)
from idempay.gateway import StripeGateway
from idempay.protocols import LockProvider

TENANT = "locks"
USER = "u1"
SECRET = "whsec_locks"
WAIT = 30.0  # upper bound of every wait on another thread or a server; never reached when green
IN_CI = os.environ.get("CI", "").lower() == "true"


class RecordingLocks:
    """A real lock provider, with a note of what each acquire and release returned."""

    def __init__(self, inner: LockProvider) -> None:
        self.inner = inner
        self.acquired: list[tuple[str, Lease | None]] = []
        self.released: list[tuple[str, Lease, bool]] = []

    def acquire(self, name: str, *, ttl: timedelta, wait: timedelta = timedelta(0)) -> Lease | None:
        lease = self.inner.acquire(name, ttl=ttl, wait=wait)
        self.acquired.append((name, lease))
        return lease

    def release(self, name: str, lease: Lease) -> bool:
        released = self.inner.release(name, lease)
        self.released.append((name, lease, released))
        return released

    def extend(self, name: str, lease: Lease, *, ttl: timedelta) -> Lease | None:
        return self.inner.extend(name, lease, ttl=ttl)


class Shop:
    """One application process: a guard on a real database and a Redis lock provider."""

    def __init__(
        self,
        db: str,
        stripe: str,
        locks: LockProvider,
        *,
        lock_ttl: timedelta = timedelta(seconds=1),
        policy: LockFailurePolicy = LockFailurePolicy.CONTINUE,
    ) -> None:
        self.payments = payment_store_from_url(db)
        self.records = idempotency_store_from_url(db)
        self.gateway = StripeGateway.from_settings("sk_test_locks", api_base=stripe)
        self.locks = RecordingLocks(locks)
        self.guard = Guard(
            payments=self.payments,
            records=self.records,
            locks=self.locks,
            gateway=self.gateway,
            config=GuardConfig(
                webhook_secrets=(SECRET,),
                livemode=False,
                lock_ttl=lock_ttl,
                lock_failure=policy,
            ),
        )
        self.handled = 0
        self.hold: Callable[[], None] | None = None
        self._count = threading.Lock()

        @self.guard.checkout()
        def checkout(request: CheckoutRequest) -> OrderSpec:
            with self._count:
                self.handled += 1
            if self.hold is not None:
                self.hold()
            return OrderSpec(
                order_id=request.fields.identifier("order_id"),
                amount=request.fields.integer("amount", minimum=1),
                currency="eur",
                payment_method=request.fields.optional_string("payment_method"),
            )

        self.checkout = checkout

    def close(self) -> None:
        self.gateway.close()
        for closable in (self.payments, self.records):
            getattr(closable, "close", lambda: None)()

    def post(self, body: dict[str, Any], key: str) -> GuardResponse:
        return self.checkout(
            GuardRequest(
                method="POST",
                route="/checkout",
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Idempotency-Key": key},
                tenant=TENANT,
                user=USER,
            )
        )

    def deliver(self, body: bytes) -> GuardResponse:
        return self.guard.handle_webhook(
            GuardRequest(
                method="POST",
                route="/stripe/webhook",
                body=body,
                headers={
                    "Content-Type": "application/json",
                    "Stripe-Signature": sign_payload(body, SECRET, timestamp=int(time.time())),
                },
            )
        )

    def order(self, order_id: str) -> OrderRecord | None:
        with self.payments.transaction() as tx:
            return tx.get_order(TENANT, order_id)

    def trail(self, order_id: str) -> list[AuditStep]:
        with self.payments.transaction() as tx:
            entries = tx.audit_trail(TENANT, order_id)
        assert verify_trail(entries).ok
        return [entry.step for entry in entries]

    def inbox_has(self, event_body: bytes) -> bool:
        with self.payments.transaction() as tx:
            return tx.get_event("", json.loads(event_body)["id"]) is not None

    def record(self, key: str) -> IdempotencyRecord | None:
        scope = Scope(operation="checkout", tenant=TENANT, user=USER).encode()
        return self.records.get(scope, key)

    def intents(self, order_id: str) -> list[str]:
        return [pi.id for pi in self.gateway.find_payment_intents(order_id=order_id)]

    def charges(self, intent_ids: list[str], since: int) -> list[str]:
        """Succeeded charges on Stripe's side for these PaymentIntents, created after ``since``."""
        found: list[str] = []
        params: dict[str, Any] = {"limit": 100, "created": {"gt": since}}
        while True:
            page = self.gateway.client.v1.charges.list(params=params)  # type: ignore[arg-type]
            found += [
                ch.id
                for ch in page.data
                if ch.payment_intent in intent_ids and ch.status == "succeeded"
            ]
            if not page.has_more or not page.data:
                return found
            params["starting_after"] = page.data[-1].id


def uid() -> str:
    return secrets.token_hex(5)


def succeeded_event(intent: str, order_id: str) -> bytes:
    return json.dumps(
        {
            "id": f"evt_{order_id}",
            "object": "event",
            "type": "payment_intent.succeeded",
            "created": int(time.time()),
            "livemode": False,
            "data": {
                "object": {
                    "id": intent,
                    "object": "payment_intent",
                    "status": "succeeded",
                    "amount": 3100,
                    "currency": "eur",
                    "livemode": False,
                    "metadata": {"order_id": order_id, "idempay_tenant": TENANT},
                }
            },
        }
    ).encode()


def in_background(fn: Callable[[], GuardResponse]) -> Callable[[], GuardResponse]:
    """Run ``fn`` on a thread of its own; the returned callable joins it and gives its result."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(fn)
    pool.shutdown(wait=False)
    return lambda: future.result(timeout=WAIT)


class Gate:
    """Holds a flow at one step: ``reached`` once it arrives there, until ``open`` is called."""

    def __init__(self) -> None:
        self._reached = threading.Event()
        self._open = threading.Event()

    def __call__(self) -> None:
        self._reached.set()
        assert self._open.wait(WAIT), "the test never let the held flow go on"

    def wait_reached(self) -> None:
        assert self._reached.wait(WAIT), "the flow never reached the gate"

    def open(self) -> None:
        self._open.set()


@pytest.fixture
def postgres_db(postgres_url: str) -> str:
    from idempay.backends.sql import upgrade

    upgrade(postgres_url)
    return postgres_url


@pytest.fixture(
    params=[
        pytest.param("postgres", marks=pytest.mark.postgres, id="postgres"),
        pytest.param("mariadb", marks=pytest.mark.mysql, id="mariadb"),
    ]
)
def db(request: pytest.FixtureRequest) -> str:
    """Orders and idempotency records in PostgreSQL or MariaDB, migrated for the test."""
    from idempay.backends.sql import upgrade

    url: str = request.getfixturevalue(
        "postgres_url" if request.param == "postgres" else "mysql_url"
    )
    upgrade(url)
    return url


def not_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing logged as an error, and no audit step that reports a failed payment."""
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    steps = {getattr(r, "idempay", {}).get("step") for r in caplog.records}
    assert steps.isdisjoint({"failed", "lease_lost", "outcome_unknown"}), steps


# --- L1: the Redis lease expires during a slow handler --------------------------------------


@pytest.mark.parametrize("gone", ["expired", "evicted"])
def test_l1_the_database_claim_stops_a_duplicate_once_the_lock_is_gone(
    db: str,
    redis_url: str,
    redis_prefix: str,
    localstripe_url: str,
    gone: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import redis

    caplog.set_level(logging.INFO, logger="idempay")
    prefix = f"{redis_prefix}l1-{uid()}"
    redis_locks = RedisLockProvider.from_url(redis_url, prefix=prefix)
    shop = Shop(db, localstripe_url, redis_locks, lock_ttl=timedelta(milliseconds=200))
    since = int(time.time()) - 1
    order_id = f"l1-{uid()}"
    key = f"key-{order_id}"
    body = {"order_id": order_id, "amount": 3100, "payment_method": "pm_card_visa"}
    gate = Gate()
    try:
        shop.hold = gate
        first = in_background(lambda: shop.post(body, key))
        gate.wait_reached()  # the first request holds its key and runs its (slow) handler
        shop.hold = None
        name, held = shop.locks.acquired[0]
        assert held is not None
        if gone == "evicted":
            # What maxmemory-policy volatile-* does: drop keys that have a TTL (the lock, not
            # its fence counter); here under this test's own prefix only.
            client = redis.Redis.from_url(redis_url)
            for stale in client.scan_iter(match=f"{prefix}:*"):
                if client.pttl(stale) > 0:
                    client.delete(stale)
            client.close()
        # The holder's lock is gone: another worker can take it (this waits for the TTL).
        probe = redis_locks.acquire(name, ttl=timedelta(seconds=5), wait=timedelta(seconds=WAIT))
        assert probe is not None
        assert redis_locks.release(name, probe)

        # The duplicate gets the lock, but the database claim answers 409: no second run.
        duplicate = shop.post(body, key)
        assert (duplicate.status, duplicate.json().get("code")) == (409, "request_in_flight")
        assert duplicate.header("Retry-After")
        assert shop.locks.acquired[1][1] is not None
        assert shop.handled == 1

        # A third worker holds the lock when the first one finishes.
        other = redis_locks.acquire(name, ttl=timedelta(seconds=30))
        assert other is not None
        gate.open()
        response = first()
        assert response.status == 201, response.body
        assert response.json()["status"] == "paid"
        intent = response.json()["payment_intent_id"]

        # Its late release is refused and leaves the third worker's lock alone ...
        assert [r for r in shop.locks.released if r[1] == held] == [(name, held, False)]
        assert redis_locks.release(name, other)
        # ... and is not reported as a failure: the payment went through, once.
        not_a_failure(caplog)
        late = [
            r
            for r in caplog.records
            if r.name.startswith("idempay.engine") and "release" in r.getMessage()
        ]
        assert late, "a lock that ran out before its release should be logged (lock_ttl)"
        assert shop.trail(order_id) == [AuditStep.STARTED, AuditStep.PENDING, AuditStep.SUCCEEDED]
        record = shop.record(key)
        assert record is not None
        assert (record.state, record.response is not None) == (RecordState.COMPLETED, True)
        assert shop.intents(order_id) == [intent]
        assert len(shop.charges([intent], since)) == 1
    finally:
        gate.open()  # a failed assertion must not leave a flow held
        shop.close()
        redis_locks.close()


# --- L3: Redis down, hung, restarted empty, evicting ---------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class OwnRedis:
    """A Redis server of the test's own, on a free loopback port, that it kills at will."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self._binary = binary
        self._dir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it (empty: it keeps nothing on disk) and wait until it answers."""
        import redis

        self._proc = subprocess.Popen(
            [
                self._binary,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self._dir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + WAIT
        while True:
            client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                assert self._proc.poll() is None, "redis-server exited at start"
                assert time.monotonic() < deadline, "redis-server did not answer"
                threading.Event().wait(0.02)
            finally:
                client.close()

    def kill(self) -> None:
        assert self._proc is not None
        self._proc.kill()
        self._proc.wait(WAIT)

    def pause(self) -> None:
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start()

    def flushall(self) -> None:
        import redis

        with redis.Redis(port=self.port) as client:
            client.flushall()

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.resume()  # a stopped process still dies of SIGKILL; this keeps it simple
            self.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "no redis-server on PATH: install Redis to run the Redis failure scenarios"
        if IN_CI:
            pytest.fail(f"service unavailable in CI: {reason}", pytrace=False)
        pytest.skip(reason)
    server = OwnRedis(binary, tmp_path)
    server.start()
    yield server
    server.close()


def concurrently(n: int, fn: Callable[[], GuardResponse]) -> list[GuardResponse]:
    """``n`` calls of ``fn`` on ``n`` threads, released together by a barrier."""
    barrier = threading.Barrier(n)

    def call(_: int) -> GuardResponse:
        barrier.wait(WAIT)
        return fn()

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(call, range(n)))


@pytest.mark.redis
@pytest.mark.parametrize("policy", list(LockFailurePolicy), ids=str)
@pytest.mark.parametrize("fault", ["down", "hung"])
def test_l3_a_failing_redis_fails_closed_or_carries_on_as_configured(
    postgres_db: str,
    localstripe_url: str,
    own_redis: OwnRedis,
    fault: str,
    policy: LockFailurePolicy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="idempay")
    # A short socket timeout: a hung Redis costs each request that much, never more.
    redis_locks = RedisLockProvider.from_url(own_redis.url, prefix="l3", socket_timeout=0.5)
    shop = Shop(postgres_db, localstripe_url, redis_locks, policy=policy)
    since = int(time.time()) - 1
    try:
        # An order awaiting its payment, made while Redis was up, and its webhook to come.
        waiting = f"l3w-{uid()}"
        made = shop.post({"order_id": waiting, "amount": 3100}, f"key-{waiting}")
        assert made.status == 201, made.body
        paid = succeeded_event(made.json()["payment_intent_id"], waiting)
        order_id = f"l3-{uid()}"
        key = f"key-{order_id}"
        body = {"order_id": order_id, "amount": 3100, "payment_method": "pm_card_visa"}

        if fault == "down":
            own_redis.kill()
        else:
            own_redis.pause()
        try:
            started = time.monotonic()
            if policy is LockFailurePolicy.FAIL_CLOSED:
                refused = shop.post(body, key)
                assert (refused.status, refused.json().get("code")) == (503, "service_unavailable")
                assert refused.header("Retry-After")
                refused_hook = shop.deliver(paid)
                assert refused_hook.status == 503
                assert refused_hook.header("Retry-After")
                # Nothing was written, nothing run, nothing sent to Stripe.
                assert shop.handled == 1
                assert shop.order(order_id) is None
                assert shop.record(key) is None
                assert shop.intents(order_id) == []
                assert not shop.inbox_has(paid)
                waiting_order = shop.order(waiting)
                assert waiting_order is not None
                assert waiting_order.state.status is OrderStatus.AWAITING_PAYMENT
            else:
                # The database guards alone: a double click runs once, a webhook applies once.
                clicks = concurrently(4, lambda: shop.post(body, key))
                assert sorted({r.status for r in clicks}) in ([201], [201, 409])
                assert shop.handled == 2
                deliveries = concurrently(4, lambda: shop.deliver(paid))
                assert {r.status for r in deliveries} == {200}
                outcomes = sorted(r.json()["outcome"] for r in deliveries)
                assert outcomes == ["applied", "duplicate", "duplicate", "duplicate"]
                assert any(
                    r.levelno == logging.WARNING and r.name.startswith("idempay.engine")
                    for r in caplog.records
                )
            # Liveness, not speed: with Redis down or hung, a request does not hang on it.
            assert time.monotonic() - started < 20
        finally:
            if fault == "down":
                own_redis.start()
            else:
                own_redis.resume()

        # Redis is back (restarted empty, or awake): the retries succeed, once.
        retried = shop.post(body, key)
        assert retried.status == 201, retried.body
        again = shop.post(body, key)
        assert (again.status, again.header("Idempotent-Replayed")) == (201, "true")
        assert again.body == retried.body
        hook = shop.deliver(paid)
        assert hook.status == 200
        expected = "applied" if policy is LockFailurePolicy.FAIL_CLOSED else "duplicate"
        assert hook.json()["outcome"] == expected
        assert shop.deliver(paid).json()["outcome"] == "duplicate"

        assert shop.handled == 2
        assert shop.trail(order_id) == [AuditStep.STARTED, AuditStep.PENDING, AuditStep.SUCCEEDED]
        assert shop.trail(waiting).count(AuditStep.SUCCEEDED) == 1
        intent = retried.json()["payment_intent_id"]
        assert shop.intents(order_id) == [intent]
        assert len(shop.charges([intent], since)) == 1
        not_a_failure(caplog)
    finally:
        shop.close()
        redis_locks.close()


@pytest.mark.redis
@pytest.mark.parametrize("how", ["flushall", "restart"])
def test_l3_redis_emptied_mid_checkout_leaves_the_duplicate_to_the_database(
    postgres_db: str, localstripe_url: str, own_redis: OwnRedis, how: str
) -> None:
    redis_locks = RedisLockProvider.from_url(own_redis.url, prefix="l3c", socket_timeout=0.5)
    # A lock that outlives the whole test, had Redis kept it.
    shop = Shop(postgres_db, localstripe_url, redis_locks, lock_ttl=timedelta(seconds=60))
    since = int(time.time()) - 1
    order_id = f"l3c-{uid()}"
    key = f"key-{order_id}"
    body = {"order_id": order_id, "amount": 3100, "payment_method": "pm_card_visa"}
    gate = Gate()
    try:
        shop.hold = gate
        first = in_background(lambda: shop.post(body, key))
        gate.wait_reached()
        shop.hold = None
        _, held = shop.locks.acquired[0]
        assert held is not None

        if how == "flushall":
            own_redis.flushall()
        else:
            own_redis.restart()
        duplicate = shop.post(body, key)
        assert (duplicate.status, duplicate.json().get("code")) == (409, "request_in_flight")
        # The duplicate took the lock afresh, with a fence that went back to the start: the
        # lock's own fencing is gone with its keys, and only the database stopped the duplicate.
        _, second = shop.locks.acquired[1]
        assert second is not None
        assert second.fence <= held.fence
        assert shop.handled == 1

        gate.open()
        response = first()
        assert response.status == 201, response.body
        assert [r[2] for r in shop.locks.released if r[1] == held] == [False]
        intent = response.json()["payment_intent_id"]
        assert shop.trail(order_id) == [AuditStep.STARTED, AuditStep.PENDING, AuditStep.SUCCEEDED]
        assert shop.intents(order_id) == [intent]
        assert len(shop.charges([intent], since)) == 1
        replay = shop.post(body, key)
        assert (replay.status, replay.body) == (201, response.body)
    finally:
        gate.open()  # a failed assertion must not leave a flow held
        shop.close()
        redis_locks.close()


@pytest.mark.redis
@pytest.mark.parametrize("how", ["flushall", "restart"])
def test_l3_redis_emptied_mid_webhook_leaves_the_duplicate_to_the_database(
    postgres_db: str, localstripe_url: str, own_redis: OwnRedis, how: str
) -> None:
    redis_locks = RedisLockProvider.from_url(own_redis.url, prefix="l3w", socket_timeout=0.5)
    shop = Shop(postgres_db, localstripe_url, redis_locks, lock_ttl=timedelta(seconds=60))
    gate = Gate()
    try:
        order_id = f"l3d-{uid()}"
        made = shop.post({"order_id": order_id, "amount": 3100}, f"key-{order_id}")
        assert made.status == 201, made.body
        paid = succeeded_event(made.json()["payment_intent_id"], order_id)
        shop.guard.faults.arm(FaultPoint.WEBHOOK_BEFORE_COMMIT, gate)
        first = in_background(lambda: shop.deliver(paid))
        gate.wait_reached()  # the first delivery holds the lock, has decided, and waits

        if how == "flushall":
            own_redis.flushall()
        else:
            own_redis.restart()
        duplicate = shop.deliver(paid)
        assert (duplicate.status, duplicate.json()["outcome"]) == (200, "applied")
        # Both deliveries held the same lock at once: it no longer kept them apart.
        (name, held), (again, second) = shop.locks.acquired[-2:]
        assert (name, held is not None, second is not None) == (again, True, True)
        gate.open()
        late = first()
        # Its commit is refused (the order moved on); it reads again: a duplicate.
        assert (late.status, late.json()["outcome"]) == (200, "duplicate")
        order = shop.order(order_id)
        assert order is not None
        assert order.state.status is OrderStatus.PAID
        assert shop.trail(order_id).count(AuditStep.SUCCEEDED) == 1
    finally:
        gate.open()  # a failed assertion must not leave a flow held
        shop.close()
        redis_locks.close()


@pytest.mark.redis
@pytest.mark.anyio
@pytest.mark.parametrize("policy", list(LockFailurePolicy), ids=str)
async def test_l3_the_async_guard_follows_the_policy_while_redis_is_down(
    postgres_db: str, localstripe_url: str, own_redis: OwnRedis, policy: LockFailurePolicy
) -> None:
    import asyncio

    from idempay.backends import async_idempotency_store_from_url, async_payment_store_from_url
    from idempay.backends.redis import AsyncRedisLockProvider
    from idempay.gateway import AsyncStripeGateway

    payments = async_payment_store_from_url(postgres_db)
    records = async_idempotency_store_from_url(postgres_db)
    locks = AsyncRedisLockProvider.from_url(own_redis.url, prefix="l3a", socket_timeout=0.5)
    gateway = AsyncStripeGateway.from_settings("sk_test_locks", api_base=localstripe_url)
    guard = AsyncGuard(
        payments=payments,
        records=records,
        locks=locks,
        gateway=gateway,
        config=GuardConfig(lock_failure=policy, lock_ttl=timedelta(seconds=1)),
    )
    handled = 0

    @guard.checkout()
    async def checkout(request: CheckoutRequest) -> OrderSpec:
        nonlocal handled
        handled += 1
        return OrderSpec(order_id=request.fields.identifier("order_id"), amount=900, currency="eur")

    order_id = f"l3a-{uid()}"
    request = GuardRequest(
        method="POST",
        route="/checkout",
        body=json.dumps({"order_id": order_id}).encode(),
        headers={"Content-Type": "application/json", "Idempotency-Key": f"key-{order_id}"},
        tenant=TENANT,
        user=USER,
    )
    try:
        own_redis.kill()
        clicks = await asyncio.gather(*(checkout(request) for _ in range(4)))
        if policy is LockFailurePolicy.FAIL_CLOSED:
            assert {(r.status, r.json().get("code")) for r in clicks} == {
                (503, "service_unavailable")
            }
            assert all(r.header("Retry-After") for r in clicks)
            assert handled == 0
            async with payments.transaction() as tx:
                assert await tx.get_order(TENANT, order_id) is None
        else:
            assert sorted({r.status for r in clicks}) in ([201], [201, 409])
            assert handled == 1
        own_redis.start()
        retried = await checkout(request)
        assert retried.status == 201, retried.body
        again = await checkout(request)
        assert (again.status, again.body) == (201, retried.body)
        assert handled == 1
        intents = await gateway.find_payment_intents(order_id=order_id)
        assert [pi.id for pi in intents] == [retried.json()["payment_intent_id"]]
    finally:
        await gateway.aclose()
        await locks.aclose()
        for store in (payments, records):
            await getattr(store, "aclose")()  # noqa: B009 - not part of the store protocols
