"""The ``idempay`` operations commands, run for real: ``python -m idempay ...`` in a subprocess,
on SQLite and PostgreSQL, against the Stripe simulator, on data made through a real guard.

Every webhook is dropped by the simulator: an order the customer paid in the browser stays
``awaiting_payment`` until a command makes up for it. Each test asserts the exit code, what the
command printed, and the database (or the simulator) after it. Effects run by the commands
(``--app cli_app:build``, see cli_app.py) append their dedup key to a file, one line per run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from storefront import Storefront

from idempay.backends.sql import metadata
from idempay.core.audit import verify_trail
from idempay.core.models import InboxEvent, InboxStatus
from idempay.core.orders import OrderState, OrderStatus
from idempay.core.signature import sign_payload
from idempay.engine import (
    EffectContext,
    GuardConfig,
    GuardRequest,
)
from idempay.testing.simulator import DeliveryPolicy, StripeSimulator, WebhookEndpoint

HERE = Path(__file__).resolve().parent
TENANT = "cli"
SECRET = "whsec_cli"
APP = "cli_app:build"
RECEIPT = "receipt"
"""The effect cli_app.py registers: the shop's own guard here registers it under that name, so
that ``outbox run --app`` runs what the shop enqueued."""
COMMAND_TIMEOUT = 60
RECONCILE_NOW = ("reconcile", "--older-than", "0")

BACKENDS = [
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.postgres),
]


class EffectFailedError(Exception):
    """An effect of the shop that fails (until an operator fixes its cause)."""


class Shop(Storefront):
    """The storefront on the simulator. Its ``receipt`` effect fails for the orders in
    ``failing`` and is dead-lettered at its first failure (``effect_max_attempts=1``)."""

    def __init__(self, url: str, sim: StripeSimulator) -> None:
        super().__init__(
            url,
            api_key=sim.api_key,
            api_base=sim.url,
            tenant=TENANT,
            config=GuardConfig(webhook_secrets=(SECRET,), effect_max_attempts=1),
        )
        self.sim = sim
        self.failing: set[str] = set()

        @self.guard.effect(RECEIPT, on="paid")
        def receipt(effect: EffectContext) -> None:
            if effect.order_id in self.failing:
                raise EffectFailedError

    def paid_in_browser(self, order_id: str) -> str:
        """An order checked out and paid, whose webhook was dropped; its PaymentIntent."""
        intent = self.awaiting(order_id)
        self.pay_in_browser(intent)
        assert self.status(order_id) is OrderStatus.AWAITING_PAYMENT
        return intent

    def event(self, event_type: str, intent_id: str) -> dict[str, Any]:
        """The simulator's (undelivered) event of this type about this PaymentIntent (or its
        charge)."""
        (found,) = [
            e
            for e in self.sim.events()
            if e["type"] == event_type
            and intent_id in (e["data"]["object"]["id"], e["data"]["object"].get("payment_intent"))
        ]
        return found

    def deliver(self, event: dict[str, Any]) -> str:
        """Deliver ``event`` to the shop's webhook endpoint, signed; return the outcome."""
        body = json.dumps(event).encode()
        response = self.guard.handle_webhook(
            GuardRequest(
                method="POST",
                route="/stripe/webhook",
                body=body,
                headers={
                    "Content-Type": "application/json",
                    "Stripe-Signature": sign_payload(body, SECRET, timestamp=int(time.time())),
                },
            )
        )
        assert response.status == 200, response.body
        return str(response.json()["outcome"])

    def order(self, order_id: str) -> tuple[OrderStatus, int, int]:
        """The order's status, version and audit trail length (its trail verified)."""
        with self.payments.transaction() as tx:
            order = tx.get_order(TENANT, order_id)
            trail = tx.audit_trail(TENANT, order_id)
        assert order is not None
        assert verify_trail(trail).ok
        return order.state.status, order.version, len(trail)

    def charges(self, intent_id: str) -> int:
        return sum(1 for c in self.sim.charges() if c["payment_intent"] == intent_id)


class Cli:
    """``python -m idempay`` in a subprocess, configured as the shop is, from its environment;
    run from this directory, where ``--app cli_app:build`` is found."""

    def __init__(self, url: str, sim: StripeSimulator, effect_log: Path) -> None:
        self.effect_log = effect_log
        inherited = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("IDEMPAY_", "STRIPE_"))
        }
        self.env = inherited | {
            "IDEMPAY_DATABASE_URL": url,
            "STRIPE_API_KEY": sim.api_key,
            "STRIPE_API_BASE": sim.url,
            "STRIPE_WEBHOOK_SECRET": SECRET,
            "IDEMPAY_TEST_EFFECT_LOG": str(effect_log),
        }

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "idempay", *args]

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args),
            env=self.env | env,
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )

    def json(self, *args: str, code: int = 0) -> Any:
        """Run with ``--json``; check the exit code and return the parsed output."""
        done = self.run(*args, "--json")
        assert done.returncode == code, done.stdout + done.stderr
        return json.loads(done.stdout)

    def effect_runs(self) -> list[str]:
        """The dedup keys of the effects run so far, one per run."""
        if not self.effect_log.exists():
            return []
        return self.effect_log.read_text().splitlines()


@pytest.fixture
def sim() -> Iterator[StripeSimulator]:
    dropped = DeliveryPolicy(drop_probability=1.0)
    endpoint = WebhookEndpoint("http://127.0.0.1:9/stripe/webhook", SECRET)
    with StripeSimulator(webhook_endpoints=[endpoint], delivery=dropped, seed=5) as simulator:
        yield simulator


@pytest.fixture
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The shop's database: SQLite unless a test is parametrized with ``BACKENDS``."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'shop.db'}"
    return str(request.getfixturevalue(f"own_{backend}_url"))


@pytest.fixture
def shop(url: str, sim: StripeSimulator) -> Iterator[Shop]:
    shop = Shop(url, sim)
    yield shop
    shop.close()


@pytest.fixture
def cli(url: str, sim: StripeSimulator, tmp_path: Path) -> Cli:
    return Cli(url, sim, tmp_path / "effects.log")


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound and never listened on: every connection to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def _row(stdout: str, order_id: str) -> list[str]:
    """The cells of the table line naming ``order_id``."""
    (line,) = [line for line in stdout.splitlines() if order_id in line.split()]
    return line.split()


# --- reconcile ------------------------------------------------------------------------------


def test_reconcile_makes_up_for_a_missed_webhook_once_and_inspect_shows_it(
    shop: Shop, cli: Cli
) -> None:
    intent = shop.paid_in_browser("w13")

    first = cli.run(*RECONCILE_NOW, "--no-effects")
    assert first.returncode == 0, first.stderr
    assert _row(first.stdout, "w13") == [TENANT, "w13", "awaiting_payment", "paid", "changed"]
    assert (
        "orders checked  1 (1 changed, 0 unchanged, 0 no_payment, 0 abandoned, 0 error)"
        in first.stdout
    )
    assert "orders now      1 paid" in first.stdout
    paid = shop.order("w13")
    assert paid[0] is OrderStatus.PAID

    again = cli.json(*RECONCILE_NOW, "--no-effects")
    assert again["orders_checked"] == 0  # paid: settled, not checked again
    assert again["results"] == {
        "changed": 0,
        "unchanged": 0,
        "no_payment": 0,
        "abandoned": 0,
        "error": 0,
    }
    assert "applied" not in again["backfill"]  # the dropped event, fetched again, is old news
    assert (again["orders"], again["errors"]) == ({"paid": 1}, 0)
    assert shop.order("w13") == paid  # no new version, no new audit step
    assert shop.charges(intent) == 1

    shown = cli.run("inspect", "w13", "--tenant", TENANT)
    assert shown.returncode == 0, shown.stderr
    (step,) = [line for line in shown.stdout.splitlines() if "awaiting_payment -> paid" in line]
    assert step.split()[2:4] == ["succeeded", "reconciler"]
    assert "hash chain intact" in shown.stdout


@pytest.mark.parametrize("url", BACKENDS, indirect=True)
def test_reconcile_with_the_app_enqueues_the_effect_that_outbox_run_runs_once(
    shop: Shop, cli: Cli
) -> None:
    shop.paid_in_browser("app")

    report = cli.json(*RECONCILE_NOW, "--app", APP)
    assert report["orders_checked"] == 1
    assert report["checks"] == [
        {
            "tenant": TENANT,
            "order_id": "app",
            "before": "awaiting_payment",
            "after": "paid",
            "result": "changed",
            "error": None,
        }
    ]
    assert report["results"]["changed"] == 1
    assert (report["orders"], report["errors"]) == ({"paid": 1}, 0)
    assert {k: report["outbox"][k] for k in ("pending", "due", "dead")} == {
        "pending": 1,
        "due": 1,
        "dead": 0,
    }
    assert shop.status("app") is OrderStatus.PAID
    assert cli.effect_runs() == []  # enqueued, not run: that is the dispatcher's job

    run = cli.run("outbox", "run", "--app", APP)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "effects done 1, retried later 0, dead-lettered 0, taken over 0\n"
    (key,) = cli.effect_runs()
    assert key.startswith("idempay-")

    assert cli.json("outbox", "run", "--app", APP) == {
        "done": 0,
        "retried": 0,
        "dead": 0,
        "lost": 0,
    }
    assert cli.effect_runs() == [key]
    assert cli.json("outbox", "status") == {
        "pending": 0,
        "due": 0,
        "dead": 0,
        "oldest_due_at": None,
    }


@pytest.mark.parametrize(
    ("args", "says"),
    [
        pytest.param((*RECONCILE_NOW,), "--app", id="reconcile-without-app"),
        pytest.param(("replay", "evt_1"), "--app", id="replay-without-app"),
        pytest.param(("outbox", "run"), "--app", id="outbox-run-without-app"),
        pytest.param(("reconcile", "--older-than", "-1", "--no-effects"), "--older-than", id="-1"),
        pytest.param(
            ("reconcile", "--older-than", "abc", "--no-effects"), "--older-than", id="abc"
        ),
        pytest.param(("purge", "--events", "1d"), "3 days", id="purge-events-1d"),
    ],
)
def test_bad_usage_exits_2_and_says_why(args: tuple[str, ...], says: str, cli: Cli) -> None:
    # Without a database URL either: the usage is refused before any configuration is read.
    done = cli.run(*args, IDEMPAY_DATABASE_URL="")
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in done.stderr
    assert done.stdout == ""


def test_reconcile_with_the_database_unreachable_exits_3(cli: Cli, closed_port: int) -> None:
    down = f"postgresql+psycopg://postgres@127.0.0.1:{closed_port}/idempay"
    done = cli.run(*RECONCILE_NOW, "--no-effects", IDEMPAY_DATABASE_URL=down)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "unavailable, try again later" in done.stderr
    assert done.stdout == ""


def test_reconcile_with_stripe_unreachable_reports_errors_and_exits_1(
    shop: Shop, cli: Cli, closed_port: int
) -> None:
    shop.paid_in_browser("down")
    before = shop.order("down")

    done = cli.run(
        *RECONCILE_NOW, "--no-effects", STRIPE_API_BASE=f"http://127.0.0.1:{closed_port}"
    )
    assert done.returncode == 1, done.stdout + done.stderr
    row = _row(done.stdout, "down")
    assert row[:4] == [TENANT, "down", "awaiting_payment", "awaiting_payment"]
    assert "1 error)" in done.stdout
    assert shop.order("down") == before


def test_db_upgrade_on_a_fresh_file_then_reconcile(cli: Cli, tmp_path: Path) -> None:
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    upgraded = cli.run("db", "upgrade", "--url", fresh)
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout == "idempay db upgrade: schema at head\n"

    engine = sa.create_engine(fresh)
    try:
        tables = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"idempay_orders", "idempay_inbox", "idempay_alembic_version"} <= tables

    done = cli.run(*RECONCILE_NOW, "--no-effects", IDEMPAY_DATABASE_URL=fresh)
    assert done.returncode == 0, done.stderr
    assert (
        "orders checked  0 (0 changed, 0 unchanged, 0 no_payment, 0 abandoned, 0 error)"
        in done.stdout
    )
    assert "orders now      none" in done.stdout


def test_reconcile_loop_stops_cleanly_on_sigterm(shop: Shop, cli: Cli, tmp_path: Path) -> None:
    shop.paid_in_browser("loop")
    with (tmp_path / "loop.out").open("w+") as out:
        worker = subprocess.Popen(
            cli.command(*RECONCILE_NOW, "--no-effects", "--loop", "--interval", "1s"),
            env=cli.env,
            cwd=HERE,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + COMMAND_TIMEOUT
            while shop.status("loop") is not OrderStatus.PAID:
                assert worker.poll() is None, "the worker exited on its own"
                assert time.monotonic() < deadline, "the worker never paid the order"
                time.sleep(0.05)  # polling another process's progress, with a deadline
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=COMMAND_TIMEOUT) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        out.seek(0)
        assert "Traceback" not in out.read()


# --- replay ---------------------------------------------------------------------------------


def test_replay_applies_a_kept_orphan_then_knows_it_as_a_duplicate(shop: Shop, cli: Cli) -> None:
    # A PaymentIntent whose events arrive before the shop records its order.
    metadata = {"order_id": "late", "idempay_tenant": TENANT}
    intent = shop.stripe.v1.payment_intents.create(
        params={"amount": 2500, "currency": "eur", "metadata": metadata}
    ).id
    shop.pay_in_browser(intent)
    event = shop.event("payment_intent.succeeded", intent)
    assert shop.deliver(event) == "orphaned"
    with shop.payments.transaction() as tx:
        tx.insert_order(
            TENANT,
            "late",
            OrderState(OrderStatus.AWAITING_PAYMENT, 2500, "eur", payment_intent_id=intent),
        )

    applied = cli.run("replay", event["id"], "--no-effects")
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout == f"{event['id']}: applied; order late is paid\n"
    paid = shop.order("late")
    assert paid[0] is OrderStatus.PAID

    again = cli.run("replay", event["id"], "--no-effects")
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"{event['id']}: duplicate; order late is paid\n"
    assert shop.order("late") == paid


def test_replay_from_stripe_applies_a_dropped_event(shop: Shop, cli: Cli) -> None:
    intent = shop.paid_in_browser("dropped")
    event_id = shop.event("payment_intent.succeeded", intent)["id"]

    missing = cli.run("replay", event_id, "--app", APP)
    assert missing.returncode == 4, missing.stdout + missing.stderr
    assert "--from-stripe" in missing.stderr
    assert shop.status("dropped") is OrderStatus.AWAITING_PAYMENT
    nowhere = cli.run("replay", "evt_never_sent", "--from-stripe", "--app", APP)
    assert nowhere.returncode == 4, nowhere.stdout + nowhere.stderr
    assert "Stripe refused to return it" in nowhere.stderr

    fetched = cli.json("replay", event_id, "--from-stripe", "--app", APP)
    assert fetched == {
        "event_id": event_id,
        "account": "",
        "source": "stripe",
        "outcome": "applied",
        "order": {"tenant": TENANT, "order_id": "dropped", "status": "paid"},
    }
    assert shop.status("dropped") is OrderStatus.PAID
    with shop.payments.transaction() as tx:
        kept = tx.get_event("", event_id)
    assert kept is not None
    assert kept.status is InboxStatus.PROCESSED
    backlog = shop.payments.outbox_backlog()  # type: ignore[attr-defined]
    assert (backlog.pending, backlog.dead) == (1, 0)  # the app's receipt, enqueued with it


# --- outbox ---------------------------------------------------------------------------------


def test_outbox_status_flags_a_dead_effect_until_retry_dead_requeues_it(
    shop: Shop, cli: Cli
) -> None:
    shop.paid_in_browser("dead")
    shop.failing.add("dead")
    shop.guard.refresh_order("dead", tenant=TENANT)
    assert shop.guard.dispatch_effects().dead == 1

    status = cli.run("outbox", "status")
    assert status.returncode == 1, status.stderr
    assert status.stdout == "outbox  0 pending (0 due), 1 dead\n"
    assert cli.json("outbox", "status", code=1) == {
        "pending": 0,
        "due": 0,
        "dead": 1,
        "oldest_due_at": None,
    }

    retried = cli.run("outbox", "retry-dead")
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.startswith("requeued 1 dead effect(s)")
    requeued = cli.json("outbox", "status")
    assert {k: requeued[k] for k in ("pending", "due", "dead")} == {
        "pending": 1,
        "due": 1,
        "dead": 0,
    }
    assert datetime.fromisoformat(requeued["oldest_due_at"]) <= datetime.now(UTC)

    # The cause fixed (the app's receipt works), the dispatcher delivers it.
    assert cli.json("outbox", "run", "--app", APP) == {
        "done": 1,
        "retried": 0,
        "dead": 0,
        "lost": 0,
    }
    assert len(cli.effect_runs()) == 1
    assert cli.json("outbox", "retry-dead") == {"requeued": 0}


# --- purge ----------------------------------------------------------------------------------


def _micros(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _rows_of_every_kind(shop: Shop) -> None:
    """Four paid orders, each paid by its webhook delivered twice (one journal duplicate
    each): "old" and "fresh" with their receipt done, "dead" with it dead-lettered, "pending"
    with it not run yet; an orphan event; and two events a crashed or failing handler left
    behind (received, failed)."""
    shop.failing.add("dead")
    for order_id in ("old", "fresh", "dead", "pending"):
        if order_id == "pending":
            assert shop.guard.dispatch_effects().done == 2
        event = shop.event("payment_intent.succeeded", shop.paid_in_browser(order_id))
        assert shop.deliver(event) == "applied"
        assert shop.deliver(event) == "duplicate"
    shop.guard.flush_journal()
    intent = shop.stripe.v1.payment_intents.create(
        params={"amount": 700, "currency": "eur", "metadata": {"order_id": "ghost"}}
    ).id
    shop.pay_in_browser(intent)
    assert shop.deliver(shop.event("payment_intent.succeeded", intent)) == "orphaned"
    with shop.payments.transaction() as tx:
        for status, event_type in (
            (InboxStatus.RECEIVED, "payment_intent.created"),
            (InboxStatus.FAILED, "charge.succeeded"),
        ):
            raw = shop.event(event_type, intent)
            tx.insert_event(
                InboxEvent(
                    account="",
                    event_id=raw["id"],
                    type=event_type,
                    created=raw["created"],
                    payload=json.dumps(raw).encode(),
                    received_at=datetime.now(UTC),
                )
            )
            if status is InboxStatus.FAILED:
                tx.set_event_status("", raw["id"], status, error="EffectFailedError")


@pytest.mark.parametrize("url", BACKENDS, indirect=True)
def test_purge_deletes_only_what_outlived_its_window(shop: Shop, cli: Cli) -> None:
    _rows_of_every_kind(shop)
    t = metadata.tables
    inbox, outbox, journal = t["idempay_inbox"], t["idempay_outbox"], t["idempay_journal"]
    records, orders, audit = (
        t["idempay_idempotency_records"],
        t["idempay_orders"],
        t["idempay_audit"],
    )

    def not_fresh(table: sa.Table) -> sa.ColumnElement[bool]:
        return sa.or_(table.c.order_id.is_(None), table.c.order_id != "fresh")

    engine = sa.create_engine(shop.url)

    def rows(table: sa.Table, *columns: str) -> list[tuple[Any, ...]]:
        with engine.connect() as conn:
            picked = [table.c[c] for c in columns]
            return sorted((tuple(r) for r in conn.execute(sa.select(*picked))), key=repr)

    try:
        # Everything but the "fresh" order's rows is made 100 days old (past every default
        # window: 30 days for events and effects, 90 for the journal), orders and audit too.
        old = _micros(datetime.now(UTC) - timedelta(days=100))
        with engine.begin() as conn:
            conn.execute(sa.update(inbox).where(not_fresh(inbox)).values(received_at=old))
            conn.execute(sa.update(outbox).where(not_fresh(outbox)).values(created_at=old))
            conn.execute(sa.update(journal).where(not_fresh(journal)).values(at=old))
            conn.execute(
                sa.update(records).where(records.c.key != "k-fresh").values(expires_at=old)
            )
            conn.execute(sa.update(orders).values(created_at=old, updated_at=old))
            conn.execute(sa.update(audit).values(at=old))
        kept_orders, kept_audit = rows(orders, "order_id", "status"), rows(audit, "order_id", "seq")
        assert len(kept_orders) == 4
        assert rows(journal, "order_id") == [("dead",), ("fresh",), ("old",), ("pending",)]

        report = cli.json("purge")
        assert report == {"records": 3, "events": 4, "effects": 1, "journal": 3}

        assert rows(orders, "order_id", "status") == kept_orders
        assert rows(audit, "order_id", "seq") == kept_audit
        assert rows(outbox, "order_id", "status") == [
            ("dead", "dead"),
            ("fresh", "done"),
            ("pending", "pending"),
        ]
        assert rows(inbox, "status", "order_id") == [
            ("failed", None),
            ("processed", "fresh"),
            ("received", None),
        ]
        assert rows(records, "key") == [("k-fresh",)]
        assert rows(journal, "order_id") == [("fresh",)]
    finally:
        engine.dispose()

    again = cli.run("purge")
    assert again.returncode == 0, again.stderr
    assert [line.split() for line in again.stdout.splitlines()] == [
        ["deleted", "rows"],
        ["records", "0"],
        ["events", "0"],
        ["effects", "0"],
        ["journal", "0"],
    ]


# --- help -----------------------------------------------------------------------------------

COMMANDS = [
    ("demo",),
    ("reconcile",),
    ("replay",),
    ("inspect",),
    ("resolve",),
    ("outbox", "run"),
    ("outbox", "status"),
    ("outbox", "retry-dead"),
    ("purge",),
    ("db", "upgrade"),
]


def test_help_lists_every_command_and_each_states_its_exit_codes(cli: Cli) -> None:
    helps = {
        command: subprocess.Popen(
            cli.command(*command, "--help"),
            env=cli.env,
            cwd=HERE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in [(), *COMMANDS]
    }
    texts: dict[tuple[str, ...], str] = {}
    for command, process in helps.items():
        out, err = process.communicate(timeout=COMMAND_TIMEOUT)
        assert process.returncode == 0, (command, err)
        texts[command] = " ".join(out.split())  # unwrapped

    listed = texts[()].split("positional arguments:")[1].split("options:")[0]
    assert {command[0] for command in COMMANDS} <= set(listed.split())
    for command in COMMANDS:
        assert f"usage: idempay {' '.join(command)}" in texts[command]
        assert "Exit codes: 0 " in texts[command], command


def _under_review(shop: Shop, order_id: str) -> str:
    """An order canceled locally, then paid by its customer anyway: money after a cancel."""
    intent = shop.awaiting(order_id)
    shop.guard.cancel_order(order_id, tenant=TENANT, at_stripe=False)
    shop.pay_in_browser(intent)
    shop.guard.refresh_order(order_id, tenant=TENANT)
    assert shop.status(order_id) is OrderStatus.NEEDS_REVIEW
    return intent


def test_resolve_refunded_waits_for_the_refund_then_closes_the_review(shop: Shop, cli: Cli) -> None:
    intent = _under_review(shop, "review-refund")
    shown = cli.run("inspect", "review-refund", "--tenant", TENANT)
    assert "review     succeeded_after_cancel" in shown.stdout, shown.stdout
    early = cli.run("resolve", "review-refund", "--tenant", TENANT, "--refunded", "--app", APP)
    assert early.returncode == 1, early.stdout + early.stderr
    assert "refused" in early.stderr
    assert shop.status("review-refund") is OrderStatus.NEEDS_REVIEW

    # The operator refunds at Stripe; the refund's webhook is dropped, the backfill brings it.
    shop.stripe.v1.refunds.create(params={"payment_intent": intent})
    assert cli.run(*RECONCILE_NOW, "--no-effects").returncode == 0
    assert shop.order("review-refund")[0] is OrderStatus.NEEDS_REVIEW

    done = cli.json("resolve", "review-refund", "--tenant", TENANT, "--refunded", "--app", APP)
    assert done == {
        "tenant": TENANT,
        "order_id": "review-refund",
        "status": "refunded",
        "amount_refunded": 2500,
    }
    again = cli.run("resolve", "review-refund", "--tenant", TENANT, "--refunded", "--app", APP)
    assert again.returncode == 0, again.stderr  # a repeat changes nothing
    with shop.payments.transaction() as tx:
        trail = tx.audit_trail(TENANT, "review-refund")
    steps = [(e.step.value, e.source.value) for e in trail]
    assert ("rejected", "operator") in steps  # the early attempt, refused and audited
    assert steps[-1] == ("refunded", "operator")
    effects = shop.payments.effects_for(TENANT, "review-refund")  # type: ignore[attr-defined]
    assert [(e.effect, e.discriminator) for e in effects] == [("refund_notice", "refund:2500")]
    assert cli.run("outbox", "run", "--app", APP).returncode == 0
    assert len(cli.effect_runs()) == 1


def test_resolve_keep_honours_the_order_with_its_effect(shop: Shop, cli: Cli) -> None:
    _under_review(shop, "review-keep")
    missing_app = cli.run("resolve", "review-keep", "--tenant", TENANT, "--keep")
    assert missing_app.returncode == 2
    done = cli.run("resolve", "review-keep", "--tenant", TENANT, "--keep", "--app", APP)
    assert done.returncode == 0, done.stderr
    assert "is now paid" in done.stdout
    assert shop.status("review-keep") is OrderStatus.PAID
    assert cli.run("outbox", "run", "--app", APP).returncode == 0
    assert len(cli.effect_runs()) == 1
    assert cli.run("resolve", "nope", "--keep", "--app", APP).returncode == 4
