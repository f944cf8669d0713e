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

from daemonset.api.gen import agent_pb2
from tests.support.nodes import (
    BUSY2,
    METHODS,
    MiB,
    V2Agent,
    changed,
    cpus_within,
    v2_cpus,
    v2_files,
    v2_levels,
    v2_unit_props,
)
from tests.support.wait import wait_until as _wait_until

RUNTIMES = ["runc", "crun"]


@pytest.fixture
def agent(v2node):
    a = V2Agent(v2node)
    try:
        yield a
    finally:
        a.clean_up()


def run_pod(node, name: str, runtime: str, *, cpu_m: int | None = 500, memory: int | None = 128 * MiB,
            argv=("sleep", "3600")) -> dict:
    return node.call("run_pod", name=name, runtime="" if runtime == "runc" else runtime,
                     containers=[{"name": "app", "argv": list(argv), "cpu_millicpu": cpu_m, "memory_bytes": memory}])


levels, files, unit_props = v2_levels, v2_files, v2_unit_props
# Driver calls under TCG are dear: a look every 0.2 s.
wait_until = functools.partial(_wait_until, step_s=0.2)


def measure_cpus(node, pod: dict, limit: float, what: str) -> float:
    """CPU use of a busy container within 5% of ``limit``, in one of three 3 s windows (cpus_within)."""
    return cpus_within(lambda: v2_cpus(node, pod), limit, what)


# ---------------------------------------------------------------- the node itself


def test_node_is_cgroup2_with_systemd_slices_and_both_runtimes(v2node, agent, figures):
    """This node's smoke test (v2 only by what it checks): a pure cgroup2 with systemd as PID 1, and the
    layout each runtime makes under a kubelet's pod slice."""
    assert v2node.sh("stat -f -c %T /sys/fs/cgroup").strip() == "cgroup2fs"
    assert v2node.sh("ps -o comm= -p 1").strip() == "systemd"
    for runtime in RUNTIMES:
        pod = run_pod(v2node, f"smoke-{runtime}", runtime)
        figures[f"v2 pod start ({runtime}) s"] = round(pod["start_s"], 2)
        lv = levels(pod)
        assert lv["slice"].endswith(f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod['uid'].replace('-', '_')}.slice")
        assert lv["scope"].rsplit("/", 1)[-1].startswith("cri-containerd-") and lv["scope"].endswith(".scope")
        assert ("inner" in lv) == (runtime == "crun"), "crun runs the processes in the scope's container/ child"
        f = files(v2node, pod)
        assert f["slice/cpu.max"] == f["scope/cpu.max"] == "50000 100000"
        assert f["slice/memory.max"] == f["scope/memory.max"] == str(128 * MiB)
        if runtime == "crun":
            assert f["inner/cpu.max"] == "50000 100000" and f["inner/memory.max"] == str(128 * MiB)


# ---------------------------------------------------------------- systemctl daemon-reload


@pytest.mark.parametrize("method", ["cri", "cgroup"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_daemon_reload_keeps_every_level_of_a_raise_that_needed_the_pod_slice(v2node, agent, runtime, method, figures):
    """v2 only: systemd is the cgroup driver here (the host node's kubelet-made pod cgroups have no
    manager that writes them back), and a daemon-reload rewrites every unit's CPUQuota and MemoryMax
    into its cgroup files: a raise that went around systemd would be undone."""
    pod = run_pod(v2node, "reload", runtime, argv=BUSY2)
    before, props_before = files(v2node, pod), unit_props(v2node, pod)
    agent.apply("reload", cpu_millicpu=1500, memory_bytes=256 * MiB, method=METHODS[method])
    raised = files(v2node, pod)
    v2node.sh("systemctl daemon-reload")
    time.sleep(1.0)
    # Unchanged by the reload itself: systemd was told (SetUnitProperties, runtime), not bypassed.
    assert files(v2node, pod) == raised, changed(raised, files(v2node, pod))
    props = unit_props(v2node, pod)
    assert props["slice/CPUQuotaPerSecUSec"] == props["scope/CPUQuotaPerSecUSec"] == "1.500000s"
    assert props["slice/MemoryMax"] == props["scope/MemoryMax"] == str(256 * MiB)
    used = measure_cpus(v2node, pod, 1.5, "1500m after a daemon-reload")
    figures[f"v2 {runtime}/{method} 1500m after daemon-reload: cpus"] = round(used, 3)
    [exp] = agent.list()
    assert exp.drift_corrections == 0, "nothing for drift correction to do"

    agent.revert("reload")
    assert files(v2node, pod) == before, changed(before, files(v2node, pod))
    assert unit_props(v2node, pod) == props_before
    v2node.sh("systemctl daemon-reload")
    time.sleep(1.0)
    assert files(v2node, pod) == before, "a reload after the reset finds the originals in systemd too"


def test_pod_slice_put_back_by_someone_else_is_raised_again(v2node, agent):
    """Drift correction compares every level the experiment changed: a pod slice set back under the
    raised container (here by hand, as a reload did before the fix) is raised again. v2 only: on v1
    the kernel refuses a pod quota below its child's (EINVAL), so the pod cgroup cannot be set back
    under a raised container there (tests/node/test_limits_both_nodes.py sets the container's levels
    back, on both nodes)."""
    pod = run_pod(v2node, "slicedrift", "runc", argv=BUSY2)
    agent.apply("slicedrift", cpu_millicpu=1500, method=agent_pb2.METHOD_CGROUP)
    slice_dir = levels(pod)["slice"]
    v2node.call("write", path=f"{slice_dir}/cpu.max", value="50000 100000")
    assert wait_until(lambda: v2node.read(f"{slice_dir}/cpu.max")[f"{slice_dir}/cpu.max"] == "150000 100000", 10)
    assert wait_until(lambda: agent.list()[0].drift_corrections >= 1, 5)
    measure_cpus(v2node, pod, 1.5, "after the pod slice was raised again")


# ---------------------------------------------------------------- the agent's log


def test_agent_log_has_no_systemd_fallbacks(v2node):
    """Every write to a unit went through systemd: the agent never fell back to the file alone (v2 only:
    the host node has no systemd driver). In a full run it is the node's last test, so it covers every
    one before it, the both-nodes ones included."""
    log = v2node.call("agent_log", lines=5000)["tail"]
    bad = [line for line in log.splitlines() if "written to the file only" in line or "cannot be reached" in line]
    assert bad == []
