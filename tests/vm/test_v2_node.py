"""The agent on a cgroup v2 worker node: what only this node has (systemd as PID 1 and cgroup driver).

The node is a VM (tests/support/v2node.py), booted once per session; pods are made as a kubelet with
``--cgroup-driver=systemd`` makes them (a transient pod slice over D-Bus with the summed limits).
The real ``chaos-agent`` runs inside and the tests talk to it over a forwarded port, as a user's
``kubectl-chaos --agent-address`` would. Everything is checked by what can be observed in the VM:
every level's cgroup files, systemd's unit properties, CPU use measured over a few seconds.

What both nodes have is written once and run on both (the host's cgroup v1 node and this one, with
runc and crun): the lifecycle (duration, kill -9 of the agent, a container re-created, a pod deleted)
in tests/node/test_both_nodes.py; CPU lowered and raised above the pod slice with measured use,
memory both ways with 300 MiB held, the below-usage refusal on every method and bandwidth both ways
in tests/node/test_limits_both_nodes.py. What stays here is v2's own: a daemon-reload (systemd), a pod
slice set back under a raise (v1's kernel refuses a pod quota below its child's), the agent's
systemd fallbacks, and the node's smoke test.
"""

from __future__ import annotations

import functools
import time

import pytest

from tests.support.nodes import BUSY2, METHODS, MiB, V2NodeFace, changed, cpus_within
from tests.support.wait import wait_until as _wait_until

RUNTIMES = ["runc", "crun"]
# Driver calls under TCG are dear: a look every 0.2 s.
wait_until = functools.partial(_wait_until, step_s=0.2)


@pytest.fixture(params=RUNTIMES)
def v2(request, v2node):
    """The v2 node for one runtime, through the face the both-nodes tests use (tests/support/nodes.py);
    what a test leaves (experiments, pods) goes with it."""
    face = V2NodeFace(v2node, request.param)
    try:
        yield face
    finally:
        face.close()


# ---------------------------------------------------------------- the node itself


def test_node_is_cgroup2_with_systemd_slices_and_both_runtimes(v2node, figures):
    """This node's smoke test (v2 only by what it checks): a pure cgroup2 with systemd as PID 1, and the
    layout each runtime makes under a kubelet's pod slice."""
    assert v2node.sh("stat -f -c %T /sys/fs/cgroup").strip() == "cgroup2fs"
    assert v2node.sh("ps -o comm= -p 1").strip() == "systemd"
    for runtime in RUNTIMES:
        n = V2NodeFace(v2node, runtime)
        try:
            pod = n.run_pod(f"smoke-{runtime}")
            info = n.info(pod)
            figures[f"v2 pod start ({runtime}) s"] = round(info["start_s"], 2)
            lv = n.levels(pod)
            assert lv["slice"].endswith("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
                                        f"{info['uid'].replace('-', '_')}.slice")
            assert lv["scope"].rsplit("/", 1)[-1].startswith("cri-containerd-") and lv["scope"].endswith(".scope")
            assert ("inner" in lv) == (runtime == "crun"), "crun runs the processes in the scope's container/ child"
            f = n.limits(pod)
            assert f["slice/cpu.max"] == f["scope/cpu.max"] == "50000 100000"
            assert f["slice/memory.max"] == f["scope/memory.max"] == str(128 * MiB)
            if runtime == "crun":
                assert f["inner/cpu.max"] == "50000 100000" and f["inner/memory.max"] == str(128 * MiB)
        finally:
            n.close()


# ---------------------------------------------------------------- systemctl daemon-reload


@pytest.mark.parametrize("method", ["cri", "cgroup"])
def test_daemon_reload_keeps_every_level_of_a_raise_that_needed_the_pod_slice(v2, method, figures):
    """v2 only: systemd is the cgroup driver here (the host node's kubelet-made pod cgroups have no
    manager that writes them back), and a daemon-reload rewrites every unit's CPUQuota and MemoryMax
    into its cgroup files: a raise that went around systemd would be undone."""
    pod = v2.run_pod("reload", argv=BUSY2)
    before, props_before = v2.limits(pod), v2.manager_view(pod)
    v2.apply(pod, cpu_millicpu=1500, memory_bytes=256 * MiB, method=METHODS[method])
    raised = v2.limits(pod)
    v2.node.sh("systemctl daemon-reload")
    time.sleep(1.0)
    # Unchanged by the reload itself: systemd was told (SetUnitProperties, runtime), not bypassed.
    assert v2.limits(pod) == raised, changed(raised, v2.limits(pod))
    props = v2.manager_view(pod)
    assert props["slice/CPUQuotaPerSecUSec"] == props["scope/CPUQuotaPerSecUSec"] == "1.500000s"
    assert props["slice/MemoryMax"] == props["scope/MemoryMax"] == str(256 * MiB)
    used = cpus_within(lambda: v2.cpu_used(pod), 1.5, f"{v2.name}, 1500m after a daemon-reload")
    figures[f"v2 {v2.runtime}/{method} 1500m after daemon-reload: cpus"] = round(used, 3)
    [exp] = v2.experiments()
    assert exp.drift_corrections == 0, "nothing for drift correction to do"

    v2.revert(pod)
    assert v2.limits(pod) == before, changed(before, v2.limits(pod))
    assert v2.manager_view(pod) == props_before, changed(props_before, v2.manager_view(pod))
    v2.node.sh("systemctl daemon-reload")
    time.sleep(1.0)
    assert v2.limits(pod) == before, "a reload after the reset finds the originals in systemd too"


# The pod slice is the runtime's parent either way: runc only.
@pytest.mark.parametrize("v2", ["runc"], indirect=True)
def test_pod_slice_put_back_by_someone_else_is_raised_again(v2):
    """Drift correction compares every level the experiment changed: a pod slice set back under the
    raised container (here by hand, as a reload did before the fix) is raised again. v2 only: on v1
    the kernel refuses a pod quota below its child's (EINVAL), so the pod cgroup cannot be set back
    under a raised container there (tests/node/test_limits_both_nodes.py sets the container's levels
    back, on both nodes)."""
    pod = v2.run_pod("slicedrift", argv=BUSY2)
    v2.apply(pod, cpu_millicpu=1500, method=METHODS["cgroup"])
    v2.set_cpu_level_m(pod, "slice", 500)
    assert wait_until(lambda: v2.cpu_levels_m(pod)["slice"] == 1500, 10), v2.cpu_levels_m(pod)
    assert wait_until(lambda: v2.experiments()[0].drift_corrections >= 1, 5)
    cpus_within(lambda: v2.cpu_used(pod), 1.5, f"{v2.name}, after the pod slice was raised again")


# ---------------------------------------------------------------- the agent's log


def test_agent_log_has_no_systemd_fallbacks(v2node):
    """Every write to a unit went through systemd: the agent never fell back to the file alone (v2 only:
    the host node has no systemd driver). In a full run it is the node's last test, so it covers every
    one before it, the both-nodes ones included."""
    log = v2node.call("agent_log", lines=5000)["tail"]
    bad = [line for line in log.splitlines() if "written to the file only" in line or "cannot be reached" in line]
    assert bad == []
