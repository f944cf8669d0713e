"""The test node itself: a pod runs, has an IP the host reaches, and its cgroup has pod limits."""

from __future__ import annotations

from tests.support.node import ContainerSpec


def test_pod_runs_with_kubelet_style_cgroups(node, pods):
    pod = pods.run("smoke", containers=[ContainerSpec("app", cpu_millicpu=300, memory_bytes=32 << 20)])
    assert pod.ip and pod.ip.startswith("10.88.")
    assert (pod.cgroup_dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "30000"
    assert (pod.cgroup_dirs["memory"] / "memory.limit_in_bytes").read_text().strip() == str(32 << 20)
    container_cpu = pod.container_cgroup_dir("cpu")
    assert (container_cpu / "cpu.cfs_quota_us").read_text().strip() == "30000"
