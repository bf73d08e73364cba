"""docs/observability.md: its snippets run, and its tables name what the code exports."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry

from idempay.core.audit import AuditSource, AuditStep
from idempay.core.models import OutboxBacklog
from idempay.core.orders import OrderStatus
from idempay.engine._auditlog import _WARNING_STEPS
from idempay.observability.otel import OpenTelemetryObserver
from idempay.observability.prometheus import PrometheusObserver

ROOT = Path(__file__).resolve().parents[2]
PAGE = (ROOT / "docs" / "observability.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", PAGE, flags=re.DOTALL | re.MULTILINE)


def missing_modules(code: str) -> list[str]:
    """Top-level modules the snippet imports that are not installed here."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module.split(".")[0])
    return sorted(name for name in names if importlib.util.find_spec(name) is None)


def run(code: str) -> subprocess.CompletedProcess[str]:
    # A process per snippet: each one sets process-wide things (registries, providers).
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=ROOT,
    )


PYTHON_BLOCKS = blocks("python")


def test_the_page_has_its_snippets() -> None:
    assert len(PYTHON_BLOCKS) >= 6


@pytest.mark.parametrize("code", PYTHON_BLOCKS, ids=lambda code: code.splitlines()[0][:40])
def test_each_python_snippet_runs(code: str) -> None:
    compile(code, "<docs/observability.md>", "exec")
    missing = missing_modules(code)
    if missing:
        # Only the Sentry snippet needs a package the tests do not install: it compiles, and
        # its hook is run below.
        assert missing == ["sentry_sdk"], missing
        return
    result = run(code)
    assert result.returncode == 0, result.stderr


def test_the_sentry_hook_sets_the_fingerprint_of_idempay_errors_only() -> None:
    (code,) = [c for c in PYTHON_BLOCKS if "sentry_sdk" in c]
    hook = code.split("def before_send", 1)[1].split("\n\n\n", 1)[0]
    namespace: dict[str, object] = {}
    exec(  # the snippet's own function, without the sentry_sdk import and init around it
        "from idempay.errors import IdempayError\n\ndef before_send" + hook, namespace
    )
    before_send = namespace["before_send"]
    assert callable(before_send)
    from idempay.errors import SignatureVerificationError

    refused = SignatureVerificationError(reason="no_match")
    event = before_send({}, {"exc_info": (type(refused), refused, None)})
    assert event == {"fingerprint": list(refused.fingerprint)}
    other = ValueError("not ours")
    assert before_send({}, {"exc_info": (ValueError, other, None)}) == {}
    assert before_send({"message": "a log"}, {}) == {"message": "a log"}


def test_the_json_log_example_is_what_the_formatter_writes() -> None:
    (formatter,) = [c for c in PYTHON_BLOCKS if "class JSONFormatter" in c]
    (example,) = blocks("json")
    result = run(
        formatter
        + "\nfrom idempay.core.audit import AuditSource, AuditStep"
        + "\nfrom idempay.engine._auditlog import log_decision"
        + "\nlog_decision(AuditStep.DUPLICATE, source=AuditSource.WEBHOOK,"
        + " order_id='o-1042', event_id='evt_1Q')\n"
    )
    assert result.returncode == 0, result.stderr
    written = json.loads(result.stderr.strip().splitlines()[-1])
    documented = json.loads(example)
    assert list(written) == list(documented)
    assert {k: v for k, v in written.items() if k not in {"time", "event_id"}} == {
        k: v for k, v in documented.items() if k not in {"time", "event_id"}
    }


def test_the_warning_steps_are_the_documented_ones() -> None:
    sentence = PAGE.split("hint at an attack", 1)[1].split("are logged at WARNING", 1)[0]
    assert set(re.findall(r"`(\w+)`", sentence)) == {step.value for step in _WARNING_STEPS}


def test_the_metric_table_names_every_prometheus_metric() -> None:
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry=registry)
    observer.decision(AuditStep.DUPLICATE, AuditSource.WEBHOOK)
    observer.operation("webhook", "applied", 0.01)
    observer.outbox(OutboxBacklog(pending=0, due=0, dead=0, oldest_due_at=None))
    observer.orders({OrderStatus.PAID: 1})
    observer.reconciled("changed", 1)
    exported = {
        metric.name + ("_total" if metric.type == "counter" else "")
        for metric in registry.collect()
    }
    table = PAGE.split("## The metrics", 1)[1].split("## Alerts", 1)[0]
    documented = set(re.findall(r"^\| `(idempay_\w+)", table, flags=re.MULTILINE))
    assert documented == exported


def test_the_metric_table_names_every_opentelemetry_instrument() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    observer = OpenTelemetryObserver(meter_provider=provider)
    observer.decision(AuditStep.DUPLICATE, AuditSource.WEBHOOK)
    observer.operation("webhook", "applied", 0.01)
    observer.outbox(OutboxBacklog(pending=0, due=0, dead=0, oldest_due_at=None))
    observer.orders({OrderStatus.PAID: 1})
    observer.reconciled("changed", 1)
    data = reader.get_metrics_data()
    assert data is not None
    names = {
        metric.name
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }
    provider.shutdown()
    table = PAGE.split("## The metrics", 1)[1].split("## Alerts", 1)[0]
    documented = set(re.findall(r"^\| `[^`]+` \| `(idempay\.[\w.]+)`", table, flags=re.MULTILINE))
    assert documented == names
