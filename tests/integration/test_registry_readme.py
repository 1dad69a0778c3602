"""The README's grpcurl sign-in flow runs as written (real grpcurl, real bash) against the test mesh."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

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
