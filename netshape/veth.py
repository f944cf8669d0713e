"""Find a pod's host-side veth from the pod's process."""

from __future__ import annotations

import os
from dataclasses import dataclass

from netshape import _nl
from netshape.errors import HostNetwork, NamespaceGone, NotVeth


@dataclass(frozen=True)
class HostVeth:
    """The host end of a pod's veth pair."""

    ifname: str
    ifindex: int
    pod_ifname: str
    netns_path: str


def _ns_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def find_host_veth(
    pid: int, proc_root: str = "/proc", *, host_netns: str | None = None, pod_ifname: str | None = None
) -> HostVeth:
    """The host-side veth of the pod whose process is ``pid``.

    Enters the pod's network namespace through ``proc_root/PID/ns/net`` (pyroute2 forks a helper
    for that), reads the pod interface's peer index and looks it up in the host namespace
    (``host_netns``: a netns path or name, None = our own). ``pod_ifname`` picks the pod
    interface; by default eth0, else the pod's only veth.
    """
    netns_path = os.path.join(proc_root, str(pid), "ns", "net")
    try:
        pod_ns = _ns_id(netns_path)
    except FileNotFoundError as err:
        raise NamespaceGone(f"network namespace of pid {pid} is gone: {netns_path} does not exist") from err
    host_ns_path = "/proc/self/ns/net" if host_netns is None else _netns_path(host_netns)
    if pod_ns == _ns_id(host_ns_path):
        raise HostNetwork(
            f"pid {pid} runs in the host network namespace ({netns_path}); shaping it would limit the "
            "whole node, so netshape refuses host-network pods"
        )
    with _nl.session(netns_path) as pod:
        links = [link for link in pod.links() if link.ifname != "lo"]
    veths = [link for link in links if link.kind == "veth"]
    if pod_ifname is not None:
        chosen = next((link for link in links if link.ifname == pod_ifname), None)
        if chosen is None:
            raise NotVeth(f"pod of pid {pid} has no interface {pod_ifname}; it has: {_describe(links)}")
        if chosen.kind != "veth":
            raise NotVeth(f"pod interface {pod_ifname} of pid {pid} is a {chosen.kind or 'device'}, not a veth")
    else:
        named = [link for link in veths if link.ifname == "eth0"]
        if named or len(veths) == 1:
            chosen = (named or veths)[0]
        elif not veths:
            raise NotVeth(
                f"pod of pid {pid} has no veth interface (it has: {_describe(links)}); netshape shapes the "
                "host end of a veth pair, not ipvlan or macvlan"
            )
        else:
            raise NotVeth(f"pod of pid {pid} has several veths and no eth0: {_describe(veths)}; name one")
    if chosen.peer_index is None:
        raise NotVeth(f"pod interface {chosen.ifname} of pid {pid} reports no peer index")
    with _nl.session(host_netns) as host:
        peer = host.link_by_index(chosen.peer_index)
        where = host.where
    if peer is None or peer.kind != "veth" or peer.peer_index != chosen.index:
        raise NotVeth(
            f"the peer of pod interface {chosen.ifname} (pid {pid}, peer ifindex {chosen.peer_index}) is not a "
            f"veth pointing back at it in {where}"
            + (f" (ifindex {chosen.peer_index} there is {peer.ifname}, a {peer.kind})" if peer else "")
        )
    return HostVeth(ifname=peer.ifname, ifindex=peer.index, pod_ifname=chosen.ifname, netns_path=netns_path)


def _netns_path(netns: str) -> str:
    return netns if os.path.dirname(netns) else os.path.join("/var/run/netns", netns)


def _describe(links: list[_nl.Link]) -> str:
    return ", ".join(f"{link.ifname} ({link.kind or 'device'})" for link in links) or "no interface but lo"
