"""Helpers of the cluster tests: the agent (engine + controller) on the test node, pods mirrored into
the fake API server, and what to read back."""

from __future__ import annotations

import os
import pathlib
import sys
import time

import yaml

from daemonset import crd
from tests.cluster.conftest import MANIFESTS

NODE = "test-node"
KUBECTL_CHAOS = os.path.join(os.path.dirname(sys.executable), "kubectl-chaos")


def role(file: str, name: str) -> dict:
    return next(d for d in yaml.safe_load_all((MANIFESTS / file).read_text())
                if d and d["kind"] == "ClusterRole" and d["metadata"]["name"] == name)


class Agent:
    """The agent's two halves in this process: the engine on the real node and the controller."""

    def __init__(self, node, fakeapi, workdir: pathlib.Path):
        from kubernetes import config

        self.node = node
        self.state_dir = workdir / "state"
        token = fakeapi.add_user("system:serviceaccount:kubectl-chaos:chaos-agent")
        fakeapi.bind("system:serviceaccount:kubectl-chaos:chaos-agent", role("rbac.yaml", "kubectl-chaos-agent"))
        path = fakeapi.write_kubeconfig(workdir / "agent-kubeconfig",
                                        [("system:serviceaccount:kubectl-chaos:chaos-agent", token)])
        self.client = config.new_client_from_config(config_file=path)
        self.engine = None
        self.controller = None
        self.watch_timeout_s = 30

    def start(self) -> Agent:
        from cri_api import RuntimeClient
        from daemonset.controller import Controller
        from daemonset.engine import Engine

        self.engine = Engine(RuntimeClient(str(self.node.socket)), state_dir=str(self.state_dir), node_name=NODE,
                             drift_interval_s=1.0)
        self.engine.start()
        self.controller = Controller(self.engine, self.client, NODE, state_dir=str(self.state_dir), resync_s=5.0,
                                     watch_timeout_s=self.watch_timeout_s)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def mirror(fakeapi, pod, *, node: str = NODE, labels: dict | None = None, annotations: dict | None = None) -> dict:
    """Put a real test-node pod into the fake API, as a kubelet-registered pod would be."""
    return fakeapi.create({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid, "labels": labels or {},
                     "annotations": annotations or {}},
        "spec": {"nodeName": node, "containers": [{"name": n, "image": "busybox"} for n in pod.specs]},
        "status": {"phase": "Running"},
    }, keep_uid=True)


def quota_us(pod, container: str = "app") -> int:
    return int((pod.container_cgroup_dir("cpu", container) / "cpu.cfs_quota_us").read_text())


def memory_limit(pod, container: str = "app") -> int:
    return int((pod.container_cgroup_dir("memory", container) / "memory.limit_in_bytes").read_text())


def chaos_objects(fakeapi, namespace: str = "shop") -> list[dict]:
    return fakeapi.list(fakeapi.resource_type(crd.GROUP, crd.PLURAL), namespace)[0]


def events(fakeapi, pod_name: str, namespace: str = "shop") -> list[tuple[str, str]]:
    items = fakeapi.list(fakeapi.resource_type("", "events"), namespace)[0]
    items.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
    return [(e["reason"], e["message"]) for e in items if e["involvedObject"]["name"] == pod_name]


def wait_for(condition, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
