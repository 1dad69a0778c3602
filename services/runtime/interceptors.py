"""Server interceptors shared by every service: access log and error translation.

Each handler is wrapped so that a :class:`~services.runtime.errors.MawError` raised anywhere below
the servicer becomes its gRPC status with ``google.rpc`` details, and any other exception becomes
INTERNAL with an error id that points to the full traceback in the log (never sent to the client).
"""

from __future__ import annotations

import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from .errors import MawError, invalid_argument

_log = logging.getLogger("maw.rpc")


def _describe(method: str, peer: str, started: float, code: grpc.StatusCode) -> dict[str, Any]:
    return {
        "rpc": method,
        "peer": peer,
        "code": code.name,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
    }


async def _fail(context: grpc.aio.ServicerContext[Any, Any], method: str, exc: BaseException, started: float) -> None:
    peer = context.peer()
    if isinstance(exc, MawError):
        level = logging.WARNING if exc.code == grpc.StatusCode.INTERNAL else logging.INFO
        _log.log(level, "rpc failed: %s", exc.message, extra=_describe(method, peer, started, exc.code))
        await context.abort(exc.code, exc.message, exc.trailing_metadata())
    error_id = uuid.uuid4().hex[:12]
    _log.error(
        "rpc crashed (error id %s)",
        error_id,
        exc_info=exc,
        extra=_describe(method, peer, started, grpc.StatusCode.INTERNAL),
    )
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error; error id {error_id}")


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message of the method's request type."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def check(self) -> None:
        raise invalid_argument([("request", f"not a valid message of the expected type: {self.error}")])


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    # grpc would log a traceback and answer UNKNOWN; a malformed request is the caller's error.
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Undecodable(exc)

    return deserialize


def _checked(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        request.check()
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _checked(request)


def _passthrough(exc: BaseException) -> bool:
    # Aborts already carry their status; cancellation must propagate untouched.
    return isinstance(exc, grpc.aio.AbortError | grpc.aio.UsageError) or not isinstance(exc, Exception)


def _guard(request: Any, streaming_request: bool) -> Any:
    return _checked_stream(request) if streaming_request else _checked(request)


def _wrap_unary(
    behaviour: Callable[..., Awaitable[Any]], method: str, streaming_request: bool
) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        try:
            response = await behaviour(_guard(request, streaming_request), context)
        except BaseException as exc:
            if _passthrough(exc):
                raise
            await _fail(context, method, exc, started)
            raise
        _log.debug("rpc ok", extra=_describe(method, context.peer(), started, grpc.StatusCode.OK))
        return response

    return handler


def _wrap_streaming(behaviour: Callable[..., Any], method: str, streaming_request: bool) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behaviour):
        return _wrap_unary(behaviour, method, streaming_request)

    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        started = time.perf_counter()
        try:
            async for item in behaviour(_guard(request, streaming_request), context):
                yield item
        except BaseException as exc:
            if _passthrough(exc):
                raise
            await _fail(context, method, exc, started)
            raise
        _log.debug("stream closed", extra=_describe(method, context.peer(), started, grpc.StatusCode.OK))

    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to statuses and writes one access-log record per call."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        kwargs = {
            "request_deserializer": _tolerant(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary(handler.unary_unary, method, False), **kwargs)
        if handler.unary_stream:
            wrapped = _wrap_streaming(handler.unary_stream, method, False)
            return grpc.unary_stream_rpc_method_handler(wrapped, **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_wrap_unary(handler.stream_unary, method, True), **kwargs)
        assert handler.stream_stream is not None
        wrapped = _wrap_streaming(handler.stream_stream, method, True)
        return grpc.stream_stream_rpc_method_handler(wrapped, **kwargs)
