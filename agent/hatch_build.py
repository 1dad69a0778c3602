"""Build hook: put the generated contracts the agent needs into the wheel and the sdist.

The stubs are generated into the repository's gen/python/ (never edited by hand), outside this project
directory. From a checkout they are taken from there; from an unpacked sdist (which carries them at
./maw) from here. Only what the agent imports is shipped: maw.agent.v1, maw.common.v1, and of
maw.registry.v1 the enrollment service `maw-agent enroll` calls (with the resources it refers to).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

# Package directory -> file name prefixes shipped from it (empty: every module).
CONTRACTS: dict[str, tuple[str, ...]] = {
    "maw/agent/v1": (),
    "maw/common/v1": (),
    "maw/registry/v1": ("enrollment_service_pb2", "resources_pb2"),
}


class CustomBuildHook(BuildHookInterface):
    """Adds the generated contracts to `force_include`."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        for package, prefixes in CONTRACTS.items():
            for base in (root.parent / "gen" / "python", root):
                source = base / package
                if any(source.glob("*_pb2.py")):
                    # File by file: only the sources, never a __pycache__ left by a local run.
                    for file in sorted(source.iterdir()):
                        wanted = not prefixes or file.name.startswith(prefixes)
                        if file.suffix in {".py", ".pyi"} and wanted:
                            build_data["force_include"][str(file)] = f"{package}/{file.name}"
                    break
            else:
                raise FileNotFoundError(f"generated contracts {package} not found; run `make generate` first")
