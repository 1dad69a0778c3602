"""Git workspaces: cached clone + worktree per assignment, dependency diffs applied, the change as a Diff.

Real git, the agent's real execution runtime, the stand-in Claude Code (tests/standins/bin/claude) or
the shell tool as the tool.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from maw.agent.v1 import agent_service_pb2 as pb
from maw.common.v1 import work_pb2
from maw_agent._workspace import Workspaces

from tests.standins.harness import Recorder, adapter, execution, run, standins_on_path


def git(cwd: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env}
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A small repository: README.md and src/app.py on main, a branch `other` with one more file."""
    path = tmp_path / "origin"
    (path / "src").mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    (path / "README.md").write_text("# Demo\n")
    (path / "src" / "app.py").write_text("print('hi')\n")
    git(path, "add", ".")
    git(path, "commit", "-q", "-m", "first")
    git(path, "checkout", "-q", "-b", "other")
    (path / "OTHER.md").write_text("other\n")
    git(path, "add", ".")
    git(path, "commit", "-q", "-m", "other")
    git(path, "checkout", "-q", "main")
    return path


def workspace(repo: Path, ref: str = "", subdirectory: str = "") -> pb.Assignment:
    return pb.Assignment(
        workspace=work_pb2.GitWorkspace(repository=str(repo), ref=ref, subdirectory=subdirectory),
        max_diff_bytes=1 << 20,
    )


async def test_claude_in_a_worktree_returns_its_change_as_a_unified_diff(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    standins_on_path(monkeypatch)
    recorder = Recorder()
    result = await run(execution(tmp_path, adapter("claude"), assignment=workspace(repo, "main"), recorder=recorder))
    assert result.outcome == work_pb2.OUTCOME_SUCCEEDED, result.error_message
    diff = result.diff
    assert diff.base_commit == git(repo, "rev-parse", "main")
    assert "diff --git a/feature.py b/feature.py" in diff.unified_diff
    assert "+The feature returns 42." in diff.unified_diff
    files = {f.path: (f.change_type, f.additions, f.deletions) for f in diff.files}
    assert files == {
        "feature.py": (work_pb2.CHANGE_TYPE_ADDED, 3, 0),
        "README.md": (work_pb2.CHANGE_TYPE_MODIFIED, 2, 0),
    }
    assert diff.size_bytes == len(diff.unified_diff.encode()) and not diff.truncated
    assert result.summary == "Added feature() in feature.py; it returns 42."
    assert b"workspace change: 2 file(s) changed, +5 -0" in recorder.stream(work_pb2.LOG_STREAM_AGENT)
    # The diff applies to the base commit as it is.
    check = tmp_path / "check"
    git(tmp_path, "clone", "-q", str(repo), str(check))
    (tmp_path / "change.diff").write_text(diff.unified_diff)
    git(check, "apply", "--check", str(tmp_path / "change.diff"))
    # The worktree is gone, the cache stays for the next assignment.
    assert not list((tmp_path / "work" / "workspaces").iterdir())
    (cache,) = (tmp_path / "work" / "git-cache").glob("*.git")
    assert git(cache, "worktree", "list").splitlines() == [f"{cache}  (bare)"]


async def test_dependency_diffs_are_applied_first_and_left_out_of_the_result(tmp_path: Path, repo: Path) -> None:
    dep = pb.Assignment()
    dep_diff = (
        "diff --git a/dep.txt b/dep.txt\nnew file mode 100644\n--- /dev/null\n+++ b/dep.txt\n@@ -0,0 +1 @@\n+from dep\n"
    )
    dep.context.dependencies.add(key="generate-code", diff=work_pb2.Diff(unified_diff=dep_diff))
    dep.MergeFrom(workspace(repo))
    result = await run(
        execution(
            tmp_path, adapter("shell"), options={"command": "cat dep.txt > copy.txt; rm src/app.py"}, assignment=dep
        )
    )
    assert result.outcome == work_pb2.OUTCOME_SUCCEEDED, result.error_message
    files = {f.path: f.change_type for f in result.diff.files}
    assert files == {"copy.txt": work_pb2.CHANGE_TYPE_ADDED, "src/app.py": work_pb2.CHANGE_TYPE_DELETED}
    assert "+from dep" in result.diff.unified_diff and "dep.txt b/dep.txt" not in result.diff.unified_diff


async def test_a_diff_beyond_max_diff_bytes_is_cut_but_lists_every_file(tmp_path: Path, repo: Path) -> None:
    command = "for i in $(seq 1 20); do seq 1 500 > file$i.txt; done"
    assignment = workspace(repo)
    assignment.max_diff_bytes = 4096
    result = await run(execution(tmp_path, adapter("shell"), options={"command": command}, assignment=assignment))
    diff = result.diff
    assert result.outcome == work_pb2.OUTCOME_SUCCEEDED
    assert diff.truncated and diff.size_bytes > 4096 >= len(diff.unified_diff.encode())
    assert diff.unified_diff.endswith("\n")
    assert len(diff.files) == 20 and all(f.additions == 500 for f in diff.files)


async def test_a_branch_ref_and_a_subdirectory_are_honoured(tmp_path: Path, repo: Path) -> None:
    result = await run(
        execution(
            tmp_path,
            adapter("shell"),
            options={"command": "ls ../OTHER.md && pwd && echo x >> app.py"},
            assignment=workspace(repo, "other", "src"),
            recorder=(recorder := Recorder()),
        )  # fmt: skip
    )
    assert result.outcome == work_pb2.OUTCOME_SUCCEEDED, result.error_message
    assert recorder.stdout().decode().splitlines()[1].endswith("/src")
    assert result.diff.base_commit == git(repo, "rev-parse", "other")
    assert [f.path for f in result.diff.files] == ["src/app.py"]


async def test_the_cache_is_fetched_again_so_new_commits_are_seen(tmp_path: Path, repo: Path) -> None:
    first = await run(execution(tmp_path, adapter("shell"), options={"command": "true"}, assignment=workspace(repo)))
    (repo / "NEW.md").write_text("new\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "new")
    second = await run(
        execution(tmp_path, adapter("shell"), options={"command": "cat NEW.md"}, assignment=workspace(repo))
    )
    assert first.diff.base_commit != second.diff.base_commit == git(repo, "rev-parse", "HEAD")
    assert second.outcome == work_pb2.OUTCOME_SUCCEEDED
    assert second.summary == "command succeeded" and not second.diff.files


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"ref": "no-such-branch"}, "workspace.ref 'no-such-branch' is not a branch"),
        ({"repository": "/nonexistent/repo"}, "cannot clone /nonexistent/repo"),
        ({"subdirectory": "missing"}, "workspace.subdirectory 'missing' does not exist"),
    ],
)
async def test_a_workspace_that_cannot_be_prepared_fails_with_a_clear_error(
    tmp_path: Path, repo: Path, spec: dict[str, str], message: str
) -> None:
    assignment = workspace(repo)
    for key, value in spec.items():
        setattr(assignment.workspace, key, value)
    result = await run(execution(tmp_path, adapter("shell"), options={"command": "true"}, assignment=assignment))
    assert result.outcome == work_pb2.OUTCOME_FAILED
    assert message in result.error_message
    assert result.error_message.startswith("workspace: ")


async def test_a_truncated_dependency_diff_is_refused_rather_than_half_applied(tmp_path: Path, repo: Path) -> None:
    assignment = workspace(repo)
    assignment.context.dependencies.add(
        key="gen", diff=work_pb2.Diff(unified_diff="diff --git a/x b/x\n", truncated=True)
    )
    result = await run(execution(tmp_path, adapter("shell"), options={"command": "true"}, assignment=assignment))
    assert result.outcome == work_pb2.OUTCOME_FAILED
    assert "cannot apply the diff of gen: it was truncated" in result.error_message


def test_unsafe_workspace_specs_are_declined_before_anything_runs() -> None:
    assert Workspaces.problem(work_pb2.GitWorkspace(repository="--upload-pack=evil")) is not None
    assert Workspaces.problem(work_pb2.GitWorkspace(repository="ext::sh -c evil")) is not None
    assert Workspaces.problem(work_pb2.GitWorkspace(repository="/r", subdirectory="../etc")) is not None
    assert Workspaces.problem(work_pb2.GitWorkspace(repository="/r", ref="--output=x")) is not None
    assert Workspaces.problem(work_pb2.GitWorkspace(repository="https://example.com/r.git", ref="v1.2")) is None
