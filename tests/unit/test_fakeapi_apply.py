"""The fake API server's server-side apply, managed fields and size limits, as the real clients see
them: the ``kubernetes`` package's patch with ``application/apply-patch+yaml`` and kubectl's
``apply --server-side``."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import yaml

from daemonset import crd
from tests.support.fakeapi import FakeKubeAPI, field_paths, show_path

ROOT = pathlib.Path(__file__).resolve().parents[2]
KUBECTL = os.path.join(os.path.dirname(sys.executable), "kubectl")
APPLY = "application/apply-patch+yaml"


@pytest.fixture
def api():
    with FakeKubeAPI() as server:
        server.install_crd(yaml.safe_load((ROOT / "daemonset/manifests/crd.yaml").read_text()))
        server.add_namespace("shop")
        server.create(crd.build("shop", crd.ChaosSpec(selector={"matchLabels": {"app": "web"}}, cpu_millicpu=500),
                                name="sel"))
        yield server


@pytest.fixture
def custom(api, tmp_path):
    from kubernetes import client, config

    k8s = config.new_client_from_config(config_file=api.write_kubeconfig(tmp_path / "kc"))
    yield client.CustomObjectsApi(k8s)
    k8s.close()


def entry(pod: str, node: str, phase: str = crd.APPLIED) -> dict:
    return {"pod": pod, "node": node, "phase": phase, "observedGeneration": 1}


def apply_status(custom, node: str, targets: list[dict], *, force: bool = False, extra: dict | None = None) -> dict:
    body = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": "sel", "namespace": "shop"},
            "status": {"targets": targets, "nodes": [{"node": node, "phase": crd.APPLIED}], **(extra or {})}}
    return custom.patch_namespaced_custom_object_status(crd.GROUP, crd.VERSION, "shop", crd.PLURAL, "sel", body,
                                                        field_manager=f"chaos-agent/{node}", force=force,
                                                        _content_type=APPLY)


def pods_of(obj: dict) -> list[str]:
    return sorted(t["pod"] for t in obj["status"]["targets"])


def test_each_manager_owns_its_own_items_of_a_list_map(api, custom):
    apply_status(custom, "n1", [entry("a", "n1"), entry("b", "n1")])
    obj = apply_status(custom, "n2", [entry("c", "n2")])
    assert pods_of(obj) == ["a", "b", "c"]
    assert sorted(n["node"] for n in obj["status"]["nodes"]) == ["n1", "n2"]
    managers = {(m["manager"], m["operation"], m.get("subresource")): m for m in obj["metadata"]["managedFields"]}
    assert ("chaos-agent/n1", "Apply", "status") in managers and ("chaos-agent/n2", "Apply", "status") in managers
    owned = managers[("chaos-agent/n2", "Apply", "status")]["fieldsV1"]["f:status"]["f:targets"]
    assert list(owned) == ['k:{"pod":"c"}'] and set(owned['k:{"pod":"c"}']) == {".", "f:pod", "f:node", "f:phase",
                                                                                 "f:observedGeneration"}
    # n1 applies again without "b": b goes, c (n2's) stays; no read-modify-write, no conflict.
    obj = apply_status(custom, "n1", [entry("a", "n1", crd.REVERTED)])
    assert pods_of(obj) == ["a", "c"]
    assert crd.target_entry(obj["status"], "a")["phase"] == crd.REVERTED


def test_another_managers_field_with_another_value_is_a_conflict_unless_forced(api, custom):
    from kubernetes.client.exceptions import ApiException

    apply_status(custom, "n1", [entry("a", "n1")], extra={"targetSummary": "-l app=web"})
    apply_status(custom, "n2", [entry("b", "n2")], extra={"targetSummary": "-l app=web"})  # same value: shared
    with pytest.raises(ApiException) as err:
        apply_status(custom, "n2", [entry("a", "n2"), entry("b", "n2")])
    assert err.value.status == 409
    status = json.loads(err.value.body)
    assert status["reason"] == "Conflict"
    fields = sorted(c["field"] for c in status["details"]["causes"])
    assert fields == ['.status.targets[pod="a"].node']  # phase and generation are the same: shared
    assert 'conflict with "chaos-agent/n1"' in status["message"]
    obj = apply_status(custom, "n2", [entry("a", "n2"), entry("b", "n2")], force=True)
    assert crd.target_entry(obj["status"], "a")["node"] == "n2"


def test_an_update_takes_the_fields_it_changes(api, custom):
    from kubernetes.client.exceptions import ApiException

    apply_status(custom, "n1", [entry("a", "n1")])
    obj = custom.get_namespaced_custom_object(crd.GROUP, crd.VERSION, "shop", crd.PLURAL, "sel")
    obj["status"]["targets"][0]["phase"] = crd.FAILED
    obj = custom.replace_namespaced_custom_object_status(crd.GROUP, crd.VERSION, "shop", crd.PLURAL, "sel", obj)
    updater = [m for m in obj["metadata"]["managedFields"] if m["operation"] == "Update"
               and m.get("subresource") == "status"]
    assert updater and updater[0]["manager"] == "OpenAPI-Generator"  # the client's user agent
    with pytest.raises(ApiException) as err:  # n1 still says Applied: the updater holds phase now
        apply_status(custom, "n1", [entry("a", "n1")])
    assert err.value.status == 409


def test_size_limits(api, custom):
    from kubernetes.client.exceptions import ApiException

    fat = [dict(entry(f"pod-{i:04d}", "n1"), message="x" * 3300) for i in range(crd.MAX_TARGETS)]
    assert 1.5 * 2**20 < len(json.dumps(fat)) < 3 * 2**20  # a body the server takes, an object etcd does not
    with pytest.raises(ApiException) as err:
        apply_status(custom, "n1", fat)
    assert err.value.status == 500 and json.loads(err.value.body)["message"] == "etcdserver: request is too large"
    assert pods_of(apply_status(custom, "n1", fat[:200])) == [t["pod"] for t in fat[:200]]  # half of it fits
    with pytest.raises(ApiException) as err:
        apply_status(custom, "n1", [dict(entry("a", "n1"), message="x" * (4 * 2**20))])
    assert err.value.status == 413
    with pytest.raises(ApiException) as err:  # the schema's cap on targets
        apply_status(custom, "n1", [entry(f"p{i}", "n1") for i in range(crd.MAX_TARGETS + 1)])
    assert err.value.status == 422


def test_kubectl_apply_server_side_against_the_fake(api, tmp_path):
    """The real kubectl: create by apply, change by apply, a second manager's conflict as kubectl prints it.
    (--validate=false: the fake serves no OpenAPI documents for kubectl's client-side check.)"""
    kubeconfig = api.write_kubeconfig(tmp_path / "kc", namespace="shop")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "KUBECONFIG": kubeconfig}
    manifest = tmp_path / "rc.yaml"

    def kubectl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([KUBECTL, *args], env=env, capture_output=True, text=True, timeout=60)

    manifest.write_text(yaml.safe_dump(crd.build("shop", crd.ChaosSpec(pod="web-1", container="app",
                                                                        cpu_millicpu=500), name="web-1.app")))
    out = kubectl("apply", "--server-side", "--validate=false", "-f", str(manifest))
    assert out.returncode == 0 and "serverside-applied" in out.stdout, out.stderr
    obj = api.get(api.resource_type(crd.GROUP, crd.PLURAL), "shop", "web-1.app")
    assert [(m["manager"], m["operation"]) for m in obj["metadata"]["managedFields"]] == [("kubectl", "Apply")]
    out = kubectl("patch", "resourcechaos", "web-1.app", "--type=merge", "-p", '{"spec":{"cpuMillicores":300}}')
    assert out.returncode == 0, out.stderr
    out = kubectl("apply", "--server-side", "--validate=false", "-f", str(manifest))  # 500 again: kubectl-patch owns it now
    assert out.returncode != 0 and "conflict" in out.stderr.lower() and ".spec.cpuMillicores" in out.stderr, out.stderr
    out = kubectl("apply", "--server-side", "--validate=false", "--force-conflicts", "-f", str(manifest))
    assert out.returncode == 0, out.stderr
    assert api.get(api.resource_type(crd.GROUP, crd.PLURAL), "shop", "web-1.app")["spec"]["cpuMillicores"] == 500


def test_paths_follow_the_schema():
    schema = yaml.safe_load((ROOT / "daemonset/manifests/crd.yaml").read_text())["spec"]["versions"][0]["schema"][
        "openAPIV3Schema"]
    paths = field_paths({"status": {"targets": [{"pod": "a", "changes": [{"resource": "cpu"}]}]}}, schema)
    assert paths == {("f:status", "f:targets", 'k:{"pod":"a"}', "."),
                     ("f:status", "f:targets", 'k:{"pod":"a"}', "f:pod"),
                     ("f:status", "f:targets", 'k:{"pod":"a"}', "f:changes")}  # an atomic list: one field
    assert show_path(("f:status", "f:targets", 'k:{"pod":"a"}', "f:phase")) == '.status.targets[pod="a"].phase'
