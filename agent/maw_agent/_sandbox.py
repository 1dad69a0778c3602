"""The sandbox a tool process runs in: rlimits always, bubblewrap when configured (docs/sandbox.md).

Every tool process gets, on top of the runtime's fresh directory, scrubbed environment and own process
group:

- rlimits set in the child before exec: CPU seconds (RLIMIT_CPU: SIGXCPU, then SIGKILL), address space
  (RLIMIT_AS: allocations beyond it fail), file size (RLIMIT_FSIZE: SIGXFSZ / EFBIG) and processes
  (RLIMIT_NPROC, which the kernel counts per user and does not enforce for root);
- with `sandbox: bwrap`, a bubblewrap container: the host filesystem read-only, a private /tmp, the
  agent's work dir replaced by an empty tmpfs except the assignment's own directory (read-write) and
  the git cache it needs, the agent's credential and configuration files replaced by /dev/null, and
  new user, PID, IPC, UTS and cgroup namespaces (the network is shared unless `sandbox_network: false`:
  cloud AI tools need it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from maw.common.v1 import work_pb2

from maw_agent.config import AgentConfig

__all__ = ["Limits", "Sandbox", "bwrap_problem", "ensure_sandbox", "limits_of", "sandbox_of"]

log = logging.getLogger("maw_agent")


@dataclass(frozen=True)
class Limits:
    """Operating-system limits of one tool process tree; 0 means unlimited."""

    cpu_s: int = 0
    memory_bytes: int = 0
    file_size_bytes: int = 0
    max_processes: int = 0

    def merged(self, limits: work_pb2.ResourceLimits) -> Limits:
        """The assignment's limits where it sets them, these (the agent's defaults) elsewhere."""
        cpu = limits.cpu_time.seconds + (1 if limits.cpu_time.nanos else 0)
        return Limits(
            cpu_s=cpu or self.cpu_s,
            memory_bytes=limits.memory_bytes or self.memory_bytes,
            file_size_bytes=limits.file_size_bytes or self.file_size_bytes,
            max_processes=limits.max_processes or self.max_processes,
        )

    def preexec(self) -> Callable[[], None] | None:
        """A function that applies these limits in the child before exec (None: nothing to apply)."""
        pairs = [
            (resource.RLIMIT_CPU, self.cpu_s),
            (resource.RLIMIT_AS, self.memory_bytes),
            (resource.RLIMIT_FSIZE, self.file_size_bytes),
            (resource.RLIMIT_NPROC, self.max_processes),
        ]
        wanted = [(which, value) for which, value in pairs if value > 0]
        if not wanted:
            return None

        def apply() -> None:
            # Runs between fork and exec: only the setrlimit system call, nothing that takes a lock.
            for which, value in wanted:
                _soft, hard = resource.getrlimit(which)
                cap = value if hard == resource.RLIM_INFINITY else min(value, hard)
                resource.setrlimit(which, (cap, cap))

        return apply


@dataclass(frozen=True)
class Sandbox:
    """How tool processes are confined on this agent."""

    mode: str = "none"  # "none" (rlimits only) or "bwrap"
    bwrap: str = "bwrap"
    network: bool = True
    private_dirs: tuple[Path, ...] = ()  # replaced by an empty tmpfs (the agent's work dir)
    hidden_files: tuple[Path, ...] = ()  # replaced by /dev/null (credential, configuration)

    def wrap(
        self, argv: Sequence[str], *, cwd: Path | None, writable: Sequence[Path], readable: Sequence[Path] = ()
    ) -> list[str]:
        """argv as it must be started: unchanged, or inside bubblewrap."""
        if self.mode != "bwrap":
            return list(argv)
        args = [self.bwrap, "--die-with-parent", "--unshare-all"]
        if self.network:
            args.append("--share-net")
        args += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]  # noqa: S108
        for software in _software_under_tmp(argv):
            args += ["--ro-bind", software, software]
        for directory in self.private_dirs:
            if directory.is_dir():
                args += ["--tmpfs", str(directory.resolve())]
        for file in self.hidden_files:
            if file.exists() and not any(_within(file, d) for d in self.private_dirs):
                args += ["--ro-bind", "/dev/null", str(file.resolve())]
        for path in readable:
            args += ["--ro-bind", str(path.resolve()), str(path.resolve())]
        for path in writable:
            args += ["--bind", str(path.resolve()), str(path.resolve())]
        if cwd is not None:
            args += ["--chdir", str(cwd.resolve())]
        return [*args, "--", *argv]


def sandbox_of(config: AgentConfig) -> Sandbox:
    """The sandbox the configuration asks for: what the tools must never see, what they may write."""
    hidden = [*config.sandbox_hide]
    if config.credential_file is not None:
        hidden.append(config.credential_file)
    return Sandbox(
        mode=config.sandbox,
        network=config.sandbox_network,
        private_dirs=(config.work_dir,),
        hidden_files=tuple(hidden),
    )


def limits_of(config: AgentConfig) -> Limits:
    """The agent's default limits of every tool process, from the configuration."""
    return Limits(**config.limits.model_dump())


async def ensure_sandbox(mode: str) -> None:
    """Check at start that the sandbox configured can be used; RuntimeError when bwrap is asked for but unusable."""
    if mode == "bwrap":
        problem = await asyncio.to_thread(bwrap_problem)
        if problem is not None:
            raise RuntimeError(f"sandbox: bwrap is configured but unusable: {problem}")
        log.info("tools run in a bubblewrap sandbox")
    else:
        log.info("sandbox: none - tools run with rlimits only; sandbox: bwrap is recommended (docs/sandbox.md)")


def _software_under_tmp(argv: Sequence[str]) -> list[str]:
    """Programs living under /tmp (a checkout or virtualenv there) that the fresh /tmp would hide.

    The tool's own executable, the agent's PATH and this Python installation are put back read-only;
    the agent's private directories are hidden again afterwards, so nothing secret comes back with them.
    """
    tmp = Path("/tmp").resolve()  # noqa: S108
    candidates = [Path(sys.prefix), Path(sys.base_prefix), Path(os.path.realpath(sys.executable)).parent]
    candidates += [Path(p) for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    if argv and os.path.isabs(argv[0]):
        candidates.append(Path(os.path.realpath(argv[0])).parent)
    found: list[str] = []
    for candidate in candidates:
        try:
            resolved = candidate.resolve()
        except OSError:
            continue
        if resolved.is_dir() and _within(resolved, tmp) and str(resolved) not in found:
            found.append(str(resolved))
    return found


def bwrap_problem(bwrap: str = "bwrap") -> str | None:
    """Why bubblewrap cannot be used here (not installed, namespaces refused), or None when it works."""
    path = shutil.which(bwrap)
    if path is None:
        return f"{bwrap} is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    probe = [path, "--die-with-parent", "--unshare-all", "--ro-bind", "/", "/", "--dev", "/dev"]
    probe += ["--proc", "/proc", "--", "true"]
    try:
        ran = subprocess.run(probe, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{path} does not run: {exc}"
    if ran.returncode != 0:
        why = ran.stderr.decode(errors="replace").strip() or f"exit code {ran.returncode}"
        return f"{path} cannot create its namespaces here ({why})"
    return None


def _within(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True
