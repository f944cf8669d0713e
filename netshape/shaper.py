"""Shape, re-shape, check and unshape a pod's host-side veth.

Traffic into the pod: our qdisc at the root of the host veth. Traffic out of the pod: a u32
match-all filter on the veth's ingress hook redirects to our IFB, shaped at its root. Each
direction's queue is bounded by a latency budget: TBF's own limit, or under the HTB class a
splitter TBF (handle ``OUR_LEAF_HANDLE``) that bounds the queue and splits GSO packets. Everything
we create is recognisable without stored state: qdisc handle major ``OUR_MAJOR`` at the root (the
leaf goes with it), the IFB's name from ``ifb_name(target_key)``, the filter by where it
redirects to.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

from netshape import _nl
from netshape.errors import DeviceMissing, ShapeError
from netshape.plan import (
    IFB_PREFIX,
    IFNAMSIZ_MAX,
    OUR_CLASS_ID,
    OUR_FILTER_PREF,
    OUR_LEAF_HANDLE,
    OUR_ROOT_HANDLE,
    DirectionPlan,
    QueueInfo,
    Rates,
    fifo_limit,
    htb_class_options,
    htb_class_rate_bytes,
    htb_qdisc_options,
    ifb_name,
    plan_rates,
    splitter_options,
    tbf_limit_bytes,
    tbf_options,
    tbf_rate_bytes,
)
from netshape.snapshot import TC_H_INGRESS, TC_H_ROOT, Snapshot, TcObject, fmt_handle, record_root

log = logging.getLogger(__name__)

INGRESS_HANDLE = 0xFFFF0000
IFB_TXQLEN = 1000

# Makes (ingress, egress) plans for the veth's MTU.
Planner = Callable[[int], "tuple[DirectionPlan | None, DirectionPlan | None]"]


def shape(
    host_ifname: str,
    target_key: str,
    *,
    ingress_bps: int | None = None,
    egress_bps: int | None = None,
    qdisc: str = "htb",
    burst_bytes: int | None = None,
    snapshot: Snapshot | None = None,
    latency_s: float | None = None,
    netns: str | None = None,
) -> Snapshot:
    """Limit traffic into the pod (``ingress_bps``) and/or out of it (``egress_bps``).

    A direction left None is left as it is. Where our limit is already in place its rate and
    queue are changed in place. Pass the snapshot an earlier call returned as ``snapshot``: it is
    kept (the state before the first call is what ``unshape`` must restore) and extended by any
    direction this call takes over; the returned snapshot is the one to persist. ``latency_s``
    bounds each shaped direction's queue to that much time at its rate (None = 50 ms; accepted
    1 ms to 10 s; never fewer than four full frames); ``read_queue`` reads the limits back.
    """
    return _shape(
        host_ifname,
        target_key,
        lambda mtu: plan_rates(
            ingress_bps=ingress_bps,
            egress_bps=egress_bps,
            qdisc=qdisc,
            burst_bytes=burst_bytes,
            mtu_bytes=mtu,
            latency_s=latency_s,
        ),
        snapshot=snapshot,
        netns=netns,
    )


def _shape(
    host_ifname: str, target_key: str, planner: Planner, *, snapshot: Snapshot | None, netns: str | None
) -> Snapshot:
    """``shape`` with the plans made by ``planner(veth MTU)``; the latency benchmark passes
    ``plan_rates(..., legacy=True)`` here for its baseline."""
    ingress_plan, egress_plan = None, None
    with _nl.session(netns) as s:
        veth = s.link(host_ifname)
        if veth is None:
            raise DeviceMissing(f"host device {host_ifname} does not exist in {s.where}")
        ingress_plan, egress_plan = planner(veth.mtu)
        before = _applicable(snapshot, host_ifname, target_key)
        snap = before
        root_was_ours = False
        ifb_existed = s.link(ifb_name(target_key)) is not None
        try:
            if ingress_plan is not None:
                objects = _root_objects(s, veth.index)
                root = _root(objects)
                root_was_ours = root is not None and root.handle == OUR_ROOT_HANDLE
                if not snap.root_taken:
                    # Ours already there but no snapshot handed in: what was before is unknown,
                    # and the kernel's default is the best we can restore.
                    saved = None if root_was_ours else record_root(veth.ifname, objects)
                    snap = dataclasses.replace(snap, root_taken=True, root_before=saved)
                _install(s, veth, ingress_plan, root)
            if egress_plan is not None:
                if not snap.ingress_taken:
                    created = _ingress_qdisc(s.qdiscs(veth.index)) is None
                    snap = dataclasses.replace(snap, ingress_taken=True, ingress_qdisc_created=created)
                _shape_egress(s, veth, ifb_name(target_key), egress_plan)
        except ShapeError:
            # Take back what this call set up; leave what earlier calls did.
            try:
                _unshape(
                    s,
                    host_ifname,
                    target_key,
                    snap,
                    root=ingress_plan is not None and not before.root_taken and not root_was_ours,
                    ingress=egress_plan is not None and not before.ingress_taken and not ifb_existed,
                    delete_ifb=not ifb_existed,
                )
            except ShapeError:
                log.exception("undoing a failed shape of %s", host_ifname)
            raise
    return snap


def unshape(host_ifname: str, target_key: str, snapshot: Snapshot, *, netns: str | None = None) -> None:
    """Put the veth back as the snapshot recorded and delete our IFB. Idempotent.

    Whatever is recognisably ours goes, also where the snapshot does not record taking it (an
    agent that lost its state passes ``Snapshot(host_ifname, target_key)``: our root qdisc then
    gives way to the kernel's default). A missing veth (the pod was deleted) counts as already
    restored; our IFB is deleted anyway. Qdiscs and filters that are not ours are never touched.
    """
    with _nl.session(netns) as s:
        _unshape(s, host_ifname, target_key, _applicable(snapshot, host_ifname, target_key))


def read_rates(host_ifname: str, target_key: str, *, netns: str | None = None) -> Rates:
    """The rates of our qdiscs as the kernel holds them (None = no qdisc of ours there)."""
    with _nl.session(netns) as s:
        veth = s.link(host_ifname)
        if veth is None:
            raise DeviceMissing(f"host device {host_ifname} does not exist in {s.where}")
        ifb = s.link(ifb_name(target_key))
        return Rates(
            ingress_bps=_our_rate_bps(s, veth.index),
            egress_bps=_our_rate_bps(s, ifb.index) if ifb is not None else None,
        )


def read_queue(host_ifname: str, target_key: str, *, netns: str | None = None) -> QueueInfo:
    """The queue limits of our shaping as the kernel holds them (None = no qdisc of ours there).

    Ingress: the veth's root; egress: our IFB's. A TBF root's own limit, or the queue under our
    HTB class (our splitter, or the kernel's default pfifo, counted in packets).
    """
    with _nl.session(netns) as s:
        veth = s.link(host_ifname)
        if veth is None:
            raise DeviceMissing(f"host device {host_ifname} does not exist in {s.where}")
        ifb = s.link(ifb_name(target_key))
        ingress_bytes, ingress_packets = _our_queue(s, veth.index)
        egress_bytes, egress_packets = _our_queue(s, ifb.index) if ifb is not None else (None, None)
        return QueueInfo(
            ingress_limit_bytes=ingress_bytes,
            egress_limit_bytes=egress_bytes,
            ingress_limit_packets=ingress_packets,
            egress_limit_packets=egress_packets,
            mtu_bytes=veth.mtu,
        )


def check(host_ifname: str, target_key: str, *, netns: str | None = None) -> Rates:
    """Drift detection: the rates of our shaping that is fully in place, per direction.

    Ingress counts when our qdisc is the veth's root; egress when the ingress hook still
    redirects to our IFB, the IFB is up and our qdisc is its root. A direction that someone
    or something undid reads None; a missing veth reads Rates(None, None). Compare with what
    was applied (``kernel_bps`` of the requested rates).
    """
    with _nl.session(netns) as s:
        veth = s.link(host_ifname)
        if veth is None:
            return Rates()
        ingress = _our_rate_bps(s, veth.index)
        egress = None
        ifb = s.link(ifb_name(target_key))
        if ifb is not None and ifb.up and _our_filters(s, veth.index, ifb.index, s.links()):
            egress = _our_rate_bps(s, ifb.index)
        return Rates(ingress_bps=ingress, egress_bps=egress)


def sweep_orphans(active_target_keys: Iterable[str] = (), *, netns: str | None = None) -> list[str]:
    """Delete IFB devices of ours that no filter redirects to and no active target owns.

    They are left behind when a pod went away and ``unshape`` was never called for it (an agent
    that crashed or lost its state). Devices without our prefix, or not IFBs, are never touched.
    Returns the names deleted.
    """
    keep = {ifb_name(key) for key in active_target_keys}
    deleted = []
    with _nl.session(netns) as s:
        links = s.links()
        ours = [link for link in links if link.kind == "ifb" and _is_our_ifb_name(link.ifname)]
        if not ours:
            return []
        redirected = set()
        for link in links:
            if link.kind != "ifb":
                redirected.update(f.redirect_ifindex for f in _ingress_filters(s, link.index))
        for ifb in ours:
            if ifb.ifname not in keep and ifb.index not in redirected:
                s.delete_link(ifb)
                deleted.append(ifb.ifname)
    return deleted


def _is_our_ifb_name(ifname: str) -> bool:
    suffix = ifname[len(IFB_PREFIX) :]
    return (
        ifname.startswith(IFB_PREFIX)
        and len(ifname) == IFNAMSIZ_MAX
        and all(c in "0123456789abcdef" for c in suffix)
    )


# --- the steps ---------------------------------------------------------------------------------


def _applicable(snapshot: Snapshot | None, host_ifname: str, target_key: str) -> Snapshot:
    """The snapshot if it describes this device and target, else an empty one.

    A snapshot of another device (the pod's sandbox was re-created with a new veth) says
    nothing about this one: restoring its qdisc here would be wrong.
    """
    fresh = Snapshot(host_ifname=host_ifname, target_key=target_key)
    if snapshot is None:
        return fresh
    if (snapshot.host_ifname, snapshot.target_key) != (host_ifname, target_key):
        log.warning(
            "snapshot of %s/%s does not describe %s/%s; not using it",
            snapshot.host_ifname,
            snapshot.target_key,
            host_ifname,
            target_key,
        )
        return fresh
    return snapshot


def _root(objects: list[TcObject]) -> TcObject | None:
    return next((o for o in objects if o.what == "qdisc" and o.parent == TC_H_ROOT), None)


def _send_rate(s: _nl.Session, dev: _nl.Link, plan: DirectionPlan, op: int, doing: str) -> None:
    """Send the rate-carrying object: the HTB class under our root, or our TBF root itself."""
    if plan.kind == "htb":
        # tc class add|change dev DEV parent 6b63: classid 6b63:1 htb rate R ceil R burst B cburst B
        s.send_class(f"{doing} the htb class on {dev.ifname}", op, index=dev.index, classid=OUR_CLASS_ID,
                     parent=OUR_ROOT_HANDLE, kind="htb", options=htb_class_options(plan))
    else:
        # tc qdisc replace|change dev DEV root handle 6b63: tbf rate R burst B limit L
        s.send_qdisc(f"{doing} tbf at the root of {dev.ifname}", op, index=dev.index, handle=OUR_ROOT_HANDLE,
                     parent=TC_H_ROOT, kind="tbf", options=tbf_options(plan))


def _install(s: _nl.Session, dev: _nl.Link, plan: DirectionPlan, current_root: TcObject | None) -> None:
    """Put our qdisc at the root of ``dev``, or change its rate and queue in place when it is ours already."""
    ours = current_root is not None and current_root.handle == OUR_ROOT_HANDLE
    if ours and current_root.kind == plan.kind:
        _send_rate(s, dev, plan, _nl.CHANGE, "changing")
        if plan.kind == "htb":
            _send_leaf(s, dev, plan)
        return
    if ours:
        # Another kind of ours: the kernel cannot change a qdisc's kind in place.
        s.delete_qdisc(f"deleting our {current_root.kind} on {dev.ifname}", index=dev.index, parent=TC_H_ROOT)
    if plan.kind == "htb":
        # tc qdisc replace dev DEV root handle 6b63: htb default 1
        s.send_qdisc(f"adding htb at the root of {dev.ifname}", _nl.REPLACE, index=dev.index,
                     handle=OUR_ROOT_HANDLE, parent=TC_H_ROOT, kind="htb",
                     options=htb_qdisc_options(OUR_CLASS_ID & 0xFFFF))
        _send_rate(s, dev, plan, _nl.CREATE, "adding")
        _send_leaf(s, dev, plan)
    else:
        _send_rate(s, dev, plan, _nl.REPLACE, "adding")


def _send_leaf(s: _nl.Session, dev: _nl.Link, plan: DirectionPlan) -> None:
    """Give our HTB class its bounded queue: the splitter TBF, added or changed in place.

    Without it the class gets the kernel's default, a pfifo of txqueuelen (1000) packets, and
    replacing that default is what this does to a class shaped before queues were sized.
    """
    if plan.limit_bytes is None:
        return  # the legacy plan: the kernel's default leaf
    leaf = next((q for q in s.qdiscs(dev.index) if q.parent == OUR_CLASS_ID and q.handle == OUR_LEAF_HANDLE), None)
    if leaf is not None and leaf.kind != "tbf":
        s.delete_qdisc(f"deleting our {leaf.kind} under the htb class on {dev.ifname}", index=dev.index,
                       parent=OUR_CLASS_ID, handle=OUR_LEAF_HANDLE)  # fmt: skip
    # tc qdisc replace dev DEV parent 6b63:1 handle 6b64: tbf rate 500Tbit burst S peakrate 1Pbit mtu S limit L
    s.send_qdisc(f"{'changing' if leaf is not None else 'adding'} the queue of the htb class on {dev.ifname}",
                 _nl.REPLACE, index=dev.index, handle=OUR_LEAF_HANDLE, parent=OUR_CLASS_ID, kind="tbf",
                 options=splitter_options(plan))  # fmt: skip


def _root_objects(s: _nl.Session, index: int) -> list[TcObject]:
    qdiscs = s.qdiscs(index)
    root = _root(qdiscs)
    if root is None or root.handle == 0:
        return qdiscs
    return qdiscs + s.classes(index) + s.filters(index, root.handle)


def _ingress_qdisc(qdiscs: list[TcObject]) -> TcObject | None:
    return next((q for q in qdiscs if q.parent == TC_H_INGRESS), None)


def _ingress_filters(s: _nl.Session, veth_index: int) -> list[TcObject]:
    ingress = _ingress_qdisc(s.qdiscs(veth_index))
    if ingress is None or ingress.kind not in _nl.INGRESS_FILTER_PARENT:
        return []
    return s.filters(veth_index, _nl.INGRESS_FILTER_PARENT[ingress.kind])


def _our_filters(s: _nl.Session, veth_index: int, ifb_index: int | None, links: list[_nl.Link]) -> list[TcObject]:
    """Our redirect filters on the veth's ingress hook: they redirect to our IFB or, when it
    is gone, to no device at all, at our preference."""
    existing = {link.index for link in links}
    found = []
    for f in _ingress_filters(s, veth_index):
        if f.redirect_ifindex is None or f.info >> 16 != OUR_FILTER_PREF:
            continue
        if f.redirect_ifindex == ifb_index or (ifb_index is None and f.redirect_ifindex not in existing):
            found.append(f)
    return found


def _shape_egress(s: _nl.Session, veth: _nl.Link, ifb_ifname: str, plan: DirectionPlan) -> None:
    ifb = s.link(ifb_ifname)
    if ifb is not None and ifb.kind != "ifb":
        raise ShapeError(f"device {ifb_ifname} exists in {s.where} but is a {ifb.kind}, not an ifb; not touching it")
    if ifb is None:
        ifb = s.add_ifb(ifb_ifname, mtu=veth.mtu, txqlen=IFB_TXQLEN)
    elif not ifb.up:
        s.set_up(ifb)
    _install(s, ifb, plan, _root(s.qdiscs(ifb.index)))

    ingress = _ingress_qdisc(s.qdiscs(veth.index))
    if ingress is not None and ingress.kind not in _nl.INGRESS_FILTER_PARENT:
        raise ShapeError(f"{veth.ifname} has an ingress-side qdisc {ingress.kind} netshape cannot add a filter to")
    if ingress is None:
        # tc qdisc add dev VETH ingress
        s.send_qdisc(
            f"adding an ingress qdisc to {veth.ifname}",
            _nl.CREATE,
            index=veth.index,
            handle=INGRESS_HANDLE,
            parent=TC_H_INGRESS,
            kind="ingress",
            options=None,
        )
    if not _our_filters(s, veth.index, ifb.index, s.links()):
        s.add_redirect_filter(
            f"adding the redirect from {veth.ifname} to {ifb.ifname}",
            index=veth.index,
            parent=_nl.INGRESS_FILTER_PARENT[ingress.kind if ingress is not None else "ingress"],
            pref=OUR_FILTER_PREF,
            to_index=ifb.index,
            classid=OUR_CLASS_ID,
        )


def _unshape(
    s: _nl.Session,
    host_ifname: str,
    target_key: str,
    snapshot: Snapshot,
    *,
    root: bool = True,
    ingress: bool = True,
    delete_ifb: bool = True,
) -> None:
    """Remove what is recognisably ours (``root``/``ingress`` pick the directions), putting
    back what the snapshot recorded."""
    veth = s.link(host_ifname)
    ifb = s.link(ifb_name(target_key))
    if ifb is not None and ifb.kind != "ifb":
        ifb = None
    if veth is not None and ingress:
        _delete_our_filters(s, veth, ifb)
        hook = _ingress_qdisc(s.qdiscs(veth.index))
        if (
            snapshot.ingress_qdisc_created
            and hook is not None
            and hook.kind == "ingress"
            and not _ingress_filters(s, veth.index)
        ):
            s.delete_qdisc(f"deleting the ingress qdisc of {veth.ifname}", index=veth.index, parent=TC_H_INGRESS)
    if veth is not None and root:
        current = _root(s.qdiscs(veth.index))
        if current is not None and current.handle == OUR_ROOT_HANDLE:
            saved = snapshot.root_before
            if saved is not None and saved.handle == OUR_LEAF_HANDLE:
                # Theirs had the handle of our leaf, which must go before theirs can come back.
                s.delete_qdisc(f"deleting our qdisc at the root of {veth.ifname}", index=veth.index, parent=TC_H_ROOT)
            if saved is None:
                s.delete_qdisc(f"deleting our qdisc at the root of {veth.ifname}", index=veth.index, parent=TC_H_ROOT)
            else:
                # Swap ours for theirs in one request, with the options the kernel dumped.
                s.send_qdisc(
                    f"restoring {saved.kind} {fmt_handle(saved.handle)} at the root of {veth.ifname}",
                    _nl.REPLACE,
                    index=veth.index,
                    handle=saved.handle,
                    parent=TC_H_ROOT,
                    kind=saved.kind,
                    options=saved.options if saved.options_hex else None,
                )
        elif (
            snapshot.root_taken
            and current is not None
            and current.handle != 0
            and not (
                snapshot.root_before is not None
                and (current.kind, current.handle) == (snapshot.root_before.kind, snapshot.root_before.handle)
            )
        ):
            log.warning(
                "root qdisc of %s is %s %s, not ours: someone replaced it; leaving it alone",
                veth.ifname,
                current.kind,
                fmt_handle(current.handle),
            )
    if ifb is not None and delete_ifb:
        s.delete_link(ifb)


def _delete_our_filters(s: _nl.Session, veth: _nl.Link, ifb: _nl.Link | None) -> None:
    ours = _our_filters(s, veth.index, ifb.index if ifb else None, s.links())
    if not ours:
        return
    at_our_pref = [
        f
        for f in _ingress_filters(s, veth.index)
        if f.info >> 16 == OUR_FILTER_PREF and f.handle & 0xFFF  # not the u32 hash-table headers
    ]
    if len(at_our_pref) == len(ours):
        # Delete the whole u32 instance at our preference: deleting only the filter would leave
        # an empty one behind ("fh 801: ht divisor 1") whenever another u32 instance shares the
        # hook, because u32 keeps its hash tables while any instance of the block has filters.
        s.delete_filter(
            f"deleting our redirect filter on {veth.ifname}", dataclasses.replace(ours[0], handle=0), index=veth.index
        )
        return
    for f in ours:
        s.delete_filter(f"deleting our redirect filter on {veth.ifname}", f, index=veth.index)


def _our_rate_bps(s: _nl.Session, index: int) -> int | None:
    root = _root(s.qdiscs(index))
    if root is None or root.handle != OUR_ROOT_HANDLE:
        return None
    if root.kind == "tbf":
        rate = tbf_rate_bytes(root.options)
    elif root.kind == "htb":
        cls = next((c for c in s.classes(index) if c.handle == OUR_CLASS_ID), None)
        rate = htb_class_rate_bytes(cls.options) if cls is not None else None
    else:
        rate = None
    return None if rate is None else rate * 8


def _our_queue(s: _nl.Session, index: int) -> tuple[int | None, int | None]:
    """(limit in bytes, limit in packets) of the queue of our qdisc on the device."""
    qdiscs = s.qdiscs(index, invisible=True)
    root = _root(qdiscs)
    if root is None or root.handle != OUR_ROOT_HANDLE:
        return None, None
    if root.kind == "tbf":
        return tbf_limit_bytes(root.options), None
    leaf = next((q for q in qdiscs if q.parent == OUR_CLASS_ID), None)
    if leaf is None:
        return None, None
    if leaf.kind == "tbf":
        return tbf_limit_bytes(leaf.options), None
    if leaf.kind == "bfifo":
        return fifo_limit(leaf.options), None
    if leaf.kind in ("pfifo", "pfifo_head_drop"):
        return None, fifo_limit(leaf.options)
    return None, None
