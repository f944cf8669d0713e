"""examples/pytest-kind without a cluster: its manifests are valid Kubernetes objects, its suite is
collected with the chaos fixture and its pytest.ini options, and its files pass ruff (``make test``
runs ruff on the whole tree). It runs against the fake API server in tests/cluster/test_api_cluster.py."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import kubernetes_validate
import yaml

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "pytest-kind"


def test_the_demo_service_manifests_are_valid():
    docs = [d for d in yaml.safe_load_all((EXAMPLE / "app.yaml").read_text()) if d]
    assert [d["kind"] for d in docs] == ["Namespace", "ConfigMap", "Deployment", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    deployment = docs[2]
    assert deployment["spec"]["template"]["metadata"]["labels"] == {"app": "slow"}
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["cpu"] == "1"  # what the test lowers to 200m


def test_the_example_suite_is_collected_with_its_settings():
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 tests collected" in res.stdout
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--fixtures"],
                         cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=60)
    assert "kubectl-chaos: context kind-chaos, namespace demo" in res.stdout  # its pytest.ini
    assert "\nchaos -- " in res.stdout and "\nslow_url [session scope] -- conftest.py" in res.stdout
