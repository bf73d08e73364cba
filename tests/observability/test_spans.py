"""operation() opens OpenTelemetry spans: read back from the real SDK, in memory.

The global tracer provider can be set once per process: this module sets it if nothing has, or
adds its exporter to the SDK provider already set, and reads only the spans of its own tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from tests.observability.recording import Recorder

from idempay.observability import operation


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    exporter.clear()
    yield exporter
    exporter.clear()


def finished(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith("idempay.")]


def test_an_operation_is_a_span_with_prefixed_attributes(
    spans: InMemorySpanExporter, recorder: Recorder
) -> None:
    with operation("webhook", event_type="payment_intent.succeeded") as op:
        op.outcome = "applied"
    (span,) = finished(spans)
    assert span.name == "idempay.webhook"
    assert dict(span.attributes or {}) == {
        "idempay.event_type": "payment_intent.succeeded",
        "idempay.outcome": "applied",
    }
    assert span.status.status_code is StatusCode.UNSET
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "idempay"
    # The observers heard the same operation.
    assert [call[:2] for call in recorder.of("operation")] == [("webhook", "applied")]


def test_an_exception_is_recorded_and_the_status_is_error(spans: InMemorySpanExporter) -> None:
    with pytest.raises(ValueError, match="card declined"), operation("checkout"):
        raise ValueError("card declined")
    (span,) = finished(spans)
    assert span.status.status_code is StatusCode.ERROR
    # The status names the type only: its description is indexed, a message may not be safe.
    assert span.status.description == "ValueError"
    assert dict(span.attributes or {})["idempay.outcome"] == "error"
    (event,) = span.events
    assert event.name == "exception"
    assert dict(event.attributes or {})["exception.type"] == "ValueError"


def test_the_span_is_current_in_the_block_so_that_others_nest_under_it(
    spans: InMemorySpanExporter,
) -> None:
    tracer = trace.get_tracer("the-application")
    with operation("reconcile_order"):
        outer = trace.get_current_span()
        with tracer.start_as_current_span("SELECT idempay_orders"):
            pass
    assert trace.get_current_span() is not outer
    by_name = {s.name: s for s in spans.get_finished_spans()}
    parent, child = by_name["idempay.reconcile_order"], by_name["SELECT idempay_orders"]
    assert child.parent is not None
    assert parent.context is not None
    assert child.parent.span_id == parent.context.span_id
    assert outer.get_span_context().span_id == parent.context.span_id


@pytest.mark.anyio
async def test_concurrent_async_operations_keep_their_own_spans(
    spans: InMemorySpanExporter,
) -> None:
    both_inside = asyncio.Barrier(2)

    async def work(name: str) -> int:
        async with operation(name):
            mine = trace.get_current_span().get_span_context().span_id
            await both_inside.wait()  # both blocks are open at once
            assert trace.get_current_span().get_span_context().span_id == mine
            return mine

    first, second = await asyncio.gather(work("checkout"), work("webhook"))
    assert first != second
    ids = {s.name: s.context.span_id for s in finished(spans) if s.context is not None}
    assert ids == {"idempay.checkout": first, "idempay.webhook": second}
    assert all(s.parent is None for s in finished(spans))
