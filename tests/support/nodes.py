"""One face over the two test nodes, so that a scenario is written once and runs on both (issue #10).

- ``HostNode``: the host's private containerd (cgroup v1, containerd 1.6, runc; tests/support/node.py)
  with the agent as a child process (tests/node/test_agent.py ``Agent``);
- ``V2NodeFace``: the cgroup v2 node VM (systemd, containerd 2.x; tests/support/v2node.py) with its
  agent inside, for one runtime (runc or crun), driven through the VM's driver and the agent's
  forwarded port.

What a scenario sees: pods by name, every limit file of the container and of its pod (all levels:
on v2 the scope, the pod slice and crun's ``container/`` child; raw contents, so "as before" means
byte for byte), the agent's gRPC answers, its state records, kill -9 and start of the agent, a
container re-created in its pod, a pod deleted, whether our IFB for the pod exists; and what the
limit tests measure: the limit of every level (``cpu_levels_m``, ``memory_levels``; the pod's level
is named by ``pod_level``), CPU used over a window, memory charged, OOM kills, the container's state,
a command run in it, TCP goodput into and out of the pod, and what the node's manager of the
container's resources believes (``manager_view``: containerd's store on v1, systemd's unit
properties on v2). Timing that the two nodes cannot share is an attribute: ``agent_start_s`` (how
long the agent takes to serve again), ``clock_is_hosts`` (the v2 guest's wall clock drifts under
TCG, so ``expires_at`` is not comparable with the host's clock there), the measuring windows
(``cpu_window_s``, ``goodput_window_s``). ``cgroups`` and ``runtime`` name the node in figures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from daemonset.api.gen import agent_pb2

MiB = 2**20
SLEEP = ("sleep", "3600")
# Two busy threads: enough to fill a 1500m limit on the two-CPU nodes.
BUSY2 = ("sh", "-c", "while :; do :; done & while :; do :; done")
METHODS = {"auto": agent_pb2.METHOD_AUTO, "cri": agent_pb2.METHOD_CRI, "cgroup": agent_pb2.METHOD_CGROUP}
# Measured CPU use must be within 5% of the limit (machine.md: the quota is tracked within ~2% on the
# host; the v2 VM has 2 vCPUs under TCG).
CPU_REL_TOLERANCE = 0.05
V2_UNIT_PROPS = ("CPUQuotaPerSecUSec", "MemoryMax", "MemoryHigh", "MemorySwapMax")

# Limit files per controller, container and pod level, on the host's cgroup v1 node.
_V1_FILES = {"cpu": ("cpu.cfs_quota_us", "cpu.cfs_period_us", "cpu.shares"),
             "memory": ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.soft_limit_in_bytes")}
V2_LIMIT_FILES = ("cpu.max", "cpu.weight", "cpu.max.burst", "memory.max", "memory.high", "memory.swap.max")


def changed(before: dict, after: dict) -> dict:
    """{file: (before, after)} for every limit file that differs: what an exact-reset assertion shows."""
    return {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def cpus_within(measure: Callable[[], float], limit: float, what: str, tries: int = 3) -> float:
    """CPU use of a busy container from ``measure()`` (one window), asserted within 5% of ``limit`` in
    one of up to ``tries`` windows; the reading that was. A busy loop under a cap can be held below it
    by the machine (on v2, TCG vCPUs compete with the host's other work), and the v2 guest's reading of
    its usage counter against its clock under TCG can also land above it: CI run 19 read 0.212 CPUs
    under a 0.2 cap once, in 29 runs. A window off either way is measured again; every window off
    fails, with all of them."""
    seen = []
    for _ in range(tries):
        measured = measure()
        seen.append(round(measured, 3))
        if abs(measured - limit) <= limit * CPU_REL_TOLERANCE:
            return measured
    raise AssertionError(f"{what}: measured {seen} CPUs under a limit of {limit} (tolerance {CPU_REL_TOLERANCE:.0%})")


class HostNode:
    """The host node: ``pods`` (tests/support/node.PodFactory) and a started ``agent``."""

    name = "v1-runc"
    cgroups, runtime = "v1", "runc"
    pod_level = "pod"
    agent_start_s = 1.0
    late_s = 1.5  # how late after its due time a timed revert may land
    clock_is_hosts = True
    cpu_window_s = 2.0
    goodput_window_s = 2.0

    def __init__(self, pods, agent):
        self.pods = pods
        self.agent = agent
        self._pods: dict[str, object] = {}

    def run_pod(self, name: str, *, cpu_m: int = 500, memory: int = 128 * MiB, argv: Sequence[str] = SLEEP) -> str:
        from tests.support.node import ContainerSpec

        self._pods[name] = self.pods.run(name, containers=[ContainerSpec("app", argv=tuple(argv), cpu_millicpu=cpu_m,
                                                                         memory_bytes=memory)])
        return name

    def limits(self, pod: str) -> dict[str, str]:
        p = self._pods[pod]
        out = {}
        for ctl, names in _V1_FILES.items():
            for n in names:
                out[f"container/{n}"] = (p.container_cgroup_dir(ctl) / n).read_text().strip()
                if n != "memory.soft_limit_in_bytes":
                    out[f"pod/{n}"] = (p.cgroup_dirs[ctl] / n).read_text().strip()
        return out

    def cpu_levels_m(self, pod: str) -> dict[str, int | None]:
        """{level: the CPU its CFS quota allows, None for none} for the container and the pod cgroup."""
        f = self.limits(pod)
        quotas = {lvl: (int(f[f"{lvl}/cpu.cfs_quota_us"]), int(f[f"{lvl}/cpu.cfs_period_us"])) for lvl in ("container", "pod")}
        return {lvl: q * 1000 // period if q >= 0 else None for lvl, (q, period) in quotas.items()}

    def cpu_limit_m(self, pod: str) -> int | None:
        """The CPU the container's processes may use, from the kernel: the tighter of the container's
        and the pod's quota (None: unlimited at both)."""
        found = [m for m in self.cpu_levels_m(pod).values() if m is not None]
        return min(found) if found else None

    def set_cpu_level_m(self, pod: str, level: str, millicpu: int) -> None:
        """Someone else's write of one level's CPU quota (``level`` as in ``cpu_levels_m``; period 100 ms)."""
        p = self._pods[pod]
        d = p.container_cgroup_dir("cpu") if level == "container" else p.cgroup_dirs["cpu"]
        (d / "cpu.cfs_quota_us").write_text(str(millicpu * 100))

    def memory_levels(self, pod: str) -> dict[str, int]:
        """{level/file: bytes}: memory and memory+swap limits of the container and of the pod cgroup."""
        f = self.limits(pod)
        return {f"{lvl}/{n}": int(f[f"{lvl}/{n}"]) for lvl in ("container", "pod")
                for n in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")}

    def memory_limit_bytes(self, pod: str) -> int:
        """The memory the container's processes may use: the tighter of the container's and the pod's."""
        return min(self.memory_levels(pod).values())

    def cpu_used(self, pod: str) -> float:
        """CPUs the container used over the whole CFS periods nearest ``cpu_window_s`` (its
        cpuacct.usage; tests/support/cpumeter.py: an unaligned window is off by up to 4-5% at 0.2 CPU)."""
        from tests.support.cpumeter import measure_cpus

        p = self._pods[pod]
        usage = p.container_cgroup_dir("cpuacct") / "cpuacct.usage"
        period_us = int((p.container_cgroup_dir("cpu") / "cpu.cfs_period_us").read_text())
        return measure_cpus(lambda: int(usage.read_text()), period_us, self.cpu_window_s)

    def memory_current(self, pod: str) -> int:
        """Bytes charged to the container's memory cgroup (memory.usage_in_bytes)."""
        return int((self._pods[pod].container_cgroup_dir("memory") / "memory.usage_in_bytes").read_text())

    def oom_kills(self, pod: str) -> int:
        """Processes of the container's memory cgroup killed by the OOM killer (memory.oom_control)."""
        text = (self._pods[pod].container_cgroup_dir("memory") / "memory.oom_control").read_text()
        return int(dict(line.split() for line in text.splitlines())["oom_kill"])

    def container_state(self, pod: str) -> str:
        """The runtime's word on the container: "CONTAINER_RUNNING", "CONTAINER_EXITED", ..."""
        from cri_api.v1 import api_pb2

        status = self.pods.node.client.container_status(self.container_id(pod), verbose=False).status
        return api_pb2.ContainerState.Name(status.state)

    def exec(self, pod: str, argv: Sequence[str]) -> int:
        """Run ``argv`` in the container; its exit status."""
        return self.pods.node.client.exec_sync(self.container_id(pod), list(argv), 30).exit_code

    def goodput(self, pod: str, *, into_pod: bool, seconds: float | None = None) -> float:
        """TCP goodput node -> pod (``into_pod``) or pod -> node, bit/s (tests/support/netns.py)."""
        from tests.node.test_agent import iperf_bps

        return iperf_bps(self._pods[pod], into_pod=into_pod, seconds=seconds or self.goodput_window_s)

    def manager_view(self, pod: str) -> dict[str, str]:
        """What containerd believes the container's resources are (its store: what a later runc update
        or a re-created container starts from)."""
        resources = self.pods.node.client.container_info(self.container_id(pod)).resources
        return {f"containerd/{k}": str(v) for k, v in resources.to_dict().items()}

    def apply(self, pod: str, *, method: int = agent_pb2.METHOD_AUTO, duration_s: float | None = None, **changes: int):
        return self.agent.apply("default", pod, method=method, duration_s=duration_s, **changes)

    def revert(self, pod: str):
        return self.agent.revert("default", pod)

    def experiments(self) -> list:
        return self.agent.list()

    def records(self) -> list[dict]:
        return self.agent.records()

    def kill_agent(self) -> None:
        self.agent.kill9()

    def start_agent(self) -> None:
        self.agent.start()

    def restart_container(self, pod: str) -> str:
        return self._pods[pod].restart_container()

    def container_id(self, pod: str) -> str:
        return self._pods[pod].container_id()

    def delete_pod(self, pod: str) -> None:
        self._pods[pod].delete()

    def shaped(self, pod: str) -> bool:
        from tests.node.test_agent import ifb_exists

        return ifb_exists(self._pods[pod])

    def log_tail(self) -> str:
        return self.agent.log_tail()

    def close(self) -> None:
        """The fixtures (``pods``, ``agent``) clean up after the host node."""


class V2Agent:
    """The agent in the v2 VM, through its forwarded port."""

    def __init__(self, node):
        import grpc

        from daemonset.api.gen import agent_pb2_grpc

        self.node = node
        self._grpc = grpc
        self.channel = grpc.insecure_channel(node.agent_address)
        self.stub = agent_pb2_grpc.AgentStub(self.channel)

    def apply(self, pod: str, *, method: int = agent_pb2.METHOD_AUTO, duration_s: float | None = None,
              force: bool = False, **changes: int) -> agent_pb2.ApplyResponse:
        req = agent_pb2.ApplyRequest(target=agent_pb2.Target(namespace="default", pod=pod),
                                     changes=agent_pb2.Changes(**changes), method=method, force=force)
        if duration_s is not None:
            req.duration_s = duration_s
        return self.stub.Apply(req, timeout=60)

    def revert(self, pod: str) -> agent_pb2.RevertResponse:
        return self.stub.Revert(agent_pb2.RevertRequest(target=agent_pb2.Target(namespace="default", pod=pod)),
                                timeout=60)

    def list(self) -> list:
        return list(self.stub.List(agent_pb2.ListRequest(), timeout=30).experiments)

    def reconnect(self) -> None:
        from daemonset.api.gen import agent_pb2_grpc

        self.channel.close()
        self.channel = self._grpc.insecure_channel(self.node.agent_address)
        self.stub = agent_pb2_grpc.AgentStub(self.channel)

    def clean_up(self) -> None:
        """What a test leaves goes: every experiment reverted (forced), every pod deleted."""
        try:
            for exp in self.list():
                t = exp.target
                target = agent_pb2.Target(namespace=t.namespace, pod=t.pod, container=t.container)
                self.stub.Revert(agent_pb2.RevertRequest(target=target, force=True), timeout=60)
        finally:
            self.channel.close()
            errors = self.node.call("delete_all")["errors"]
            assert not errors, errors


def v2_levels(pod: dict) -> dict[str, str]:
    """The cgroup directories of the pod's container: its scope, the pod slice and crun's inner child."""
    cg = pod["cgroups"]["app"]
    out = {"scope": cg["container"], "slice": cg["pod"]}
    if cg["inner"]:
        out["inner"] = cg["inner"]
    return out


def v2_files(node, pod: dict, names=V2_LIMIT_FILES) -> dict[str, str | None]:
    """{level/file: content} for every level of the container and its pod slice."""
    paths = {f"{lvl}/{n}": f"{d}/{n}" for lvl, d in v2_levels(pod).items() for n in names}
    got = node.read(*paths.values())
    return {k: got[p] for k, p in paths.items()}


class V2NodeFace:
    """The v2 node VM for one runtime: ``node`` (tests/support/v2node.V2Node, its agent started)."""

    cgroups = "v2"
    pod_level = "slice"
    agent_start_s = 13.0  # Python under TCG: 7-13 s to serve again
    late_s = 3.0
    clock_is_hosts = False
    cpu_window_s = 3.0
    goodput_window_s = 3.0

    def __init__(self, node, runtime: str):
        self.node = node
        self.runtime = runtime
        self.name = f"v2-{runtime}"
        self.agent = V2Agent(node)
        self._pods: dict[str, dict] = {}

    def run_pod(self, name: str, *, cpu_m: int = 500, memory: int = 128 * MiB, argv: Sequence[str] = SLEEP) -> str:
        self._pods[name] = self.node.call(
            "run_pod", name=name, runtime="" if self.runtime == "runc" else self.runtime,
            containers=[{"name": "app", "argv": list(argv), "cpu_millicpu": cpu_m, "memory_bytes": memory}])
        return name

    def info(self, pod: str) -> dict:
        """The driver's record of the pod: uid, sandbox id, netns, IP, cgroups, start_s."""
        return self._pods[pod]

    def levels(self, pod: str) -> dict[str, str]:
        """The container's cgroup directories: scope, pod slice, crun's inner child (``v2_levels``)."""
        return v2_levels(self._pods[pod])

    def limits(self, pod: str) -> dict[str, str | None]:
        return v2_files(self.node, self._pods[pod])

    def cpu_levels_m(self, pod: str) -> dict[str, int | None]:
        """{level: the CPU its cpu.max allows, None for "max"} for the scope, crun's ``container/``
        child and the pod slice."""
        out: dict[str, int | None] = {}
        for name, value in v2_files(self.node, self._pods[pod], ("cpu.max",)).items():
            quota, period = (value or "max 100000").split()
            out[name.split("/", 1)[0]] = None if quota == "max" else int(quota) * 1000 // int(period)
        return out

    def cpu_limit_m(self, pod: str) -> int | None:
        """The CPU the container's processes may use: the tightest cpu.max of its levels (the scope,
        crun's ``container/`` child, the pod slice; the kernel caps a child at its parent silently)."""
        found = [m for m in self.cpu_levels_m(pod).values() if m is not None]
        return min(found) if found else None

    def set_cpu_level_m(self, pod: str, level: str, millicpu: int) -> None:
        """Someone else's write of one level's cpu.max (``level`` as in ``cpu_levels_m``; period 100 ms)."""
        path = f"{v2_levels(self._pods[pod])[level]}/cpu.max"
        self.node.call("write", path=path, value=f"{millicpu * 100} 100000")

    def memory_levels(self, pod: str) -> dict[str, int | None]:
        """{level/memory.max: bytes, None for "max"} for the scope, crun's child and the pod slice."""
        return {k: None if v in (None, "max") else int(v)
                for k, v in v2_files(self.node, self._pods[pod], ("memory.max",)).items()}

    def memory_limit_bytes(self, pod: str) -> int:
        """The tightest memory.max of the container's levels."""
        return min(v for v in self.memory_levels(pod).values() if v is not None)

    def cpu_used(self, pod: str) -> float:
        """CPUs the container used over ``cpu_window_s``, measured in the guest (cpu.stat of its scope:
        crun's ``container/`` child is counted in it)."""
        scope = v2_levels(self._pods[pod])["scope"]
        return self.node.call("cpu_used", cgroup_dir=scope, seconds=self.cpu_window_s)["cpus"]

    def memory_current(self, pod: str) -> int:
        """Bytes charged to the container's scope (memory.current, crun's child included)."""
        path = f"{v2_levels(self._pods[pod])['scope']}/memory.current"
        return int(self.node.read(path)[path])

    def oom_kills(self, pod: str) -> int:
        """Processes of the container's scope (and below) killed by the OOM killer (memory.events)."""
        path = f"{v2_levels(self._pods[pod])['scope']}/memory.events"
        text = self.node.read(path)[path] or ""
        return int(dict(line.split() for line in text.splitlines())["oom_kill"])

    def container_state(self, pod: str) -> str:
        """The runtime's word on the container: "CONTAINER_RUNNING", "CONTAINER_EXITED", ..."""
        return self.node.call("container_state", container_id=self.container_id(pod))["state"]

    def exec(self, pod: str, argv: Sequence[str]) -> int:
        """Run ``argv`` in the container; its exit status."""
        return self.node.call("exec", container_id=self.container_id(pod), argv=list(argv))["rc"]

    def goodput(self, pod: str, *, into_pod: bool, seconds: float | None = None) -> float:
        """TCP goodput node -> pod (``into_pod``) or pod -> node inside the VM, bit/s."""
        p = self._pods[pod]
        return self.node.call("goodput", netns=p["netns"], pod_ip=p["ip"], into_pod=into_pod,
                              duration_s=seconds or self.goodput_window_s)["bps"]

    def manager_view(self, pod: str) -> dict[str, str]:
        """What systemd believes the pod slice's and the container scope's limits are (its unit
        properties: what a daemon-reload writes back into the cgroup files), in one driver call:
        ``systemctl show`` answers for both units, each block ended by a blank line."""
        levels = v2_levels(self._pods[pod])
        units = {lvl: levels[lvl].rsplit("/", 1)[-1] for lvl in ("scope", "slice")}
        text = self.node.sh(f"systemctl show -p Id,{','.join(V2_UNIT_PROPS)} {units['scope']} {units['slice']}")
        level_of = {unit: lvl for lvl, unit in units.items()}
        out = {}
        for block in text.strip().split("\n\n"):
            props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            lvl = level_of[props.pop("Id")]
            out.update({f"{lvl}/{k}": v for k, v in props.items()})
        return out

    def apply(self, pod: str, *, method: int = agent_pb2.METHOD_AUTO, duration_s: float | None = None, **changes: int):
        return self.agent.apply(pod, method=method, duration_s=duration_s, **changes)

    def revert(self, pod: str):
        return self.agent.revert(pod)

    def experiments(self) -> list:
        return self.agent.list()

    def records(self) -> list[dict]:
        return self.node.call("records")["records"]

    def kill_agent(self) -> None:
        self.node.call("agent_kill9")

    def start_agent(self) -> None:
        self.node.call("agent_start", wait_s=120)
        self.agent.reconnect()

    def restart_container(self, pod: str) -> str:
        self._pods[pod] = self.node.call("restart_container", sandbox_id=self._pods[pod]["sandbox_id"], name="app")
        return self._pods[pod]["containers"]["app"]

    def container_id(self, pod: str) -> str:
        return self._pods[pod]["containers"]["app"]

    def delete_pod(self, pod: str) -> None:
        self.node.call("delete_pod", sandbox_id=self._pods[pod]["sandbox_id"])

    def shaped(self, pod: str) -> bool:
        from netshape import ifb_name

        return ifb_name(self._pods[pod]["sandbox_id"]) in self.node.sh("ip -o link show type ifb")

    def log_tail(self) -> str:
        return self.node.call("agent_log", lines=30)["tail"]

    def close(self) -> None:
        self.agent.clean_up()
