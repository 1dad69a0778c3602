"""The README's grpcurl flows run as written (real grpcurl, real bash) against the test mesh: sign-in, judgement."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from deploy.local import Stack

ROOT = Path(__file__).resolve().parents[2]


def _flow() -> str:
    readme = (ROOT / "README.md").read_text()
    block = re.search(
        r"<!-- grpcurl-auth-flow:start -->\n```sh\n(.*?)```\n<!-- grpcurl-auth-flow:end -->", readme, re.S
    )
    assert block is not None, "the README lost its grpcurl sign-in flow"
    return block.group(1)


def test_the_readme_grpcurl_flow_logs_in_creates_and_uses_a_token_and_creates_an_enrollment_token(
    stack: Stack, admin_token: str
) -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash is needed to run the README's shell flow")
    venv_bin = Path(sys.executable).parent
    # Only the addresses and paths of `make up` change: the test mesh listens on free ports elsewhere.
    script = (
        _flow()
        .replace("localhost:50051", f"127.0.0.1:{stack.ports.registry}")
        .replace(".maw/", f"{stack.data_dir}/")
        .replace(".venv/bin/", f"{venv_bin}/")
    )
    stack.admin_password  # noqa: B018 - make sure the password file exists as it does after `make up`
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    replies = [json.loads(chunk) for chunk in re.split(r"(?<=\n})\n(?={)", result.stdout.strip())]
    who, listed, enrollment = replies
    assert who["principal"] == "users/admin"
    assert who["authMethod"] == "AUTH_METHOD_API_TOKEN"
    assert who["role"] == "ROLE_OPERATOR"
    assert set(listed) <= {"workers", "sequence", "nextPageToken"}  # a ListWorkersResponse
    assert enrollment["secret"].startswith("maw_enr_")
    assert enrollment["enrollmentToken"]["maxUses"] == 1


def test_the_readme_judgement_commands_create_a_task_that_waits_for_its_plan_and_decide_it(
    stack: Stack, admin_token: str
) -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(
        r"<!-- grpcurl-judgement:start -->\n```sh\n(.*?)```\n<!-- grpcurl-judgement:end -->", readme, re.S
    )
    assert block is not None, "the README lost its judgement commands"
    venv_bin = Path(sys.executable).parent
    commands = [
        c.replace("localhost:50052", f"127.0.0.1:{stack.ports.scheduler}").replace(
            "localhost:50053", f"127.0.0.1:{stack.ports.evaluator}"
        )
        for c in re.split(r"\n(?=\$GRPCURL)", re.sub(r"(?m)^#.*\n", "", block.group(1)).strip())
    ]
    create, inbox, decide = commands
    prelude = f'GRPCURL="{venv_bin}/grpcurl -plaintext"; AUTH="authorization: Bearer {admin_token}"\n'

    def run(command: str) -> dict[str, Any]:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", prelude + command], capture_output=True, text=True,
                              timeout=60, cwd=ROOT)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        reply: dict[str, Any] = json.loads(done.stdout or "{}")
        return reply

    task = run(create)["task"]
    assert task["state"] == "TASK_STATE_WAITING_CHECKPOINT", "it waits for its plan from creation"
    deadline = time.monotonic() + 30
    while True:
        mine = [c for c in run(inbox).get("checkpoints", []) if c["task"] == task["name"]]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [c["trigger"] for c in mine] == ["CHECKPOINT_TRIGGER_AFTER_DECOMPOSITION"]
    assert "generate-code-alt-1" in mine[0]["reason"] and "generate-code-alt-2" in mine[0]["reason"], "3 solutions"
    decided = run(decide.replace("checkpoints/<id>", mine[0]["name"]))
    assert decided["checkpoint"]["state"] == "CHECKPOINT_STATE_APPROVED"
