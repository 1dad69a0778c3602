"""Channels for internal calls between maw services, authenticated as this service.

``internal_channel(settings, settings.registry_addr)`` opens a channel whose every call carries
``authorization: Bearer <this service's credential>`` (MAW_SERVICE_CREDENTIAL), so the callee's auth
interceptor sees the principal ``services/<name>``. Targets come from MAW_REGISTRY_ADDR,
MAW_SCHEDULER_ADDR and MAW_EVALUATOR_ADDR.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from .config import ServiceSettings


def _with_credential(details: grpc.aio.ClientCallDetails, credential: str) -> grpc.aio.ClientCallDetails:
    metadata = [(k, v) for k, v in (details.metadata or ()) if k.lower() != "authorization"]
    metadata.append(("authorization", f"Bearer {credential}"))
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*metadata),
        details.credentials,
        details.wait_for_ready,
    )


class _ServiceCredential(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Adds the service credential to every call (all four call shapes)."""

    def __init__(self, credential: str) -> None:
        self._credential = credential

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_credential(client_call_details, self._credential), request)

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_credential(client_call_details, self._credential), request)

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await continuation(_with_credential(client_call_details, self._credential), request_iterator)

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await continuation(_with_credential(client_call_details, self._credential), request_iterator)


def internal_channel(settings: ServiceSettings, target: str) -> grpc.aio.Channel:
    """An asyncio channel to another maw service at ``target``, authenticated as this service."""
    credential = settings.service_credential.get_secret_value()
    interceptors = [_ServiceCredential(credential)] if credential else []
    return grpc.aio.insecure_channel(
        target,
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
        ],
    )


__all__ = ["internal_channel"]
