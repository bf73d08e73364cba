"""The ``idempay`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from idempay import __version__

if TYPE_CHECKING:
    from idempay.core.audit import TrailCheck

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from idempay._demo import DemoOptions, run_demo

    out = sys.stdout
    options = DemoOptions(
        orders=args.orders,
        workers=args.workers,
        database_url=args.database_url,
        lock_url=args.lock_url,
        seed=args.seed,
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


def _db_upgrade(args: argparse.Namespace) -> int:
    from idempay.backends.sql import upgrade

    url = args.url or os.environ.get("IDEMPAY_DATABASE_URL")
    if not url:
        sys.stderr.write("idempay db upgrade: give --url or set IDEMPAY_DATABASE_URL\n")
        return 2
    upgrade(url, revision=args.revision)
    sys.stdout.write(f"idempay db upgrade: schema at {args.revision}\n")
    return 0


EXIT_BROKEN_TRAIL = 1
EXIT_NOT_FOUND = 4


def _inspect(args: argparse.Namespace) -> int:
    import json

    from idempay.backends import payment_store_from_url
    from idempay.engine import Guard, GuardConfig
    from idempay.errors import OrderNotFoundError

    url = args.database_url or os.environ.get("IDEMPAY_DATABASE_URL")
    if not url:
        sys.stderr.write("idempay inspect: give --database-url or set IDEMPAY_DATABASE_URL\n")
        return 2
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idempay",
        description="Payment-safety middleware: idempotent checkout, exactly-once webhook effects.",
    )
    parser.add_argument("--version", action="version", version=f"idempay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run the example shop under a storm of clicks and webhooks, and check it",
        description="Start the Stripe simulator and the FastAPI example shop (several workers, "
        "SQLite and the in-process lock unless told otherwise), drive a storm through HTTP "
        "(double and triple clicks, every webhook duplicated, delayed and reordered, a worker "
        "killed midway), then check every invariant against the running system. Exits 1 if "
        "one is violated; the last line is a key=value summary starting with violations=.",
    )
    demo.add_argument("--orders", type=_positive, default=300, help="orders (default 300)")
    demo.add_argument(
        "--workers", type=_positive, default=3, help="server worker processes (default 3)"
    )
    demo.add_argument(
        "--database-url",
        help="SQLAlchemy URL of the shop's database (default: a new SQLite file)",
    )
    demo.add_argument(
        "--lock-url",
        default="memory://",
        help="lock provider: memory:// (default), redis://HOST:PORT/DB, or a PostgreSQL URL",
    )
    demo.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    demo.add_argument(
        "--no-kill", action="store_true", help="do not kill a worker in the middle of the storm"
    )
    demo.set_defaults(run=_demo)

    inspect = commands.add_parser(
        "inspect",
        help="show an order, its audit trail (hash chain verified) and its effects",
        description="Show one order as it stands: its state, every step of its audit trail "
        "with the hash chain verified, the decisions of its journal, and its effects. Exit "
        f"codes: 0 intact, {EXIT_BROKEN_TRAIL} the trail's hash chain is broken, "
        f"{EXIT_NOT_FOUND} no such order, 2 bad usage.",
    )
    inspect.add_argument("order_id", metavar="ORDER_ID")
    inspect.add_argument("--tenant", default="", help="the order's tenant (default: none)")
    inspect.add_argument(
        "--database-url", help="SQLAlchemy URL of the database (default: $IDEMPAY_DATABASE_URL)"
    )
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(run=_inspect)

    db = commands.add_parser("db", help="manage idempay's tables in your database")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    upgrade = db_commands.add_parser(
        "upgrade",
        help="create or migrate idempay's tables (idempotent)",
        description="Apply idempay's migrations to the database. Safe to run at every start: "
        "an up-to-date schema is left as it is. idempay keeps its migration history in its own "
        "table (idempay_alembic_version), apart from your application's.",
    )
    upgrade.add_argument(
        "--url", help="SQLAlchemy URL of the database (default: $IDEMPAY_DATABASE_URL)"
    )
    upgrade.add_argument("--revision", default="head", help="target revision (default: head)")
    upgrade.set_defaults(run=_db_upgrade)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = "must be at least 1"
        raise argparse.ArgumentTypeError(msg)
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = _parser().parse_args(argv)
    code: int = args.run(args)
    return code
