"""The engine's view of cgroups: cgroupctl with the roots bound, plain ints (UNLIMITED = -1), engine errors.

cgroupctl plans a change as ``pod-before`` (raise the pod cgroup, only where the container would go
above it) and ``container``; a change never lowers the pod, only a restore does. The ``auto`` and
``cri`` methods run the pod stage here and let the runtime do the container stage; ``cgroup`` runs
the whole plan.

On a systemd-driver node the pod slice and the container scope are systemd's units: every write to
them goes through systemd's D-Bus API first (daemonset.systemd: SetUnitProperties, runtime only, as
runc's systemd manager does) and then into the file, so a ``systemctl daemon-reload`` keeps the
experiment. Snapshots also hold those units' properties, and a restore puts them back too.

What ``read`` reports is the limit the container's processes get: the tightest of its cgroup levels
(crun's scope and its ``container/`` child) and, on cgroup v2, its pod's (v2 caps a child at its
parent instead of refusing it). So drift correction notices a pod slice put back under a raised
container, and the plan raises the pod again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from daemonset.types import UNLIMITED, ApplyFailed, InvalidRequest, Refused, TargetNotFound

log = logging.getLogger("chaos-agent.cgroups")

_EXTRA_FILES = ("cpu.weight", "cpu.max.burst")


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


def _readings(lim: Any) -> Readings:
    return Readings(
        cpu_quota_us=_int(lim.cpu_quota_us) if lim.cpu_quota_us is not None else UNLIMITED,
        cpu_period_us=int(lim.cpu_period_us or 100_000),
        memory_limit_bytes=_int(lim.memory_limit_bytes) if lim.memory_limit_bytes is not None else UNLIMITED,
        memsw_limit_bytes=_int(lim.memory_swap_limit_bytes) if lim.memory_swap_limit_bytes is not None else None,
    )


def engine_error(err: Exception, what: str) -> Exception:
    from cgroupctl import errors as ce

    if isinstance(err, ce.BelowUsage):
        # One line for the person at the terminal; the path and byte counts go to the agent's log.
        log.info("%s: %s", what, err)
        return Refused(below_usage_message(err, what))
    if isinstance(err, (ce.OutOfRange, ce.OrderingError)):
        return InvalidRequest(f"{what}: {err}")
    if isinstance(err, ce.NotFound):
        return TargetNotFound(f"{what}: {err}")
    return ApplyFailed(f"{what}: {err}")


def below_usage_message(err: Any, what: str = "") -> str:
    """``memory 32Mi is below the 60.8Mi this container cannot give back (it uses 60.9Mi); nothing was
    changed; --force to try anyway``; with ``what`` (a restore) ``<what>: the container holds ... ``."""
    from daemonset.restore import fmt
    from daemonset.types import Resource

    def mem(v: int) -> str:
        return fmt(Resource.MEMORY, v)

    used = f" (it uses {mem(err.usage_bytes)})" if err.usage_bytes else ""
    if what:
        return f"{what}: the container holds {mem(err.unreclaimable_bytes)} it cannot give back{used}"
    return (f"memory {mem(err.limit_bytes)} is below the {mem(err.unreclaimable_bytes)} this container cannot give"
            f" back{used}; nothing was changed; --force to try anyway")


class CgroupOps:
    """locate, read, plan-check, set, snapshot and restore a container's (and its pod's) cgroups."""

    _CACHE_MAX = 4096

    def __init__(self, cgroup_root: str = "/sys/fs/cgroup", proc_root: str = "/proc", systemd: Any = "auto"):
        self.cgroup_root = cgroup_root
        self.proc_root = proc_root
        # daemonset.systemd.Systemd, made on first need ("auto"), or None: never talk to systemd.
        self._systemd = systemd
        self._no_bus_until = 0.0
        # (pid, cgroups path) -> directories: a running container's cgroups never move, and its
        # cgroups path names the container, so a reused pid cannot hit a stale entry.
        self._located: dict[tuple[int | None, str | None], Any] = {}

    def locate(self, *, pid: int | None, cgroups_path: str | None) -> Any:
        import cgroupctl
        from cgroupctl import errors as ce

        key = (pid, cgroups_path)
        cg = self._located.get(key)
        if cg is not None and os.path.isdir(cg.container.cpu or cg.container.memory or "/nonexistent"):
            return cg
        try:
            cg = cgroupctl.locate(pid=pid, cgroups_path=cgroups_path, proc_root=self.proc_root,
                                  cgroup_root=self.cgroup_root)
        except ce.CgroupError as e:
            raise engine_error(e, f"locating the cgroups of pid {pid} ({cgroups_path})") from e
        if len(self._located) >= self._CACHE_MAX:
            self._located.clear()
        self._located[key] = cg
        return cg

    def read_for_plan(self, cg: Any, *, memory_usage: bool = True) -> tuple[Readings, Any]:
        """The container's limits and cgroupctl's ``State`` (what ``check`` plans from) in one read.

        ``memory_usage=False`` (no memory limit to plan): the usage files are not read; the state
        then has an empty ``Usage``, with which a memory plan would skip its below-usage check.
        """
        import cgroupctl
        from cgroupctl import errors as ce
        from cgroupctl.model import State, Usage
        from cgroupctl.read import all_limit_paths, effective_from_files, read_files, read_pod_children

        try:
            if memory_usage:
                state = cgroupctl.read_state(cg)
            else:
                files = read_files(all_limit_paths(cg))
                if not any(p.startswith(d + "/") for p in files for d in (cg.container.cpu, cg.container.memory) if d):
                    raise ce.NotFound(f"no limit file found in the container cgroups {cg.container.to_dict()}:"
                                      " has the container exited?")
                state = State(cgroups=cg, files=files, container_usage=Usage(), pod_children=read_pod_children(cg))
            lim = effective_from_files(cg, dict(state.files))
        except ce.CgroupError as e:
            raise engine_error(e, "reading the limits") from e
        return _readings(lim), state

    def read(self, cg: Any, *, pod: bool = False) -> Readings:
        """The limits in force for the container's processes (every level, see the module docstring)."""
        import cgroupctl
        from cgroupctl import errors as ce
        from cgroupctl.read import effective_limits

        try:
            lim = cgroupctl.read_limits(cg, pod=True) if pod else effective_limits(cg)
        except ce.CgroupError as e:
            raise engine_error(e, "reading the limits back") from e
        return _readings(lim)

    def plan(self, cg: Any, *, cpu_quota_us: int | None, memory_limit_bytes: int | None, force: bool,
             state: Any = None, what: str = "") -> Any:
        """cgroupctl's plan for these values (pure after one read); raises Refused/InvalidRequest."""
        import cgroupctl
        from cgroupctl import errors as ce

        try:
            state = state if state is not None else cgroupctl.read_state(cg)
            return cgroupctl.plan(state, cgroupctl.Limits(cpu_quota_us=_cg_value(cpu_quota_us),
                                                          memory_limit_bytes=_cg_value(memory_limit_bytes)),
                                  force=force)
        except ce.BelowUsage as e:
            raise engine_error(e, what) from e
        except ce.CgroupError as e:
            raise engine_error(e, "planning the cgroup change") from e

    def check(self, cg: Any, *, cpu_quota_us: int | None, memory_limit_bytes: int | None, force: bool,
              state: Any = None, what: str = "") -> Any:
        """The plan for these values, or None when neither is asked; raises what a plan refuses.

        ``what`` heads a below-usage refusal (default: ``memory <limit> is below ...``)."""
        if cpu_quota_us is None and memory_limit_bytes is None:
            return None
        return self.plan(cg, cpu_quota_us=cpu_quota_us, memory_limit_bytes=memory_limit_bytes, force=force,
                         state=state, what=what)

    def _apply(self, plan: Any, what: str) -> None:
        import cgroupctl
        from cgroupctl import errors as ce

        if not plan:
            return
        try:
            cgroupctl.apply(plan, write=self.write)
        except ce.CgroupError as e:
            raise engine_error(e, what) from e

    def set_container(self, cg: Any, *, cpu_quota_us: int | None, memory_limit_bytes: int | None, force: bool,
                      plan: Any = None) -> None:
        """The plan by direct writes: cgroupctl raises the pod first where needed and never lowers it.

        ``plan``: one made by ``check`` for the same values under the same lock (saves reading again).
        """
        if plan is None:
            plan = self.plan(cg, cpu_quota_us=cpu_quota_us, memory_limit_bytes=memory_limit_bytes, force=force)
        self._apply(plan, "writing the cgroup limits")

    def set_through(self, cg: Any, *, cpu_quota_us: int | None, memory_limit_bytes: int | None, force: bool,
                    runtime_call: Callable[[], None], plan: Any = None) -> None:
        """Pod raised first where needed, ``runtime_call`` changes the container; the pod put back if it fails."""
        import cgroupctl
        from cgroupctl import errors as ce

        if plan is None:
            plan = self.plan(cg, cpu_quota_us=cpu_quota_us, memory_limit_bytes=memory_limit_bytes, force=force)
        raise_pod = plan.pod_before
        pod_saved = cgroupctl.snapshot(cg, list(raise_pod.paths)) if raise_pod else None
        self._apply(raise_pod, "raising the pod cgroup")
        try:
            runtime_call()
        except BaseException:
            if pod_saved is not None:
                try:
                    cgroupctl.restore(pod_saved, write=self.write)
                except ce.CgroupError as e:
                    log.error("putting the pod cgroup back after a refused runtime call failed: %s", e)
            raise
        # What the runtime leaves undone: on v2 the container's memory.high follows memory.max
        # (runc sets only memory.max). A change plan never lowers the pod (cgroupctl.planner).
        change = cgroupctl.PodChange(plan=plan, snapshot=pod_saved or cgroupctl.Snapshot(cgroups=cg, files={}),
                                     before=cgroupctl.Applied(), write=self.write)
        try:
            change.finish()
        except ce.CgroupError as e:
            raise engine_error(e, "moving memory.high after the runtime's change") from e

    def snapshot(self, cg: Any) -> dict[str, Any]:
        """The exact content of every limit file of the container and its pod, JSON-ready."""
        import cgroupctl
        from cgroupctl import errors as ce
        from cgroupctl.read import all_limit_paths, read_files

        try:
            snap = cgroupctl.snapshot(cg, all_limit_paths(cg)).to_dict()
        except ce.CgroupError as e:
            raise engine_error(e, "saving the original cgroup limits") from e
        extra = read_files(self._extra_paths(cg))
        if extra:
            snap["extra_files"] = extra
        units = self._unit_properties(cg)
        if units:
            snap["units"] = units
        return snap

    @staticmethod
    def _extra_paths(cg: Any) -> list[str]:
        """Files a change never writes but a runtime's update may (v2: runc 1.3 recomputes cpu.weight
        from the shares it is sent, with its own formula; cpu.max.burst): saved to be put back exactly."""
        if not cg.uses_v2("cpu"):
            return []
        dirs = [d.cpu for d in (*cg.levels, cg.pod) if d is not None and d.cpu]
        return [os.path.join(d, name) for d in dirs for name in _EXTRA_FILES]

    def _unit_properties(self, cg: Any) -> dict[str, dict[str, int]]:
        """{unit: {property: value}} of the systemd units among the cgroups a change may write."""
        from daemonset.systemd import PROPERTIES, SystemdError

        units: dict[str, dict[str, int]] = {}
        for d in {x for dirs in (*cg.levels, cg.pod) if dirs is not None for x in (dirs.cpu, dirs.memory) if x}:
            unit = self._unit(d)
            if unit is None:
                continue
            try:
                units[unit] = self._systemd.get_properties(unit, PROPERTIES)
            except SystemdError as e:
                log.warning("reading the properties of %s failed (%s): a reset will put back its files only", unit, e)
        return units

    def from_snapshot(self, snapshot: dict[str, Any]) -> Any:
        """The cgroups a snapshot was taken of (to read them without asking the runtime)."""
        from cgroupctl.model import ContainerCgroups

        return ContainerCgroups.from_dict(snapshot["cgroups"])

    def refresh_container_snapshot(self, old: dict[str, Any], cg: Any) -> dict[str, Any]:
        """For a re-created container: its own files as they are now (the originals again), the pod's as first saved."""
        new = self.snapshot(cg)
        pod_dirs = {os.path.normpath(d) for d in (old["cgroups"].get("pod") or {}).values() if d}

        def in_pod(path: str) -> bool:  # the pod's own files, not those of the containers below it
            return os.path.dirname(path) in pod_dirs

        files = {p: v for p, v in new["files"].items() if not in_pod(p)}
        files.update({p: v for p, v in old["files"].items() if in_pod(p)})
        new["files"] = files
        pod_units = {os.path.basename(d) for d in pod_dirs}
        units = {u: v for u, v in (new.get("units") or {}).items() if u not in pod_units}
        units.update({u: v for u, v in (old.get("units") or {}).items() if u in pod_units})
        if units:
            new["units"] = units
        extra = {p: v for p, v in (new.get("extra_files") or {}).items() if not in_pod(p)}
        extra.update({p: v for p, v in (old.get("extra_files") or {}).items() if in_pod(p)})
        if extra:
            new["extra_files"] = extra
        return new

    def restore(self, snapshot: dict[str, Any], *, force: bool = False) -> None:
        """Put back the saved contents in a safe order, each file read back and compared; files that are
        gone (container gone) are skipped. Memory below what cannot be given back: Refused unless ``force``."""
        import cgroupctl
        from cgroupctl import errors as ce
        from cgroupctl.model import Snapshot

        try:
            cgroupctl.restore(Snapshot.from_dict(snapshot), force=force, write=self.write)
            self._restore_units(snapshot)
        except ce.BelowUsage as e:
            raise engine_error(e, "memory cannot go back to its original yet") from e
        except ce.CgroupError as e:
            raise engine_error(e, "restoring the original cgroup limits") from e

    def _restore_units(self, snapshot: dict[str, Any]) -> None:
        """The saved unit properties back as they were (a restore through the files sets them from the
        file values; a runtime may have rounded them differently), then every saved file that now
        differs written back raw: properties and files both end as they were."""
        from cgroupctl.apply import write_file
        from cgroupctl.read import read_files
        from daemonset.systemd import SystemdError, properties_of_files

        files = snapshot.get("files") or {}
        for unit, saved in (snapshot.get("units") or {}).items():
            if self._systemd in (None, "auto"):
                break
            names = properties_of_files(os.path.basename(p) for p in files if os.path.basename(os.path.dirname(p)) == unit)
            wanted = {n: v for n, v in saved.items() if n in names}
            if not wanted:
                continue
            try:
                if self._systemd.unit_path(unit) is None:
                    continue  # gone with its container
                now = self._systemd.get_properties(unit, wanted)
                if now != wanted:
                    self._systemd.set_properties(unit, wanted)
            except SystemdError as e:
                log.warning("putting back the properties of %s failed (%s); its files are restored", unit, e)
        controllers = {os.path.basename(p).split(".", 1)[0] + "." for p in files}  # a subset restores its own
        extra = {p: v for p, v in (snapshot.get("extra_files") or {}).items()
                 if os.path.basename(p).startswith(tuple(controllers))}
        saved_files = {**files, **extra}
        now_files = read_files(list(saved_files))
        for path, text in saved_files.items():
            if path in now_files and now_files[path] != text:
                write_file(path, text)

    # ---- writes ------------------------------------------------------------------------------

    def _unit(self, cgroup_dir: str) -> str | None:
        """The systemd unit behind a cgroup directory, when systemd manages it and can be reached."""
        from daemonset.systemd import NoBus, Systemd, SystemdError, unit_of

        if self._systemd is None or unit_of(cgroup_dir) is None or time.monotonic() < self._no_bus_until:
            return None
        if self._systemd == "auto":
            self._systemd = Systemd()
        try:
            return self._systemd.manages(cgroup_dir)
        except NoBus as e:
            log.warning("%s: changes to systemd's units are written to their files only, and a daemon-reload"
                        " undoes them until drift correction puts them back (mount the host's /run/dbus)", e)
            self._no_bus_until = time.monotonic() + 60
        except SystemdError as e:
            log.warning("asking systemd about %s failed: %s", cgroup_dir, e)
        return None

    def write(self, path: str, value: str) -> None:
        """One cgroup write: through systemd first when it manages the cgroup, then into the file."""
        from cgroupctl.apply import write_file
        from daemonset.systemd import SystemdError, properties_for

        unit = self._unit(os.path.dirname(path))
        if unit is not None:
            props = properties_for(os.path.basename(path), value)
            if props:
                try:
                    self._systemd.set_properties(unit, props)
                except SystemdError as e:
                    log.warning("%s; written to the file only (a daemon-reload would undo it)", e)
        write_file(path, value)
