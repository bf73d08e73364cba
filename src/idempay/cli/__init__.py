"""The ``idempay`` command line: the demo, and the operations of a running shop.

Every command reads its configuration from flags or from the same environment variables as
the examples (``IDEMPAY_DATABASE_URL``, ``IDEMPAY_APP``, ``STRIPE_API_KEY``,
``STRIPE_API_BASE``, ``STRIPE_WEBHOOK_SECRET``). See docs/operations.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from idempay import __version__
from idempay.cli._basics import EXIT_BROKEN_TRAIL, db_upgrade, demo, inspect
from idempay.cli._context import (
    EXIT_CODES_HELP,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    UsageError,
    add_app_options,
    add_database_option,
    duration,
)
from idempay.cli._ops import (
    outbox_retry,
    outbox_run,
    outbox_status,
    purge_command,
    reconcile,
    replay,
    resolve,
)
from idempay.errors import ConfigurationError, PaymentOutcomeUnknownError, StoreError

__all__ = [
    "EXIT_BROKEN_TRAIL",
    "EXIT_NOT_FOUND",
    "EXIT_PROBLEMS",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "main",
]


class _Paragraphs(argparse.HelpFormatter):
    """Wraps each paragraph of a description to the terminal on its own, so that the exit
    codes stay apart from the text above them."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text
        return "\n\n".join(fill(paragraph, width, indent) for paragraph in text.split("\n\n"))


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    description: str,
    *,
    exit_codes: str = EXIT_CODES_HELP,
) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=summary,
        description=f"{description}\n\n{exit_codes}",
        formatter_class=_Paragraphs,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idempay",
        description="Payment safety for checkout and Stripe webhook handlers: one charge per "
        "order, each webhook applied once, nothing lost. These commands run the demo and "
        "operate a running application's idempay tables.",
        epilog=f"Run 'idempay COMMAND --help' for a command's options. {EXIT_CODES_HELP}",
    )
    parser.add_argument("--version", action="version", version=f"idempay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _demo_parser(commands)
    _reconcile_parser(commands)
    _replay_parser(commands)
    _inspect_parser(commands)
    _resolve_parser(commands)
    _outbox_parser(commands)
    _purge_parser(commands)
    _db_parser(commands)
    return parser


def _demo_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo_cmd = _command(
        commands,
        "demo",
        "run the example shop under a storm of clicks and webhooks, and check it",
        "Start the Stripe simulator and the FastAPI example shop (several workers, SQLite and "
        "the in-process lock unless told otherwise), drive a storm through HTTP (double and "
        "triple clicks, every webhook duplicated, delayed and reordered, some never delivered, "
        "a worker killed midway), run 'idempay reconcile' to make up for the lost webhooks, "
        "then check every invariant against the running system. The last line is a key=value "
        "summary starting with violations=.",
        exit_codes=f"Exit codes: {EXIT_OK} every invariant held; {EXIT_PROBLEMS} one was "
        f"violated; {EXIT_USAGE} bad usage.",
    )
    demo_cmd.add_argument("--orders", type=_positive, default=300, help="orders (default 300)")
    demo_cmd.add_argument(
        "--workers", type=_positive, default=3, help="server worker processes (default 3)"
    )
    demo_cmd.add_argument(
        "--database-url",
        help="SQLAlchemy URL of the shop's database (default: a new SQLite file)",
    )
    demo_cmd.add_argument(
        "--lock-url",
        default="memory://",
        help="lock provider: memory:// (default), redis://HOST:PORT/DB, or a PostgreSQL URL",
    )
    demo_cmd.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    demo_cmd.add_argument(
        "--lose",
        type=_percent,
        default=5,
        metavar="PERCENT",
        help="webhooks that never arrive, made up for by the reconciler (default 5)",
    )
    demo_cmd.add_argument(
        "--no-kill", action="store_true", help="do not kill a worker in the middle of the storm"
    )
    demo_cmd.set_defaults(run=demo)


def _reconcile_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = _command(
        commands,
        "reconcile",
        "check unsettled orders against Stripe and apply what webhooks missed",
        "Find the orders still open (created, awaiting payment, action required, payment "
        "failed, processing, authorized) that have not changed for --older-than, and the kept "
        "events whose order was unknown; ask Stripe for their PaymentIntent (by id, or by "
        "metadata.order_id when the id was never recorded) and apply it through the same state "
        "machine as the webhooks, audited with source 'reconciler'. Then fetch the events "
        "Stripe has not delivered yet (delivery_success=false) and apply them. Nothing is ever "
        "created, confirmed or canceled at Stripe: a bank debit still processing stays "
        "processing. Several reconcilers may run at once; each order is checked by one of them,"
        " and again only after a wait that grows with its age.",
    )
    cmd.add_argument(
        "--older-than",
        type=duration,
        default=duration("15m"),
        metavar="DURATION",
        help="check orders unchanged for this long: 0, 90s, 15m (default), 2h, 3d",
    )
    cmd.add_argument(
        "--max-orders", type=_natural, default=500, metavar="N", help="orders per run (500)"
    )
    cmd.add_argument(
        "--max-events", type=_natural, default=500, metavar="N", help="kept events per run (500)"
    )
    cmd.add_argument(
        "--no-backfill", action="store_true", help="do not fetch undelivered events from Stripe"
    )
    cmd.add_argument(
        "--backfill-window",
        type=duration,
        default=duration("7d"),
        metavar="DURATION",
        help="how far back to fetch undelivered events (default 7d; Stripe keeps 30d)",
    )
    cmd.add_argument(
        "--loop", action="store_true", help="run as a worker: again every --interval until stopped"
    )
    cmd.add_argument(
        "--interval",
        type=duration,
        default=duration("60s"),
        metavar="DURATION",
        help="the wait between two runs with --loop (default 60s)",
    )
    cmd.add_argument(
        "--verbose", action="store_true", help="list unchanged orders too, not only changes"
    )
    _common(cmd, app=True)
    cmd.set_defaults(run=reconcile)


def _replay_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = _command(
        commands,
        "replay",
        "apply a stored (or, with --from-stripe, a fetched) webhook event again",
        "Run one event through the webhook flow again: the copy kept in idempay's inbox, or "
        "with --from-stripe one fetched from Stripe's API when it never arrived. Safe on any "
        "event: one already applied is recognised as a duplicate and changes nothing; an "
        "orphan is applied if its order exists now.",
    )
    cmd.add_argument("event_id", metavar="EVENT_ID")
    cmd.add_argument(
        "--account", default="", help="the Connect account of the event (default: the platform)"
    )
    cmd.add_argument(
        "--from-stripe",
        action="store_true",
        help="fetch the event from Stripe if it is not in the inbox",
    )
    _common(cmd, app=True)
    cmd.set_defaults(run=replay)


def _inspect_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = _command(
        commands,
        "inspect",
        "show an order, its audit trail (hash chain verified) and its effects",
        "Show one order as it stands: its state, every step of its audit trail with the hash "
        "chain verified, the decisions of its journal, and its effects. Exit code 1 means the "
        "trail's hash chain is broken (a row edited, removed or inserted outside idempay).",
    )
    cmd.add_argument("order_id", metavar="ORDER_ID")
    cmd.add_argument("--tenant", default="", help="the order's tenant (default: none)")
    _common(cmd, app=False)
    cmd.set_defaults(run=inspect)


def _resolve_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = _command(
        commands,
        "resolve",
        "close the review of a needs_review order with your decision",
        "An order goes to needs_review when money does not fit it (paid after a cancel, another "
        "amount or currency, a second PaymentIntent) and stays there until someone decides. "
        "--keep: the payment is kept and the order honoured (paid, with its fulfilment "
        "effects). --refunded: the customer was refunded in full at Stripe (the "
        "refund must show in 'idempay inspect' first) and the order becomes refunded, with its "
        "refund effect. Give --app, so that these effects are enqueued. The decision is "
        "audited with source 'operator'; exit code 1 when it is refused.",
    )
    cmd.add_argument("order_id", metavar="ORDER_ID")
    cmd.add_argument("--tenant", default="", help="the order's tenant (default: none)")
    decision = cmd.add_mutually_exclusive_group(required=True)
    decision.add_argument("--keep", action="store_true", help="keep the payment, fulfil the order")
    decision.add_argument(
        "--refunded", action="store_true", help="the payment was refunded in full at Stripe"
    )
    _common(cmd, app=True)
    cmd.set_defaults(run=resolve)


def _outbox_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    outbox = commands.add_parser(
        "outbox",
        help="run, watch or retry the effects (receipts, fulfilment) waiting in the outbox",
        description="The outbox holds the effects that committed transitions justify. "
        "'run' executes the due ones with your functions, 'status' counts them, 'retry-dead' "
        "gives dead-lettered ones a new round of attempts.",
    )
    sub = outbox.add_subparsers(dest="outbox_command", required=True, metavar="COMMAND")
    run = _command(
        sub,
        "run",
        "run the due effects with your application's functions",
        "Lease the due effects and run them with the functions your application registered "
        "(--app is required). Each effect runs at least once and is told its stable dedup "
        "key; failures are retried with backoff and dead-lettered after the guard's "
        "effect_max_attempts. Safe with any number of dispatchers. Exit code 1 if an effect "
        "was dead-lettered.",
    )
    run.add_argument(
        "--limit", type=_positive, default=100, metavar="N", help="effects per round (100)"
    )
    run.add_argument("--loop", action="store_true", help="keep running until stopped")
    run.add_argument(
        "--interval",
        type=duration,
        default=duration("1s"),
        metavar="DURATION",
        help="the wait when nothing is due, with --loop (default 1s)",
    )
    _common(run, app=True, effects_optional=False, database=False)
    run.set_defaults(run=outbox_run)
    status = _command(
        sub,
        "status",
        "count pending, due and dead effects",
        "Count the effects pending (and due now) and dead-lettered, and say how long the "
        "oldest due one has waited. Exit code 1 when some are dead: fit for a cron check.",
    )
    _common(status, app=False)
    status.set_defaults(run=outbox_status)
    retry = _command(
        sub,
        "retry-dead",
        "give dead-lettered effects a new round of attempts",
        "Put dead-lettered effects back in the queue (due now, attempts from zero, the same "
        "dedup key), once their cause is fixed.",
    )
    retry.add_argument(
        "--limit", type=_positive, default=1000, metavar="N", help="effects at most (1000)"
    )
    _common(retry, app=False)
    retry.set_defaults(run=outbox_retry)


def _purge_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = _command(
        commands,
        "purge",
        "delete expired idempotency records and old inbox, outbox and journal rows",
        "Delete, in short batches: idempotency records past their expiry (GuardConfig.retain, "
        "at least 24 h); inbox events processed, ignored or orphaned longer ago than --events "
        "(at least 3d: Stripe retries for three days); done effects older than --effects; "
        "journal entries older than --journal. Orders and audit trails are never deleted, nor "
        "pending or dead effects. Safe to run daily alongside the application.",
    )
    for flag, what, default, floor in (
        ("--events", "handled inbox events", "30d", "3d"),
        ("--effects", "done effects", "30d", "3d"),
        ("--journal", "journal entries", "90d", "1d"),
    ):
        cmd.add_argument(
            flag,
            type=duration,
            default=duration(default),
            metavar="DURATION",
            help=f"keep {what} this long (default {default}, at least {floor})",
        )
    _common(cmd, app=False)
    cmd.set_defaults(run=purge_command)


def _db_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = commands.add_parser("db", help="create or migrate idempay's tables in your database")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    upgrade = _command(
        db_commands,
        "upgrade",
        "create or migrate idempay's tables (idempotent)",
        "Apply idempay's migrations to the database. Safe to run at every start: an up-to-date "
        "schema is left as it is. idempay keeps its migration history in its own table "
        "(idempay_alembic_version), apart from your application's.",
        exit_codes=f"Exit codes: {EXIT_OK} done; {EXIT_USAGE} bad usage or configuration; "
        f"{EXIT_UNAVAILABLE} the database is unavailable (try again).",
    )
    upgrade.add_argument(
        "--url", help="SQLAlchemy URL of the database (default: $IDEMPAY_DATABASE_URL)"
    )
    upgrade.add_argument("--revision", default="head", help="target revision (default: head)")
    upgrade.set_defaults(run=db_upgrade)


def _common(
    cmd: argparse.ArgumentParser,
    *,
    app: bool,
    effects_optional: bool = True,
    database: bool = True,
) -> None:
    if database:
        add_database_option(cmd)
    if app:
        add_app_options(cmd, effects_optional=effects_optional)
    cmd.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = "must be at least 1"
        raise argparse.ArgumentTypeError(msg)
    return value


def _percent(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 100:
        msg = "a percentage from 0 to 100"
        raise argparse.ArgumentTypeError(msg)
    return value


def _natural(text: str) -> int:
    value = int(text)
    if value < 0:
        msg = "cannot be negative"
        raise argparse.ArgumentTypeError(msg)
    return value


def _configure_logging(args: argparse.Namespace) -> None:
    """Log to stderr, as a command should: warnings (a healed order, an order to review), and
    with ``--loop`` each run's summary too; ``IDEMPAY_LOG_LEVEL`` overrides. A program that
    configured logging itself (calling :func:`main` in-process) keeps its own."""
    if logging.getLogger().handlers:
        return
    default = "INFO" if getattr(args, "loop", False) else "WARNING"
    level = os.environ.get("IDEMPAY_LOG_LEVEL", default).upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else default,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = _parser().parse_args(argv)
    _configure_logging(args)
    sub = getattr(args, "outbox_command", None) or getattr(args, "db_command", None)
    name = f"idempay {args.command} {sub}" if sub else f"idempay {args.command}"
    try:
        code: int = args.run(args)
    except (UsageError, ConfigurationError) as error:
        sys.stderr.write(f"{name}: {error}\n")
        return EXIT_USAGE
    except (StoreError, PaymentOutcomeUnknownError) as error:
        sys.stderr.write(f"{name}: unavailable, try again later ({type(error).__name__})\n")
        return EXIT_UNAVAILABLE
    return code
