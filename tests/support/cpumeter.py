"""Measure a CFS-throttled cgroup's CPU use from its own accounting, precisely enough to hold a
quota to 5%.

A throttled burner runs in bursts: it spends its quota at the start of each period, then waits for
the next. A window that is not a whole number of periods catches one burst more or less than its
share: up to one quota per window, 4% of a 0.2 CPU quota over 2.5 s. A window of exactly N periods
integrates N whole bursts wherever it starts, so only the timer jitter of the two reads remains.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_burning(read_ns: Callable[[], int], timeout_s: float = 5.0) -> None:
    """Return once the cgroup's CPU counter moves (the burner runs); AssertionError after timeout."""
    deadline = time.monotonic() + timeout_s
    start = read_ns()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if read_ns() > start:
            return
    raise AssertionError(f"the burner used no CPU within {timeout_s} s")


def measure_cpus(read_ns: Callable[[], int], period_us: int, window_s: float = 2.5,
                 settle_periods: int = 3) -> float:
    """CPU use (CPUs) over the whole number of CFS periods closest to ``window_s``.

    ``read_ns`` reads the cgroup's cumulative CPU time in ns (cpuacct.usage, or cpu.stat usage_usec
    x 1000). The first ``settle_periods`` are skipped: a new quota holds from the next period on.
    """
    period_s = period_us / 1e6
    time.sleep(settle_periods * period_s)
    periods = max(1, round(window_s / period_s))
    u0 = read_ns()
    t0 = time.monotonic()
    end = t0 + periods * period_s
    while (left := end - time.monotonic()) > 0:
        time.sleep(left)
    u1 = read_ns()
    t1 = time.monotonic()
    return (u1 - u0) / 1e9 / (t1 - t0)
