"""Values passed between the cgroupctl stages: what was found, read, planned, applied, saved.

Every value here is plain data. Those the agent keeps across restarts (``ContainerCgroups``,
``Limits``, ``Snapshot``, ``Plan``, ``Applied``) have ``to_dict()`` / ``from_dict()`` that go
through JSON unchanged.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cgroupctl.errors import CgroupError


class Mode(str, enum.Enum):
    """How the host mounts cgroups: all v1, v1 controllers beside a v2 tree (hybrid), or pure v2."""

    V1 = "v1"
    HYBRID = "hybrid"
    V2 = "v2"


class _Unlimited:
    """The one "no limit" value: -1 in v1 files, "max" in v2 files. Not None (leave alone), not 0."""

    _instance: _Unlimited | None = None

    def __new__(cls) -> _Unlimited:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNLIMITED"

    def __reduce__(self) -> str:
        return "UNLIMITED"

    def __copy__(self) -> _Unlimited:
        return self

    def __deepcopy__(self, memo: dict) -> _Unlimited:
        return self


UNLIMITED = _Unlimited()

LimitValue = int | _Unlimited


def as_number(value: LimitValue) -> float:
    """``UNLIMITED`` as infinity, so limits compare with ``<`` and ``>``."""
    return math.inf if value is UNLIMITED else float(value)


def _limit_to_json(value: LimitValue | None) -> Any:
    return "unlimited" if value is UNLIMITED else value


def _limit_from_json(value: Any) -> LimitValue | None:
    if value == "unlimited":
        return UNLIMITED
    if value is None or isinstance(value, int):
        return value
    raise CgroupError(f"limit value {value!r} in saved data: expected an integer, null or 'unlimited'")


@dataclass(frozen=True)
class Limits:
    """Limits of one cgroup. ``None`` = leave alone / not present; ``UNLIMITED`` = no limit.

    ``memory_swap_limit_bytes`` has the CRI meaning: memory plus swap (v1 memory.memsw.limit_in_bytes;
    on v2 cgroupctl writes memory.swap.max = this minus the memory limit). When a request leaves it
    ``None``, a memory change keeps the swap allowance the container has (containerd sets memsw equal
    to the memory limit: no swap, and it stays so). A container gaining its first memory limit
    while its swap is unlimited gets no swap (memsw = the limit on v1, memory.swap.max 0 on v2).

    ``cpu_shares``, ``cpu_weight`` and ``memory_high_bytes`` are reported by ``read_limits`` only:
    they are requests or throttles, not limits, and ``plan`` refuses to set them.
    """

    cpu_quota_us: LimitValue | None = None
    cpu_period_us: int | None = None
    memory_limit_bytes: LimitValue | None = None
    memory_swap_limit_bytes: LimitValue | None = None
    cpu_shares: int | None = None
    cpu_weight: int | None = None
    memory_high_bytes: LimitValue | None = None

    @property
    def cpu_millicpu(self) -> LimitValue | None:
        """The quota as millicpu (quota * 1000 / period), rounded down; None when unknown."""
        if self.cpu_quota_us is UNLIMITED:
            return UNLIMITED
        if self.cpu_quota_us is None or not self.cpu_period_us:
            return None
        return self.cpu_quota_us * 1000 // self.cpu_period_us

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _limit_to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Limits:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise CgroupError(f"unknown Limits fields {sorted(unknown)}; accepted: {sorted(names)}")
        return cls(**{k: _limit_from_json(v) for k, v in data.items()})


@dataclass(frozen=True)
class Usage:
    """What a cgroup uses. ``memory_unreclaimable_bytes`` is the floor a memory limit cannot go under
    (the kubelet's working set: usage minus inactive file pages)."""

    cpu_usage_ns: int | None = None
    nr_throttled: int | None = None
    throttled_ns: int | None = None
    memory_usage_bytes: int | None = None
    memory_unreclaimable_bytes: int | None = None
    nr_periods: int | None = None

    @property
    def memory_reclaimable_bytes(self) -> int | None:
        if self.memory_usage_bytes is None or self.memory_unreclaimable_bytes is None:
            return None
        return self.memory_usage_bytes - self.memory_unreclaimable_bytes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CgroupDirs:
    """The directories of one cgroup, per controller (all three are the same directory on v2).

    ``cpu`` holds the quota files, ``cpuacct`` the usage counter (cpuacct.usage on v1, cpu.stat on v2),
    ``memory`` the memory files. A controller that is not mounted is ``None``.
    """

    cpu: str | None = None
    cpuacct: str | None = None
    memory: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CgroupDirs:
        return cls(**data)


@dataclass(frozen=True)
class ContainerCgroups:
    """A container's cgroup directories and its pod's (the parent), as found by ``locate``.

    ``cgroup_paths`` are the paths inside each hierarchy (``/kubepods/burstable/pod<uid>/<id>``), for
    messages; the directories are what cgroupctl reads and writes.

    ``v2_controllers`` names the controllers (of ``cpu``, ``cpuacct``, ``memory``) that a HYBRID host
    has bound to its v2 (unified) tree, so their v2 files are used; on V1 and V2 it is ignored.

    ``inner`` is the container's own child cgroup where its processes run when the runtime makes one
    (crun, also under CRI-O: limits on ``<scope>`` and on ``<scope>/container``); ``None`` when the
    processes run in the container's cgroup itself (runc). Both levels hold the container's limits:
    cgroupctl writes, reads back, snapshots and restores both.
    """

    mode: Mode
    container: CgroupDirs
    pod: CgroupDirs | None = None
    container_id: str | None = None
    pod_uid: str | None = None
    cgroup_paths: Mapping[str, str] = field(default_factory=dict)
    v2_controllers: tuple[str, ...] = ()
    inner: CgroupDirs | None = None

    @property
    def levels(self) -> tuple[CgroupDirs, ...]:
        """The container's cgroup levels, outermost first (the container's, then ``inner``)."""
        return (self.container, self.inner) if self.inner is not None else (self.container,)

    def uses_v2(self, controller: str) -> bool:
        """Whether ``controller``'s files are the v2 ones (cpu.max, memory.max, cpu.stat, ...)."""
        if self.mode is Mode.V2:
            return True
        return self.mode is Mode.HYBRID and controller in self.v2_controllers

    def to_dict(self) -> dict[str, Any]:
        out = {
            "mode": self.mode.value,
            "container": self.container.to_dict(),
            "pod": self.pod.to_dict() if self.pod else None,
            "container_id": self.container_id,
            "pod_uid": self.pod_uid,
            "cgroup_paths": dict(self.cgroup_paths),
            "v2_controllers": list(self.v2_controllers),
        }
        if self.inner is not None:
            out["inner"] = self.inner.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ContainerCgroups:
        return cls(
            mode=Mode(data["mode"]),
            container=CgroupDirs.from_dict(data["container"]),
            pod=CgroupDirs.from_dict(data["pod"]) if data.get("pod") else None,
            container_id=data.get("container_id"),
            pod_uid=data.get("pod_uid"),
            cgroup_paths=dict(data.get("cgroup_paths") or {}),
            v2_controllers=tuple(data.get("v2_controllers") or ()),
            inner=CgroupDirs.from_dict(data["inner"]) if data.get("inner") else None,
        )


@dataclass(frozen=True)
class State:
    """Everything ``plan`` needs, read in one go by ``read_state``: the exact content of every limit
    file of the container and pod cgroups (path -> text, stripped), and their usage.

    ``pod_children`` holds the v1 CPU quota files of the pod's other child cgroups (its other
    containers, the sandbox): a pod quota below any of theirs is refused by the kernel."""

    cgroups: ContainerCgroups
    files: Mapping[str, str]
    container_usage: Usage
    pod_usage: Usage | None = None
    pod_children: Mapping[str, str] = field(default_factory=dict)


# Stages of a plan, in the order they run. The agent's "auto" method applies "pod-before", asks the
# runtime (CRI UpdateContainerResources) to change the container, then applies "pod-after".
POD_BEFORE = "pod-before"
CONTAINER = "container"
POD_AFTER = "pod-after"
STAGES = (POD_BEFORE, CONTAINER, POD_AFTER)


@dataclass(frozen=True)
class Write:
    """Write ``value`` into the file ``path``; ``previous`` is its exact content before the plan ran
    (what a rollback puts back). ``why`` says why this write sits where it does."""

    path: str
    value: str
    previous: str | None = None
    stage: str = CONTAINER
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"op": "write", **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Check:
    """Read the byte count in ``path`` (memory.current) and stop the plan, rolling back, when it is
    above ``max_bytes``: v2 reclaims on a memory.high write but OOM-kills on a memory.max write, so
    memory.max is only written once usage is known to fit."""

    path: str
    max_bytes: int
    stage: str = CONTAINER
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"op": "check", **dataclasses.asdict(self)}


Step = Write | Check


@dataclass(frozen=True)
class Plan:
    """The ordered steps that take a container (and its pod) to the requested limits."""

    steps: tuple[Step, ...] = ()

    @property
    def writes(self) -> tuple[Write, ...]:
        return tuple(s for s in self.steps if isinstance(s, Write))

    @property
    def paths(self) -> tuple[str, ...]:
        """Every file the plan writes, once, in first-write order."""
        return tuple(dict.fromkeys(w.path for w in self.writes))

    def stage(self, name: str) -> Plan:
        """The part of the plan in one stage (``POD_BEFORE``, ``CONTAINER``, ``POD_AFTER``)."""
        if name not in STAGES:
            raise CgroupError(f"unknown plan stage {name!r}; stages are {STAGES}")
        return Plan(tuple(s for s in self.steps if s.stage == name))

    @property
    def pod_before(self) -> Plan:
        return self.stage(POD_BEFORE)

    @property
    def container(self) -> Plan:
        return self.stage(CONTAINER)

    @property
    def pod_after(self) -> Plan:
        return self.stage(POD_AFTER)

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        steps: list[Step] = []
        for raw in data["steps"]:
            raw = dict(raw)
            op = raw.pop("op")
            steps.append(Write(**raw) if op == "write" else Check(**raw))
        return cls(tuple(steps))


@dataclass(frozen=True)
class Snapshot:
    """The exact content of files before cgroupctl touched them (path -> text, stripped), and the
    cgroups they belong to; ``restore`` puts back exactly these contents, in a safe order."""

    cgroups: ContainerCgroups
    files: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"cgroups": self.cgroups.to_dict(), "files": dict(self.files)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Snapshot:
        return cls(cgroups=ContainerCgroups.from_dict(data["cgroups"]), files=dict(data["files"]))


@dataclass(frozen=True)
class Done:
    """One write as the kernel took it: what was written and what reading the file gave back."""

    path: str
    value: str
    read_back: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Applied:
    """The outcome of ``apply`` / ``set_limits`` / ``restore``.

    ``done`` lists the writes in order with their read-back; ``elapsed_s`` is the wall time of the
    writes, checks and read-backs. ``set_limits`` also fills ``snapshot`` (for ``restore``) and
    ``limits`` (read back after). ``skipped`` names files ``restore`` found gone.
    """

    done: tuple[Done, ...] = ()
    elapsed_s: float = 0.0
    snapshot: Snapshot | None = None
    limits: Limits | None = None
    skipped: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "done": [d.to_dict() for d in self.done],
            "elapsed_s": self.elapsed_s,
            "snapshot": self.snapshot.to_dict() if self.snapshot else None,
            "limits": self.limits.to_dict() if self.limits else None,
            "skipped": list(self.skipped),
        }
