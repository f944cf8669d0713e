"""The engine's view of bandwidth shaping: netshape with the proc root bound, JSON snapshots, engine errors.

The shaping key is the pod sandbox id: a pod has one network namespace and one host veth, so
bandwidth is a property of the pod whichever container the request named.
"""

from __future__ import annotations

from typing import Any

from daemonset.types import (
    DEFAULT_LATENCY_S,
    UNLIMITED,
    ApplyFailed,
    InvalidRequest,
    QueueResult,
    Resource,
    TargetNotFound,
)

_TC_H_INGRESS = 0xFFFFFFF1  # parent of an ingress or clsact qdisc


def _engine_error(err: Exception, what: str) -> Exception:
    from netshape import errors as ne

    if isinstance(err, ne.OutOfRange):
        return InvalidRequest(f"{what}: {err}")
    if isinstance(err, (ne.NamespaceGone, getattr(ne, "DeviceMissing", ne.NamespaceGone))):
        return TargetNotFound(f"{what}: {err}")
    if isinstance(err, ne.HostNetwork):
        return InvalidRequest(f"{what}: {err}")
    return ApplyFailed(f"{what}: {err}")


class NetOps:
    """find the host veth, shape, unshape and read rates back; errors become engine errors."""

    def __init__(self, proc_root: str = "/proc"):
        self.proc_root = proc_root

    def find_host_veth(self, pid: int | None, pod: str = "") -> str:
        """The host veth of the pod whose process is ``pid``; ``pod`` (namespace/name) names it in errors."""
        import netshape
        from netshape import errors as ne

        if pid is None:
            raise TargetNotFound("the container has no process id; cannot find its network namespace")
        try:
            return netshape.find_host_veth(pid, proc_root=self.proc_root).ifname
        except ne.SeveralVeths as e:
            raise InvalidRequest(f"pod {pod or '?'}: {e}") from e
        except ne.ShapeError as e:
            raise _engine_error(e, f"finding the host veth of pid {pid}" + (f" (pod {pod})" if pod else "")) from e

    def shape(self, host_ifname: str, key: str, *, ingress_bps: int | None, egress_bps: int | None,
              snapshot: dict[str, Any] | None = None, latency_s: float = DEFAULT_LATENCY_S) -> dict[str, Any]:
        """Shape; ``snapshot`` is what an earlier call returned (kept: it saw the veth as it was);
        ``latency_s`` bounds each shaped direction's queue."""
        import netshape
        from netshape import errors as ne
        from netshape.snapshot import Snapshot

        try:
            snap = netshape.shape(host_ifname, key, ingress_bps=ingress_bps, egress_bps=egress_bps,
                                  snapshot=Snapshot.from_dict(snapshot) if snapshot else None, latency_s=latency_s)
        except ne.ShapeError as e:
            raise _engine_error(e, f"shaping {host_ifname}") from e
        return snap.to_dict()

    def has_ingress_hook(self, host_ifname: str) -> bool | None:
        """Whether the veth has an ingress (or clsact) qdisc now; None when that cannot be read."""
        from pyroute2 import IPRoute

        try:
            with IPRoute() as ipr:
                index = ipr.link_lookup(ifname=host_ifname)
                if not index:
                    return None
                return any(q.get("parent") == _TC_H_INGRESS for q in ipr.get_qdiscs(index[0]))
        except Exception:  # noqa: BLE001 - only a hint for a crash recovery; unknown is safe
            return None

    def unshape(self, host_ifname: str, key: str, snapshot: dict[str, Any] | None, *,
                ingress_hook_ours: bool = False) -> None:
        """Remove our shaping, putting back what ``snapshot`` saw. Without one (a crash before the
        first shaping returned), ``ingress_hook_ours`` says the veth had no ingress qdisc before:
        one there now with no filters left but ours is ours to remove too."""
        import netshape
        from netshape import errors as ne
        from netshape.snapshot import Snapshot

        snap = (Snapshot.from_dict(snapshot) if snapshot
                else Snapshot(host_ifname=host_ifname, target_key=key, ingress_qdisc_created=ingress_hook_ours))
        try:
            netshape.unshape(host_ifname, key, snap)
        except ne.ShapeError as e:
            raise _engine_error(e, f"removing the shaping of {host_ifname}") from e

    def remove_ifb(self, key: str) -> bool:
        """Delete our IFB device of ``key`` by its name (a pod that is gone: its veth went with it, and a
        veth of the same name may be another pod's by now, so nothing on the veth side is touched)."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        import netshape

        name = netshape.ifb_name(key)
        try:
            with IPRoute() as ipr:
                index = ipr.link_lookup(ifname=name)
                if not index:
                    return False
                ipr.link("del", index=index[0])
                return True
        except NetlinkError as e:
            if e.code == 19:  # ENODEV: removed meanwhile
                return False
            raise ApplyFailed(f"deleting our IFB device {name}: {e}") from e

    def read_rates(self, host_ifname: str, key: str) -> tuple[int, int]:
        """(ingress_bps, egress_bps) fully in force; UNLIMITED where a direction is not shaped (or undone)."""
        import netshape
        from netshape import errors as ne

        try:
            rates = netshape.check(host_ifname, key)
        except ne.ShapeError as e:
            raise _engine_error(e, f"reading the rates of {host_ifname}") from e
        return (
            UNLIMITED if rates.ingress_bps is None else rates.ingress_bps,
            UNLIMITED if rates.egress_bps is None else rates.egress_bps,
        )

    def read_queues(self, host_ifname: str, key: str) -> Any:
        """netshape's QueueInfo: the queue limits of our shaping, as the kernel holds them."""
        import netshape
        from netshape import errors as ne

        try:
            return netshape.read_queue(host_ifname, key)
        except ne.ShapeError as e:
            raise _engine_error(e, f"reading the queues of {host_ifname}") from e

    def sweep_orphans(self, active_keys: set[str]) -> list[str]:
        """Delete IFB devices of ours that nothing redirects to and no active experiment owns."""
        import netshape
        from netshape import errors as ne

        try:
            return netshape.sweep_orphans(active_keys)
        except ne.ShapeError as e:
            raise _engine_error(e, "removing orphaned IFB devices") from e


# --- queues: pure ---------------------------------------------------------------------------------

_QUEUE_FIELDS = {Resource.INGRESS: "ingress", Resource.EGRESS: "egress"}


def queue_results(info: Any, rates: dict[Resource, int], budget_s: float,
                  directions: Any = (Resource.INGRESS, Resource.EGRESS)) -> dict[Resource, QueueResult]:
    """Each direction's queue from a QueueInfo and the rates in force (bit/s; UNLIMITED: not shaped)."""
    out = {}
    for r in directions:
        limit = getattr(info, f"{_QUEUE_FIELDS[r]}_limit_bytes")
        packets = getattr(info, f"{_QUEUE_FIELDS[r]}_limit_packets")
        rate = rates.get(r, UNLIMITED)
        if limit is None and packets is None:
            out[r] = QueueResult(budget_s=budget_s, unknown="no queue of ours on this direction")
            continue
        latency = limit * 8 / rate if limit is not None and rate not in (UNLIMITED, 0) else None
        out[r] = QueueResult(budget_s=budget_s, limit_bytes=limit, limit_packets=packets, latency_s=latency)
    return out


def stale_queues(info: Any, desired: dict[Resource, int], budget_s: float) -> set[Resource]:
    """The shaped directions whose queue is not the one ``shape`` installs for their rate and budget
    (a leaf replaced or resized by someone else, or one from before queues were sized)."""
    out = set()
    for r, field in _QUEUE_FIELDS.items():
        if r not in desired:
            continue
        planned = info.planned_limit_bytes(desired[r], budget_s)
        if planned is not None and getattr(info, f"{field}_limit_bytes") != planned:
            out.add(r)
    return out
