"""The ``idempay`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from idempay import __version__

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
