"""maw-agent installs on a worker node without any server dependency (docs/packaging.md)."""

from __future__ import annotations

import email
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

SERVER_ONLY = ("sqlalchemy", "psycopg", "redis", "alembic", "pydantic-settings", "opentelemetry")


def _requirement_names(lines: list[str]) -> list[str]:
    return [re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0].lower() for line in lines]


def test_the_distribution_depends_on_exactly_the_agent_requirements(repo_root: Path) -> None:
    pyproject = tomllib.loads((repo_root / "agent" / "pyproject.toml").read_text())
    requirements = [
        line.strip()
        for line in (repo_root / "requirements" / "agent.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert sorted(pyproject["project"]["dependencies"]) == sorted(requirements)
    assert pyproject["project"]["scripts"]["maw-agent"] == "maw_agent.cli:main"


@pytest.fixture(scope="module")
def wheel(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), "."],
        cwd=repo_root / "agent",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (built,) = out.glob("maw_agent-*.whl")
    return built


def test_the_wheel_carries_the_agent_and_its_generated_contracts_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "maw_agent/cli.py" in names
    assert "maw_agent/tools/shell.py" in names
    assert "maw_agent/tools/testtool.py" in names
    assert "maw/agent/v1/agent_service_pb2.py" in names
    assert "maw/agent/v1/agent_service_pb2_grpc.py" in names
    assert "maw/common/v1/machine_pb2.py" in names
    assert "maw/registry/v1/enrollment_service_pb2_grpc.py" in names  # for `maw-agent enroll`
    registry = {n for n in names if n.startswith("maw/registry/")}
    assert {n.rsplit("/", 1)[1].split("_pb2")[0] for n in registry} == {"enrollment_service", "resources"}
    assert not [n for n in names if n.startswith(("maw/scheduler", "maw/evaluator", "services/"))]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_the_wheel_declares_no_server_dependency_and_a_console_script(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    metadata_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = email.message_from_bytes(archive.read(metadata_name))
    requires = _requirement_names(metadata.get_all("Requires-Dist") or [])
    assert "grpcio" in requires and "psutil" in requires
    assert not [name for name in requires if name.startswith(SERVER_ONLY)]
    entry_points = archive.read(metadata_name.replace("METADATA", "entry_points.txt")).decode()
    assert "maw-agent = maw_agent.cli:main" in entry_points


def test_the_unpacked_wheel_runs_on_its_own_without_the_repository(
    wheel: Path, tmp_path: Path, repo_root: Path
) -> None:
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = (
        "import sys\n"
        f"checkout = {[str(repo_root), str(repo_root / 'gen' / 'python'), str(repo_root / 'agent'), '']!r}\n"
        "sys.path[:] = [p for p in sys.path if p.rstrip('/') not in checkout]\n"
        f"sys.path.insert(0, {str(tmp_path / 'site')!r})\n"
        "import maw_agent, maw_agent.cli, maw_agent._setup\n"
        "from maw.agent.v1 import agent_service_pb2\n"
        "assert maw_agent.__file__.startswith(sys.path[0]), maw_agent.__file__\n"
        "assert agent_service_pb2.__file__.startswith(sys.path[0]), agent_service_pb2.__file__\n"
        "server = [m for m in sys.modules if m.split('.')[0] in ('services', 'sqlalchemy', 'redis', 'psycopg')]\n"
        "assert not server, server\n"
        "sys.argv = ['maw-agent', '--version']\n"
        "maw_agent.cli.main()\n"
    )
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert "maw-agent 0.1.0" in ran.stdout, ran.stderr
