"""The controller against the fake API server (real ``kubernetes`` client, HTTPS, the manifests'
own ClusterRole) and a fake engine that speaks the engine's interface (owner in the record,
events, supersede): faults injected on the API side, time driven on the engine side."""

from __future__ import annotations

import dataclasses
import pathlib
import threading
import time

import pytest
import yaml

from daemonset import crd
from daemonset import reconcile as rc
from daemonset.types import (
    END_EXPIRED,
    END_REQUESTED,
    UNLIMITED,
    ApplyRequest,
    ApplyResult,
    Conflict,
    EngineEvent,
    EventKind,
    ExperimentInfo,
    Failure,
    Method,
    Owner,
    Phase,
    ResolvedTarget,
    Resource,
    ResourceResult,
    RevertIncomplete,
    RevertRequest,
    RevertResult,
    RuntimeUnavailable,
    Target,
    TargetNotFound,
)
from tests.support.fakeapi import FakeKubeAPI

ROOT = pathlib.Path(__file__).resolve().parents[2]
NODE = "n1"
AGENT = "system:serviceaccount:kubectl-chaos:chaos-agent"
ORIGINAL = {Resource.CPU: 1000, Resource.MEMORY: 256 * 2**20, Resource.INGRESS: UNLIMITED, Resource.EGRESS: UNLIMITED}


# -- a fake engine with the engine's interface ------------------------------------------------------


@dataclasses.dataclass
class _Record:
    target: ResolvedTarget
    owner: Owner
    desired: dict[Resource, int]
    experiment_id: str
    expires_at: float | None
    phase: Phase = Phase.ACTIVE
    failure: Failure | None = None


class FakeEngine:
    """Records in memory, keyed by namespace/pod/container; the pods are the fake API's. Time is the
    test's: ``expire``, ``retry`` and ``resize`` stand for what the supervisor would do."""

    node_name = NODE

    def __init__(self, api: FakeKubeAPI):
        self.api = api
        self.records: dict[str, _Record] = {}
        self.listeners: list = []
        self.runtime_down = False
        self.refuse_revert: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._ids = 0

    def subscribe(self, callback) -> None:
        self.listeners.append(callback)

    def _emit(self, kind: EventKind, rec: _Record, **fields) -> None:
        event = EngineEvent(kind, rec.target, rec.owner, rec.experiment_id, **fields)
        for callback in self.listeners:
            callback(event)

    def _pod_uid(self, target: Target) -> str:
        try:
            return self.api.get(self.api.resource_type("", "pods"), target.namespace, target.pod)["metadata"]["uid"]
        except Exception:
            raise TargetNotFound(f"pod {target.namespace}/{target.pod} not found on this node") from None

    def _results(self, rec: _Record, previous: dict[Resource, int], in_force: dict[Resource, int]):
        return tuple(ResourceResult(r, ORIGINAL[r], previous.get(r, ORIGINAL[r]), v, in_force.get(r, v),
                                    Method.NETLINK if r in (Resource.INGRESS, Resource.EGRESS) else Method.CRI)
                     for r, v in rec.desired.items())

    def apply(self, req: ApplyRequest) -> ApplyResult:
        req.validate()
        self.calls.append(("apply", req.target.pod))
        if self.runtime_down:
            raise RuntimeUnavailable("connection refused (containerd restarting)")
        uid = self._pod_uid(req.target)
        key = f"{req.target.namespace}/{req.target.pod}/{req.target.container}"
        with self._lock:
            rec = self.records.get(key)
            if rec is not None and rec.owner != req.owner:
                raise Conflict(f"container {req.target.container} is already changed by {rec.owner.describe()}")
            if rec is not None and rec.phase is not Phase.ACTIVE:
                raise Conflict(f"container {req.target.container} is still being reverted")
            if rec is None:
                self._ids += 1
                rec = _Record(ResolvedTarget(req.target.namespace, req.target.pod, req.target.container, "c" * 64,
                                             pod_uid=uid, node_name=NODE), req.owner, {}, f"e{self._ids}", None)
                self.records[key] = rec
            rec.desired.update(req.changes.as_map())
            if req.duration_s is not None:
                rec.expires_at = time.time() + req.duration_s
        self._emit(EventKind.APPLIED, rec, expires_at=rec.expires_at)
        return ApplyResult(rec.experiment_id, rec.target, self._results(rec, {}, rec.desired), rec.expires_at)

    def revert(self, req: RevertRequest) -> RevertResult:
        self.calls.append(("revert", req.target.pod))
        if self.runtime_down:
            raise RuntimeUnavailable("connection refused (containerd restarting)")
        key = f"{req.target.namespace}/{req.target.pod}/{req.target.container}"
        with self._lock:
            rec = self.records.get(key)
            if rec is None:
                return RevertResult(ResolvedTarget(req.target.namespace, req.target.pod, req.target.container or "",
                                                   ""), (), was_active=False)
            if req.owner is not None and rec.owner != req.owner:
                raise Conflict(f"the experiment on {key} belongs to {rec.owner.describe()}")
            if key in self.refuse_revert:
                rec.phase = Phase.REVERT_FAILING
                rec.failure = Failure("memory 128Mi is below the 200Mi this container uses", 1, time.time(),
                                      time.time() + 1)
                raise RevertIncomplete("memory 128Mi is below the 200Mi this container uses; retrying",
                                       next_retry_at=rec.failure.next_retry_at)
            del self.records[key]
        results = self._results(rec, rec.desired, ORIGINAL)
        self._emit(EventKind.ENDED, rec, reason=END_REQUESTED, resources=results)
        return RevertResult(rec.target, results, was_active=True)

    def supersede(self, target: Target, reason: str) -> bool:
        self.calls.append(("supersede", target.pod))
        with self._lock:
            rec = self.records.pop(f"{target.namespace}/{target.pod}/{target.container}", None)
        if rec is None:
            return False
        self._emit(EventKind.ENDED, rec, reason=reason)  # as the engine: nothing restored, nothing to report
        return True

    def list(self, namespace: str | None = None) -> list[ExperimentInfo]:
        with self._lock:
            recs = [r for r in self.records.values() if namespace in (None, r.target.namespace)]
        return [ExperimentInfo(r.experiment_id, r.target, self._results(r, {}, r.desired), 0.0, r.expires_at, 0,
                               phase=r.phase, owner=r.owner, failure=r.failure) for r in recs]

    # -- what the supervisor would do --

    def expire(self, key: str) -> None:
        with self._lock:
            rec = self.records.pop(key)
        self._emit(EventKind.ENDED, rec, reason=END_EXPIRED, resources=self._results(rec, rec.desired, ORIGINAL))

    def retry(self, key: str, *, succeed: bool) -> None:
        with self._lock:
            rec = self.records[key]
            if succeed:
                del self.records[key]
            else:
                attempts = rec.failure.attempts + 1
                rec.failure = Failure(rec.failure.reason, attempts, rec.failure.since, time.time() + 2**attempts)
        if succeed:
            self._emit(EventKind.ENDED, rec, reason=END_REQUESTED, resources=self._results(rec, rec.desired, ORIGINAL))
        else:
            self._emit(EventKind.REVERT_FAILING, rec, reason=rec.failure.reason,
                       next_retry_at=rec.failure.next_retry_at)


# -- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture
def fakeapi():
    with FakeKubeAPI() as api:
        api.install_crd(yaml.safe_load((ROOT / "daemonset/manifests/crd.yaml").read_text()))
        api.add_namespace("shop", labels={"kubectl-chaos.io/enabled": "true"})
        api.add_node(NODE, cpu="4", memory="16Gi")
        yield api


@pytest.fixture
def agent_client(fakeapi, tmp_path):
    """The agent's client: its own token, bound to the manifests' ClusterRole."""
    from kubernetes import config

    role = next(d for d in yaml.safe_load_all((ROOT / "daemonset/manifests/rbac.yaml").read_text())
                if d and d["kind"] == "ClusterRole")
    token = fakeapi.add_user(AGENT)
    fakeapi.bind(AGENT, role)
    client = config.new_client_from_config(config_file=fakeapi.write_kubeconfig(tmp_path / "kc", [(AGENT, token)]))
    yield client
    client.close()


@pytest.fixture
def engine(fakeapi):
    return FakeEngine(fakeapi)


@pytest.fixture
def start(engine, agent_client):
    from daemonset.controller import Controller

    started = []

    def start_controller(**kwargs) -> Controller:
        kwargs.setdefault("resync_s", 3600.0)  # these tests must pass on events alone
        kwargs.setdefault("rand", lambda: 0.0)  # the shortest backoff the jitter allows
        controller = Controller(engine, agent_client, NODE, **kwargs)
        controller.start()
        started.append(controller)
        return controller

    yield start_controller
    for controller in started:
        controller.stop()


def rtype(api):
    return api.resource_type(crd.GROUP, crd.PLURAL)


def add_pod(api, name: str, *, labels=None, resources=None) -> dict:
    container = {"name": "app", "image": "busybox", **({"resources": resources} if resources else {})}
    return api.create({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": name, "namespace": "shop", "labels": labels or {}},
                       "spec": {"nodeName": NODE, "containers": [container]}, "status": {"phase": "Running"}})


def add_chaos(api, name: str, spec: crd.ChaosSpec | None = None) -> dict:
    return api.create(crd.build("shop", spec or crd.ChaosSpec(pod=name, container="app", cpu_millicpu=500),
                                name=name))


def get(api, name: str) -> dict | None:
    try:
        return api.get(rtype(api), "shop", name)
    except Exception:
        return None


def entry(api, name: str, pod: str | None = None) -> dict:
    return crd.target_entry((get(api, name) or {}).get("status"), pod or name) or {}


def events(api, pod: str) -> list[tuple[str, str]]:
    items = api.list(api.resource_type("", "events"), "shop")[0]
    items.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
    return [(e["reason"], e["message"]) for e in items if e["involvedObject"]["name"] == pod]


def wait_for(condition, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


# -- the tests ----------------------------------------------------------------------------------------


def test_apply_then_the_engine_ends_it_and_the_finalizer_goes(fakeapi, engine, start):
    start()
    add_pod(fakeapi, "web")
    add_chaos(fakeapi, "web", crd.ChaosSpec(pod="web", container="app", cpu_millicpu=500, duration_s=600))
    wait_for(lambda: entry(fakeapi, "web").get("phase") == "Applied", what="Applied")
    obj = get(fakeapi, "web")
    assert obj["metadata"]["finalizers"] == [crd.finalizer_for(NODE)]
    (record,) = engine.records.values()
    assert record.owner == Owner(rc.OwnerKind.RESOURCE_CHAOS, "shop", "web", obj["metadata"]["uid"])
    engine.expire("shop/web/app")
    done = wait_for(lambda: (o := get(fakeapi, "web")) and entry(fakeapi, "web").get("phase") == "Reverted"
                    and not o["metadata"].get("finalizers") and o, what="Reverted, finalizer dropped")
    (target,) = done["status"]["targets"]
    assert target["message"] == "reverted: expired" and target["changes"][0]["restored"] == 1000
    wait_for(lambda: [r for r, _ in events(fakeapi, "web")] == ["Applied", "Reverted"], what="the two Events")


def test_status_converges_after_a_period_of_409_on_every_write(fakeapi, engine, start):
    controller = start()
    add_pod(fakeapi, "busy")
    fakeapi.fail_writes(409, seconds=2.5, user=AGENT)
    add_chaos(fakeapi, "busy")
    time.sleep(1.0)
    assert engine.calls == []  # no apply before this node's finalizer is on the object
    assert entry(fakeapi, "busy") == {}
    wait_for(lambda: entry(fakeapi, "busy").get("phase") == "Applied", timeout_s=15, what="Applied after the 409s")
    assert fakeapi.injected() >= 2
    assert engine.calls == [("apply", "busy")]
    assert controller.queue.sizes()["delayed"] == 0  # the success forgot the retry
    wait_for(lambda: [r for r, _ in events(fakeapi, "busy")] == ["Applied"], what="one Applied event")


def test_failed_status_write_does_not_apply_again(fakeapi, engine, start):
    """Only the status update conflicts (the finalizer patch goes through): applied once, the status
    owed is kept and written once the API takes it, one Event."""
    start()
    add_pod(fakeapi, "owed")
    fakeapi.fail_writes(409, seconds=2.5, user=AGENT, verbs=("update",))
    add_chaos(fakeapi, "owed")
    wait_for(lambda: engine.calls, what="the apply")
    wait_for(lambda: entry(fakeapi, "owed").get("phase") == "Applied", timeout_s=15, what="Applied after the 409s")
    # The Event is posted just after the status write (best effort, its own request): wait for it,
    # then check that a second one does not follow.
    wait_for(lambda: events(fakeapi, "owed"), what="the Applied Event")
    time.sleep(0.3)
    assert engine.calls == [("apply", "owed")]
    assert [r for r, _ in events(fakeapi, "owed")] == ["Applied"]


def test_server_errors_are_retried_too(fakeapi, engine, start):
    start()
    add_pod(fakeapi, "flaky")
    fakeapi.fail_writes(503, times=3, user=AGENT)
    add_chaos(fakeapi, "flaky")
    wait_for(lambda: entry(fakeapi, "flaky").get("phase") == "Applied", timeout_s=15, what="Applied after the 503s")
    assert fakeapi.injected() == 3


def test_watch_resumes_after_a_410_in_the_middle_of_the_stream(fakeapi, engine, start):
    controller = start(watch_timeout_s=300)
    add_pod(fakeapi, "before")
    add_chaos(fakeapi, "before")
    wait_for(lambda: entry(fakeapi, "before").get("phase") == "Applied", what="the first Applied")
    relists = controller.rcs.relists, controller.pods.relists
    fakeapi.expire_watches()
    add_pod(fakeapi, "after")
    add_chaos(fakeapi, "after")
    wait_for(lambda: entry(fakeapi, "after").get("phase") == "Applied", what="Applied after the 410")
    assert controller.rcs.relists > relists[0] and controller.pods.relists > relists[1]
    fakeapi.delete(rtype(fakeapi), "shop", "after")
    wait_for(lambda: get(fakeapi, "after") is None, what="the object to go")
    assert [k for k in engine.records] == ["shop/before/app"]


@pytest.mark.parametrize("first", ["pod", "object"])
def test_pod_and_object_deleted_in_either_order(fakeapi, engine, start, first):
    start()
    add_pod(fakeapi, "gone", labels={"app": "gone"})
    add_chaos(fakeapi, "gone", crd.ChaosSpec(selector={"matchLabels": {"app": "gone"}}, cpu_millicpu=300))
    wait_for(lambda: entry(fakeapi, "gone").get("phase") == "Applied", what="Applied")
    pods = fakeapi.resource_type("", "pods")
    if first == "pod":
        fakeapi.delete(pods, "shop", "gone")
        wait_for(lambda: entry(fakeapi, "gone").get("phase") == "Reverted", what="Reverted: pod deleted")
        assert entry(fakeapi, "gone")["message"] == "reverted: pod deleted"
        wait_for(lambda: not get(fakeapi, "gone")["metadata"].get("finalizers"), what="the finalizer to go")
        fakeapi.delete(rtype(fakeapi), "shop", "gone")
    else:
        fakeapi.delete(rtype(fakeapi), "shop", "gone")
        wait_for(lambda: get(fakeapi, "gone") is None, what="the object to go")
        fakeapi.delete(pods, "shop", "gone")
    wait_for(lambda: get(fakeapi, "gone") is None, what="the object to go")
    assert engine.records == {}
    assert ("revert", "gone") in engine.calls


@pytest.mark.parametrize("first", ["pod", "object"])
def test_deletions_while_the_agent_is_down_in_either_order(fakeapi, engine, start, first):
    controller = start()
    add_pod(fakeapi, "away")
    add_chaos(fakeapi, "away")
    wait_for(lambda: entry(fakeapi, "away").get("phase") == "Applied", what="Applied")
    controller.stop()
    pods = fakeapi.resource_type("", "pods")
    for what in ((pods, rtype(fakeapi)) if first == "pod" else (rtype(fakeapi), pods)):
        fakeapi.delete(what, "shop", "away")
    assert get(fakeapi, "away")["metadata"]["deletionTimestamp"]  # held by this node's finalizer
    start()
    wait_for(lambda: get(fakeapi, "away") is None, what="the object to go after the restart")
    assert engine.records == {}


def test_object_recreated_while_down_reverts_the_old_and_applies_the_new(fakeapi, engine, start):
    controller = start()
    add_pod(fakeapi, "again")
    add_chaos(fakeapi, "again")
    wait_for(lambda: entry(fakeapi, "again").get("phase") == "Applied", what="Applied")
    old_uid = get(fakeapi, "again")["metadata"]["uid"]
    controller.stop()
    obj = get(fakeapi, "again")
    obj["metadata"]["finalizers"] = []
    fakeapi.update(rtype(fakeapi), "shop", "again", obj)
    fakeapi.delete(rtype(fakeapi), "shop", "again")
    add_chaos(fakeapi, "again", crd.ChaosSpec(pod="again", container="app", cpu_millicpu=200))
    start()
    wait_for(lambda: entry(fakeapi, "again").get("phase") == "Applied", what="the new one Applied")
    (record,) = engine.records.values()
    assert record.owner.uid != old_uid and record.desired == {Resource.CPU: 200}
    assert [c for c, _ in engine.calls] == ["apply", "revert", "apply"]


def test_revert_refused_is_reverting_with_one_event_until_it_succeeds(fakeapi, engine, start):
    start()
    add_pod(fakeapi, "held")
    add_chaos(fakeapi, "held")
    wait_for(lambda: entry(fakeapi, "held").get("phase") == "Applied", what="Applied")
    engine.refuse_revert.add("shop/held/app")
    fakeapi.delete(rtype(fakeapi), "shop", "held")
    wait_for(lambda: entry(fakeapi, "held").get("phase") == "Reverting", what="Reverting")
    assert "below the 200Mi" in entry(fakeapi, "held")["message"]
    assert crd.node_entry(get(fakeapi, "held")["status"], NODE)["phase"] == "Reverting"
    for _ in range(3):
        engine.retry("shop/held/app", succeed=False)
    wait_for(lambda: "(attempt 4)" in entry(fakeapi, "held")["message"], what="the retries in the status")
    assert [r for r, _ in events(fakeapi, "held")].count("RevertFailing") == 1
    assert [c for c, _ in engine.calls].count("revert") == 1  # the engine retries, not the controller
    engine.retry("shop/held/app", succeed=True)
    wait_for(lambda: get(fakeapi, "held") is None, what="the object to go once the revert succeeded")
    wait_for(lambda: [r for r, _ in events(fakeapi, "held")] == ["Applied", "RevertFailing", "Reverted"],
             what="one Event per episode")


def test_in_place_resize_supersedes_without_restoring(fakeapi, engine, start):
    start()
    limits = {"limits": {"cpu": "1", "memory": "256Mi"}}
    add_pod(fakeapi, "grow", resources=limits)
    add_chaos(fakeapi, "grow")
    wait_for(lambda: entry(fakeapi, "grow").get("phase") == "Applied", what="Applied")
    # kubectl patch pod grow --subresource resize -p '{"spec":{"containers":[{"name":"app",...}]}}'
    fakeapi.patch(fakeapi.resource_type("", "pods"), "shop", "grow",
                  {"spec": {"containers": [{"name": "app", "resources": {"limits": {"cpu": "1500m",
                                                                                    "memory": "256Mi"}}}]}},
                  "application/strategic-merge-patch+json")
    done = wait_for(lambda: (e := entry(fakeapi, "grow")).get("phase") == "Reverted" and e,
                    what="Reverted (superseded)")
    assert done["message"] == "superseded by an in-place resize: the pod's new resources stand; nothing was " \
                              "restored over them"
    assert "restored" not in done["changes"][0]
    assert ("supersede", "grow") in engine.calls and ("revert", "grow") not in engine.calls
    wait_for(lambda: [r for r, _ in events(fakeapi, "grow")] == ["Applied", "Superseded"], what="the Events")
    wait_for(lambda: not get(fakeapi, "grow")["metadata"].get("finalizers"), what="the finalizer to go")


def test_runtime_down_is_pending_and_retried_with_backoff(fakeapi, engine, start):
    controller = start()
    engine.runtime_down = True
    add_pod(fakeapi, "later")
    add_chaos(fakeapi, "later")
    wait_for(lambda: entry(fakeapi, "later").get("phase") == "Pending", what="Pending")
    assert entry(fakeapi, "later")["message"].startswith("the container runtime does not answer")
    wait_for(lambda: len(engine.calls) >= 3, timeout_s=10, what="retries")
    assert controller.queue.sizes()["delayed"] <= 1
    engine.runtime_down = False
    wait_for(lambda: entry(fakeapi, "later").get("phase") == "Applied", timeout_s=15, what="Applied once it is back")


def test_messages_name_no_other_namespace(fakeapi, engine, start):
    """A conflict with an experiment owned by an object of another namespace names neither."""
    start()
    add_pod(fakeapi, "shared")
    engine.records["shop/shared/app"] = _Record(
        ResolvedTarget("shop", "shared", "app", "c" * 64, pod_uid=fakeapi.get(fakeapi.resource_type("", "pods"), "shop",
                                                                               "shared")["metadata"]["uid"]),
        Owner(rc.OwnerKind.RESOURCE_CHAOS, "bank", "vault", "u-9"), {Resource.CPU: 100}, "e-other", None)
    add_chaos(fakeapi, "shared")
    wait_for(lambda: entry(fakeapi, "shared").get("phase") == "Failed", what="Failed")
    texts = [entry(fakeapi, "shared")["message"], *(m for _, m in events(fakeapi, "shared"))]
    assert texts and all("bank" not in t and "vault" not in t for t in texts), texts


# -- bounded delayed work -----------------------------------------------------------------------------


def test_an_hour_of_resyncs_keeps_the_scheduled_entries_bounded(fakeapi, engine, agent_client, capsys):
    """100 Applied objects (and 5 whose runtime never answers) through an hour of 60 s resyncs on a
    fake clock: the queue never holds more than one entry per object, and retries stay one per key."""
    from daemonset.controller import Controller

    now = [0.0]
    controller = Controller(engine, agent_client, NODE, resync_s=60.0, clock=lambda: now[0], rand=lambda: 0.5)
    for i in range(100):
        add_pod(fakeapi, f"p{i}")
        add_chaos(fakeapi, f"p{i}")
    stuck = {f"stuck{i}" for i in range(5)}
    for name in sorted(stuck):
        add_pod(fakeapi, name)
        add_chaos(fakeapi, name)
    real_apply = engine.apply
    stuck_calls = []

    def apply(req):
        if req.target.pod in stuck:
            stuck_calls.append(req.target.pod)
            raise RuntimeUnavailable("connection refused")
        return real_apply(req)

    engine.apply = apply
    controller.start(threads=False)
    controller.work_ready()
    # The watches are not running here: feed the caches from the API as the watch would.
    controller.rcs.replace(fakeapi.list(rtype(fakeapi), None)[0])
    assert sum(entry(fakeapi, f"p{i}").get("phase") == "Applied" for i in range(100)) == 100
    peak = {"ready": 0, "delayed": 0, "failures": 0}
    tries_before = len(stuck_calls)
    requests_before = len(fakeapi.requests)
    next_resync = 60.0
    for second in range(1, 3601):
        now[0] = float(second)
        if now[0] >= next_resync:
            controller.resync()
            next_resync += 60.0
        for name, size in controller.queue.sizes().items():
            if name in peak:
                peak[name] = max(peak[name], size)
        controller.work_ready()
    stuck_tries = len(stuck_calls) - tries_before
    api_requests = len(fakeapi.requests) - requests_before
    with capsys.disabled():
        print(f"\n[bounded timers] 105 objects, 60 resyncs over 3600 s (fake clock): peak ready {peak['ready']}, "
              f"peak delayed {peak['delayed']}, peak failure counters {peak['failures']}; "
              f"retries of the 5 stuck objects in the hour: {stuck_tries}; API requests in the hour: {api_requests}")
    assert peak["ready"] <= 105
    assert peak["delayed"] <= len(stuck)
    assert stuck_tries <= 5 * (3600 / 30)  # at most one try per key every 30 s (60 s cap, half jitter)
    assert stuck_tries >= 5 * (3600 / 60) - 5  # ... and at least one a minute: retried to the end
    assert [c for c, _ in engine.calls].count("apply") == 100  # the Applied ones never again
    assert api_requests == 0  # nothing changed: nothing written (the same Pending answer is not written again)
    controller.stop()


# -- #11 leftover: entries of gone pods pruned; #13: figures for top only while watched --------------


def test_entries_of_deleted_pods_are_pruned_from_the_status(fakeapi, engine, start):
    controller = start(prune_after_s=0.0)
    for name in ("a", "b"):
        add_pod(fakeapi, name, labels={"app": "web"})
    add_chaos(fakeapi, "sel", crd.ChaosSpec(selector={"matchLabels": {"app": "web"}}, container="app",
                                            cpu_millicpu=500))
    wait_for(lambda: {e["pod"]: e["phase"] for e in (get(fakeapi, "sel").get("status") or {}).get("targets") or []}
             == {"a": "Applied", "b": "Applied"}, what="both Applied")
    fakeapi.delete(fakeapi.resource_type("", "pods"), "shop", "a")
    wait_for(lambda: ("revert", "a") in engine.calls, what="the revert of the deleted pod")
    for _ in range(50):  # the Reverted entry is written, then (older than prune_after_s) no longer
        controller.resync()
        if [e["pod"] for e in get(fakeapi, "sel")["status"]["targets"]] == ["b"]:
            break
        time.sleep(0.1)
    status = get(fakeapi, "sel")["status"]
    assert [e["pod"] for e in status["targets"]] == ["b"] and status["targets"][0]["phase"] == "Applied"
    assert controller.status_pruned == 1
    assert crd.node_entry(status, NODE)["targets"] == 1


def test_figures_for_top_are_written_only_while_someone_watches(fakeapi, engine, start):
    """The API writes top costs, counted at the server: none unwatched; one per interval per node
    watched (the first interval only samples); one last apply that takes the figures off."""
    from daemonset import observe, watch

    used_ns = [0]

    def sample(namespace=None):
        used_ns[0] += 300_000_000  # 0.3 cores over each 1 s step of the fake monotonic clock below
        counters = observe.Counters(at_s=used_ns[0] / 300_000_000, cpu_usage_ns=used_ns[0], nr_periods=10 * used_ns[0]
                                    // 300_000_000, nr_throttled=5 * used_ns[0] // 300_000_000,
                                    memory_working_set_bytes=2**20, memory_limit_bytes=None, oom_kills=0)
        return [(i, counters, 0) for i in engine.list(namespace)]

    engine.sample = sample
    controller = start(observe_interval_s=0.2)
    add_pod(fakeapi, "web")
    add_chaos(fakeapi, "web")
    wait_for(lambda: entry(fakeapi, "web").get("phase") == "Applied", what="Applied")

    def observe_writes() -> int:
        return sum(1 for r in fakeapi.requests if r.user == AGENT and r.path.split("?")[0].endswith("/status")
                   and "observe" in r.path)

    time.sleep(1.0)
    assert observe_writes() == 0 and controller.observe_writes == 0  # nobody watches: nothing written
    mark = crd.rfc3339(time.time() + 2)
    fakeapi.patch(rtype(fakeapi), "shop", "web", {"metadata": {"annotations": {watch.WATCH_ANNOTATION: mark}}},
                  "application/merge-patch+json")
    observed = wait_for(lambda: (get(fakeapi, "web").get("status") or {}).get("observed"), what="figures")
    (figures,) = observed
    assert figures["pod"] == "web" and figures["node"] == NODE and figures["watchUntil"] == mark
    assert figures["cpuCores"] == pytest.approx(0.3) and figures["cpuThrottledShare"] == pytest.approx(0.5)
    # The mark runs out (at most 2 s here): one last apply takes this node's figures off, then nothing.
    wait_for(lambda: not (get(fakeapi, "web").get("status") or {}).get("observed"), timeout_s=6,
             what="the figures taken off")
    written = observe_writes()
    time.sleep(1.0)
    assert observe_writes() == written == controller.observe_writes
    # 2 s watched at a 0.2 s interval: ~9 writes with figures (the first interval only samples), 1 clearing.
    assert 5 <= written <= 12, written
    print(f"\n[top writes] watched ~2 s at a 0.2 s interval: {written} status writes; unwatched 1 s: 0")
