"""The audit trail: sealed entries chained by hash, and its verification."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest

from idempay.core.audit import (
    GENESIS_HASH,
    AuditDraft,
    AuditEntry,
    AuditSource,
    AuditStep,
    seal,
    verify_trail,
)
from idempay.errors import ConfigurationError

T0 = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
STEPS = [AuditStep.STARTED, AuditStep.PENDING, AuditStep.SUCCEEDED, AuditStep.DUPLICATE]


def trail(order_id: str = "o1") -> list[AuditEntry]:
    entries: list[AuditEntry] = []
    prev = GENESIS_HASH
    for i, step in enumerate(STEPS):
        draft = AuditDraft(
            tenant="acme",
            order_id=order_id,
            step=step,
            source=AuditSource.WEBHOOK,
            at=T0 + timedelta(seconds=i),
            event_id=f"evt_{i}",
            details={"reason": "test", "n": str(i)},
        )
        entry = seal(draft, seq=i + 1, prev_hash=prev)
        entries.append(entry)
        prev = entry.hash
    return entries


def test_an_untouched_trail_verifies() -> None:
    check = verify_trail(trail())
    assert check.ok
    assert check.entries == len(STEPS)
    assert check.broken_at is None


def test_empty_trail_verifies() -> None:
    assert verify_trail([]).ok


@pytest.mark.parametrize(
    "change",
    [
        {"step": AuditStep.FAILED},
        {"to_status": "paid"},
        {"details": (("reason", "edited"),)},
        {"at": T0 + timedelta(days=1)},
        {"event_id": "evt_other"},
    ],
)
def test_an_edited_entry_is_detected(change: dict[str, object]) -> None:
    entries = trail()
    entries[1] = dataclasses.replace(entries[1], **change)  # type: ignore[arg-type]
    check = verify_trail(entries)
    assert not check.ok
    assert check.broken_at == 2
    assert check.problem == "entry altered"


def test_a_removed_entry_is_detected() -> None:
    entries = trail()
    del entries[1]
    check = verify_trail(entries)
    assert (check.ok, check.broken_at, check.problem) == (False, 3, "sequence gap")


def test_a_rehashed_forgery_still_breaks_the_chain() -> None:
    entries = trail()
    forged = seal(
        AuditDraft("acme", "o1", AuditStep.FAILED, AuditSource.OPERATOR, at=T0),
        seq=2,
        prev_hash="f" * 64,
    )
    entries[1] = forged
    check = verify_trail(entries)
    assert (check.ok, check.broken_at, check.problem) == (False, 2, "chain broken")


def test_entries_of_another_order_are_detected() -> None:
    entries = trail()
    entries[2] = trail("o2")[2]
    check = verify_trail(entries)
    assert (check.ok, check.problem) == (False, "entry of another order")


def test_hash_does_not_depend_on_the_time_zone_of_the_same_instant() -> None:
    draft = AuditDraft("acme", "o1", AuditStep.STARTED, AuditSource.CHECKOUT, at=T0)
    shifted = dataclasses.replace(draft, at=T0.astimezone(timezone(timedelta(hours=5))))
    assert (
        seal(draft, seq=1, prev_hash=GENESIS_HASH).hash
        == seal(shifted, seq=1, prev_hash=GENESIS_HASH).hash
    )


def test_details_are_stored_sorted_and_as_text() -> None:
    draft = AuditDraft(
        "acme", "o1", AuditStep.STARTED, AuditSource.CHECKOUT, at=T0, details={"b": "2", "a": "1"}
    )
    assert seal(draft, seq=1, prev_hash=GENESIS_HASH).details == (("a", "1"), ("b", "2"))


def test_naive_times_and_bad_sequence_numbers_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        AuditDraft("acme", "o1", AuditStep.STARTED, AuditSource.CHECKOUT, at=datetime(2026, 1, 1))  # noqa: DTZ001
    draft = AuditDraft("acme", "o1", AuditStep.STARTED, AuditSource.CHECKOUT, at=T0)
    with pytest.raises(ConfigurationError):
        seal(draft, seq=0, prev_hash=GENESIS_HASH)


def test_step_values_are_stable() -> None:
    # Stored and exported: changing a value is a breaking change.
    assert {s.value for s in AuditStep} >= {
        "started",
        "pending",
        "succeeded",
        "failed",
        "duplicate",
        "replayed",
        "conflict",
        "mismatch",
        "ignored_stale",
        "orphaned",
        "recovered",
        "rejected",
        "needs_review",
    }
