"""daemonset.policy: namespace opt-in and the raise policy, alone and as reconcile applies them."""

from __future__ import annotations

import pytest

from daemonset import crd
from daemonset import policy as pol
from daemonset import reconcile as rc
from daemonset.types import (
    ExperimentInfo,
    Method,
    Owner,
    OwnerKind,
    Phase,
    ResolvedTarget,
    Resource,
    ResourceResult,
)

NODE = "n1"
GIB = 2**30


def namespace(name: str = "shop", *, enabled: bool = True, **annotations: str) -> dict:
    labels = {pol.ENABLED_LABEL: "true"} if enabled else {}
    return {"metadata": {"name": name, "labels": labels,
                         "annotations": {f"kubectl-chaos.io/{k.replace('_', '-')}": v for k, v in annotations.items()}}}


def node(cpu: str = "4", memory: str = "16Gi") -> dict:
    return {"metadata": {"name": NODE}, "status": {"allocatable": {"cpu": cpu, "memory": memory}}}


def pod(limits: dict | None = None, name: str = "web-1", namespace: str = "shop") -> dict:
    container: dict = {"name": "app"}
    if limits is not None:
        container["resources"] = {"limits": limits}
    return {"metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"},
            "spec": {"nodeName": NODE, "containers": [container]}, "status": {"phase": "Running"}}


def check(spec: crd.ChaosSpec, limits: dict | None = None, ns: dict | None = None, the_node: dict | None = None,
          *, no_node: bool = False) -> str:
    policy = pol.Policy(ns if ns is not None else namespace(), None if no_node else (the_node or node()))
    return pol.refusal(policy, spec, pod(limits), "app")


CPU = {"cpu": "1", "memory": "1Gi"}


# -- namespace opt-in ---------------------------------------------------------------------------------


def test_a_namespace_without_the_label_is_refused_with_how_to_enable_it():
    why = check(crd.ChaosSpec(pod="web-1", cpu_millicpu=500), CPU, namespace(enabled=False))
    assert why == ("namespace shop is not enabled for kubectl-chaos; a cluster admin enables it with:"
                   " kubectl label namespace shop kubectl-chaos.io/enabled=true")
    assert pol.namespace_refusal("shop", None)  # not seen in the API at all: refused too
    assert pol.namespace_refusal("shop", namespace()) == ""


@pytest.mark.parametrize("name", ["kube-system", "kubectl-chaos", "chaos-ops"])
def test_kube_system_and_the_agents_own_namespace_stay_refused_when_labelled(name):
    agent_ns = "chaos-ops" if name == "chaos-ops" else "kubectl-chaos"
    why = pol.namespace_refusal(name, namespace(name), agent_ns)
    assert why.startswith(f"namespace {name} is never changed by kubectl-chaos")
    if name == "kubectl-chaos":
        assert pol.namespace_refusal(name, namespace(name), "chaos-ops") == ""  # another agent namespace


# -- raise policy -------------------------------------------------------------------------------------


def test_lowering_or_keeping_the_spec_limit_needs_no_grant():
    assert check(crd.ChaosSpec(pod="web-1", cpu_millicpu=500, memory_bytes=GIB // 2), CPU) == ""
    assert check(crd.ChaosSpec(pod="web-1", cpu_millicpu=1000, memory_bytes=GIB), CPU) == ""


def test_a_raise_without_a_grant_names_the_limit_the_policy_and_who_can_change_it():
    why = check(crd.ChaosSpec(pod="web-1", cpu_millicpu=1500), CPU)
    assert why == ("cpu 1500m is above container app's cpu limit in its pod spec (1000m); raising needs a grant on"
                   " namespace shop, which has none: a cluster admin can annotate the namespace with"
                   " kubectl-chaos.io/max-raise=2 (up to twice the spec limit) or kubectl-chaos.io/max-cpu=<quantity>")
    why = check(crd.ChaosSpec(pod="web-1", memory_bytes=2 * GIB), CPU)
    assert "memory 2Gi is above container app's memory limit in its pod spec (1Gi)" in why
    assert "kubectl-chaos.io/max-memory=<quantity>" in why


def test_a_raise_within_the_namespaces_grant_is_allowed_and_above_it_refused():
    ns = namespace(max_raise="2")
    assert check(crd.ChaosSpec(pod="web-1", cpu_millicpu=2000, memory_bytes=2 * GIB), CPU, ns) == ""
    why = check(crd.ChaosSpec(pod="web-1", cpu_millicpu=2001), CPU, ns)
    assert why == ("cpu 2001m is above container app's cpu limit in its pod spec (1000m); namespace shop allows at"
                   " most 2000m (kubectl-chaos.io/max-raise=2 times the spec limit); a cluster admin can change that"
                   " annotation on the namespace")


def test_absolute_caps_and_both_bounds_apply():
    assert check(crd.ChaosSpec(pod="web-1", cpu_millicpu=3000), CPU, namespace(max_cpu="3")) == ""
    assert "at most 3000m (kubectl-chaos.io/max-cpu=3)" in check(crd.ChaosSpec(pod="web-1", cpu_millicpu=3001), CPU,
                                                                  namespace(max_cpu="3"))
    assert check(crd.ChaosSpec(pod="web-1", memory_bytes=3 * GIB), CPU, namespace(max_memory="3Gi")) == ""
    both = namespace(max_raise="4", max_cpu="1500m")
    why = check(crd.ChaosSpec(pod="web-1", cpu_millicpu=2000), CPU, both)
    assert "at most 1500m (kubectl-chaos.io/max-raise=4 times the spec limit and kubectl-chaos.io/max-cpu=1500m)" \
        in why


def test_no_grant_raises_above_the_nodes_allocatable():
    ns = namespace(max_raise="10")
    why = check(crd.ChaosSpec(pod="web-1", cpu_millicpu=5000), CPU, ns, node(cpu="4"))
    assert why.endswith("no raise may go above node n1's allocatable cpu (4000m), whatever the namespace allows")
    why = check(crd.ChaosSpec(pod="web-1", cpu_millicpu=3000), CPU, ns, no_node=True)
    assert "node this node's allocatable cpu cannot be read from the API" in why


def test_a_container_without_a_spec_limit_counts_as_the_nodes_allocatable():
    ns = namespace(max_raise="10")
    assert check(crd.ChaosSpec(pod="web-1", cpu_millicpu=3000, memory_bytes=8 * GIB), {}, ns) == ""  # lowerings
    why = check(crd.ChaosSpec(pod="web-1", memory_bytes=17 * GIB), {}, ns)
    assert why == ("memory 17Gi is above node n1's allocatable memory (16Gi); container app has no memory limit in"
                   " its pod spec, so it counts as the node's allocatable and cannot be raised")
    why = check(crd.ChaosSpec(pod="web-1", cpu_millicpu=100), None, no_node=True)
    assert "has no cpu limit in its pod spec and node this node's allocatable cpu cannot be read" in why


def test_bandwidth_needs_no_grant():
    assert check(crd.ChaosSpec(pod="web-1", bandwidth_bps=10**11), {}) == ""


def test_unreadable_grants_are_no_grant_and_say_so():
    why = check(crd.ChaosSpec(pod="web-1", cpu_millicpu=1500), CPU, namespace(max_raise="lots" * 100))
    assert 'kubectl-chaos.io/max-raise="lotslotslotslotslotslotslotslotslotslots..." is not a number >= 1' in why
    assert "which has none" in why
    assert "is not a number" in check(crd.ChaosSpec(pod="web-1", cpu_millicpu=1500), CPU, namespace(max_raise="0.5"))
    assert "is not a quantity" in check(crd.ChaosSpec(pod="web-1", cpu_millicpu=1500), CPU, namespace(max_cpu="-1"))


def test_quantities():
    assert pol.to_units("cpu", pol.quantity("1500m")) == 1500
    assert pol.to_units("cpu", pol.quantity("0.1")) == 100
    assert pol.to_units("cpu", pol.quantity("2")) == 2000
    assert pol.to_units("memory", pol.quantity("1Gi")) == GIB
    assert pol.to_units("memory", pol.quantity("1e9")) == 10**9
    assert pol.quantity("1" * 10_000) is None and pol.quantity("five") is None


# -- as reconcile applies it -------------------------------------------------------------------------


def chaos(spec: crd.ChaosSpec, *, targets=(), generation: int = 1) -> dict:
    obj = crd.build("shop", spec, name="web-1.app")
    obj["metadata"].update(uid="rc-1", generation=generation, finalizers=[crd.finalizer_for(NODE)],
                           resourceVersion="7")
    if targets:
        obj["status"] = {"targets": list(targets)}
    return obj


def run(obj, pods, experiments=(), policy=None):
    return rc.reconcile(("shop", "web-1.app"), obj, {p["metadata"]["name"]: p for p in pods}, list(experiments), NODE,
                        now=2e9, policy=policy or pol.Policy(namespace(), node()))


def experiment() -> ExperimentInfo:
    target = ResolvedTarget("shop", "web-1", "app", "c" * 64, pod_uid="uid-web-1", node_name=NODE)
    return ExperimentInfo("e1", target, (ResourceResult(Resource.CPU, 1000, 1000, 500, 500, Method.CRI),), 0.0,
                          None, 0, phase=Phase.ACTIVE, owner=Owner(OwnerKind.RESOURCE_CHAOS, "shop", "web-1.app", "rc-1"))


def written(actions) -> tuple[dict, dict | None]:
    writes = [a for a in actions if isinstance(a, rc.WriteStatus)]
    return {e["pod"]: e for w in writes for e in w.entries}, next((w.node for w in writes if w.node), None)


def test_reconcile_refuses_a_namespace_that_is_not_enabled_once_per_node():
    actions = run(chaos(crd.ChaosSpec(pod="web-1", container="app", cpu_millicpu=500)), [pod(CPU)],
                  policy=pol.Policy(namespace(enabled=False), node()))
    assert not [a for a in actions if isinstance(a, rc.Apply)]
    entries, node_entry = written(actions)
    assert entries == {}
    assert node_entry["phase"] == crd.FAILED and node_entry["node"] == NODE
    assert "kubectl label namespace shop kubectl-chaos.io/enabled=true" in node_entry["message"]
    obj = chaos(crd.ChaosSpec(pod="web-1", container="app", cpu_millicpu=500))
    obj["status"] = {"nodes": [node_entry]}
    again = run(obj, [pod(CPU)], policy=pol.Policy(namespace(enabled=False), node()))
    assert not [a for a in again if isinstance(a, rc.WriteStatus | rc.Event)]  # said once


def test_reconcile_reverts_what_it_holds_when_the_namespace_is_disabled():
    applied = {"pod": "web-1", "uid": "uid-web-1", "node": NODE, "container": "app", "phase": crd.APPLIED,
               "observedGeneration": 1, "experimentId": "e1", "changes": []}
    actions = run(chaos(crd.ChaosSpec(pod="web-1", container="app", cpu_millicpu=500), targets=[applied]),
                  [pod(CPU)], [experiment()], policy=pol.Policy(namespace(enabled=False), node()))
    (revert,) = [a for a in actions if isinstance(a, rc.Revert)]
    assert revert.reason == rc.REASON_DISABLED


def test_reconcile_refuses_a_raise_and_applies_a_lowering():
    actions = run(chaos(crd.ChaosSpec(pod="web-1", container="app", cpu_millicpu=1500)), [pod(CPU)])
    assert not [a for a in actions if isinstance(a, rc.Apply)]
    entries, _ = written(actions)
    assert entries["web-1"]["phase"] == crd.FAILED
    assert entries["web-1"]["message"].startswith("ResourceChaos web-1.app: cpu 1500m is above container app's cpu limit")
    actions = run(chaos(crd.ChaosSpec(pod="web-1", container="app", cpu_millicpu=500)), [pod(CPU)])
    assert [a for a in actions if isinstance(a, rc.Apply)]
    actions = run(chaos(crd.ChaosSpec(pod="web-1", container="app", cpu_millicpu=1500)), [pod(CPU)],
                  policy=pol.Policy(namespace(max_raise="2"), node()))
    assert [a for a in actions if isinstance(a, rc.Apply)]


def test_a_refused_further_change_keeps_the_change_in_force():
    applied = {"pod": "web-1", "uid": "uid-web-1", "node": NODE, "container": "app", "phase": crd.APPLIED,
               "observedGeneration": 1, "experimentId": "e1", "changes": []}
    obj = chaos(crd.ChaosSpec(pod="web-1", container="app", cpu_millicpu=1500), targets=[applied], generation=2)
    actions = run(obj, [pod(CPU)], [experiment()])
    assert not [a for a in actions if isinstance(a, rc.Apply | rc.Revert)]
    entries, _ = written(actions)
    assert entries["web-1"]["phase"] == crd.FAILED and entries["web-1"]["message"].endswith(
        "; the change in force stays")
