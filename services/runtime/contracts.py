"""Find the gRPC services of a ``maw.<area>.v1`` package in the generated code.

The server bootstrap registers every service of the packages it serves; a service without an
implementation yet answers UNIMPLEMENTED. Discovering them from the descriptors means a new RPC or
service in protos/ can never be forgotten by a server (or by the authorisation table).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor


@dataclass(frozen=True)
class ContractService:
    """One gRPC service of the contracts, with the generated hooks to serve it."""

    descriptor: ServiceDescriptor
    add_to_server: Callable[[Any, Any], None]
    servicer_base: type

    @property
    def full_name(self) -> str:
        """Fully-qualified name, e.g. ``maw.scheduler.v1.TaskService``."""
        name: str = self.descriptor.full_name
        return name


def _modules(package: str) -> Iterator[ModuleType]:
    pkg = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.endswith("_pb2"):
            yield importlib.import_module(f"{package}.{info.name}")


def services_in(package: str) -> list[ContractService]:
    """Every service declared in the proto package ``package`` (e.g. ``maw.registry.v1``)."""
    found: list[ContractService] = []
    for module in _modules(package):
        services = module.DESCRIPTOR.services_by_name
        if not services:
            continue
        grpc_module = importlib.import_module(module.__name__ + "_grpc")
        for name, descriptor in services.items():
            found.append(
                ContractService(
                    descriptor=descriptor,
                    add_to_server=getattr(grpc_module, f"add_{name}Servicer_to_server"),
                    servicer_base=getattr(grpc_module, f"{name}Servicer"),
                )
            )
    return found
