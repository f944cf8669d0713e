"""One experiment's record: a typed value, its JSON form on disk, and the checks that decide it is whole.

The engine keeps exactly one ``Experiment`` per container under experiment, in memory and in the
state directory (``daemonset.state``), and it is the only writer. The record holds everything a
restart needs: the target down to the pod UID and container id, the owner (a node-local client or
a ResourceChaos object), the raw snapshot of the originals, what is in force and how it got there,
the phase, the end time and the last failure with its next retry.

On disk a record is versioned (``schema``). Schema 1 (the agent before 0.2) is migrated on read;
a newer schema, or a record that fails any check here, is not guessed at: ``decode`` raises
``RecordError`` with the reason, and the engine lists the file as damaged instead of ignoring it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from daemonset.types import (
    DEFAULT_LATENCY_S,
    MAX_LATENCY_S,
    MIN_LATENCY_S,
    NODE_LOCAL,
    UNLIMITED,
    Failure,
    Method,
    Owner,
    OwnerKind,
    Phase,
    ResolvedTarget,
    Resource,
)

SCHEMA_VERSION = 2
CPU_MEM = (Resource.CPU, Resource.MEMORY)
BANDWIDTH = (Resource.INGRESS, Resource.EGRESS)


class RecordError(ValueError):
    """A state record that cannot be used as it is; the message says which field and why."""


@dataclasses.dataclass(frozen=True)
class NetState:
    """The pod's shaping: its host veth, our IFB key (the sandbox id) and what the veth had before."""

    host_ifname: str
    ifb_key: str
    snapshot: dict[str, Any] | None = None  # netshape's Snapshot.to_dict() of the first shaping
    ingress_hook_before: bool | None = None  # had the veth an ingress qdisc before we came?
    latency_s: float = DEFAULT_LATENCY_S  # the queue budget of each shaped direction


@dataclasses.dataclass(frozen=True)
class Step:
    """A later step of a stepped profile: ``values`` in force from ``at`` (seconds since the epoch)."""

    at: float
    values: dict[Resource, int]


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything the engine knows of one container under experiment. Immutable: changes make a new value."""

    experiment_id: str
    target: ResolvedTarget
    sandbox_id: str
    owner: Owner
    phase: Phase
    started_at: float
    expires_at: float | None
    original: dict[Resource, int]  # the values read before the first change (for reports)
    desired: dict[Resource, int]
    methods: dict[Resource, Method]  # how each desired value was last put in force
    cgroup_snapshot: dict[str, Any] | None  # cgroupctl Snapshot.to_dict(): the raw original files
    cri_original: dict[str, Any] | None = None  # the runtime's view of the resources before the first change
    cri_sent: dict[str, Any] | None = None  # the resources we last sent the runtime; None: never
    cri_intent: tuple[Resource, ...] = ()  # may have reached the runtime before a crash (first change)
    net: NetState | None = None
    drift_corrections: int = 0
    only_container: bool = False  # resolved without naming the container
    failure: Failure | None = None
    end_reason: str = ""  # why the restore under way was started (reverting phases)
    steps: tuple[Step, ...] = ()  # the profile's steps still to come, by time
    steps_total: int = 0  # the profile's steps, the first included (0: no profile)
    step_note: str = ""  # why the next step is held
    oom_kills_at_start: int | None = None  # the memory cgroup's OOM kill count when the experiment began

    @property
    def step(self) -> int:
        """The profile's step in force (1-based); 0 without a profile."""
        return self.steps_total - len(self.steps) if self.steps_total else 0

    @property
    def key(self) -> str:
        return self.target.key

    @property
    def pod_key(self) -> str:
        return f"{self.target.namespace}/{self.target.pod}"

    @property
    def cri_used(self) -> bool:
        return self.cri_sent is not None

    def touched(self) -> set[Resource]:
        """Resources this experiment may have changed on the node (restore puts these back)."""
        out = set(self.methods) | set(self.cri_intent)
        if self.phase is Phase.APPLYING:
            out |= set(self.desired)
        return out

    def replace(self, **changes: Any) -> Experiment:
        # A copy of the instance dict rather than dataclasses.replace, which runs __init__ over all 25
        # fields: an apply makes half a dozen of these on the agent's hot path. Same semantics (the
        # class has no __post_init__ and no defaults computed at construction); unknown names raise.
        unknown = changes.keys() - _EXPERIMENT_FIELDS
        if unknown:
            raise TypeError(f"Experiment has no field(s) {sorted(unknown)}")
        new = object.__new__(Experiment)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new


_EXPERIMENT_FIELDS = frozenset(f.name for f in dataclasses.fields(Experiment))


# --- JSON -------------------------------------------------------------------------------------


def encode(exp: Experiment) -> dict[str, Any]:
    """The on-disk form (JSON types only)."""
    return {
        "schema": SCHEMA_VERSION,
        "key": exp.key,
        "experiment_id": exp.experiment_id,
        "target": exp.target.to_dict(),
        "sandbox_id": exp.sandbox_id,
        "owner": {"kind": exp.owner.kind.value, "namespace": exp.owner.namespace, "name": exp.owner.name,
                  "uid": exp.owner.uid},
        "phase": exp.phase.value,
        "started_at": exp.started_at,
        "expires_at": exp.expires_at,
        "original": {r.value: v for r, v in exp.original.items()},
        "desired": {r.value: v for r, v in exp.desired.items()},
        "methods": {r.value: m.value for r, m in exp.methods.items()},
        "cgroup_snapshot": exp.cgroup_snapshot,
        "cri_original": exp.cri_original,
        "cri_sent": exp.cri_sent,
        "cri_intent": [r.value for r in exp.cri_intent],
        "net": dataclasses.asdict(exp.net) if exp.net else None,
        "drift_corrections": exp.drift_corrections,
        "only_container": exp.only_container,
        "failure": dataclasses.asdict(exp.failure) if exp.failure else None,
        "end_reason": exp.end_reason,
        "steps": [{"at": s.at, "values": {r.value: v for r, v in s.values.items()}} for s in exp.steps],
        "steps_total": exp.steps_total,
        "step_note": exp.step_note,
        "oom_kills_at_start": exp.oom_kills_at_start,
    }


def decode(data: Any, *, legacy_owners: dict[str, Any] | None = None) -> Experiment:
    """A record read from disk; raises RecordError naming what is wrong (never KeyError or TypeError).

    ``legacy_owners``: schema 1's ``cluster/owners.json`` (container key -> ResourceChaos
    namespace, name, uid), whose entries become the migrated records' owners."""
    if not isinstance(data, dict):
        raise RecordError(f"not a JSON object but {type(data).__name__}")
    schema = data.get("schema")
    if schema == 1:
        data = _migrate_v1(data, legacy_owners or {})
    elif schema != SCHEMA_VERSION:
        raise RecordError(f"schema {schema!r} is not one this agent reads (1 or {SCHEMA_VERSION});"
                          " kept untouched for a newer agent")
    r = _Reader(data)
    t = r.obj("target")
    target = ResolvedTarget(
        namespace=_nonempty(r, t, "target.namespace"), pod=_nonempty(r, t, "target.pod"),
        container=_nonempty(r, t, "target.container"), container_id=_nonempty(r, t, "target.container_id"),
        pod_uid=r.typed(t, "target.pod_uid", str, default=""), node_name=r.typed(t, "target.node_name", str, default=""))
    o = r.obj("owner")
    try:
        owner = Owner(kind=OwnerKind(r.typed(o, "owner.kind", str)), namespace=r.typed(o, "owner.namespace", str, default=""),
                      name=r.typed(o, "owner.name", str, default=""), uid=r.typed(o, "owner.uid", str, default=""))
    except ValueError as e:
        raise RecordError(f"owner.kind: {e}") from None
    try:
        phase = Phase(r.typed(data, "phase", str))
    except ValueError:
        raise RecordError(f"phase {data.get('phase')!r} is not one of {', '.join(p.value for p in Phase)}") from None
    net = None
    if data.get("net") is not None:
        n = r.obj("net")
        snap = n.get("snapshot")
        if snap is not None and not isinstance(snap, dict):
            raise RecordError("net.snapshot is not an object")
        hook = n.get("ingress_hook_before")
        if hook is not None and not isinstance(hook, bool):
            raise RecordError("net.ingress_hook_before is not true, false or null")
        # Records from before the budget was kept have none: the default is what their shaping got.
        latency = DEFAULT_LATENCY_S if n.get("latency_s") is None else r.number(n, "net.latency_s")
        if not MIN_LATENCY_S <= latency <= MAX_LATENCY_S:
            raise RecordError(f"net.latency_s is {latency!r}, not {MIN_LATENCY_S:g} to {MAX_LATENCY_S:g} seconds")
        net = NetState(host_ifname=_nonempty(r, n, "net.host_ifname"), ifb_key=_nonempty(r, n, "net.ifb_key"),
                       snapshot=snap, ingress_hook_before=hook, latency_s=latency)
    failure = None
    if data.get("failure") is not None:
        f = r.obj("failure")
        failure = Failure(reason=r.typed(f, "failure.reason", str), attempts=r.typed(f, "failure.attempts", int),
                          since=r.number(f, "failure.since"), next_retry_at=r.number(f, "failure.next_retry_at", optional=True))
    snap = data.get("cgroup_snapshot")
    if snap is not None and not (isinstance(snap, dict) and isinstance(snap.get("files"), dict)
                                 and isinstance(snap.get("cgroups"), dict)):
        raise RecordError("cgroup_snapshot is not a snapshot (an object with cgroups and files)")
    for name in ("cri_original", "cri_sent"):
        if data.get(name) is not None and not isinstance(data[name], dict):
            raise RecordError(f"{name} is not an object")
    steps = []
    for i, raw in enumerate(r.typed(data, "steps", list, default=[])):
        if not isinstance(raw, dict) or not isinstance(raw.get("values"), dict):
            raise RecordError(f"steps[{i}] is not a step (an object with at and values)")
        values = _Reader({"values": raw["values"]}).quantities("values")
        steps.append(Step(at=r.number(raw, f"steps[{i}].at"), values=values))
    exp = Experiment(
        experiment_id=_nonempty(r, data, "experiment_id"),
        target=target,
        sandbox_id=r.typed(data, "sandbox_id", str, default=""),
        owner=owner,
        phase=phase,
        started_at=r.number(data, "started_at"),
        expires_at=r.number(data, "expires_at", optional=True),
        original=r.quantities("original"),
        desired=r.quantities("desired"),
        methods=r.methods("methods"),
        cgroup_snapshot=snap,
        cri_original=data.get("cri_original"),
        cri_sent=data.get("cri_sent"),
        cri_intent=tuple(r.resource(v, "cri_intent") for v in r.typed(data, "cri_intent", list, default=[])),
        net=net,
        drift_corrections=r.typed(data, "drift_corrections", int, default=0),
        only_container=r.typed(data, "only_container", bool, default=False),
        failure=failure,
        end_reason=r.typed(data, "end_reason", str, default=""),
        steps=tuple(steps),
        steps_total=r.typed(data, "steps_total", int, default=0),
        step_note=r.typed(data, "step_note", str, default=""),
        oom_kills_at_start=r.typed(data, "oom_kills_at_start", int, default=None),
    )
    if exp.steps and exp.steps_total < len(exp.steps) + 1:
        raise RecordError(f"steps_total {exp.steps_total} is fewer than the {len(exp.steps)} steps still to come plus one")
    if not exp.desired:
        raise RecordError("desired is empty: the record names no change")
    if data.get("key") not in (None, exp.key):
        raise RecordError(f"key {data.get('key')!r} does not match its target {exp.key!r}")
    if (set(exp.desired) & set(CPU_MEM)) and exp.cgroup_snapshot is None:
        raise RecordError("a CPU or memory change without the snapshot of the original cgroup files")
    if (set(exp.desired) & set(BANDWIDTH)) and exp.net is None:
        raise RecordError("a bandwidth change without the shaping's net section")
    return exp


def key_of(data: Any) -> str:
    """The container key a (possibly damaged) record names, or '' when it names none we can trust."""
    if isinstance(data, dict):
        key = data.get("key")
        if isinstance(key, str) and key.count("/") == 2:
            return key
    return ""


def _migrate_v1(data: dict[str, Any], legacy_owners: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 kept the owner in a separate file and ``cri_used`` as a flag; no failures, no owner."""
    out = dict(data)
    out["schema"] = SCHEMA_VERSION
    owner = legacy_owners.get(data.get("key")) if isinstance(data.get("key"), str) else None
    if isinstance(owner, dict) and all(isinstance(owner.get(f), str) for f in ("namespace", "name", "uid")):
        out["owner"] = {"kind": OwnerKind.RESOURCE_CHAOS.value, "namespace": owner["namespace"],
                        "name": owner["name"], "uid": owner["uid"]}
    else:
        out["owner"] = {"kind": NODE_LOCAL.kind.value}
    # v1 did not keep what it sent; the restore sends the whole original, so "sent something" is enough.
    out["cri_sent"] = {} if data.get("cri_used") else None
    out.pop("cri_used", None)
    if out.get("phase") == "new":
        out["phase"] = Phase.APPLYING.value
    return out


class _Reader:
    """Typed field access that turns every mismatch into a RecordError naming the field."""

    def __init__(self, data: dict[str, Any]):
        self.data = data

    def obj(self, name: str) -> dict[str, Any]:
        v = self.data.get(name)
        if not isinstance(v, dict):
            raise RecordError(f"{name} is missing or not an object")
        return v

    def typed(self, d: dict[str, Any], name: str, kind: type, *, default: Any = ...) -> Any:
        field = name.rsplit(".", 1)[-1]
        if field not in d or d[field] is None:
            if default is ...:
                raise RecordError(f"{name} is missing")
            return default
        v = d[field]
        if kind is int and isinstance(v, bool) or not isinstance(v, kind):
            raise RecordError(f"{name} is {v!r}, not a {kind.__name__}")
        return v

    def number(self, d: dict[str, Any], name: str, *, optional: bool = False) -> Any:
        field = name.rsplit(".", 1)[-1]
        v = d.get(field)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RecordError(f"{name} is {v!r}, not a number")
        return float(v)

    @staticmethod
    def resource(name: Any, where: str) -> Resource:
        try:
            return Resource(name)
        except ValueError:
            raise RecordError(f"{where} names {name!r}, not one of cpu, memory, ingress, egress") from None

    def quantities(self, name: str) -> dict[Resource, int]:
        out = {}
        for k, v in self.obj(name).items():
            if isinstance(v, bool) or not isinstance(v, int) or (v < 0 and v != UNLIMITED):
                raise RecordError(f"{name}.{k} is {v!r}, not a whole quantity")
            out[self.resource(k, name)] = v
        return out

    def methods(self, name: str) -> dict[Resource, Method]:
        out = {}
        for k, v in self.obj(name).items():
            try:
                out[self.resource(k, name)] = Method(v)
            except ValueError:
                raise RecordError(f"{name}.{k} is {v!r}, not a method") from None
        return out


def _nonempty(r: _Reader, d: dict[str, Any], name: str) -> str:
    v = r.typed(d, name, str)
    if not v:
        raise RecordError(f"{name} is empty")
    return v
