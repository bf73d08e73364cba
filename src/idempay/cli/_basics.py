"""The commands that came first: demo, inspect, db upgrade."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from idempay.cli._context import EXIT_NOT_FOUND, EXIT_PROBLEMS, UsageError, database_url

if TYPE_CHECKING:
    from idempay.core.audit import TrailCheck

__all__ = ["EXIT_BROKEN_TRAIL", "db_upgrade", "demo", "inspect"]

EXIT_BROKEN_TRAIL = EXIT_PROBLEMS


def demo(args: argparse.Namespace) -> int:
    from idempay._demo import DemoOptions, run_demo

    out = sys.stdout
    options = DemoOptions(
        orders=args.orders,
        workers=args.workers,
        database_url=args.database_url,
        lock_url=args.lock_url,
        seed=args.seed,
        lose=args.lose / 100,
        kill_worker=not args.no_kill,
    )
    report = run_demo(options, out=out)
    rows = report.rows()
    width = max(len(name) for name, _ in rows)
    out.write("\n")
    for name, value in rows:
        out.write(f"  {name:<{width}}  {value:>8}\n")
    for violation in report.violations[:50]:
        out.write(f"  VIOLATION: {violation}\n")
    out.write(report.summary() + "\n")
    return 1 if report.violations else 0


def db_upgrade(args: argparse.Namespace) -> int:
    from idempay.backends.sql import upgrade

    url = args.url or os.environ.get("IDEMPAY_DATABASE_URL")
    if not url:
        raise UsageError("give --url or set IDEMPAY_DATABASE_URL")
    upgrade(url, revision=args.revision)
    sys.stdout.write(f"idempay db upgrade: schema at {args.revision}\n")
    return 0


def inspect(args: argparse.Namespace) -> int:
    import json

    from idempay.backends import payment_store_from_url
    from idempay.engine import Guard, GuardConfig
    from idempay.errors import OrderNotFoundError

    url = database_url(args)
    payments = payment_store_from_url(url)
    try:
        guard = Guard(payments=payments, config=GuardConfig())
        try:
            view = guard.inspect_order(args.order_id, tenant=args.tenant)
        except OrderNotFoundError:
            sys.stderr.write(f"idempay inspect: no order {args.order_id!r}\n")
            return EXIT_NOT_FOUND
    finally:
        close = getattr(payments, "close", None)
        if close is not None:
            close()
    check = view.trail_check
    if args.json:
        document = view.to_document() | {
            "audit_check": {"ok": check.ok, "broken_at": check.broken_at, "problem": check.problem}
        }
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        sys.stdout.write(_order_text(view.to_document(), check))
    return 0 if check.ok else EXIT_BROKEN_TRAIL


def _order_text(document: dict[str, Any], check: TrailCheck) -> str:
    refunded = f" (refunded {document['amount_refunded']})"
    lines = [
        f"order      {document['order_id']}",
        f"status     {document['status']}",
        f"amount     {document['amount']} {document['currency']}{refunded}",
        f"payment    {document['payment_intent_id'] or '-'}",
        *([f"review     {document['review_reason']}"] if document["review_reason"] else []),
        *([f"dispute    {document['dispute']}"] if document["dispute"] != "none" else []),
        "",
        "audit (* = journal: a decision that changed nothing)",
    ]
    for entry in document["audit"]:
        moved = ""
        if "to_status" in entry:
            moved = f"{entry.get('from_status') or '-'} -> {entry['to_status']}"
        mark = " " if entry["durable"] else "*"
        lines.append(
            f" {mark}{entry.get('seq', ''):>4} {entry['at'][:26]:<26} {entry['step']:<18}"
            f" {entry['source']:<10} {moved:<34} {entry.get('event_id') or ''}".rstrip()
        )
    verdict = "intact" if check.ok else f"BROKEN at seq {check.broken_at}: {check.problem}"
    lines += ["", f"hash chain {verdict}", "", "effects"]
    effects = [*document["effects"], *document["pending_effects"]]
    lines += [f"  {e['kind']:<20} {e['status']:<8} attempts {e['attempts']}" for e in effects]
    if not effects:
        lines.append("  (none)")
    return "\n".join(lines) + "\n"
