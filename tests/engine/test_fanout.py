"""W2 at high fan-out: the same webhook event delivered by dozens of workers at once.

Four processes of twelve threads each deliver the same signed event at the same instant (one
barrier releases all 48 deliveries together), round after round, for one order on a real
database:

1. ``payment_intent.created``, by every worker;
2. ``payment_intent.processing``, by every worker;
3. a burst of distinct events for the order, a few copies of each, interleaved: newer payment
   phases (``requires_action``, ``amount_capturable_updated``, ``payment_failed``), eight
   ``charge.updated`` events (ignored, but audited: each moves the order's trail) and
   re-deliveries of round 2's event, so that the order's compare-and-set is contended by
   different events and not only by copies of one;
4. ``payment_intent.succeeded`` interleaved with a late, older ``processing`` event.

Each event must be decided exactly once (one inbox row, one audit entry, one non-duplicate
answer; every other answer ``duplicate``), every answer must be a 2xx, the order must end
``paid`` with an intact audit trail, and each effect must have one outbox row and run once
although every worker dispatches at the same time. PostgreSQL, MariaDB and SQLite (at the same
fan-out: its writers queue on ``BEGIN IMMEDIATE`` within the busy timeout), each with Redis
locks and with ``NoLockProvider``; PostgreSQL also with no lock provider at all.

Every delivery is held after its first read until all the round's deliveries have read (see
``_HeldStore``): the races this machine's scheduler might spare are forced, so the test can
assert how many commits were lost, not only that nothing went wrong.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest

from idempay.backends import lock_provider_from_url, payment_store_from_url
from idempay.core.audit import AuditDraft, AuditSource, AuditStep, verify_trail
from idempay.core.models import (
    EventCommit,
    EventReception,
    InboxEvent,
    InboxStatus,
    OutboxStatus,
)
from idempay.core.orders import OrderState, OrderStatus
from idempay.core.signature import sign_payload
from idempay.engine import EffectContext, Guard, GuardConfig, GuardRequest, WebhookOutcome
from idempay.errors import ConcurrentUpdateError

SECRET = "whsec_fanout"
TENANT = "fanout"
AMOUNT = 4200
PROCESSES = 4
THREADS = 12  # per process: 48 deliveries of one event at once
# On: Redis locks. Off: NoLockProvider ("none://"), and on PostgreSQL also no provider at all
# (locks=None), which the engine treats the same way; once is enough for that spelling.
LOCK_MODES = ("redis", "no-lock-provider")


@dataclass(frozen=True, slots=True)
class Event:
    """One Stripe event about the order, and the audit steps its single decision may leave."""

    name: str
    type: str
    status: str
    created: int
    steps: frozenset[AuditStep]

    @property
    def inbox_status(self) -> InboxStatus:
        """Where its inbox row must end."""
        return InboxStatus.IGNORED if AuditStep.IGNORED in self.steps else InboxStatus.PROCESSED

    def outcome(self, step: AuditStep) -> WebhookOutcome:
        """The answer of the delivery that decided it, given the audit step it left."""
        if step is AuditStep.IGNORED_STALE:
            return WebhookOutcome.STALE
        if step is AuditStep.IGNORED:
            return WebhookOutcome.IGNORED
        return WebhookOutcome.APPLIED


def _event(name: str, type_: str, status: str, created: int, *steps: AuditStep) -> Event:
    return Event(name, type_, status, created, frozenset(steps))


CREATED = _event(
    "created", "payment_intent.created", "requires_payment_method", 100, AuditStep.PENDING
)
PROCESSING = _event(
    "processing", "payment_intent.processing", "processing", 200, AuditStep.PROCESSING
)
# The burst: whichever commits first, the newest phase (failed, t=230) is applied, and each of
# the two older ones is applied or ignored as stale, depending on what it finds.
ACTION = _event(
    "action",
    "payment_intent.requires_action",
    "requires_action",
    210,
    AuditStep.ACTION_REQUIRED,
    AuditStep.IGNORED_STALE,
)
AUTHORIZED = _event(
    "authorized",
    "payment_intent.amount_capturable_updated",
    "requires_capture",
    220,
    AuditStep.AUTHORIZED,
    AuditStep.IGNORED_STALE,
)
FAILED = _event(
    "failed", "payment_intent.payment_failed", "requires_payment_method", 230, AuditStep.FAILED
)
# Not a payment phase: acknowledged and audited as ignored, whatever the order's state.
CHARGE_UPDATES = tuple(
    _event(f"charge{n}", "charge.updated", "succeeded", 231 + n, AuditStep.IGNORED)
    for n in range(8)
)
# Older than the failure, and a success closes the order to attempts: stale either way.
LATE = _event("late", "payment_intent.processing", "processing", 205, AuditStep.IGNORED_STALE)
SUCCEEDED = _event("succeeded", "payment_intent.succeeded", "succeeded", 300, AuditStep.SUCCEEDED)
EVENTS = (CREATED, PROCESSING, ACTION, AUTHORIZED, FAILED, *CHARGE_UPDATES, LATE, SUCCEEDED)

# Worker number w delivers round[w % len(round)]: every event of a round is delivered by
# several processes at once.
ROUNDS: tuple[tuple[Event, ...], ...] = (
    (CREATED,),
    (PROCESSING,),
    (ACTION, AUTHORIZED, FAILED, PROCESSING, *CHARGE_UPDATES),
    (SUCCEEDED, SUCCEEDED, SUCCEEDED, LATE),
)


class Step(NamedTuple):
    """One delivery a worker makes in one round."""

    event_id: str
    body: bytes


class Delivery(NamedTuple):
    """What one worker saw for one delivery."""

    round: int
    event: str
    status: int
    outcome: str
    lost_commits: int
    """Commits of this delivery refused because the inbox row, the order or its trail moved."""
    lost_to_others: int
    """Those of them lost to another event (its own event was still undecided after)."""


class Ran(NamedTuple):
    effect: str
    dedup_key: str


_DECIDED = (InboxStatus.PROCESSED, InboxStatus.IGNORED)


class _HeldStore:
    """The real payment store, holding each delivery after its first read, counting lost commits.

    ``start(barrier)`` makes the calling thread's next read wait, once done, until every
    delivery of the round has read: all of them then decide on what they read before any of
    them commits, the worst case of a truly parallel fan-out (48 workers on 48 cores) whatever
    this machine's scheduling. No lock is taken yet at that point (the guard reads before it
    locks), so the hold cannot stall a lock holder. After a refused commit the event's inbox
    row is read once more: if the event is still undecided, what moved was the order or its
    trail, so another event won (a copy of the same event would have left it decided, for
    good). Everything else passes through untouched.
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self._local = threading.local()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def receive_event(self, event: InboxEvent, **hints: Any) -> EventReception:
        got: EventReception = self._store.receive_event(event, **hints)
        held, self._local.held = getattr(self._local, "held", None), None
        if held is not None:
            held.wait(timeout=60)
        return got

    def commit_event(self, commit: EventCommit) -> Any:
        try:
            return self._store.commit_event(commit)
        except ConcurrentUpdateError:
            self._local.lost += 1
            stored = self._store.receive_event(commit.event).event
            if stored is None or stored.status not in _DECIDED:
                self._local.crossed += 1
            raise

    def start(self, held: Any) -> None:
        """Begin a delivery: counts at zero, its first read held at ``held``."""
        self._local.held = held
        self._local.lost = self._local.crossed = 0

    def counts(self) -> tuple[int, int]:
        return self._local.lost, self._local.crossed


def _guard(urls: dict[str, str], payments: Any, ran: list[Ran]) -> Guard:
    locks = None
    if urls["locks"]:
        options = {"prefix": urls["prefix"]} if urls["locks"].startswith("redis") else {}
        locks = lock_provider_from_url(urls["locks"], **options)
    guard = Guard(
        payments=payments,
        locks=locks,
        config=GuardConfig(webhook_secrets=(SECRET,), livemode=False),
    )

    # The same effects in every process, as the same application code registers them.
    @guard.effect("receipt", on="paid")
    def receipt(ctx: EffectContext) -> None:
        ran.append(Ran("receipt", ctx.dedup_key))

    @guard.effect("dunning", on="payment_failed")
    def dunning(ctx: EffectContext) -> None:
        ran.append(Ran("dunning", ctx.dedup_key))

    return guard


def _deliver(guard: Guard, body: bytes) -> tuple[int, str]:
    request = GuardRequest(
        method="POST",
        route="/stripe/webhook",
        body=body,
        headers={
            "Content-Type": "application/json",
            "Stripe-Signature": sign_payload(body, SECRET, timestamp=int(time.time())),
        },
    )
    try:
        response = guard.handle_webhook(request)
    except Exception as error:  # noqa: BLE001 - what escapes the guard is a 500 in any framework
        return 500, type(error).__name__
    answer = response.json()
    return response.status, str(answer.get("outcome") or answer.get("code"))


def _worker(
    guard: Guard,
    store: _HeldStore,
    start: Any,
    hold: Any,
    plan: list[Step],
    out: list[Delivery],
) -> None:
    for number, step in enumerate(plan):
        start.wait(timeout=120)  # every delivery of the round starts at once
        store.start(hold)
        status, outcome = _deliver(guard, step.body)
        out.append(Delivery(number, step.event_id, status, outcome, *store.counts()))
    # Every worker dispatches at once: each effect must still run once.
    start.wait(timeout=120)
    guard.dispatch_effects(limit=10)


def _child(
    start: Any, hold: Any, results: Any, urls: dict[str, str], plans: list[list[Step]]
) -> None:
    store = _HeldStore(payment_store_from_url(urls["db"]))
    ran: list[Ran] = []
    guard = _guard(urls, store, ran)
    deliveries: list[Delivery] = []
    errors: list[BaseException] = []

    def run(plan: list[Step]) -> None:
        try:
            _worker(guard, store, start, hold, plan, deliveries)
        except BaseException as error:
            errors.append(error)
            # The other workers fail fast instead of waiting for this one.
            start.abort()
            hold.abort()
            raise

    threads = [threading.Thread(target=run, args=(plan,)) for plan in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    results.put((repr(errors[0]) if errors else None, deliveries, ran))


def _event_body(event: Event, event_id: str, intent: str, order_id: str) -> bytes:
    if event.type.startswith("charge."):
        obj: dict[str, Any] = {
            "id": f"ch_{intent.removeprefix('pi_')}",
            "object": "charge",
            "payment_intent": intent,
            "amount": AMOUNT,
            "amount_refunded": 0,
            "currency": "eur",
            "refunded": False,
            "status": event.status,
        }
    else:
        obj = {
            "id": intent,
            "object": "payment_intent",
            "status": event.status,
            "amount": AMOUNT,
            "amount_received": AMOUNT if event.status == "succeeded" else 0,
            "currency": "eur",
            "livemode": False,
            "metadata": {"order_id": order_id, "idempay_tenant": TENANT},
        }
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": event.type,
            "created": event.created,
            "livemode": False,
            "data": {"object": obj},
        }
    ).encode()


def _run(urls: dict[str, str], workers: list[list[list[Step]]]) -> list[Any]:
    """Run one process per entry of ``workers`` (each entry: one plan per thread)."""
    ctx = multiprocessing.get_context("spawn")
    plans = [plan for process in workers for plan in process]
    start, hold = ctx.Barrier(len(plans)), ctx.Barrier(len(plans))
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(start, hold, results, urls, process))
        for process in workers
    ]
    for proc in procs:
        proc.start()
    collected: list[Any] = []
    deadline = time.monotonic() + 300
    while len(collected) < len(procs):
        try:
            collected.append(results.get(timeout=1))
        except queue.Empty:
            crashed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not crashed, f"a worker process died: exit codes {crashed}"
            assert time.monotonic() < deadline, "the deliveries did not finish in time"
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    return collected


def _new_order(url: str, order_id: str, intent: str) -> None:
    """The order as a checkout leaves it before Stripe answers: ``created``, audited."""
    payments = payment_store_from_url(url)
    try:
        with payments.transaction() as tx:
            state = OrderState(OrderStatus.CREATED, AMOUNT, "eur", payment_intent_id=intent)
            tx.insert_order(TENANT, order_id, state)
            tx.append_audit(
                AuditDraft(TENANT, order_id, AuditStep.STARTED, AuditSource.CHECKOUT, tx.now())
            )
    finally:
        payments.close()  # type: ignore[attr-defined]


def _plans(ids: dict[str, str], order_id: str, intent: str) -> list[list[list[Step]]]:
    """Each process's threads' plans: worker w delivers round[w % len(round)] in each round."""
    bodies = {e.name: _event_body(e, ids[e.name], intent, order_id) for e in EVENTS}

    def plan(worker: int) -> list[Step]:
        picks = [events[worker % len(events)] for events in ROUNDS]
        return [Step(ids[e.name], bodies[e.name]) for e in picks]

    return [[plan(p * THREADS + t) for t in range(THREADS)] for p in range(PROCESSES)]


def fan_out(urls: dict[str, str], record: Callable[[str, object], None]) -> list[Delivery]:
    """Deliver ROUNDS with ``PROCESSES * THREADS`` workers and check every guarantee of W2."""
    tag = secrets.token_hex(4)
    order_id, intent = f"fan-{tag}", f"pi_fan{tag}"
    ids = {e.name: f"evt_{tag}_{e.name}" for e in EVENTS}
    _new_order(urls["db"], order_id, intent)
    workers = PROCESSES * THREADS

    started = time.monotonic()
    collected = _run(urls, _plans(ids, order_id, intent))
    record("seconds", round(time.monotonic() - started, 2))
    failures = [error for error, _, _ in collected if error is not None]
    assert not failures, failures
    deliveries: list[Delivery] = [d for _, batch, _ in collected for d in batch]
    ran = Counter(r for _, _, batch in collected for r in batch)
    lost = [d.lost_commits for d in deliveries]
    record("lost_commits", sum(lost))
    record("max_lost_commits_per_delivery", max(lost))

    # No 5xx, no 4xx: every delivery was taken care of.
    assert len(deliveries) == workers * len(ROUNDS)
    statuses = Counter(d.status for d in deliveries)
    assert statuses == {200: workers * len(ROUNDS)}, Counter(
        (d.status, d.outcome) for d in deliveries
    )

    # Each event has exactly one delivery that decided it; every other one is a duplicate.
    deciders = {d.event: d for d in deliveries if d.outcome != WebhookOutcome.DUPLICATE}
    per_event = Counter(d.event for d in deliveries if d.outcome != WebhookOutcome.DUPLICATE)
    assert per_event == dict.fromkeys(ids.values(), 1), per_event

    payments = payment_store_from_url(urls["db"])
    try:
        with payments.transaction() as tx:
            order = tx.get_order(TENANT, order_id)
            trail = tx.audit_trail(TENANT, order_id)
            inbox = {name: tx.get_event("", event_id) for name, event_id in ids.items()}
        outbox = payments.effects_for(TENANT, order_id)  # type: ignore[attr-defined]
    finally:
        payments.close()  # type: ignore[attr-defined]

    assert order is not None
    assert order.state.status is OrderStatus.PAID
    assert verify_trail(trail).ok
    # One audit entry per event (the order's own "started" apart), of a step that event allows,
    # and in agreement with the answer its deciding delivery got.
    assert Counter(e.event_id for e in trail) == {None: 1} | dict.fromkeys(ids.values(), 1)
    steps = [e.step for e in trail]
    assert steps.count(AuditStep.PENDING) == 1
    assert steps.count(AuditStep.SUCCEEDED) == 1
    for event in EVENTS:
        (entry,) = [e for e in trail if e.event_id == ids[event.name]]
        assert entry.step in event.steps, (event.name, entry.step)
        assert deciders[ids[event.name]].outcome == event.outcome(entry.step), event.name
        stored = inbox[event.name]
        assert stored is not None
        assert stored.status is event.inbox_status, (event.name, stored.status)

    # One outbox row per effect, each done, each run exactly once by one of the workers.
    assert sorted(e.effect for e in outbox) == ["dunning", "receipt"]
    assert {e.status for e in outbox} == {OutboxStatus.DONE}
    assert ran == {Ran(e.effect, e.dedup_key): 1 for e in outbox}

    if urls["locks"].startswith("redis"):
        # The lock serializes the deliveries of one PaymentIntent: a delivery that found it
        # busy waited, then read again, so it decided on what its predecessor committed and
        # (almost) never lost a commit. Without the lock, the same storm loses hundreds.
        lost = sum(d.lost_commits for d in deliveries)
        record("lost_commits_with_lock", lost)
        assert lost < len(deliveries) // 4, lost
        return deliveries
    # The races happened. In each round every delivery of a new event decided on a read taken
    # before any commit, so all of them but the first to commit lost their first commit; and
    # some lost it to another event of the order, not only to a copy of their own.
    for number in range(len(ROUNDS)):
        new = [d for d in deliveries if d.round == number and d.event in _new_ids(ids, number)]
        assert sum(d.lost_commits > 0 for d in new) == len(new) - 1, number
    crossed = sum(d.lost_to_others for d in deliveries)
    record("lost_to_other_events", crossed)
    assert crossed, "no commit was ever lost to another event of the order"
    return deliveries


def _new_ids(ids: dict[str, str], number: int) -> set[str]:
    """The ids of the events round ``number`` is the first to deliver."""
    earlier = {e.name for r in ROUNDS[:number] for e in r}
    return {ids[e.name] for e in ROUNDS[number] if e.name not in earlier}


def _recorder(request: pytest.FixtureRequest) -> Callable[[str, object], None]:
    """Keep the run's numbers in the test report (shown by ``--junitxml`` with xunit1)."""
    return lambda name, value: request.node.user_properties.append((name, value))


def _urls(db: str, locks: str, redis_url: str, prefix: str) -> dict[str, str]:
    lock_url = {"redis": redis_url, "no-lock-provider": "none://", "no-locks": ""}[locks]
    return {"db": db, "locks": lock_url, "prefix": f"{prefix}fanout:"}


@pytest.mark.slow
@pytest.mark.parametrize("locks", [*LOCK_MODES, "no-locks"])
def test_w2_fan_out_on_postgres(
    locks: str,
    postgres_url: str,
    redis_url: str,
    redis_prefix: str,
    request: pytest.FixtureRequest,
) -> None:
    from idempay.backends.sql import upgrade

    upgrade(postgres_url)
    fan_out(_urls(postgres_url, locks, redis_url, redis_prefix), _recorder(request))


@pytest.mark.slow
@pytest.mark.parametrize("locks", LOCK_MODES)
def test_w2_fan_out_on_mariadb(
    locks: str,
    mysql_url: str,
    redis_url: str,
    redis_prefix: str,
    request: pytest.FixtureRequest,
) -> None:
    from idempay.backends.sql import upgrade

    upgrade(mysql_url)
    fan_out(_urls(mysql_url, locks, redis_url, redis_prefix), _recorder(request))


@pytest.mark.slow
@pytest.mark.parametrize("locks", LOCK_MODES)
def test_w2_fan_out_on_sqlite(
    locks: str,
    sqlite_url: str,
    redis_url: str,
    redis_prefix: str,
    request: pytest.FixtureRequest,
) -> None:
    from idempay.backends.sql import upgrade

    upgrade(sqlite_url)
    fan_out(_urls(sqlite_url, locks, redis_url, redis_prefix), _recorder(request))
