"""Scenarios L2 and L4: workers paused past their lease, and workers killed mid-transaction.

Each scenario runs a real worker in a child process (multiprocessing, "spawn") against real
databases, Redis and localstripe, and stops it at an exact step of the flow through a fault
point: SIGSTOP to pause it (L2), SIGKILL to kill it inside the order's database transaction
(L4). The parent is the other worker. Leases run out by clock, never by sleeping: the parent's
guard and stores read a clock one hour ahead, so the child's lease has expired for them.

What is asserted comes from the stores (orders, audit trails, idempotency records, inbox) and
from localstripe, which ignores Stripe idempotency keys: any "one PaymentIntent" seen there is
idempay's own doing.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import secrets
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from idempay.backends import (
    idempotency_store_from_url,
    lock_provider_from_url,
    payment_store_from_url,
)
from idempay.clock import Clock
from idempay.core.audit import AuditStep, verify_trail
from idempay.core.keys import Scope
from idempay.core.models import InboxStatus, OrderRecord
from idempay.core.orders import OrderStatus
from idempay.core.records import IdempotencyRecord, RecordState
from idempay.core.signature import sign_payload
from idempay.engine import (
    CheckoutRequest,
    EffectContext,
    FaultPoint,
    Guard,
    GuardConfig,
    GuardRequest,
    GuardResponse,
    OrderSpec,
    kill_process,
)
from idempay.gateway import StripeGateway
from idempay.protocols import OutboxStore

TENANT = "faults"
USER = "u1"
SECRET = "whsec_faults"
AHEAD = timedelta(hours=1)
CHILD_TIMEOUT = 60.0
LOCK_WAIT = timedelta(seconds=30)  # an upper bound, never reached: the locks live 500 ms


def require(condition: object, what: str) -> None:
    """A step the scenario depends on; failing it fails the test, even one marked xfail."""
    if not condition:
        pytest.fail(what)


class AheadClock:
    """The system clock, ``offset`` ahead: to whoever reads it, others' leases have run out."""

    def __init__(self, offset: timedelta) -> None:
        self._offset = offset

    def now(self) -> datetime:
        return datetime.now(UTC) + self._offset


@dataclass(frozen=True)
class Stack:
    """Where a worker finds its services; plain strings, so that it pickles to a child."""

    db: str
    records: str
    locks: str
    stripe: str
    prefix: str

    def options(self, url: str) -> dict[str, Any]:
        return {"prefix": self.prefix} if url.startswith("redis") else {}


class Worker:
    """One application process: a guard on real stores, its checkout endpoint and readers."""

    def __init__(self, stack: Stack, *, clock: Clock | None = None) -> None:
        self.stack = stack
        self.clock = clock
        self.payments = payment_store_from_url(stack.db, clock=clock)
        self.records = idempotency_store_from_url(
            stack.records, clock=clock, **stack.options(stack.records)
        )
        self.locks = lock_provider_from_url(stack.locks, **stack.options(stack.locks))
        self.gateway = StripeGateway.from_settings("sk_test_faults", api_base=stack.stripe)
        self.guard = Guard(
            payments=self.payments,
            records=self.records,
            locks=self.locks,
            gateway=self.gateway,
            config=GuardConfig(
                webhook_secrets=(SECRET,),
                livemode=False,
                # Short, so that a paused worker's contention locks run out during the test.
                lock_ttl=timedelta(milliseconds=500),
            ),
            clock=clock,
        )

        # The same effect in every process, as one application's processes run the same code.
        # Never dispatched here: the tests read the outbox rows the transitions wrote.
        @self.guard.effect("receipt", on="paid")
        def receipt(ctx: EffectContext) -> None:
            del ctx

        @self.guard.checkout()
        def checkout(request: CheckoutRequest) -> OrderSpec:
            return OrderSpec(
                order_id=request.fields.identifier("order_id"),
                amount=request.fields.integer("amount", minimum=1),
                currency="eur",
                payment_method=request.fields.optional_string("payment_method"),
            )

        self.checkout = checkout

    def close(self) -> None:
        self.gateway.close()
        for closable in (self.payments, self.records, self.locks):
            close = getattr(closable, "close", None)
            if close is not None:
                close()

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
        now = self.guard.clock.now()
        return self.guard.handle_webhook(
            GuardRequest(
                method="POST",
                route="/stripe/webhook",
                body=body,
                headers={
                    "Content-Type": "application/json",
                    "Stripe-Signature": sign_payload(body, SECRET, timestamp=int(now.timestamp())),
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


# --- child processes ----------------------------------------------------------------------


def _pause_here(reached: Any) -> Callable[[], None]:
    """A fault action: tell the parent, then stop this process until it gets SIGCONT."""

    def pause() -> None:
        reached.set()
        os.kill(os.getpid(), signal.SIGSTOP)

    return pause


def _checkout_child(
    stack: Stack,
    point: FaultPoint,
    action: str,
    body: dict[str, Any],
    key: str,
    reached: Any,
    results: Any,
) -> None:
    worker = Worker(stack)
    worker.guard.faults.arm(point, kill_process if action == "kill" else _pause_here(reached))
    if action == "kill":
        reached.set()  # armed: the parent now waits for the process to die at the point
    response = worker.post(body, key)
    results.put((response.status, response.body, response.header("Retry-After")))
    worker.close()


def _webhook_child(stack: Stack, body: bytes, reached: Any, results: Any) -> None:
    worker = Worker(stack)
    worker.guard.faults.arm(FaultPoint.WEBHOOK_BEFORE_COMMIT, _pause_here(reached))
    response = worker.deliver(body)
    results.put((response.status, response.body, None))
    worker.close()


class Child:
    """A worker process that the test stops, resumes or kills at a fault point."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.reached = ctx.Event()
        self.results = ctx.Queue()
        self.process = ctx.Process(target=target, args=(*args, self.reached, self.results))
        self.process.start()

    @property
    def pid(self) -> int:
        pid = self.process.pid
        assert pid is not None  # started in __init__
        return pid

    def _wait_reached(self) -> None:
        deadline = time.monotonic() + CHILD_TIMEOUT
        while not self.reached.wait(0.05):
            require(self.process.exitcode is None, f"the worker died ({self.process.exitcode})")
            require(time.monotonic() < deadline, "the worker never reached its fault point")

    def wait_stopped(self) -> None:
        """Block until the child has stopped itself at its fault point."""
        self._wait_reached()
        _, status = os.waitpid(self.pid, os.WUNTRACED)
        require(os.WIFSTOPPED(status), f"the worker ended instead of stopping ({status})")

    def resume(self) -> tuple[int, bytes, str | None]:
        """SIGCONT the child, and return the response its request finally got."""
        os.kill(self.pid, signal.SIGCONT)
        result: tuple[int, bytes, str | None] = self.results.get(timeout=CHILD_TIMEOUT)
        self.process.join(CHILD_TIMEOUT)
        require(self.process.exitcode == 0, f"the worker failed ({self.process.exitcode})")
        return result

    def wait_killed(self) -> None:
        self._wait_reached()
        self.process.join(CHILD_TIMEOUT)
        require(self.process.exitcode == -signal.SIGKILL, f"not killed: {self.process.exitcode}")

    def stop(self) -> None:
        """Make sure the child is gone (a failed test must not leave it stopped)."""
        if self.process.is_alive():
            os.kill(self.pid, signal.SIGCONT)
            self.process.kill()
            self.process.join(CHILD_TIMEOUT)
        self.results.close()


@pytest.fixture
def children() -> Iterator[Callable[..., Child]]:
    started: list[Child] = []

    def start(target: Callable[..., None], *args: Any) -> Child:
        child = Child(target, *args)
        started.append(child)
        return child

    yield start
    for child in started:
        child.stop()


# --- backends -----------------------------------------------------------------------------


def _backend(name: str, *marks: pytest.MarkDecorator) -> Any:
    return pytest.param(name, marks=marks, id=name)


# Payments in each SQL database; idempotency records in the same database or in Redis.
POSTGRES = _backend("postgres", pytest.mark.postgres, pytest.mark.redis)
MARIADB = _backend("mariadb", pytest.mark.mysql, pytest.mark.redis)
SQLITE = _backend("sqlite", pytest.mark.sqlite)
REDIS_RECORDS = _backend("postgres+redis-records", pytest.mark.postgres, pytest.mark.redis)


def _scratch_database(server_url: str, create: str, drop: str) -> Iterator[str]:
    """A database of this module's own, dropped at the end, with idempay's tables.

    Not the run's shared one: an outbox row left there would be run by another test's
    dispatcher, and rows of other tests by ours.
    """
    import sqlalchemy as sa

    from idempay.backends.sql import upgrade

    name = f"idempay_test_faults_{secrets.token_hex(4)}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(create.format(name)))
        url = sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)
        try:
            upgrade(url)
            yield url
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(drop.format(name)))
    finally:
        admin.dispose()


@pytest.fixture(scope="module")
def own_postgres(postgres_server_url: str) -> Iterator[str]:
    yield from _scratch_database(
        postgres_server_url, 'CREATE DATABASE "{}"', 'DROP DATABASE IF EXISTS "{}" WITH (FORCE)'
    )


@pytest.fixture(scope="module")
def own_mariadb(mysql_server_url: str) -> Iterator[str]:
    yield from _scratch_database(
        mysql_server_url,
        "CREATE DATABASE `{}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
        "DROP DATABASE IF EXISTS `{}`",
    )


@pytest.fixture(params=[POSTGRES, MARIADB, SQLITE])
def stack(request: pytest.FixtureRequest, localstripe_url: str) -> Stack:
    """Payments, records and locks on real backends (PostgreSQL and MariaDB with Redis locks,
    SQLite without a lock provider)."""
    from idempay.backends.sql import upgrade

    name: str = request.param
    if name == "sqlite":
        db = request.getfixturevalue("sqlite_url")
        upgrade(db)
        return Stack(db, db, "none://", localstripe_url, "")
    db = request.getfixturevalue("own_mariadb" if name == "mariadb" else "own_postgres")
    redis_url: str = request.getfixturevalue("redis_url")
    prefix = f"{request.getfixturevalue('redis_prefix')}{secrets.token_hex(4)}"
    records = redis_url if name.endswith("redis-records") else db
    return Stack(db, records, redis_url, localstripe_url, prefix)


def uid() -> str:
    return secrets.token_hex(5)


def signed_event(
    event_id: str, kind: str, intent: str, order_id: str, status: str, created: int
) -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": kind,
            "created": created,
            "livemode": False,
            "data": {
                "object": {
                    "id": intent,
                    "object": "payment_intent",
                    "status": status,
                    "amount": 2500,
                    "currency": "eur",
                    "livemode": False,
                    "metadata": {"order_id": order_id, "idempay_tenant": TENANT},
                }
            },
        }
    ).encode()


# --- L2: a worker paused past its lease -----------------------------------------------------

STEPS_AFTER_TAKEOVER = [
    AuditStep.STARTED,
    AuditStep.RECOVERED,
    AuditStep.PENDING,
    AuditStep.SUCCEEDED,
]


@dataclass(frozen=True)
class Takeover:
    """What a paused checkout worker and its successor left behind."""

    taken: GuardResponse
    woken: tuple[int, bytes, str | None]
    order_at_takeover: OrderRecord | None
    order_after: OrderRecord | None
    trail_at_takeover: list[AuditStep]
    trail_after: list[AuditStep]
    record: IdempotencyRecord | None
    replay: GuardResponse
    intents: list[str]
    charges: list[str]


def paused_takeover(stack: Stack, point: FaultPoint, children: Callable[..., Child]) -> Takeover:
    """Pause a checkout worker at ``point``, let another take over an hour later, wake it."""
    since = int(time.time()) - 1
    order_id = f"l2-{uid()}"
    key = f"key-{order_id}"
    body = {"order_id": order_id, "amount": 2500, "payment_method": "pm_card_visa"}
    paused = children(_checkout_child, stack, point, "pause", body, key)
    paused.wait_stopped()
    now, later = Worker(stack), Worker(stack, clock=AheadClock(AHEAD))
    try:
        # While its lease runs, the paused worker keeps the key: a duplicate gets 409.
        busy = now.post(body, key)
        in_flight = (busy.status, busy.json().get("code")) == (409, "request_in_flight")
        require(in_flight and busy.header("Retry-After"), f"not in flight: {busy}")
        # An hour later its lease has run out: another worker takes the checkout over.
        taken = later.post(body, key)
        order_at_takeover, trail_at_takeover = later.order(order_id), later.trail(order_id)
        woken = paused.resume()
        intents = now.intents(order_id)
        return Takeover(
            taken=taken,
            woken=woken,
            order_at_takeover=order_at_takeover,
            order_after=now.order(order_id),
            trail_at_takeover=trail_at_takeover,
            trail_after=now.trail(order_id),
            record=now.record(key),
            replay=now.post(body, key),
            intents=intents,
            charges=now.charges(intents, since),
        )
    finally:
        now.close()
        later.close()


@pytest.mark.parametrize(
    "point", [FaultPoint.CHECKOUT_AFTER_ORDER, FaultPoint.CHECKOUT_AFTER_STRIPE], ids=str
)
# The fence is kept by the idempotency store: each kind of store gets its turn.
@pytest.mark.parametrize("stack", [POSTGRES, MARIADB, SQLITE, REDIS_RECORDS], indirect=True)
def test_l2_a_paused_checkout_worker_is_fenced_out_by_the_takeover(
    stack: Stack, point: FaultPoint, children: Callable[..., Child]
) -> None:
    run = paused_takeover(stack, point, children)
    # The successor resumed from the recovery point and finished the checkout.
    assert run.taken.status == 201, run.taken.body
    assert run.taken.json()["status"] == "paid"
    assert run.trail_at_takeover == STEPS_AFTER_TAKEOVER
    intent = run.taken.json()["payment_intent_id"]
    # The paused worker woke up: an owner write of its own failed the fence, and it answered
    # 409 (another worker took the checkout over) rather than a response of its own.
    status, answer, retry_after = run.woken
    assert (status, json.loads(answer).get("code")) == (409, "request_in_flight")
    assert retry_after
    # The order and the stored response are the successor's; replays return them.
    assert run.order_after == run.order_at_takeover
    assert run.order_after is not None
    assert run.order_after.state.payment_intent_id == intent
    assert run.record is not None
    assert run.record.state is RecordState.COMPLETED
    assert run.record.response is not None
    assert run.record.response.body == run.taken.body
    assert (run.replay.status, run.replay.header("Idempotent-Replayed")) == (201, "true")
    assert run.replay.body == run.taken.body
    # Stripe's side: exactly one charge for the order.
    assert len(run.charges) == 1


@pytest.mark.parametrize(
    "point", [FaultPoint.CHECKOUT_AFTER_ORDER, FaultPoint.CHECKOUT_AFTER_STRIPE], ids=str
)
@pytest.mark.parametrize("stack", [SQLITE], indirect=True)
def test_l2_a_worker_that_lost_its_lease_writes_nothing_at_all(
    stack: Stack, point: FaultPoint, children: Callable[..., Child]
) -> None:
    """The documented guarantee: a worker that wakes after a takeover writes nothing.

    Its lease is checked (fenced) before each step with an outside effect: woken after the
    order was created, it does not call Stripe (a second PaymentIntent, since its stale copy of
    the order has none); woken after the Stripe call, its checkpoint fails before it applies
    the answer to the order's trail.
    """
    run = paused_takeover(stack, point, children)
    require(run.taken.status == 201, f"the takeover failed: {run.taken}")
    require(run.woken[0] == 409, f"the paused worker was not fenced out: {run.woken}")
    assert run.trail_after == run.trail_at_takeover
    assert run.intents == [run.taken.json()["payment_intent_id"]]


@pytest.mark.parametrize("held", ["same_event", "older_event"])
def test_l2_a_paused_webhook_worker_commits_nothing_over_the_successor(
    stack: Stack, held: str, children: Callable[..., Child]
) -> None:
    now = Worker(stack)
    try:
        order_id = f"l2w-{uid()}"
        created = now.post({"order_id": order_id, "amount": 2500}, f"key-{order_id}")
        assert created.status == 201, created.body
        intent = created.json()["payment_intent_id"]
        t = int(time.time())
        succeeded = signed_event(
            f"evt_{order_id}_s", "payment_intent.succeeded", intent, order_id, "succeeded", t
        )
        processing = signed_event(
            f"evt_{order_id}_p", "payment_intent.processing", intent, order_id, "processing", t - 5
        )
        first = succeeded if held == "same_event" else processing
        # The paused worker has read the order and decided; it stops before its commit.
        paused = children(_webhook_child, stack, first)
        paused.wait_stopped()
        # Its contention lock on the PaymentIntent runs out while it sleeps (waited for here
        # through the lock itself, so the successor below finds it free).
        lock = now.locks.acquire(f"pi:{intent}", ttl=timedelta(seconds=5), wait=LOCK_WAIT)
        assert lock is not None
        now.locks.release(f"pi:{intent}", lock)

        applied = now.deliver(succeeded)
        assert (applied.status, applied.json()["outcome"]) == (200, "applied")

        status, answer, _ = paused.resume()
        assert status == 200, answer
        # Its commit is refused (the order moved on): it reads again and finds the event
        # processed, or its own older event stale; never a second application.
        expected = "duplicate" if held == "same_event" else "stale"
        assert json.loads(answer)["outcome"] == expected

        record = now.order(order_id)
        assert record is not None
        assert record.state.status is OrderStatus.PAID
        trail = now.trail(order_id)
        assert trail.count(AuditStep.SUCCEEDED) == 1
        if held == "older_event":
            assert trail[-1] is AuditStep.IGNORED_STALE
        with now.payments.transaction() as tx:
            for body in {first, succeeded}:
                stored = tx.get_event("", json.loads(body)["id"])
                assert stored is not None
                assert stored.status is InboxStatus.PROCESSED
        # One receipt: the successor's transition wrote the only outbox row.
        effects = cast("OutboxStore", now.payments).effects_for(TENANT, order_id)
        assert [entry.effect for entry in effects] == ["receipt"]
    finally:
        now.close()


# --- L4: a worker killed inside the order's database transaction ------------------------------


def test_l4_a_kill_inside_the_order_transaction_rolls_it_back(
    stack: Stack, children: Callable[..., Child]
) -> None:
    since = int(time.time()) - 1
    order_id = f"l4-{uid()}"
    key = f"key-{order_id}"
    body = {"order_id": order_id, "amount": 2500, "payment_method": "pm_card_visa"}
    killed = children(
        _checkout_child, stack, FaultPoint.CHECKOUT_IN_ORDER_TRANSACTION, "kill", body, key
    )
    killed.wait_killed()

    now, later = Worker(stack), Worker(stack, clock=AheadClock(AHEAD))
    try:
        if stack.db.startswith("sqlite"):
            # The dead process's write lock went with it: a writer gets in at once.
            conn = sqlite3.connect(stack.db.removeprefix("sqlite:///"), timeout=0)
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.rollback()
            finally:
                conn.close()
        # The transaction rolled back: no order, no audit entry; the claim (committed before
        # it) is still held by the dead worker's lease, with no recovery point.
        assert now.order(order_id) is None
        assert now.trail(order_id) == []
        record = now.record(key)
        assert record is not None
        assert (record.state, record.recovery_point) == (RecordState.IN_PROGRESS, None)
        busy = now.post(body, key)
        assert (busy.status, busy.json().get("code")) == (409, "request_in_flight")
        assert now.intents(order_id) == []

        # Once the lease has run out, the retry succeeds, once.
        retried = later.post(body, key)
        assert retried.status == 201, retried.body
        assert retried.json()["status"] == "paid"
        intent = retried.json()["payment_intent_id"]
        assert later.trail(order_id) == [
            AuditStep.STARTED,
            AuditStep.PENDING,
            AuditStep.SUCCEEDED,
        ]
        replay = now.post(body, key)
        assert (replay.status, replay.header("Idempotent-Replayed")) == (201, "true")
        assert replay.body == retried.body
        assert now.intents(order_id) == [intent]
        assert len(now.charges([intent], since)) == 1
    finally:
        now.close()
        later.close()
