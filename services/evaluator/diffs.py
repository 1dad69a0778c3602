"""Reading a unified diff into the changed files a scorer looks at (pure; no I/O)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_HUNK = re.compile(r"^@@ -\d+(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


@dataclass
class ChangedFile:
    """One file of a diff as the scorers see it.

    ``added`` holds each added line with its line number in the new file. ``content`` is the whole new
    file when the diff holds all of it (a file the change created), else None: scorers that need a
    complete file (a parser, a linter) must not guess the lines the diff does not show.
    """

    path: str
    created: bool = False
    deleted: bool = False
    added: list[tuple[int, str]] = field(default_factory=list)
    removed: int = 0

    @property
    def content(self) -> str | None:
        """The new file's full text, when the diff created it."""
        if not self.created:
            return None
        return "".join(text + "\n" for _, text in self.added)


def _path(raw: str) -> str:
    raw = raw.split("\t", 1)[0].strip()
    if raw.startswith(("a/", "b/")):
        return raw[2:]
    return raw


def parse_diff(text: str) -> list[ChangedFile]:
    """The files of a unified (git-style) diff, in order; unknown lines are skipped, never fatal."""
    files: list[ChangedFile] = []
    current: ChangedFile | None = None
    old_path = ""
    line_no = 0
    old_left = new_left = 0
    for line in text.splitlines():
        in_hunk = old_left > 0 or new_left > 0
        if line.startswith("diff --git ") and not in_hunk:
            current = None
            continue
        if line.startswith("--- ") and not in_hunk:
            old_path = line[4:]
            continue
        if line.startswith("+++ ") and not in_hunk:
            new_raw = line[4:]
            deleted = new_raw.strip() == "/dev/null"
            current = ChangedFile(
                path=_path(old_path if deleted else new_raw),
                created=old_path.strip() == "/dev/null",
                deleted=deleted,
            )
            files.append(current)
            continue
        match = _HUNK.match(line) if not in_hunk else None
        if match and current is not None:
            old_left = int(match.group(1) or 1)
            line_no = int(match.group(2))
            new_left = int(match.group(3) or 1)
            continue
        if current is None or not in_hunk:
            continue
        if line.startswith("+"):
            current.added.append((line_no, line[1:]))
            line_no += 1
            new_left -= 1
        elif line.startswith("-"):
            current.removed += 1
            old_left -= 1
        elif line.startswith(" ") or line == "":
            line_no += 1
            old_left -= 1
            new_left -= 1
    return files


__all__ = ["ChangedFile", "parse_diff"]
