"""An observer that records what it hears, for the observability tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from idempay.core.audit import AuditSource, AuditStep
from idempay.core.models import OutboxBacklog
from idempay.core.orders import OrderStatus


class Recorder:
    """An observer that keeps every call it gets, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def decision(self, step: AuditStep, source: AuditSource) -> None:
        self.calls.append(("decision", step, source))

    def operation(self, name: str, outcome: str, seconds: float) -> None:
        self.calls.append(("operation", name, outcome, seconds))

    def outbox(self, backlog: OutboxBacklog) -> None:
        self.calls.append(("outbox", backlog))

    def orders(self, counts: Mapping[OrderStatus, int]) -> None:
        self.calls.append(("orders", dict(counts)))

    def reconciled(self, result: str, count: int) -> None:
        self.calls.append(("reconciled", result, count))

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [call[1:] for call in self.calls if call[0] == kind]
