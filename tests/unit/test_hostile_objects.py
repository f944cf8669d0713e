"""Hostile ResourceChaos objects: each is refused by the CRD's schema (what a real API server
answers with 422) and, should one get past it (an older CRD installed, an object written before),
by the agent: a clear Failed status on its node entry, no engine call, nothing changed."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from daemonset import crd
from daemonset import policy as pol
from daemonset import reconcile as rc
from tests.support.fakeapi import apply_defaults, prune_unknown, schema_errors

CRD = yaml.safe_load((pathlib.Path(__file__).resolve().parents[2] / "daemonset/manifests/crd.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
NODE = "n1"
POLICY = pol.Policy({"metadata": {"name": "shop", "labels": {pol.ENABLED_LABEL: "true"}}},
                    {"metadata": {"name": NODE}, "status": {"allocatable": {"cpu": "4", "memory": "16Gi"}}})
MEGA = "a" * 2**20


def pod(name: str, labels: dict | None = None) -> dict:
    return {"metadata": {"name": name, "namespace": "shop", "uid": f"uid-{name}", "labels": labels or {"app": "web"}},
            "spec": {"nodeName": NODE, "containers": [{"name": "app", "resources": {"limits": {"cpu": "1"}}}]},
            "status": {"phase": "Running"}}


def admission_errors(spec: dict) -> list[tuple[str, str]]:
    body = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "spec": spec}
    pruned, _ = prune_unknown(SCHEMA, body)
    return schema_errors(SCHEMA, apply_defaults(SCHEMA, pruned))


def reconciled(spec: dict, pods: list[dict], *, status: dict | None = None) -> list:
    obj = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "spec": spec, "metadata": {
        "name": "evil", "namespace": "shop", "uid": "rc-evil", "generation": 1, "resourceVersion": "9"}}
    if status:
        obj["status"] = status
    return rc.reconcile(("shop", "evil"), obj, {p["metadata"]["name"]: p for p in pods}, [], NODE, now=2e9,
                        policy=POLICY)


def refused(actions, *words: str) -> dict:
    """The node entry the agent writes; nothing else happens."""
    assert not [a for a in actions if isinstance(a, rc.Apply | rc.Revert | rc.Supersede)], actions
    assert not [a for a in actions if isinstance(a, rc.SetFinalizer) and a.present]
    (write,) = [a for a in actions if isinstance(a, rc.WriteStatus)]
    assert write.entries == () and write.node is not None
    assert write.node["phase"] == crd.FAILED and write.node["node"] == NODE
    assert len(write.node["message"]) <= 1024
    for word in words:
        assert word in write.node["message"], write.node["message"]
    return write.node


def selector(sel) -> dict:
    return {"target": {"selector": sel}, "cpuMillicores": 500}


# Each: the spec, the field the schema names, the words of the agent's refusal.
HOSTILE = {
    "empty selector": (selector({}), "spec.target.selector", ["is empty", "every pod in the namespace"]),
    "empty matchLabels": (selector({"matchLabels": {}}), "spec.target.selector", ["is empty"]),
    "unknown operator": (selector({"matchExpressions": [{"key": "app", "operator": "Near", "values": ["x"]}]}),
                         "spec.target.selector.matchExpressions[0]", ["operator 'Near' is unknown"]),
    "In with no values": (selector({"matchExpressions": [{"key": "app", "operator": "In", "values": []}]}),
                          "spec.target.selector.matchExpressions[0]", ["In needs at least one value"]),
    "NotIn without values": (selector({"matchExpressions": [{"key": "app", "operator": "NotIn"}]}),
                             "spec.target.selector.matchExpressions[0]", ["NotIn needs at least one value"]),
    "Exists with values": (selector({"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["a"]}]}),
                           "spec.target.selector.matchExpressions[0]", ["Exists takes no values"]),
    "huge cpu": ({"target": {"pod": "web-1"}, "cpuMillicores": 10**30}, "spec.cpuMillicores",
                 ["spec.cpuMillicores", "out of range"]),
    "negative memory": ({"target": {"pod": "web-1"}, "memoryBytes": -1}, "spec.memoryBytes",
                        ["spec.memoryBytes -1 is out of range"]),
    "memory above 1 PiB": ({"target": {"pod": "web-1"}, "memoryBytes": 2**62}, "spec.memoryBytes", ["out of range"]),
    "fractional cpu": ({"target": {"pod": "web-1"}, "cpuMillicores": 0.5}, "spec.cpuMillicores",
                       ["must be an integer"]),
    "negative bandwidth": ({"target": {"pod": "web-1"}, "bandwidth": {"bitsPerSecond": -8000}},
                           "spec.bandwidth.bitsPerSecond", ["out of range"]),
    "a year of duration": ({"target": {"pod": "web-1"}, "cpuMillicores": 5, "durationSeconds": 10**9},
                           "spec.durationSeconds", ["spec.durationSeconds", "out of range"]),
    "very long pod name": ({"target": {"pod": MEGA}, "cpuMillicores": 5}, "spec.target.pod",
                           ["is not a pod name", "characters)"]),
    "very long label value": (selector({"matchLabels": {"app": MEGA}}), "spec.target.selector.matchLabels",
                              ["is not a label value"]),
    # No OpenAPI v3.0 construct bounds a map's keys: a CEL rule does on a real server (not evaluated here).
    "very long label key": (selector({"matchLabels": {MEGA: "web"}}), None, ["is not a label key"]),
    "very long expression value": (selector({"matchExpressions": [{"key": "app", "operator": "In",
                                                                   "values": [MEGA]}]}),
                                   "spec.target.selector.matchExpressions[0].values[0]", ["is not a label value"]),
    "thousands of values": (selector({"matchExpressions": [{"key": "app", "operator": "In",
                                                            "values": [f"v{i}" for i in range(5000)]}]}),
                            "spec.target.selector.matchExpressions[0].values", ["has 5000 values"]),
    "very long container": ({"target": {"pod": "web-1"}, "container": MEGA, "cpuMillicores": 5}, "spec.container",
                            ["is not a container name"]),
    "very long request id": ({"target": {"pod": "web-1"}, "cpuMillicores": 5, "requestId": MEGA},
                             "spec.requestId", ["spec.requestId"]),
    "pod and selector": ({"target": {"pod": "web-1", "selector": {"matchLabels": {"app": "web"}}},
                          "cpuMillicores": 5}, "spec.target", ["exactly one of pod and selector"]),
    "nothing to change": ({"target": {"pod": "web-1"}}, "spec", ["nothing to change"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_the_crd_schema_refuses_it(case):
    spec, field, _ = HOSTILE[case]
    if field is None:
        labels = SCHEMA["properties"]["spec"]["properties"]["target"]["properties"]["selector"]["properties"][
            "matchLabels"]
        assert labels["x-kubernetes-validations"][0]["rule"] == "self.all(k, size(k) <= 317)"
        return
    errors = admission_errors(spec)
    assert any(path == field or path.startswith(field) for path, _ in errors), errors


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_the_agent_refuses_it_if_it_gets_past_the_schema(case):
    spec, _, words = HOSTILE[case]
    node_entry = refused(reconciled(spec, [pod("web-1")]), "ResourceChaos evil: ", *words)
    # Said once: the same refusal is not written again on every resync.
    again = reconciled(spec, [pod("web-1")], status={"nodes": [node_entry]})
    assert not [a for a in again if isinstance(a, rc.WriteStatus | rc.Apply)]


def test_a_node_without_pods_in_the_namespace_says_nothing():
    assert reconciled(selector({}), []) == []


def test_thousands_of_matched_pods_on_one_node_change_nothing():
    pods = [pod(f"web-{i}") for i in range(crd.MAX_TARGETS + 100)]
    node_entry = refused(reconciled(selector({"matchLabels": {"app": "web"}}), pods),
                         f"it matches {crd.MAX_TARGETS + 100} pods on node n1",
                         f"more than the {crd.MAX_TARGETS} one ResourceChaos may change", "narrow the selector")
    assert node_entry["targets"] == 0


def test_the_cap_counts_the_pods_other_nodes_have_in_the_status():
    others = [{"pod": f"far-{i}", "node": f"other-{i % 7}", "phase": crd.APPLIED} for i in range(crd.MAX_TARGETS - 2)]
    pods = [pod(f"web-{i}") for i in range(3)]
    refused(reconciled(selector({"matchLabels": {"app": "web"}}), pods, status={"targets": others}),
            "it matches 3 pods on node n1 and 498 more in its status from other nodes")
    fits = reconciled(selector({"matchLabels": {"app": "web"}}), pods[:2], status={"targets": others})
    assert len([a for a in fits if isinstance(a, rc.Apply)]) == 2


def test_the_status_list_is_capped_by_the_schema_too():
    obj = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "spec": {"target": {"pod": "a"}, "cpuMillicores": 5},
           "status": {"targets": [{"pod": f"p{i}", "phase": crd.APPLIED} for i in range(crd.MAX_TARGETS + 1)]}}
    assert any(path == "status.targets" for path, _ in schema_errors(SCHEMA, obj))
