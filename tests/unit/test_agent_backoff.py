"""Reconnect backoff: exponential ceilings, full jitter below them, reset after a healthy session."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st
from maw_agent._backoff import Backoff


def test_ceilings_double_up_to_the_maximum() -> None:
    backoff = Backoff(0.5, 30, random.Random(1))
    ceilings = []
    for _ in range(10):
        ceilings.append(backoff.ceiling())
        backoff.next_delay()
    assert ceilings == [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]


def test_delays_are_spread_over_the_whole_range_not_clustered() -> None:
    delays = []
    for seed in range(400):
        backoff = Backoff(1, 64, random.Random(seed))
        backoff.failures = 6
        delays.append(backoff.next_delay())
    assert min(delays) < 6 and max(delays) > 58  # full jitter: from ~0 up to the ceiling
    assert 24 < sum(delays) / len(delays) < 40


def test_reset_starts_again_from_the_smallest_delay() -> None:
    backoff = Backoff(0.5, 30, random.Random(2))
    for _ in range(8):
        backoff.next_delay()
    backoff.reset()
    assert backoff.ceiling() == 0.5
    assert backoff.next_delay() <= 0.5


@given(st.floats(0.01, 5), st.floats(5, 300), st.integers(0, 10_000), st.integers(0, 2**32))
def test_a_delay_is_never_negative_nor_above_the_maximum(
    initial: float, maximum: float, failures: int, seed: int
) -> None:
    backoff = Backoff(initial, maximum, random.Random(seed))
    backoff.failures = failures
    assert 0 <= backoff.next_delay() <= maximum
