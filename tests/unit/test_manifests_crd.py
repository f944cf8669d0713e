"""The ResourceChaos API code (daemonset/crd.py) against the CRD's own schema, and its pure helpers.

What the plugin creates and what the agent writes into the status must pass the CRD's
openAPIV3Schema with nothing pruned (a pruned field would silently vanish on a real cluster);
malformed objects must be rejected. Validation is the fake API server's, which the cluster tests
use for every request.
"""

from __future__ import annotations

import pathlib

import pytest
import yaml

from daemonset import crd
from tests.support.fakeapi import apply_defaults, prune_unknown, schema_errors

CRD = yaml.safe_load((pathlib.Path(__file__).resolve().parents[2] / "daemonset/manifests/crd.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
POD = {"metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1"}, "spec": {"containers": [{"name": "app"}]}}


def admitted(obj: dict) -> list[tuple[str, str]]:
    """Errors the API server would answer for ``obj``; pruned fields count as errors here."""
    body = {k: v for k, v in obj.items() if k != "metadata"}
    pruned, dropped = prune_unknown(SCHEMA, body)
    pruned = apply_defaults(SCHEMA, pruned)
    return [(d, "pruned: unknown to the schema") for d in dropped] + schema_errors(SCHEMA, pruned)


@pytest.mark.parametrize("spec", [
    crd.ChaosSpec(pod="web-1", container="app", cpu_millicpu=500),
    crd.ChaosSpec(pod="web-1", container="app", memory_bytes=256 * 2**20, duration_s=30.0, method="cgroup"),
    crd.ChaosSpec(pod="web-1", bandwidth_bps=2_000_000, direction="egress", force=True),
    crd.ChaosSpec(pod="web-1", container="app", cpu_millicpu=500, request_id="0123456789abcdef"),
    crd.ChaosSpec(selector=crd.parse_selector("app=web,tier in (a,b),!canary"), cpu_millicpu=1,
                  memory_bytes=4 * 2**20, bandwidth_bps=8000, direction="both", duration_s=0.5, method="cri"),
])
def test_schema_accepts_what_the_plugin_creates(spec):
    obj = crd.build("shop", spec, name=crd.object_name("web-1", "app") if spec.pod else None, owners=[POD],
                    selector_text="app=web")
    assert admitted(obj) == []
    assert crd.ChaosSpec.from_dict(obj["spec"]) == spec


@pytest.mark.parametrize("spec, field", [
    ({"target": {"pod": "web-1"}}, "spec"),  # nothing to change
    ({"target": {}, "cpuMillicores": 500}, "spec.target"),
    ({"target": {"pod": "Web_1"}, "cpuMillicores": 500}, "spec.target.pod"),
    ({"target": {"pod": "a", "selector": {}}, "cpuMillicores": 500}, "spec.target"),
    ({"target": {"pod": "a"}, "cpuMillicores": "500m"}, "spec.cpuMillicores"),
    ({"target": {"pod": "a"}, "cpuMillicores": 0}, "spec.cpuMillicores"),
    ({"target": {"pod": "a"}, "memoryBytes": 1000}, "spec.memoryBytes"),
    ({"target": {"pod": "a"}, "bandwidth": {"direction": "both"}}, "spec.bandwidth"),
    ({"target": {"pod": "a"}, "bandwidth": {"bitsPerSecond": 10**12}}, "spec.bandwidth.bitsPerSecond"),
    ({"target": {"pod": "a"}, "cpuMillicores": 5, "durationSeconds": 0}, "spec.durationSeconds"),
    ({"target": {"pod": "a"}, "cpuMillicores": 5, "method": "magic"}, "spec.method"),
    ({"target": {"pod": "a"}, "cpuMillicores": 5, "requestId": "x" * 65}, "spec.requestId"),
    ({"target": {"selector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}, "cpuMillicores": 5},
     "spec.target.selector.matchExpressions[0].operator"),
])
def test_schema_rejects_malformed_objects(spec, field):
    errors = admitted({"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": "x"}, "spec": spec})
    assert any(path == field or path.startswith(field) for path, _ in errors), errors


def test_schema_accepts_the_status_the_agent_writes():
    obj = crd.build("shop", crd.ChaosSpec(pod="web-1", container="app", cpu_millicpu=500, duration_s=60), name="x")
    obj["metadata"]["generation"] = 1
    applied = {"pod": "web-1", "uid": "u-1", "node": "n1", "container": "app", "phase": crd.APPLIED,
               "observedGeneration": 1, "message": "", "lastTransitionTime": crd.now_rfc3339(), "method": "cri",
               "expiresAt": crd.rfc3339(2e9), "experimentId": "e1",
               "changes": [{"resource": "cpu", "unit": "millicores", "original": None, "applied": 500, "method": "cri"}]}
    obj["status"] = crd.with_targets(obj, [applied])
    assert admitted(obj) == []
    assert obj["status"]["phase"] == crd.APPLIED and obj["status"]["targetSummary"] == "pod/web-1"
    assert obj["status"]["expiresAt"] == crd.rfc3339(2e9)
    reverted = dict(applied, phase=crd.REVERTED, changes=[dict(applied["changes"][0], restored=None)])
    obj["status"] = crd.with_targets(obj, [reverted])
    assert admitted(obj) == [] and obj["status"]["phase"] == crd.REVERTED
    obj["status"]["targets"][0]["phase"] = "Exploded"
    assert admitted(obj)


def test_summary_over_many_targets():
    obj = crd.build("shop", crd.ChaosSpec(selector={"matchLabels": {"app": "web"}}, cpu_millicpu=5),
                    selector_text="app=web")
    obj["metadata"]["name"] = "c"

    def phase(*phases):
        return crd.summarize(obj, [{"pod": f"p{i}", "phase": p, "message": "m"} for i, p in enumerate(phases)])

    assert phase()["phase"] == crd.PENDING
    assert phase(crd.APPLIED, crd.APPLIED)["phase"] == crd.APPLIED
    assert phase(crd.APPLIED, crd.REVERTED)["phase"] == crd.APPLIED
    assert phase(crd.APPLIED, crd.PENDING)["phase"] == crd.PENDING
    mixed = phase(crd.APPLIED, crd.FAILED, crd.FAILED)
    assert mixed["phase"] == crd.PARTIAL and mixed["message"] == "p1: m (and 1 more failed)"
    assert mixed["targetSummary"] == "-l app=web (3 pods)"


def test_selectors_round_trip_and_match():
    selector = crd.parse_selector("app=web, tier in (a,b), env!=prod, canary, !legacy")
    assert selector == {"matchLabels": {"app": "web"}, "matchExpressions": [
        {"key": "tier", "operator": "In", "values": ["a", "b"]},
        {"key": "env", "operator": "NotIn", "values": ["prod"]},
        {"key": "canary", "operator": "Exists"},
        {"key": "legacy", "operator": "DoesNotExist"}]}
    assert crd.parse_selector(crd.selector_text(selector)) == selector
    assert crd.selector_matches(selector, {"app": "web", "tier": "a", "env": "dev", "canary": ""})
    assert not crd.selector_matches(selector, {"app": "web", "tier": "a", "env": "prod", "canary": ""})
    assert not crd.selector_matches(selector, {"app": "web", "tier": "c", "canary": ""})
    assert not crd.selector_matches(selector, {"app": "web", "tier": "a", "canary": "", "legacy": "1"})
    for bad in ("", "app=(", "a=b,a=c"):
        with pytest.raises(crd.SpecError):
            crd.parse_selector(bad)


def test_container_choice_like_kubectl_exec():
    duo = {"metadata": {"name": "duo", "annotations": {}}, "spec": {"containers": [{"name": "main"}, {"name": "side"}]}}
    with pytest.raises(crd.SpecError, match=r"pod duo has 2 containers \(main, side\); choose one with -c"):
        crd.choose_container(duo, None)
    duo["metadata"]["annotations"][crd.DEFAULT_CONTAINER_ANNOTATION] = "side"
    assert crd.choose_container(duo, None) == "side"
    assert crd.choose_container(duo, "main") == "main"
    with pytest.raises(crd.SpecError, match='container "nope" not found in pod duo; its containers: main, side'):
        crd.choose_container(duo, "nope")
    assert crd.choose_container(POD, None) == "app"


def test_names_stay_within_kubernetes_limits():
    assert crd.object_name("web-1", "app") == "web-1.app"
    long = crd.object_name("p" * 250, "c" * 60)
    assert len(long) <= 253 and long == crd.object_name("p" * 250, "c" * 60)
    assert crd.finalizer_for("node-1") == "kubectl-chaos.io/node-node-1"
    long_node = crd.finalizer_for("n" * 200 + ".example.com")
    prefix, name = long_node.split("/")
    assert prefix == crd.GROUP and len(name) <= 63 and name[-1].isalnum()
