"""Polling for an observable state, the one way every node-level test waits."""

from __future__ import annotations

import time


def wait_until(cond, timeout_s: float, step_s: float = 0.1):
    """``cond()`` every ``step_s`` until it returns something truthy (returned) or ``timeout_s`` has
    passed (then its last value, so ``assert wait_until(...)`` fails on what was last seen)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(step_s)
    return cond()
