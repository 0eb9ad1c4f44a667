"""Waiting in tests: on a condition, with a deadline, never a fixed sleep that guesses how long
something takes (too short on a loaded machine, wasted time on an idle one)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.2) -> T:
    """Polls `condition` every `interval_s` until it returns something truthy, which is returned;
    raises TimeoutError naming `what` after `timeout_s`. `condition` may raise to stop waiting early."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(interval_s)
