"""Which capabilities each path of the agent needs, shown on the real node with setpriv.

The agent runs as root (uid 0 owns the cgroup files and the runtime's socket: no DAC_OVERRIDE) with
a bounding set cut down as the DaemonSet's ``capabilities`` cut it:

- NET_ADMIN alone: CPU and memory (through CRI and straight into the cgroup files) and bandwidth
  both ways (IFB, qdiscs, the u32 redirect). The host veth is found from the host side (the pod
  namespace's id, RTM_GETNSID by pid, and the veth whose peer lives there): no setns, no
  ``/proc/PID/ns/net``, so neither SYS_ADMIN nor SYS_PTRACE;
- no capability at all: CPU and memory still work, bandwidth is refused (netlink EPERM) and leaves
  nothing behind;
- entering the pod's network namespace (the fallback when the kernel has no id for it; a pod with
  several veths is refused before that) is what needed SYS_ADMIN: refused with NET_ADMIN alone.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.node.test_agent import REPO, Agent, MiB, agent_pb2
from tests.support.node import ContainerSpec
from tests.support.require import require_binary

CAP_NET_ADMIN = 12


class CappedAgent(Agent):
    """chaos-agent under ``setpriv --bounding-set -all[,+CAPS] --inh-caps -all``: as root, with only ``caps``."""

    def __init__(self, node, workdir: pathlib.Path, caps: str):
        super().__init__(node, workdir, drift_interval_s=5.0)
        self.caps = caps

    def command(self) -> list[str]:
        bounding = "-all" + (f",+{self.caps}" if self.caps else "")
        return ["setpriv", "--bounding-set", bounding, "--inh-caps", "-all", "--",
                sys.executable, "-m", "daemonset.agent", "--cri-endpoint", self.cri_endpoint, "--listen", self.address,
                "--state-dir", str(self.state_dir), "--node-name", "test-node", "--drift-interval", "5",
                "--no-sweep-orphans", "--log-format", "json"]

    def effective_caps(self) -> int:
        status = pathlib.Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)


@pytest.fixture
def capped(node):
    require_binary("setpriv")
    started = []

    def start(caps: str) -> CappedAgent:
        workdir = pathlib.Path(tempfile.mkdtemp(prefix="kcx-cap-", dir="/tmp"))
        agent = CappedAgent(node, workdir, caps).start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()
        shutil.rmtree(agent.workdir, ignore_errors=True)


def quota(pod) -> int:
    return int((pod.container_cgroup_dir("cpu") / "cpu.cfs_quota_us").read_text())


def limit(pod) -> int:
    return int((pod.container_cgroup_dir("memory") / "memory.limit_in_bytes").read_text())


def test_net_admin_alone_does_cpu_memory_and_bandwidth(capped, pods):
    import netshape

    pod = pods.run("caps-1", "caps", [ContainerSpec(cpu_millicpu=500, memory_bytes=64 * MiB)])
    agent = capped("net_admin")
    assert agent.effective_caps() == 1 << CAP_NET_ADMIN
    agent.apply("caps", "caps-1", cpu_millicpu=250, memory_bytes=48 * MiB)
    assert (quota(pod), limit(pod)) == (25_000, 48 * MiB)
    agent.apply("caps", "caps-1", method=agent_pb2.METHOD_CGROUP, cpu_millicpu=200)
    assert quota(pod) == 20_000
    agent.apply("caps", "caps-1", ingress_bps=20_000_000, egress_bps=10_000_000)
    pid = pod.node.client.container_info(pod.container_id()).pid
    veth = netshape.find_host_veth(pid)
    assert veth.pod_ifname == "eth0"  # named from the pod's /proc/PID/net, not by entering it
    before_revert = subprocess.run(["tc", "qdisc", "show", "dev", veth.ifname], capture_output=True, text=True).stdout
    assert "htb" in before_revert and "ingress" in before_revert, before_revert
    agent.revert("caps", "caps-1")
    assert (quota(pod), limit(pod)) == (50_000, 64 * MiB)
    assert "htb" not in subprocess.run(["tc", "qdisc", "show", "dev", veth.ifname], capture_output=True,
                                       text=True).stdout
    assert agent.list() == []


def test_without_any_capability_bandwidth_is_refused_and_cpu_still_works(capped, pods):
    pod = pods.run("caps-2", "caps", [ContainerSpec(cpu_millicpu=500, memory_bytes=64 * MiB)])
    agent = capped("")
    assert agent.effective_caps() == 0
    agent.apply("caps", "caps-2", cpu_millicpu=300)
    assert quota(pod) == 30_000
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        agent.apply("caps", "caps-2", ingress_bps=20_000_000)
    assert "Operation not permitted" in err.value.details() or "EPERM" in err.value.details(), err.value.details()
    assert quota(pod) == 30_000  # the experiment in force is untouched
    agent.revert("caps", "caps-2")
    assert quota(pod) == 50_000


def test_entering_the_pod_namespace_is_what_needed_sys_admin(node, pods):
    require_binary("setpriv")
    pod = pods.run("caps-3", "caps", [ContainerSpec(cpu_millicpu=100)])
    pid = node.client.container_info(pod.container_id()).pid
    probe = ("import sys, netshape; kw = {'pod_ifname': 'eth0'} if sys.argv[2] == 'enter' else {};"
             " print(netshape.find_host_veth(int(sys.argv[1]), **kw).ifname)")

    def find(caps: str, how: str) -> subprocess.CompletedProcess:
        bounding = "-all" + "".join(f",+{cap}" for cap in caps.split(",") if cap)
        return subprocess.run(["setpriv", "--bounding-set", bounding, "--inh-caps", "-all", "--", sys.executable, "-c",
                               probe, str(pid), how], cwd=REPO, capture_output=True, text=True, timeout=60)

    full = subprocess.run([sys.executable, "-c", probe, str(pid), "host"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert full.returncode == 0, full.stderr
    host_side = find("", "host")  # from the host side: no capability at all
    assert host_side.returncode == 0 and host_side.stdout == full.stdout, host_side.stderr
    entering = find("net_admin", "enter")  # setns into the pod's namespace
    assert entering.returncode != 0, entering.stdout
    granted = find("net_admin,sys_admin,sys_ptrace", "enter")
    assert granted.stdout == full.stdout, granted.stderr[-2000:]
