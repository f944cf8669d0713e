"""Generic Kubernetes plumbing for the controller: a work queue with rate-limited retries, and an
informer (list, then watch from the list's resource version, list again on 410 Gone).

Nothing here knows about ResourceChaos, pods or the ``kubernetes`` package: the informer is given
a list function and a watch function, the queue holds opaque keys. Both take their clock (and the
informer its sleep and random source) from the constructor so tests can drive them with a fake one.

The queue is the controller's only source of delayed work, and it is bounded by construction: a key
is at most once in the ready list, and has at most one pending retry (a dict key -> due time, never
a heap or list that grows with every retry or resync).
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any

log = logging.getLogger("chaos-agent.controller")

RETRY_BASE_S = 1.0
RETRY_CAP_S = 60.0
WATCH_BACKOFF_BASE_S = 0.2
WATCH_BACKOFF_CAP_S = 10.0


def backoff_s(failures: int, base_s: float, cap_s: float, rand: Callable[[], float] = random.random) -> float:
    """Capped exponential backoff with jitter: base * 2**failures, at most cap, then scaled into
    [half, whole] (so that many keys failing together do not retry in step)."""
    delay = min(cap_s, base_s * (2 ** min(failures, 32)))
    return delay * (0.5 + rand() / 2)


class WorkQueue:
    """Keys to reconcile, each at most once: ``add`` (now), ``add_rate_limited`` (after a failure),
    ``get`` / ``done`` around each piece of work, ``forget`` after a success.

    As client-go's workqueue: a key added while it is being worked on is worked on again after
    ``done``, never by two workers at once. Retries are one pending entry per key: adding a retry for
    a key that already has one keeps the earlier due time.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, rand: Callable[[], float] = random.random,
                 retry_base_s: float = RETRY_BASE_S, retry_cap_s: float = RETRY_CAP_S):
        self.clock = clock
        self.rand = rand
        self.retry_base_s = retry_base_s
        self.retry_cap_s = retry_cap_s
        self._ready: collections.deque[Hashable] = collections.deque()
        self._dirty: set[Hashable] = set()  # in _ready, or to be put back there after done()
        self._processing: set[Hashable] = set()
        self._delayed: dict[Hashable, float] = {}  # key -> when to add it (clock seconds)
        self._failures: dict[Hashable, int] = {}
        self._cond = threading.Condition()
        self._closed = False

    # -- adding --

    def add(self, key: Hashable) -> None:
        with self._cond:
            self._add_locked(key)

    def _add_locked(self, key: Hashable) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._ready.append(key)
            self._cond.notify_all()

    def add_after(self, key: Hashable, delay_s: float) -> None:
        with self._cond:
            if delay_s <= 0:
                self._add_locked(key)
                return
            due = self.clock() + delay_s
            if key not in self._delayed or due < self._delayed[key]:
                self._delayed[key] = due
                self._cond.notify_all()

    def add_rate_limited(self, key: Hashable) -> float:
        """Schedule a retry after the key's next backoff step; returns the delay chosen."""
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
        delay = backoff_s(failures, self.retry_base_s, self.retry_cap_s, self.rand)
        self.add_after(key, delay)
        return delay

    def forget(self, key: Hashable) -> None:
        """The key's work succeeded: its backoff starts again from the base, its pending retry is dropped."""
        with self._cond:
            self._failures.pop(key, None)
            self._delayed.pop(key, None)

    def failures(self, key: Hashable) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    # -- taking --

    def get(self, timeout_s: float | None = None) -> Hashable | None:
        """The next ready key (now marked as being worked on), or None after ``timeout_s`` / ``close``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while True:
                self._promote_due_locked()
                if self._ready:
                    key = self._ready.popleft()
                    self._dirty.discard(key)
                    self._processing.add(key)
                    return key
                if self._closed:
                    return None
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    return None
                if self._delayed:
                    until_due = min(self._delayed.values()) - self.clock()
                    wait = until_due if wait is None else min(wait, until_due)
                self._cond.wait(None if wait is None else max(0.005, min(wait, 1.0)))

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._ready.append(key)
            self._cond.notify_all()

    def _promote_due_locked(self) -> None:
        if not self._delayed:
            return
        now = self.clock()
        for key in [k for k, due in self._delayed.items() if due <= now]:
            del self._delayed[key]
            self._add_locked(key)

    # -- state --

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is ready or being worked on (pending retries do not count)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                self._promote_due_locked()
                if not self._ready and not self._processing:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))

    def sizes(self) -> dict[str, int]:
        """How many keys are ready, being worked on, waiting for a retry, and have a failure count."""
        with self._cond:
            return {"ready": len(self._ready), "processing": len(self._processing), "delayed": len(self._delayed),
                    "failures": len(self._failures)}

    def next_due_s(self, key: Hashable) -> float | None:
        """When the key's pending retry is due (clock seconds), if it has one."""
        with self._cond:
            return self._delayed.get(key)


class WatchExpired(Exception):
    """The resource version a watch started from is too old (410 Gone): list again."""


class WatchFailed(Exception):
    """A list or watch the API answered with an error other than 410."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class Informer:
    """A cache of one kind of object kept current by list + watch.

    ``list_fn() -> (items, resource_version)``; ``watch_fn(resource_version, timeout_s)`` -> an
    iterator of watch events (dicts with ``type`` and ``object``) that may have a ``close()``; an
    ERROR event with code 410 (or a ``WatchExpired``) means "list again", anything else raising
    backs off. ``on_change(key, old, new)`` is called for every change seen, ``new`` None for a
    deletion (also for objects that vanished between two lists).
    """

    def __init__(self, name: str, list_fn: Callable[[], tuple[list[dict], str]],
                 watch_fn: Callable[[str, int], Iterator[dict]], key_of: Callable[[dict], Hashable],
                 on_change: Callable[[Hashable, dict | None, dict | None], None], *, watch_timeout_s: int = 240,
                 rand: Callable[[], float] = random.random):
        self.name = name
        self.list_fn = list_fn
        self.watch_fn = watch_fn
        self.key_of = key_of
        self.on_change = on_change
        self.watch_timeout_s = watch_timeout_s
        self.rand = rand
        self.relists = 0
        self._cache: dict[Hashable, dict] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stream: Any = None

    # -- the cache --

    def get(self, key: Hashable) -> dict | None:
        with self._lock:
            return self._cache.get(key)

    def items(self) -> list[tuple[Hashable, dict]]:
        with self._lock:
            return list(self._cache.items())

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._cache)

    def store(self, obj: dict) -> None:
        """Put an object our own write returned into the cache, unless the cache already holds a newer one."""
        key = self.key_of(obj)
        with self._lock:
            cached = self._cache.get(key)
            if cached is None or _newer(obj, cached):
                self._cache[key] = obj

    def replace(self, items: list[dict]) -> None:
        """Make the cache exactly ``items`` (a list's answer), reporting every difference."""
        fresh = {self.key_of(o): o for o in items}
        with self._lock:
            old, self._cache = self._cache, fresh
        for key in old.keys() | fresh.keys():
            before, after = old.get(key), fresh.get(key)
            if before is not after and (before is None or after is None or _rv(before) != _rv(after)):
                self.on_change(key, before, after)

    def apply_event(self, event: dict) -> None:
        type_, obj = event.get("type"), event.get("object") or {}
        if type_ not in ("ADDED", "MODIFIED", "DELETED"):
            return  # BOOKMARK: only its resource version matters
        key = self.key_of(obj)
        with self._lock:
            before = self._cache.get(key)
            if type_ != "DELETED" and before is not None and _newer(before, obj):
                return  # our own write's answer (store()) is already newer than this event
            if type_ == "DELETED":
                self._cache.pop(key, None)
            else:
                self._cache[key] = obj
        self.on_change(key, before, None if type_ == "DELETED" else obj)

    # -- list and watch --

    def relist(self) -> str:
        items, rv = self.list_fn()
        self.relists += 1
        self.replace(items)
        return rv

    def run(self, rv: str | None) -> None:
        """Watch from ``rv`` until ``stop()``: resume from the last version seen when a watch ends,
        list again on 410, back off (capped, with jitter) on other errors."""
        failures = 0
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self.relist()
                rv = self._watch_once(rv)
                failures = 0
            except WatchExpired:
                log.info("%s watch expired (410 Gone); listing again", self.name)
                rv = None
            except Exception as e:
                if self._stop.is_set():
                    return
                delay = backoff_s(failures, WATCH_BACKOFF_BASE_S, WATCH_BACKOFF_CAP_S, self.rand)
                failures += 1
                log.warning("%s watch failed: %s; listing again in %.1fs", self.name, e, delay)
                self._stop.wait(delay)
                rv = None

    def _watch_once(self, rv: str) -> str:
        stream = self.watch_fn(rv, self.watch_timeout_s)
        self._stream = stream
        try:
            # stop() sets the flag, then aborts the stream it sees: one that opened while it ran was
            # not there to abort, and its first read would wait for an event or the watch timeout.
            if self._stop.is_set():
                return rv
            for event in stream:
                if self._stop.is_set():
                    break
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    if obj.get("code") == 410:
                        raise WatchExpired(obj.get("message", "gone"))
                    raise WatchFailed(obj.get("code", 500), obj.get("message", "watch error"))
                rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                self.apply_event(event)
        finally:
            self._stream = None
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        return rv

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None and hasattr(stream, "abort"):
            stream.abort()


def _rv(obj: dict) -> str:
    return (obj.get("metadata") or {}).get("resourceVersion") or ""


def _newer(a: dict, b: dict) -> bool:
    """Whether ``a`` is a later version than ``b``. Resource versions are opaque to clients, but
    every API server we know serves etcd revisions (integers); anything else counts as newer."""
    ra, rb = _rv(a), _rv(b)
    if ra.isdigit() and rb.isdigit():
        return int(ra) > int(rb)
    return ra != rb
