"""OpenTelemetry tracing: always on for log correlation, exported only when a collector is configured."""

from __future__ import annotations

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def configure_tracing(service: str, otlp_endpoint: str) -> TracerProvider:
    """Install a tracer provider for ``service``; spans go to ``otlp_endpoint`` when it is non-empty."""
    provider = TracerProvider(resource=Resource.create({"service.name": f"maw-{service}"}))
    if otlp_endpoint:
        # Imported lazily: the exporter pulls in its own gRPC channel machinery, unused when off.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    return provider


def tracing_interceptor(provider: TracerProvider) -> grpc.aio.ServerInterceptor:
    """The server-side span interceptor (continues the caller's trace from the metadata)."""
    interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=provider
    )
    return interceptor
