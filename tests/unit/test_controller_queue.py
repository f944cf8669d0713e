"""daemonset.informer: the work queue (one entry per key, one pending retry per key, capped backoff
with jitter) and the informer's list/watch loop (resume, 410 -> list again, back off on errors)."""

from __future__ import annotations

import threading

import pytest

from daemonset.informer import Informer, WatchFailed, WorkQueue, backoff_s


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drain(queue: WorkQueue) -> list:
    keys = []
    while (key := queue.get(timeout_s=0)) is not None:
        keys.append(key)
        queue.done(key)
    return keys


def test_a_key_is_queued_once_and_again_after_done_if_added_meanwhile():
    queue = WorkQueue(clock=Clock())
    for key in ("a", "b", "a", "a"):
        queue.add(key)
    assert queue.sizes()["ready"] == 2
    first = queue.get(timeout_s=0)
    assert first == "a"
    queue.add("a")  # while it is being worked on: not handed out twice at once
    assert queue.get(timeout_s=0) == "b"
    assert queue.get(timeout_s=0) is None
    queue.done("b")
    queue.done("a")
    assert drain(queue) == ["a"]


def test_one_pending_retry_per_key_with_capped_exponential_backoff():
    clock = Clock()
    queue = WorkQueue(clock=clock, rand=lambda: 1.0)  # no jitter: the whole delay
    delays = [queue.add_rate_limited("k") for _ in range(10)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    assert queue.sizes()["delayed"] == 1  # ten failures, one entry: the earliest due time
    assert queue.next_due_s("k") == 1.0
    clock.now = 0.5
    assert drain(queue) == []
    clock.now = 1.0
    assert drain(queue) == ["k"]
    assert queue.sizes()["delayed"] == 0
    queue.forget("k")
    assert queue.add_rate_limited("k") == 1  # a success starts the backoff again


def test_forget_drops_the_pending_retry():
    clock = Clock()
    queue = WorkQueue(clock=clock)
    queue.add_rate_limited("k")
    queue.forget("k")
    clock.now = 100
    assert drain(queue) == [] and queue.sizes() == {"ready": 0, "processing": 0, "delayed": 0, "failures": 0}


@pytest.mark.parametrize("failures", range(12))
def test_jitter_stays_between_half_and_the_whole_step(failures):
    whole = min(60.0, 2.0**failures)
    assert backoff_s(failures, 1.0, 60.0, rand=lambda: 0.0) == whole / 2
    assert backoff_s(failures, 1.0, 60.0, rand=lambda: 1.0) == whole


def test_get_waits_for_a_due_retry():
    queue = WorkQueue()
    queue.add_after("later", 0.05)
    assert queue.get(timeout_s=2) == "later"


class FakeStream(list):
    closed = False

    def close(self):
        self.closed = True


def obj(name: str, rv: int, **extra) -> dict:
    return {"metadata": {"namespace": "ns", "name": name, "resourceVersion": str(rv)}, **extra}


def test_relist_reports_additions_changes_and_objects_that_vanished_between_lists():
    changes = []
    listings = iter([([obj("a", 1), obj("b", 2)], "2"), ([obj("b", 3), obj("c", 4)], "4")])
    informer = Informer("things", lambda: next(listings), None, lambda o: o["metadata"]["name"],
                        lambda k, old, new: changes.append((k, old is not None, new is not None)))
    assert informer.relist() == "2"
    assert sorted(changes) == [("a", False, True), ("b", False, True)]
    changes.clear()
    assert informer.relist() == "4"
    assert sorted(changes) == [("a", True, False), ("b", True, True), ("c", False, True)]
    assert sorted(informer.keys()) == ["b", "c"]


def test_watch_resumes_from_the_last_version_and_lists_again_after_410():
    seen_rvs, changes = [], []
    streams = iter([
        FakeStream([{"type": "ADDED", "object": obj("a", 5)}, {"type": "BOOKMARK", "object": obj("", 6)}]),
        FakeStream([{"type": "MODIFIED", "object": obj("a", 7)},
                    {"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}}]),
        FakeStream([{"type": "DELETED", "object": obj("a", 9)}]),
    ])
    lists = iter([([obj("a", 7), obj("z", 8)], "8")])
    informer = Informer("things", lambda: next(lists), None, lambda o: o["metadata"]["name"],
                        lambda k, old, new: changes.append((k, new is not None)))

    def watch(rv, timeout_s):
        seen_rvs.append(rv)
        try:
            return next(streams)
        except StopIteration:
            informer.stop()
            return FakeStream()

    informer.watch_fn = watch
    informer.run("4")
    assert seen_rvs == ["4", "6", "8", "9"]  # resumed after the bookmark; after the 410 from the list's version
    assert informer.relists == 1
    assert changes == [("a", True), ("a", True), ("z", True), ("a", False)]
    assert informer.keys() == ["z"]


def test_watch_errors_back_off_and_list_again():
    waits = []
    calls = {"list": 0}

    def list_fn():
        calls["list"] += 1
        if calls["list"] >= 3:
            informer.stop()
        return [], str(calls["list"])

    def watch(rv, timeout_s):
        raise WatchFailed(500, "etcd unavailable")

    informer = Informer("things", list_fn, watch, lambda o: o["metadata"]["name"], lambda *a: None,
                        rand=lambda: 1.0)
    informer._stop.wait = lambda s: waits.append(s)  # record the backoff instead of sleeping
    informer.run("1")
    assert waits[:3] == [0.2, 0.4, 0.8]


def test_store_keeps_the_newer_version():
    informer = Informer("things", None, None, lambda o: o["metadata"]["name"], lambda *a: None)
    informer.replace([obj("a", 10)])
    informer.store(obj("a", 9, note="older write answer"))
    assert informer.get("a")["metadata"]["resourceVersion"] == "10"
    informer.store(obj("a", 11))
    assert informer.get("a")["metadata"]["resourceVersion"] == "11"


def test_wait_idle_counts_work_in_hand():
    queue = WorkQueue()
    queue.add("k")
    key = queue.get(timeout_s=0)
    assert not queue.wait_idle(0.05)
    threading.Timer(0.05, queue.done, args=(key,)).start()
    assert queue.wait_idle(2)
