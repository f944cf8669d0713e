"""kubectl chaos top in cluster mode takes its watch-until marks off however it ends.

The cluster backend over an in-memory API: one ResourceChaos in force. An interrupt (Ctrl-C, or
SIGTERM which top turns into one) can come while the mark's PATCH is answered, after the server has
written it: the mark must come off all the same.
"""

from __future__ import annotations

import copy

import pytest

from daemonset import crd, watch
from plugin.backends.cluster import ClusterBackend

OBJ = {"metadata": {"namespace": "shop", "name": "web.app", "resourceVersion": "1"},
       "status": {"targets": [{"pod": "web", "phase": crd.APPLIED}]}}


class InterruptedApi:
    """Applies every request; the first mark's answer is cut short by an interrupt."""

    host = "https://api.test:6443"

    def __init__(self):
        self.obj = copy.deepcopy(OBJ)
        self.interrupt_on_mark = True

    def request(self, method, path, *, body=None, **_):
        if method == "GET":
            return {"items": [copy.deepcopy(self.obj)]} if path.endswith(crd.PLURAL) else copy.deepcopy(self.obj)
        assert method == "PATCH"
        annotations = self.obj["metadata"].setdefault("annotations", {})
        value = body["metadata"]["annotations"][watch.WATCH_ANNOTATION]
        if value is None:
            annotations.pop(watch.WATCH_ANNOTATION, None)
        else:
            annotations[watch.WATCH_ANNOTATION] = value
        if value is not None and self.interrupt_on_mark:
            self.interrupt_on_mark = False
            raise KeyboardInterrupt  # written on the server, the answer never read
        return copy.deepcopy(self.obj)

    def close(self):
        pass


def backend(api) -> ClusterBackend:
    b = ClusterBackend.__new__(ClusterBackend)  # no kubeconfig: the API is in memory
    b.api, b.timeout_s, b._namespace = api, 1.0, "shop"
    return b


def test_a_mark_whose_answer_was_cut_short_still_comes_off():
    api = InterruptedApi()
    with pytest.raises(KeyboardInterrupt):
        next(backend(api).top("shop", 1.0, 0))
    assert watch.WATCH_ANNOTATION not in api.obj["metadata"]["annotations"]


def test_a_refresh_left_unread_is_closed_and_its_mark_comes_off():
    api = InterruptedApi()
    api.interrupt_on_mark = False
    refreshes = backend(api).top("shop", 1.0, 0)
    next(refreshes)
    assert watch.WATCH_ANNOTATION in api.obj["metadata"]["annotations"]
    refreshes.close()
    assert watch.WATCH_ANNOTATION not in api.obj["metadata"]["annotations"]
