"""The agent on a cgroup v2 worker node: systemd as PID 1 and cgroup driver, containerd 2.x, runc and crun.

The node is a VM (tests/support/v2node.py), booted once per session; pods are made as a kubelet with
``--cgroup-driver=systemd`` makes them (a transient pod slice over D-Bus with the summed limits).
The real ``chaos-agent`` runs inside and the tests talk to it over a forwarded port, as a user's
``kubectl-chaos --agent-address`` would. Everything is checked by what can be observed in the VM:
every level's cgroup files, systemd's unit properties, CPU use measured over a few seconds,
memory.events, iperf3 throughput. The lifecycle scenarios (duration, kill -9 of the agent, a
container re-created, a pod deleted) are written once for both nodes: tests/node/test_both_nodes.py.
"""

from __future__ import annotations

import functools
import time

import grpc
import pytest

from daemonset.api.gen import agent_pb2
from tests.support.netns import goodput_ratios_within
from tests.support.nodes import V2_LIMIT_FILES, V2Agent, changed, v2_files, v2_levels
from tests.support.wait import wait_until as _wait_until

MiB = 2**20
BUSY2 = ["sh", "-c", "while :; do :; done & while :; do :; done"]
RUNTIMES = ["runc", "crun"]
METHODS = {"cri": agent_pb2.METHOD_CRI, "cgroup": agent_pb2.METHOD_CGROUP}
# Measured CPU use must be within 5% of the limit (3 s windows; the VM has 2 vCPUs).
CPU_REL_TOLERANCE = 0.05
LIMIT_FILES = V2_LIMIT_FILES
UNIT_PROPS = ("CPUQuotaPerSecUSec", "MemoryMax", "MemoryHigh", "MemorySwapMax")


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


levels, files = v2_levels, v2_files
# Driver calls under TCG are dear: a look every 0.2 s.
wait_until = functools.partial(_wait_until, step_s=0.2)


def unit_props(node, pod: dict) -> dict[str, str]:
    """systemd's view of the pod slice and the container scope (what a daemon-reload writes back)."""
    out = {}
    for lvl in ("scope", "slice"):
        unit = levels(pod)[lvl].rsplit("/", 1)[-1]
        text = node.sh(f"systemctl show -p {','.join(UNIT_PROPS)} {unit}")
        out.update({f"{lvl}/{line.split('=', 1)[0]}": line.split("=", 1)[1] for line in text.splitlines() if "=" in line})
    return out


def memory_events(node, pod: dict) -> dict[str, int]:
    text = node.read(f"{levels(pod)['scope']}/memory.events")[f"{levels(pod)['scope']}/memory.events"] or ""
    return {k: int(v) for k, v in (line.split() for line in text.splitlines())}


def cpus(node, pod: dict, seconds: float = 3.0) -> float:
    return node.call("cpu_used", cgroup_dir=levels(pod)["scope"], seconds=seconds)["cpus"]


def measure_cpus(node, pod: dict, limit: float, what: str, tries: int = 3) -> float:
    """CPU use of a busy container, asserted within 5% of ``limit`` in one of up to ``tries`` 3 s
    windows. A busy loop under a cap is held below it by the host (TCG vCPUs compete with the host's
    other work), and the guest's reading of its usage counter against its clock under TCG can also
    land above it: CI run 19 read 0.212 CPUs under a 0.2 cap once, in 29 runs of this test. A window
    off either way is measured again; every window off fails, with all of them."""
    seen = []
    for _ in range(tries):
        measured = cpus(node, pod)
        seen.append(round(measured, 3))
        if abs(measured - limit) <= limit * CPU_REL_TOLERANCE:
            return measured
    raise AssertionError(f"{what}: measured {seen} CPUs under a limit of {limit} (tolerance {CPU_REL_TOLERANCE:.0%})")


# ---------------------------------------------------------------- the node itself


def test_node_is_cgroup2_with_systemd_slices_and_both_runtimes(v2node, agent, figures):
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


# ---------------------------------------------------------------- CPU


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_cpu_lowered_and_raised_above_the_pod_slice_measured_and_reset_exact(v2node, agent, runtime, method, figures):
    pod = run_pod(v2node, "cpu", runtime, argv=BUSY2)
    before, props_before = files(v2node, pod), unit_props(v2node, pod)
    measure_cpus(v2node, pod, 0.5, "as created, 500m")

    resp = agent.apply("cpu", cpu_millicpu=200, method=METHODS[method])
    assert [(r.previous.value, r.in_force.value) for r in resp.resources] == [(500, 200)]
    used = measure_cpus(v2node, pod, 0.2, "lowered to 200m")
    figures[f"v2 {runtime}/{method} cpu 200m: cpus"] = round(used, 3)

    # 1500m is above the pod slice's 500m: v2 would take the container's write and cap it at the slice.
    resp = agent.apply("cpu", cpu_millicpu=1500, method=METHODS[method])
    assert [(r.previous.value, r.in_force.value) for r in resp.resources] == [(200, 1500)]
    f = files(v2node, pod)
    container_levels = [lvl for lvl in levels(pod) if lvl != "slice"]
    assert {lvl: f[f"{lvl}/cpu.max"] for lvl in container_levels} == dict.fromkeys(container_levels, "150000 100000")
    # The slice was raised first, by what the container gained (cgroupctl's pod rule).
    assert int(f["slice/cpu.max"].split()[0]) >= 150000
    used = measure_cpus(v2node, pod, 1.5, "raised to 1500m, above the pod slice")
    figures[f"v2 {runtime}/{method} cpu 1500m: cpus"] = round(used, 3)

    agent.revert("cpu")
    assert files(v2node, pod) == before, changed(before, files(v2node, pod))
    assert unit_props(v2node, pod) == props_before
    measure_cpus(v2node, pod, 0.5, "reset to 500m")


# ---------------------------------------------------------------- memory


HOLD_300MIB = ["sh", "-c", "while [ ! -e /tmp/go ]; do sleep 0.2; done; dd if=/dev/zero bs=300M count=1 | sleep 3600"]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_memory_raised_above_the_pod_slice_holds_300mib_then_lowered_and_reset_exact(v2node, agent, runtime, method,
                                                                                      figures):
    pod = run_pod(v2node, "mem", runtime, argv=HOLD_300MIB)
    cid = pod["containers"]["app"]
    before, props_before = files(v2node, pod), unit_props(v2node, pod)
    resp = agent.apply("mem", memory_bytes=512 * MiB, method=METHODS[method])
    assert [(r.previous.value, r.in_force.value) for r in resp.resources] == [(128 * MiB, 512 * MiB)]
    f = files(v2node, pod)
    assert {lvl: f[f"{lvl}/memory.max"] for lvl in levels(pod)} == dict.fromkeys(levels(pod), str(512 * MiB))
    assert v2node.call("exec", container_id=cid, argv=["touch", "/tmp/go"])["rc"] == 0
    scope = levels(pod)["scope"]
    assert wait_until(lambda: int(v2node.read(f"{scope}/memory.current")[f"{scope}/memory.current"]) > 300 * MiB, 60), \
        "the 300 MiB allocation did not get there"
    held = int(v2node.read(f"{scope}/memory.current")[f"{scope}/memory.current"])
    figures[f"v2 {runtime}/{method} memory held under a 512Mi raise: MiB"] = round(held / MiB, 1)
    state = v2node.call("container_state", container_id=cid)
    assert state["state"] == "CONTAINER_RUNNING" and state["restart_count"] == 0
    assert memory_events(v2node, pod)["oom_kill"] == 0

    # Below what it holds: refused on every method, nothing changed, nobody killed.
    with pytest.raises(grpc.RpcError) as err:
        agent.apply("mem", memory_bytes=256 * MiB, method=METHODS[method])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    assert v2node.call("exec", container_id=cid, argv=["sh", "-c", "kill $(pidof dd)"])["rc"] == 0
    assert wait_until(lambda: int(v2node.read(f"{scope}/memory.current")[f"{scope}/memory.current"]) < 64 * MiB, 30)

    resp = agent.apply("mem", memory_bytes=64 * MiB, method=METHODS[method])
    assert [(r.previous.value, r.in_force.value) for r in resp.resources] == [(512 * MiB, 64 * MiB)]
    agent.revert("mem")
    after = files(v2node, pod)
    assert after == before, changed(before, after)
    assert unit_props(v2node, pod) == props_before
    assert memory_events(v2node, pod)["oom_kill"] == 0
    assert v2node.call("container_state", container_id=cid)["state"] == "CONTAINER_RUNNING"


@pytest.mark.parametrize("method", ["auto", "cri", "cgroup"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_memory_below_usage_refused_on_every_method_and_nothing_killed(v2node, agent, runtime, method):
    hog = ["sh", "-c", "head -c 41943040 /dev/zero > /dev/shm/hog; sleep 3600"]
    pod = run_pod(v2node, "hog", runtime, argv=hog, memory=96 * MiB)
    scope = levels(pod)["scope"]
    assert wait_until(lambda: int(v2node.read(f"{scope}/memory.current")[f"{scope}/memory.current"]) > 40 * MiB, 20)
    before = files(v2node, pod)
    with pytest.raises(grpc.RpcError) as err:
        agent.apply("hog", memory_bytes=16 * MiB, method={"auto": agent_pb2.METHOD_AUTO, **METHODS}[method])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "below" in err.value.details() and "nothing was changed" in err.value.details()
    assert files(v2node, pod) == before
    assert memory_events(v2node, pod)["oom_kill"] == 0
    assert v2node.call("container_state", container_id=pod["containers"]["app"])["state"] == "CONTAINER_RUNNING"
    assert agent.list() == []


# ---------------------------------------------------------------- systemctl daemon-reload


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_daemon_reload_keeps_every_level_of_a_raise_that_needed_the_pod_slice(v2node, agent, runtime, method, figures):
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
    raised container (here by hand, as a reload did before the fix) is raised again."""
    pod = run_pod(v2node, "slicedrift", "runc", argv=BUSY2)
    agent.apply("slicedrift", cpu_millicpu=1500, method=agent_pb2.METHOD_CGROUP)
    slice_dir = levels(pod)["slice"]
    v2node.call("write", path=f"{slice_dir}/cpu.max", value="50000 100000")
    assert wait_until(lambda: v2node.read(f"{slice_dir}/cpu.max")[f"{slice_dir}/cpu.max"] == "150000 100000", 10)
    assert wait_until(lambda: agent.list()[0].drift_corrections >= 1, 5)
    measure_cpus(v2node, pod, 1.5, "after the pod slice was raised again")


# ---------------------------------------------------------------- bandwidth, time, crashes, lifecycle


def test_bandwidth_both_ways_measured(v2node, agent, figures):
    pod = run_pod(v2node, "net", "runc")
    agent.apply("net", ingress_bps=8_000_000, egress_bps=4_000_000)

    def goodput(into_pod: bool, duration_s: float = 3.0) -> float:
        return v2node.call("goodput", netns=pod["netns"], pod_ip=pod["ip"], into_pod=into_pod, duration_s=duration_s)["bps"]

    # TCG on a 2-core host: bench_bandwidth --node v2 holds 0.93-1.0; the test allows for a busy host
    # and, above, for the guest's timing of its byte counts (`ss` under TCG: one CI run read 1.020),
    # with the host's bounds (0.85-1.05). Unshaped, the link carries more than 50 Mbit/s.
    into = goodput_ratios_within(lambda: goodput(True), 8e6, 0.85, 1.05, what="v2, into the pod")
    out = goodput_ratios_within(lambda: goodput(False), 4e6, 0.85, 1.05, what="v2, out of the pod")
    figures["v2 HTB 8 Mbit/s into / 4 Mbit/s out of the pod: goodput ratio"] = f"{into[-1]:.3f} / {out[-1]:.3f}"
    agent.revert("net")
    assert goodput(True, duration_s=1.0) > 50e6


def test_agent_log_has_no_systemd_fallbacks(v2node):
    """Every write to a unit went through systemd: the agent never fell back to the file alone."""
    log = v2node.call("agent_log", lines=5000)["tail"]
    bad = [line for line in log.splitlines() if "written to the file only" in line or "cannot be reached" in line]
    assert bad == []
