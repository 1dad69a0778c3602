"""Reconnect delays: exponential backoff with full jitter, reset by a healthy session.

The n-th delay is uniform in [0, min(max, initial * 2**n)] (AWS architecture blog, "Exponential Backoff
And Jitter"), so agents that lost the same scheduler do not come back in step.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delays for successive failed connection attempts."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self._initial = initial
        self._maximum = maximum
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.failures = 0

    def ceiling(self) -> float:
        """The largest delay the next attempt may wait."""
        return min(self._maximum, self._initial * 2.0 ** min(self.failures, 62))

    def next_delay(self) -> float:
        """The delay before the next attempt; counts one more failure."""
        delay = float(self._rng.uniform(0, self.ceiling()))
        self.failures += 1
        return delay

    def reset(self) -> None:
        """Start again from the smallest delays (after a healthy session)."""
        self.failures = 0
