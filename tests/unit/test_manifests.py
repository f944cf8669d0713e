"""The deployment manifests: rendered with kubectl's kustomize, valid for Kubernetes, least privilege.

The CRD's schema is checked against the objects the plugin creates in tests/cluster (through
the fake API server, which validates with the same schema).
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "daemonset" / "manifests"
KUBECTL = os.path.join(os.path.dirname(sys.executable), "kubectl")
# The oldest Kubernetes the manifests support (CRD v1 with CEL rules, DaemonSet probes) and the newest.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> list[dict]:
    home = tmp_path_factory.mktemp("home")
    out = subprocess.run([KUBECTL, "kustomize", str(MANIFESTS)], capture_output=True, text=True, timeout=60,
                         env={"PATH": os.environ.get("PATH", ""), "HOME": str(home)})
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def test_renders_every_object(rendered):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in rendered)
    assert kinds == [
        ("ClusterRole", "kubectl-chaos-agent"),
        ("ClusterRole", "kubectl-chaos-user"),
        ("ClusterRoleBinding", "kubectl-chaos-agent"),
        ("CustomResourceDefinition", "resourcechaos.kubectl-chaos.io"),
        ("DaemonSet", "chaos-agent"),
        ("Namespace", "kubectl-chaos"),
        ("ServiceAccount", "chaos-agent"),
        ("ValidatingAdmissionPolicy", "kubectl-chaos-agent-own-finalizer-only"),
        ("ValidatingAdmissionPolicyBinding", "kubectl-chaos-agent-own-finalizer-only"),
    ]
    for doc in rendered:
        if doc["kind"] in ("DaemonSet", "ServiceAccount"):
            assert doc["metadata"]["namespace"] == "kubectl-chaos"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_valid_against_kubernetes_schemas(rendered, version):
    for doc in rendered:
        # strict: unknown fields (typos) fail too.
        kubernetes_validate.validate(doc, version, strict=True)


def test_namespace_is_privileged_and_only_it(rendered):
    (ns,) = by_kind(rendered, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    others = [d for d in rendered if d is not ns and "pod-security" in yaml.safe_dump(d.get("metadata", {}))]
    assert others == []


def test_daemonset_host_access_without_privileged(rendered):
    (ds,) = by_kind(rendered, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True and pod["hostNetwork"] is True
    assert pod["serviceAccountName"] == "chaos-agent"
    assert {"operator": "Exists"} in pod["tolerations"]
    (agent,) = pod["containers"]
    sc = agent["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}  # tests/node/test_capabilities.py
    assert sc["readOnlyRootFilesystem"] is True
    assert agent["image"].startswith("ghcr.io/kubectl-chaos/agent:")
    assert agent["resources"]["requests"]["cpu"] and agent["resources"]["requests"]["memory"]
    host_paths = {v["hostPath"]["path"]: v["hostPath"]["type"] for v in pod["volumes"] if "hostPath" in v}
    # The CRI socket file only (not /run/containerd, no /var/run/crio made on containerd nodes).
    assert host_paths == {"/sys/fs/cgroup": "Directory", "/run/containerd/containerd.sock": "Socket",
                          "/var/lib/kubectl-chaos": "DirectoryOrCreate", "/run/kubectl-chaos": "DirectoryOrCreate",
                          "/run/dbus": "DirectoryOrCreate"}
    assert "--node-local-api=off" in agent["args"]  # health only on the node-local socket
    assert "--cri-endpoint=unix:///run/containerd/containerd.sock" in agent["args"]
    assert 'connect("/run/containerd/containerd.sock")' in " ".join(agent["livenessProbe"]["exec"]["command"])
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in agent["env"]}
    assert env["NODE_NAME"] == "spec.nodeName"
    assert "ports" not in agent  # no open port: cluster mode goes through the API server
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = " ".join(agent[probe]["exec"]["command"])
        assert "HealthStub" in command and "unix:///run/kubectl-chaos/agent.sock" in command
    assert "--listen=unix:///run/kubectl-chaos/agent.sock" in agent["args"]


def test_daemonset_mounts_the_system_bus_where_the_agent_looks_for_it(rendered, monkeypatch):
    """systemd's D-Bus API (daemonset/systemd.py, bus "SYSTEM") needs the host's system bus socket:
    the directory is mounted read-only, at the path jeepney connects to without DBUS_SYSTEM_BUS_ADDRESS
    (/var/run/dbus/..., and /var/run is /run in the Debian-based image)."""
    from jeepney.bus import find_system_bus

    from daemonset.systemd import Systemd

    (ds,) = by_kind(rendered, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    (volume,) = [v for v in pod["volumes"] if v.get("hostPath", {}).get("path") == "/run/dbus"]
    # A node without a system bus still runs the agent (it writes the cgroup files alone there).
    assert volume["hostPath"]["type"] == "DirectoryOrCreate"
    (mount,) = [m for m in agent["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == "/run/dbus" and mount["readOnly"] is True
    assert "DBUS_SYSTEM_BUS_ADDRESS" not in {e["name"] for e in agent["env"]}
    assert Systemd().bus == "SYSTEM"
    monkeypatch.delenv("DBUS_SYSTEM_BUS_ADDRESS", raising=False)
    socket_path = find_system_bus().removeprefix("unix:path=")
    in_image = os.path.normpath("/run/" + socket_path.removeprefix("/var/run/")) if socket_path.startswith("/var/run/") \
        else socket_path
    assert os.path.dirname(in_image) == mount["mountPath"], socket_path
    # The agent's own paths are not shadowed by it (its socket directory is /run/kubectl-chaos).
    assert not any(m["mountPath"].startswith("/run/dbus/") for m in agent["volumeMounts"])


def test_crio_component_mounts_crio_socket_alone(tmp_path):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(MANIFESTS, overlay)], "components": [os.path.relpath(MANIFESTS / "crio", overlay)]}))
    out = subprocess.run([KUBECTL, "kustomize", "--load-restrictor=LoadRestrictionsNone", str(overlay)],
                         capture_output=True, text=True, timeout=60,
                         env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    (ds,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert "/var/run/crio/crio.sock" in paths and not any("containerd" in p for p in paths)
    assert "--cri-endpoint=unix:///var/run/crio/crio.sock" in agent["args"]
    assert {"name": "cri-socket", "mountPath": "/var/run/crio/crio.sock"} in agent["volumeMounts"]
    assert "crio.sock" in " ".join(agent["livenessProbe"]["exec"]["command"])
    kubernetes_validate.validate(ds, KUBERNETES_VERSIONS[0], strict=True)


def test_admission_policy_holds_the_agent_to_its_own_finalizer(rendered):
    """The policy's shape (its CEL is evaluated by a real API server only; none runs here)."""
    (policy,) = by_kind(rendered, "ValidatingAdmissionPolicy")
    (binding,) = by_kind(rendered, "ValidatingAdmissionPolicyBinding")
    assert "namespace" not in policy["metadata"] and "namespace" not in binding["metadata"]
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert rule["apiGroups"] == ["kubectl-chaos.io"] and rule["resources"] == ["resourcechaos"]
    assert rule["operations"] == ["UPDATE"]
    (condition,) = spec["matchConditions"]
    assert condition["expression"].endswith('"system:serviceaccount:kubectl-chaos:chaos-agent"')
    variables = {v["name"]: v["expression"] for v in spec["variables"]}
    assert "request.userInfo.extra['authentication.kubernetes.io/node-name'][0]" in variables["node"]
    assert "'kubectl-chaos.io/node-' + variables.node" in variables["own"]
    checks = " ".join(v["expression"] for v in spec["validations"])
    assert "object.spec == oldObject.spec" in checks and "variables.after == variables.before" in checks
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    # The finalizer the policy allows is the one the controller writes (for names up to 58 characters).
    from daemonset import crd

    assert crd.finalizer_for("n" * 58) == "kubectl-chaos.io/node-" + "n" * 58
    assert crd.finalizer_for("n" * 59).startswith("kubectl-chaos.io/node-" + "n" * 30)


def test_agent_role_is_least_privilege(rendered):
    roles = {r["metadata"]["name"]: r for r in by_kind(rendered, "ClusterRole")}
    granted = {(g, res, verb) for rule in roles["kubectl-chaos-agent"]["rules"]
               for g in rule["apiGroups"] for res in rule["resources"] for verb in rule["verbs"]}
    assert granted == {
        ("kubectl-chaos.io", "resourcechaos", "get"), ("kubectl-chaos.io", "resourcechaos", "list"),
        ("kubectl-chaos.io", "resourcechaos", "watch"), ("kubectl-chaos.io", "resourcechaos", "patch"),
        ("kubectl-chaos.io", "resourcechaos/status", "patch"),
        ("", "pods", "list"), ("", "pods", "watch"),
        ("", "namespaces", "list"), ("", "namespaces", "watch"),
        ("", "nodes", "list"), ("", "nodes", "watch"),
        ("", "events", "create"),
    }
    (binding,) = by_kind(rendered, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == "kubectl-chaos-agent"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "chaos-agent", "namespace": "kubectl-chaos"}]
    user = roles["kubectl-chaos-user"]["rules"]
    assert all("*" not in rule["verbs"] and "*" not in rule["resources"] for rule in user)


# Each Kubernetes client call in the controller -> the (group, resource, verbs) it needs.
_CALL_GRANTS = {
    "list_pod_for_all_namespaces": ("", "pods", ("list", "watch")),  # listed, then watched
    "list_namespace": ("", "namespaces", ("list", "watch")),
    "list_node": ("", "nodes", ("list", "watch")),  # its own node, by field selector
    "create_namespaced_event": ("", "events", ("create",)),
    "get_namespaced_custom_object": ("kubectl-chaos.io", "resourcechaos", ("get",)),
    "list_cluster_custom_object": ("kubectl-chaos.io", "resourcechaos", ("list", "watch")),
    "patch_namespaced_custom_object": ("kubectl-chaos.io", "resourcechaos", ("patch",)),
    "replace_namespaced_custom_object_status": ("kubectl-chaos.io", "resourcechaos/status", ("update",)),
    "patch_namespaced_custom_object_status": ("kubectl-chaos.io", "resourcechaos/status", ("patch",)),
}


def test_agent_role_grants_exactly_what_the_controller_calls(rendered):
    """Every API call in daemonset/controller.py is granted, and nothing else is."""
    import re

    source = (ROOT / "daemonset" / "controller.py").read_text()
    calls = set(re.findall(r"self\.(?:core|custom)\.(\w+)", source))
    unknown = calls - set(_CALL_GRANTS)
    assert not unknown, f"controller calls {sorted(unknown)}: add them to _CALL_GRANTS and to rbac.yaml"
    needed = {(g, res, verb) for call in calls for g, res, verbs in [_CALL_GRANTS[call]] for verb in verbs}
    roles = {r["metadata"]["name"]: r for r in by_kind(rendered, "ClusterRole")}
    granted = {(g, res, verb) for rule in roles["kubectl-chaos-agent"]["rules"]
               for g in rule["apiGroups"] for res in rule["resources"] for verb in rule["verbs"]}
    assert granted == needed


def test_crd_shape(rendered):
    (crd,) = by_kind(rendered, "CustomResourceDefinition")
    assert crd["spec"]["group"] == "kubectl-chaos.io" and crd["spec"]["scope"] == "Namespaced"
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:5] == ["Target", "CPU", "Memory", "Bandwidth", "Phase"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["targets"]["items"]
    assert {"pod", "node", "phase", "changes", "expiresAt", "message"} <= set(status["properties"])


def test_the_image_recipe_provides_the_manifests_command(rendered):
    """CI builds the image with scripts/build-agent-image.sh alone (no Dockerfile to drift from it)."""
    import tomllib

    assert not (ROOT / "daemonset" / "Dockerfile").exists()
    (ds,) = by_kind(rendered, "DaemonSet")
    (agent,) = ds["spec"]["template"]["spec"]["containers"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[agent["command"][0]] == "daemonset.agent:main"
    recipe = (ROOT / "scripts" / "build-agent-image.sh").read_text()
    # The wheel's console scripts go to /usr/local/bin, which is on the image's PATH.
    assert 'script = root / "usr/local/bin" / name' in recipe
    assert "--entrypoint /usr/local/bin/chaos-agent" in recipe
    assert "--env PATH=/usr/local/sbin:/usr/local/bin:" in recipe


def test_health_probe_command_reads_the_grpc_health_service(rendered, tmp_path):
    """The probe's command, run as the kubelet would, against a gRPC health service on a unix socket."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    (ds,) = by_kind(rendered, "DaemonSet")
    (agent,) = ds["spec"]["template"]["spec"]["containers"]
    command = list(agent["livenessProbe"]["exec"]["command"])
    assert command[0] == "python3"
    socket_path = tmp_path / "agent.sock"
    cri = socket.socket(socket.AF_UNIX)  # the runtime's socket as mounted (a live one)
    cri.bind(str(tmp_path / "cri.sock"))
    cri.listen(8)
    command = [sys.executable, *command[1:-1],
               command[-1].replace("unix:///run/kubectl-chaos/agent.sock", f"unix://{socket_path}")
               .replace("/run/containerd/containerd.sock", str(tmp_path / "cri.sock"))]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert subprocess.run(command, capture_output=True, timeout=30).returncode == 0
        cri.close()  # a stale mount after the runtime re-created its socket: refused
        assert subprocess.run(command, capture_output=True, timeout=30).returncode != 0
        cri = socket.socket(socket.AF_UNIX)
        (tmp_path / "cri.sock").unlink()
        cri.bind(str(tmp_path / "cri.sock"))
        cri.listen(8)
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert subprocess.run(command, capture_output=True, timeout=30).returncode == 1
    finally:
        server.stop(0)
    socket_path.unlink(missing_ok=True)
    assert subprocess.run(command, capture_output=True, timeout=30).returncode != 0  # no agent: unhealthy
