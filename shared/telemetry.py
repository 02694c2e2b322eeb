"""Tracing: one tracer provider per process, W3C trace context carried in NATS headers.

The exporter is a setting: ``otlp`` (OTLP over HTTP to a collector such as Jaeger),
``jsonl`` (one JSON object per finished span, appended to a file: the embedded default
can be read back without a collector), or ``none``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

from shared.settings import Settings

_provider: TracerProvider | None = None


class _ForcibleIds(RandomIdGenerator):
    """Random ids, except when :func:`span_with_ids` asks for given ones.

    A boot's root span covers minutes and several processes: its ids are chosen when the
    first DHCP packet arrives (and travel as a traceparent), but the span itself is written
    by whichever process sees the session end."""

    def __init__(self) -> None:
        self.forced: tuple[int, int] | None = None

    def generate_trace_id(self) -> int:
        return self.forced[0] if self.forced else super().generate_trace_id()

    def generate_span_id(self) -> int:
        return self.forced[1] if self.forced else super().generate_span_id()


_ids = _ForcibleIds()


TRACE_FILE_MODE = 0o600


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, TRACE_FILE_MODE)


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span as one JSON line; safe for several processes (O_APPEND)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()
        # Spans name clients' MACs, sessions and vdisks: for this user only, a file kept
        # from an older run included.
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path, TRACE_FILE_MODE)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(span_to_json(s) + "\n" for s in spans)
        with self._lock, open(self._path, "a", encoding="utf-8", opener=_private) as out:
            out.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def span_to_json(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    return json.dumps(
        {
            "trace_id": f"{ctx.trace_id:032x}",
            "span_id": f"{ctx.span_id:016x}",
            "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
            "name": span.name,
            "service": span.resource.attributes.get("service.name"),
            "start_ns": span.start_time,
            "end_ns": span.end_time,
            "attributes": dict(span.attributes or {}),
            "status": span.status.status_code.name,
        },
        default=str,
    )


def setup_tracing(service_name: str, settings: Settings) -> TracerProvider:
    """Install the process-wide tracer provider with the configured exporter (idempotent)."""
    global _provider
    if _provider is not None:
        return _provider
    provider = TracerProvider(
        id_generator=_ids,
        resource=Resource.create(
            {"service.name": service_name, "service.instance.id": settings.node_id}
        ),
    )
    exporter: SpanExporter | None = None
    if settings.trace_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint)
    elif settings.trace_exporter == "jsonl":
        exporter = JsonLinesSpanExporter(settings.trace_file or settings.data_path("traces.jsonl"))
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """The current trace context as NATS headers (``traceparent``, ``tracestate``)."""
    carrier: dict[str, str] = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The remote parent context carried in a message's headers (empty when absent)."""
    return propagate.extract(dict(headers or {}))


def current_traceparent() -> str | None:
    return inject_headers().get("traceparent")


def context_from_traceparent(traceparent: str | None) -> otel_context.Context:
    return extract_context({"traceparent": traceparent} if traceparent else None)


def new_traceparent() -> str:
    """A fresh W3C traceparent (the root of a new trace), e.g. for a boot's first packet."""
    return f"00-{_ids.generate_trace_id():032x}-{_ids.generate_span_id():016x}-01"


def parse_traceparent(traceparent: str) -> tuple[int, int]:
    _, trace_id, span_id, _ = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16)


def record_span_with_ids(
    name: str,
    traceparent: str,
    *,
    start_ns: int,
    end_ns: int,
    attributes: dict[str, Any] | None = None,
    tracer_name: str = "streamboot",
) -> None:
    """Write the span whose ids ``traceparent`` names (a boot's root span, written at its
    end by the process that sees the session close)."""
    trace_id, span_id = parse_traceparent(traceparent)
    _ids.forced = (trace_id, span_id)
    try:
        span = trace.get_tracer(tracer_name).start_span(
            name, context=otel_context.Context(), start_time=start_ns, attributes=attributes
        )
    finally:
        _ids.forced = None
    span.end(end_time=end_ns)
