"""The Celery app of the peer benchmark: one no-op task over the bench's Redis (``BENCH_CELERY_URL``).

Celery is an optional extra (requirements/bench.txt), loaded by name so the checks pass without it.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Any

__all__ = ["app", "noop"]

_URL = os.environ.get("BENCH_CELERY_URL", "redis://127.0.0.1:6379/1")
_celery: Any = importlib.import_module("celery")

app: Any = _celery.Celery("bench", broker=_URL, backend=_URL)
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False, result_expires=600)


@app.task(name="bench.noop")  # type: ignore[untyped-decorator]
def noop() -> float:
    """Does nothing; returns when it started (epoch seconds) so the caller can split dispatch from return."""
    return time.time()
