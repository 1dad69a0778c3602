"""The machine's resources now, as psutil sees them (GPUs through NVML when it is installed)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import psutil
from google.protobuf import timestamp_pb2
from maw.common.v1 import machine_pb2

__all__ = ["ResourceSampler"]

log = logging.getLogger(__name__)


class ResourceSampler:
    """Takes `ResourceUsage` samples; CPU percent is measured between consecutive samples."""

    def __init__(self, disk_path: Path) -> None:
        self._disk_path = disk_path
        self._nvml: Any = load_nvml()
        psutil.cpu_percent(interval=None)  # primes the counter; the first real sample is then meaningful

    def sample(self) -> machine_pb2.ResourceUsage:
        """The resources now (cheap: a few syscalls, no sleeping)."""
        memory = psutil.virtual_memory()
        usage = machine_pb2.ResourceUsage(
            cpu_percent=psutil.cpu_percent(interval=None),
            cpu_count=psutil.cpu_count() or 0,
            memory_used_bytes=memory.total - memory.available,
            memory_total_bytes=memory.total,
        )
        with contextlib.suppress(OSError):
            disk = psutil.disk_usage(str(self._disk_path))
            usage.disk_used_bytes = disk.used
            usage.disk_total_bytes = disk.total
        with contextlib.suppress(OSError, AttributeError):
            load_1m, load_5m, load_15m = os.getloadavg()
            usage.load_average.load_1m = load_1m
            usage.load_average.load_5m = load_5m
            usage.load_average.load_15m = load_15m
        if self._nvml is not None:
            usage.gpus.extend(self._gpus())
        usage.sample_time.CopyFrom(_now())
        return usage

    def _gpus(self) -> list[machine_pb2.GpuUsage]:
        nvml = self._nvml
        gpus: list[machine_pb2.GpuUsage] = []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = nvml.nvmlDeviceGetName(handle)
                gpus.append(
                    machine_pb2.GpuUsage(
                        index=index,
                        name=name.decode() if isinstance(name, bytes) else str(name),
                        memory_used_bytes=int(memory.used),
                        memory_total_bytes=int(memory.total),
                        utilization_percent=float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                    )
                )
        except Exception as exc:  # NVML errors are many and driver-specific; GPUs are optional
            log.debug("GPU sampling failed: %s", exc)
        return gpus


def load_nvml() -> Any:
    """NVML (the `nvidia-ml-py` package) when installed and a driver answers; otherwise None."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
    except Exception:  # not installed, no driver, no GPU: all mean "no GPUs"
        return None
    return pynvml


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp
