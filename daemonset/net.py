"""The engine's view of bandwidth shaping: netshape with the proc root bound, JSON snapshots, engine errors.

The shaping key is the pod sandbox id: a pod has one network namespace and one host veth, so
bandwidth is a property of the pod whichever container the request named.
"""

from __future__ import annotations

from typing import Any

from daemonset.types import UNLIMITED, ApplyFailed, InvalidRequest, TargetNotFound


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

    def find_host_veth(self, pid: int | None) -> str:
        import netshape
        from netshape import errors as ne

        if pid is None:
            raise TargetNotFound("the container has no process id; cannot find its network namespace")
        try:
            return netshape.find_host_veth(pid, proc_root=self.proc_root).ifname
        except ne.ShapeError as e:
            raise _engine_error(e, f"finding the host veth of pid {pid}") from e

    def shape(self, host_ifname: str, key: str, *, ingress_bps: int | None, egress_bps: int | None,
              snapshot: dict[str, Any] | None = None) -> dict[str, Any]:
        """Shape; ``snapshot`` is what an earlier call returned (kept: it saw the veth as it was)."""
        import netshape
        from netshape import errors as ne
        from netshape.snapshot import Snapshot

        try:
            snap = netshape.shape(host_ifname, key, ingress_bps=ingress_bps, egress_bps=egress_bps,
                                  snapshot=Snapshot.from_dict(snapshot) if snapshot else None)
        except ne.ShapeError as e:
            raise _engine_error(e, f"shaping {host_ifname}") from e
        return snap.to_dict()

    def unshape(self, host_ifname: str, key: str, snapshot: dict[str, Any] | None) -> None:
        import netshape
        from netshape import errors as ne
        from netshape.snapshot import Snapshot

        snap = Snapshot.from_dict(snapshot) if snapshot else Snapshot(host_ifname=host_ifname, target_key=key)
        try:
            netshape.unshape(host_ifname, key, snap)
        except ne.ShapeError as e:
            raise _engine_error(e, f"removing the shaping of {host_ifname}") from e

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

    def sweep_orphans(self, active_keys: set[str]) -> list[str]:
        """Delete IFB devices of ours that nothing redirects to and no active experiment owns."""
        import netshape
        from netshape import errors as ne

        try:
            return netshape.sweep_orphans(active_keys)
        except ne.ShapeError as e:
            raise _engine_error(e, "removing orphaned IFB devices") from e
