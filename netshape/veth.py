"""Find a pod's host-side veth from the pod's process."""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

from netshape import _nl
from netshape.errors import HostNetwork, NamespaceGone, NotVeth, SeveralVeths


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

    From the host side first, with no capability but a netlink socket: the kernel's id for the
    pod's network namespace as seen from ours (RTM_GETNSID by pid, as ``ip netns identify`` asks
    it), then the host veth whose peer lives there (its IFLA_LINK_NETNSID). No setns, no opening
    ``/proc/PID/ns/net``: the agent needs neither CAP_SYS_ADMIN nor CAP_SYS_PTRACE for it.

    A pod with several veths (Multus) is refused there with ``SeveralVeths`` naming them.

    Otherwise (``pod_ifname`` or ``host_netns`` given, a namespace the
    kernel has no id for, as the host's own): enters the pod's network namespace through
    ``proc_root/PID/ns/net`` (pyroute2 forks a helper for that; CAP_SYS_ADMIN, and CAP_SYS_PTRACE
    for another user's process), reads the pod interface's peer index and looks it up in the host
    namespace (``host_netns``: a netns path or name, None = our own). ``pod_ifname`` picks the pod
    interface; by default eth0, else the pod's only veth.
    """
    netns_path = os.path.join(proc_root, str(pid), "ns", "net")
    if host_netns is None and pod_ifname is None:
        found = _from_host_side(pid, proc_root, netns_path)
        if found is not None:
            return found
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


RTM_GETNSID = 90
NETNSA_NSID = 1
NETNSA_PID = 2
NLMSG_ERROR = 2
NLM_F_REQUEST = 1


def peer_nsid(pid: int) -> int:
    """The id our network namespace gives the one of ``pid`` (-1: none assigned, as for our own).

    ``ip netns identify``'s question, by pid: RTM_GETNSID with NETNSA_PID. The kernel answers it
    for any process it can find by pid, with no capability and no ptrace check. ProcessLookupError
    when there is no such process."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        payload = struct.pack("Bxxx", socket.AF_UNSPEC) + struct.pack("HHI", 8, NETNSA_PID, pid)
        sock.send(struct.pack("IHHII", 16 + len(payload), RTM_GETNSID, NLM_F_REQUEST, 1, 0) + payload)
        data = sock.recv(65536)
    length, kind = struct.unpack_from("IH", data)
    if kind == NLMSG_ERROR:
        (error,) = struct.unpack_from("i", data, 16)
        raise OSError(-error, os.strerror(-error)) if error != -errno.ESRCH else ProcessLookupError(
            errno.ESRCH, f"no process {pid}")
    offset = 20  # nlmsghdr + rtgenmsg (padded)
    while offset + 4 <= length:
        size, attr = struct.unpack_from("HH", data, offset)
        if attr == NETNSA_NSID:
            return struct.unpack_from("i", data, offset + 4)[0]
        offset += (size + 3) & ~3
    return -1


def _from_host_side(pid: int, proc_root: str, netns_path: str) -> HostVeth | None:
    """The host veth whose peer is in ``pid``'s network namespace, found from the host side; None
    when that cannot tell (no id for the namespace, no veth): the caller enters it. Several veths:
    SeveralVeths."""
    try:
        nsid = peer_nsid(pid)
    except ProcessLookupError as err:
        raise NamespaceGone(f"network namespace of pid {pid} is gone: no process {pid}") from err
    except OSError:
        return None
    if nsid < 0:
        return None
    with _nl.session(None) as host:
        msgs = host.ipr.get_links()
    found = []
    for msg in msgs:
        info = msg.get_attr("IFLA_LINKINFO")
        if msg.get_attr("IFLA_LINK_NETNSID") == nsid and info is not None and info.get_attr("IFLA_INFO_KIND") == "veth":
            found.append(msg)
    if len(found) > 1:
        # A pod with a second network (Multus, a sidecar CNI): which veth carries the traffic the
        # user means is not ours to guess, and entering the namespace to ask needs CAP_SYS_ADMIN,
        # which the agent does not have (setns failed with EPERM).
        pairs = ", ".join(
            f"{_pod_side_name(proc_root, pid, m.get_attr('IFLA_LINK')) or 'ifindex ' + str(m.get_attr('IFLA_LINK'))}"
            f" (host side {m.get_attr('IFLA_IFNAME')})"
            for m in sorted(found, key=lambda m: m["index"])
        )
        raise SeveralVeths(
            f"the pod of pid {pid} has {len(found)} veth interfaces: {pairs}; netshape shapes a pod with exactly "
            "one veth (pods on several networks, e.g. Multus, are not supported); nothing was changed"
        )
    if not found:
        return None
    (msg,) = found
    return HostVeth(ifname=msg.get_attr("IFLA_IFNAME"), ifindex=msg["index"],
                    pod_ifname=_pod_side_name(proc_root, pid, msg.get_attr("IFLA_LINK")), netns_path=netns_path)


def _pod_side_name(proc_root: str, pid: int, index: int | None) -> str:
    """The pod-side interface's name by its index, from the pod's own /proc/PID/net files (readable
    without entering the namespace); "" when they do not say."""
    try:
        with open(os.path.join(proc_root, str(pid), "net", "if_inet6")) as f:
            for line in f:  # address, ifindex (hex), prefix length, scope, flags, name
                fields = line.split()
                if len(fields) == 6 and int(fields[1], 16) == index:
                    return fields[5]
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(proc_root, str(pid), "net", "dev_mcast")) as f:
            for line in f:  # ifindex, name, users, global use, address
                fields = line.split()
                if len(fields) >= 2 and fields[0].isdigit() and int(fields[0]) == index:
                    return fields[1]
    except OSError:
        pass
    return ""


def _netns_path(netns: str) -> str:
    return netns if os.path.dirname(netns) else os.path.join("/var/run/netns", netns)


def _describe(links: list[_nl.Link]) -> str:
    return ", ".join(f"{link.ifname} ({link.kind or 'device'})" for link in links) or "no interface but lo"
