"""The ``idempay`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from idempay import __version__

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from idempay._demo import run_demo

    out = sys.stdout
    out.write(
        f"idempay demo: {args.orders} orders, 1-3 clicks each, every webhook delivered 1-4 times,"
        f" shuffled, {args.workers} workers\n"
    )
    report = run_demo(orders=args.orders, workers=args.workers, seed=args.seed, out=out)
    rows = [
        ("orders", report.orders),
        ("checkout clicks", report.clicks),
        ("duplicate clicks absorbed", report.clicks_absorbed),
        ("webhook deliveries", report.deliveries),
        ("duplicate deliveries absorbed", report.duplicates_absorbed),
        ("stale events ignored", report.stale_ignored),
        ("orders paid", report.paid),
        ("effects sent", report.effects_sent),
        ("audit steps", report.audit_steps),
        ("invariant violations", len(report.violations)),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        out.write(f"  {name:<{width}}  {value:>8}\n")
    for violation in report.violations:
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idempay",
        description="Payment-safety middleware: idempotent checkout, exactly-once webhook effects.",
    )
    parser.add_argument("--version", action="version", version=f"idempay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run a storm of double clicks and duplicated, reordered webhooks, in memory",
        description="Run a storm of double clicks and duplicated, reordered webhooks against "
        "the in-memory backends and check every invariant. Exits 1 if one is violated.",
    )
    demo.add_argument("--orders", type=_positive, default=200, help="orders (default 200)")
    demo.add_argument("--workers", type=_positive, default=4, help="threads (default 4)")
    demo.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    demo.set_defaults(run=_demo)

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
