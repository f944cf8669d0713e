"""The thin netlink layer: one pyroute2 IPRoute per operation, raw tc dumps, raw tc requests.

Options are sent and read as raw attribute bytes (computed by ``netshape.plan``, or dumped by the
kernel for a restore), so what we restore is exactly what the kernel reported.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    nlmsg,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELQDISC,
    RTM_DELTFILTER,
    RTM_GETQDISC,
    RTM_NEWQDISC,
    RTM_NEWTCLASS,
)

from netshape.errors import NamespaceGone, NetlinkFailed
from netshape.plan import parse_attrs
from netshape.snapshot import TcObject

ETH_P_ALL = 0x0003
# Filters on the ingress hook hang off ffff: on an "ingress" qdisc (what tc and the CNI plugin
# use) and off ffff:fff2 on a "clsact". The kernel accepts either for both, but tc then prints the
# parent last used, so we use each qdisc's usual one to leave the dumps as they were.
INGRESS_FILTER_PARENT = {"ingress": 0xFFFF0000, "clsact": 0xFFFFFFF2}

CREATE = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
REPLACE = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
CHANGE = NLM_F_REQUEST | NLM_F_ACK
NLMSG_HEADER_BYTES = 16
TCMSG_HEADER_BYTES = 20
TCA_KIND, TCA_OPTIONS, TCA_DUMP_INVISIBLE = 1, 2, 10


class _rawtcmsg(nlmsg):
    """A tcmsg whose options travel as raw bytes, exactly as given."""

    fields = (
        ("family", "B"),
        ("pad1", "B"),
        ("pad2", "H"),
        ("index", "i"),
        ("handle", "I"),
        ("parent", "I"),
        ("info", "I"),
    )
    nla_map = (
        (TCA_KIND, "TCA_KIND", "asciiz"),
        (TCA_OPTIONS, "TCA_OPTIONS", "cdata"),
        (TCA_DUMP_INVISIBLE, "TCA_DUMP_INVISIBLE", "flag"),
    )


@dataclass(frozen=True)
class Link:
    index: int
    ifname: str
    kind: str | None
    mtu: int
    txqlen: int
    up: bool
    peer_index: int | None


def _raw(msg) -> bytes:
    return bytes(msg.data[msg.offset : msg.offset + msg.length])


def _attrs(msg) -> dict[int, bytes]:
    return parse_attrs(_raw(msg)[NLMSG_HEADER_BYTES + TCMSG_HEADER_BYTES :])


def _link(msg) -> Link:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    return Link(
        index=msg["index"],
        ifname=msg.get_attr("IFLA_IFNAME"),
        kind=kind,
        mtu=msg.get_attr("IFLA_MTU") or 1500,
        txqlen=msg.get_attr("IFLA_TXQLEN") or 0,
        up=bool(msg["flags"] & 1),
        peer_index=msg.get_attr("IFLA_LINK"),
    )


class Session:
    """Netlink requests in one network namespace (None = the caller's)."""

    def __init__(self, ipr: IPRoute, where: str):
        self.ipr = ipr
        self.where = where

    def _call(self, what: str, func, *args, **kwargs):
        try:
            return func(*args, **kwargs)
        except NetlinkError as err:
            raise NetlinkFailed(f"{what} in {self.where}", err) from err

    # --- links -------------------------------------------------------------------------------

    def links(self) -> list[Link]:
        return [_link(m) for m in self._call("listing links", self.ipr.get_links)]

    def link(self, ifname: str) -> Link | None:
        try:
            msgs = self.ipr.get_links(ifname=ifname)
        except NetlinkError as err:
            if err.code == 19:  # ENODEV
                return None
            raise NetlinkFailed(f"looking up {ifname} in {self.where}", err) from err
        return _link(msgs[0]) if msgs else None

    def link_by_index(self, index: int) -> Link | None:
        try:
            msgs = self.ipr.get_links(index)
        except NetlinkError as err:
            if err.code == 19:
                return None
            raise NetlinkFailed(f"looking up ifindex {index} in {self.where}", err) from err
        return _link(msgs[0]) if msgs else None

    def add_ifb(self, ifname: str, *, mtu: int, txqlen: int) -> Link:
        self._call(f"creating ifb {ifname}", self.ipr.link, "add", ifname=ifname, kind="ifb", mtu=mtu, txqlen=txqlen)
        link = self.link(ifname)
        assert link is not None
        self.set_up(link)
        return link

    def set_up(self, link: Link) -> None:
        self._call(f"setting {link.ifname} up", self.ipr.link, "set", index=link.index, state="up")

    def delete_link(self, link: Link) -> None:
        try:
            self.ipr.link("del", index=link.index)
        except NetlinkError as err:
            if err.code != 19:  # gone meanwhile: that is what we wanted
                raise NetlinkFailed(f"deleting {link.ifname} in {self.where}", err) from err

    # --- tc dumps ----------------------------------------------------------------------------

    def qdiscs(self, index: int, *, invisible: bool = False) -> list[TcObject]:
        """The device's qdiscs; ``invisible`` also the defaults the kernel made itself (the pfifo
        under an HTB class that was given no qdisc, the bfifo inside a TBF), as `tc ... invisible`."""
        if invisible:
            msg = _rawtcmsg()
            msg["family"] = socket.AF_UNSPEC
            msg["index"] = index
            msg["attrs"] = [["TCA_DUMP_INVISIBLE", True]]
            msgs = self._call("dumping qdiscs", self.ipr.nlm_request, msg, RTM_GETQDISC, NLM_F_REQUEST | NLM_F_DUMP)
        else:
            msgs = self._call("dumping qdiscs", self.ipr.get_qdiscs, index)
        return [self._tc_object("qdisc", m) for m in msgs if m["index"] == index]

    def classes(self, index: int) -> list[TcObject]:
        return [self._tc_object("class", m) for m in self._call("dumping classes", self.ipr.get_classes, index)]

    def filters(self, index: int, parent: int) -> list[TcObject]:
        msgs = self._call("dumping filters", self.ipr.get_filters, index=index, parent=parent)
        return [self._tc_object("filter", m) for m in msgs]

    @staticmethod
    def _tc_object(what: str, msg) -> TcObject:
        attrs = _attrs(msg)
        kind = attrs.get(TCA_KIND, b"").rstrip(b"\0").decode()
        return TcObject(
            what=what,
            kind=kind,
            handle=msg["handle"],
            parent=msg["parent"],
            info=msg["info"],
            options=attrs.get(TCA_OPTIONS, b""),
            redirect_ifindex=_redirect_target(msg) if what == "filter" and kind == "u32" else None,
        )

    # --- tc requests -------------------------------------------------------------------------

    def send_qdisc(self, what: str, flags: int, *, index, handle, parent, kind, options: bytes | None) -> None:
        self._send(what, RTM_NEWQDISC, flags, index, handle, parent, 0, kind, options)

    def send_class(self, what: str, flags: int, *, index, classid, parent, kind, options: bytes) -> None:
        self._send(what, RTM_NEWTCLASS, flags, index, classid, parent, 0, kind, options)

    def delete_qdisc(self, what: str, *, index: int, parent: int, handle: int = 0) -> None:
        self._send(what, RTM_DELQDISC, CHANGE, index, handle, parent, 0, None, None)

    def delete_filter(self, what: str, filt: TcObject, *, index: int) -> None:
        self._send(what, RTM_DELTFILTER, CHANGE, index, filt.handle, filt.parent, filt.info, filt.kind, None)

    def add_redirect_filter(
        self, what: str, *, index: int, parent: int, pref: int, to_index: int, classid: int
    ) -> None:
        # tc filter add dev VETH parent ffff:fff2 pref 1 protocol all u32 match u32 0 0 \
        #    action mirred egress redirect dev IFB
        self._call(
            f"{what} in {self.where}",
            self.ipr.tc,
            "add-filter",
            "u32",
            index,
            parent=parent,
            prio=pref,
            protocol=ETH_P_ALL,
            target=classid,
            keys=["0x0/0x0+0"],
            action=dict(kind="mirred", direction="egress", action="redirect", ifindex=to_index),
        )

    def _send(self, what, msg_type, flags, index, handle, parent, info, kind, options) -> None:
        msg = _rawtcmsg()
        msg["family"] = socket.AF_UNSPEC
        msg["index"] = index
        msg["handle"] = handle
        msg["parent"] = parent
        msg["info"] = info
        msg["attrs"] = []
        if kind is not None:
            msg["attrs"].append(["TCA_KIND", kind])
        if options is not None:
            msg["attrs"].append(["TCA_OPTIONS", options])
        self._call(f"{what} in {self.where}", self.ipr.nlm_request, msg, msg_type, flags)


def _redirect_target(msg) -> int | None:
    """The ifindex a dumped u32 filter's mirred action redirects to (egress redirect), if any."""
    opts = msg.get_attr("TCA_OPTIONS")
    acts = opts.get_attr("TCA_U32_ACT") if opts is not None else None
    if acts is None:
        return None
    for _name, act in acts.get("attrs", []):
        if not hasattr(act, "get_attr") or act.get_attr("TCA_ACT_KIND") != "mirred":
            continue
        act_opts = act.get_attr("TCA_ACT_OPTIONS")
        parms = act_opts.get_attr("TCA_MIRRED_PARMS") if act_opts is not None else None
        if parms is not None and parms["eaction"] == 1:  # TCA_EGRESS_REDIR
            return parms["ifindex"]
    return None


@contextmanager
def session(netns: str | None = None) -> Iterator[Session]:
    """An IPRoute in ``netns`` (a path or a name under /var/run/netns), or in our own namespace.

    pyroute2 forks a helper that enters the namespace and hands back the socket, so this thread
    never calls setns(). flags=0: never create a namespace that is not there.
    """
    where = netns or "the host namespace"
    try:
        ipr = IPRoute() if netns is None else IPRoute(netns=netns, flags=0)
    except (FileNotFoundError, ProcessLookupError) as err:
        raise NamespaceGone(f"network namespace {netns} is gone: {err}") from err
    except OSError as err:
        raise NetlinkFailed(f"opening a netlink socket in {where}", err) from err
    # pyroute2 0.9.7's synchronous IPRoute never sets this status key, and nlm_request reads it.
    ipr.status["nlm_generator"] = False
    try:
        yield Session(ipr, where)
    finally:
        ipr.close()
