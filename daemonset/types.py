"""Plain request and result values of the engine; both front doors (the gRPC server here, cluster mode)
speak these. No gRPC, no kernel access: importing this module is cheap.

Units are in the names. ``None`` = not set / leave alone; ``UNLIMITED`` = no limit in force.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from typing import Any

#: A quantity with no limit in force (CFS quota -1, memory "max", no qdisc).
UNLIMITED = -1

# Bounds the engine accepts before it asks anyone. The kernel and the packages check their own
# finer bounds (e.g. the CFS quota >= 1 ms at the container's period) and name them.
MAX_MILLICPU = 1_000_000  # 1000 CPUs
MIN_MEMORY_BYTES = 4 * 1024 * 1024  # below this a container cannot start a shell
MAX_MEMORY_BYTES = 2**50  # 1 PiB
MIN_BANDWIDTH_BPS = 8_000  # 1 kB/s
MAX_BANDWIDTH_BPS = 100 * 10**9  # 100 Gbit/s, as netshape
MAX_DURATION_S = 30 * 24 * 3600.0
# The queue of each shaped direction holds this much time at its rate (netshape's bounds: the same
# numbers, checked by a unit test, kept here so that importing this module stays cheap).
DEFAULT_LATENCY_S = 0.050
MIN_LATENCY_S, MAX_LATENCY_S = 0.001, 10.0

# Kubernetes object names: namespace and pod are DNS-1123 (sub)domains, containers DNS-1123 labels.
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class Method(str, enum.Enum):
    AUTO = "auto"
    CRI = "cri"
    CGROUP = "cgroup"
    NETLINK = "netlink"  # bandwidth


class Resource(str, enum.Enum):
    CPU = "cpu"  # millicpu
    MEMORY = "memory"  # bytes
    INGRESS = "ingress"  # bit/s into the pod
    EGRESS = "egress"  # bit/s out of the pod


UNIT_OF = {Resource.CPU: "millicpu", Resource.MEMORY: "bytes", Resource.INGRESS: "bps", Resource.EGRESS: "bps"}


class EngineError(Exception):
    """Base of every error the engine reports; the message is one line for a person."""


class InvalidRequest(EngineError):
    """A request value outside what is accepted; nothing was changed."""


class TargetNotFound(EngineError):
    """The namespace, pod or container does not exist on this node; the message lists what does."""


class TargetNotRunning(EngineError):
    """The container exists but is not running."""


class Denied(EngineError):
    """The target is in a namespace this agent refuses to touch."""


class Refused(EngineError):
    """The kernel or runtime refused the change (e.g. memory below usage); nothing was changed."""


class Conflict(EngineError):
    """The change collides with another experiment (e.g. bandwidth of a pod another container shapes)."""


class ApplyFailed(EngineError):
    """A part of the change failed; what had been applied was rolled back (the message says what failed)."""


class RuntimeUnavailable(EngineError):
    """The container runtime does not answer."""


class RevertIncomplete(EngineError):
    """The originals could not all be put back yet; the agent retries with backoff (the message says what is
    still changed and when the next try is)."""

    def __init__(self, message: str, *, next_retry_at: float | None = None):
        super().__init__(message)
        self.next_retry_at = next_retry_at


class Phase(str, enum.Enum):
    """Where an experiment is in its life; a record leaves the state directory when it has ended."""

    APPLYING = "applying"  # the first change is being made (the record holds the originals)
    ACTIVE = "active"
    REVERTING = "reverting"  # the originals are being put back
    REVERT_FAILING = "revert-failing"  # the kernel or runtime refused the restore; retried with backoff
    ROLLBACK_FAILED = "rollback-failed"  # a failed apply could not be undone; retried as a full restore


class OwnerKind(str, enum.Enum):
    NODE_LOCAL = "node-local"  # a kubectl-chaos --agent-address client (root on the node)
    RESOURCE_CHAOS = "ResourceChaos"  # a ResourceChaos object, through the agent's controller


@dataclasses.dataclass(frozen=True)
class Owner:
    """Who an experiment belongs to; kept in its record, written in the same atomic step."""

    kind: OwnerKind = OwnerKind.NODE_LOCAL
    namespace: str = ""
    name: str = ""
    uid: str = ""

    def describe(self) -> str:
        if self.kind is OwnerKind.NODE_LOCAL:
            return "a node-local experiment"
        return f"ResourceChaos {self.namespace}/{self.name}"


NODE_LOCAL = Owner()


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why the last attempt at an experiment's pending step failed, and when the supervisor tries again."""

    reason: str
    attempts: int
    since: float  # seconds since the epoch, first failure
    next_retry_at: float | None  # seconds since the epoch


class EventKind(str, enum.Enum):
    APPLIED = "applied"
    ENDED = "ended"
    REVERT_FAILING = "revert-failing"


# Reasons an experiment ended (EngineEvent.reason for ENDED).
END_REQUESTED = "reset"
END_EXPIRED = "expired"
END_POD_DELETED = "pod deleted"
END_POD_REPLACED = "pod replaced"
END_POD_STOPPED = "pod stopped"
END_SUPERSEDED = "superseded by an in-place resize"
END_RECOVERED = "half-made change undone after a restart"
END_ROLLED_BACK = "rollback finished"


@dataclasses.dataclass(frozen=True)
class Target:
    namespace: str
    pod: str
    container: str | None = None  # None: the pod's only container

    def validate(self) -> None:
        if not _DNS_SUBDOMAIN.match(self.namespace or ""):
            raise InvalidRequest(f"namespace {self.namespace!r} is not a valid name (lowercase DNS-1123, e.g. 'default')")
        if len(self.namespace) > 63:
            raise InvalidRequest(f"namespace {self.namespace!r} is longer than 63 characters")
        if not _DNS_SUBDOMAIN.match(self.pod or ""):
            raise InvalidRequest(f"pod {self.pod!r} is not a valid name (lowercase DNS-1123 subdomain)")
        if self.container is not None and not _DNS_LABEL.match(self.container):
            raise InvalidRequest(f"container {self.container!r} is not a valid name (lowercase DNS-1123 label)")

    def describe(self) -> str:
        return f"{self.namespace}/{self.pod}" + (f" container {self.container}" if self.container else "")


@dataclasses.dataclass(frozen=True)
class Changes:
    cpu_millicpu: int | None = None
    memory_bytes: int | None = None
    ingress_bps: int | None = None
    egress_bps: int | None = None

    def as_map(self) -> dict[Resource, int]:
        pairs = {
            Resource.CPU: self.cpu_millicpu,
            Resource.MEMORY: self.memory_bytes,
            Resource.INGRESS: self.ingress_bps,
            Resource.EGRESS: self.egress_bps,
        }
        return {r: v for r, v in pairs.items() if v is not None}

    def validate(self) -> None:
        _check_int("cpu_millicpu", self.cpu_millicpu, 1, MAX_MILLICPU, "1m to 1000 CPUs")
        _check_int("memory_bytes", self.memory_bytes, MIN_MEMORY_BYTES, MAX_MEMORY_BYTES, "4Mi to 1Pi")
        for name in ("ingress_bps", "egress_bps"):
            _check_int(name, getattr(self, name), MIN_BANDWIDTH_BPS, MAX_BANDWIDTH_BPS, "8kbit/s to 100Gbit/s")
        if not self.as_map():
            raise InvalidRequest("no change asked for; give at least one of cpu, memory, ingress or egress bandwidth")


def _check_int(name: str, value: Any, low: int, high: int, accepted: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidRequest(f"{name} {value} is out of range; accepted: {accepted} ({low}..{high})")


MAX_STEPS = 1000


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """One later step of a stepped profile: ``changes`` go in force ``offset_s`` after the request."""

    offset_s: float
    changes: Changes


@dataclasses.dataclass(frozen=True)
class ApplyRequest:
    target: Target
    changes: Changes  # in force at once (the profile's first step)
    duration_s: float | None = None
    method: Method = Method.AUTO
    force: bool = False
    dry_run: bool = False
    owner: Owner = NODE_LOCAL
    steps: tuple[StepSpec, ...] = ()  # the rest of a stepped profile, by increasing offset; the agent runs them
    # The queue budget of the shaped directions; None: the experiment's (DEFAULT_LATENCY_S when new).
    latency_s: float | None = None

    def validate(self) -> None:
        self.target.validate()
        self.changes.validate()
        if self.latency_s is not None:
            lat = self.latency_s
            if isinstance(lat, bool) or not isinstance(lat, (int, float)) or not math.isfinite(lat):
                raise InvalidRequest(f"latency {lat!r} must be a number of seconds")
            if not MIN_LATENCY_S <= lat <= MAX_LATENCY_S:
                raise InvalidRequest(f"latency {lat * 1000:g}ms is out of range; accepted: 1ms to 10s"
                                     f" ({MIN_LATENCY_S:g}..{MAX_LATENCY_S:g} s)")
            if self.changes.ingress_bps is None and self.changes.egress_bps is None:
                raise InvalidRequest("latency bounds the queue of a shaped direction; give it with an ingress or"
                                     " egress bandwidth")
        if len(self.steps) > MAX_STEPS:
            raise InvalidRequest(f"{len(self.steps)} steps is more than the accepted {MAX_STEPS}")
        last = 0.0
        for i, step in enumerate(self.steps, 1):
            o = step.offset_s
            if isinstance(o, bool) or not isinstance(o, (int, float)) or not math.isfinite(o) or o <= last:
                raise InvalidRequest(f"step {i} at offset {o!r}s: offsets must be positive seconds, each after the"
                                     f" one before ({last:g}s)")
            if o > MAX_DURATION_S:
                raise InvalidRequest(f"step {i} at {o:g}s is later than the accepted 30 days")
            step.changes.validate()
            if set(step.changes.as_map()) - set(self.changes.as_map()):
                raise InvalidRequest(f"step {i} changes {', '.join(sorted(r.value for r in step.changes.as_map()))}"
                                     " that the first step does not: a profile steps the resources it starts with")
            last = o
        if self.duration_s is not None:
            d = self.duration_s
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d <= 0:
                raise InvalidRequest(f"duration {d!r} must be a positive number of seconds")
            if d > MAX_DURATION_S:
                raise InvalidRequest(f"duration {d}s is longer than the accepted 30 days ({MAX_DURATION_S:.0f}s)")
        if not isinstance(self.method, Method) or self.method is Method.NETLINK:
            raise InvalidRequest(f"method {self.method!r} is not accepted; accepted: auto, cri, cgroup")


@dataclasses.dataclass(frozen=True)
class RevertRequest:
    target: Target
    dry_run: bool = False
    force: bool = False  # memory may go back below what the container cannot give back (v1 waits for reclaim)
    owner: Owner | None = None  # None: whoever owns it (node-local reset); else only that owner's experiment

    def validate(self) -> None:
        self.target.validate()


@dataclasses.dataclass(frozen=True)
class ResolvedTarget:
    namespace: str
    pod: str
    container: str
    container_id: str
    pod_uid: str = ""
    node_name: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.pod}/{self.container}"

    def describe(self) -> str:
        return f"{self.namespace}/{self.pod} container {self.container} ({self.container_id[:12]})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResolvedTarget:
        return cls(**{f.name: d.get(f.name, "") for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class QueueResult:
    """The queue of one shaped direction, as the kernel holds it.

    ``latency_s`` is how long the full queue takes to drain at the rate in force (``limit_bytes`` /
    rate): the budget, or more where the floor of four full frames is longer than the budget.
    ``limit_packets`` instead of bytes: the kernel's default leaf (shaping from before queues were
    sized). ``unknown`` non-empty: nothing could be read, and why."""

    budget_s: float  # what the experiment asked for
    limit_bytes: int | None = None
    limit_packets: int | None = None
    latency_s: float | None = None
    unknown: str = ""


@dataclasses.dataclass(frozen=True)
class ResourceResult:
    """One resource of one container: the original, the value before this call, what was asked, what the kernel says."""

    resource: Resource
    original: int
    previous: int
    requested: int
    in_force: int
    method: Method
    # Non-empty when ``in_force`` could not be read from the kernel: why (``in_force`` is then meaningless).
    unknown: str = ""
    queue: QueueResult | None = None  # bandwidth: the direction's queue (None: not read, e.g. a revert)


@dataclasses.dataclass(frozen=True)
class ApplyResult:
    experiment_id: str
    target: ResolvedTarget
    resources: tuple[ResourceResult, ...]
    expires_at: float | None  # seconds since the epoch
    dry_run: bool = False
    created: bool = False  # this request started the experiment (False: it changed one in force)
    # A stepped profile's progress, as ExperimentInfo has it (steps_total 0: no profile).
    steps_total: int = 0
    step: int = 0
    next_step_at: float | None = None
    next_step: dict[Resource, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RevertResult:
    target: ResolvedTarget
    resources: tuple[ResourceResult, ...]
    was_active: bool
    dry_run: bool = False
    # What could not be put back, one phrase each (e.g. a damaged record's lost originals); empty = exact.
    not_restored: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ExperimentInfo:
    experiment_id: str
    target: ResolvedTarget
    resources: tuple[ResourceResult, ...]
    started_at: float
    expires_at: float | None
    drift_corrections: int
    phase: Phase = Phase.ACTIVE
    owner: Owner = NODE_LOCAL
    failure: Failure | None = None
    steps_total: int = 0  # a stepped profile's steps, the first included; 0 = no profile
    step: int = 0  # the step in force (1-based)
    next_step_at: float | None = None
    next_step: dict[Resource, int] = dataclasses.field(default_factory=dict)
    step_note: str = ""  # why the next step is held (e.g. memory below what the container holds)


@dataclasses.dataclass(frozen=True)
class DamagedRecord:
    """A state record the agent cannot read: listed in status so the change it held is never invisible."""

    file: str
    reason: str
    key: str = ""  # namespace/pod/container when known (from the record or by matching its file name)
    cleaned: tuple[str, ...] = ()  # what the agent removed because it is recognisably ours


@dataclasses.dataclass(frozen=True)
class EngineEvent:
    """What the engine's supervisor tells the front doors (the controller turns these into status and Events)."""

    kind: EventKind
    target: ResolvedTarget
    owner: Owner
    experiment_id: str
    reason: str = ""  # ENDED: one of the END_* reasons; REVERT_FAILING: what was refused, with the values
    resources: tuple[ResourceResult, ...] = ()  # read back from the kernel (ENDED: the restored values)
    next_retry_at: float | None = None  # REVERT_FAILING
    expires_at: float | None = None  # APPLIED
