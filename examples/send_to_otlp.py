# Run: OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318 python examples/send_to_otlp.py
# (any OTLP/HTTP backend: an OpenTelemetry Collector, Jaeger, Grafana Tempo, a vendor)
# Needs: pip install 'laminar-middleware[otlp]'
"""Send the spans to any OTLP backend (`pip install 'laminar-middleware[otlp]'`).

The exporter reads the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), `OTEL_EXPORTER_OTLP_HEADERS` for an API key,
`OTEL_EXPORTER_OTLP_TIMEOUT`; `OTEL_SERVICE_NAME` names the service. Call `setup_tracing()`
at the start of each service (before the first request); the middlewares and hooks use the
global tracer provider unless given `tracer_provider=`. Here a producer and a consumer make
one small trace and send it.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from laminar_middleware import continue_trace, serialize_span_context


def setup_tracing(service_name: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def main() -> None:
    provider = setup_tracing("otlp-example")
    tracer = trace.get_tracer("examples.send_to_otlp")
    with tracer.start_as_current_span("producer") as span:
        message = {"task": "summarise", "trace": serialize_span_context()}
        trace_id = span.get_span_context().trace_id
    with continue_trace(message["trace"], "consumer"):
        pass
    provider.shutdown()  # flushes the batch to the endpoint
    print(f"sent trace {trace_id:032x}")


if __name__ == "__main__":
    main()
