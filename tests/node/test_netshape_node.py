"""netshape on a real CNI bridge pod of the test node: the host veth is the CNI's, on the node."""

from __future__ import annotations

import os
import subprocess

import pytest

import netshape
from tests.support.netns import goodput_ratios_within, pod_goodput_bps
from tests.support.node import ContainerSpec
from tests.support.require import require_binary

TOLERANCE = (0.85, 1.05)


def _tc(*args: str) -> str:
    return subprocess.run(["tc", *args], check=True, capture_output=True, text=True).stdout


def _dumps(ifname: str) -> str:
    return "\n".join(
        [_tc("qdisc", "show", "dev", ifname), _tc("class", "show", "dev", ifname), _tc("filter", "show", "dev", ifname, "ingress")]
    )


def _our_ifbs() -> list[str]:
    return sorted(name for name in os.listdir("/sys/class/net") if name.startswith(netshape.plan.IFB_PREFIX))


@pytest.fixture
def bridge_pod(node, pods):
    require_binary("iperf3")
    require_binary("nsenter")
    require_binary("tc")
    pod = pods.run("shaped", containers=[ContainerSpec("app", cpu_millicpu=500)])
    assert pod.ip and pod.netns_path and not pod.host_network
    pid = node.client.container_info(pod.container_id()).pid
    return pod, pid


def _into_pod(node, pod) -> float:
    return pod_goodput_bps(pod.netns_path, pod.ip, into_pod=True)


def _out_of_pod(node, pod) -> float:
    return pod_goodput_bps(pod.netns_path, pod.ip, into_pod=False, node_ip=node.gateway_ip())


def test_shape_cni_pod_both_ways(node, bridge_pod):
    pod, pid = bridge_pod
    veth = netshape.find_host_veth(pid)
    assert os.path.exists(f"/sys/class/net/{node.bridge}/brif/{veth.ifname}"), "not a port of the CNI bridge"
    assert veth.pod_ifname == "eth0"
    key = pod.sandbox_id
    before = _dumps(veth.ifname)

    snap = netshape.shape(veth.ifname, key, ingress_bps=20_000_000, egress_bps=10_000_000)
    assert netshape.check(veth.ifname, key) == netshape.Rates(20_000_000, 10_000_000)
    assert netshape.ifb_name(key) in _our_ifbs()
    goodput_ratios_within(lambda: _into_pod(node, pod), 20_000_000, *TOLERANCE, what="into the pod")
    goodput_ratios_within(lambda: _out_of_pod(node, pod), 10_000_000, *TOLERANCE, what="out of the pod")

    # Re-shape in place, then remove: the CNI's veth is as it was, no IFB of ours is left.
    assert netshape.shape(veth.ifname, key, ingress_bps=5_000_000, snapshot=snap) == snap
    assert netshape.read_rates(veth.ifname, key) == netshape.Rates(5_000_000, 10_000_000)
    netshape.unshape(veth.ifname, key, snap)
    assert _dumps(veth.ifname) == before
    assert netshape.ifb_name(key) not in _our_ifbs()  # (other tests on the node have IFBs of their own)
    assert _into_pod(node, pod) > 100_000_000  # unshaped again


def test_pod_deleted_while_shaped_leaks_nothing(node, bridge_pod):
    pod, pid = bridge_pod
    veth = netshape.find_host_veth(pid)
    snap = netshape.shape(veth.ifname, pod.sandbox_id, ingress_bps=10_000_000, egress_bps=10_000_000)
    assert netshape.ifb_name(pod.sandbox_id) in _our_ifbs()
    pod.delete()
    assert not os.path.exists(f"/sys/class/net/{veth.ifname}")
    with pytest.raises(netshape.NamespaceGone):
        netshape.find_host_veth(pid)
    netshape.unshape(veth.ifname, pod.sandbox_id, snap)
    assert netshape.ifb_name(pod.sandbox_id) not in _our_ifbs()


def test_host_network_pod_is_refused(node, pods):
    pod = pods.run("hostnet", containers=[ContainerSpec("app", cpu_millicpu=100)], host_network=True)
    pid = node.client.container_info(pod.container_id()).pid
    with pytest.raises(netshape.HostNetwork, match="shaping it would limit the whole node"):
        netshape.find_host_veth(pid)
