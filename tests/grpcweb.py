"""A minimal gRPC-Web client over HTTP/1.1, as a browser speaks it, for tests through Envoy.

Framing (grpc/grpc PROTOCOL-WEB.md): each message is a 5-byte prefix (flags byte, big-endian length)
and the payload; the response ends with a trailer frame (flags 0x80) holding ``name: value`` lines.
"""

from __future__ import annotations

import http.client
import struct
from dataclasses import dataclass, field

_TRAILER_FLAG = 0x80


def frame(payload: bytes, flags: int = 0) -> bytes:
    """One gRPC-Web data frame."""
    return struct.pack(">BI", flags, len(payload)) + payload


@dataclass
class GrpcWebReply:
    """What came back: HTTP status and headers, message payloads, and the gRPC trailers."""

    http_status: int
    headers: dict[str, str]
    messages: list[bytes] = field(default_factory=list)
    trailers: dict[str, str] = field(default_factory=dict)

    @property
    def grpc_status(self) -> int | None:
        """The gRPC status code, from the trailers or (trailers-only reply) the headers."""
        value = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        return int(value) if value is not None else None

    @property
    def grpc_message(self) -> str:
        """The status message, if any."""
        return self.trailers.get("grpc-message", self.headers.get("grpc-message", ""))


def parse_body(body: bytes) -> tuple[list[bytes], dict[str, str]]:
    """Split a gRPC-Web response body into message payloads and trailers."""
    messages: list[bytes] = []
    trailers: dict[str, str] = {}
    offset = 0
    while offset + 5 <= len(body):
        flags, length = struct.unpack(">BI", body[offset : offset + 5])
        payload = body[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if flags & _TRAILER_FLAG:
            for line in payload.decode().split("\r\n"):
                if ":" in line:
                    name, value = line.split(":", 1)
                    trailers[name.strip().lower()] = value.strip()
        else:
            messages.append(payload)
    return messages, trailers


def call(
    port: int,
    path: str,
    body: bytes,
    *,
    content_type: str = "application/grpc-web+proto",
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> GrpcWebReply:
    """POST ``body`` (already framed) to ``path`` on localhost:``port`` over HTTP/1.1."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        all_headers = {"content-type": content_type, "x-grpc-web": "1", "accept": content_type}
        all_headers.update(headers or {})
        conn.request("POST", path, body=body, headers=all_headers)
        response = conn.getresponse()
        raw = response.read()
        reply_headers = {k.lower(): v for k, v in response.getheaders()}
        messages, trailers = parse_body(raw)
        return GrpcWebReply(response.status, reply_headers, messages, trailers)
    finally:
        conn.close()
