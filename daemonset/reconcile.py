"""What the controller should do for one ResourceChaos, as a pure function.

``reconcile(key, obj, pods, experiments, node, ...)`` looks at the object (None once it is gone),
the pods of its namespace on this node, the engine's experiments in that namespace and the engine
events not yet answered, and returns a list of actions. It reads no clock, calls nothing, and
changes nothing; :mod:`daemonset.controller` runs the actions against the engine and the API.

Ownership comes from the engine's own records (``ExperimentInfo.owner``): an experiment is this
object's when its owner is the ResourceChaos with this namespace, name and uid. One with the same
name but another uid belongs to an older object of that name and is reverted.

Time is the engine's: expiry and revert retries happen there and come back as ``EngineEvent`` s. The
status keeps what was answered: an entry per pod with the generation it answers, the experiment
id, and the values read back. Status and Event messages name only objects of the object's own
namespace.
"""

from __future__ import annotations

import dataclasses
import fractions
import re
from collections.abc import Iterable, Mapping
from typing import Any

from daemonset import crd
from daemonset.policy import Policy, namespace_refusal, refusal
from daemonset.types import (
    END_EXPIRED,
    END_REQUESTED,
    END_SUPERSEDED,
    UNLIMITED,
    ApplyRequest,
    Changes,
    EngineEvent,
    ExperimentInfo,
    Method,
    Owner,
    OwnerKind,
    Phase,
    QueueResult,
    ResourceResult,
    StepSpec,
    Target,
)

Key = tuple[str, str]  # (namespace, name) of a ResourceChaos
Resources = tuple[tuple[str, str, fractions.Fraction], ...]  # (("limits", "cpu", 1), ...) of one container
Baselines = Mapping[tuple[str, str], Resources]  # (pod uid, container) -> the spec's resources when applied

RESOURCE_NAMES = {"cpu": "cpu", "memory": "memory", "ingress": "bandwidth-ingress", "egress": "bandwidth-egress"}

# Why the controller asks for a revert (the status says "reverted: <reason>").
REASON_DELETED = "deleted"
REASON_OBJECT_GONE = "its ResourceChaos was deleted"
REASON_POD_DELETED = "pod deleted"
REASON_POD_REPLACED = "pod replaced"
REASON_UNMATCHED = "pod no longer matches"
REASON_RESIZE_PENDING = "an in-place resize of the pod is pending"
REASON_DISABLED = "the namespace is no longer enabled for kubectl-chaos"

# An experiment that ended while no event reached the controller (an agent restart in between).
UNKNOWN_END = "ended on the node while the agent was not watching; the values it restored were not reported"

# An entry of a pod that is gone, whose experiment has ended (Reverted or Failed), stays this long so
# people can read why, then this node stops writing it: status.targets does not grow with every pod
# a selector experiment ever matched (it is capped at crd.MAX_TARGETS).
PRUNE_AFTER_S = 300.0

LIVE = (Phase.ACTIVE, Phase.APPLYING)  # in force: the controller may revert, supersede or change it
FAILING = (Phase.REVERT_FAILING, Phase.ROLLBACK_FAILED)  # the engine retries by itself


# ---------------------------------------------------------------------------------------------
# Actions


@dataclasses.dataclass(frozen=True)
class Apply:
    """``engine.apply(request)``; the status entry and the Event come from its result."""

    request: ApplyRequest
    generation: int
    pod: dict = dataclasses.field(compare=False, repr=False)
    previous: dict | None = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Revert:
    """``engine.revert`` of this owner's experiment on ``target``. ``previous`` is the status entry the
    result replaces (None: no status to write, the object is gone); ``pod`` gets the Event."""

    target: Target
    owner: Owner
    reason: str
    experiment_id: str
    pod: dict | None = dataclasses.field(default=None, compare=False, repr=False)
    previous: dict | None = dataclasses.field(default=None, compare=False, repr=False)
    write_status: bool = True


@dataclasses.dataclass(frozen=True)
class Supersede:
    """``engine.supersede``: end the experiment without putting old CPU/memory values over the kubelet's."""

    target: Target
    reason: str
    experiment_id: str
    pod: dict = dataclasses.field(compare=False, repr=False)
    previous: dict | None = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class WriteStatus:
    """Put these ``status.targets`` entries in place (by pod); ``node``: this node's entry in
    ``status.nodes`` when it refuses the object as a whole (None: a summary of its targets)."""

    entries: tuple[dict, ...]
    node: dict | None = None
    # Pods whose entries this node stops writing (the API server removes them): gone pods, long ended.
    drop: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SetFinalizer:
    """Add this node's finalizer (before an apply), or drop it: the executor drops it only when the
    engine holds no experiment of this object."""

    present: bool


@dataclasses.dataclass(frozen=True)
class Event:
    pod: dict = dataclasses.field(compare=False, repr=False)
    reason: str
    message: str
    warning: bool = False

    @property
    def pod_name(self) -> str:
        return self.pod["metadata"]["name"]


@dataclasses.dataclass(frozen=True)
class Remember:
    """The spec resources of each target container as they were when applied (to see an in-place
    resize): the whole map for this object, replacing what was remembered."""

    baselines: Mapping[tuple[str, str], Resources]


Action = Apply | Revert | Supersede | WriteStatus | SetFinalizer | Event | Remember


# ---------------------------------------------------------------------------------------------
# The decision


def owned_by(info: ExperimentInfo, key: Key) -> bool:
    return info.owner.kind == OwnerKind.RESOURCE_CHAOS and (info.owner.namespace, info.owner.name) == key


def reconcile(key: Key, obj: dict | None, pods: Mapping[str, dict], experiments: Iterable[ExperimentInfo],
              node: str, *, ended: Iterable[EngineEvent] = (), baselines: Baselines | None = None,
              now: float = 0.0, policy: Policy | None = None, prune_after_s: float = PRUNE_AFTER_S) -> list[Action]:
    """The actions that bring this node in line with the object ``key`` (``obj`` None: deleted).

    ``pods``: this node's pods in the object's namespace, by name. ``experiments``: the engine's in
    that namespace. ``ended``: ENDED events of this object's experiments not yet answered.
    ``baselines``: what ``Remember`` last said. ``now``: epoch seconds, for timestamps.
    ``policy``: the namespace opt-in and raise policy (daemonset.policy) every apply is checked
    against; the controller always gives one. None applies no policy (as node-local mode).
    ``prune_after_s``: how long an ended entry of a pod that is gone stays in the status.
    """
    namespace, name = key
    ended_by_id = {e.experiment_id: e for e in ended if e.owner.kind == OwnerKind.RESOURCE_CHAOS}
    live = [e for e in experiments if e.experiment_id not in ended_by_id]
    mine_any = [e for e in live if owned_by(e, key)]
    uid = obj["metadata"].get("uid", "") if obj is not None else None
    plan = _Plan(name, node, now)

    # Experiments of a deleted object, or of an older object that had this name.
    for e in mine_any:
        if e.owner.uid != uid and e.phase in LIVE:
            pod = pods.get(e.target.pod)
            plan.reverts.append(Revert(_target(e), e.owner, REASON_OBJECT_GONE, e.experiment_id,
                                       pod=pod if pod is not None and _same_pod(e, pod) else None,
                                       write_status=False))
    if obj is None:
        return plan.actions(finalizer_held=False)

    mine = [e for e in mine_any if e.owner.uid == uid]
    generation = obj["metadata"].get("generation", 1)
    plan.entries = {e["pod"]: e for e in (obj.get("status") or {}).get("targets") or []}
    plan.node_entry = next((n for n in (obj.get("status") or {}).get("nodes") or [] if n.get("node") == node), None)
    finalizer_held = crd.finalizer_for(node) in (obj["metadata"].get("finalizers") or [])

    # Endings the engine reported: Reverted with its reason and the values it read back.
    for event in ended_by_id.values():
        if event.owner.uid == uid and (event.owner.namespace, event.owner.name) == key:
            plan.note_ended(event, pods.get(event.target.pod))

    if crd.is_deleting(obj):
        for e in mine:
            pod = pods.get(e.target.pod)
            pod = pod if pod is not None and _same_pod(e, pod) else None
            if e.phase in LIVE:
                plan.reverts.append(Revert(_target(e), e.owner, REASON_DELETED, e.experiment_id, pod=pod,
                                           previous=plan.entries.get(e.target.pod)))
            elif e.phase in FAILING:
                plan.note_failing(e, pod, plan.entries.get(e.target.pod), None)
        return plan.actions(finalizer_held=finalizer_held, release=True)

    try:
        spec = crd.spec_of(obj)
    except crd.SpecError as e:
        # Refused as a whole (what is in force stays, as after any refused change): this node says
        # why once, in its own status.nodes entry, if it has pods in the namespace at all.
        if pods:
            plan.refuse(generation, f"ResourceChaos {name}: {e}")
        return plan.actions(finalizer_held=finalizer_held, release=not mine)

    matched = [(pod_name, pod) for pod_name, pod in sorted(pods.items()) if _matches(spec, pod_name, pod)]
    denied = namespace_refusal(namespace, policy.namespace, policy.agent_namespace) if policy is not None else ""
    if denied:
        # Not (or no longer) enabled: nothing new, and what this object holds here is reverted.
        if matched:
            plan.refuse(generation, f"ResourceChaos {name}: {denied}")
        matched = []
    over_cap = _over_cap(plan.entries, matched, node)
    if over_cap:
        plan.refuse(generation, f"ResourceChaos {name}: {over_cap}")

    by_container = {e.target.key: e for e in live}
    wanted: set[tuple[str, str]] = set()  # (pod uid or name, container) kept or applied here
    remembered: dict[tuple[str, str], Resources] = {}
    baselines = baselines or {}
    for pod_name, pod in matched:
        pod_uid = pod["metadata"].get("uid", "")
        previous = plan.entries.get(pod_name)
        if previous is not None and previous.get("uid") and pod_uid and previous["uid"] != pod_uid:
            previous = None  # the entry of an older pod of this name
        try:
            container = crd.choose_container(pod, spec.container)
        except crd.SpecError as e:
            plan.fail(pod, spec.container or "", generation, f"ResourceChaos {name}: {e}", previous)
            continue
        found = by_container.get(f"{namespace}/{pod_name}/{container}")
        if found is not None and not _same_pod(found, pod):
            found = None  # the old pod's experiment: reverted below (ours) or ended by the engine (pod replaced)
        wanted.add((pod_name, container))
        current = previous is not None and previous.get("observedGeneration") == generation
        phase = (previous or {}).get("phase")

        if found is not None and not owned_by(found, key):
            plan.fail(pod, container, generation, _conflict(found, container, namespace), previous)
            continue

        if found is not None and found.owner.uid != uid:
            found = None  # an older object's experiment on this container: reverted first (above), then applied

        if found is not None:  # ours
            if found.phase in FAILING:
                plan.note_failing(found, pod, previous, generation)
                continue
            if found.phase not in LIVE:
                continue  # being reverted right now
            resize = _resize(pod, container, baselines.get((pod_uid, container)))
            if resize is not None and _changes_cpu_or_memory(found):
                kind, why = resize
                if kind == "supersede":
                    plan.supersedes.append(Supersede(_target(found), END_SUPERSEDED, found.experiment_id, pod=pod,
                                                     previous=previous))
                else:
                    plan.reverts.append(Revert(_target(found), found.owner, f"{REASON_RESIZE_PENDING} ({why})",
                                               found.experiment_id, pod=pod, previous=previous))
                continue
            spec_now = container_resources(pod, container)
            if current and phase in (crd.APPLIED, crd.FAILED, crd.REVERTED):
                # Answered: in force (the engine corrects drift and ends it on time), or a further
                # change that failed and left the earlier one in force.
                remembered[(pod_uid, container)] = baselines.get((pod_uid, container), spec_now)
                if phase == crd.APPLIED and previous is not None:
                    stepped = stepped_entry(previous, found, now)
                    if stepped is not None:
                        plan.write(stepped)  # the engine took a step of the profile (or holds one)
                continue
            # Not answered for this generation: a further change (status Applied for an older
            # generation: its own duration counts from now, none keeps the end time in force), or
            # an apply whose status write failed (same values again, end time kept).
            why = refusal(policy, spec, pod, container) if policy is not None else ""
            if why:
                plan.fail(pod, container, generation, f"ResourceChaos {name}: {why}; the change in force stays",
                          previous)
                remembered[(pod_uid, container)] = baselines.get((pod_uid, container), spec_now)
                continue
            duration_s = spec.duration_s if phase == crd.APPLIED else None
            remembered[(pod_uid, container)] = spec_now
            plan.applies.append(Apply(_request(spec, namespace, pod_name, container, duration_s, obj),
                                      generation, pod=pod, previous=previous))
            continue

        # Nothing in force here for this object.
        if previous is not None and previous.get("phase") in (crd.APPLIED, crd.REVERTING) \
                and previous.get("experimentId"):
            previous = plan.note_unknown_end(previous, pod)
            phase = crd.REVERTED
        if current and phase in (crd.FAILED, crd.REVERTED):
            continue  # answered; the next command (a new generation) asks again
        if over_cap:
            continue  # refused as a whole (the node entry says why): nothing new here
        if (pod.get("status") or {}).get("phase") != "Running":
            plan.pending(pod, container, generation, "waiting for the pod to run", previous)
            continue
        resizing = _resizing(pod)
        if resizing:
            plan.pending(pod, container, generation, f"waiting for the pod's in-place resize to finish ({resizing})",
                         previous)
            continue
        why = refusal(policy, spec, pod, container) if policy is not None else ""
        if why:
            plan.fail(pod, container, generation, f"ResourceChaos {name}: {why}", previous)
            continue
        remembered[(pod_uid, container)] = container_resources(pod, container)
        plan.applies.append(Apply(_request(spec, namespace, pod_name, container, spec.duration_s, obj),
                                  generation, pod=pod, previous=previous))

    # Ours on containers this object no longer asks for: the pod went away, was replaced, or stopped matching.
    for e in mine:
        pod = pods.get(e.target.pod)
        if pod is not None and _same_pod(e, pod) and (e.target.pod, e.target.container) in wanted:
            continue
        same = pod if pod is not None and _same_pod(e, pod) else None
        if e.phase in FAILING:
            plan.note_failing(e, same, plan.entries.get(e.target.pod) if pod is None or same else None, None)
            continue
        if e.phase not in LIVE:
            continue
        reason = REASON_POD_DELETED if pod is None else REASON_POD_REPLACED if same is None else \
            REASON_DISABLED if denied else REASON_UNMATCHED
        previous = plan.entries.get(e.target.pod)
        if previous is not None and same is None and pod is not None:
            previous = None  # the pod of that name is a new one: its entry is not this experiment's
        plan.reverts.append(Revert(_target(e), e.owner, reason, e.experiment_id, pod=same, previous=previous,
                                   write_status=previous is not None or same is not None))

    held_pods = {e.target.pod for e in mine}
    for pod_name, entry in sorted(plan.entries.items()):
        if entry.get("node") == node and pod_name not in pods and pod_name not in held_pods \
                and pod_name not in plan.writes and entry.get("phase") in (crd.REVERTED, crd.FAILED):
            since = _parse_time(entry.get("lastTransitionTime"))
            if since is None or now - since >= prune_after_s:
                plan.drops.append(pod_name)

    if remembered != dict(baselines):
        plan.remember = Remember(remembered)
    kept = any(e.phase not in LIVE or not plan.ends(e) for e in mine)
    return plan.actions(finalizer_held=finalizer_held, release=not kept or bool(plan.applies))


class _Plan:
    """The actions being put together, in the order the executor runs them: reverts and supersedes,
    the finalizer, applies, the status, the finalizer's release, the Events."""

    def __init__(self, name: str, node: str, now: float):
        self.name = name
        self.node = node
        self.now = now
        self.entries: dict[str, dict] = {}  # the status as it will be, by pod
        self.reverts: list[Revert] = []
        self.supersedes: list[Supersede] = []
        self.applies: list[Apply] = []
        self.writes: dict[str, dict] = {}
        self.drops: list[str] = []  # pods whose entries this node stops writing
        self.events: list[Event] = []
        self.remember: Remember | None = None
        self.node_entry: dict | None = None  # this node's status.nodes entry as the object has it
        self.refusal: dict | None = None  # the node entry to write when refusing the object as a whole
        self.refusal_changed = False

    def ends(self, e: ExperimentInfo) -> bool:
        return any(a.experiment_id == e.experiment_id for a in (*self.reverts, *self.supersedes))

    def write(self, entry: dict) -> None:
        old = self.entries.get(entry["pod"])
        if old is not None and same_entry(old, entry):
            return
        if old is not None and old.get("phase") == entry["phase"]:
            entry["lastTransitionTime"] = old.get("lastTransitionTime", entry["lastTransitionTime"])
        self.entries[entry["pod"]] = entry
        self.writes[entry["pod"]] = entry

    def refuse(self, generation: int, message: str) -> None:
        """This node refuses the object as a whole: say so once in its status.nodes entry."""
        entry = {"node": self.node, "phase": crd.FAILED, "observedGeneration": generation, "targets": 0,
                 "message": message[:1024]}
        old = self.node_entry or {}
        if {k: old.get(k) for k in ("phase", "observedGeneration", "message")} == \
                {k: entry[k] for k in ("phase", "observedGeneration", "message")}:
            self.refusal = old  # already says so: written again only along with other entries
            return
        self.refusal = entry
        self.refusal_changed = True

    def fail(self, pod: dict, container: str, generation: int, message: str, previous: dict | None) -> None:
        if previous and previous.get("phase") == crd.FAILED and previous.get("message") == message \
                and previous.get("observedGeneration") == generation:
            return
        self.write(new_entry(pod, container, crd.FAILED, generation, self.node, self.now, message=message))
        self.events.append(Event(pod, "Failed", message, warning=True))

    def pending(self, pod: dict, container: str, generation: int, message: str, previous: dict | None) -> None:
        self.write(new_entry(pod, container, crd.PENDING, generation, self.node, self.now, message=message))

    def note_ended(self, event: EngineEvent, pod: dict | None) -> None:
        previous = self.entries.get(event.target.pod)
        if previous is None or previous.get("experimentId") != event.experiment_id:
            return
        known = previous.get("phase") == crd.REVERTED and not previous.get("message", "").endswith(UNKNOWN_END)
        entry = ended_entry(previous, event, self.node, self.now, keep_message=known)
        if same_entry(previous, entry):
            return
        self.write(entry)
        if not known and pod is not None and (not event.target.pod_uid or pod["metadata"].get("uid") in
                                              ("", event.target.pod_uid)):
            superseded = event.reason == END_SUPERSEDED
            self.events.append(Event(pod, "Superseded" if superseded else "Reverted",
                                     f"ResourceChaos {self.name} {entry['message']}" + _restored_text(entry)))

    def note_unknown_end(self, previous: dict, pod: dict) -> dict:
        """An experiment the status shows but the engine no longer holds, with no event about its end."""
        expires = _parse_time(previous.get("expiresAt"))
        message = f"reverted: expired ({UNKNOWN_END})" if expires is not None and expires <= self.now \
            else UNKNOWN_END
        entry = dict(previous, phase=crd.REVERTED, message=message, lastTransitionTime=crd.rfc3339(self.now))
        entry.pop("expiresAt", None)
        self.write(entry)
        self.events.append(Event(pod, "Reverted", f"ResourceChaos {self.name}: {message}"))
        return entry

    def note_failing(self, e: ExperimentInfo, pod: dict | None, previous: dict | None, generation: int | None) -> None:
        """The engine could not put the originals back yet and retries by itself: say so, one Event per episode."""
        if previous is None and pod is None:
            return
        if generation is not None and previous is not None and (
                (previous.get("observedGeneration") or 0) < generation
                or previous.get("phase") == crd.FAILED and previous.get("experimentId") == e.experiment_id):
            # A new command while the old change is still being undone: answer it, do not stack on it.
            if previous.get("phase") == crd.FAILED and previous.get("experimentId") == e.experiment_id:
                return
            message = f"the previous change on this container is still being undone ({failing_text(e)}); " \
                      "send the command again once it has ended"
            entry = new_entry(pod or {"metadata": {"name": e.target.pod, "uid": e.target.pod_uid}},
                              e.target.container, crd.FAILED, generation, self.node, self.now, message=message,
                              experiment_id=e.experiment_id)
            self.write(entry)
            if pod is not None:
                self.events.append(Event(pod, "Failed", message, warning=True))
            return
        entry = reverting_entry(previous, e, self.node, self.now, generation)
        episode = previous is not None and previous.get("phase") == crd.REVERTING \
            and previous.get("experimentId") == e.experiment_id
        if previous is not None and same_entry(previous, entry):
            return
        self.write(entry)
        if not episode and pod is not None:
            self.events.append(Event(pod, "RevertFailing", f"ResourceChaos {self.name}: {entry['message']}",
                                     warning=True))

    def actions(self, *, finalizer_held: bool, release: bool = False) -> list[Action]:
        out: list[Action] = [*self.reverts, *self.supersedes]
        if self.applies:
            out.append(SetFinalizer(True))
            out.extend(self.applies)
        if self.writes or self.refusal_changed or self.drops:
            out.append(WriteStatus(tuple(self.writes[p] for p in sorted(self.writes)), node=self.refusal,
                                   drop=tuple(self.drops)))
        if self.remember is not None:
            out.append(self.remember)
        if release and (finalizer_held or self.applies) or (finalizer_held and (self.reverts or self.supersedes)):
            out.append(SetFinalizer(False))
        out.extend(self.events)
        return out


# ---------------------------------------------------------------------------------------------
# Status entries (pure; the executor builds the ones that come from engine results with these too)


def new_entry(pod: dict, container: str, phase: str, generation: int, node: str, now: float, *,
              message: str = "", changes: list | None = None, method: str = "", expires_at: float | None = None,
              experiment_id: str = "") -> dict:
    entry: dict[str, Any] = {"pod": pod["metadata"]["name"], "uid": pod["metadata"].get("uid", ""), "node": node,
                             "container": container, "phase": phase, "observedGeneration": generation,
                             "message": message, "lastTransitionTime": crd.rfc3339(now)}
    if changes is not None:
        entry["changes"] = changes
    if method:
        entry["method"] = method
    if expires_at is not None:
        entry["expiresAt"] = crd.rfc3339(expires_at)
    if experiment_id:
        entry["experimentId"] = experiment_id
    return entry


def profile_status(steps_total: int, step: int, next_step_at: float | None, next_step: Mapping[Any, int],
                   note: str = "") -> dict | None:
    """A target entry's ``profile``: the step in force and the next one (None without a profile)."""
    if not steps_total:
        return None
    out: dict[str, Any] = {"step": step, "steps": steps_total}
    if next_step_at is not None:
        out["nextStepAt"] = crd.rfc3339(next_step_at)
        out["next"] = {RESOURCE_NAMES[getattr(r, "value", r)]: _value(v) for r, v in sorted(
            next_step.items(), key=lambda kv: getattr(kv[0], "value", kv[0]))}
    if note:
        out["note"] = note[:1024]
    return out


def stepped_entry(previous: dict, e: ExperimentInfo, now: float) -> dict | None:
    """``previous`` (Applied) with the profile's progress as the engine reports it and the values
    of the step in force read back; None when nothing changed (no profile, or the same step)."""
    progress = profile_status(e.steps_total, e.step, e.next_step_at, e.next_step, e.step_note)
    if progress == previous.get("profile"):
        return None
    entry = dict(previous, lastTransitionTime=crd.rfc3339(now))
    if progress is None:
        entry.pop("profile", None)
    else:
        entry["profile"] = progress
    read = {RESOURCE_NAMES[r.resource.value]: r for r in e.resources}
    changes = []
    for change in previous.get("changes") or []:
        r = read.get(change["resource"])
        change = dict(change)
        if r is not None and not r.unknown:
            change["applied"] = _value(r.in_force)
        changes.append(change)
    entry["changes"] = changes
    return entry


def queue_status(q: QueueResult) -> dict:
    """A shaped direction's queue as status carries it (the same keys as ``kubectl chaos -o json``)."""
    return {"budgetSeconds": q.budget_s, "limitBytes": q.limit_bytes, "limitPackets": q.limit_packets,
            "latencySeconds": q.latency_s, "unknown": q.unknown or None}


def applied_entry(pod: dict, container: str, generation: int, node: str, now: float, resources,
                  expires_at: float | None, experiment_id: str, profile: dict | None = None) -> dict:
    changes, unknown = [], []
    for r in resources:
        resource = RESOURCE_NAMES[r.resource.value]
        change = {"resource": resource, "unit": crd.UNITS[resource], "original": _value(r.original),
                  "method": r.method.value}
        if r.unknown:
            unknown.append(f"{resource} not read back ({r.unknown})")
        else:
            change["applied"] = _value(r.in_force)
        if r.queue is not None:
            change["queue"] = queue_status(r.queue)
        changes.append(change)
    entry = new_entry(pod, container, crd.APPLIED, generation, node, now, message="; ".join(unknown),
                      changes=changes, method=",".join(sorted({r.method.value for r in resources})),
                      expires_at=expires_at, experiment_id=experiment_id)
    if profile is not None:
        entry["profile"] = profile
    return entry


def reverted_entry(previous: dict | None, pod: dict | None, pod_name: str, container: str, node: str, now: float,
                   message: str, resources: Iterable[ResourceResult] = (), generation: int = 1,
                   not_restored: Iterable[str] = ()) -> dict:
    """The entry after an end: ``previous``'s changes with ``restored`` filled in from ``resources``
    (values read back; none: nothing was reported, ``restored`` stays absent)."""
    base = dict(previous) if previous else new_entry(pod or {"metadata": {"name": pod_name}}, container,
                                                      crd.REVERTED, generation, node, now)
    read = {RESOURCE_NAMES[r.resource.value]: r for r in resources}
    notes = list(not_restored)
    changes = []
    for change in base.get("changes") or []:
        change = dict(change)
        r = read.pop(change["resource"], None)
        if r is not None:
            if r.unknown:
                notes.append(f"{change['resource']} not read back ({r.unknown})")
            else:
                change["restored"] = _value(r.in_force)
        changes.append(change)
    for resource, r in read.items():  # the status had lost them (or never had them)
        change = {"resource": resource, "unit": crd.UNITS[resource], "original": _value(r.original),
                  "applied": _value(r.previous), "method": r.method.value}
        if r.unknown:
            notes.append(f"{resource} not read back ({r.unknown})")
        else:
            change["restored"] = _value(r.in_force)
        changes.append(change)
    if len(notes) > 1 and len({n.split(" not read back ", 1)[-1] for n in notes}) == 1:
        notes = [f"not read back {notes[0].split(' not read back ', 1)[1]}"]  # the same reason for every value
    entry = dict(base, pod=pod_name, container=container or base.get("container", ""), node=node,
                 phase=crd.REVERTED, message=message + (f"; {'; '.join(notes)}" if notes else ""), changes=changes,
                 lastTransitionTime=crd.rfc3339(now))
    if pod is not None:
        entry["uid"] = pod["metadata"].get("uid", entry.get("uid", ""))
    entry.pop("expiresAt", None)
    return entry


def ended_entry(previous: dict, event: EngineEvent, node: str, now: float, *, keep_message: bool = False) -> dict:
    """``previous`` after the engine reported the end of its experiment. An entry that already says
    why it ended (the controller's own revert) keeps its reason; the event fills in what was read back."""
    message = previous.get("message", "") if keep_message else ended_message(event.reason)
    if keep_message and all("restored" in c for c in previous.get("changes") or []):
        return previous
    return reverted_entry(previous, None, previous["pod"], event.target.container, node, now, message,
                          event.resources)


def ended_message(reason: str) -> str:
    if reason == END_SUPERSEDED:
        return f"{END_SUPERSEDED}: the pod's new resources stand; nothing was restored over them"
    if reason == END_REQUESTED:
        return "reverted: reset"  # by this controller or on the node: the engine does not say which
    if reason == END_EXPIRED:
        return "reverted: expired"
    return f"reverted: {reason}"


def reverting_entry(previous: dict | None, e: ExperimentInfo, node: str, now: float, generation: int | None) -> dict:
    base = dict(previous) if previous else new_entry({"metadata": {"name": e.target.pod, "uid": e.target.pod_uid}},
                                                      e.target.container, crd.REVERTING, generation or 1, node, now)
    entry = dict(base, phase=crd.REVERTING, message=failing_text(e), experimentId=e.experiment_id, node=node,
                 lastTransitionTime=crd.rfc3339(now))
    entry.pop("expiresAt", None)
    return entry


def failing_text(e: ExperimentInfo) -> str:
    what = "undoing the failed change" if e.phase is Phase.ROLLBACK_FAILED else "putting the originals back"
    failure = e.failure
    if failure is None:
        return f"{what} failed; the agent retries"
    text = f"{what} failed: {failure.reason}"
    if failure.next_retry_at is not None:
        text += f"; next try at {crd.rfc3339(failure.next_retry_at)}"
    if failure.attempts > 1:
        text += f" (attempt {failure.attempts})"
    return text


def same_entry(a: dict, b: dict) -> bool:
    """Equal but for the time of the last transition."""
    return {k: v for k, v in a.items() if k != "lastTransitionTime"} == \
        {k: v for k, v in b.items() if k != "lastTransitionTime"}


def _restored_text(entry: dict) -> str:
    parts = [f"{c['resource']} back to {_show(c['restored'])}" for c in entry.get("changes") or [] if "restored" in c]
    return "; " + ", ".join(parts) if parts else ""


def applied_text(name: str, entry: dict) -> str:
    text = f"ResourceChaos {name}: " + ", ".join(
        f"{c['resource']} {_show(c['original'])} -> {_show(c.get('applied'))}" for c in entry.get("changes") or [])
    if entry.get("expiresAt"):
        text += f", until {entry['expiresAt']}"
    return text


def reverted_text(name: str, entry: dict) -> str:
    return f"ResourceChaos {name} {entry['message']}" + _restored_text(entry)


# ---------------------------------------------------------------------------------------------
# Messages that never name another namespace's objects


_OTHER_OBJECT = re.compile(r"ResourceChaos ([a-z0-9][-a-z0-9.]*)/([a-z0-9][-a-z0-9.]*)")


def scrub(message: str, namespace: str, others: Iterable[str] = ()) -> str:
    """``message`` with any ResourceChaos of another namespace left unnamed, and any ``NS/NAME`` of
    the namespaces in ``others`` (the cluster's other namespaces: the runtime's error listing the
    node's pods, say) replaced by "a pod in another namespace"."""
    message = _OTHER_OBJECT.sub(lambda m: m.group(0) if m.group(1) == namespace else
                                "a ResourceChaos in another namespace", message)
    names = sorted({n for n in others if n and n != namespace}, key=len, reverse=True)
    if names:
        pattern = re.compile(r"(?<![\w/.-])(?:" + "|".join(re.escape(n) for n in names)
                             + r")/[a-z0-9][-a-z0-9.]*(?:/[a-z0-9][-a-z0-9]*)?")
        message = pattern.sub("a pod in another namespace", message)
    return message


def _conflict(found: ExperimentInfo, container: str, namespace: str) -> str:
    if found.owner.kind == OwnerKind.NODE_LOCAL:
        return (f"container {container} is already under a node-local experiment ({found.experiment_id});"
                " reset it with kubectl-chaos --agent-address first")
    other = scrub(f"ResourceChaos {found.owner.namespace}/{found.owner.name}", namespace)
    return f"container {container} is already changed by {other}; reset that one first"


# ---------------------------------------------------------------------------------------------
# In-place resize (Kubernetes 1.33+: ``kubectl patch pod --subresource resize``)

_SUFFIX = {"": 1, "m": fractions.Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
           "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)(?:[eE]([+-]?[0-9]+))?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def quantity(text: Any) -> fractions.Fraction | None:
    """A Kubernetes quantity ("500m", "1", "256Mi", "1e3") as an exact number; None if unreadable."""
    m = _QUANTITY.match(str(text).strip())
    if not m:
        return None
    value = fractions.Fraction(m.group(1)) * _SUFFIX[m.group(3) or ""]
    if m.group(2):
        value *= fractions.Fraction(10) ** int(m.group(2))
    return value


def _resources_of(resources: dict | None) -> Resources:
    out = []
    for kind in ("limits", "requests"):
        for resource in ("cpu", "memory"):
            value = ((resources or {}).get(kind) or {}).get(resource)
            if value is not None:
                out.append((kind, resource, quantity(value)))
    return tuple(out)


def container_resources(pod: dict, container: str) -> Resources:
    """The CPU and memory limits and requests the pod's spec asks for ``container``."""
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == container:
            return _resources_of(c.get("resources"))
    return ()


def _status_resources(pod: dict, container: str) -> Resources | None:
    """What the kubelet reports as configured for ``container`` (1.33+), or None when it does not say."""
    for c in (pod.get("status") or {}).get("containerStatuses") or []:
        if c.get("name") == container and c.get("resources") is not None:
            return _resources_of(c["resources"])
    return None


def _conditions(pod: dict) -> dict[str, dict]:
    return {c.get("type"): c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


def _resizing(pod: dict) -> str:
    """Non-empty while the kubelet resizes the pod or has a resize waiting: what it says."""
    conditions = _conditions(pod)
    for kind in ("PodResizeInProgress", "PodResizePending"):
        if kind in conditions:
            reason = conditions[kind].get("reason") or ""
            return f"{kind}{': ' + reason if reason else ''}"
    return ""


def _resize(pod: dict, container: str, baseline: Resources | None) -> tuple[str, str] | None:
    """Whether the experiment on ``container`` must yield to an in-place resize, and how:

    - ("supersede", why): the kubelet is putting (or has put) new values in place
      (PodResizeInProgress, or the spec changed and the kubelet reports the new values or reports
      nothing): end without restoring the old ones over them;
    - ("revert", why): a resize is pending (PodResizePending, Deferred or Infeasible): the kubelet
      has not applied it, so the originals are still what it holds: put them back;
    - None: no resize, or the spec changed but the kubelet has not acted on it yet (look again at
      its next status update).
    """
    conditions = _conditions(pod)
    if "PodResizePending" in conditions:
        return "revert", conditions["PodResizePending"].get("reason") or "PodResizePending"
    if "PodResizeInProgress" in conditions:
        return "supersede", "PodResizeInProgress"
    if baseline is None:
        return None
    spec_now = container_resources(pod, container)
    if spec_now == baseline:
        return None
    reported = _status_resources(pod, container)
    if reported is not None and reported != spec_now:
        return None
    return "supersede", "the pod's spec resources changed"


def _changes_cpu_or_memory(e: ExperimentInfo) -> bool:
    return any(r.resource.value in ("cpu", "memory") for r in e.resources)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _over_cap(entries: Mapping[str, dict], matched: list[tuple[str, dict]], node: str) -> str:
    """Why the object has too many targets for this node to add its own ("" if it has not): the
    pods in its status from other nodes plus the pods matching here, against crd.MAX_TARGETS."""
    elsewhere = {pod for pod, e in entries.items() if e.get("node") not in (None, node)}
    here = {pod_name for pod_name, _ in matched}
    total = len(elsewhere | here)
    if total <= crd.MAX_TARGETS:
        return ""
    others = len(elsewhere - here)
    where = f" and {others} more in its status from other nodes" if others else ""
    return (f"it matches {len(here)} pods on node {node}{where}: more than the {crd.MAX_TARGETS} one ResourceChaos may"
            " change; narrow the selector or split it (nothing new was changed on this node)")


def _matches(spec: crd.ChaosSpec, pod_name: str, pod: dict) -> bool:
    if spec.pod is not None:
        return pod_name == spec.pod
    return spec.selector is not None and crd.selector_matches(spec.selector, pod["metadata"].get("labels"))


def _same_pod(e: ExperimentInfo, pod: dict) -> bool:
    uid = pod["metadata"].get("uid", "")
    return not e.target.pod_uid or not uid or e.target.pod_uid == uid


def _target(e: ExperimentInfo) -> Target:
    return Target(e.target.namespace, e.target.pod, e.target.container)


def _request(spec: crd.ChaosSpec, namespace: str, pod: str, container: str, duration_s: float | None,
             obj: dict) -> ApplyRequest:
    meta = obj["metadata"]
    return ApplyRequest(
        target=Target(namespace, pod, container),
        changes=Changes(cpu_millicpu=spec.cpu_millicpu, memory_bytes=spec.memory_bytes,
                        ingress_bps=spec.ingress_bps, egress_bps=spec.egress_bps),
        latency_s=spec.latency_s,
        duration_s=duration_s, method=Method(spec.method), force=spec.force,
        owner=Owner(OwnerKind.RESOURCE_CHAOS, meta["namespace"], meta["name"], meta.get("uid", "")),
        steps=tuple(steps(spec)))


def steps(spec: crd.ChaosSpec) -> list[StepSpec]:
    """The spec's profile rows as the engine's steps (bandwidth in the spec's direction)."""
    out = []
    for row in spec.profile:
        bps = row.bandwidth_bps
        out.append(StepSpec(offset_s=float(row.after_s), changes=Changes(
            cpu_millicpu=row.cpu_millicpu, memory_bytes=row.memory_bytes,
            ingress_bps=bps if bps is not None and spec.direction in ("ingress", "both") else None,
            egress_bps=bps if bps is not None and spec.direction in ("egress", "both") else None)))
    return out


def _parse_time(text: str | None) -> float | None:
    try:
        parsed = crd.parse_rfc3339(text)
    except ValueError:
        return None
    return parsed.timestamp() if parsed is not None else None


def _value(value: int) -> int | None:
    return None if value == UNLIMITED else value


def _show(value: int | None) -> str:
    return "unlimited" if value is None else str(value)
