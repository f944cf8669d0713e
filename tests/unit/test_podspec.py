"""tests/support/podspec.py: the DaemonSet's pod spec turned into the kubelet's CRI requests."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from cri_api.v1 import api_pb2
from tests.support import podspec

POD_DIR = "/tmp/kcx-node-x/agentpod-1"
SOCKET = "/tmp/kcx-node-x/containerd.sock"


@pytest.fixture(scope="module")
def template() -> podspec.PodTemplate:
    return podspec.read_daemonset(podspec.DAEMONSET_MANIFEST.read_text())


def identity() -> podspec.PodIdentity:
    return podspec.PodIdentity(name="chaos-agent-abcde", namespace="kubectl-chaos", uid="u-1", node_name="test-node",
                               cgroup_parent="/me/kubepods/burstable/podu-1", log_directory=f"{POD_DIR}/logs")


def plan(template: podspec.PodTemplate) -> podspec.PodPlan:
    return podspec.plan_pod(template, identity(), image="localhost/kubectl-chaos/agent:h", volume_dir=f"{POD_DIR}/volumes",
                            host_paths=podspec.host_paths_on_test_node(SOCKET, POD_DIR))


def test_the_manifest_reads_as_the_daemonset_describes_it(template):
    assert (template.host_pid, template.host_network) == (True, True)
    (agent,) = template.containers
    assert agent.command == ("chaos-agent",)
    sc = agent.security
    assert (sc.capabilities_add, sc.capabilities_drop) == (("NET_ADMIN",), ("ALL",))
    assert (sc.privileged, sc.allow_privilege_escalation, sc.read_only_root_fs, sc.run_as_user) == (False, False, True, 0)
    assert sc.seccomp_type == "RuntimeDefault"
    assert agent.memory_limit_bytes == 256 * 2**20 and agent.cpu_request_millicpu == 20
    assert agent.cpu_limit_millicpu is None
    assert {p.kind for p in agent.probes} == {"startup", "liveness", "readiness"}


def test_the_sandbox_and_container_requests(template):
    p = plan(template)
    ns = p.sandbox.linux.security_context.namespace_options
    assert (ns.network, ns.pid) == (api_pb2.NODE, api_pb2.NODE)
    assert p.sandbox.hostname == ""  # hostNetwork: the node's own
    assert p.sandbox.labels["io.kubernetes.pod.namespace"] == "kubectl-chaos"
    config = p.container_config("agent", attempt=2)
    assert config.metadata.attempt == 2 and config.log_path == "agent/2.log"
    assert config.image.image == "localhost/kubectl-chaos/agent:h"  # only the image is replaced
    assert list(config.command) == ["chaos-agent"]
    assert "--node-local-api=on" in config.args and "--node-local-api=off" not in config.args
    assert {e.key: e.value for e in config.envs} == {"NODE_NAME": "test-node", "POD_NAMESPACE": "kubectl-chaos"}
    sc = config.linux.security_context
    assert (list(sc.capabilities.add_capabilities), list(sc.capabilities.drop_capabilities)) == (["NET_ADMIN"], ["ALL"])
    assert (sc.privileged, sc.readonly_rootfs, sc.no_new_privs, sc.run_as_user.value) == (False, True, True, 0)
    assert sc.seccomp.profile_type == api_pb2.SecurityProfile.RuntimeDefault
    assert "/proc/kcore" in sc.masked_paths and "/proc/sys" in sc.readonly_paths
    assert (sc.namespace_options.network, sc.namespace_options.pid) == (api_pb2.NODE, api_pb2.NODE)
    mounts = {m.container_path: (m.host_path, m.readonly) for m in config.mounts}
    assert mounts == {
        "/host/sys/fs/cgroup": ("/sys/fs/cgroup", False),
        "/run/containerd/containerd.sock": (SOCKET, False),
        "/var/lib/kubectl-chaos": (f"{POD_DIR}/state", False),
        "/run/kubectl-chaos": (f"{POD_DIR}/run", False),
        "/tmp": (f"{POD_DIR}/volumes/tmp", False),
        "/run/dbus": (f"{POD_DIR}/dbus", True),
    }
    res = config.linux.resources
    assert (res.memory_limit_in_bytes, res.cpu_shares, res.cpu_quota, res.cpu_period) == (256 * 2**20, 20, 0, 100_000)
    assert p.pod_cgroup_limits == {"memory.limit_in_bytes": 256 * 2**20, "memory.memsw.limit_in_bytes": 256 * 2**20}


def test_host_preparations_follow_the_hostpath_types(template):
    steps = plan(template).host_steps
    assert podspec.CheckHostPath(SOCKET, "Socket") in steps
    assert podspec.CheckHostPath("/sys/fs/cgroup", "Directory") in steps
    made = {s.path for s in steps if isinstance(s, podspec.MakeDirectory)}
    assert made == {f"{POD_DIR}/state", f"{POD_DIR}/run", f"{POD_DIR}/dbus"}
    assert podspec.MountTmpfs(f"{POD_DIR}/volumes/tmp", 16 * 2**20) in steps


def test_an_unmapped_host_path_is_refused(template):
    host_paths = podspec.host_paths_on_test_node(SOCKET, POD_DIR)
    del host_paths["/var/lib/kubectl-chaos"]
    with pytest.raises(podspec.PodSpecError, match=r"hostPath \['/var/lib/kubectl-chaos'\] not in the host path mapping"):
        podspec.plan_pod(template, identity(), image="i", volume_dir="/v", host_paths=host_paths)


def _manifest_with(change) -> str:
    docs = list(yaml.safe_load_all(podspec.DAEMONSET_MANIFEST.read_text()))
    (ds,) = [d for d in docs if d and d.get("kind") == "DaemonSet"]
    change(ds["spec"]["template"]["spec"])
    return yaml.safe_dump(ds)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.setdefault("initContainers", []), r"pod spec: \['initContainers'\] not translated"),
    (lambda s: s["volumes"].append({"name": "cfg", "configMap": {"name": "x"}}), "only hostPath and emptyDir"),
    (lambda s: s["containers"][0]["securityContext"].update(procMount="Unmasked"), r"\['procMount'\] not translated"),
    (lambda s: s["containers"][0]["securityContext"]["seccompProfile"].update(type="Localhost"), None),
    (lambda s: s["containers"][0].update(livenessProbe={"httpGet": {"port": 80}}), "livenessProbe is not exec"),
    (lambda s: s["containers"][0]["env"].append({"name": "X", "valueFrom": {"secretKeyRef": {"name": "s"}}}),
     "env X valueFrom"),
])  # fmt: skip
def test_what_cannot_be_honoured_is_refused_not_ignored(change, message):
    text = _manifest_with(change)
    if message is None:  # refused when the requests are made
        template = podspec.read_daemonset(text)
        with pytest.raises(podspec.PodSpecError, match="seccompProfile type 'Localhost' not translated"):
            plan(template).container_config("agent", 0)
    else:
        with pytest.raises(podspec.PodSpecError, match=message):
            podspec.read_daemonset(text)


def test_override_args():
    assert podspec.override_args(["--a=1", "--node-local-api=off", "--b"], {"--node-local-api": "on"}) == (
        "--a=1", "--node-local-api=on", "--b")
    assert podspec.override_args(["--node-local-api", "off", "--b=2"], {"--node-local-api": "on"}) == (
        "--node-local-api=on", "--b=2")
    with pytest.raises(podspec.PodSpecError, match="not among the manifest's args"):
        podspec.override_args(["--a=1"], {"--node-local-api": "on"})


def test_a_cpu_limit_gives_a_quota_and_the_pod_cgroup_the_sum(template):
    (agent,) = template.containers
    limited = dataclasses.replace(agent, cpu_limit_millicpu=250, cpu_request_millicpu=100)
    res = podspec.container_resources(limited)
    assert (res.cpu_quota, res.cpu_shares) == (25_000, 102)
    assert podspec.pod_cgroup_limits([limited, limited])["cpu.cfs_quota_us"] == 50_000
    assert "cpu.cfs_quota_us" not in podspec.pod_cgroup_limits([limited, agent])  # one unlimited: the pod is too
