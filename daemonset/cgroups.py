"""The engine's view of cgroups: cgroupctl with the roots bound, plain ints (UNLIMITED = -1), engine errors.

cgroupctl plans a change in three stages: ``pod-before`` (raise the pod cgroup so the container
may go above it), ``container``, ``pod-after`` (lower the pod cgroup once the container is
below). The ``auto`` and ``cri`` methods run the pod stages here and let the runtime do the
container stage; ``cgroup`` runs the whole plan.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from daemonset.types import UNLIMITED, ApplyFailed, InvalidRequest, Refused, TargetNotFound

log = logging.getLogger("chaos-agent.cgroups")


@dataclasses.dataclass(frozen=True)
class Readings:
    """A container's CPU and memory limits as the kernel holds them; UNLIMITED = no limit."""

    cpu_quota_us: int
    cpu_period_us: int
    memory_limit_bytes: int
    memsw_limit_bytes: int | None = None  # None where the kernel has no swap accounting


def _int(value: Any) -> int:
    from cgroupctl import UNLIMITED as CG_UNLIMITED

    return UNLIMITED if value is CG_UNLIMITED else int(value)


def _cg_value(value: int | None) -> Any:
    from cgroupctl import UNLIMITED as CG_UNLIMITED

    if value is None:
        return None
    return CG_UNLIMITED if value == UNLIMITED else value


def engine_error(err: Exception, what: str) -> Exception:
    from cgroupctl import errors as ce

    if isinstance(err, ce.BelowUsage):
        return Refused(f"{what}: {err} (nothing was changed; --force to try anyway)")
    if isinstance(err, (ce.OutOfRange, ce.OrderingError)):
        return InvalidRequest(f"{what}: {err}")
    if isinstance(err, ce.NotFound):
        return TargetNotFound(f"{what}: {err}")
    return ApplyFailed(f"{what}: {err}")


def _without_pod_lowering(plan: Any) -> Any:
    """The plan minus its ``pod-after`` stage, which only ever lowers the pod cgroup.

    Lowering the pod with the container would keep the kubelet's sum, but on cgroup v1 a container
    the kubelet (re)starts during the experiment gets its spec's quota, which the kernel refuses
    above a lowered parent (EINVAL): the restart would fail. The container's own limit is what
    binds; the pod goes back exactly to its original on revert.
    """
    import cgroupctl

    return cgroupctl.Plan(tuple(s for s in plan.steps if s.stage != cgroupctl.POD_AFTER))


class CgroupOps:
    """locate, read, plan-check, set, snapshot and restore a container's (and its pod's) cgroups."""

    def __init__(self, cgroup_root: str = "/sys/fs/cgroup", proc_root: str = "/proc"):
        self.cgroup_root = cgroup_root
        self.proc_root = proc_root

    def locate(self, *, pid: int | None, cgroups_path: str | None) -> Any:
        import cgroupctl
        from cgroupctl import errors as ce

        try:
            return cgroupctl.locate(pid=pid, cgroups_path=cgroups_path, proc_root=self.proc_root,
                                    cgroup_root=self.cgroup_root)
        except ce.CgroupError as e:
            raise engine_error(e, f"locating the cgroups of pid {pid} ({cgroups_path})") from e

    def read(self, cg: Any, *, pod: bool = False) -> Readings:
        import cgroupctl
        from cgroupctl import errors as ce

        try:
            lim = cgroupctl.read_limits(cg, pod=pod)
        except ce.CgroupError as e:
            raise engine_error(e, "reading the limits back") from e
        return Readings(
            cpu_quota_us=_int(lim.cpu_quota_us) if lim.cpu_quota_us is not None else UNLIMITED,
            cpu_period_us=int(lim.cpu_period_us or 100_000),
            memory_limit_bytes=_int(lim.memory_limit_bytes) if lim.memory_limit_bytes is not None else UNLIMITED,
            memsw_limit_bytes=_int(lim.memory_swap_limit_bytes) if lim.memory_swap_limit_bytes is not None else None,
        )

    def plan(self, cg: Any, *, cpu_quota_us: int | None, memory_limit_bytes: int | None, force: bool) -> Any:
        """cgroupctl's plan for these values (pure after one read); raises Refused/InvalidRequest."""
        import cgroupctl
        from cgroupctl import errors as ce

        try:
            state = cgroupctl.read_state(cg)
            return cgroupctl.plan(state, cgroupctl.Limits(cpu_quota_us=_cg_value(cpu_quota_us),
                                                          memory_limit_bytes=_cg_value(memory_limit_bytes)),
                                  force=force)
        except ce.CgroupError as e:
            raise engine_error(e, "planning the cgroup change") from e

    def check(self, cg: Any, *, cpu_quota_us: int | None, memory_limit_bytes: int | None, force: bool) -> None:
        if cpu_quota_us is None and memory_limit_bytes is None:
            return
        self.plan(cg, cpu_quota_us=cpu_quota_us, memory_limit_bytes=memory_limit_bytes, force=force)

    def _apply(self, plan: Any, what: str) -> None:
        import cgroupctl
        from cgroupctl import errors as ce

        if not plan:
            return
        try:
            cgroupctl.apply(plan)
        except ce.CgroupError as e:
            raise engine_error(e, what) from e

    def set_container(self, cg: Any, *, cpu_quota_us: int | None, memory_limit_bytes: int | None, force: bool) -> None:
        """The plan by direct writes: pod raised first where needed, never lowered (see ``_without_pod_lowering``)."""
        plan = self.plan(cg, cpu_quota_us=cpu_quota_us, memory_limit_bytes=memory_limit_bytes, force=force)
        self._apply(_without_pod_lowering(plan), "writing the cgroup limits")

    def set_through(self, cg: Any, *, cpu_quota_us: int | None, memory_limit_bytes: int | None, force: bool,
                    runtime_call: Callable[[], None]) -> None:
        """Pod stage before, ``runtime_call`` for the container, pod stage after; the pod put back on failure."""
        import cgroupctl
        from cgroupctl import errors as ce

        limits = cgroupctl.Limits(cpu_quota_us=_cg_value(cpu_quota_us), memory_limit_bytes=_cg_value(memory_limit_bytes))
        try:
            change = cgroupctl.prepare_pod(cg, limits, force=force)
        except ce.CgroupError as e:
            raise engine_error(e, "raising the pod cgroup") from e
        try:
            runtime_call()
        except BaseException:
            try:
                change.abort()
            except ce.CgroupError as e:
                log.error("putting the pod cgroup back after a refused runtime call failed: %s", e)
            raise
        # No change.finish(): the pod is never lowered during an experiment (see _without_pod_lowering).

    def snapshot(self, cg: Any) -> dict[str, Any]:
        """The exact content of every limit file of the container and its pod, JSON-ready."""
        import cgroupctl
        from cgroupctl import errors as ce
        from cgroupctl.read import all_limit_paths

        try:
            return cgroupctl.snapshot(cg, all_limit_paths(cg)).to_dict()
        except ce.CgroupError as e:
            raise engine_error(e, "saving the original cgroup limits") from e

    def from_snapshot(self, snapshot: dict[str, Any]) -> Any:
        """The cgroups a snapshot was taken of (to read them without asking the runtime)."""
        from cgroupctl.model import ContainerCgroups

        return ContainerCgroups.from_dict(snapshot["cgroups"])

    def refresh_container_snapshot(self, old: dict[str, Any], cg: Any) -> dict[str, Any]:
        """For a re-created container: its own files as they are now (the originals again), the pod's as first saved."""
        new = self.snapshot(cg)
        pod_dirs = [d for d in (old["cgroups"].get("pod") or {}).values() if d]
        files = {p: v for p, v in new["files"].items() if not any(p.startswith(d + "/") for d in pod_dirs)}
        files.update({p: v for p, v in old["files"].items() if any(p.startswith(d + "/") for d in pod_dirs)})
        new["files"] = files
        return new

    def restore(self, snapshot: dict[str, Any], *, container_alive: bool = True) -> None:
        """Put back the saved contents in a safe order; files that are gone (container gone) are skipped."""
        import cgroupctl
        from cgroupctl import errors as ce
        from cgroupctl.model import Snapshot

        try:
            cgroupctl.restore(Snapshot.from_dict(snapshot))
        except ce.CgroupError as e:
            raise engine_error(e, "restoring the original cgroup limits") from e
