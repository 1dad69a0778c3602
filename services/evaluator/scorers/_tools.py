"""Running a checker on the complete files of a change, in a throw-away directory."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path, PurePosixPath

from ..diffs import ChangedFile


def safe_relative(path: str) -> PurePosixPath | None:
    """``path`` as a relative path that stays inside a directory, or None."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        return None
    return pure


def run_on_files(files: list[ChangedFile], argv_tail: list[str], timeout_s: float = 60.0) -> tuple[str, Path, int]:
    """Write the files' contents under a temporary directory and run ``python -m <argv_tail>`` there.

    Returns (stdout, the directory it ran in — already deleted, exit code). The child gets no
    environment beyond PATH, so nothing of the service's own (credentials) reaches the checker.
    """
    with tempfile.TemporaryDirectory(prefix="maw-score-") as tmp:
        root = Path(tmp)
        for f in files:
            rel = safe_relative(f.path)
            if rel is None or f.content is None:
                continue
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f.content)
        proc = subprocess.run(
            [sys.executable, "-m", *argv_tail],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={"PATH": "/usr/bin:/bin"},
            check=False,
        )
        return proc.stdout, root, proc.returncode
