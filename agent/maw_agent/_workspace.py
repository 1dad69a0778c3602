"""Git workspaces: a cached clone per repository, a `git worktree` per assignment, the change as a Diff.

`Workspaces.prepare()` fetches the repository into a bare cache (`work_dir/git-cache/<hash>.git`, one
fetch at a time per repository), adds a detached worktree at the assignment's ref, applies the
dependencies' diffs (and a correction's previous diff) in order, and records the tree the tool starts
from. `Workspace.diff()` snapshots the worktree after the tool (every file not ignored, whatever the
tool staged or committed) and returns `git diff` of the two trees as a `maw.common.v1.Diff`, cut at the
size limit.

The agent's own git commands never read the worktree's `.git` file or any configuration the tool could
have written: they name the git dir, the common dir and the work tree explicitly, ignore global and
system configuration, and turn hooks and fsmonitor off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from maw.agent.v1 import agent_service_pb2 as agent_pb2
from maw.common.v1 import work_pb2

__all__ = ["Workspace", "WorkspaceError", "Workspaces"]

log = logging.getLogger(__name__)

_GIT_OPTIONS = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "protocol.ext.allow=never")
_IDENTITY = {
    "GIT_AUTHOR_NAME": "maw-agent",
    "GIT_AUTHOR_EMAIL": "maw-agent@localhost",
    "GIT_COMMITTER_NAME": "maw-agent",
    "GIT_COMMITTER_EMAIL": "maw-agent@localhost",
}
_READ_SIZE = 64 << 10
_ERROR_TAIL = 2000
_SCHEMES = re.compile(r"^(https?|ssh|git|file)://|^[A-Za-z0-9_.-]+@[A-Za-z0-9_.-]+:|^/")


_Note = Callable[[str], None]


class WorkspaceError(Exception):
    """The workspace cannot be prepared; the message says why, for the Result's error message."""


@dataclass
class _GitResult:
    code: int
    stdout: bytes
    stderr: bytes


class Workspaces:
    """The agent's git cache and the worktrees made from it."""

    def __init__(self, cache_root: Path, *, git: str = "git", timeout_s: float = 600.0) -> None:
        self.cache_root = cache_root
        self.git = git
        self.timeout_s = timeout_s
        self._locks: dict[str, asyncio.Lock] = {}

    @staticmethod
    def problem(workspace: work_pb2.GitWorkspace) -> str | None:
        """Why this workspace cannot be used (the assignment is declined), or None."""
        if shutil.which("git") is None:
            return "git is not installed on this worker"
        repository = workspace.repository
        if repository.startswith("-") or not _SCHEMES.match(repository):
            return "workspace.repository must be an https, ssh, git or file URL, or an absolute path"
        if workspace.ref.startswith("-") or any(c in workspace.ref for c in " \t\n\0"):
            return "workspace.ref is not a valid git ref"
        sub = Path(workspace.subdirectory)
        if workspace.subdirectory and (sub.is_absolute() or ".." in sub.parts):
            return "workspace.subdirectory must be a relative path inside the repository"
        return None

    def cache_for(self, repository: str) -> Path:
        """The bare clone that caches `repository`."""
        return self.cache_root / (hashlib.sha256(repository.encode()).hexdigest()[:24] + ".git")

    async def prepare(
        self, assignment: agent_pb2.Assignment, path: Path, env: Mapping[str, str], note: _Note
    ) -> Workspace:
        """A worktree for the assignment at `path`, dependencies applied."""
        spec = assignment.workspace
        cache = self.cache_for(spec.repository)
        git_env = _git_env(env, hardened=False)
        lock = self._locks.setdefault(str(cache), asyncio.Lock())
        async with lock:
            await self._fetch(spec.repository, cache, git_env, note)
            commit = await self._resolve(cache, spec.ref, git_env)
            name = path.name
            admin = cache / "worktrees" / name
            if await asyncio.to_thread(lambda: admin.exists() or path.exists()):
                await _git(self.git, ["worktree", "remove", "--force", str(path)], cache, git_env, check=False)
                shutil.rmtree(admin, ignore_errors=True)
                shutil.rmtree(path, ignore_errors=True)
                await _git(self.git, ["worktree", "prune"], cache, git_env, check=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            await _git(self.git, ["worktree", "add", "--detach", "--quiet", str(path), commit], cache, git_env)
        workspace = Workspace(self.git, cache, admin, path, commit, _git_env(env, hardened=True))
        patches: list[tuple[str, work_pb2.Diff]] = [
            (dep.key or dep.subtask, dep.diff) for dep in assignment.context.dependencies if dep.diff.unified_diff
        ]
        if assignment.HasField("correction") and assignment.correction.previous_diff.unified_diff:
            patches.append(("the change being corrected", assignment.correction.previous_diff))
        for label, diff in patches:
            if diff.truncated:
                raise WorkspaceError(f"cannot apply the diff of {label}: it was truncated at the size limit")
            await workspace.apply(label, diff.unified_diff)
            note(f"applied the diff of {label} ({len(diff.files)} file(s))")
        workspace.base_tree = await workspace.snapshot()
        sub = spec.subdirectory
        workspace.cwd = path / sub if sub else path
        if not workspace.cwd.is_dir():
            raise WorkspaceError(f"workspace.subdirectory {sub!r} does not exist at {commit[:12]}")
        return workspace

    async def _fetch(self, repository: str, cache: Path, env: Mapping[str, str], note: _Note) -> None:
        if not (cache / "HEAD").exists():
            note(f"cloning {repository}")
            self.cache_root.mkdir(parents=True, exist_ok=True)
            partial = cache.with_suffix(".partial")
            shutil.rmtree(partial, ignore_errors=True)
            result = await _git(
                self.git, ["clone", "--bare", "--quiet", "--", repository, str(partial)], self.cache_root, env,
                check=False, limit_s=self.timeout_s,
            )  # fmt: skip
            if result.code != 0:
                shutil.rmtree(partial, ignore_errors=True)
                raise WorkspaceError(f"cannot clone {repository}: {_tail(result.stderr)}")
            partial.rename(cache)
            return
        note(f"fetching {repository}")
        refspecs = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"]
        result = await _git(
            self.git, ["fetch", "--quiet", "--prune", "--", repository, *refspecs], cache, env,
            check=False, limit_s=self.timeout_s,
        )  # fmt: skip
        if result.code != 0:
            raise WorkspaceError(f"cannot fetch {repository}: {_tail(result.stderr)}")

    async def _resolve(self, cache: Path, ref: str, env: Mapping[str, str]) -> str:
        wanted = ref or "HEAD"
        verify = ["rev-parse", "--verify", "--quiet", f"{wanted}^{{commit}}"]
        result = await _git(self.git, verify, cache, env, check=False)
        if result.code != 0:
            raise WorkspaceError(f"workspace.ref {wanted!r} is not a branch, tag or commit of the repository")
        return result.stdout.decode().strip()

    async def release(self, workspace: Workspace | None, path: Path) -> None:
        """Remove the worktree (and its directory)."""
        cache = workspace.cache if workspace is not None else None
        if cache is not None and cache.exists():
            env = workspace.env if workspace is not None else _git_env(os.environ, hardened=True)
            await _git(self.git, ["worktree", "remove", "--force", str(path)], cache, env, check=False)
            await _git(self.git, ["worktree", "prune"], cache, env, check=False)
        shutil.rmtree(path, ignore_errors=True)


class Workspace:
    """One assignment's worktree."""

    def __init__(self, git: str, cache: Path, admin: Path, path: Path, commit: str, env: Mapping[str, str]) -> None:
        self.git = git
        self.cache = cache
        self.admin = admin
        self.path = path
        self.cwd = path
        self.base_commit = commit
        self.base_tree = ""
        # Explicit repository layout: never the .git file or config the tool could have rewritten.
        self.env = {
            **env,
            "GIT_DIR": str(admin),
            "GIT_COMMON_DIR": str(cache),
            "GIT_WORK_TREE": str(path),
        }

    @property
    def writable(self) -> list[Path]:
        """What a sandboxed tool must be able to write: the worktree and its admin dir."""
        return [self.path, self.admin]

    @property
    def readable(self) -> list[Path]:
        """What a sandboxed tool must be able to read besides the host's read-only root: the cache."""
        return [self.cache]

    async def apply(self, label: str, unified_diff: str) -> None:
        """Apply one unified diff to the work tree."""
        with tempfile.NamedTemporaryFile("w", suffix=".diff", delete=False, encoding="utf-8") as patch:
            patch.write(unified_diff if unified_diff.endswith("\n") else unified_diff + "\n")
        try:
            result = await _git(
                self.git, ["apply", "--binary", "--whitespace=nowarn", patch.name], self.path, self.env, check=False
            )
        finally:
            os.unlink(patch.name)
        if result.code != 0:
            raise WorkspaceError(f"cannot apply the diff of {label}: {_tail(result.stderr)}")

    async def snapshot(self) -> str:
        """The tree of every file in the work tree that is not ignored, as git stores it."""
        with tempfile.TemporaryDirectory(prefix="maw-index-") as scratch:
            env = {**self.env, "GIT_INDEX_FILE": str(Path(scratch) / "index")}
            await _git(self.git, ["add", "--all"], self.path, env)
            result = await _git(self.git, ["write-tree"], self.path, env)
        return result.stdout.decode().strip()

    async def diff(self, max_bytes: int) -> tuple[work_pb2.Diff, str]:
        """The change since the tool started, cut at `max_bytes`, and a one-line description."""
        after = await self.snapshot()
        diff = work_pb2.Diff(base_commit=self.base_commit)
        if after == self.base_tree:
            return diff, "no change"
        common = ["diff-tree", "-r", "--find-renames", "--no-ext-diff", "--no-color"]
        status = await _git(self.git, [*common, "--name-status", "-z", self.base_tree, after], self.path, self.env)
        numstat = await _git(self.git, [*common, "--numstat", "-z", self.base_tree, after], self.path, self.env)
        diff.files.extend(_files(status.stdout, numstat.stdout))
        text, size = await _capped_output(
            self.git, [*common, "-p", "--binary", "--full-index", self.base_tree, after], self.path, self.env, max_bytes
        )
        diff.size_bytes = size
        diff.truncated = size > len(text)
        diff.unified_diff = text.decode("utf-8", errors="replace")
        added = sum(f.additions for f in diff.files)
        removed = sum(f.deletions for f in diff.files)
        line = f"{len(diff.files)} file(s) changed, +{added} -{removed}"
        if diff.truncated:
            line += f"; diff of {size} bytes cut at {len(text)} (max_diff_bytes)"
        return diff, line


def _files(name_status: bytes, numstat: bytes) -> list[work_pb2.FileChange]:
    """FileChanges from `--name-status -z` and `--numstat -z` of the same diff."""
    changes: list[work_pb2.FileChange] = []
    fields = name_status.split(b"\0")
    index = 0
    while index < len(fields) and fields[index]:
        code = fields[index].decode()
        if code[0] in "RC":
            old, new = fields[index + 1].decode(errors="replace"), fields[index + 2].decode(errors="replace")
            kind = work_pb2.CHANGE_TYPE_RENAMED if code[0] == "R" else work_pb2.CHANGE_TYPE_ADDED
            changes.append(work_pb2.FileChange(path=new, old_path=old if code[0] == "R" else "", change_type=kind))
            index += 3
            continue
        kind = {"A": work_pb2.CHANGE_TYPE_ADDED, "D": work_pb2.CHANGE_TYPE_DELETED}.get(
            code[0], work_pb2.CHANGE_TYPE_MODIFIED
        )
        changes.append(work_pb2.FileChange(path=fields[index + 1].decode(errors="replace"), change_type=kind))
        index += 2
    by_path = {change.path: change for change in changes}
    fields = numstat.split(b"\0")
    index = 0
    while index < len(fields) and fields[index]:
        added, removed, path = fields[index].decode(errors="replace").split("\t", 2)
        if path:  # plain entry: "added\tremoved\tpath"
            index += 1
        else:  # rename: "added\tremoved\t" then old path, new path
            path = fields[index + 2].decode(errors="replace")
            index += 3
        change = by_path.get(path)
        if change is None:
            continue
        if added == "-":
            change.binary = True
        else:
            change.additions, change.deletions = int(added), int(removed)
    return changes


def _git_env(source: Mapping[str, str], *, hardened: bool) -> dict[str, str]:
    """The environment of the agent's git commands.

    Clone and fetch may use the user's git configuration (credential helpers, proxies); commands on a
    worktree the tool has touched use no configuration but the repository's own.
    """
    env = {name: source[name] for name in ("PATH", "LANG", "LC_ALL", "HOME", "SSH_AUTH_SOCK") if name in source}
    env.update(_IDENTITY)
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GIT_ALLOW_PROTOCOL"] = "file:git:http:https:ssh"
    if hardened:
        env["GIT_CONFIG_NOSYSTEM"] = "1"
        env["GIT_CONFIG_GLOBAL"] = os.devnull
    return env


async def _git(
    git: str,
    args: Sequence[str],
    cwd: Path,
    env: Mapping[str, str],
    *,
    check: bool = True,
    limit_s: float = 120.0,
) -> _GitResult:
    process = await asyncio.create_subprocess_exec(
        git, *_GIT_OPTIONS, *args, cwd=cwd, env=dict(env),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), limit_s)
    except (asyncio.CancelledError, TimeoutError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        await process.wait()
        raise
    result = _GitResult(process.returncode or 0, stdout, stderr)
    if check and result.code != 0:
        raise WorkspaceError(f"git {args[0]} failed: {_tail(stderr)}")
    return result


async def _capped_output(
    git: str, args: Sequence[str], cwd: Path, env: Mapping[str, str], limit: int
) -> tuple[bytes, int]:
    """The first `limit` bytes of a git command's output (cut at a line end) and the output's full size."""
    process = await asyncio.create_subprocess_exec(
        git, *_GIT_OPTIONS, *args, cwd=cwd, env=dict(env),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    kept = bytearray()
    size = 0
    try:
        while chunk := await process.stdout.read(_READ_SIZE):
            size += len(chunk)
            if len(kept) < limit:
                kept += chunk[: limit - len(kept)]
        await process.wait()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        raise
    if process.returncode != 0:
        raise WorkspaceError(f"git {args[0]} failed with exit code {process.returncode}")
    if size > len(kept):
        cut = kept.rfind(b"\n")
        del kept[cut + 1 if cut >= 0 else 0 :]
    return bytes(kept), size


def _tail(stderr: bytes) -> str:
    text = stderr.decode("utf-8", errors="replace").strip()
    return text[-_ERROR_TAIL:] or "no error output"
