"""The ``idempay`` command line."""

from __future__ import annotations

import argparse
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
