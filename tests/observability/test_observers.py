"""The observer registry, the notifications and operation(): without any metrics library."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from tests.observability.recording import Recorder

from idempay.core.audit import AuditDraft, AuditSource, AuditStep
from idempay.core.models import OutboxBacklog
from idempay.core.orders import OrderStatus
from idempay.engine._auditlog import AUDIT_LOGGER, log_decision, log_draft
from idempay.errors import ConfigurationError
from idempay.observability import (
    Observer,
    add_observer,
    notify_decision,
    notify_operation,
    notify_orders,
    notify_outbox,
    notify_reconciled,
    operation,
    remove_observer,
)

Observe = Callable[[Observer], None]


class Failing(Recorder):
    """Records, then raises: an exporter that is down."""

    def decision(self, step: AuditStep, source: AuditSource) -> None:
        super().decision(step, source)
        raise RuntimeError("exporter down")

    def operation(self, name: str, outcome: str, seconds: float) -> None:
        super().operation(name, outcome, seconds)
        raise RuntimeError("exporter down")


def test_an_observer_added_twice_is_notified_once(observe: Observe) -> None:
    recorder = Recorder()
    observe(recorder)
    observe(recorder)
    notify_decision(AuditStep.DUPLICATE, AuditSource.WEBHOOK)
    assert recorder.of("decision") == [(AuditStep.DUPLICATE, AuditSource.WEBHOOK)]


def test_a_removed_observer_hears_nothing_more(observe: Observe) -> None:
    recorder = Recorder()
    observe(recorder)
    notify_reconciled("changed", 1)
    remove_observer(recorder)
    remove_observer(recorder)  # not registered any more: nothing happens
    notify_reconciled("changed", 1)
    assert recorder.of("reconciled") == [("changed", 1)]


def test_an_object_without_the_hooks_is_refused() -> None:
    class Partial:
        def decision(self, step: AuditStep, source: AuditSource) -> None:
            pass

    with pytest.raises(ConfigurationError, match="needs the methods"):
        add_observer(Partial())  # type: ignore[arg-type]


def test_every_notification_reaches_every_observer(observe: Observe) -> None:
    first, second = Recorder(), Recorder()
    observe(first)
    observe(second)
    backlog = OutboxBacklog(
        pending=3, due=1, dead=0, oldest_due_at=datetime(2026, 1, 1, tzinfo=UTC)
    )
    notify_decision(AuditStep.REJECTED, AuditSource.WEBHOOK)
    notify_operation("checkout", "201", 0.25)
    notify_outbox(backlog)
    notify_orders({OrderStatus.PAID: 2, OrderStatus.NEEDS_REVIEW: 1})
    notify_reconciled("unchanged", 7)
    expected = [
        ("decision", AuditStep.REJECTED, AuditSource.WEBHOOK),
        ("operation", "checkout", "201", 0.25),
        ("outbox", backlog),
        ("orders", {OrderStatus.PAID: 2, OrderStatus.NEEDS_REVIEW: 1}),
        ("reconciled", "unchanged", 7),
    ]
    assert first.calls == expected
    assert second.calls == expected


def test_a_failing_observer_is_logged_once_and_the_others_still_hear(
    observe: Observe, caplog: pytest.LogCaptureFixture
) -> None:
    failing, healthy = Failing(), Recorder()
    observe(failing)
    observe(healthy)
    with caplog.at_level(logging.DEBUG, logger="idempay.observability"):
        for _ in range(3):
            notify_decision(AuditStep.DUPLICATE, AuditSource.WEBHOOK)
        notify_operation("webhook", "applied", 0.01)
    assert len(failing.of("decision")) == 3
    assert len(healthy.of("decision")) == 3
    assert healthy.of("operation") == [("webhook", "applied", 0.01)]
    records = [r for r in caplog.records if r.name == "idempay.observability"]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Failing" in warnings[0].getMessage()
    assert "decision()" in warnings[0].getMessage()
    assert warnings[0].exc_info is not None
    assert [r.levelno for r in records[1:]] == [logging.DEBUG] * 3


def test_concurrent_registrations_of_one_observer_register_it_once(observe: Observe) -> None:
    recorder, others = Recorder(), [Recorder() for _ in range(8)]
    barrier = threading.Barrier(16)

    def add(observer: Observer) -> None:
        barrier.wait()
        observe(observer)

    threads = [threading.Thread(target=add, args=(recorder,)) for _ in range(8)]
    threads += [threading.Thread(target=add, args=(other,)) for other in others]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    notify_reconciled("changed", 1)
    assert recorder.of("reconciled") == [("changed", 1)]
    assert all(other.of("reconciled") == [("changed", 1)] for other in others)


def test_every_audit_step_is_notified_even_when_the_audit_logger_is_off(
    recorder: Recorder,
) -> None:
    level, AUDIT_LOGGER.disabled = AUDIT_LOGGER.level, True
    try:
        log_decision(AuditStep.CONFLICT, source=AuditSource.CHECKOUT, order_id="o-1")
        log_draft(
            AuditDraft(
                "shop",
                "o-1",
                AuditStep.SUCCEEDED,
                AuditSource.RECONCILER,
                datetime(2026, 1, 1, tzinfo=UTC),
            )
        )
    finally:
        AUDIT_LOGGER.disabled, AUDIT_LOGGER.level = False, level
    assert recorder.of("decision") == [
        (AuditStep.CONFLICT, AuditSource.CHECKOUT),
        (AuditStep.SUCCEEDED, AuditSource.RECONCILER),
    ]


# --- operation() ----------------------------------------------------------------------------


def test_an_operation_reports_its_outcome_and_duration(recorder: Recorder) -> None:
    started = time.perf_counter()
    with operation("checkout", source="checkout") as op:
        assert op.outcome == "ok"
        op.outcome = "201"
    elapsed = time.perf_counter() - started
    with operation("dispatch_effect"):
        pass
    (checkout, effect) = recorder.of("operation")
    assert checkout[:2] == ("checkout", "201")
    assert 0 <= checkout[2] <= elapsed
    assert checkout[2] == op.seconds
    assert effect[:2] == ("dispatch_effect", "ok")


def test_an_operation_that_raises_is_an_error_and_the_exception_propagates(
    recorder: Recorder,
) -> None:
    with pytest.raises(KeyError, match="gone"), operation("reconcile_order") as op:
        op.outcome = "changed"
        raise KeyError("gone")
    assert op.outcome == "error"
    assert [call[:2] for call in recorder.of("operation")] == [("reconcile_order", "error")]


def test_a_failing_observer_does_not_change_what_an_operation_raises_or_returns(
    observe: Observe,
) -> None:
    observe(Failing())
    with operation("webhook") as op:
        op.outcome = "applied"
    with pytest.raises(ValueError, match="refused"), operation("webhook"):
        raise ValueError("refused")


@pytest.mark.anyio
async def test_an_operation_times_async_code(recorder: Recorder) -> None:
    async with operation("webhook", event_type="payment_intent.succeeded") as op:
        # A real suspension inside the block: the span and the timer survive it.
        await asyncio.get_running_loop().run_in_executor(None, time.perf_counter)
        op.outcome = "duplicate"
    assert [call[:2] for call in recorder.of("operation")] == [("webhook", "duplicate")]


@pytest.mark.anyio
async def test_a_cancelled_operation_is_reported_as_cancelled(recorder: Recorder) -> None:
    entered, never = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        async with operation("checkout"):
            entered.set()
            await never.wait()

    task = asyncio.create_task(work())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [call[:2] for call in recorder.of("operation")] == [("checkout", "cancelled")]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_operations_work_without_opentelemetry() -> None:
    result = _run(
        """
        import sys
        sys.modules["opentelemetry"] = None  # as if opentelemetry-api were not installed

        from idempay.observability import add_observer, operation

        seen = []

        class Seen:
            def decision(self, step, source): pass
            def operation(self, name, outcome, seconds): seen.append((name, outcome))
            def outbox(self, backlog): pass
            def orders(self, counts): pass
            def reconciled(self, result, count): pass

        add_observer(Seen())
        with operation("checkout", source="checkout") as op:
            op.outcome = "201"
        try:
            with operation("webhook"):
                raise ValueError("refused")
        except ValueError:
            pass
        assert seen == [("checkout", "201"), ("webhook", "error")], seen
        assert not [m for m in sys.modules if m.startswith("opentelemetry.")]
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize(
    ("blocked", "module", "extra"),
    [
        ("prometheus_client", "idempay.observability.prometheus", "prometheus"),
        ("opentelemetry", "idempay.observability.otel", "otel"),
    ],
)
def test_a_missing_extra_is_named(blocked: str, module: str, extra: str) -> None:
    result = _run(
        f"""
        import sys
        sys.modules[{blocked!r}] = None
        from idempay.errors import MissingDependencyError
        try:
            import {module}
        except MissingDependencyError as error:
            print(error)
        """
    )
    assert result.returncode == 0, result.stderr
    assert f"pip install 'idempay[{extra}]'" in result.stdout
