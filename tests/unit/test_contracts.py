"""The contracts in protos/: complete, documented, generated code in sync, conventions kept."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from services.evaluator import DEFINITION as EVALUATOR
from services.registry import DEFINITION as REGISTRY
from services.runtime.contracts import services_in
from services.scheduler import DEFINITION as SCHEDULER

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["maw.common.v1", "maw.registry.v1", "maw.scheduler.v1", "maw.agent.v1", "maw.evaluator.v1"]
READ_PREFIXES = ("Get", "List", "Watch", "WhoAmI", "Preview")
# Mutating RPCs without a request_id, each naturally idempotent (DESIGN.md: "or is naturally idempotent").
NATURALLY_IDEMPOTENT = {
    "AuthService/Login": "a repeat opens one more session; nothing is done twice",
    "AuthService/Logout": "revoking a revoked session changes nothing",
    "WorkerIntakeService/AuthenticateAgent": "a check, writes nothing",
    "CredentialIntakeService/AuthenticateApiToken": "a check; only records the token's last use",
    "WorkerIntakeService/ReportWorkers": "last-writer-wins snapshots per worker",
    "EvaluationIntakeService/RegisterTask": "keyed by the task name",
    "EvaluationIntakeService/SubmitResults": "each item keyed by result_id",
    "EvaluationIntakeService/ReportTaskUpdates": "each item keyed by update_id",
    "ActivityIntakeService/AppendActivity": "each record keyed by entry_id",
    "VerdictService/DeliverVerdicts": "each item keyed by verdict_id",
}


def _buf() -> str:
    return shutil.which("buf") or str(Path(sys.executable).parent / "buf")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path_factory.mktemp("buf") / "image.binpb"
    subprocess.run([_buf(), "build", "-o", str(out)], cwd=ROOT, check=True, capture_output=True)
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _ours(image: descriptor_pb2.FileDescriptorSet) -> list[descriptor_pb2.FileDescriptorProto]:
    return [f for f in image.file if f.package.startswith("maw.")]


def test_every_area_has_a_package(image: descriptor_pb2.FileDescriptorSet) -> None:
    assert {f.package for f in _ours(image)} == set(PACKAGES)


def test_each_package_is_served_by_exactly_one_service() -> None:
    served = [pkg for d in (REGISTRY, SCHEDULER, EVALUATOR) for pkg in d.proto_packages]
    assert sorted(served) == sorted(p for p in PACKAGES if p != "maw.common.v1")
    assert services_in("maw.common.v1") == []
    for pkg in served:
        assert services_in(pkg), f"{pkg} declares no service"


def _paths_missing_comments(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    commented = {
        tuple(loc.path)
        for loc in file.source_code_info.location
        if loc.leading_comments.strip() or loc.trailing_comments.strip()
    }
    missing: list[str] = []

    def need(path: tuple[int, ...], what: str) -> None:
        if path not in commented:
            missing.append(f"{file.name}: {what}")

    def message(msg: descriptor_pb2.DescriptorProto, path: tuple[int, ...], prefix: str) -> None:
        name = f"{prefix}{msg.name}"
        need(path, f"message {name}")
        for i, fld in enumerate(msg.field):
            need((*path, 2, i), f"field {name}.{fld.name}")
        for i, nested in enumerate(msg.nested_type):
            if not nested.options.map_entry:
                message(nested, (*path, 3, i), f"{name}.")
        for i, enum in enumerate(msg.enum_type):
            enumeration(enum, (*path, 4, i), f"{name}.")

    def enumeration(enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], prefix: str) -> None:
        need(path, f"enum {prefix}{enum.name}")
        for i, value in enumerate(enum.value):
            need((*path, 2, i), f"enum value {prefix}{enum.name}.{value.name}")

    for i, msg in enumerate(file.message_type):
        message(msg, (4, i), "")
    for i, enum in enumerate(file.enum_type):
        enumeration(enum, (5, i), "")
    for i, service in enumerate(file.service):
        need((6, i), f"service {service.name}")
        for j, method in enumerate(service.method):
            need((6, i, 2, j), f"rpc {service.name}.{method.name}")
    return missing


def test_every_message_field_enum_and_rpc_is_commented(image: descriptor_pb2.FileDescriptorSet) -> None:
    missing = [m for f in _ours(image) for m in _paths_missing_comments(f)]
    assert missing == []


def test_streaming_rpcs_follow_the_naming_the_gateway_routes_by(image: descriptor_pb2.FileDescriptorSet) -> None:
    # gateway/envoy.yaml gives only Watch*/Connect routes an unbounded timeout.
    wrong = [
        f"{f.package}.{s.name}/{m.name}"
        for f in _ours(image)
        for s in f.service
        for m in s.method
        if (m.client_streaming or m.server_streaming) and not (m.name.startswith("Watch") or m.name == "Connect")
    ]
    assert wrong == []


def test_every_mutating_rpc_takes_a_request_id(image: descriptor_pb2.FileDescriptorSet) -> None:
    messages = {f".{f.package}.{m.name}": m for f in _ours(image) for m in f.message_type}
    missing = []
    exempt_seen = set()
    for f in _ours(image):
        for s in f.service:
            for m in s.method:
                rpc = f"{s.name}/{m.name}"
                if m.name.startswith(READ_PREFIXES) or m.client_streaming:
                    continue
                fields = {fld.name for fld in messages[m.input_type].field}
                if rpc in NATURALLY_IDEMPOTENT:
                    exempt_seen.add(rpc)
                elif "request_id" not in fields:
                    missing.append(rpc)
    assert missing == []
    assert exempt_seen == set(NATURALLY_IDEMPOTENT), "an exemption names an RPC that no longer exists"


def _diff(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b)
    out = [str(a / n) for n in cmp.left_only] + [str(b / n) for n in cmp.right_only] + cmp.diff_files
    for sub in cmp.common_dirs:
        out += _diff(a / sub, b / sub)
    return out


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run([_buf(), "generate", "-o", str(tmp_path)], cwd=ROOT, check=True, capture_output=True)
    stale = _diff(ROOT / "gen" / "python", tmp_path / "gen" / "python")
    assert stale == [], "gen/python is stale: run `make generate` and commit the result"
