"""Status that scales: one selector experiment over 100 real pods, answered by 20 agents.

One real containerd node runs 100 pods; the fake API server has them spread by node name over 20
nodes, and 20 agents (each its own engine with its own state directory, and its own controller
with its own token bound to the manifests' ClusterRole, in this process) each own the pods of
"their" node. The tenant runs the real kubectl-chaos with a selector that matches all 100:
every agent applies its five and writes its own status entries by server-side apply, as field
manager chaos-agent/NODE. Then --reset: every pod back to its original, the object gone.

Reported (and kept under limits): time from the object's creation to its last status write,
status writes, write conflicts (409s), the object's size and its managedFields' share.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from daemonset import crd
from tests.cluster.helpers import KUBECTL_CHAOS, agent_kubeconfig, pod_spec_containers, quota_us, role
from tests.support.node import ContainerSpec

PODS = 100
AGENTS = 20


class _ScaleAgent:
    """One node's agent: an engine on the shared containerd and a controller for node ``name``."""

    def __init__(self, node, fakeapi, workdir, name: str):
        from kubernetes import config

        from cri_api import RuntimeClient
        from daemonset.controller import Controller
        from daemonset.engine import Engine

        workdir.mkdir()
        self.client = config.new_client_from_config(config_file=agent_kubeconfig(fakeapi, workdir))
        self.engine = Engine(RuntimeClient(str(node.socket)), state_dir=str(workdir / "state"), node_name=name,
                             drift_interval_s=30.0, sweep_orphan_ifbs=False)
        self.controller = Controller(self.engine, self.client, name, resync_s=600.0)

    def start(self) -> None:
        self.engine.start()
        self.controller.start()

    def close(self) -> None:
        self.controller.stop()
        self.engine.close()
        self.client.close()


@pytest.fixture
def scale(node, fakeapi, pods, tmp_path):
    fakeapi.add_namespace("scale", labels={"kubectl-chaos.io/enabled": "true"})
    token = fakeapi.add_user("alice")
    fakeapi.bind("alice", role("user-role.yaml", "kubectl-chaos-user"), namespace="scale")
    kubeconfig = fakeapi.write_kubeconfig(tmp_path / "alice", [("alice", token)], namespace="scale")
    started = time.monotonic()
    real = pods.run_many([f"web-{i:03d}" for i in range(PODS)], "scale", [ContainerSpec(cpu_millicpu=1000)])
    print(f"\n[scale] {PODS} pods started on the containerd node in {time.monotonic() - started:.1f}s")
    for i in range(AGENTS):
        fakeapi.add_node(f"scale-node-{i:02d}", cpu="8", memory="32Gi")
    for i, pod in enumerate(real):
        fakeapi.create({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": pod.name, "namespace": "scale", "uid": pod.uid, "labels": {"app": "web"}},
                        "spec": {"nodeName": f"scale-node-{i % AGENTS:02d}", "containers": pod_spec_containers(pod)},
                        "status": {"phase": "Running"}}, keep_uid=True)
    agents = [_ScaleAgent(node, fakeapi, tmp_path / f"agent-{i:02d}", f"scale-node-{i:02d}") for i in range(AGENTS)]
    try:
        for agent in agents:
            agent.start()

        def run(*args: str) -> subprocess.CompletedProcess:
            env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "KUBECONFIG": kubeconfig}
            return subprocess.run([KUBECTL_CHAOS, *args], env=env, capture_output=True, text=True, timeout=180)

        yield fakeapi, real, agents, run
    finally:
        for agent in agents:
            agent.close()


def test_one_selector_over_100_pods_and_20_agents(scale):
    fakeapi, real, agents, run = scale
    rtype = fakeapi.resource_type(crd.GROUP, crd.PLURAL)
    first = len(fakeapi.requests)
    started = time.monotonic()
    out = run("--set-cpu=500m", "-l", "app=web", "--timeout=120s", "-o", "json")
    took_s = time.monotonic() - started
    assert out.returncode == 0, out.stderr[-3000:]
    assert [quota_us(p) for p in real] == [50_000] * PODS

    (obj,) = fakeapi.list(rtype, "scale")[0]
    status = obj["status"]
    assert sorted(t["pod"] for t in status["targets"]) == [p.name for p in real]
    assert {t["phase"] for t in status["targets"]} == {crd.APPLIED}
    assert sorted(n["node"] for n in status["nodes"]) == [f"scale-node-{i:02d}" for i in range(AGENTS)]
    assert all(n["phase"] == crd.APPLIED and n["targets"] == PODS // AGENTS for n in status["nodes"])
    managers = [m for m in obj["metadata"]["managedFields"] if m.get("subresource") == "status"]
    assert sorted(m["manager"] for m in managers) == [f"chaos-agent/scale-node-{i:02d}" for i in range(AGENTS)]

    writes = [r for r in fakeapi.requests[first:] if r.method == "PATCH" and r.path.split("?")[0].endswith("/status")]
    conflicts = [r for r in writes if r.code == 409]
    created = next(r.at_s for r in fakeapi.requests[first:] if r.method == "POST" and crd.PLURAL in r.path)
    last_applied_s = max(r.at_s for r in writes if r.code == 200) - created
    size = len(json.dumps(obj, separators=(",", ":")))
    managed = len(json.dumps(obj["metadata"]["managedFields"], separators=(",", ":")))
    print(f"[scale] {PODS} pods, {AGENTS} agents: all Applied {last_applied_s:.2f}s after the object was created "
          f"(plugin {took_s:.2f}s start to exit); {len(writes)} status writes, {len(conflicts)} conflicts "
          f"(agents counted {sum(a.controller.status_conflicts for a in agents)}); object {size / 1024:.1f} KiB "
          f"of which managedFields {managed / 1024:.1f} KiB ({size // PODS} bytes per pod)")
    assert conflicts == [] and size < 1.5 * 2**20 / 4  # a 500-pod object stays far below the 1.5 MiB limit

    started = time.monotonic()
    out = run("--reset", "-l", "app=web", "--timeout=120s")
    assert out.returncode == 0, out.stderr[-3000:]
    assert [quota_us(p) for p in real] == [100_000] * PODS
    assert fakeapi.list(rtype, "scale")[0] == []
    print(f"[scale] reset: all {PODS} Reverted and the object gone in {time.monotonic() - started:.2f}s")
    assert all(a.engine.list() == [] for a in agents)
