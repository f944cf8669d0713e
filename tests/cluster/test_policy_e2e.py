"""Who may do what in cluster mode, end to end: the kubectl-chaos executable as a tenant -> the fake
API server -> the real chaos-agent process -> real cgroups on the test node. The namespace opt-in,
the raise policy (a cluster admin's grant on the namespace), and no word of another namespace in
anything the tenant can read (status, Events, the plugin's output)."""

from __future__ import annotations

import json

from daemonset import crd
from tests.cluster.helpers import NODE, chaos_objects, events, mirror, quota_us, role, wait_for
from tests.support.node import ContainerSpec


def set_namespace(fakeapi, name: str, *, labels: dict | None = None, annotations: dict | None = None) -> None:
    """What a cluster admin does: kubectl label / annotate namespace."""
    meta = {k: v for k, v in (("labels", labels), ("annotations", annotations)) if v is not None}
    fakeapi.patch(fakeapi.resource_type("", "namespaces"), None, name, {"metadata": meta},
                  "application/merge-patch+json")


def test_a_namespace_is_changed_only_while_an_admin_has_enabled_it(cluster, pods):
    fakeapi, agent, run = cluster
    fakeapi.add_namespace("lab")
    fakeapi.bind("alice", role("user-role.yaml", "kubectl-chaos-user"), namespace="lab")
    pod = pods.run("exp-1", "lab", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, pod)

    out = run("--set-cpu=500m", "-n", "lab", "exp-1")
    assert out.returncode == 1
    assert ("namespace lab is not enabled for kubectl-chaos; a cluster admin enables it with: kubectl label namespace"
            " lab kubectl-chaos.io/enabled=true") in out.stderr, out.stderr
    assert quota_us(pod) == 100_000
    assert chaos_objects(fakeapi, "lab") == []  # the plugin removed what it created

    set_namespace(fakeapi, "lab", labels={"kubectl-chaos.io/enabled": "true"})
    out = run("--set-cpu=500m", "-n", "lab", "exp-1")
    assert out.returncode == 0, out.stderr
    assert quota_us(pod) == 50_000

    # The admin takes the label away: what is in force there is put back.
    set_namespace(fakeapi, "lab", labels={"kubectl-chaos.io/enabled": None})
    wait_for(lambda: quota_us(pod) == 100_000, what="the revert after the opt-out")
    rtype = fakeapi.resource_type(crd.GROUP, crd.PLURAL)
    entry = wait_for(lambda: (e := crd.target_entry(fakeapi.get(rtype, "lab", "exp-1.app").get("status"), "exp-1"))
                     and e["phase"] == "Reverted" and e, what="status Reverted")
    assert entry["message"] == "reverted: the namespace is no longer enabled for kubectl-chaos"
    assert run("--reset", "-n", "lab", "exp-1").returncode == 0


def test_a_raise_needs_the_admins_grant_and_stays_within_it(cluster, pods):
    fakeapi, agent, run = cluster
    pod = pods.run("raise-1", "shop", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, pod)

    out = run("--set-cpu=1500m", "raise-1")
    assert out.returncode == 1
    assert ("cpu 1500m is above container app's cpu limit in its pod spec (1000m); raising needs a grant on namespace"
            " shop, which has none: a cluster admin can annotate the namespace with kubectl-chaos.io/max-raise=2")\
        in out.stderr, out.stderr
    assert quota_us(pod) == 100_000

    out = run("--set-cpu=400m", "raise-1")  # lowering needs no grant
    assert out.returncode == 0, out.stderr
    assert quota_us(pod) == 40_000

    set_namespace(fakeapi, "shop", annotations={"kubectl-chaos.io/max-raise": "2"})
    out = run("--set-cpu=1500m", "raise-1")  # within the grant: a further change on top
    assert out.returncode == 0, out.stderr
    assert quota_us(pod) == 150_000

    out = run("--set-cpu=2500m", "raise-1")  # above it (and above the node's 2 CPUs): refused, 1500m stays
    assert out.returncode == 1
    assert "namespace shop allows at most 2000m (kubectl-chaos.io/max-raise=2 times the spec limit)" in out.stderr
    assert quota_us(pod) == 150_000

    out = run("--reset", "raise-1")
    assert out.returncode == 0, out.stderr
    assert quota_us(pod) == 100_000


def test_nothing_a_tenant_reads_names_another_namespace(cluster, pods):
    """The runtime's "not found" error lists the node's pods; the tenant sees none of another team's."""
    fakeapi, agent, run = cluster
    fakeapi.add_namespace("team-b", labels={"kubectl-chaos.io/enabled": "true"})
    secret = pods.run("payroll-db", "team-b", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, secret)
    # A pod the API says runs on this node, which the runtime does not have (it went away meanwhile).
    fakeapi.create({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "ghost", "namespace": "shop", "labels": {"app": "ghost"}},
                    "spec": {"nodeName": NODE, "containers": [{"name": "app", "resources": {"limits": {"cpu": "1"}}}]},
                    "status": {"phase": "Running"}})

    outputs = [run("--set-cpu=500m", "ghost"), run("--set-cpu=500m", "-l", "app=ghost", "-o", "json"),
               run("status", "-o", "json")]
    assert outputs[0].returncode == 1 and "no pod shop/ghost on the runtime" in outputs[0].stderr, outputs[0].stderr
    assert "a pod in another namespace" in outputs[0].stderr
    readable = [o.stdout + o.stderr for o in outputs]
    readable += [json.dumps(o) for o in chaos_objects(fakeapi, "shop")]
    readable += [f"{reason} {message}" for reason, message in events(fakeapi, "ghost")]
    assert any("ghost" in text for text in readable)
    for text in readable:
        assert "team-b" not in text and "payroll" not in text, text
    assert quota_us(secret) == 100_000
