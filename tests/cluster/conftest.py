"""Fixtures for the cluster tests: the fake API server with the project's CRD installed, and the
agent on the real test node with kubectl-chaos run as a user: ``cluster`` runs the real
``chaos-agent`` program as a child process, ``controller_cluster`` its engine and controller inside
the test process (for the controller's own tests)."""

from __future__ import annotations

import os
import pathlib
import subprocess

# The in-process engine forks helpers (pyroute2 enters pod network namespaces that way); gRPC's
# fork handlers make those children crash now and then. chaos-agent sets the same before gRPC starts.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import pytest
import yaml

from tests.support.fakeapi import FakeKubeAPI

MANIFESTS = pathlib.Path(__file__).resolve().parents[2] / "daemonset" / "manifests"


def load_crd() -> dict:
    return yaml.safe_load((MANIFESTS / "crd.yaml").read_text())


@pytest.fixture
def fakeapi():
    with FakeKubeAPI() as api:
        api.install_crd(load_crd())
        yield api


@pytest.fixture
def kubeconfig(fakeapi, tmp_path) -> str:
    """An admin kubeconfig for the fake API server."""
    return fakeapi.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def kube(kubeconfig):
    """A real ``kubernetes`` ApiClient talking to the fake API server as admin."""
    from kubernetes import config

    client = config.new_client_from_config(config_file=kubeconfig)
    yield client
    client.close()


@pytest.fixture
def cluster(node, fakeapi, tmp_path):
    """(fakeapi, agent, run) with a real chaos-agent process: ``run(*args)`` runs kubectl-chaos as user
    alice (the user role, in "shop")."""
    from tests.cluster.helpers import AgentProcess

    yield from _cluster(AgentProcess(node, fakeapi, tmp_path), fakeapi, tmp_path)


@pytest.fixture
def in_cluster(node, fakeapi, tmp_path):
    """As ``cluster``, the agent authenticating as in a pod: in-cluster environment variables and
    the service account's token and CA files, no kubeconfig."""
    from tests.cluster.helpers import AgentProcess

    yield from _cluster(AgentProcess(node, fakeapi, tmp_path, in_cluster=True), fakeapi, tmp_path)


@pytest.fixture
def controller_cluster(node, fakeapi, tmp_path):
    """As ``cluster``, with the agent's engine and controller running inside the test process."""
    from tests.cluster.helpers import Agent

    yield from _cluster(Agent(node, fakeapi, tmp_path), fakeapi, tmp_path)


def _cluster(agent, fakeapi, tmp_path):
    from tests.cluster.helpers import KUBECTL_CHAOS, NODE, role

    fakeapi.add_namespace("shop", labels={"kubectl-chaos.io/enabled": "true"})
    fakeapi.add_node(NODE, cpu="2", memory="8Gi")
    token = fakeapi.add_user("alice")
    fakeapi.bind("alice", role("user-role.yaml", "kubectl-chaos-user"), namespace="shop")
    kubeconfig = fakeapi.write_kubeconfig(tmp_path / "alice-kubeconfig", [("alice", token)], namespace="shop")
    agent.start()

    def run(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "KUBECONFIG": kubeconfig}
        return subprocess.run([KUBECTL_CHAOS, *args], env=env, capture_output=True, text=True, timeout=timeout_s)

    run.kubeconfig = kubeconfig
    try:
        yield fakeapi, agent, run
    finally:
        agent.close()
