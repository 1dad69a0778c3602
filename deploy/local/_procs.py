"""Child processes that cannot outlive their supervisor."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

_log = logging.getLogger("maw.stack")
_PR_SET_PDEATHSIG = 1
# Loaded before any fork: the child may only make the one prctl call between fork and exec.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


# util-linux's setpriv arms the parent-death signal in the child itself, before it execs the command, so no
# Python code runs between fork and exec: forking this many-threaded process (gRPC, SQLAlchemy pools) with a
# preexec_fn sometimes crashed the child (SIGSEGV) before exec. Without setpriv, the preexec_fn is the fallback.
_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


def _die_with_parent(sig: int) -> None:
    # Linux: the kernel signals the child when the supervisor dies, even by kill -9, so nothing is
    # orphaned. Elsewhere this is a no-op and the supervisor's own stop() is the only cleanup.
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, sig)


def _dying_with_parent(argv: Sequence[str], sig: int) -> tuple[list[str], Callable[[], None] | None]:
    """``argv`` and the preexec_fn that make the child get ``sig`` when its supervisor dies."""
    if _SETPRIV is not None:
        return [_SETPRIV, "--pdeathsig", signal.Signals(sig).name, "--", *argv], None
    return list(argv), lambda: _die_with_parent(sig)


class Child:
    """One supervised process: its own session, output copied to a log file (and maybe the terminal)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        *,
        echo: bool = False,
        stop_signal: int = signal.SIGTERM,
        death_signal: int = signal.SIGTERM,
        user: str | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.stop_signal = stop_signal
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log_file = log_path.open("ab")
        command, preexec = _dying_with_parent(argv, death_signal)
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=preexec,  # noqa: PLW1509 (None with setpriv)
            user=user,
            group=user,
            extra_groups=[] if user else None,  # see stack._groups
        )
        self._pump = threading.Thread(target=self._copy, args=(self.proc.stdout, echo), daemon=True)
        self._pump.start()

    def _copy(self, stream: IO[bytes] | None, echo: bool) -> None:
        assert stream is not None
        prefix = f"{self.name:>10} | ".encode()
        for line in iter(stream.readline, b""):
            self._log_file.write(line)
            self._log_file.flush()
            if echo:
                sys.stderr.buffer.write(prefix + line)
                sys.stderr.buffer.flush()

    @property
    def pid(self) -> int:
        """Process id of the child."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the child is still running."""
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child's whole process group."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> int | None:
        """kill -9 the child's process group and reap it (as a crash would, minus the zombie)."""
        self.signal(signal.SIGKILL)
        return self.stop(timeout=5.0)

    def stop(self, timeout: float = 15.0) -> int | None:
        """Ask the child to stop, then kill its process group if it does not within ``timeout``."""
        if self.alive():
            self.signal(self.stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _log.warning("%s did not stop in %.0fs; killing it", self.name, timeout)
                self.signal(signal.SIGKILL)
                self.proc.wait(5)
        # Anything the child left in its group (grandchildren) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._pump.join(timeout=2)
        self._log_file.close()
        return self.proc.returncode

    def tail(self, lines: int = 30) -> str:
        """The last lines of the child's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
