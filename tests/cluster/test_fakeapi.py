"""The fake API server behaves like kube-apiserver where our code relies on it.

Driven through the real ``kubernetes`` client (and kubectl for discovery and printing), so a
difference between the fake and the real server shows up as a failing client call here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from tests.support.fakeapi import FakeKubeAPI, merge_patch, parse_label_selector, strategic_merge_patch

GROUP, VERSION, PLURAL = "kubectl-chaos.io", "v1alpha1", "resourcechaos"
KUBECTL = os.path.join(os.path.dirname(sys.executable), "kubectl")


def pod(name: str, node: str = "node-a", labels: dict | None = None, ns: str = "default") -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "busybox"}]},
            "status": {"phase": "Running"}}


def chaos(name: str, **spec) -> dict:
    body = {"target": {"pod": "web-1"}, "cpuMillicores": 500}
    body.update(spec)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ResourceChaos",
            "metadata": {"name": name}, "spec": body}


def test_label_selector_parsing():
    reqs = parse_label_selector("app=web, tier != db,env in (a, b),x notin (c),has,!gone")
    assert [(r.key, r.op, r.values) for r in reqs] == [
        ("app", "=", ("web",)), ("tier", "!=", ("db",)), ("env", "in", ("a", "b")),
        ("x", "notin", ("c",)), ("has", "exists", ()), ("gone", "!", ())]
    with pytest.raises(ValueError, match="unable to parse"):
        parse_label_selector("app=(")


def test_merge_patches():
    assert merge_patch({"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"b": None, "d": 3}, "l": [2]}) == \
        {"a": {"c": 2, "d": 3}, "l": [2]}
    merged = strategic_merge_patch({"metadata": {"finalizers": ["x"]}, "spec": {"containers": [
        {"name": "a", "image": "1"}, {"name": "b", "image": "1"}]}},
        {"metadata": {"finalizers": ["y"]}, "spec": {"containers": [{"name": "b", "image": "2"}]}})
    assert merged["metadata"]["finalizers"] == ["x", "y"]
    assert merged["spec"]["containers"] == [{"name": "a", "image": "1"}, {"name": "b", "image": "2"}]


def test_pods_crud_and_selectors(kube):
    core = client.CoreV1Api(kube)
    core.create_namespace({"metadata": {"name": "shop"}})
    core.create_namespaced_pod("shop", pod("web-1", "node-a", {"app": "web", "env": "prod"}, "shop"))
    core.create_namespaced_pod("shop", pod("web-2", "node-b", {"app": "web", "env": "dev"}, "shop"))
    core.create_namespaced_pod("shop", pod("db-1", "node-a", {"app": "db"}, "shop"))
    with pytest.raises(ApiException) as e:
        core.create_namespaced_pod("shop", pod("web-1", ns="shop"))
    assert e.value.status == 409 and "already exists" in e.value.body
    with pytest.raises(ApiException) as e:
        core.create_namespaced_pod("nowhere", pod("x", ns="nowhere"))
    assert e.value.status == 404

    got = core.read_namespaced_pod("web-1", "shop")
    assert got.metadata.uid and got.spec.node_name == "node-a"
    with pytest.raises(ApiException) as e:
        core.read_namespaced_pod("web-9", "shop")
    assert e.value.status == 404

    def names(**kw):
        return sorted(p.metadata.name for p in core.list_namespaced_pod("shop", **kw).items)

    assert names(label_selector="app=web") == ["web-1", "web-2"]
    assert names(label_selector="app!=web") == ["db-1"]
    assert names(label_selector="env in (prod,qa)") == ["web-1"]
    assert names(label_selector="env notin (prod)") == ["db-1", "web-2"]
    assert names(label_selector="env") == ["web-1", "web-2"]
    assert names(label_selector="!env") == ["db-1"]
    assert names(field_selector="spec.nodeName=node-a") == ["db-1", "web-1"]
    assert names(field_selector="spec.nodeName=node-a,metadata.name!=db-1") == ["web-1"]
    all_pods = core.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-b")
    assert [p.metadata.name for p in all_pods.items] == ["web-2"]
    with pytest.raises(ApiException) as e:
        core.list_namespaced_pod("shop", field_selector="spec.hostname=x")
    assert e.value.status == 400 and "field label not supported" in e.value.body

    # A dict body patch goes out as a strategic merge patch for built-in types.
    core.patch_namespaced_pod("web-1", "shop", {"metadata": {"labels": {"chaos": "yes"}}})
    assert core.read_namespaced_pod("web-1", "shop").metadata.labels == {"app": "web", "env": "prod", "chaos": "yes"}


def test_custom_resource_schema_defaults_and_status(kube, fakeapi):
    custom = client.CustomObjectsApi(kube)
    created = custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, chaos("c1"))
    assert created["metadata"]["generation"] == 1
    assert created["spec"]["method"] == "auto" and created["spec"]["force"] is False  # CRD defaults

    # Malformed objects: 422 naming the field, like the real server.
    for bad, field in [
        (chaos("bad1", cpuMillicores="500m"), "spec.cpuMillicores"),
        (chaos("bad2", cpuMillicores=0), "spec.cpuMillicores"),
        (chaos("bad3", bandwidth={"bitsPerSecond": 10**6, "direction": "sideways"}), "spec.bandwidth.direction"),
        (chaos("bad4", target={}), "spec.target"),
        (chaos("bad5", target={"pod": "a", "selector": {"matchLabels": {"a": "b"}}}), "spec.target"),
        (chaos("bad6", memoryBytes=1024), "spec.memoryBytes"),
    ]:
        with pytest.raises(ApiException) as e:
            custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, bad)
        assert e.value.status == 422, bad
        assert field in e.value.body, (field, e.value.body)
    no_change = chaos("bad7")
    del no_change["spec"]["cpuMillicores"]
    with pytest.raises(ApiException) as e:
        custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, no_change)
    assert e.value.status == 422

    # Unknown fields are pruned (kept out of storage), or refused under Strict validation.
    extra = chaos("c2", cpuLimit="1")
    stored = custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, extra)
    assert "cpuLimit" not in stored["spec"]
    with pytest.raises(ApiException) as e:
        custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, chaos("c3", cpuLimit="1"),
                                               field_validation="Strict")
    assert e.value.status == 400
    assert json.loads(e.value.body)["message"] == 'strict decoding error: unknown field "spec.cpuLimit"'

    # The status subresource: status on the main resource is ignored, /status changes only status.
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "c1")
    obj["status"] = {"phase": "Applied"}
    obj["spec"]["force"] = True
    updated = custom.replace_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "c1", obj)
    assert "status" not in updated and updated["metadata"]["generation"] == 2
    with pytest.raises(ApiException) as e:  # stale resourceVersion
        custom.replace_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "c1", obj)
    assert e.value.status == 409
    updated["status"] = {"phase": "Applied", "targets": [{"pod": "web-1", "phase": "Applied", "changes": [
        {"resource": "cpu", "unit": "millicores", "original": None, "applied": 500}]}]}
    updated["spec"]["force"] = False
    with_status = custom.replace_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "c1", updated)
    assert with_status["status"]["phase"] == "Applied" and with_status["spec"]["force"] is True
    with pytest.raises(ApiException) as e:
        custom.patch_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "c1",
                                                     {"status": {"phase": "Exploded"}})
    assert e.value.status == 422 and "status.phase" in e.value.body

    # Merge patches (the client's default for custom objects); a resourceVersion is a precondition.
    patched = custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "c1",
                                                    {"metadata": {"labels": {"a": "b"}}})
    assert patched["metadata"]["labels"] == {"a": "b"}
    with pytest.raises(ApiException) as e:
        custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "c1",
                                              {"metadata": {"resourceVersion": "1", "labels": {"a": "c"}}})
    assert e.value.status == 409
    with pytest.raises(ApiException) as e:
        custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "c1", {"spec": {"force": True}},
                                              _content_type="application/strategic-merge-patch+json")
    assert e.value.status == 415
    assert fakeapi.requests[-1].content_type == "application/strategic-merge-patch+json"


def test_finalizers_and_garbage_collection(kube):
    core, custom = client.CoreV1Api(kube), client.CustomObjectsApi(kube)
    owner = core.create_namespaced_pod("default", pod("web-1"))
    ref = {"apiVersion": "v1", "kind": "Pod", "name": "web-1", "uid": owner.metadata.uid}
    plain = chaos("plain")
    plain["metadata"]["ownerReferences"] = [ref]
    held = chaos("held")
    held["metadata"].update(ownerReferences=[ref], finalizers=["kubectl-chaos.io/node-a"])
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, plain)
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, held)

    core.delete_namespaced_pod("web-1", "default")
    names = [o["metadata"]["name"] for o in
             custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)["items"]]
    assert names == ["held"]  # "plain" collected with its owner; "held" waits for its finalizer
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "held")
    assert obj["metadata"]["deletionTimestamp"]
    obj["metadata"]["finalizers"] = []
    custom.replace_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "held", obj)
    with pytest.raises(ApiException) as e:
        custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "held")
    assert e.value.status == 404


def test_watch_streams_with_resource_versions(kube, fakeapi):
    core = client.CoreV1Api(kube)
    core.create_namespaced_pod("default", pod("a", "node-a"))
    listed = core.list_namespaced_pod("default", field_selector="spec.nodeName=node-a")
    seen: list[tuple[str, str]] = []
    done = threading.Event()

    def consume():
        w = watch.Watch()
        for event in w.stream(core.list_namespaced_pod, "default", field_selector="spec.nodeName=node-a",
                              resource_version=listed.metadata.resource_version, timeout_seconds=5):
            seen.append((event["type"], event["object"].metadata.name))
            if len(seen) == 4:
                w.stop()
        done.set()

    t = threading.Thread(target=consume)
    t.start()
    core.create_namespaced_pod("default", pod("b", "node-a"))
    core.create_namespaced_pod("default", pod("c", "node-b"))  # other node: not seen
    core.patch_namespaced_pod("b", "default", {"metadata": {"labels": {"x": "y"}}})
    core.delete_namespaced_pod("a", "default")
    core.delete_namespaced_pod("b", "default")
    assert done.wait(10)
    t.join()
    assert seen == [("ADDED", "b"), ("MODIFIED", "b"), ("DELETED", "a"), ("DELETED", "b")]

    # Without a resource version the watch starts with the current state as ADDED events.
    w = watch.Watch()
    first = next(iter(w.stream(core.list_namespaced_pod, "default", timeout_seconds=1)))
    w.stop()
    assert (first["type"], first["object"].metadata.name) == ("ADDED", "c")

    # A compacted resource version: 410 Gone (the client raises it when it may not retry).
    old = listed.metadata.resource_version
    fakeapi.compact()
    with pytest.raises(ApiException) as e:
        for _ in watch.Watch().stream(core.list_namespaced_pod, "default", resource_version=old,
                                      timeout_seconds=1):
            pass
    assert e.value.status == 410


def test_authentication_and_authorization(fakeapi, tmp_path):
    token = fakeapi.add_user("alice")
    fakeapi.bind("alice", {"rules": [{"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list"]}]},
                 namespace="default")
    path = fakeapi.write_kubeconfig(tmp_path / "kc", [("alice", token), ("mallory", "wrong")])
    alice = client.CustomObjectsApi(config.new_client_from_config(config_file=path, context="alice"))
    assert alice.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)["items"] == []
    with pytest.raises(ApiException) as e:
        alice.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, chaos("c1"))
    assert e.value.status == 403
    assert 'User "alice" cannot create resource "resourcechaos" in API group "kubectl-chaos.io"' in \
        json.loads(e.value.body)["message"]
    with pytest.raises(ApiException) as e:
        alice.list_namespaced_custom_object(GROUP, VERSION, "kube-system", PLURAL)
    assert e.value.status == 403
    mallory = client.CoreV1Api(config.new_client_from_config(config_file=path, context="mallory"))
    with pytest.raises(ApiException) as e:
        mallory.list_namespaced_pod("default")
    assert e.value.status == 401


def test_kubectl_discovers_and_prints_columns(fakeapi, kube, kubeconfig, tmp_path):
    client.CustomObjectsApi(kube).create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, chaos("c1"))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KUBECONFIG": kubeconfig}
    out = subprocess.run([KUBECTL, "get", "rchaos"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header.split() == ["NAME", "TARGET", "CPU", "MEMORY", "BANDWIDTH", "PHASE", "AGE"]
    assert row.split()[:2] == ["c1", "500"]
    assert re.fullmatch(r"\d+s", row.split()[-1]), row  # a date column prints as an age
    out = subprocess.run([KUBECTL, "get", "pods", "-A", "-o", "name"], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr


def test_stop_ends_open_watches(tmp_path):
    api = FakeKubeAPI().start()
    path = api.write_kubeconfig(tmp_path / "kc")
    core = client.CoreV1Api(config.new_client_from_config(config_file=path))
    result = []
    t = threading.Thread(target=lambda: result.extend(watch.Watch().stream(core.list_namespaced_pod, "default",
                                                                           timeout_seconds=60)))
    t.start()
    deadline = time.monotonic() + 10
    while not any(r.method == "WATCH" for r in api.requests) and time.monotonic() < deadline:
        time.sleep(0.02)
    api.stop()
    t.join(5)
    assert not t.is_alive()
