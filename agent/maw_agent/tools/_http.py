"""A minimal streaming HTTP/1.1 client on asyncio streams, for the Ollama adapter.

Just what a local model server needs: GET and POST with a JSON body, `Connection: close`, a body read
as it arrives (chunked or not), http and https. It keeps the agent free of an HTTP library dependency.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["HttpError", "Response", "request"]

_MAX_HEADER_BYTES = 64 << 10
_READ_SIZE = 64 << 10


class HttpError(Exception):
    """The server could not be reached, or answered something that is not HTTP."""


@dataclass
class Response:
    """A response whose body is read with `body()`."""

    status: int
    headers: dict[str, str]
    _reader: asyncio.StreamReader
    _writer: asyncio.StreamWriter

    async def body(self) -> AsyncIterator[bytes]:
        """The body, piece by piece, as it arrives."""
        try:
            if "chunked" in self.headers.get("transfer-encoding", "").lower():
                while True:
                    size_line = await self._reader.readline()
                    try:
                        size = int(size_line.split(b";")[0].strip() or b"x", 16)
                    except ValueError:
                        raise HttpError(f"bad chunk size line {size_line[:40]!r}") from None
                    if size == 0:
                        return
                    remaining = size
                    while remaining:
                        piece = await self._reader.read(min(remaining, _READ_SIZE))
                        if not piece:
                            raise HttpError("connection closed inside a chunk")
                        remaining -= len(piece)
                        yield piece
                    await self._reader.readexactly(2)
            else:
                length = self.headers.get("content-length")
                remaining = int(length) if length and length.isdigit() else -1
                while remaining != 0:
                    piece = await self._reader.read(_READ_SIZE if remaining < 0 else min(remaining, _READ_SIZE))
                    if not piece:
                        return
                    if remaining > 0:
                        remaining -= len(piece)
                    yield piece
        except asyncio.IncompleteReadError:
            raise HttpError("connection closed early") from None

    async def read(self, limit: int) -> bytes:
        """The whole body, up to `limit` bytes (the rest is dropped)."""
        data = bytearray()
        async for piece in self.body():
            data += piece[: max(0, limit - len(data))]
        return bytes(data)

    def close(self) -> None:
        """Close the connection."""
        self._writer.close()


async def request(method: str, url: str, payload: Any = None, *, limit_s: float = 10.0) -> Response:
    """Send a request and read the status line and headers (within `limit_s`); the body streams after."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    context = ssl.create_default_context() if parts.scheme == "https" else None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, port, ssl=context, limit=_MAX_HEADER_BYTES), limit_s
        )
    except (OSError, TimeoutError) as exc:
        raise HttpError(f"cannot connect to {parts.hostname}:{port}: {exc or type(exc).__name__}") from None
    body = json.dumps(payload).encode() if payload is not None else b""
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close", "Accept: application/json"]
    if payload is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    try:
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), limit_s)
        fields = status_line.decode("latin-1").split(" ", 2)
        if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
            raise HttpError(f"not an HTTP response: {status_line[:60]!r}")
        headers: dict[str, str] = {}
        while True:
            line = await asyncio.wait_for(reader.readline(), limit_s)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
    except (OSError, TimeoutError, ValueError) as exc:
        writer.close()
        raise HttpError(f"no HTTP answer from {parts.hostname}:{port}: {exc or type(exc).__name__}") from None
    except BaseException:
        writer.close()
        raise
    return Response(int(fields[1]), headers, reader, writer)
