"""Fixtures for the cluster tests: the fake API server with the project's CRD installed, and the
agent (engine and controller) on the real test node with kubectl-chaos run as a user (``cluster``)."""

from __future__ import annotations

import os
import pathlib
import subprocess

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
    """(fakeapi, agent, run): ``run(*args)`` runs kubectl-chaos as user alice (the user role, in "shop")."""
    from tests.cluster.helpers import KUBECTL_CHAOS, Agent, role

    fakeapi.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    token = fakeapi.add_user("alice")
    fakeapi.bind("alice", role("user-role.yaml", "kubectl-chaos-user"), namespace="shop")
    kubeconfig = fakeapi.write_kubeconfig(tmp_path / "alice-kubeconfig", [("alice", token)], namespace="shop")
    agent = Agent(node, fakeapi, tmp_path).start()

    def run(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "KUBECONFIG": kubeconfig}
        return subprocess.run([KUBECTL_CHAOS, *args], env=env, capture_output=True, text=True, timeout=timeout_s)

    try:
        yield fakeapi, agent, run
    finally:
        agent.stop()
