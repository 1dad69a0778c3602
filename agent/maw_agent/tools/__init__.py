"""Tool adapters: one module per tool, found by looking, so adding a tool touches nothing else.

Every module of this package (except `base`) that defines a `ToolAdapter` subclass contributes it under
its `name`; `maw_agent.tools.adapters()` returns one instance of each.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import pkgutil
from collections.abc import Mapping
from typing import Any

from maw_agent.tools.base import ToolAdapter, ToolInfo, ToolResult, ToolRun

__all__ = ["ToolAdapter", "ToolInfo", "ToolResult", "ToolRun", "adapter_names", "adapters", "usable"]

log = logging.getLogger("maw_agent")


@functools.cache
def _adapter_classes() -> dict[str, type[ToolAdapter]]:
    found: dict[str, type[ToolAdapter]] = {}
    for module_info in pkgutil.iter_modules(__path__):
        if module_info.name == "base" or module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, ToolAdapter) and not inspect.isabstract(cls) and cls.__module__ == module.__name__:
                if cls.name in found:
                    raise RuntimeError(f"two tool adapters are named {cls.name!r}")
                found[cls.name] = cls
    return found


def adapter_names() -> frozenset[str]:
    """The names of every tool adapter this agent has."""
    return frozenset(_adapter_classes())


def adapters(
    names: list[str] | None = None, settings: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, ToolAdapter]:
    """One instance of each adapter named (all when None), by name, configured from `settings[name]`.

    Raises ValueError (naming the tool and key) when an adapter refuses its settings.
    """
    classes = _adapter_classes()
    made: dict[str, ToolAdapter] = {}
    for name in names if names is not None else sorted(classes):
        adapter = classes[name]()
        try:
            adapter.configure((settings or {}).get(name, {}))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        made[name] = adapter
    return made


async def usable(enabled: Mapping[str, ToolAdapter]) -> dict[int, tuple[ToolAdapter, ToolInfo]]:
    """The enabled adapters that work on this machine, by tool kind, with what each detected."""
    found: dict[int, tuple[ToolAdapter, ToolInfo]] = {}
    for name, adapter in enabled.items():
        info = await adapter.detect()
        if info is None:
            log.warning("tool %s is enabled but not usable on this machine; not offered", name)
            continue
        found[adapter.kind] = (adapter, info)
        log.info("tool %s %s ready", name, info.version)
    return found
