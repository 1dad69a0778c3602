"""`maw-agent enroll` and `maw-agent doctor` as a user runs them, against the real mesh through Envoy."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import timestamp_pb2
from maw.registry.v1 import enrollment_service_pb2, enrollment_service_pb2_grpc, resources_pb2

from deploy.local import Stack
from tests.integration.conftest import bearer
from tests.standins.harness import BIN

ROOT = Path(__file__).resolve().parents[2]


async def enrollment_token(registry: grpc.aio.Channel, admin_token: str) -> str:
    expire = timestamp_pb2.Timestamp()
    expire.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    created = await enrollment_service_pb2_grpc.EnrollmentServiceStub(registry).CreateEnrollmentToken(
        enrollment_service_pb2.CreateEnrollmentTokenRequest(
            enrollment_token=resources_pb2.EnrollmentToken(display_name="cli test", max_uses=1, expire_time=expire),
            request_id=uuid.uuid4().hex,
        ),
        metadata=bearer(admin_token),
        timeout=10,
    )
    return str(created.secret)


def maw_agent(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user whose config dir is `home/.config` and whose PATH has the stand-in tools."""
    env = {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "agent"), str(ROOT / "gen" / "python")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "maw_agent", *args], capture_output=True, text=True, env=env, timeout=60, cwd=home
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("user-home")


@pytest.mark.slow
async def test_enroll_stores_a_private_credential_and_a_config_with_the_tools_found(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin_token: str, home: Path
) -> None:
    token = await enrollment_token(channels["registry"], admin_token)
    gateway = f"127.0.0.1:{stack.ports.gateway}"
    enrolled = maw_agent(home, "enroll", "--server", gateway, "--token", token, "--worker", "cli-node")
    assert enrolled.returncode == 0, enrolled.stderr
    assert "enrolled as workers/cli-node" in enrolled.stdout
    assert token not in enrolled.stdout + enrolled.stderr
    credential = home / ".config" / "maw-agent" / "credential"
    assert stat.S_IMODE(credential.stat().st_mode) == 0o600
    assert stat.S_IMODE(credential.parent.stat().st_mode) == 0o700
    assert credential.read_text().startswith("maw_agt_")
    config = yaml.safe_load((home / ".config" / "maw-agent" / "agent.yaml").read_text())
    assert config["server"] == gateway and config["worker"] == "workers/cli-node"
    assert config["credential_file"] == str(credential) and "credential" not in config
    assert {"claude", "gemini", "codex", "shell"} <= set(config["tools"]) and "ollama" not in config["tools"]
    # The token was for one use: a second enrollment is refused, and nothing is overwritten.
    again = maw_agent(home, "enroll", "--server", gateway, "--token", token, "--worker", "cli-node-2")
    assert again.returncode == 1 and "UNAUTHENTICATED" in again.stderr
    assert yaml.safe_load((home / ".config" / "maw-agent" / "agent.yaml").read_text())["worker"] == "workers/cli-node"
    # `run --print-config` finds the written configuration without --config.
    printed = maw_agent(home, "run", "--print-config")
    assert printed.returncode == 0, printed.stderr
    assert yaml.safe_load(printed.stdout)["worker"] == "workers/cli-node"


@pytest.mark.slow
async def test_doctor_prints_tools_resources_sandbox_and_a_valid_credential(stack: Stack, home: Path) -> None:
    report = maw_agent(home, "doctor")
    out = report.stdout
    assert report.returncode == 0, out + report.stderr
    lines = out.splitlines()
    assert lines[0].startswith("maw-agent 0.1.0 doctor")
    for section in ("TOOLS", "RESOURCES", "SANDBOX", "CONNECTION"):
        assert section in lines

    def row(first: str) -> list[str]:
        return next(line.split() for line in lines if line.split()[:1] == [first])

    assert row("claude")[:5] == ["claude", "claude_code", "ok", "1.0.98", "anthropic"]
    assert row("codex")[:5] == ["codex", "codex_cli", "ok", "0.46.0", "openai"]
    assert row("ollama")[:3] == ["ollama", "ollama", "missing"]
    assert row("cpu")[1].isdigit() and row("memory")[0] == "memory"
    assert row("server")[1] == "ok"
    assert row("credential")[:5] == ["credential", "ok", "valid,", "for", "workers/cli-node"]
    assert lines[-1] == "ready to run"


@pytest.mark.slow
async def test_doctor_says_when_the_credential_is_not_accepted(stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "cred").write_text("maw_agt_not-a-real-credential-000000")
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"server: 127.0.0.1:{stack.ports.gateway}\nworker: nobody\ncredential_file: {tmp_path / 'cred'}\n"
    )
    report = maw_agent(tmp_path, "doctor", "--config", str(config))
    assert report.returncode == 1
    credential_row = next(line for line in report.stdout.splitlines() if line.strip().startswith("credential"))
    assert "FAIL" in credential_row and "not accepted" in credential_row
    assert "not-a-real-credential" not in report.stdout
    assert report.stdout.splitlines()[-1] == "NOT ready: see FAIL above"
