"""`maw-agent enroll` and `maw-agent doctor`: turning a machine into a worker, and checking it.

enroll: detect the tools on this machine, exchange a one-time enrollment token for a worker and its
credential (EnrollmentService.EnrollAgent, which needs no other authentication), store the credential
with mode 0600 in the user config dir and write (or update) the configuration next to it.

doctor: a readable table of the tools (with versions), the machine's resources, the sandbox, the
connection to the server and whether the credential is accepted. The credential check opens an agent
stream with a Hello for a worker name no credential can own: a valid credential is refused with
PERMISSION_DENIED ("this credential speaks for workers/x"), an unknown one with UNAUTHENTICATED; no
session is opened, so the running agent of the same worker is never displaced.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc
import psutil
import yaml
from maw.agent.v1 import agent_service_pb2 as agent_pb2
from maw.agent.v1 import agent_service_pb2_grpc as agent_grpc
from maw.common.v1 import machine_pb2
from maw.registry.v1 import enrollment_service_pb2 as enrollment_pb2
from maw.registry.v1 import enrollment_service_pb2_grpc as enrollment_grpc

from maw_agent import __version__
from maw_agent._messages import platform_name
from maw_agent._resources import load_nvml
from maw_agent._sandbox import bwrap_problem
from maw_agent.config import AgentConfig
from maw_agent.tools import ToolAdapter, ToolInfo, adapter_names, adapters

__all__ = ["EnrollError", "default_config_path", "doctor", "enroll", "user_config_dir"]

_PROBE_WORKER = "workers/_maw-doctor-probe"  # not a valid worker id, so never a credential's own
_RPC_TIMEOUT_S = 15.0


class EnrollError(Exception):
    """Enrollment failed; the message says why."""


def user_config_dir() -> Path:
    """`$XDG_CONFIG_HOME/maw-agent` (default `~/.config/maw-agent`)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "maw-agent"


def default_config_path() -> Path:
    """Where `enroll` writes the configuration and `run`/`doctor` look for it without `--config`."""
    return user_config_dir() / "agent.yaml"


async def detect_tools(
    settings: dict[str, dict[str, Any]] | None = None,
) -> dict[str, tuple[ToolAdapter, ToolInfo | None]]:
    """Every real tool adapter (not the test tool) and what it found on this machine."""
    names = sorted(name for name in adapter_names() if name != "test")
    found = adapters(names, {k: v for k, v in (settings or {}).items() if k in names})
    infos = await asyncio.gather(*(adapter.detect() for adapter in found.values()))
    return {name: (adapter, info) for (name, adapter), info in zip(found.items(), infos, strict=True)}


def _channel(server: str, tls: bool, ca_file: Path | None) -> grpc.aio.Channel:
    if not tls:
        return grpc.aio.insecure_channel(server)
    roots = ca_file.read_bytes() if ca_file is not None else None
    return grpc.aio.secure_channel(server, grpc.ssl_channel_credentials(root_certificates=roots))


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically (never a moment with wider permissions)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass
class Enrolled:
    """What enrollment produced."""

    worker: str
    credential_file: Path
    config_file: Path
    tools: list[str]


async def enroll(
    *,
    server: str,
    token: str,
    worker: str | None,
    config_file: Path,
    credential_file: Path,
    tls: bool = False,
    tls_ca_file: Path | None = None,
    display_name: str = "",
) -> Enrolled:
    """Enroll this machine and write its credential and configuration."""
    detected = await detect_tools()
    tools = [
        machine_pb2.Tool(
            kind=adapter.kind,
            version=info.version,
            models=list(info.models),
            local_only=info.local_only,
            provider=info.provider,
        )  # fmt: skip
        for adapter, info in detected.values()
        if info is not None
    ]
    request = enrollment_pb2.EnrollAgentRequest(
        token=token,
        worker_id=(worker or "").removeprefix("workers/"),
        hostname=socket.gethostname(),
        display_name=display_name,
        agent_version=__version__,
        platform=platform_name(),
        tools=tools,
        request_id=str(uuid.uuid4()),
    )
    async with _channel(server, tls, tls_ca_file) as channel:
        stub = enrollment_grpc.EnrollmentServiceStub(channel)
        try:
            reply = await stub.EnrollAgent(request, timeout=_RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise EnrollError(f"{server} refused the enrollment: {exc.code().name}: {exc.details()}") from None
    enabled = [name for name, (_adapter, info) in detected.items() if info is not None]
    _save(reply, server, enabled, config_file, credential_file, tls, tls_ca_file)
    return Enrolled(reply.worker.name, credential_file, config_file, enabled)


def _save(
    reply: enrollment_pb2.EnrollAgentResponse,
    server: str,
    enabled: list[str],
    config_file: Path,
    credential_file: Path,
    tls: bool,
    tls_ca_file: Path | None,
) -> None:
    _write_private(credential_file, reply.agent_credential + "\n")
    config: dict[str, Any] = {}
    if config_file.exists():
        loaded = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        config = loaded if isinstance(loaded, dict) else {}
    config.pop("credential", None)
    config.update(
        server=server,
        worker=reply.worker.name,
        credential_file=str(credential_file),
        tools=list(dict.fromkeys([*config.get("tools", []), *enabled])),
    )
    if tls:
        config["tls"] = True
        if tls_ca_file is not None:
            config["tls_ca_file"] = str(tls_ca_file)
    _write_private(config_file, yaml.safe_dump(config, sort_keys=False))


# --- doctor --------------------------------------------------------------------------------------------


def _table(out: TextIO, title: str, header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    out.write(f"\n{title}\n")
    for row in [header, *rows]:
        out.write("  " + "  ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(row)).rstrip() + "\n")


async def check_server(
    server: str, tls: bool, ca_file: Path | None, credential: str | None
) -> tuple[str, str, str, str]:
    """(connectivity status, detail, credential status, detail)."""
    started = time.monotonic()
    async with _channel(server, tls, ca_file) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), 5)
        except TimeoutError:
            return "FAIL", f"{server} did not answer within 5 s", "UNKNOWN", "server unreachable"
        reach = f"{server} answers (gRPC channel ready in {1000 * (time.monotonic() - started):.0f} ms)"
        if not credential:
            return "ok", reach, "FAIL", "no credential configured (run `maw-agent enroll`)"
        stub = agent_grpc.AgentServiceStub(channel)
        call = stub.Connect(metadata=(("authorization", f"Bearer {credential}"),), timeout=10)
        hello = agent_pb2.Hello(worker=_PROBE_WORKER, protocol_version=1, agent_version=__version__, capacity_slots=1)
        try:
            await call.write(agent_pb2.ConnectRequest(hello=hello))
            reply = await call.read()
        except grpc.aio.AioRpcError as exc:
            return "ok", reach, *_credential_verdict(exc.code(), exc.details() or "")
        if reply is grpc.aio.EOF:
            return "ok", reach, *_credential_verdict(await call.code(), await call.details() or "")
        call.cancel()
        return "ok", reach, "ok", "accepted"


def _credential_verdict(code: grpc.StatusCode, details: str) -> tuple[str, str]:
    if code == grpc.StatusCode.PERMISSION_DENIED and "speaks for" in details:
        worker = details.split("speaks for", 1)[1].split(",", maxsplit=1)[0].strip()
        return "ok", f"valid, for {worker}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return "FAIL", f"not accepted: {details or 'unknown credential'}"
    return "FAIL", f"{code.name}: {details}"


async def doctor(config: AgentConfig | None, out: TextIO, *, server: str | None = None) -> int:
    """Print the doctor's report; 0 when the agent can run (server reachable, credential valid)."""
    out.write(f"maw-agent {__version__} doctor\n")
    detected = await detect_tools(dict(config.tool_settings) if config is not None else None)
    enabled = set(config.tools) if config is not None else set()
    rows = []
    for name, (adapter, info) in detected.items():
        kind = machine_pb2.ToolKind.Name(adapter.kind).removeprefix("TOOL_KIND_").lower()
        if info is None:
            rows.append((name, kind, "missing", "-", "-", "not found on this machine"))
            continue
        note = "enabled" if name in enabled else "installed, not enabled (add it to `tools:`)"
        models = f"; models: {', '.join(info.models)}" if info.models else ""
        rows.append((name, kind, "ok", info.version or "?", info.provider, note + models))
    _table(out, "TOOLS", ("tool", "kind", "status", "version", "provider", "notes"), rows)

    work_dir = config.work_dir if config is not None else Path.home()
    memory = psutil.virtual_memory()
    resources = [
        ("cpu", f"{psutil.cpu_count() or 0} cores, {psutil.cpu_percent(interval=0.1):.0f}% busy"),
        ("memory", f"{_gib(memory.total - memory.available)} used of {_gib(memory.total)}"),
    ]
    probe = work_dir if work_dir.exists() else Path.home()
    disk = psutil.disk_usage(str(probe))
    resources.append(("disk", f"{_gib(disk.free)} free of {_gib(disk.total)} at {probe}"))
    if hasattr(os, "getloadavg"):
        resources.append(("load", " ".join(f"{value:.2f}" for value in os.getloadavg())))
    resources.append(("gpus", "NVIDIA (NVML)" if load_nvml() is not None else "none found (NVML not available)"))
    _table(out, "RESOURCES", ("resource", "value"), resources)

    problem = await asyncio.to_thread(bwrap_problem)
    mode = config.sandbox if config is not None else "none"
    sandbox_rows = [("mode", mode), ("bubblewrap", "usable" if problem is None else problem)]
    if mode == "none":
        sandbox_rows.append(("advice", "sandbox: bwrap is recommended (docs/sandbox.md)"))
    _table(out, "SANDBOX", ("item", "value"), sandbox_rows)

    target = server or (config.server if config is not None else None)
    status = 0
    if target is None:
        checks = [("server", "FAIL", "no server configured"), ("credential", "FAIL", "no configuration")]
        status = 1
    else:
        credential = None
        if config is not None:
            try:
                credential = config.read_credential()
            except ValueError as exc:
                credential = None
                out.write(f"\n{exc}\n")
        tls = config.tls if config is not None else False
        ca = config.tls_ca_file if config is not None else None
        reach, reach_detail, cred, cred_detail = await check_server(target, tls, ca, credential)
        checks = [("server", reach, reach_detail), ("credential", cred, cred_detail)]
        status = 0 if reach == "ok" and cred == "ok" else 1
    _table(out, "CONNECTION", ("check", "status", "detail"), checks)
    out.write("\n" + ("ready to run" if status == 0 else "NOT ready: see FAIL above") + "\n")
    return status


def _gib(value: float) -> str:
    return f"{value / (1 << 30):.1f} GiB"
