"""cgroupctl on real pods of the test node (containerd + runc, cgroupfs driver, cgroup v1 here):
limits written straight into the container's cgroup take effect on a CPU-burning container."""

from __future__ import annotations

import os

import pytest

from cgroupctl import Limits, Snapshot, locate, read_limits, read_usage, restore, set_limits, snapshot
from tests.support.cpumeter import measure_cpus, wait_burning
from tests.support.node import ContainerSpec
from tests.support.require import in_ci

MiB = 1 << 20
BURN = ("sh", "-c", "while :; do :; done")


def _counter(cg):
    """The container's cumulative CPU time in ns, straight from its cgroup's accounting (one file
    read, so the timestamp taken beside it belongs to it)."""
    path = os.path.join(cg.container.cpuacct, "cpuacct.usage") if not cg.uses_v2("cpuacct") else None

    def read_ns() -> int:
        if path is None:
            return read_usage(cg).cpu_usage_ns
        with open(path) as f:
            return int(f.read())

    return read_ns


def _measure_cpus(cg) -> float:
    # Whole periods (the burner's bursts), the container's own period, after the change settled.
    return measure_cpus(_counter(cg), read_limits(cg).cpu_period_us, window_s=2.5)


def _assert_tracks(used: float, quota_cpus: float) -> None:
    # The quota caps use; a loaded machine (locally) may give less. CI runs alone: 5% of the quota.
    low = 0.05 if in_ci() else 0.5
    assert quota_cpus * (1 - low) <= used <= quota_cpus * 1.05, f"used {used:.3f} CPU under a {quota_cpus} CPU quota"


@pytest.fixture
def burner(node, pods):
    pod = pods.run("burner", "t-cgroupctl", [ContainerSpec("burn", argv=BURN, cpu_millicpu=200, memory_bytes=64 * MiB)])
    info = node.client.container_info(pod.container_id())
    return pod, info


def test_locate_by_pid_and_by_cgroups_path_agree_on_a_real_container(burner):
    pod, info = burner
    by_pid = locate(pid=info.pid)
    by_path = locate(cgroups_path=info.cgroups_path)
    assert by_pid.container == by_path.container and by_pid.pod == by_path.pod
    assert by_pid.container_id == info.id
    for controller in ("cpu", "memory"):
        assert os.path.samefile(getattr(by_pid.pod, controller), pod.cgroup_dirs[controller])
    limits = read_limits(by_pid)
    assert (limits.cpu_quota_us, limits.cpu_period_us, limits.memory_limit_bytes) == (20000, 100000, 64 * MiB)


def test_direct_limits_take_effect_on_a_cpu_burning_container_and_restore_exactly(burner):
    _, info = burner
    cg = locate(pid=info.pid)
    original = snapshot(cg)
    wait_burning(_counter(cg))
    _assert_tracks(_measure_cpus(cg), 0.2)

    # Above the pod's 200m: the pod cgroup is raised first, then the container.
    applied = set_limits(cg, Limits(cpu_quota_us=60000, memory_limit_bytes=128 * MiB))
    assert applied.limits.cpu_quota_us == 60000 and read_limits(cg, pod=True).cpu_quota_us == 60000
    _assert_tracks(_measure_cpus(cg), 0.6)

    set_limits(cg, Limits(cpu_quota_us=30000))
    _assert_tracks(_measure_cpus(cg), 0.3)

    restore(Snapshot.from_dict(applied.snapshot.to_dict()))
    assert dict(snapshot(cg).files) == dict(original.files)
    _assert_tracks(_measure_cpus(cg), 0.2)
