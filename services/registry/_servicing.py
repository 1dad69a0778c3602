"""What the registry's servicers share: who is calling, from where, and the checks of names, masks and pages."""

from __future__ import annotations

from typing import Any

import grpc

from .activity_log import peer_host as host_of

Context = grpc.aio.ServicerContext[Any, Any]


def peer_of(context: Context) -> str:
    """The caller's peer address (``ipv4:host:port``)."""
    peer: str = context.peer() or ""
    return peer


def peer_host(context: Context) -> str:
    """The caller's host, without the port (login limits per peer address)."""
    return host_of(peer_of(context))
