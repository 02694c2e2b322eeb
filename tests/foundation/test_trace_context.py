"""W3C trace context crosses a NATS hop, both for raw nats-py and for the event log."""

from __future__ import annotations

import nats
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.bus import request_json, serve_json

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
tracer = provider.get_tracer("test")


async def test_trace_context_crosses_a_nats_request(nats_url: str) -> None:
    server = await nats.connect(nats_url)
    client = await nats.connect(nats_url)

    async def handler(body: dict, _msg) -> dict:
        with tracer.start_as_current_span("server-side") as span:
            ctx = span.get_span_context()
            return {"echo": body["x"], "trace_id": f"{ctx.trace_id:032x}"}

    await serve_json(server, "test.trace", handler)
    await server.flush()
    with tracer.start_as_current_span("client-side") as client_span:
        reply = await request_json(client, "test.trace", {"x": 1})
    client_ctx = client_span.get_span_context()
    assert reply["echo"] == 1
    assert reply["trace_id"] == f"{client_ctx.trace_id:032x}"
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["server-side"].parent.span_id == client_ctx.span_id
    assert spans["server-side"].context.trace_id == client_ctx.trace_id
    await server.close()
    await client.close()


async def test_no_context_means_a_fresh_trace(nats_url: str) -> None:
    server = await nats.connect(nats_url)

    async def handler(body: dict, _msg) -> dict:
        return {"valid": trace.get_current_span().get_span_context().is_valid}

    await serve_json(server, "test.notrace", handler)
    await server.flush()
    reply = await request_json(server, "test.notrace", {})
    assert reply == {"valid": False}
    await server.close()
