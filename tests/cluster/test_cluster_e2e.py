"""Cluster mode end to end: the kubectl-chaos executable -> fake API server -> the chaos-agent
process (its controller, its engine) -> real containerd and real cgroups on the test node -> status
-> output. The agent is the real program, started with ``--kubeconfig`` for the fake API server,
and killed with SIGKILL where a test restarts it.

The pods in the fake API mirror real pods on the test node (same namespace, name and uid;
``spec.nodeName`` is the agent's node). The agent authenticates with its own token, bound to the
manifests' own ClusterRole, and the plugin runs as a user bound to the manifests' user role, so
RBAC mistakes in the manifests fail here. Effects are checked in the cgroup files.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

from daemonset import crd
from tests.cluster.helpers import (
    AGENT_USER,
    KUBECTL_CHAOS,
    NODE,
    chaos_objects,
    events,
    memory_limit,
    mirror,
    quota_us,
    settle,
    wait_for,
)
from tests.support.node import ContainerSpec


def test_apply_status_reset_through_the_api(cluster, pods):
    fakeapi, agent, run = cluster
    pod = pods.run("web-1", "shop", [ContainerSpec(cpu_millicpu=1000, memory_bytes=256 * 2**20)])
    mirror(fakeapi, pod)
    assert quota_us(pod) == 100_000

    out = run("--set-cpu=500m", "--set-memory=128Mi", "web-1")
    assert out.returncode == 0, out.stderr
    assert quota_us(pod) == 50_000
    assert memory_limit(pod) == 128 * 2**20
    assert "500m" in out.stdout and "128Mi" in out.stdout, out.stdout

    (obj,) = chaos_objects(fakeapi)
    assert obj["metadata"]["name"] == "web-1.app"
    assert obj["metadata"]["ownerReferences"][0]["uid"] == pod.uid
    assert obj["metadata"]["finalizers"] == [crd.finalizer_for(NODE)]
    (entry,) = obj["status"]["targets"]
    assert entry["phase"] == "Applied" and entry["node"] == NODE and entry["container"] == "app"
    changes = {c["resource"]: c for c in entry["changes"]}
    assert changes["cpu"]["original"] == 1000 and changes["cpu"]["applied"] == 500
    assert changes["memory"]["original"] == 256 * 2**20 and changes["memory"]["applied"] == 128 * 2**20
    assert crd.node_entry(obj["status"], NODE)["phase"] == "Applied"
    assert obj["status"]["targetSummary"] == "pod/web-1"
    assert [m["manager"] for m in obj["metadata"]["managedFields"] if m.get("subresource") == "status"] == \
        [f"chaos-agent/{NODE}"]
    wait_for(lambda: [reason for reason, _ in events(fakeapi, "web-1")] == ["Applied"], what="the Applied event")

    status = run("status", "-o", "json")
    assert status.returncode == 0, status.stderr
    assert "web-1" in status.stdout

    # A second change on the same container goes on top; the originals stay the first ones.
    out = run("--set-cpu=250m", "web-1")
    assert out.returncode == 0, out.stderr
    assert quota_us(pod) == 25_000
    assert memory_limit(pod) == 128 * 2**20

    out = run("--reset", "web-1")
    assert out.returncode == 0, out.stderr
    assert quota_us(pod) == 100_000
    assert memory_limit(pod) == 256 * 2**20
    assert chaos_objects(fakeapi) == []
    wait_for(lambda: [reason for reason, _ in events(fakeapi, "web-1")] == ["Applied", "Applied", "Reverted"],
             what="the events")

    out = run("--reset", "web-1")
    assert out.returncode == 1 and "no experiment on pod shop/web-1" in out.stderr


def test_delete_while_agent_down_reverts_on_restart(cluster, pods):
    fakeapi, agent, run = cluster
    pod = pods.run("web-2", "shop", [ContainerSpec(cpu_millicpu=800)])
    mirror(fakeapi, pod)
    out = run("--set-cpu=200m", "web-2")
    assert out.returncode == 0, out.stderr
    assert quota_us(pod) == 20_000

    agent.kill9()
    rtype = fakeapi.resource_type(crd.GROUP, crd.PLURAL)
    fakeapi.delete(rtype, "shop", "web-2.app")
    held = fakeapi.get(rtype, "shop", "web-2.app")  # the agent's finalizer holds it
    assert held["metadata"]["deletionTimestamp"]
    assert quota_us(pod) == 20_000

    agent.start()
    wait_for(lambda: quota_us(pod) == 80_000, what="the revert after the restart")
    wait_for(lambda: chaos_objects(fakeapi) == [], what="the object to be removed")


def test_restart_keeps_experiment_and_reset_still_works(cluster, pods):
    fakeapi, agent, run = cluster
    pod = pods.run("web-3", "shop", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, pod)
    assert run("--set-cpu=300m", "web-3").returncode == 0
    # The agent posts its Event a few ms after the status kubectl-chaos returns on; a kill -9 in
    # between loses it (Events are best effort). Killed once it is there, a second "Applied" after
    # the restart would be a second apply.
    wait_for(lambda: [reason for reason, _ in events(fakeapi, "web-3")] == ["Applied"], what="the Applied event")
    agent.kill9()
    assert quota_us(pod) == 30_000
    agent.start()
    settle(fakeapi)
    assert quota_us(pod) == 30_000  # still in force, not re-applied twice, not reverted
    assert [reason for reason, _ in events(fakeapi, "web-3")] == ["Applied"]
    out = run("--reset", "web-3")
    assert out.returncode == 0, out.stderr
    assert quota_us(pod) == 100_000


def test_duration_expires_and_status_says_so(cluster, pods):
    fakeapi, agent, run = cluster
    pod = pods.run("web-4", "shop", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, pod)
    out = run("--set-cpu=400m", "--duration=2s", "web-4")
    assert out.returncode == 0, out.stderr
    assert quota_us(pod) == 40_000
    wait_for(lambda: quota_us(pod) == 100_000, timeout_s=8, what="the expiry")
    rtype = fakeapi.resource_type(crd.GROUP, crd.PLURAL)
    obj = wait_for(lambda: crd.node_entry((o := fakeapi.get(rtype, "shop", "web-4.app"))["status"], NODE)["phase"]
                   == "Reverted"
                   and not o["metadata"].get("finalizers") and o, what="status Reverted and the finalizer dropped")
    assert "expired" in obj["status"]["targets"][0]["message"]


def test_deleting_the_pod_deletes_its_experiment(cluster, pods):
    fakeapi, agent, run = cluster
    pod = pods.run("web-5", "shop", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, pod)
    assert run("--set-cpu=500m", "web-5").returncode == 0
    pod.delete()  # the kubelet's part
    fakeapi.delete(fakeapi.resource_type("", "pods"), "shop", "web-5")  # the API's part; GC follows
    wait_for(lambda: chaos_objects(fakeapi) == [], what="the garbage-collected experiment to go")
    assert agent.experiments("shop") == []


def test_selector_targets_many_pods(cluster, pods):
    fakeapi, agent, run = cluster
    web = [pods.run(f"many-{i}", "shop", [ContainerSpec(cpu_millicpu=1000)]) for i in range(2)]
    other = pods.run("other", "shop", [ContainerSpec(cpu_millicpu=1000)])
    for p in web:
        mirror(fakeapi, p, labels={"app": "many"})
    mirror(fakeapi, other, labels={"app": "other"})
    out = run("--set-cpu=600m", "-l", "app=many", "-o", "json")
    assert out.returncode == 0, out.stderr
    assert [quota_us(p) for p in web] == [60_000, 60_000]
    assert quota_us(other) == 100_000
    (obj,) = chaos_objects(fakeapi)
    assert sorted(t["pod"] for t in obj["status"]["targets"]) == ["many-0", "many-1"]
    out = run("--reset", "-l", "app=many")
    assert out.returncode == 0, out.stderr
    assert [quota_us(p) for p in web] == [100_000, 100_000]


def test_default_container_annotation_and_errors_list_what_exists(cluster, pods):
    fakeapi, agent, run = cluster
    pod = pods.run("duo", "shop", [ContainerSpec(name="main", cpu_millicpu=1000),
                                   ContainerSpec(name="side", cpu_millicpu=1000)])
    mirror(fakeapi, pod, annotations={crd.DEFAULT_CONTAINER_ANNOTATION: "side"})
    out = run("--set-cpu=500m", "-c", "nope", "duo")
    assert out.returncode == 1 and "main, side" in out.stderr, out.stderr
    out = run("--set-cpu=500m", "nope-pod")
    assert out.returncode == 1 and "pods in shop:" in out.stderr and "duo" in out.stderr, out.stderr
    out = run("--set-cpu=500m", "duo")
    assert out.returncode == 0, out.stderr
    assert quota_us(pod, "side") == 50_000 and quota_us(pod, "main") == 100_000
    assert run("--reset", "duo").returncode == 0


def test_an_agent_that_never_answers(cluster):
    fakeapi, agent, run = cluster
    fakeapi.create({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "lonely", "namespace": "shop"},
                    "spec": {"nodeName": "node-without-agent", "containers": [{"name": "app"}]},
                    "status": {"phase": "Running"}})
    started = time.monotonic()
    out = run("--set-cpu=500m", "--timeout=2s", "lonely")
    assert out.returncode == 1
    assert time.monotonic() - started < 15
    assert "no answer from the chaos-agent on node node-without-agent within 2s" in out.stderr, out.stderr
    assert "removed the ResourceChaos again" in out.stderr
    assert chaos_objects(fakeapi) == []


def test_rbac_refusals_are_one_line(cluster, tmp_path):
    fakeapi, agent, run = cluster
    token = fakeapi.add_user("bob")  # no rights at all
    path = fakeapi.write_kubeconfig(tmp_path / "bob", [("bob", token)], namespace="shop")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "KUBECONFIG": path}
    out = subprocess.run([KUBECTL_CHAOS, "--set-cpu=500m", "web-1"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0
    assert 'not allowed: pods "web-1" is forbidden: User "bob" cannot get resource "pods"' in out.stderr


def test_status_lists_across_namespaces_as_admin(cluster, pods, kubeconfig, tmp_path):
    fakeapi, agent, run = cluster
    pod = pods.run("web-6", "shop", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, pod)
    assert run("--set-cpu=700m", "web-6").returncode == 0
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "KUBECONFIG": kubeconfig}
    out = subprocess.run([KUBECTL_CHAOS, "status", "-A", "-o", "json"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert "web-6" in json.dumps(data)
    assert run("--reset", "web-6").returncode == 0


def test_dry_run_creates_nothing(cluster, pods):
    fakeapi, agent, run = cluster
    pod = pods.run("dry", "shop", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, pod)
    out = run("--set-cpu=500m", "--dry-run", "dry")
    assert out.returncode == 0, out.stderr
    assert chaos_objects(fakeapi) == []
    assert quota_us(pod) == 100_000
    assert any(r.method == "POST" and "dryRun=All" in r.path for r in fakeapi.requests)


def test_unreachable_api_server_is_one_line(tmp_path):
    kubeconfig = tmp_path / "kc"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: gone\n"
        "clusters: [{name: gone, cluster: {server: 'https://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {token: t}}]\ncontexts: [{name: gone, context: {cluster: gone, user: u}}]\n")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "KUBECONFIG": str(kubeconfig)}
    out = subprocess.run([KUBECTL_CHAOS, "--set-cpu=500m", "web"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1
    assert out.stderr.startswith("error: cannot reach the Kubernetes API at https://127.0.0.1:9"), out.stderr
    assert out.stderr.count("\n") == 1
    out = subprocess.run([KUBECTL_CHAOS, "--context=nope", "--set-cpu=500m", "web"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "context" in out.stderr and "nope" in out.stderr, out.stderr


def test_bandwidth_both_ways_through_the_api(cluster, pods):
    fakeapi, agent, run = cluster
    pod = pods.run("net", "shop", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, pod)
    out = run("--set-bandwidth=10Mbit", "--latency=20ms", "net", "-o", "json")
    assert out.returncode == 0, out.stderr
    (obj,) = chaos_objects(fakeapi)
    assert obj["spec"]["bandwidth"]["latencyMilliseconds"] == 20
    changes = {c["resource"]: c for c in obj["status"]["targets"][0]["changes"]}
    assert set(changes) == {"bandwidth-ingress", "bandwidth-egress"}
    for change in changes.values():
        assert change["original"] is None  # no limit before
        assert abs(change["applied"] - 10_000_000) <= 100_000  # read back from the kernel (HTB rounds)
        # The queue: 20 ms of 1,250,000 bytes/s, as the agent read it back.
        assert (change["queue"]["budgetSeconds"], change["queue"]["limitBytes"]) == (0.02, 25_000), change
    [target] = json.loads(out.stdout)["targets"]
    assert {c["queue"]["limitBytes"] for c in target["changes"]} == {25_000}
    import netshape  # and the kernel holds it on the pod's veth and our IFB

    veth = netshape.find_host_veth(agent.node.client.container_info(pod.container_id()).pid).ifname
    queue = netshape.read_queue(veth, pod.sandbox_id)
    assert (queue.ingress_limit_bytes, queue.egress_limit_bytes) == (25_000, 25_000)
    out = run("--reset", "net")
    assert out.returncode == 0, out.stderr
    assert agent.experiments("shop") == []


def test_selector_with_a_silent_node_reports_each_pod(cluster, pods):
    fakeapi, agent, run = cluster
    here = pods.run("mixed-0", "shop", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, here, labels={"app": "mixed"})
    fakeapi.create({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "mixed-1", "namespace": "shop", "labels": {"app": "mixed"}},
                    "spec": {"nodeName": "node-without-agent", "containers": [{"name": "app"}]},
                    "status": {"phase": "Running"}})
    out = run("--set-cpu=500m", "-l", "app=mixed", "--timeout=3s")
    assert out.returncode == 1, out.stdout + out.stderr
    assert quota_us(here) == 50_000
    assert "mixed-0" in out.stdout
    assert "no answer from the chaos-agent on node node-without-agent" in out.stdout + out.stderr
    (obj,) = chaos_objects(fakeapi)  # kept: it is in force on the node that answered
    assert [t["pod"] for t in obj["status"]["targets"]] == ["mixed-0"]
    assert run("--reset", "-l", "app=mixed").returncode == 0
    assert quota_us(here) == 100_000


def test_agent_started_while_the_plugin_waits(cluster, pods):
    """The agent is down when the command runs (a DaemonSet pod being replaced); the plugin's wait
    ends with the agent's answer once it is back."""
    fakeapi, agent, run = cluster
    pod = pods.run("web-7", "shop", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, pod)
    agent.kill9()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": "/tmp", "KUBECONFIG": run.kubeconfig}
    waiting = subprocess.Popen([KUBECTL_CHAOS, "--set-cpu=350m", "--timeout=40s", "web-7"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: chaos_objects(fakeapi), what="the ResourceChaos to be created")
        assert quota_us(pod) == 100_000
        agent.start()
        out, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, err
    assert "350m" in out, out
    assert quota_us(pod) == 35_000
    assert run("--reset", "web-7").returncode == 0
    assert quota_us(pod) == 100_000


def test_failed_request_sent_again_is_retried(cluster, pods):
    """Re-running the same command after a failure asks the agent again (a new generation), and the
    targets that had failed are retried; those in force stay in force."""
    fakeapi, agent, run = cluster
    ok, busy = (pods.run(f"retry-{i}", "shop", [ContainerSpec(cpu_millicpu=1000)]) for i in range(2))
    for p in (ok, busy):
        mirror(fakeapi, p, labels={"app": "retry"})
    agent.node_local("Apply", "shop", "retry-1", "app", cpu_millicpu=900)  # someone's node-local experiment
    assert quota_us(busy) == 90_000
    out = run("--set-cpu=450m", "-l", "app=retry")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "already under a node-local experiment" in out.stdout + out.stderr
    (obj,) = chaos_objects(fakeapi)
    phases = {t["pod"]: t["phase"] for t in obj["status"]["targets"]}
    assert phases == {"retry-0": "Applied", "retry-1": "Failed"}
    generation = obj["metadata"]["generation"]
    agent.node_local("Revert", "shop", "retry-1", "app")
    assert quota_us(busy) == 100_000

    out = run("--set-cpu=450m", "-l", "app=retry")  # the very same command
    assert out.returncode == 0, out.stdout + out.stderr
    assert quota_us(ok) == 45_000 and quota_us(busy) == 45_000
    (obj,) = chaos_objects(fakeapi)
    assert obj["metadata"]["generation"] > generation
    for entry in obj["status"]["targets"]:
        assert entry["phase"] == "Applied" and entry["observedGeneration"] == obj["metadata"]["generation"]
        assert {c["resource"]: c["original"] for c in entry["changes"]} == {"cpu": 1000}
    assert run("--reset", "-l", "app=retry").returncode == 0
    assert quota_us(ok) == 100_000 and quota_us(busy) == 100_000


def test_change_without_duration_keeps_the_end_time(cluster, pods):
    """A further change without --duration keeps the end time in force (as node-local mode does);
    one with --duration counts from now."""
    fakeapi, agent, run = cluster
    pod = pods.run("web-9", "shop", [ContainerSpec(cpu_millicpu=1000, memory_bytes=256 * 2**20)])
    mirror(fakeapi, pod)
    rtype = fakeapi.resource_type(crd.GROUP, crd.PLURAL)

    def entry() -> dict:
        return fakeapi.get(rtype, "shop", "web-9.app")["status"]["targets"][0]

    assert run("--set-cpu=400m", "--duration=5s", "web-9").returncode == 0
    first_end = entry()["expiresAt"]
    (experiment,) = agent.experiments("shop")
    first_end_s = experiment.expires_at_unix_s
    time.sleep(1.0)
    out = run("--set-memory=128Mi", "web-9")
    assert out.returncode == 0, out.stderr
    assert memory_limit(pod) == 128 * 2**20 and quota_us(pod) == 40_000
    assert entry()["expiresAt"] == first_end
    (experiment,) = agent.experiments("shop")
    assert experiment.expires_at_unix_s == first_end_s

    out = run("--set-cpu=300m", "--duration=30s", "web-9")
    assert out.returncode == 0, out.stderr
    (experiment,) = agent.experiments("shop")
    assert experiment.expires_at_unix_s >= first_end_s + 25
    assert crd.parse_rfc3339(entry()["expiresAt"]).timestamp() >= first_end_s + 25
    assert run("--reset", "web-9").returncode == 0
    assert quota_us(pod) == 100_000 and memory_limit(pod) == 256 * 2**20


def test_selector_experiment_outlives_its_first_pods(cluster, pods):
    """A selector experiment is owned by no pod: when the pods it started on are replaced (a
    rollout), it goes on and applies to the new ones; --reset reverts them."""
    fakeapi, agent, run = cluster
    first = pods.run("roll-a", "shop", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, first, labels={"app": "roll"})
    out = run("--set-cpu=600m", "-l", "app=roll")
    assert out.returncode == 0, out.stderr
    assert quota_us(first) == 60_000
    (obj,) = chaos_objects(fakeapi)
    assert "ownerReferences" not in obj["metadata"]

    first.delete()
    fakeapi.delete(fakeapi.resource_type("", "pods"), "shop", "roll-a")
    second = pods.run("roll-b", "shop", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, second, labels={"app": "roll"})
    wait_for(lambda: quota_us(second) == 60_000, what="the new pod to be limited")

    def entries() -> dict:
        (obj,) = chaos_objects(fakeapi)
        return {t["pod"]: t for t in obj["status"]["targets"]}

    wait_for(lambda: entries().get("roll-b", {}).get("phase") == "Applied", what="status Applied for roll-b")
    entries = entries()
    # Deleted from the API or seen stopped on the node first: whichever the agent notices first ends it.
    assert entries["roll-a"]["phase"] == "Reverted"
    assert any(why in entries["roll-a"]["message"] for why in ("pod deleted", "pod stopped")), entries["roll-a"]

    out = run("--reset", "-l", "app=roll")
    assert out.returncode == 0, out.stderr
    assert quota_us(second) == 100_000
    assert chaos_objects(fakeapi) == []


def test_agent_with_in_cluster_credentials(in_cluster, pods):
    """The agent as the DaemonSet runs it: KUBERNETES_SERVICE_HOST/PORT and the service account's
    token and CA at /var/run/secrets/kubernetes.io/serviceaccount, no --kubeconfig."""
    fakeapi, agent, run = in_cluster
    pod = pods.run("incluster", "shop", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, pod)
    out = run("--set-cpu=550m", "incluster")
    assert out.returncode == 0, out.stderr
    assert quota_us(pod) == 55_000
    assert any(r.user == AGENT_USER and r.method == "WATCH" for r in fakeapi.requests)
    assert run("--reset", "incluster").returncode == 0
    assert quota_us(pod) == 100_000


def test_runtime_not_answering_is_retried_not_failed(node, pods, fakeapi, tmp_path):
    """The runtime stops answering the agent (containerd restarting): the experiment stays Pending,
    the plugin says what the agent waits for, and the agent applies it once the runtime is back."""
    from tests.cluster.conftest import _cluster
    from tests.cluster.helpers import AgentProcess, SocketRelay

    rundir = pathlib.Path(tempfile.mkdtemp(prefix="kcx-relay-", dir="/tmp"))
    relay = SocketRelay(str(node.socket), rundir / "cri.sock").restore()
    agent = AgentProcess(node, fakeapi, tmp_path, cri_endpoint=str(relay.path))
    fixture = _cluster(agent, fakeapi, tmp_path)
    fakeapi_, agent, run = next(fixture)
    try:
        pod = pods.run("flaky", "shop", [ContainerSpec(cpu_millicpu=1000)])
        mirror(fakeapi, pod)
        relay.cut()
        out = run("--set-cpu=450m", "--timeout=3s", "flaky")
        assert out.returncode == 1
        assert "the chaos-agent on node test-node is waiting: the container runtime does not answer" in out.stderr, \
            out.stderr
        assert quota_us(pod) == 100_000
        relay.restore()
        out = run("--set-cpu=450m", "--timeout=30s", "flaky")
        assert out.returncode == 0, out.stderr
        assert quota_us(pod) == 45_000
        assert run("--reset", "flaky").returncode == 0
        assert quota_us(pod) == 100_000
    finally:
        fixture.close()
        relay.cut()
        shutil.rmtree(rundir, ignore_errors=True)
