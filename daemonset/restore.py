"""Putting the originals back: the one restore that revert, rollback, recovery and retries all use.

Order, and why:

1. Memory first checked against what the container cannot give back: on cgroup v1 the kernel
   answers EBUSY after reclaiming, on v2 ``memory.max`` below usage OOM-kills the container. Refused
   here (unless forced) before anything is written, so a refused restore changes nothing.
2. The runtime's view, when the experiment ever went through CRI: the whole original
   ``LinuxContainerResources`` the runtime reported before the first change is sent as it was (not
   merged into what the runtime holds now: that view can be stale, e.g. after a ``--method cgroup``
   change, and a merge would write the stale value over the restore). A later ``runc update`` or a
   native resize then starts from the originals.
3. The raw cgroup files of the snapshot, byte for byte, in an order the kernel accepts (cgroupctl
   lowers the pod cgroup only after its container), each read back and compared.
4. Our shaping: the veth's root qdisc as first saved, our ingress filter and IFB removed. For a pod
   that is gone, only our IFB (by name) is removed: its veth went with it, and a veth of the same
   name may belong to another pod by now.

Every part is tried even when an earlier one failed (a runtime outage must not keep a pod's
bandwidth shaped); the error lists what failed and what is still changed. All steps are idempotent,
so the supervisor simply runs the whole restore again on the next try.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from daemonset.record import BANDWIDTH, CPU_MEM, Experiment
from daemonset.types import UNLIMITED, EngineError, Refused, Resource

log = logging.getLogger("chaos-agent.restore")


@dataclasses.dataclass(frozen=True)
class Location:
    """Where an experiment's container is now, as far as the runtime and the kernel say."""

    info: Any | None  # the running container (ContainerInfo), None when not running or not reachable
    cg: Any | None  # its cgroups (or the snapshot's, while the runtime cannot be asked)
    runtime_error: str = ""  # set when the runtime could not be asked
    gone: str = ""  # why the pod's network is gone (deleted, replaced, stopped), "" while it is there


class RestoreError(EngineError):
    """Some part of a restore failed; ``refused`` when the kernel refused it (memory held), ``still`` lists
    what is still changed."""

    def __init__(self, message: str, *, refused: bool, still: tuple[str, ...], done: tuple[str, ...]):
        super().__init__(message)
        self.refused = refused
        self.still = still
        self.done = done


class RuntimeViewStale(EngineError):
    """The kernel has the originals back, but the runtime's stored view still holds the experiment's values."""


class Restorer:
    """Restores an Experiment's originals through the engine's adapters (CRI client, CgroupOps, NetOps)."""

    def __init__(self, cri: Any, cgroups: Any, net: Any):
        self.cri = cri
        self.cgroups = cgroups
        self.net = net

    def restore(self, exp: Experiment, loc: Location, *, force: bool = False,
                only: set[Resource] | None = None) -> None:
        """Put back the originals of ``only`` (default: everything the experiment touched).

        Resources of the experiment outside ``only`` keep their desired values (a rollback of a
        further change restores just what that change added). Raises RestoreError.
        """
        resources = exp.touched() if only is None else (only & exp.touched())
        cpu_mem = resources & set(CPU_MEM)
        failed: list[str] = []
        still: list[str] = []
        done: list[str] = []
        refused = False
        if loc.gone in ("pod deleted", "pod replaced"):
            cpu_mem = set()  # its cgroups went with it; a new pod of that name is not ours to touch
        if cpu_mem and exp.cgroup_snapshot is not None:
            try:
                self._restore_cpu_memory(exp, loc, cpu_mem, force)
                done.extend(sorted(r.value for r in cpu_mem))
            except RuntimeViewStale as e:
                failed.append(str(e))
                done.extend(f"{r.value} (kernel)" for r in sorted(cpu_mem, key=lambda r: r.value))
                still.append("the runtime's stored " + " and ".join(sorted(r.value for r in cpu_mem))
                             + " (it would write them again on its next update)")
            except Refused as e:
                refused = True
                failed.append(str(e))
                # Memory is held: the CPU still goes back now, the memory when it can.
                rest = cpu_mem - {Resource.MEMORY}
                if rest:
                    try:
                        self._restore_cpu_memory(exp, loc, rest, force)
                        done.extend(sorted(r.value for r in rest))
                    except Exception as e2:
                        failed.append(str(e2))
                        still.extend(_still(exp, rest))
                still.extend(_still(exp, {Resource.MEMORY}))
            except Exception as e:
                failed.append(str(e))
                still.extend(_still(exp, cpu_mem))
        if exp.net is not None and (only is None or resources & set(BANDWIDTH)):
            try:
                self._restore_net(exp, loc)
                done.append("bandwidth")
            except Exception as e:
                failed.append(f"bandwidth: {e}")
                still.append("bandwidth shaping")
        if failed:
            raise RestoreError("; ".join(failed), refused=refused, still=tuple(still), done=tuple(done))

    def _restore_cpu_memory(self, exp: Experiment, loc: Location, resources: set[Resource], force: bool) -> None:
        original_memory = exp.original.get(Resource.MEMORY)
        if (Resource.MEMORY in resources and loc.info is not None and loc.cg is not None and not force
                and original_memory is not None and original_memory != UNLIMITED):
            # Raises Refused with the person-sized message (see daemonset.cgroups.engine_error).
            self.cgroups.check(loc.cg, cpu_quota_us=None, memory_limit_bytes=original_memory, force=False,
                               what=f"memory cannot go back to its original {_mib(original_memory)} yet")
        via_runtime = exp.cri_used or bool(set(exp.cri_intent) & resources)
        runtime_failed = ""
        if via_runtime:
            if loc.info is None:
                if loc.runtime_error:
                    runtime_failed = f"the runtime's view is not restored yet: {loc.runtime_error}"
            else:
                try:
                    self._restore_runtime_view(exp, loc.info, resources)
                except Exception as e:
                    runtime_failed = f"the runtime's view is not restored yet: {e}"
        # The kernel's files even when the runtime could not be told: the pod gets its limits back now,
        # and the runtime is told on the next try (the record stays until it is).
        subset = _snapshot_subset(exp.cgroup_snapshot, resources)
        self.cgroups.restore(subset, force=force)
        if runtime_failed:
            raise RuntimeViewStale(runtime_failed)

    def _restore_runtime_view(self, exp: Experiment, info: Any, resources: set[Resource]) -> None:
        from cri_api.types import LinuxResources

        if exp.cri_original is None:
            # The runtime never reported resources: name the fields, merged into its current view.
            fields: dict[str, int] = {}
            if Resource.CPU in resources:
                fields["cpu_quota_us"] = _quota_from_snapshot(exp) or UNLIMITED
            if Resource.MEMORY in resources:
                fields["memory_limit_bytes"] = exp.original.get(Resource.MEMORY, UNLIMITED)
            if fields:
                self.cri.update_resources(info.id, **fields)
            return
        original = LinuxResources.from_dict(exp.cri_original)
        kept = {r: v for r, v in exp.desired.items() if r in CPU_MEM and r not in resources}
        if kept and exp.cri_sent:
            # A partial restore (rollback of what a further change added): the other resource stays as sent.
            sent = LinuxResources.from_dict(exp.cri_sent)
            if Resource.CPU in kept:
                original = dataclasses.replace(original, cpu_quota_us=sent.cpu_quota_us, cpu_period_us=sent.cpu_period_us)
            if Resource.MEMORY in kept:
                original = dataclasses.replace(original, memory_limit_bytes=sent.memory_limit_bytes,
                                               memory_swap_limit_bytes=sent.memory_swap_limit_bytes)
        self.cri.update_container_resources(info.id, original)

    def _restore_net(self, exp: Experiment, loc: Location) -> None:
        net = exp.net
        assert net is not None
        if loc.gone:
            self.net.remove_ifb(net.ifb_key)
            return
        # No snapshot: the crash came before the first shaping returned one; an ingress qdisc the
        # veth did not have when the record was written can only be that shaping's.
        self.net.unshape(net.host_ifname, net.ifb_key, net.snapshot,
                         ingress_hook_ours=net.ingress_hook_before is False)
        ingress, egress = self.net.read_rates(net.host_ifname, net.ifb_key)
        left = [d for d, v in (("into the pod", ingress), ("out of the pod", egress)) if v != UNLIMITED]
        if left:
            raise EngineError(f"our shaping of {net.host_ifname} still reads back {' and '.join(left)}")


def _snapshot_subset(snapshot: dict[str, Any] | None, resources: set[Resource]) -> dict[str, Any]:
    """The snapshot's files of the controllers of ``resources`` (cpu.* / memory.*, container and pod)."""
    assert snapshot is not None
    if resources >= set(CPU_MEM):
        return snapshot
    prefixes = tuple(f"{r.value}." for r in resources)
    return {**snapshot, "files": {p: v for p, v in snapshot["files"].items()
                                  if p.rsplit("/", 1)[-1].startswith(prefixes)}}


def _quota_from_snapshot(exp: Experiment) -> int | None:
    for path, text in (exp.cgroup_snapshot or {}).get("files", {}).items():
        if path.endswith("/cpu.cfs_quota_us") and int(text) > 0:
            return int(text)
    return None


def _still(exp: Experiment, resources: set[Resource]) -> list[str]:
    return [f"{r.value} {fmt(r, exp.desired[r])} (original {fmt(r, exp.original.get(r, UNLIMITED))})"
            for r in sorted(resources, key=lambda r: r.value) if r in exp.desired]


def _mib(value: int) -> str:
    return fmt(Resource.MEMORY, value)


def fmt(resource: Resource, value: int) -> str:
    """A quantity as a person writes it: 300m, 1, 96Mi, 60.8Mi, 2Mbit/s, unlimited."""
    if value == UNLIMITED:
        return "unlimited"
    if resource is Resource.CPU:
        return f"{value // 1000}" if value % 1000 == 0 else f"{value}m"
    if resource is Resource.MEMORY:
        for unit, size in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
            if value >= size:
                return f"{value // size}{unit}" if value % size == 0 else f"{value / size:.1f}{unit}"
        return f"{value}B"
    return f"{value / 1e6:g}Mbit/s"
