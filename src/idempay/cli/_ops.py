"""The operations commands: reconcile, replay, outbox, purge."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from idempay.cli._context import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_PROBLEMS,
    UsageError,
    database_url,
    guard_for,
    run_with,
)
from idempay.cli._render import ProgressBar, print_json, table
from idempay.core.audit import AuditSource
from idempay.core.events import parse_event
from idempay.core.models import OutboxBacklog
from idempay.core.orders import OrderStatus
from idempay.engine import AsyncGuard, DispatchReport, Guard, WebhookOutcome
from idempay.errors import (
    ConfigurationError,
    OrderNotFoundError,
    OrderStateConflictError,
    PaymentProviderError,
)
from idempay.operations import (
    AsyncReconciler,
    Checked,
    PurgeReport,
    ReconcileConfig,
    Reconciler,
    ReconcileReport,
    Retention,
    purge,
)

__all__ = [
    "outbox_retry",
    "outbox_run",
    "outbox_status",
    "purge_command",
    "reconcile",
    "replay",
    "resolve",
]


# --- reconcile ------------------------------------------------------------------------------


def reconcile(args: argparse.Namespace) -> int:
    try:
        config = ReconcileConfig(
            older_than=args.older_than,
            max_orders=args.max_orders,
            max_events=args.max_events,
            backfill=not args.no_backfill,
            backfill_window=args.backfill_window,
        )
    except ConfigurationError as error:
        raise UsageError(str(error)) from None
    guard = guard_for(args, gateway=True, effects=True)
    bar = ProgressBar(enabled=False if args.json or args.loop else None)

    def sync(g: Guard) -> ReconcileReport | None:
        reconciler = Reconciler(g, config=config)
        if args.loop:
            stop = threading.Event()
            _on_signals(stop.set)
            reconciler.run_forever(stop, interval=args.interval)
            return None
        return reconciler.run_once(progress=bar)

    async def run_async(g: AsyncGuard) -> ReconcileReport | None:
        reconciler = AsyncReconciler(g, config=config)
        if args.loop:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await reconciler.run_forever(stop, interval=args.interval)
            return None
        return await reconciler.run_once(progress=bar)

    try:
        report = run_with(guard, sync, run_async)
    finally:
        bar.close()
    if report is None:
        return EXIT_OK
    if args.json:
        print_json(report.to_document())
    else:
        sys.stdout.write(_reconcile_text(report, verbose=args.verbose))
    return EXIT_PROBLEMS if report.errors else EXIT_OK


def _reconcile_text(report: ReconcileReport, *, verbose: bool) -> str:
    shown = [c for c in report.checks if verbose or c.result is not Checked.UNCHANGED]
    out = []
    if shown:
        rows = [
            (c.tenant or "-", c.order_id, c.before.value, c.after.value, c.error or c.result.value)
            for c in shown
        ]
        out.append(table(("tenant", "order", "before", "after", "result"), rows).rstrip("\n"))
        out.append("")
    counts = ", ".join(f"{report.count(r)} {r.value}" for r in Checked)
    out.append(f"orders checked  {len(report.checks)} ({counts})")
    out.append(f"kept events     {_counts(report.events)}")
    out.append(f"backfill        {_counts(report.backfill)}")
    out.append(f"orders now      {_counts({s.value: n for s, n in sorted(report.orders.items())})}")
    if report.outbox is not None:
        out.append(f"outbox          {_backlog(report.outbox)}")
    review = report.orders.get(OrderStatus.NEEDS_REVIEW, 0)
    if review:
        out.append(
            f"\n{review} order(s) need review: see docs/operations.md (needs_review runbook)"
        )
    return "\n".join(out) + "\n"


def _needs_review() -> Any:
    from idempay.core.orders import OrderStatus

    return OrderStatus.NEEDS_REVIEW


def _counts(counts: Any) -> str:
    items = [f"{n} {name}" for name, n in counts.items() if n]
    return ", ".join(items) if items else "none"


def _backlog(backlog: OutboxBacklog) -> str:
    text = f"{backlog.pending} pending ({backlog.due} due), {backlog.dead} dead"
    if backlog.oldest_due_at is not None:
        age = datetime.now(UTC) - backlog.oldest_due_at
        text += f", oldest due for {_age(age)}"
    return text


def _age(age: timedelta) -> str:
    seconds = max(0, int(age.total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _on_signals(callback: Any) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _signum, _frame: callback())


# --- replay ---------------------------------------------------------------------------------


def replay(args: argparse.Namespace) -> int:
    guard = guard_for(args, gateway=args.from_stripe, effects=True)
    if args.from_stripe and guard.gateway is None:
        raise UsageError("--from-stripe needs a guard with a Stripe gateway (see --app)")

    def sync(g: Guard) -> tuple[str, dict[str, Any]] | None:
        with g.payments.transaction() as tx:
            stored = tx.get_event(args.account, args.event_id)
        if stored is not None:
            raw = stored.payload
        elif args.from_stripe and g.gateway is not None:
            try:
                raw = g.gateway.retrieve_event(args.event_id)
            except PaymentProviderError:  # no such event (Stripe keeps them 30 days)
                return None
        else:
            return None
        event = parse_event(raw, limits=g.config.json_limits)
        outcome = g.process_event(event, raw, source=AuditSource.OPERATOR)
        with g.payments.transaction() as tx:
            order = None
            if event.payment_intent_id is not None:
                order = tx.find_order_by_payment_intent(event.payment_intent_id)
            after = tx.get_event(args.account, args.event_id)
            if order is None and after is not None and after.order_id is not None:
                order = tx.get_order(_tenant(g, event), after.order_id)
        return outcome.value, _replay_document(
            args, outcome, stored=stored is not None, order=order
        )

    async def run_async(g: AsyncGuard) -> tuple[str, dict[str, Any]] | None:
        async with g.payments.transaction() as tx:
            stored = await tx.get_event(args.account, args.event_id)
        if stored is not None:
            raw = stored.payload
        elif args.from_stripe and g.gateway is not None:
            try:
                raw = await g.gateway.retrieve_event(args.event_id)
            except PaymentProviderError:  # no such event (Stripe keeps them 30 days)
                return None
        else:
            return None
        event = parse_event(raw, limits=g.config.json_limits)
        outcome = await g.process_event(event, raw, source=AuditSource.OPERATOR)
        async with g.payments.transaction() as tx:
            order = None
            if event.payment_intent_id is not None:
                order = await tx.find_order_by_payment_intent(event.payment_intent_id)
            after = await tx.get_event(args.account, args.event_id)
            if order is None and after is not None and after.order_id is not None:
                order = await tx.get_order(_tenant(g, event), after.order_id)
        return outcome.value, _replay_document(
            args, outcome, stored=stored is not None, order=order
        )

    done = run_with(guard, sync, run_async)
    if done is None:
        return _replay_not_found(args)
    _, document = done
    if args.json:
        print_json(document)
    else:
        order = document["order"]
        where = f"; order {order['order_id']} is {order['status']}" if order else ""
        sys.stdout.write(f"{document['event_id']}: {document['outcome']}{where}\n")
    return EXIT_OK


def _replay_not_found(args: argparse.Namespace) -> int:
    hint = (
        ", and Stripe refused to return it (it keeps events 30 days)"
        if args.from_stripe
        else " (add --from-stripe to fetch it from Stripe)"
    )
    sys.stderr.write(f"idempay replay: event {args.event_id!r} is not in the inbox{hint}\n")
    return EXIT_NOT_FOUND


def _tenant(guard: Guard | AsyncGuard, event: Any) -> str:
    metadata = getattr(event.object, "metadata", None) or {}
    return str(metadata.get(guard.config.tenant_metadata_key, ""))


def _replay_document(
    args: argparse.Namespace, outcome: WebhookOutcome, *, stored: bool, order: Any
) -> dict[str, Any]:
    return {
        "event_id": args.event_id,
        "account": args.account,
        "source": "inbox" if stored else "stripe",
        "outcome": outcome.value,
        "order": None
        if order is None
        else {
            "tenant": order.tenant,
            "order_id": order.order_id,
            "status": order.state.status.value,
        },
    }


# --- outbox ---------------------------------------------------------------------------------


def outbox_run(args: argparse.Namespace) -> int:
    if not (getattr(args, "app", None) or _env_app()):
        # Checked first: a guard built from the environment could run none of the effects.
        raise UsageError("outbox run needs --app MODULE:ATTR: the effects are your functions")
    guard = guard_for(args, gateway=False, effects=False)
    bar = ProgressBar(enabled=False if args.json or args.loop else None)
    total = DispatchReport()

    def add(report: DispatchReport) -> int:
        total.done += report.done
        total.retried += report.retried
        total.dead += report.dead
        total.lost += report.lost
        handled = report.done + report.retried + report.dead + report.lost
        bar("effects", total.done + total.retried + total.dead + total.lost, None)
        return handled

    def sync(g: Guard) -> None:
        stop = threading.Event()
        if args.loop:
            _on_signals(stop.set)
        while not stop.is_set():
            if add(g.dispatch_effects(limit=args.limit)) == 0:
                if not args.loop:
                    return
                stop.wait(args.interval.total_seconds())

    async def run_async(g: AsyncGuard) -> None:
        stop = asyncio.Event()
        if args.loop:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            if add(await g.dispatch_effects(limit=args.limit)) == 0:
                if not args.loop:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), args.interval.total_seconds())

    try:
        run_with(guard, sync, run_async)
    finally:
        bar.close()
    document = {
        "done": total.done,
        "retried": total.retried,
        "dead": total.dead,
        "lost": total.lost,
    }
    if args.json:
        print_json(document)
    else:
        sys.stdout.write(
            f"effects done {total.done}, retried later {total.retried}, "
            f"dead-lettered {total.dead}, taken over {total.lost}\n"
        )
    return EXIT_PROBLEMS if total.dead else EXIT_OK


def _env_app() -> str | None:
    return os.environ.get("IDEMPAY_APP")


def _maintenance(args: argparse.Namespace) -> Any:
    from idempay.backends import payment_store_from_url
    from idempay.protocols import MaintenanceStore

    store = payment_store_from_url(database_url(args))
    if not isinstance(store, MaintenanceStore):  # pragma: no cover - every shipped store is
        raise UsageError("this payment store cannot be maintained")
    return store


def _closing(store: Any) -> Any:
    close = getattr(store, "close", None)
    if close is not None:
        close()


def outbox_status(args: argparse.Namespace) -> int:
    store = _maintenance(args)
    try:
        backlog = store.outbox_backlog()
    finally:
        _closing(store)
    if args.json:
        print_json(
            {
                "pending": backlog.pending,
                "due": backlog.due,
                "dead": backlog.dead,
                "oldest_due_at": None
                if backlog.oldest_due_at is None
                else backlog.oldest_due_at.isoformat(),
            }
        )
    else:
        sys.stdout.write(f"outbox  {_backlog(backlog)}\n")
    return EXIT_PROBLEMS if backlog.dead else EXIT_OK


def outbox_retry(args: argparse.Namespace) -> int:
    store = _maintenance(args)
    try:
        count = store.requeue_dead_effects(limit=args.limit)
    finally:
        _closing(store)
    if args.json:
        print_json({"requeued": count})
    else:
        sys.stdout.write(f"requeued {count} dead effect(s); the dispatcher runs them again\n")
    return EXIT_OK


# --- purge ----------------------------------------------------------------------------------


def purge_command(args: argparse.Namespace) -> int:
    from idempay.backends import idempotency_store_from_url

    try:
        retention = Retention(events=args.events, effects=args.effects, journal=args.journal)
    except ConfigurationError as error:
        raise UsageError(str(error)) from None
    url = database_url(args)
    store = _maintenance(args)
    records = idempotency_store_from_url(url)
    bar = ProgressBar(enabled=False if args.json else None)
    try:
        report: PurgeReport = purge(store, records=records, retention=retention, progress=bar)
    finally:
        bar.close()
        _closing(store)
        _closing(records)
    if args.json:
        print_json(report.to_document())
    else:
        rows = [(kind, n) for kind, n in report.to_document().items()]
        sys.stdout.write(table(("deleted", "rows"), rows))
    return EXIT_OK


# --- resolve --------------------------------------------------------------------------------


def resolve(args: argparse.Namespace) -> int:
    keep = bool(args.keep)
    guard = guard_for(args, gateway=False, effects=True)

    def sync(g: Guard) -> Any:
        return g.resolve_review(args.order_id, tenant=args.tenant, keep=keep)

    async def run_async(g: AsyncGuard) -> Any:
        return await g.resolve_review(args.order_id, tenant=args.tenant, keep=keep)

    try:
        order = run_with(guard, sync, run_async)
    except OrderNotFoundError:
        sys.stderr.write(f"idempay resolve: no order {args.order_id!r}\n")
        return EXIT_NOT_FOUND
    except OrderStateConflictError:
        sys.stderr.write(
            "idempay resolve: refused (the order is not under review, or its refunds do not fit "
            "the decision: see 'idempay inspect'); the refusal is in its audit trail\n"
        )
        return EXIT_PROBLEMS
    document = {
        "tenant": order.tenant,
        "order_id": order.order_id,
        "status": order.state.status.value,
        "amount_refunded": order.state.amount_refunded,
    }
    if args.json:
        print_json(document)
    else:
        sys.stdout.write(f"order {order.order_id} is now {order.state.status.value}\n")
    return EXIT_OK
