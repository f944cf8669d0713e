"""The agent's controller on its own: ResourceChaos objects written straight to the fake API server,
effects read from the real cgroups of the test node and from the objects' status and Events."""

from __future__ import annotations

import threading
import time

import pytest

from daemonset import crd
from tests.cluster.helpers import NODE, chaos_objects, events, mirror, quota_us, wait_for
from tests.support.node import ContainerSpec


@pytest.fixture
def api(controller_cluster):
    fakeapi, agent, _ = controller_cluster
    return fakeapi, agent


def create(fakeapi, name: str, spec: crd.ChaosSpec, namespace: str = "shop") -> dict:
    return fakeapi.create(crd.build(namespace, spec, name=name))


def status_of(fakeapi, name: str, namespace: str = "shop") -> dict:
    return fakeapi.get(fakeapi.resource_type(crd.GROUP, crd.PLURAL), namespace, name).get("status") or {}


def phase_of(fakeapi, name: str, pod: str, namespace: str = "shop") -> str | None:
    entry = crd.target_entry(status_of(fakeapi, name, namespace), pod)
    return entry["phase"] if entry else None


def test_second_experiment_on_a_container_is_refused(api, pods):
    fakeapi, agent = api
    pod = pods.run("solo", "shop", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, pod)
    create(fakeapi, "first", crd.ChaosSpec(pod="solo", container="app", cpu_millicpu=500))
    wait_for(lambda: phase_of(fakeapi, "first", "solo") == "Applied", what="first Applied")
    create(fakeapi, "second", crd.ChaosSpec(pod="solo", container="app", cpu_millicpu=100))
    wait_for(lambda: phase_of(fakeapi, "second", "solo") == "Failed", what="second Failed")
    message = crd.target_entry(status_of(fakeapi, "second"), "solo")["message"]
    assert "already changed by ResourceChaos shop/first" in message
    assert quota_us(pod) == 50_000
    wait_for(lambda: ("Failed", message) in events(fakeapi, "solo"), what="the Failed event")


def test_pod_leaving_the_selector_is_reverted(api, pods):
    fakeapi, agent = api
    pod = pods.run("labelled", "shop", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, pod, labels={"chaos": "yes"})
    create(fakeapi, "by-label", crd.ChaosSpec(selector={"matchLabels": {"chaos": "yes"}}, cpu_millicpu=300))
    wait_for(lambda: quota_us(pod) == 30_000, what="the apply")
    pods_type = fakeapi.resource_type("", "pods")
    fakeapi.patch(pods_type, "shop", "labelled", {"metadata": {"labels": {"chaos": "no"}}},
                  "application/merge-patch+json")
    wait_for(lambda: quota_us(pod) == 100_000, what="the revert")
    entry = wait_for(lambda: (e := crd.target_entry(status_of(fakeapi, "by-label"), "labelled"))
                     and e["phase"] == "Reverted" and e, what="status Reverted")
    assert entry["message"] == "reverted: pod no longer matches"
    assert entry["changes"][0]["restored"] == 1000


def test_kube_system_is_refused_even_when_labelled(api, pods):
    fakeapi, agent = api
    ns_type = fakeapi.resource_type("", "namespaces")
    fakeapi.patch(ns_type, None, "kube-system", {"metadata": {"labels": {"kubectl-chaos.io/enabled": "true"}}},
                  "application/merge-patch+json")
    pod = pods.run("core", "kube-system", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, pod)
    create(fakeapi, "core", crd.ChaosSpec(pod="core", container="app", cpu_millicpu=500), namespace="kube-system")
    refusal = wait_for(lambda: crd.node_entry(status_of(fakeapi, "core", "kube-system"), NODE), what="Failed")
    assert refusal["phase"] == "Failed"
    assert "namespace kube-system is never changed by kubectl-chaos" in refusal["message"]
    assert quota_us(pod) == 100_000
    rtype = fakeapi.resource_type(crd.GROUP, crd.PLURAL)
    wait_for(lambda: not fakeapi.get(rtype, "kube-system", "core")["metadata"].get("finalizers"),
             what="the finalizer to go: nothing applied, nothing to hold")


def test_pods_of_other_nodes_are_left_to_their_agents(api, pods):
    fakeapi, agent = api
    pod = pods.run("elsewhere", "shop", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, pod, node="another-node")
    create(fakeapi, "elsewhere", crd.ChaosSpec(pod="elsewhere", container="app", cpu_millicpu=500))
    assert agent.controller.idle(5)
    assert status_of(fakeapi, "elsewhere") == {}
    assert quota_us(pod) == 100_000


def test_in_place_resize_yields_to_the_kubelet(api, pods, node):
    """``kubectl patch pod --subresource resize``: the spec's resources change and the kubelet puts
    the new values in place; the experiment ends without putting the old ones back over them."""
    fakeapi, agent = api
    pod = pods.run("grow", "shop", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, pod)
    create(fakeapi, "grow", crd.ChaosSpec(pod="grow", container="app", cpu_millicpu=500))
    wait_for(lambda: phase_of(fakeapi, "grow", "grow") == "Applied", what="Applied")
    assert quota_us(pod) == 50_000
    fakeapi.patch(fakeapi.resource_type("", "pods"), "shop", "grow",  # the API server's part
                  {"spec": {"containers": [{"name": "app", "resources": {"limits": {"cpu": "800m"}}}]}},
                  "application/strategic-merge-patch+json")
    entry = wait_for(lambda: (e := crd.target_entry(status_of(fakeapi, "grow"), "grow"))
                     and e["phase"] == "Reverted" and e, what="the experiment to yield")
    assert entry["message"].startswith("superseded by an in-place resize")
    assert agent.engine.list("shop") == []
    assert quota_us(pod) == 50_000  # nothing put back: the kubelet is about to set its own value
    node.client.update_resources(pod.container_id("app"), cpu_quota_us=80_000)  # the kubelet's part (under the pod's limit)
    time.sleep(2.5)  # more than two of the engine's drift rounds (1 s here)
    assert quota_us(pod) == 80_000  # the kubelet's value stands
    wait_for(lambda: ("Superseded", f"ResourceChaos grow: {entry['message']}") in events(fakeapi, "grow"),
             what="the Superseded event")


def test_object_recreated_with_the_same_name_starts_afresh(api, pods):
    """Deleted while the agent was down and created again under the same name (a new uid): the old
    object's experiment is reverted, the new one applied from the originals."""
    fakeapi, agent = api
    pod = pods.run("again", "shop", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, pod)
    create(fakeapi, "again", crd.ChaosSpec(pod="again", container="app", cpu_millicpu=500))
    wait_for(lambda: quota_us(pod) == 50_000, what="the first apply")
    agent.stop()
    rtype = fakeapi.resource_type(crd.GROUP, crd.PLURAL)
    obj = fakeapi.get(rtype, "shop", "again")
    obj["metadata"]["finalizers"] = []  # someone removed the finalizer by hand
    fakeapi.update(rtype, "shop", "again", obj)
    fakeapi.delete(rtype, "shop", "again")
    create(fakeapi, "again", crd.ChaosSpec(pod="again", container="app", cpu_millicpu=300))
    agent.start()
    entry = wait_for(lambda: (e := crd.target_entry(status_of(fakeapi, "again"), "again"))
                     and e["phase"] == "Applied" and e, what="the new object Applied")
    assert quota_us(pod) == 30_000
    assert entry["changes"][0]["original"] == 1000
    (experiment,) = agent.engine.list("shop")
    assert experiment.owner.uid == fakeapi.get(rtype, "shop", "again")["metadata"]["uid"]


def test_watch_resumes_after_410_gone(api, pods):
    fakeapi, agent = api
    agent.stop()
    agent.watch_timeout_s = 1  # reconnect every second, from the last resource version seen
    agent.start()
    fakeapi.compact()  # every resource version the agent holds is now too old: 410 on reconnect
    pod = pods.run("late", "shop", [ContainerSpec(cpu_millicpu=1000)])
    time.sleep(1.5)
    mirror(fakeapi, pod)
    create(fakeapi, "late", crd.ChaosSpec(pod="late", container="app", cpu_millicpu=500))
    wait_for(lambda: quota_us(pod) == 50_000, timeout_s=15, what="the apply after a re-list")
    assert any(r.method == "WATCH" for r in fakeapi.requests)
    fakeapi.delete(fakeapi.resource_type(crd.GROUP, crd.PLURAL), "shop", "late")
    wait_for(lambda: quota_us(pod) == 100_000, timeout_s=15, what="the revert")
    wait_for(lambda: chaos_objects(fakeapi) == [], what="the object to go")


def test_node_name_and_finalizer(api):
    fakeapi, agent = api
    assert agent.controller.finalizer == crd.finalizer_for(NODE)


def test_agent_flags_choose_cluster_mode(fakeapi, kubeconfig, tmp_path, monkeypatch):
    """``start_from_args``: off, auto without credentials (node-local only), on without credentials."""
    import argparse

    from daemonset.controller import ControllerError, add_arguments, start_from_args

    class NoEngine:  # the controller only lists and applies once objects for this node exist
        node_name = "n1"

        def list(self, namespace=None):
            return []

        def subscribe(self, callback):
            pass

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.add_argument("--node-name", default="n1")
    parser.add_argument("--state-dir", default=str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert start_from_args(NoEngine(), parser.parse_args(["--kubernetes=off"])) is None
    assert start_from_args(NoEngine(), parser.parse_args([])) is None
    with pytest.raises(ControllerError, match="no API credentials"):
        start_from_args(NoEngine(), parser.parse_args(["--kubernetes=on"]))
    controller = start_from_args(NoEngine(), parser.parse_args([f"--kubeconfig={kubeconfig}"]))
    try:
        assert controller is not None and controller.idle(5)
    finally:
        controller.stop()
    # Stopped right after the start, while watches were still opening: none is left waiting.
    assert [t.name for t in threading.enumerate() if t.name.startswith("controller-")] == []
