"""The engine's one clock: end times, retries with backoff, and the periodic drift pass.

Each experiment has at most one scheduled moment (``schedule`` replaces it), so the schedule is as
large as the number of records and never grows with resyncs or retries. A step that failed is
tried again after a capped exponential backoff with jitter (1 s doubling to 60 s by default), and
the log gets one line per try, not one per loop. The supervisor runs what is due on its own thread
and calls back into the engine (``on_due(key)``, ``drift()``); it knows nothing of what they do.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

log = logging.getLogger("chaos-agent.supervisor")

BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
JITTER = 0.2  # +-20 %


def backoff_s(attempts: int, *, base_s: float = BACKOFF_BASE_S, max_s: float = BACKOFF_MAX_S,
              rng: random.Random | None = None) -> float:
    """Wait before try ``attempts + 1``: base doubling per failed try, capped, with jitter (never 0)."""
    delay = min(max_s, base_s * 2 ** max(0, attempts - 1))
    r = (rng or random).uniform(1 - JITTER, 1 + JITTER)
    return max(base_s * (1 - JITTER), min(max_s, delay * r))


class Supervisor:
    """Runs ``on_due(key)`` when a key's time comes and ``drift()`` every ``drift_interval_s``."""

    def __init__(self, *, on_due: Callable[[str], None], drift: Callable[[], None], clock: Callable[[], float],
                 drift_interval_s: float, rng: random.Random | None = None,
                 backoff_base_s: float = BACKOFF_BASE_S, backoff_max_s: float = BACKOFF_MAX_S):
        self._on_due = on_due
        self._drift = drift
        self.clock = clock
        self.drift_interval_s = drift_interval_s
        self.rng = rng or random.Random()
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._due: dict[str, float] = {}  # key -> seconds since the epoch (the engine's clock)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the schedule --

    def schedule(self, key: str, at_s: float) -> None:
        """``key`` is due at ``at_s`` (replaces an earlier moment for it)."""
        with self._lock:
            earlier = self._due.get(key)
            self._due[key] = at_s
        if earlier is None or at_s < earlier:
            self._wake.set()

    def cancel(self, key: str) -> None:
        with self._lock:
            self._due.pop(key, None)

    def due_at(self, key: str) -> float | None:
        with self._lock:
            return self._due.get(key)

    def pending(self) -> int:
        """How many moments are scheduled (one per experiment at most)."""
        with self._lock:
            return len(self._due)

    def backoff(self, attempts: int) -> float:
        return backoff_s(attempts, base_s=self.backoff_base_s, max_s=self.backoff_max_s, rng=self.rng)

    def run_due(self) -> int:
        """Run every key whose moment has come (each once); how many ran."""
        now = self.clock()
        with self._lock:
            keys = [k for k, at in self._due.items() if at <= now]
            for k in keys:
                del self._due[k]  # on_due schedules the next moment if there is one
        for key in sorted(keys):
            try:
                self._on_due(key)
            except Exception as e:  # the loop must outlive any one record
                log.error("scheduled work on %s failed: %s", key, e)
        return len(keys)

    # -- the thread --

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="chaos-supervisor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _loop(self) -> None:
        next_drift = time.monotonic() + self.drift_interval_s
        while not self._stop.is_set():
            with self._lock:
                first = min(self._due.values(), default=None)
            wait = max(0.0, next_drift - time.monotonic())
            if first is not None:
                wait = min(wait, max(0.0, first - self.clock()))
            # A wait of zero is only possible when work is due right now, and running it removes it.
            self._wake.wait(timeout=wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.run_due()
            if time.monotonic() >= next_drift:
                try:
                    self._drift()
                except Exception as e:
                    log.error("drift pass failed: %s", e)
                next_drift = time.monotonic() + self.drift_interval_s
