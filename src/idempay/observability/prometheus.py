"""Prometheus metrics for idempay (extra ``prometheus``: ``pip install "idempay[prometheus]"``).

::

    from idempay.observability import add_observer
    from idempay.observability.prometheus import PrometheusObserver

    add_observer(PrometheusObserver())  # then expose prometheus_client's registry

The metrics, with the default namespace ``idempay``:

- ``idempay_decisions_total{step,source}`` (counter): audit steps and guard decisions.
- ``idempay_operation_seconds{operation,outcome}`` (histogram): how long an operation took.
- ``idempay_outbox_pending``, ``idempay_outbox_due``, ``idempay_outbox_dead`` (gauges): effects
  waiting to run, those whose time has come, those that gave up and wait for an operator.
- ``idempay_outbox_oldest_due_age_seconds`` (gauge): how long the oldest due effect has waited.
- ``idempay_orders{status}`` (gauge): orders per status.
- ``idempay_reconciled_total{result}`` (counter): what reconciliation found.

Every label value comes from a small fixed set (steps, sources, statuses, operations,
outcomes, results): never an id, a key, an amount or personal data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

from idempay._lazy import require
from idempay.clock import Clock, SystemClock
from idempay.core.audit import AuditSource, AuditStep
from idempay.core.models import OutboxBacklog
from idempay.core.orders import OrderStatus
from idempay.errors import ConfigurationError
from idempay.observability import OPERATION_BUCKETS

require("prometheus_client", extra="prometheus")

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram  # noqa: E402
from prometheus_client.metrics import MetricWrapperBase  # noqa: E402
from prometheus_client.metrics_core import Metric  # noqa: E402

__all__ = ["PrometheusObserver"]


class _Metrics:
    """The observer's metrics as one collector: registered, or refused, all at once."""

    def __init__(self, metrics: Iterable[MetricWrapperBase]) -> None:
        self._metrics = tuple(metrics)

    def collect(self) -> Iterable[Metric]:
        for metric in self._metrics:
            yield from metric.collect()

    def describe(self) -> Iterable[Metric]:
        for metric in self._metrics:
            yield from metric.describe()


class PrometheusObserver:
    """An :class:`~idempay.observability.Observer` that keeps idempay's Prometheus metrics.

    Args:
        registry: where to register the metrics; prometheus_client's default registry when
            ``None``.
        namespace: the prefix of every metric name (``"idempay"`` gives ``idempay_orders``).
        clock: the clock that ages the oldest due effect; the machine's by default.

    The age of the oldest due effect is computed when the metrics are scraped, from the last
    reported backlog: it keeps growing while nothing drains the outbox, even if nothing reports.

    Raises:
        ConfigurationError: the registry already has metrics of these names (one observer per
            registry and namespace).
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        namespace: str = "idempay",
        clock: Clock | None = None,
    ) -> None:
        self._clock: Clock = clock or SystemClock()
        self._oldest_due_at: datetime | None = None
        # Unregistered here, registered below as one collector: all of them or none.
        self._decisions = Counter(
            "decisions",
            "Audit steps and guard decisions (payment steps, duplicates, rejections...), "
            "by step and source.",
            ["step", "source"],
            namespace=namespace,
            registry=None,
        )
        self._operations = Histogram(
            "operation_seconds",
            "Time taken by an idempay operation (checkout, webhook, effect...), by outcome.",
            ["operation", "outcome"],
            buckets=OPERATION_BUCKETS,
            namespace=namespace,
            registry=None,
        )
        self._pending = Gauge(
            "outbox_pending",
            "Outbox effects waiting to run, due or not.",
            namespace=namespace,
            registry=None,
        )
        self._due = Gauge(
            "outbox_due",
            "Outbox effects whose time to run has come and that have not run.",
            namespace=namespace,
            registry=None,
        )
        self._dead = Gauge(
            "outbox_dead",
            "Outbox effects that exhausted their attempts and wait for an operator.",
            namespace=namespace,
            registry=None,
        )
        self._oldest_due_age = Gauge(
            "outbox_oldest_due_age_seconds",
            "How long the oldest due outbox effect has been waiting (0 when none is due).",
            namespace=namespace,
            registry=None,
        )
        self._oldest_due_age.set_function(self._age)
        self._orders = Gauge(
            "orders",
            "Orders in each status, as last counted.",
            ["status"],
            namespace=namespace,
            registry=None,
        )
        self._reconciled = Counter(
            "reconciled",
            "Items settled by reconciliation, by result (changed means a webhook was missed).",
            ["result"],
            namespace=namespace,
            registry=None,
        )
        collector = _Metrics(
            (
                self._decisions,
                self._operations,
                self._pending,
                self._due,
                self._dead,
                self._oldest_due_age,
                self._orders,
                self._reconciled,
            )
        )
        try:
            (REGISTRY if registry is None else registry).register(collector)
        except ValueError as error:
            raise ConfigurationError(
                "this registry has idempay's metrics already: one PrometheusObserver per "
                "registry and namespace"
            ) from error

    def decision(self, step: AuditStep, source: AuditSource) -> None:
        self._decisions.labels(step=step.value, source=source.value).inc()

    def operation(self, name: str, outcome: str, seconds: float) -> None:
        self._operations.labels(operation=name, outcome=outcome).observe(seconds)

    def outbox(self, backlog: OutboxBacklog) -> None:
        self._pending.set(backlog.pending)
        self._due.set(backlog.due)
        self._dead.set(backlog.dead)
        self._oldest_due_at = backlog.oldest_due_at

    def orders(self, counts: Mapping[OrderStatus, int]) -> None:
        # Every status, so that a status that emptied reads 0 rather than its last count.
        for status in OrderStatus:
            self._orders.labels(status=status.value).set(counts.get(status, 0))

    def reconciled(self, result: str, count: int) -> None:
        child = self._reconciled.labels(result=result)
        if count > 0:
            child.inc(count)

    def _age(self) -> float:
        oldest = self._oldest_due_at
        if oldest is None:
            return 0.0
        return max(0.0, (self._clock.now() - oldest).total_seconds())
