"""cgroupctl: read and write a container's cgroup limits directly, on cgroup v1, hybrid and v2.

Pure standard library (Python 3.10+), so it also runs inside the cgroup v2 test VM.

Typical use::

    cg = locate(pid=info.pid, proc_root="/host/proc", cgroup_root="/host/sys/fs/cgroup")
    applied = set_limits(cg, Limits(cpu_quota_us=50_000, memory_limit_bytes=256 * 2**20))
    ...
    restore(applied.snapshot)            # or Snapshot.from_dict(saved_json)

Step by step: ``state = read_state(cg)``; ``p = plan(state, Limits(...))`` (pure: ordered writes in
stages pod-before / container / pod-after); ``apply(p)``. When the runtime changes the container
itself (CRI UpdateContainerResources), ``prepare_pod`` raises the pod first and its ``finish()``
lowers it after.

Names follow docs/DESIGN.md. Additions: ``Limits.memory_swap_limit_bytes`` (CRI meaning, memory +
swap) and read-only ``cpu_shares``/``cpu_weight``/``memory_high_bytes``; ``Usage.nr_periods``;
``read_state``/``State`` (the input of ``plan``); ``plan_restore``; ``Check`` steps in a plan (v2 usage
check before memory.max); ``set_limits``; ``prepare_pod``/``PodChange``; ``locate(mode=...)``;
``ContainerCgroups.v2_controllers``/``uses_v2(controller)`` (a hybrid host's cpu or memory bound to
the unified tree uses its v2 files); ``State.pod_children``.

Rules a plan keeps: the pod is raised before the container only when the container needs room
past it (by what the container gains) and never lowered by a change, only by ``restore``; on v2 a
finite memory.high (the kubelet's MemoryQoS) moves with memory.max in proportion, on container and
pod, and goes back exactly on restore; a restore that would put a v1 pod quota under another
child's raised quota is refused up front (OrderingError naming it), nothing written.
"""

from cgroupctl.apply import PodChange, apply, prepare_pod, restore, set_limits, snapshot, write_file
from cgroupctl.errors import BelowUsage, CgroupError, NotFound, OrderingError, OutOfRange, WriteFailed
from cgroupctl.locate import detect_mode, locate
from cgroupctl.model import (
    CONTAINER,
    POD_AFTER,
    POD_BEFORE,
    UNLIMITED,
    Applied,
    CgroupDirs,
    Check,
    ContainerCgroups,
    Done,
    Limits,
    Mode,
    Plan,
    Snapshot,
    State,
    Usage,
    Write,
)
from cgroupctl.planner import plan, plan_restore
from cgroupctl.read import read_limits, read_state, read_usage

__all__ = [
    "CONTAINER", "POD_AFTER", "POD_BEFORE", "UNLIMITED",
    "Applied", "BelowUsage", "CgroupDirs", "CgroupError", "Check", "ContainerCgroups", "Done", "Limits",
    "Mode", "NotFound", "OrderingError", "OutOfRange", "Plan", "PodChange", "Snapshot", "State", "Usage",
    "Write", "WriteFailed",
    "apply", "detect_mode", "locate", "plan", "plan_restore", "prepare_pod", "read_limits", "read_state",
    "read_usage", "restore", "set_limits", "snapshot", "write_file",
]
