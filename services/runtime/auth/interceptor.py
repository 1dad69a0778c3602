"""The server interceptor that authenticates and authorises every call and ends revoked streams."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from .. import authz
from ..errors import MawError, permission_denied
from .authenticator import Authenticator, StreamWatch
from .credentials import bind_authentication, unbind_authentication


def revoked_error() -> MawError:
    """The error that ends a stream whose credential was revoked."""
    return permission_denied("credential revoked; the stream is closed", "CREDENTIAL_REVOKED")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call but health/reflection, checks :mod:`authz`, binds the principal."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or authz.is_open(method):
            return handler
        metadata = handler_call_details.invocation_metadata
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, method, metadata), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary, method, metadata), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._stream(handler.unary_stream, method, metadata), **kwargs)
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(self._stream(handler.stream_stream, method, metadata), **kwargs)

    def _unary(self, behaviour: Callable[..., Awaitable[Any]], method: str, metadata: Any) -> Callable[..., Any]:
        async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            auth = await self._auth.admit(method, metadata)
            tokens = bind_authentication(auth)
            try:
                return await behaviour(request, context)
            finally:
                unbind_authentication(tokens)

        return handler

    def _stream(self, behaviour: Callable[..., Any], method: str, metadata: Any) -> Callable[..., Any]:
        authenticator = self._auth
        if not inspect.isasyncgenfunction(behaviour):

            async def plain(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                auth = await authenticator.admit(method, metadata)
                tokens = bind_authentication(auth)
                watch = authenticator.watch_stream(auth.principal)
                watch.busy = True
                try:
                    return await behaviour(request, context)
                except asyncio.CancelledError:
                    if not watch.fired or watch.task is None:
                        raise
                    watch.task.uncancel()
                    raise revoked_error() from None
                finally:
                    authenticator.unwatch_stream(watch)
                    unbind_authentication(tokens)

            return plain

        async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            auth = await authenticator.admit(method, metadata)
            tokens = bind_authentication(auth)
            watch = authenticator.watch_stream(auth.principal)
            try:
                async for item in until_revoked(behaviour(request, context), watch):
                    yield item
            finally:
                authenticator.unwatch_stream(watch)
                unbind_authentication(tokens)

        return streaming


async def until_revoked(inner: AsyncIterator[Any], watch: StreamWatch) -> AsyncIterator[Any]:
    """Relay ``inner``'s items until it ends or ``watch`` fires (then PERMISSION_DENIED).

    The servicer runs in the call's own task (its context variables and ``current_task()`` stay its own); a
    revocation cancels that task only while the servicer is working, and otherwise stops the stream before
    the next step, so the cancellation is never mistaken for the client going away.
    """
    try:
        while True:
            if watch.fired:
                raise revoked_error()
            watch.busy = True
            try:
                item = await inner.__anext__()
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if not watch.fired or watch.task is None:
                    raise
                watch.task.uncancel()
                raise revoked_error() from None
            finally:
                watch.busy = False
            yield item
    finally:
        aclose: Callable[[], Awaitable[object]] | None = getattr(inner, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
