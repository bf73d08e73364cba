"""Concurrency tools for the contract suites: threads, tasks and processes that start together.

Contenders are released by a barrier (threads, processes) or an event (tasks), never by a
sleep, so that they really overlap. Process children run module-level functions: a backend
under test hands them a picklable factory of its *sync* store or provider.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from multiprocessing.synchronize import Barrier as ProcessBarrier
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any, TypeVar

from idempay.core.orders import OrderState, OrderStatus
from idempay.core.records import Claimed
from idempay.protocols import (
    IdempotencyStore,
    LockProvider,
    MaintenanceStore,
    OutboxStore,
    PaymentStore,
)

__all__ = [
    "async_concurrently",
    "async_in_processes",
    "async_shut",
    "claim_checks_in_child",
    "claim_in_child",
    "concurrently",
    "dispatch_in_child",
    "flatten",
    "hold_transaction_in_child",
    "in_processes",
    "kill_child_holding_a_transaction",
    "lock_in_child",
    "shut",
]

T = TypeVar("T")
_TIMEOUT = 120.0


def concurrently(n: int, work: Callable[[int], T]) -> list[T]:
    """Run ``work(0..n-1)`` in ``n`` threads released together by a barrier."""
    barrier = threading.Barrier(n)

    def contender(i: int) -> T:
        barrier.wait(timeout=_TIMEOUT)
        return work(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(contender, range(n)))


async def async_concurrently(n: int, work: Callable[[int], Awaitable[T]]) -> list[T]:
    """Run ``work(0..n-1)`` as ``n`` asyncio tasks released together by an event."""
    start = asyncio.Event()

    async def contender(i: int) -> T:
        await start.wait()
        return await work(i)

    tasks = [asyncio.create_task(contender(i)) for i in range(n)]
    # Let every task reach the event before releasing them all.
    await asyncio.sleep(0)
    start.set()
    return list(await asyncio.gather(*tasks))


def in_processes(target: Callable[..., None], n: int, *args: Any) -> list[Any]:
    """Run ``target(barrier, results, i, *args)`` in ``n`` spawned processes; collect results."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(barrier, results, i, *args), daemon=True) for i in range(n)
    ]
    for proc in procs:
        proc.start()
    collected = [results.get(timeout=_TIMEOUT) for _ in procs]
    for proc in procs:
        proc.join(timeout=_TIMEOUT)
        if proc.exitcode != 0:
            msg = f"a contender process failed (exit code {proc.exitcode})"
            raise AssertionError(msg)
    errors = [r for r in collected if isinstance(r, str) and r.startswith("error:")]
    if errors:
        raise AssertionError("; ".join(errors))
    return collected


async def async_in_processes(target: Callable[..., None], n: int, *args: Any) -> list[Any]:
    """:func:`in_processes` without blocking the event loop."""
    return await asyncio.to_thread(in_processes, target, n, *args)


def _report(results: Any, work: Callable[[], object]) -> None:
    try:
        results.put(work())
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        results.put(f"error: {type(exc).__name__}: {exc}")


def claim_in_child(
    barrier: ProcessBarrier,
    results: Any,
    _i: int,
    factory: Callable[[], IdempotencyStore],
    scope: str,
    key: str,
) -> None:
    """Child: claim (scope, key) together with the others; report whether it won."""
    store = factory()

    def claim() -> bool:
        barrier.wait(timeout=_TIMEOUT)
        result = store.claim(
            scope, key, "fp", lease_for=timedelta(minutes=5), retain_for=timedelta(hours=1)
        )
        return isinstance(result, Claimed)

    _report(results, claim)
    shut(store)


def lock_in_child(
    barrier: ProcessBarrier,
    results: Any,
    _i: int,
    factory: Callable[[], LockProvider],
    name: str,
) -> None:
    """Child: try the lock together with the others; report whether it got it."""
    provider = factory()

    def take() -> bool:
        barrier.wait(timeout=_TIMEOUT)
        return provider.acquire(name, ttl=timedelta(minutes=5)) is not None

    _report(results, take)
    # Keep the lock until every contender has tried (a provider may free it on exit).
    barrier.wait(timeout=_TIMEOUT)
    shut(provider)


def dispatch_in_child(
    barrier: ProcessBarrier,
    results: Any,
    _i: int,
    factory: Callable[[], OutboxStore],
    limit: int,
) -> None:
    """Child: claim due effects together with the others; report the (tenant, order) claimed."""
    store = factory()

    def dispatch() -> list[tuple[str, str]]:
        barrier.wait(timeout=_TIMEOUT)
        entries = store.claim_due_effects(limit=limit, lease_for=timedelta(minutes=5))
        return [(e.tenant, e.order_id) for e in entries]

    _report(results, dispatch)
    shut(store)


def claim_checks_in_child(
    barrier: ProcessBarrier,
    results: Any,
    _i: int,
    factory: Callable[[], MaintenanceStore],
    limit: int,
) -> None:
    """Child: claim orders awaiting payment together with the others; report the (tenant,
    order id) pairs it was handed."""
    store = factory()

    def claim() -> list[tuple[str, str]]:
        barrier.wait(timeout=_TIMEOUT)
        claimed = store.claim_orders_to_check(
            statuses=[OrderStatus.AWAITING_PAYMENT],
            untouched_for=timedelta(0),
            limit=limit,
            lease_for=timedelta(minutes=5),
        )
        return [(o.tenant, o.order_id) for o in claimed]

    _report(results, claim)
    shut(store)


def hold_transaction_in_child(
    factory: Callable[[], PaymentStore], tenant: str, order_id: str, inside: ProcessEvent
) -> None:
    """Child: write an order inside a transaction, say so, then wait to be killed."""
    store = factory()
    with store.transaction() as tx:
        tx.insert_order(tenant, order_id, OrderState(OrderStatus.CREATED, 100, "eur"))
        inside.set()
        threading.Event().wait(_TIMEOUT)  # killed long before this returns


def kill_child_holding_a_transaction(
    factory: Callable[[], PaymentStore], tenant: str, order_id: str
) -> None:
    """Start a child that writes inside an open transaction, then SIGKILL it there."""
    ctx = multiprocessing.get_context("spawn")
    inside = ctx.Event()
    proc = ctx.Process(
        target=hold_transaction_in_child, args=(factory, tenant, order_id, inside), daemon=True
    )
    proc.start()
    try:
        if not inside.wait(_TIMEOUT):
            msg = "the child never opened its transaction"
            raise AssertionError(msg)
        os.kill(proc.pid or 0, signal.SIGKILL)
    finally:
        proc.join(timeout=_TIMEOUT)


def shut(resource: object) -> None:
    """Close a backend if it can be closed (``close()``)."""
    close = getattr(resource, "close", None)
    if callable(close):
        close()


async def async_shut(resource: object) -> None:
    """Close an async backend if it can be closed (``aclose()``, else ``close()``)."""
    aclose = getattr(resource, "aclose", None)
    if callable(aclose):
        await aclose()
    else:
        shut(resource)


def flatten(batches: Sequence[Sequence[T]]) -> list[T]:
    """All items of ``batches``, in order."""
    return [item for batch in batches for item in batch]
