"""Fixtures for the cluster tests: the fake API server with the project's CRD installed."""

from __future__ import annotations

import pathlib

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
