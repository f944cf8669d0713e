"""daemonset.reconcile: what the controller decides for one ResourceChaos, case by case (pure)."""

from __future__ import annotations

import dataclasses

import pytest

from daemonset import crd
from daemonset import reconcile as rc
from daemonset.types import (
    END_EXPIRED,
    END_REQUESTED,
    END_SUPERSEDED,
    NODE_LOCAL,
    EngineEvent,
    EventKind,
    ExperimentInfo,
    Failure,
    Method,
    Owner,
    OwnerKind,
    Phase,
    ResolvedTarget,
    Resource,
    ResourceResult,
    Target,
)

NODE = "n1"
NOW = 2_000_000_000.0
KEY = ("shop", "web-1.app")
FINALIZER = crd.finalizer_for(NODE)


def chaos(spec: crd.ChaosSpec | None = None, *, uid: str = "rc-1", generation: int = 1, targets=(),
          finalizers=(FINALIZER,), deleting: bool = False, name: str = "web-1.app") -> dict:
    obj = crd.build("shop", spec or crd.ChaosSpec(pod="web-1", container="app", cpu_millicpu=500), name=name)
    obj["metadata"].update(uid=uid, generation=generation, finalizers=list(finalizers), resourceVersion="7")
    if deleting:
        obj["metadata"]["deletionTimestamp"] = "2033-05-18T03:33:20Z"
    if targets:
        obj["status"] = {"targets": [dict(t) for t in targets]}
    return obj


def pod(name: str = "web-1", *, uid: str = "pod-1", labels=None, phase: str = "Running", resources=None,
        status_resources=None, conditions=()) -> dict:
    container = {"name": "app", "image": "busybox"}
    if resources is not None:
        container["resources"] = resources
    status = {"phase": phase, "conditions": [dict(c) for c in conditions]}
    if status_resources is not None:
        status["containerStatuses"] = [{"name": "app", "resources": status_resources}]
    return {"metadata": {"name": name, "namespace": "shop", "uid": uid, "labels": labels or {}},
            "spec": {"nodeName": NODE, "containers": [container]}, "status": status}


def owner(uid: str = "rc-1", name: str = "web-1.app", namespace: str = "shop") -> Owner:
    return Owner(OwnerKind.RESOURCE_CHAOS, namespace, name, uid)


def cpu(original: int = 1000, in_force: int = 500, previous: int | None = None) -> ResourceResult:
    return ResourceResult(Resource.CPU, original, original if previous is None else previous, 500, in_force,
                          Method.CRI)


def experiment(pod_name: str = "web-1", *, who: Owner | None = None, phase: Phase = Phase.ACTIVE,
               pod_uid: str = "pod-1", resources=None, failure: Failure | None = None,
               experiment_id: str = "e1") -> ExperimentInfo:
    target = ResolvedTarget("shop", pod_name, "app", "c" * 64, pod_uid=pod_uid, node_name=NODE)
    return ExperimentInfo(experiment_id, target, tuple(resources if resources is not None else [cpu()]),
                          started_at=NOW - 60, expires_at=None, drift_corrections=0, phase=phase,
                          owner=who if who is not None else owner(), failure=failure)


def applied(pod_name: str = "web-1", *, generation: int = 1, experiment_id: str = "e1", uid: str = "pod-1",
            expires_at: str | None = None) -> dict:
    entry = {"pod": pod_name, "uid": uid, "node": NODE, "container": "app", "phase": crd.APPLIED,
             "observedGeneration": generation, "message": "", "lastTransitionTime": "2033-05-18T03:00:00Z",
             "experimentId": experiment_id, "method": "cri",
             "changes": [{"resource": "cpu", "unit": "millicores", "original": 1000, "applied": 500, "method": "cri"}]}
    if expires_at:
        entry["expiresAt"] = expires_at
    return entry


def run(obj, pods=(), experiments=(), **kwargs) -> list:
    return rc.reconcile(KEY, obj, {p["metadata"]["name"]: p for p in pods}, list(experiments), NODE,
                        now=kwargs.pop("now", NOW), **kwargs)


def kinds(actions) -> list[str]:
    return [type(a).__name__ + (f"({a.present})" if isinstance(a, rc.SetFinalizer) else "") for a in actions]


def only(actions, kind):
    found = [a for a in actions if isinstance(a, kind)]
    assert len(found) == 1, actions
    return found[0]


def status_of(actions) -> dict[str, dict]:
    writes = [a for a in actions if isinstance(a, rc.WriteStatus)]
    return {e["pod"]: e for w in writes for e in w.entries}


# -- the cases -------------------------------------------------------------------------------------


def test_new_object_adds_the_finalizer_then_applies_with_its_owner():
    obj = chaos(finalizers=(), spec=crd.ChaosSpec(pod="web-1", container="app", cpu_millicpu=500, duration_s=30))
    actions = run(obj, [pod()])
    assert kinds(actions) == ["SetFinalizer(True)", "Apply", "Remember", "SetFinalizer(False)"]
    apply = only(actions, rc.Apply)
    assert apply.request.target == Target("shop", "web-1", "app")
    assert apply.request.owner == owner()
    assert apply.request.changes.cpu_millicpu == 500 and apply.request.duration_s == 30
    assert apply.generation == 1


def test_pod_not_running_is_pending_and_written_once():
    actions = run(chaos(finalizers=()), [pod(phase="Pending")])
    (entry,) = status_of(actions).values()
    assert entry["phase"] == crd.PENDING and entry["message"] == "waiting for the pod to run"
    assert not any(isinstance(a, rc.Apply) for a in actions)
    again = run(chaos(finalizers=(), targets=[entry]), [pod(phase="Pending")])
    assert again == []


def test_container_of_another_resourcechaos_fails_with_its_name():
    other = experiment(who=owner(uid="rc-9", name="first"))
    actions = run(chaos(finalizers=()), [pod()], [other])
    entry = status_of(actions)["web-1"]
    assert entry["phase"] == crd.FAILED
    assert entry["message"] == "container app is already changed by ResourceChaos shop/first; reset that one first"
    assert only(actions, rc.Event).reason == "Failed"
    assert not any(isinstance(a, (rc.Apply, rc.Revert)) for a in actions)
    # The same answer is not written (nor announced) twice.
    assert run(chaos(finalizers=(), targets=[entry]), [pod()], [other]) == []


def test_node_local_experiment_on_the_container_fails():
    local = experiment(who=NODE_LOCAL, experiment_id="local-1")
    actions = run(chaos(finalizers=()), [pod()], [local])
    assert "already under a node-local experiment (local-1)" in status_of(actions)["web-1"]["message"]
    assert not any(isinstance(a, rc.Apply) for a in actions)


def test_spec_change_is_a_further_change_on_top():
    obj = chaos(generation=2, spec=crd.ChaosSpec(pod="web-1", container="app", memory_bytes=2**27),
                targets=[applied(generation=1)])
    apply = only(run(obj, [pod()], [experiment()]), rc.Apply)
    assert apply.request.changes.memory_bytes == 2**27
    assert apply.request.duration_s is None  # no duration of its own: the end time in force stays
    with_duration = chaos(generation=2, spec=crd.ChaosSpec(pod="web-1", container="app", cpu_millicpu=300,
                                                           duration_s=60), targets=[applied(generation=1)])
    assert only(run(with_duration, [pod()], [experiment()]), rc.Apply).request.duration_s == 60


def test_same_generation_already_answered_does_nothing():
    # After a restart the spec resources are remembered as they are now (to see a later resize).
    first = run(chaos(targets=[applied()]), [pod()], [experiment()])
    assert kinds(first) == ["Remember"]
    assert run(chaos(targets=[applied()]), [pod()], [experiment()], baselines=first[0].baselines) == []
    failed = dict(applied(), phase=crd.FAILED, message="nope")
    assert run(chaos(targets=[failed], finalizers=()), [pod()], []) == []
    reverted = dict(applied(), phase=crd.REVERTED, message="reverted: expired")
    assert run(chaos(targets=[reverted], finalizers=()), [pod()], []) == []


def test_applied_but_unanswered_status_applies_again_keeping_the_end_time():
    """The apply went through but its status write failed: the same values again, end time kept."""
    obj = chaos(spec=crd.ChaosSpec(pod="web-1", container="app", cpu_millicpu=500, duration_s=30))
    apply = only(run(obj, [pod()], [experiment()]), rc.Apply)
    assert apply.request.duration_s is None


def test_deleting_object_reverts_and_releases_the_finalizer():
    actions = run(chaos(deleting=True, targets=[applied()]), [pod()], [experiment()])
    assert kinds(actions) == ["Revert", "SetFinalizer(False)"]
    revert = actions[0]
    assert revert.reason == rc.REASON_DELETED and revert.owner == owner() and revert.previous["pod"] == "web-1"
    # Nothing left on the node: only the finalizer to drop.
    assert kinds(run(chaos(deleting=True), [pod()], [])) == ["SetFinalizer(False)"]
    assert run(chaos(deleting=True, finalizers=()), [pod()], []) == []


def test_pod_no_longer_matching_the_selector_is_reverted():
    spec = crd.ChaosSpec(selector={"matchLabels": {"chaos": "yes"}}, cpu_millicpu=300)
    obj = chaos(spec, targets=[applied()])
    actions = run(obj, [pod(labels={"chaos": "no"})], [experiment()])
    revert = only(actions, rc.Revert)
    assert revert.reason == rc.REASON_UNMATCHED and revert.write_status and revert.pod is not None
    assert kinds(actions)[-1] == "SetFinalizer(False)"


def test_pod_deleted_is_reverted_and_its_entry_kept():
    spec = crd.ChaosSpec(selector={"matchLabels": {"chaos": "yes"}}, cpu_millicpu=300)
    revert = only(run(chaos(spec, targets=[applied()]), [], [experiment()]), rc.Revert)
    assert revert.reason == rc.REASON_POD_DELETED and revert.pod is None and revert.previous is not None


def test_object_deleted_while_the_engine_holds_its_experiment():
    actions = run(None, [pod()], [experiment()])
    assert kinds(actions) == ["Revert"]
    assert actions[0].reason == rc.REASON_OBJECT_GONE and not actions[0].write_status
    assert actions[0].owner.uid == "rc-1"
    # Other owners' experiments and node-local ones are not ours to revert.
    assert run(None, [pod()], [experiment(who=NODE_LOCAL), experiment(who=owner(name="other"))]) == []


def test_object_recreated_with_the_same_name_reverts_the_old_one_first():
    old = experiment(who=owner(uid="rc-old"))
    actions = run(chaos(uid="rc-new", finalizers=()), [pod()], [old])
    assert kinds(actions) == ["Revert", "SetFinalizer(True)", "Apply", "Remember", "SetFinalizer(False)"]
    assert actions[0].owner.uid == "rc-old" and actions[0].reason == rc.REASON_OBJECT_GONE
    assert actions[2].request.owner.uid == "rc-new"


def test_pod_recreated_with_the_same_name_is_a_new_target():
    spec = crd.ChaosSpec(selector={"matchLabels": {"app": "web"}}, cpu_millicpu=300)
    actions = run(chaos(spec, targets=[applied(uid="pod-old")]), [pod(uid="pod-new", labels={"app": "web"})],
                  [experiment(pod_uid="pod-old")])
    assert kinds(actions)[:3] == ["Revert", "SetFinalizer(True)", "Apply"]
    assert actions[0].reason == rc.REASON_POD_REPLACED and actions[0].pod is None and not actions[0].write_status
    assert actions[2].pod["metadata"]["uid"] == "pod-new"


def test_ended_event_writes_reverted_with_the_values_read_back():
    ended = EngineEvent(EventKind.ENDED, experiment().target, owner(), "e1", reason=END_EXPIRED,
                        resources=(cpu(in_force=1000, previous=500),))
    actions = run(chaos(targets=[applied(expires_at="2033-05-18T03:33:00Z")]), [pod()], [], ended=[ended])
    entry = status_of(actions)["web-1"]
    assert entry["phase"] == crd.REVERTED and entry["message"] == "reverted: expired"
    assert entry["changes"][0]["restored"] == 1000 and "expiresAt" not in entry
    assert only(actions, rc.Event).reason == "Reverted"
    assert kinds(actions) == ["WriteStatus", "SetFinalizer(False)", "Event"]
    # An event whose experiment the engine still lists (emitted before it forgot it) counts as ended.
    assert status_of(run(chaos(targets=[applied()]), [pod()], [experiment()], ended=[ended]))["web-1"]["phase"] == \
        crd.REVERTED


def test_ended_event_fills_in_values_but_keeps_the_controllers_reason():
    written = dict(applied(), phase=crd.REVERTED, message=rc.ended_message(END_SUPERSEDED))
    ended = EngineEvent(EventKind.ENDED, experiment().target, owner(), "e1", reason=END_SUPERSEDED,
                        resources=(cpu(in_force=1500, previous=500),))
    actions = run(chaos(targets=[written]), [pod()], [], ended=[ended])
    entry = status_of(actions)["web-1"]
    assert entry["message"] == written["message"] and entry["changes"][0]["restored"] == 1500
    assert not any(isinstance(a, rc.Event) for a in actions)  # announced when it was superseded
    reset = EngineEvent(EventKind.ENDED, experiment().target, owner(), "e1", reason=END_REQUESTED,
                        resources=(cpu(in_force=1500, previous=500),))
    assert not any(isinstance(a, (rc.WriteStatus, rc.Event)) for a in run(chaos(targets=[entry]), [pod()], [],
                                                                            ended=[reset]))


def test_ended_without_an_event_says_so_instead_of_applying_again():
    actions = run(chaos(targets=[applied()]), [pod()], [])
    entry = status_of(actions)["web-1"]
    assert entry["phase"] == crd.REVERTED and entry["message"] == rc.UNKNOWN_END
    assert not any(isinstance(a, rc.Apply) for a in actions)
    expired = run(chaos(targets=[applied(expires_at="2033-05-18T03:00:00Z")]), [pod()], [])
    assert status_of(expired)["web-1"]["message"].startswith("reverted: expired")


def test_revert_failing_is_shown_with_one_event_per_episode():
    failing = experiment(phase=Phase.REVERT_FAILING,
                         failure=Failure("memory 128Mi is below the 200Mi in use", 1, NOW - 5, NOW + 1))
    actions = run(chaos(targets=[applied()]), [pod()], [failing])
    entry = status_of(actions)["web-1"]
    assert entry["phase"] == crd.REVERTING
    assert entry["message"] == ("putting the originals back failed: memory 128Mi is below the 200Mi in use; "
                                f"next try at {crd.rfc3339(NOW + 1)}")
    assert only(actions, rc.Event).reason == "RevertFailing"
    assert not any(isinstance(a, (rc.Revert, rc.Apply, rc.SetFinalizer)) for a in actions)
    # The next retry: the status follows, no second Event.
    later = experiment(phase=Phase.REVERT_FAILING,
                       failure=Failure("memory 128Mi is below the 200Mi in use", 2, NOW - 5, NOW + 3))
    again = run(chaos(targets=[entry]), [pod()], [later])
    assert "(attempt 2)" in status_of(again)["web-1"]["message"]
    assert not any(isinstance(a, rc.Event) for a in again)
    # Unchanged: nothing at all.
    assert run(chaos(targets=[status_of(again)["web-1"]]), [pod()], [later]) == []


def test_deleting_object_whose_revert_is_failing_keeps_the_finalizer_and_does_not_ask_again():
    failing = experiment(phase=Phase.REVERT_FAILING, failure=Failure("refused", 1, NOW, NOW + 2))
    actions = run(chaos(deleting=True, targets=[applied()]), [pod()], [failing])
    assert not any(isinstance(a, rc.Revert) for a in actions)
    assert status_of(actions)["web-1"]["phase"] == crd.REVERTING
    assert rc.SetFinalizer(False) in actions  # the executor drops it only once the engine holds nothing


def test_new_command_while_the_old_change_is_still_being_undone_is_answered():
    failing = experiment(phase=Phase.REVERT_FAILING, failure=Failure("refused", 1, NOW, NOW + 2))
    actions = run(chaos(generation=2, targets=[applied(generation=1)]), [pod()], [failing])
    entry = status_of(actions)["web-1"]
    assert entry["phase"] == crd.FAILED and entry["observedGeneration"] == 2
    assert "still being undone" in entry["message"]
    assert not any(isinstance(a, rc.Apply) for a in actions)
    # Answered: the engine's next retries do not turn it back into Reverting.
    later = experiment(phase=Phase.REVERT_FAILING, failure=Failure("refused", 2, NOW, NOW + 4))
    assert run(chaos(generation=2, targets=[entry]), [pod()], [later]) == []
    # Also when the status already showed Reverting for the earlier command.
    reverting = status_of(run(chaos(targets=[applied()]), [pod()], [failing]))["web-1"]
    assert reverting["phase"] == crd.REVERTING
    again = status_of(run(chaos(generation=2, targets=[reverting]), [pod()], [later]))["web-1"]
    assert again["phase"] == crd.FAILED and again["observedGeneration"] == 2
    # The end it was waiting for: Reverted, with what was read back.
    ended = EngineEvent(EventKind.ENDED, experiment().target, owner(), "e1", reason=END_REQUESTED,
                        resources=(cpu(in_force=1000, previous=500),))
    done = status_of(run(chaos(generation=2, targets=[again]), [pod()], [], ended=[ended]))["web-1"]
    assert done["phase"] == crd.REVERTED and done["changes"][0]["restored"] == 1000


RESOURCES = {"limits": {"cpu": "1", "memory": "256Mi"}, "requests": {"cpu": "500m", "memory": "128Mi"}}
RESIZED = {"limits": {"cpu": "1500m", "memory": "256Mi"}, "requests": {"cpu": "500m", "memory": "128Mi"}}


def test_applying_remembers_the_spec_and_a_resize_supersedes():
    first = run(chaos(finalizers=()), [pod(resources=RESOURCES)])
    baselines = only(first, rc.Remember).baselines
    assert baselines == {("pod-1", "app"): rc.container_resources(pod(resources=RESOURCES), "app")}
    # Unchanged spec: nothing to do.
    assert run(chaos(targets=[applied()]), [pod(resources=RESOURCES)], [experiment()], baselines=baselines) == []
    # "1000m" is the same quantity as "1": not a resize.
    same = {"limits": {"cpu": "1000m", "memory": "268435456"}, "requests": {"cpu": "0.5", "memory": "128Mi"}}
    assert run(chaos(targets=[applied()]), [pod(resources=same)], [experiment()], baselines=baselines) == []
    actions = run(chaos(targets=[applied()]), [pod(resources=RESIZED)], [experiment()], baselines=baselines)
    supersede = only(actions, rc.Supersede)
    assert supersede.target == Target("shop", "web-1", "app") and supersede.reason == END_SUPERSEDED
    assert not any(isinstance(a, (rc.Revert, rc.Apply)) for a in actions)


def test_resize_the_kubelet_has_not_acted_on_yet_waits():
    baselines = {("pod-1", "app"): rc.container_resources(pod(resources=RESOURCES), "app")}
    waiting = pod(resources=RESIZED, status_resources=RESOURCES)
    assert run(chaos(targets=[applied()]), [waiting], [experiment()], baselines=baselines) == []
    done = pod(resources=RESIZED, status_resources=RESIZED)
    assert only(run(chaos(targets=[applied()]), [done], [experiment()], baselines=baselines), rc.Supersede)


def test_resize_conditions():
    in_progress = pod(conditions=[{"type": "PodResizeInProgress", "status": "True"}])
    assert only(run(chaos(targets=[applied()]), [in_progress], [experiment()]), rc.Supersede)
    # Pending: the kubelet has not applied it, so the originals are what it holds: put them back.
    pending = pod(conditions=[{"type": "PodResizePending", "status": "True", "reason": "Infeasible"}])
    revert = only(run(chaos(targets=[applied()]), [pending], [experiment()]), rc.Revert)
    assert revert.reason == f"{rc.REASON_RESIZE_PENDING} (Infeasible)"
    # A new experiment waits for a resize to finish.
    entry = status_of(run(chaos(finalizers=()), [in_progress]))["web-1"]
    assert entry["phase"] == crd.PENDING and "PodResizeInProgress" in entry["message"]


def test_bandwidth_only_experiment_does_not_yield_to_a_resize():
    shaping = experiment(resources=[ResourceResult(Resource.EGRESS, -1, -1, 2_000_000, 2_000_000, Method.NETLINK)])
    in_progress = pod(conditions=[{"type": "PodResizeInProgress", "status": "True"}])
    assert kinds(run(chaos(targets=[applied()]), [in_progress], [shaping])) == ["Remember"]


def test_container_choice_failure_is_reported_once():
    duo = pod(labels={"app": "web"})
    duo["spec"]["containers"].append({"name": "side"})
    spec = crd.ChaosSpec(selector={"matchLabels": {"app": "web"}}, cpu_millicpu=300)
    actions = run(chaos(spec, finalizers=()), [duo])
    entry = status_of(actions)["web-1"]
    assert entry["phase"] == crd.FAILED and "choose one with -c" in entry["message"]
    assert run(chaos(spec, finalizers=(), targets=[entry]), [duo]) == []


@pytest.mark.parametrize("text, expected", [
    ("already changed by ResourceChaos shop/first", "already changed by ResourceChaos shop/first"),
    ("already changed by ResourceChaos bank/vault; reset", "already changed by a ResourceChaos in another namespace; "
                                                           "reset"),
])
def test_messages_never_name_another_namespaces_objects(text, expected):
    assert rc.scrub(text, "shop") == expected


def test_conflict_with_an_object_of_another_namespace_is_not_named():
    other = experiment(who=owner(namespace="bank", name="vault", uid="x"))
    message = status_of(run(chaos(finalizers=()), [pod()], [other]))["web-1"]["message"]
    assert "bank" not in message and "vault" not in message


def test_quantities():
    assert rc.quantity("500m") == rc.quantity("0.5") and rc.quantity("1") == 1
    assert rc.quantity("256Mi") == 256 * 2**20 and rc.quantity("1e3") == 1000 and rc.quantity("1k") == 1000
    assert rc.quantity("lots") is None


def test_reverted_entry_says_once_why_nothing_could_be_read_back():
    gone = "the pod is gone: pod deleted"
    resources = [dataclasses.replace(cpu(), unknown=gone),
                 ResourceResult(Resource.MEMORY, 2**28, 2**27, 2**27, -1, Method.CRI, unknown=gone)]
    entry = rc.reverted_entry(applied(), None, "web-1", "app", NODE, NOW, "reverted: pod deleted", resources)
    assert entry["message"] == f"reverted: pod deleted; not read back ({gone})"
    assert [c["resource"] for c in entry["changes"]] == ["cpu", "memory"]
    assert all("restored" not in c for c in entry["changes"])
    assert entry["changes"][1]["applied"] == 2**27  # the status had lost it: taken from what the engine said
