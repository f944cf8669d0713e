"""Plain values the client returns. No gRPC or protobuf here, so importing them is cheap.

CRI sends 0 (or "") for "not specified"; these values say ``None`` instead, and zero never
stands for "unset" on our side of the wire.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

#: cpu_quota_us / memory_limit_bytes / memory_swap_limit_bytes value meaning "no limit"
#: (what runc writes as -1 to the cgroup v1 files, "max" on v2).
UNLIMITED = -1

# CFS bandwidth bounds the kernel accepts (kernel/sched/core.c): quota and period >= 1 ms,
# period <= 1 s.
MIN_CFS_US = 1_000
MAX_CFS_PERIOD_US = 1_000_000
# cpu.shares bounds (kernel MIN_SHARES / MAX_SHARES).
MIN_CPU_SHARES = 2
MAX_CPU_SHARES = 262_144


@dataclasses.dataclass(frozen=True)
class VersionInfo:
    runtime_name: str
    runtime_version: str
    runtime_api_version: str


@dataclasses.dataclass(frozen=True)
class HugepageLimit:
    page_size: str
    limit_bytes: int


@dataclasses.dataclass(frozen=True)
class LinuxResources:
    """A container's LinuxContainerResources; ``None`` = not specified (CRI's 0 or "")."""

    cpu_period_us: int | None = None
    cpu_quota_us: int | None = None
    cpu_shares: int | None = None
    memory_limit_bytes: int | None = None
    memory_swap_limit_bytes: int | None = None
    oom_score_adj: int | None = None
    cpuset_cpus: str | None = None
    cpuset_mems: str | None = None
    hugepage_limits: tuple[HugepageLimit, ...] = ()
    unified: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form (``from_dict`` reads it back)."""
        # Field by field rather than dataclasses.asdict, whose recursive deep copy is most of an
        # apply's conversion time on the agent's hot path.
        return {"cpu_period_us": self.cpu_period_us, "cpu_quota_us": self.cpu_quota_us,
                "cpu_shares": self.cpu_shares, "memory_limit_bytes": self.memory_limit_bytes,
                "memory_swap_limit_bytes": self.memory_swap_limit_bytes, "oom_score_adj": self.oom_score_adj,
                "cpuset_cpus": self.cpuset_cpus, "cpuset_mems": self.cpuset_mems,
                "hugepage_limits": [{"page_size": h.page_size, "limit_bytes": h.limit_bytes}
                                    for h in self.hugepage_limits],
                "unified": dict(self.unified)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LinuxResources:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LinuxResources fields {unknown}; accepted: {sorted(known)}")
        values = dict(data)
        values["hugepage_limits"] = tuple(HugepageLimit(**h) for h in values.get("hugepage_limits", ()))
        values["unified"] = dict(values.get("unified", {}))
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class ContainerInfo:
    """What the runtime says about one container (ContainerStatus, verbose)."""

    id: str
    sandbox_id: str
    name: str
    pod_name: str
    pod_namespace: str
    pod_uid: str
    attempt: int
    state: str  # "created", "running", "exited" or "unknown"
    pid: int | None
    cgroups_path: str | None
    resources: LinuxResources
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    runtime_name: str = ""

    @property
    def running(self) -> bool:
        return self.state == "running"


@dataclasses.dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
