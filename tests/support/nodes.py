"""One face over the two test nodes, so that a scenario is written once and runs on both (issue #10).

- ``HostNode``: the host's private containerd (cgroup v1, containerd 1.6, runc; tests/support/node.py)
  with the agent as a child process (tests/node/test_agent.py ``Agent``);
- ``V2NodeFace``: the cgroup v2 node VM (systemd, containerd 2.x; tests/support/v2node.py) with its
  agent inside, for one runtime (runc or crun), driven through the VM's driver and the agent's
  forwarded port.

What a scenario sees: pods by name, every limit file of the container and of its pod (all levels:
on v2 the scope, the pod slice and crun's ``container/`` child; raw contents, so "as before" means
byte for byte), the agent's gRPC answers, its state records, kill -9 and start of the agent, a
container re-created in its pod, a pod deleted, whether our IFB for the pod exists. Timing that the
two nodes cannot share is an attribute: ``agent_start_s`` (how long the agent takes to serve again),
``clock_is_hosts`` (the v2 guest's wall clock drifts under TCG, so ``expires_at`` is not comparable
with the host's clock there).
"""

from __future__ import annotations

from daemonset.api.gen import agent_pb2

MiB = 2**20

# Limit files per controller, container and pod level, on the host's cgroup v1 node.
_V1_FILES = {"cpu": ("cpu.cfs_quota_us", "cpu.cfs_period_us", "cpu.shares"),
             "memory": ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.soft_limit_in_bytes")}
V2_LIMIT_FILES = ("cpu.max", "cpu.weight", "cpu.max.burst", "memory.max", "memory.high", "memory.swap.max")


def changed(before: dict, after: dict) -> dict:
    """{file: (before, after)} for every limit file that differs: what an exact-reset assertion shows."""
    return {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def _changes(kwargs: dict) -> agent_pb2.Changes:
    return agent_pb2.Changes(**kwargs)


class HostNode:
    """The host node: ``pods`` (tests/support/node.PodFactory) and a started ``agent``."""

    name = "v1-runc"
    agent_start_s = 1.0
    late_s = 1.5  # how late after its due time a timed revert may land
    clock_is_hosts = True

    def __init__(self, pods, agent):
        self.pods = pods
        self.agent = agent
        self._pods: dict[str, object] = {}

    def run_pod(self, name: str, *, cpu_m: int = 500, memory: int = 128 * MiB) -> str:
        from tests.support.node import ContainerSpec

        self._pods[name] = self.pods.run(name, containers=[ContainerSpec("app", cpu_millicpu=cpu_m, memory_bytes=memory)])
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

    def cpu_limit_m(self, pod: str) -> int | None:
        """The CPU the container's processes may use, from the kernel: the tighter of the container's
        and the pod's quota (None: unlimited at both)."""
        f = self.limits(pod)
        found = [int(f[f"{lvl}/cpu.cfs_quota_us"]) * 1000 // int(f[f"{lvl}/cpu.cfs_period_us"])
                 for lvl in ("container", "pod") if int(f[f"{lvl}/cpu.cfs_quota_us"]) >= 0]
        return min(found) if found else None

    def memory_limit_bytes(self, pod: str) -> int:
        """The memory the container's processes may use: the tighter of the container's and the pod's."""
        f = self.limits(pod)
        return min(int(f["container/memory.limit_in_bytes"]), int(f["pod/memory.limit_in_bytes"]))

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
                                     changes=_changes(changes), method=method, force=force)
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

    agent_start_s = 13.0  # Python under TCG: 7-13 s to serve again
    late_s = 3.0
    clock_is_hosts = False

    def __init__(self, node, runtime: str):
        self.node = node
        self.runtime = runtime
        self.name = f"v2-{runtime}"
        self.agent = V2Agent(node)
        self._pods: dict[str, dict] = {}

    def run_pod(self, name: str, *, cpu_m: int = 500, memory: int = 128 * MiB) -> str:
        self._pods[name] = self.node.call(
            "run_pod", name=name, runtime="" if self.runtime == "runc" else self.runtime,
            containers=[{"name": "app", "argv": ["sleep", "3600"], "cpu_millicpu": cpu_m, "memory_bytes": memory}])
        return name

    def limits(self, pod: str) -> dict[str, str | None]:
        return v2_files(self.node, self._pods[pod])

    def cpu_limit_m(self, pod: str) -> int | None:
        """The CPU the container's processes may use: the tightest cpu.max of its levels (the scope,
        crun's ``container/`` child, the pod slice; the kernel caps a child at its parent silently)."""
        found = []
        for name, value in self.limits(pod).items():
            if name.endswith("/cpu.max") and value and not value.startswith("max"):
                quota, period = value.split()
                found.append(int(quota) * 1000 // int(period))
        return min(found) if found else None

    def memory_limit_bytes(self, pod: str) -> int:
        """The tightest memory.max of the container's levels."""
        return min(int(v) for k, v in self.limits(pod).items() if k.endswith("/memory.max") and v and v != "max")

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
