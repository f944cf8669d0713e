"""The experiment engine: one transaction per change, one restore, one supervisor of time.

One ``Engine`` per node serves every front door (the agent's gRPC server, cluster mode). Its
dependencies come in through the constructor: the CRI client, the cgroup and proc roots
(``/host/sys/fs/cgroup`` and ``/host/proc`` in a pod), the bandwidth shaper and the clock.

- **Record** (``daemonset.record``): one typed ``Experiment`` per container, the only state, kept in
  memory and in the state directory. The engine is its only writer.
- **Transaction** (``apply``): resolve the container (its pod UID included), read the runtime's
  view and the kernel under the pod's lock, plan, write the record (the first change durably, with
  the snapshot of the originals, before anything is touched), enforce, verify every resource of
  the experiment against what the kernel reads back, commit; or roll back exactly.
- **Restore** (``daemonset.restore``): the one way back to the originals, used by revert,
  rollback, recovery and retries; "restored" only when the kernel reads the originals back.
- **Supervisor** (``daemonset.supervisor``): end times, retries with capped exponential backoff and
  jitter, and the drift pass. Drift only ever touches an ``active`` record; a pod with another UID
  is another pod (the experiment ends, nothing touches the new pod); a runtime view that is neither
  ours nor the originals is an in-place resize, to which the experiment yields.

Locks are per pod: the veth and IFB are one resource for all of a pod's containers, and the
runtime's view is only read while the lock is held. Front doors learn of what the supervisor does
through ``subscribe`` (``EngineEvent``): applied, ended (with the reason), revert failing.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import pathlib
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from cri_api.merge import merge_resources
from daemonset import observe
from daemonset import state as state_mod
from daemonset.cgroups import CgroupOps, Readings
from daemonset.metrics import Metrics
from daemonset.net import NetOps, queue_results, stale_queues
from daemonset.record import (
    BANDWIDTH,
    CPU_MEM,
    Experiment,
    NetState,
    RecordError,
    Step,
    decode,
    encode,
    key_of,
)
from daemonset.restore import Location, RestoreError, Restorer, fmt
from daemonset.supervisor import Supervisor
from daemonset.types import (
    END_EXPIRED,
    END_POD_DELETED,
    END_POD_REPLACED,
    END_POD_STOPPED,
    END_RECOVERED,
    END_REQUESTED,
    END_ROLLED_BACK,
    END_SUPERSEDED,
    NODE_LOCAL,
    UNLIMITED,
    ApplyFailed,
    ApplyRequest,
    ApplyResult,
    Changes,
    Conflict,
    DamagedRecord,
    Denied,
    EngineError,
    EngineEvent,
    EventKind,
    ExperimentInfo,
    Failure,
    InvalidRequest,
    Method,
    OwnerKind,
    Phase,
    QueueResult,
    Refused,
    ResolvedTarget,
    Resource,
    ResourceResult,
    RevertIncomplete,
    RevertRequest,
    RevertResult,
    RuntimeUnavailable,
    Target,
    TargetNotFound,
    TargetNotRunning,
)

log = logging.getLogger("chaos-agent.engine")

DEFAULT_DENY_NAMESPACES = ("kube-system",)
_PAGE_BYTES = 4096
# The kernel stores an HTB rate in bytes per second: a read-back may differ by rounding.
_RATE_TOLERANCE = 0.01
_GONE = (END_POD_DELETED, END_POD_REPLACED)


# --- pure arithmetic ---------------------------------------------------------------------------

def quota_for(millicpu: int, period_us: int) -> int:
    """CFS quota giving ``millicpu`` at ``period_us`` (``--set-cpu=500m`` at 100 ms -> 50000)."""
    return millicpu * period_us // 1000


def millicpu_of(quota_us: int, period_us: int) -> int:
    if quota_us == UNLIMITED or quota_us < 0:
        return UNLIMITED
    return round(quota_us * 1000 / period_us)


def same_quantity(resource: Resource, want: int, got: int) -> bool:
    if want == got:
        return True
    if want == UNLIMITED or got == UNLIMITED:
        return False
    if resource is Resource.MEMORY:
        # v1 rounds memory.limit_in_bytes down to whole pages.
        return abs(want - got) < _PAGE_BYTES
    if resource in BANDWIDTH:
        return abs(want - got) <= max(8, want * _RATE_TOLERANCE)
    return False


def view_of(resources: Any) -> tuple[int, int, int] | None:
    """The part of a runtime's LinuxContainerResources that an in-place resize changes."""
    if resources is None:
        return None
    get = resources.get if isinstance(resources, dict) else lambda n, d=None: getattr(resources, n, d)
    if not any(get(n) for n in ("cpu_quota_us", "cpu_period_us", "memory_limit_bytes")):
        return None  # an empty view (a record of schema 1 did not keep what it sent)
    return (get("cpu_quota_us") or 0, get("cpu_period_us") or 0, get("memory_limit_bytes") or 0)


def pod_key(key: str) -> str:
    """``namespace/pod`` of a container key ``namespace/pod/container``."""
    return key.rsplit("/", 1)[0]


# --- the engine --------------------------------------------------------------------------------

class Engine:
    """Apply, revert and list experiments on this node. See the module docstring."""

    def __init__(
        self,
        cri: Any,
        *,
        cgroup_root: str = "/sys/fs/cgroup",
        proc_root: str = "/proc",
        state_dir: str = "/var/lib/kubectl-chaos",
        node_name: str = "",
        deny_namespaces: tuple[str, ...] | list[str] = DEFAULT_DENY_NAMESPACES,
        cgroups: CgroupOps | None = None,
        net: NetOps | None = None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
        drift_interval_s: float = 3.0,
        sweep_orphan_ifbs: bool = True,
        rng: random.Random | None = None,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
    ):
        self.cri = cri
        self.proc_root = proc_root
        self.cgroup_root = cgroup_root
        self.node_name = node_name
        self.deny_namespaces = frozenset(deny_namespaces)
        self.cgroups = cgroups if cgroups is not None else CgroupOps(cgroup_root=cgroup_root, proc_root=proc_root)
        self.net = net if net is not None else NetOps(proc_root=proc_root)
        self.clock = clock
        self.metrics = metrics if metrics is not None else Metrics()
        self.sweep_orphan_ifbs = sweep_orphan_ifbs
        self.store = state_mod.StateStore(state_dir)
        self.restorer = Restorer(cri, self.cgroups, self.net)
        self.supervisor = Supervisor(on_due=self._on_due, drift=self.check_drift, clock=clock,
                                     drift_interval_s=drift_interval_s, rng=rng, backoff_base_s=backoff_base_s,
                                     backoff_max_s=backoff_max_s)
        self.metrics.scheduled.set_function(self.supervisor.pending)
        from daemonset.metrics import ExperimentCollector

        self.metrics.registry.register(ExperimentCollector(self))
        self._records: dict[str, Experiment] = {}
        self._damaged: dict[str, DamagedRecord] = {}  # by file path
        self._known: dict[str, Any] = {}  # container id -> ContainerInfo of containers under experiment
        # When each known container's runtime view (its ``resources``) was last confirmed: by our own
        # successful update, or by the drift pass reading it. Within ``view_fresh_s`` an apply merges
        # into it without asking the runtime again; an in-place resize is noticed by the drift pass.
        self._view_at: dict[str, float] = {}
        self.view_fresh_s = max(2 * drift_interval_s, 3.0)
        self._listeners: list[Callable[[EngineEvent], None]] = []
        self._step_tries: dict[str, int] = {}  # held profile steps: tries so far (for the backoff)
        self._locks: dict[str, _KeyLock] = {}
        self._guard = threading.Lock()
        self._runtime_down = ""  # the last runtime error the drift pass logged (one line per outage)
        # Runtime calls and state writes that overlap other work of the same request.
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="chaos-io")

    # -- lifecycle --

    def start(self, *, background: bool = True) -> None:
        """Recover from the state directory, then run the supervisor (end times, retries, drift)."""
        try:
            self.store.lock()
        except state_mod.StateError as e:
            raise EngineError(str(e)) from e
        self.recover()
        if background:
            self.supervisor.start()

    def close(self) -> None:
        """Stop the supervisor; experiments stay in force and on disk for the next start."""
        self.supervisor.stop()
        self._io.shutdown(wait=True)
        self.store.close()

    def subscribe(self, listener: Callable[[EngineEvent], None]) -> None:
        """Call ``listener`` for every event (from the thread that did the work: keep it cheap)."""
        self._listeners.append(listener)

    def _emit(self, kind: EventKind, exp: Experiment, *, reason: str = "", resources: tuple[ResourceResult, ...] = (),
              next_retry_at: float | None = None) -> None:
        event = EngineEvent(kind=kind, target=exp.target, owner=exp.owner, experiment_id=exp.experiment_id,
                            reason=reason, resources=resources, next_retry_at=next_retry_at,
                            expires_at=exp.expires_at)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception as e:  # a front door's bug must not undo the engine's work
                log.error("event listener failed on %s %s: %s", kind.value, exp.key, e)

    @contextlib.contextmanager
    def _locked(self, key: str, *, blocking: bool = True) -> Iterator[bool]:
        # A lock lives while someone holds or waits for it, so the table stays as small as the
        # number of pods being worked on (not every pod ever changed).
        with self._guard:
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = _KeyLock()
            lock.users += 1
        got = lock.lock.acquire(blocking)
        try:
            yield got
        finally:
            if got:
                lock.lock.release()
            with self._guard:
                lock.users -= 1
                if lock.users == 0:
                    del self._locks[key]

    # -- records --

    def _set(self, exp: Experiment) -> None:
        with self._guard:
            self._records[exp.key] = exp
            self.metrics.active.set(len(self._records))

    def _save(self, exp: Experiment, durable: bool) -> None:
        self.store.save(exp.key, encode(exp), durable=durable)

    def _save_quiet(self, exp: Experiment) -> bool:
        """Write the record; a full or failing state filesystem is logged, never a reason to stop a restore."""
        try:
            self._save(exp, durable=False)
            return True
        except state_mod.StateError as e:
            log.error("%s; going on with the record in memory", e)
            return False

    def _forget(self, exp: Experiment) -> None:
        """The experiment has ended: its record leaves disk, memory and the schedule."""
        try:
            self.store.delete(exp.key)
        except state_mod.StateError as e:
            log.error("%s", e)
        with self._guard:
            if self._records.get(exp.key) is not None and self._records[exp.key].experiment_id == exp.experiment_id:
                del self._records[exp.key]
            self._known.pop(exp.target.container_id, None)
            self._view_at.pop(exp.target.container_id, None)
            self._step_tries.pop(exp.key, None)
            self.metrics.active.set(len(self._records))
        self.supervisor.cancel(exp.key)

    def _record_for(self, target: Target, *, only_container: bool = False) -> Experiment | None:
        """The experiment on a named container, or on a pod's one container under experiment."""
        with self._guard:
            if target.container:
                return self._records.get(f"{target.namespace}/{target.pod}/{target.container}")
            found = [e for e in self._records.values() if e.target.namespace == target.namespace
                     and e.target.pod == target.pod and (e.only_container or not only_container)]
        if len(found) > 1:
            names = ", ".join(sorted(e.target.container for e in found))
            raise InvalidRequest(f"pod {target.namespace}/{target.pod} has experiments on several containers ({names});"
                                 " name one with -c")
        return found[0] if found else None

    # -- resolution --

    def _check_namespace(self, target: Target) -> None:
        if target.namespace in self.deny_namespaces:
            raise Denied(f"namespace {target.namespace} is denied on this agent"
                         f" (denied: {', '.join(sorted(self.deny_namespaces))})")

    def _resolve(self, target: Target) -> Any:
        """The running container asked for, through CRI; errors name what was asked and what exists."""
        from cri_api import errors as cri_errors

        try:
            return self.cri.find_container(target.namespace, target.pod, target.container)
        except cri_errors.NotFound as e:
            raise TargetNotFound(str(e)) from e
        except cri_errors.NotRunning as e:
            raise TargetNotRunning(str(e)) from e
        except cri_errors.RuntimeUnreachable as e:
            raise RuntimeUnavailable(str(e)) from e
        except cri_errors.CRIError as e:
            raise RuntimeUnavailable(f"cannot resolve {target.describe()}: {e}") from e

    def _with_fresh_resources(self, info: Any) -> Any | None:
        """``info`` with the resources the runtime holds now; None when it no longer runs.

        A plain ContainerStatus carries them where the runtime fills ``status.resources``
        (containerd does): cheaper than the verbose status, which parses the whole runtime spec.
        """
        from cri_api import convert
        from cri_api.v1 import api_pb2

        status = self.cri.container_status(info.id, verbose=False).status
        if status.state != api_pb2.CONTAINER_RUNNING:
            return None
        if status.HasField("resources") and status.resources.HasField("linux"):
            return dataclasses.replace(info, resources=convert.resources_from_proto(status.resources.linux))
        fresh = self.cri.container_info(info.id)
        return fresh if fresh.running else None

    def _alive(self, info: Any) -> bool:
        """Whether the container's process still runs in the container (its cgroup path names the id)."""
        from cgroupctl.read import read_text

        try:
            text = read_text(f"{self.proc_root}/{info.pid}/cgroup")
            return text is not None and info.id in text
        except (OSError, TypeError):
            return False

    def _sandbox_ready(self, sandbox_id: str) -> bool:
        """Whether the pod's sandbox still runs (a container that exited in it is being restarted)."""
        from cri_api import errors as cri_errors
        from cri_api.v1 import api_pb2

        if not sandbox_id:  # a record from before the sandbox was kept: as if the pod were gone
            return False
        try:
            return self.cri.pod_sandbox_status(sandbox_id).status.state == api_pb2.SANDBOX_READY
        except cri_errors.NotFound:
            return False

    def _why_no_container(self, exp: Experiment, missing: Exception) -> str:
        """What it means that the experiment's container is not found (``NotFound``) or not running
        (``NotRunning``): "" while the pod's sandbox is ready, since the kubelet (or someone with
        crictl) removed or stopped the old container and is creating the next attempt, and the pod's
        cgroups stay ours to restore; else how the experiment ends. Raises CRIError when the runtime
        cannot say."""
        from cri_api import errors as cri_errors

        if self._sandbox_ready(exp.sandbox_id):
            return ""
        return END_POD_DELETED if isinstance(missing, cri_errors.NotFound) else END_POD_STOPPED

    def _gone_location(self, exp: Experiment, gone: str) -> Location:
        """No container to act on: a deleted pod took its cgroups with it; otherwise the pod's cgroups,
        as saved in the snapshot, are still there to restore."""
        return Location(None, None if gone == END_POD_DELETED else self._snapshot_cgroups(exp), gone=gone)

    def _resolved(self, info: Any) -> ResolvedTarget:
        return ResolvedTarget(namespace=info.pod_namespace, pod=info.pod_name, container=info.name,
                              container_id=info.id, pod_uid=info.pod_uid or "", node_name=self.node_name)

    def _locate(self, exp: Experiment) -> tuple[Experiment, Location]:
        """Where the experiment's container is now; a container re-created in the same pod is adopted."""
        from cri_api import errors as cri_errors

        t = exp.target
        try:
            info = self.cri.find_container(t.namespace, t.pod, t.container)
        except (cri_errors.NotFound, cri_errors.NotRunning) as e:
            try:
                gone = self._why_no_container(exp, e)
            except cri_errors.CRIError as err:
                return exp, Location(None, self._snapshot_cgroups(exp), runtime_error=str(err))
            return exp, self._gone_location(exp, gone)
        except cri_errors.CRIError as e:
            return exp, Location(None, self._snapshot_cgroups(exp), runtime_error=str(e))
        if t.pod_uid and info.pod_uid and info.pod_uid != t.pod_uid:
            return exp, Location(None, None, gone=END_POD_REPLACED)
        cg = self.cgroups.locate(pid=info.pid, cgroups_path=info.cgroups_path)
        if info.id != t.container_id:
            exp = self._adopt(exp, info, cg)
        return exp, Location(info, cg)

    def _snapshot_cgroups(self, exp: Experiment) -> Any | None:
        return self.cgroups.from_snapshot(exp.cgroup_snapshot) if exp.cgroup_snapshot is not None else None

    def _adopt(self, exp: Experiment, info: Any, cg: Any) -> Experiment:
        """A container re-created in the same pod: its own files are the originals again, the pod's as first saved."""
        snap = self.cgroups.refresh_container_snapshot(exp.cgroup_snapshot, cg) if exp.cgroup_snapshot else None
        return exp.replace(target=dataclasses.replace(exp.target, container_id=info.id), cgroup_snapshot=snap,
                           cri_original=info.resources.to_dict() if info.resources is not None else None,
                           cri_sent=None, cri_intent=())

    # -- apply --

    def apply(self, req: ApplyRequest) -> ApplyResult:
        """Change the limits of one container; all or nothing. See the module docstring."""
        started = time.perf_counter()
        try:
            req.validate()
            self._check_namespace(req.target)
            with self._locked(f"{req.target.namespace}/{req.target.pod}"):
                result = self._apply_locked(req)
        except EngineError as e:
            self.metrics.failures.labels("apply", type(e).__name__).inc()
            raise
        if not req.dry_run:
            methods = {r.method.value for r in result.resources if r.resource in CPU_MEM}
            self.metrics.apply_latency.labels(
                methods.pop() if len(methods) == 1 else "netlink" if not methods else "mixed"
            ).observe(time.perf_counter() - started)
        return result

    def _prepare(self, req: ApplyRequest, existing: Experiment | None, needs_view: bool,
                 memory_usage: bool) -> tuple[Any, Any, Readings, Any]:
        """The container (with the runtime's current view when the change goes through it), its cgroups and
        their readings, all under the pod's lock."""
        info = None
        pending = None
        if existing is not None:
            known = self._known.get(existing.target.container_id)
            if known is not None and self._alive(known):
                info = known
                fresh = time.monotonic() - self._view_at.get(known.id, -1e9) < self.view_fresh_s
                if needs_view and not fresh:  # the status call runs while the cgroups are read
                    pending = self._io.submit(self._with_fresh_resources, known)
        if info is None:
            info = self._resolve(req.target)  # a verbose status: its view is fresh
            self._view_at[info.id] = time.monotonic()
        cg = self.cgroups.locate(pid=info.pid, cgroups_path=info.cgroups_path)
        before, cg_state = self.cgroups.read_for_plan(cg, memory_usage=memory_usage)
        if pending is not None:
            try:
                fresh = pending.result()
            except Exception:
                fresh = None
            if fresh is None:  # stopped meanwhile: ask the runtime from scratch
                info = self._resolve(req.target)
                cg = self.cgroups.locate(pid=info.pid, cgroups_path=info.cgroups_path)
                before, cg_state = self.cgroups.read_for_plan(cg, memory_usage=memory_usage)
            else:
                info = fresh
            self._view_at[info.id] = time.monotonic()
        return info, cg, before, cg_state

    def _apply_locked(self, req: ApplyRequest, *, advance: int = 0) -> ApplyResult:
        """``advance``: this is the profile's next step (that many steps are taken off the record)."""
        changes = req.changes.as_map()
        existing = self._record_for(req.target, only_container=True)
        if existing is not None:
            self._check_may_change(existing, req)
        needs_view = req.method is not Method.CGROUP and any(r in CPU_MEM for r in changes)
        info, cg, before, cg_state = self._prepare(req, existing, needs_view, Resource.MEMORY in changes)
        target = self._resolved(info)
        if existing is None:
            existing = self._records.get(target.key)
            if existing is not None:
                self._check_may_change(existing, req)
        self._refuse_damaged(target)
        if existing is not None and existing.target.pod_uid and target.pod_uid \
                and existing.target.pod_uid != target.pod_uid:
            # A pod of the same name but another UID (a StatefulSet re-created it): another pod. The old
            # experiment ends; nothing of it is carried over to the new pod.
            self._end(existing, END_POD_REPLACED, Location(None, None, gone=END_POD_REPLACED))
            existing = None

        base = existing
        new_snapshot = existing is None
        if existing is not None and existing.target.container_id != target.container_id:
            base = self._adopt(existing, info, cg)
            new_snapshot = True
        exp = self._new_record(req, info, target, cg, before, changes) if base is None \
            else self._merged_record(base, req, info, changes, advance)
        if req.latency_s is not None and exp.net is not None:
            exp = exp.replace(net=dataclasses.replace(exp.net, latency_s=req.latency_s))
        net_before = self._rates(exp) if any(r in changes for r in BANDWIDTH) else {}
        previous = _values(before, net_before, exp)

        # Pure checks first, so a refused request changes nothing.
        cpu_quota = quota_for(exp.desired[Resource.CPU], before.cpu_period_us) if Resource.CPU in exp.desired else None
        if Resource.CPU in changes:
            self._check_cpu_quota(cpu_quota, before, changes[Resource.CPU])
        plan = self.cgroups.check(cg, cpu_quota_us=cpu_quota if Resource.CPU in changes else None,
                                  memory_limit_bytes=exp.desired.get(Resource.MEMORY) if Resource.MEMORY in changes
                                  else None, force=req.force, state=cg_state)
        if any(r in changes for r in BANDWIDTH):
            self._check_bandwidth_owner(exp)
        if req.dry_run:
            return self._result(exp, set(changes), previous, None, dry_run=True, created=base is None)

        payload = self._cri_payload(exp, info, before) if needs_view else None
        payload_dict = payload.to_dict() if payload is not None else None  # once: asdict is not cheap
        attempt = _as_made(exp, changes, req.method, payload_dict)  # what the record says once made
        saving = None
        if new_snapshot or (exp.net is not None and (base is None or base.net is None)):
            # A new snapshot of originals: on disk before anything changes. A crash after this point
            # is undone at the next start; with the runtime involved, its view is put back too.
            intent = exp.replace(phase=Phase.APPLYING, cri_intent=tuple(
                sorted((r for r in changes if r in CPU_MEM), key=lambda r: r.value)) if needs_view else ())
            try:
                self._save(intent, durable=True)
            except state_mod.StateError as e:
                raise ApplyFailed(f"{e}; nothing was changed") from e
            exp = intent
            attempt = attempt.replace(cri_intent=intent.cri_intent, phase=Phase.APPLYING)
        else:
            # A further change: the record is written while the change is made. A crash meanwhile
            # leaves the old or the new active record, and drift makes the kernel match it.
            saving = self._io.submit(self._save, attempt.replace(phase=Phase.ACTIVE), False)
        progress = _Progress()
        try:
            made = self._enforce(exp, info, cg, changes=set(changes), method=req.method, force=req.force,
                                 before=before, plan=plan, payload=payload, progress=progress,
                                 payload_dict=payload_dict)
            made = made.replace(phase=Phase.ACTIVE, cri_intent=())
            if saving is None or (made.methods, made.cri_sent, made.net) != (attempt.methods, attempt.cri_sent,
                                                                             attempt.net):
                # (Also when the runtime refused and cgroup writes did it.)
                if saving is not None:
                    concurrent.futures.wait([saving])
                saving = self._io.submit(self._save, made, False)
            in_force = self._verify(made, cg, set(made.desired))
            queues = self._queues(made, in_force) if any(r in changes for r in BANDWIDTH) else {}
            saving.result()
        except Exception as e:
            if saving is not None:
                concurrent.futures.wait([saving])  # the rollback's own write must land after it
            # What the rollback must undo: the runtime's view only if the call reached it (or may have).
            attempt = attempt.replace(cri_intent=(), cri_sent=progress.cri_sent if progress.cri_sent is not None
                                      else exp.cri_sent)
            undone = self._roll_back(base, attempt, info, cg, e, set(changes))
            if isinstance(e, EngineError):
                raise type(e)(f"{e}; {undone}") from e
            raise ApplyFailed(f"applying to {target.describe()} failed: {e}; {undone}") from e
        self._set(made)
        with self._guard:
            if made.methods.get(Resource.CPU) is Method.CRI or made.methods.get(Resource.MEMORY) is Method.CRI:
                if made.cri_sent is not None and made.cri_sent is not exp.cri_sent:
                    from cri_api.types import LinuxResources

                    # The payload itself when that is what was sent (saves rebuilding it from the record).
                    sent = payload if payload is not None and made.cri_sent is payload_dict \
                        else LinuxResources.from_dict(made.cri_sent)
                    info = dataclasses.replace(info, resources=sent)
                    self._view_at[info.id] = time.monotonic()
            self._known[info.id] = info
        self._schedule_next(made)
        for r in changes:
            self.metrics.applies.labels(r.value, made.methods[r].value).inc()
            if log.isEnabledFor(logging.INFO):  # (its arguments are formatted before logging looks)
                log.info("applied %s on %s: %s -> %s (read back) via %s%s", r.value, target.describe(),
                         fmt(r, previous[r]), fmt(r, in_force[r]), made.methods[r].value,
                         f", expires at {_iso(made.expires_at)}" if made.expires_at else "")
        result = self._result(made, set(changes), previous, in_force, dry_run=False, created=base is None,
                              queues=queues)
        self._emit(EventKind.APPLIED, made, resources=result.resources)
        return result

    def _check_may_change(self, exp: Experiment, req: ApplyRequest) -> None:
        if exp.phase is not Phase.ACTIVE:
            why = f" ({exp.failure.reason})" if exp.failure else ""
            raise Conflict(f"the experiment on {exp.key} is being reverted{why}; nothing was changed; wait for"
                           " it to finish (status shows it) or run --reset to try the restore now")
        if exp.owner != req.owner:
            if exp.owner.kind is OwnerKind.NODE_LOCAL:
                raise Conflict(f"container {exp.target.container} is already under a node-local experiment"
                               f" ({exp.experiment_id}); reset it with kubectl-chaos --agent-address first")
            raise Conflict(f"container {exp.target.container} is already changed by {exp.owner.describe()};"
                           " reset that one first")

    def _refuse_damaged(self, target: ResolvedTarget) -> None:
        if not self._damaged:  # (read without the guard: a dict's truth is one atomic look)
            return
        stem = state_mod.record_name(target.key)
        with self._guard:
            bad = next((d for d in self._damaged.values() if pathlib.Path(d.file).stem == stem or d.key == target.key),
                       None)
        if bad is not None:
            raise Conflict(f"the state record of {target.key} is damaged ({bad.reason}); what it held may still be in"
                           f" force: run --reset on it first (file {bad.file})")

    def _new_record(self, req: ApplyRequest, info: Any, target: ResolvedTarget, cg: Any, before: Readings,
                    changes: dict[Resource, int]) -> Experiment:
        now = self.clock()
        net = None
        original: dict[Resource, int] = {Resource.CPU: millicpu_of(before.cpu_quota_us, before.cpu_period_us),
                                         Resource.MEMORY: before.memory_limit_bytes}
        if any(r in changes for r in BANDWIDTH):
            net, rates = self._new_net(info)
            original.update(rates)
        profile = self._profile(req)
        return Experiment(
            experiment_id=uuid.uuid4().hex[:12],
            target=target,
            sandbox_id=info.sandbox_id,
            owner=req.owner,
            phase=Phase.APPLYING,
            started_at=now,
            expires_at=now + req.duration_s if req.duration_s else None,
            original=original,
            desired=dict(changes),
            methods={},
            cgroup_snapshot=self.cgroups.snapshot(cg),
            cri_original=info.resources.to_dict() if info.resources is not None else None,
            net=net,
            only_container=req.target.container is None,
            steps=profile[0],
            steps_total=profile[1],
            oom_kills_at_start=observe.oom_kills(cg),
        )

    def _new_net(self, info: Any) -> tuple[NetState, dict[Resource, int]]:
        host = self.net.find_host_veth(info.pid, pod=f"{info.pod_namespace}/{info.pod_name}")
        net = NetState(host_ifname=host, ifb_key=info.sandbox_id, snapshot=None,
                       ingress_hook_before=self.net.has_ingress_hook(host))
        ingress, egress = self.net.read_rates(host, info.sandbox_id)
        return net, {Resource.INGRESS: ingress, Resource.EGRESS: egress}

    def _merged_record(self, base: Experiment, req: ApplyRequest, info: Any, changes: dict[Resource, int],
                       advance: int = 0) -> Experiment:
        """A further change on the same container keeps the first snapshot, so a reset returns to the true original."""
        desired = {**base.desired, **changes}
        original = dict(base.original)
        net = base.net
        if any(r in changes for r in BANDWIDTH) and net is None:
            net, rates = self._new_net(info)
            original.update(rates)
        if advance:
            # The profile's next step: the steps still to come stay, the end time too.
            return base.replace(desired=desired, original=original, net=net, steps=base.steps[advance:],
                                step_note="")
        # A new command replaces a profile under way (with its own steps, if it has any).
        steps, total = self._profile(req)
        return base.replace(desired=desired, original=original, net=net, steps=steps, steps_total=total,
                            step_note="",
                            expires_at=self.clock() + req.duration_s if req.duration_s else base.expires_at)

    def _profile(self, req: ApplyRequest) -> tuple[tuple[Step, ...], int]:
        now = self.clock()
        steps = tuple(Step(at=now + s.offset_s, values=s.changes.as_map()) for s in req.steps)
        return steps, len(steps) + 1 if steps else 0

    def _schedule_next(self, exp: Experiment) -> None:
        """The one moment the supervisor holds for an active experiment: its next step or its end."""
        moments = [m for m in (exp.expires_at, exp.steps[0].at if exp.steps else None) if m is not None]
        if moments:
            self.supervisor.schedule(exp.key, min(moments))
        else:
            self.supervisor.cancel(exp.key)

    def _check_cpu_quota(self, quota_us: int | None, before: Readings, millicpu: int) -> None:
        if quota_us is not None and quota_us < 1000:
            raise InvalidRequest(
                f"cpu {millicpu}m gives a CFS quota of {quota_us}us at the container's period of {before.cpu_period_us}us;"
                f" the kernel accepts >= 1000us (>= {-(-1000 * 1000 // before.cpu_period_us)}m at this period)")

    def _check_bandwidth_owner(self, exp: Experiment) -> None:
        with self._guard:
            for key, other in self._records.items():
                if key != exp.key and other.net is not None and other.sandbox_id == exp.sandbox_id:
                    raise Conflict(f"the bandwidth of pod {exp.pod_key} is already shaped by the experiment on"
                                   f" container {other.target.container}; change it there")

    # -- doing it --

    def _cri_payload(self, exp: Experiment, info: Any, before: Readings) -> Any:
        """What UpdateContainerResources gets: the runtime's current view with every CPU and memory value of
        the experiment (not only this request's), so the runtime's stored view never holds a stale one."""
        kw: dict[str, int] = {}
        if Resource.CPU in exp.desired:
            kw["cpu_quota_us"] = quota_for(exp.desired[Resource.CPU], before.cpu_period_us)
        if Resource.MEMORY in exp.desired:
            kw["memory_limit_bytes"] = exp.desired[Resource.MEMORY]
        # memsw follows the memory limit in the merge (containerd keeps them equal: no swap).
        return merge_resources(info.resources, **kw)

    def _enforce(self, exp: Experiment, info: Any, cg: Any, *, changes: set[Resource], method: Method, force: bool,
                 before: Readings | None = None, plan: Any = None, payload: Any = None,
                 progress: _Progress | None = None, payload_dict: dict[str, Any] | None = None) -> Experiment:
        """Put ``changes`` of the desired values in force; the record as made. Raises on the first failure."""
        before = before if before is not None else self.cgroups.read(cg)
        desired = exp.desired
        methods = dict(exp.methods)
        cri_sent = exp.cri_sent
        net = exp.net
        cpu_quota = quota_for(desired[Resource.CPU], before.cpu_period_us) if Resource.CPU in changes else None
        mem = desired[Resource.MEMORY] if Resource.MEMORY in changes else None
        if cpu_quota is not None or mem is not None:
            progress = progress or _Progress()
            used = self._set_cpu_memory(exp, info, cg, cpu_quota, mem, method, force, plan, before, payload,
                                        progress, payload_dict)
            if used[0] is Method.CRI:
                cri_sent = progress.cri_sent
            for r in changes & set(CPU_MEM):
                methods[r] = used[0]
        if changes & set(BANDWIDTH):
            assert net is not None
            # The first shaping's snapshot saw the veth as it was; later calls extend it, never replace it.
            snap = self.net.shape(net.host_ifname, net.ifb_key, ingress_bps=desired.get(Resource.INGRESS),
                                  egress_bps=desired.get(Resource.EGRESS), snapshot=net.snapshot,
                                  latency_s=net.latency_s)
            net = dataclasses.replace(net, snapshot=snap)
            for r in BANDWIDTH:
                if r in desired:
                    methods[r] = Method.NETLINK
        return exp.replace(methods=methods, cri_sent=cri_sent, net=net)

    def _set_cpu_memory(self, exp: Experiment, info: Any, cg: Any, cpu_quota: int | None, mem: int | None,
                        method: Method, force: bool, plan: Any, before: Readings, payload: Any,
                        progress: _Progress, payload_dict: dict[str, Any] | None) -> tuple[Method, Any]:
        from cri_api import errors as cri_errors

        if method in (Method.AUTO, Method.CRI):
            sent = payload if payload is not None else self._cri_payload(exp, info, before)
            sent_dict = payload_dict if payload is not None and payload_dict is not None else sent.to_dict()

            def runtime_call() -> None:
                try:
                    self.cri.update_container_resources(info.id, sent)
                except cri_errors.RuntimeUnreachable:
                    # A timeout may have reached the runtime; an answered refusal left its view as it was.
                    progress.cri_sent = sent_dict
                    raise
                progress.cri_sent = sent_dict

            try:
                self.cgroups.set_through(cg, cpu_quota_us=cpu_quota, memory_limit_bytes=mem, force=force,
                                         runtime_call=runtime_call, plan=plan)
                return Method.CRI, sent
            except cri_errors.CRIError as e:
                if method is Method.CRI:
                    raise Refused(f"the runtime refused UpdateContainerResources for {info.id[:12]}: {e}") from e
                log.warning("runtime refused UpdateContainerResources for %s (%s); falling back to cgroup writes",
                            info.id[:12], e)
        self.cgroups.set_container(cg, cpu_quota_us=cpu_quota, memory_limit_bytes=mem, force=force, plan=plan)
        return Method.CGROUP, None

    def _verify(self, exp: Experiment, cg: Any, resources: set[Resource]) -> dict[Resource, int]:
        """Read the kernel back; raise if any resource of the experiment is not what it must be."""
        after = self.cgroups.read(cg) if resources & set(CPU_MEM) else None
        rates = self._rates(exp) if resources & set(BANDWIDTH) else {}
        in_force = _values(after, rates, exp)
        for r in resources:
            want = exp.desired[r]
            if not same_quantity(r, want, in_force[r]):
                raise ApplyFailed(f"{r.value} reads back as {fmt(r, in_force[r])} after setting {fmt(r, want)}")
        return in_force

    def _queues(self, exp: Experiment, rates: dict[Resource, int]) -> dict[Resource, QueueResult]:
        """The queue of each shaped direction of the experiment, read from the kernel (unknown with the
        reason when it cannot be read)."""
        directions = [r for r in BANDWIDTH if r in exp.desired]
        if exp.net is None or not directions:
            return {}
        try:
            info = self.net.read_queues(exp.net.host_ifname, exp.net.ifb_key)
        except Exception as e:  # a report: a reading that fails is shown as unknown, never guessed
            return {r: QueueResult(budget_s=exp.net.latency_s, unknown=f"cannot read the qdiscs: {e}")
                    for r in directions}
        return queue_results(info, rates, exp.net.latency_s, directions)

    def _rates(self, exp: Experiment) -> dict[Resource, int]:
        if exp.net is None:
            return {}
        ingress, egress = self.net.read_rates(exp.net.host_ifname, exp.net.ifb_key)
        return {Resource.INGRESS: ingress, Resource.EGRESS: egress}

    def _roll_back(self, base: Experiment | None, attempt: Experiment, info: Any, cg: Any, cause: BaseException,
                   changes: set[Resource]) -> str:
        """Undo a failed apply exactly: back to the originals (first change) or to the experiment as it was.
        A rollback that fails keeps the record (rollback-failed, the true originals) and is retried."""
        log.warning("apply on %s failed (%s); rolling back", attempt.key, cause)
        self._view_at.pop(info.id, None)  # the rollback may tell the runtime other values: ask it next time
        loc = Location(info, cg)
        try:
            if base is None:
                self.restorer.restore(attempt, loc)
                self._forget(attempt)
                return "what this request had changed was rolled back"
            added = set(attempt.desired) - set(base.desired)
            if added:
                self.restorer.restore(attempt, loc, only=added)
            kept = base
            if set(base.desired) & set(CPU_MEM) & changes:
                kept = self._enforce(kept, info, cg, changes=set(base.desired) & set(CPU_MEM) & changes,
                                     method=_cpu_mem_method(base), force=True)
            if base.net is not None and changes & set(BANDWIDTH):
                kept = self._enforce(kept, info, cg, changes=set(base.desired) & set(BANDWIDTH), method=Method.AUTO,
                                     force=True)
            if attempt.cri_sent is not None and attempt.cri_sent != kept.cri_sent and not (set(kept.desired) & set(CPU_MEM) & changes):
                # The runtime was sent this request's values for a resource the experiment keeps
                # unchanged: tell it the experiment's values again.
                kept = self._enforce(kept, info, cg, changes=set(kept.desired) & set(CPU_MEM), method=Method.CRI,
                                     force=True)
            self._verify(kept, cg, set(kept.desired))
            self._save(kept, durable=True)
            self._set(kept)
            return "what this request had changed was rolled back; the experiment is as it was"
        except Exception as e:
            failing = self._failed(attempt.replace(phase=Phase.ROLLBACK_FAILED, end_reason=END_ROLLED_BACK), str(e))
            listed = list(e.still) if isinstance(e, RestoreError) else []
            listed += [s for s in self._still_changed(failing) if s.split(" ", 1)[0] not in " ".join(listed)]
            still = ", ".join(listed) or "nothing the kernel shows"
            return (f"the rollback failed too ({e}); still changed: {still}; the agent keeps restoring the originals"
                    f" (next try in {failing.failure.next_retry_at - self.clock():.0f}s; status shows it)")

    def _still_changed(self, exp: Experiment) -> list[str]:
        """What differs from the originals now, as read from the kernel."""
        values, unknown = self._readings(exp, None)
        out = []
        for r in sorted(exp.desired, key=lambda r: r.value):
            orig = exp.original.get(r, UNLIMITED)
            if r in unknown:
                out.append(f"{r.value} unknown ({unknown[r]})")
            elif not same_quantity(r, orig, values.get(r, orig)):
                out.append(f"{r.value} {fmt(r, values[r])} (original {fmt(r, orig)})")
        return out

    def _failed(self, exp: Experiment, reason: str) -> Experiment:
        """Record a failed restore: the next try after backoff, one log line, one event."""
        now = self.clock()
        attempts = exp.failure.attempts + 1 if exp.failure else 1
        delay = self.supervisor.backoff(attempts)
        failing = exp.replace(failure=Failure(reason=reason, attempts=attempts,
                                              since=exp.failure.since if exp.failure else now,
                                              next_retry_at=now + delay))
        self._save_quiet(failing)
        self._set(failing)
        self.supervisor.schedule(failing.key, now + delay)
        log.warning("restoring %s (%s) failed, try %d: %s; next try in %.1fs", failing.key, failing.phase.value,
                    attempts, reason, delay)
        self.metrics.failures.labels("restore", failing.phase.value).inc()
        self._emit(EventKind.REVERT_FAILING, failing, reason=reason, next_retry_at=now + delay)
        return failing

    # -- revert, end --

    def revert(self, req: RevertRequest) -> RevertResult:
        """Restore the originals of one container; ``was_active`` is false when nothing was under experiment."""
        try:
            req.validate()
            self._check_namespace(req.target)
            with self._locked(f"{req.target.namespace}/{req.target.pod}"):
                exp = self._record_for(req.target)
                if exp is None:
                    return self._revert_nothing(req)
                if req.owner is not None and exp.owner != req.owner:
                    raise Conflict(f"the experiment on {exp.key} belongs to {exp.owner.describe()}, not to"
                                   f" {req.owner.describe()}; nothing was changed")
                return self._revert_locked(exp, reason=END_REQUESTED, force=req.force, dry_run=req.dry_run)
        except EngineError as e:
            self.metrics.failures.labels("revert", type(e).__name__).inc()
            raise

    def _revert_nothing(self, req: RevertRequest) -> RevertResult:
        target = req.target
        bad = self._damaged_for(target)
        if bad is not None:
            return self._reset_damaged(bad, req.dry_run)
        info = self._resolve(target)
        resolved = self._resolved(info)
        bad = self._damaged_for(Target(resolved.namespace, resolved.pod, resolved.container))
        if bad is not None:
            return self._reset_damaged(bad, req.dry_run)
        return RevertResult(target=resolved, resources=(), was_active=False, dry_run=req.dry_run)

    def _revert_locked(self, exp: Experiment, *, reason: str, force: bool = False, dry_run: bool = False) -> RevertResult:
        exp, loc = self._locate(exp)
        previous, prev_unknown = self._readings(exp, loc)
        if dry_run:
            return RevertResult(target=exp.target, resources=self._revert_results(exp, previous, prev_unknown, None, {}),
                                was_active=True, dry_run=True)
        if exp.phase is Phase.ACTIVE:
            exp = exp.replace(phase=Phase.REVERTING, end_reason=reason)
            # The restore comes first even when this write fails (a full state filesystem): the
            # record is removed afterwards, and unlinking needs no space.
            self._save_quiet(exp)
        elif not exp.end_reason:
            exp = exp.replace(end_reason=END_RECOVERED if exp.phase is Phase.APPLYING else reason)
        self._set(exp)
        try:
            self.restorer.restore(exp, loc, force=force)
        except RestoreError as e:
            failing = self._failed(exp if exp.phase is not Phase.REVERTING else exp.replace(phase=Phase.REVERT_FAILING),
                                   str(e))
            done = f"; restored: {', '.join(e.done)}" if e.done else ""
            still = ", ".join(e.still) or "nothing"
            raise RevertIncomplete(
                f"{exp.target.describe()}: {e}{done}; still changed: {still}; the agent tries again in"
                f" {failing.failure.next_retry_at - self.clock():.0f}s and backs off up to"
                f" {self.supervisor.backoff_max_s:.0f}s (status shows it)",
                next_retry_at=failing.failure.next_retry_at) from e
        after, after_unknown = self._readings(exp, loc)  # the pod gone: every value unknown, saying why
        self._forget(exp)
        why = exp.end_reason or reason
        self.metrics.reverts.labels(why).inc()
        results = self._revert_results(exp, previous, prev_unknown, after, after_unknown)
        for r in results:
            log.info("reverted %s on %s (%s): %s -> %s", r.resource.value, exp.target.describe(), why,
                     fmt(r.resource, r.previous), r.unknown or f"{fmt(r.resource, r.in_force)} (read back)")
        self._emit(EventKind.ENDED, exp, reason=why, resources=results)
        return RevertResult(target=exp.target, resources=results, was_active=True)

    def _end(self, exp: Experiment, reason: str, loc: Location, *, keep_cpu_memory: bool = False) -> None:
        """End an experiment for a reason the node gave (pod gone, replaced, stopped, resized)."""
        try:
            if keep_cpu_memory:
                if exp.net is not None:
                    self.restorer.restore(exp, loc, only=set(BANDWIDTH))
            else:
                self.restorer.restore(exp, loc)
        except RestoreError as e:
            self._failed(exp.replace(phase=Phase.REVERT_FAILING, end_reason=reason), str(e))
            return
        log.info("%s: %s; experiment ended%s", exp.key, reason,
                 " (the new CPU and memory values stand)" if keep_cpu_memory else "")
        values, unknown = self._readings(exp, loc)
        self._forget(exp)
        self.metrics.reverts.labels(reason).inc()
        self._emit(EventKind.ENDED, exp, reason=reason,
                   resources=self._revert_results(exp, {}, {}, values, unknown))

    def supersede(self, target: Target, reason: str = END_SUPERSEDED) -> bool:
        """End an experiment without putting its CPU and memory originals back (an in-place resize set new
        ones); its bandwidth shaping is removed. False when there was none."""
        with self._locked(f"{target.namespace}/{target.pod}"):
            exp = self._record_for(target)
            if exp is None:
                return False
            exp, loc = self._locate(exp)
            self._end(exp, reason, loc, keep_cpu_memory=True)
            return True

    # -- list --

    def list(self, namespace: str | None = None) -> list[ExperimentInfo]:
        """Every experiment with what the kernel reads now (or why it cannot be read); no runtime call."""
        with self._guard:
            records = list(self._records.values())
        out = []
        for exp in records:
            if namespace and exp.target.namespace != namespace:
                continue
            values, unknown = self._readings(exp, None)
            queues = self._queues(exp, values)
            resources = tuple(
                ResourceResult(resource=r, original=exp.original.get(r, UNLIMITED),
                               previous=exp.original.get(r, UNLIMITED), requested=v,
                               in_force=values.get(r, UNLIMITED), method=exp.methods.get(r, Method.AUTO),
                               unknown=unknown.get(r, ""), queue=queues.get(r))
                for r, v in sorted(exp.desired.items(), key=lambda kv: kv[0].value))
            out.append(ExperimentInfo(experiment_id=exp.experiment_id, target=exp.target, resources=resources,
                                      started_at=exp.started_at, expires_at=exp.expires_at,
                                      drift_corrections=exp.drift_corrections, phase=exp.phase, owner=exp.owner,
                                      failure=exp.failure, steps_total=exp.steps_total, step=exp.step,
                                      next_step_at=exp.steps[0].at if exp.steps else None,
                                      next_step=dict(exp.steps[0].values) if exp.steps else {},
                                      step_note=exp.step_note))
        return sorted(out, key=lambda e: e.target.key)

    def sample(self, namespace: str | None = None) -> list[tuple[ExperimentInfo, observe.Counters, int | None]]:
        """Raw kernel counters of every experiment's container (no runtime call): for ``top`` and metrics.
        Each with the OOM kill count at the experiment's start (figures report kills since then)."""
        import netshape

        with self._guard:
            records = [e for e in self._records.values() if not namespace or e.target.namespace == namespace]
        infos = {i.experiment_id: i for i in self.list(namespace)}
        out = []
        for exp in records:
            directions = tuple(r.value for r in BANDWIDTH if r in exp.desired) if exp.net is not None else ()
            try:
                cg = self._snapshot_cgroups(exp)
                counters = observe.sample(cg, host_ifname=exp.net.host_ifname if exp.net else None,
                                          ifb_name=netshape.ifb_name(exp.net.ifb_key) if exp.net else None,
                                          directions=directions)
            except Exception as e:
                counters = observe.Counters(at_s=time.monotonic(), errors=(str(e),))
            if exp.experiment_id in infos:
                out.append((infos[exp.experiment_id], counters, exp.oom_kills_at_start))
        return out

    def list_damaged(self, namespace: str | None = None) -> list[DamagedRecord]:
        with self._guard:
            bad = list(self._damaged.values())
        return sorted((d for d in bad if not namespace or not d.key or d.key.startswith(namespace + "/")),
                      key=lambda d: d.file)

    def scheduled(self) -> int:
        """How many moments the supervisor holds (at most one per experiment)."""
        return self.supervisor.pending()

    def _readings(self, exp: Experiment, loc: Location | None) -> tuple[dict[Resource, int], dict[Resource, str]]:
        """What the kernel holds now for the experiment's resources, and why any could not be read."""
        values: dict[Resource, int] = {}
        unknown: dict[Resource, str] = {}
        cpu_mem = [r for r in CPU_MEM if r in exp.desired]
        if loc is not None and loc.gone:
            return {}, {r: f"the pod is gone: {loc.gone}" for r in exp.desired}
        if cpu_mem:
            try:
                cg = loc.cg if loc is not None and loc.cg is not None else self._snapshot_cgroups(exp)
                readings = self.cgroups.read(cg)
                values[Resource.CPU] = millicpu_of(readings.cpu_quota_us, readings.cpu_period_us)
                values[Resource.MEMORY] = readings.memory_limit_bytes
            except Exception as e:
                for r in cpu_mem:
                    unknown[r] = f"cannot read the cgroup: {e}"
        if exp.net is not None and any(r in exp.desired for r in BANDWIDTH):
            try:
                values.update(self._rates(exp))
            except Exception as e:
                for r in BANDWIDTH:
                    if r in exp.desired:
                        unknown[r] = f"cannot read the qdiscs: {e}"
        return values, unknown

    def _result(self, exp: Experiment, changed: set[Resource], previous: dict[Resource, int],
                in_force: dict[Resource, int] | None, *, dry_run: bool, created: bool = False,
                queues: dict[Resource, QueueResult] | None = None) -> ApplyResult:
        """The resources this request changed (others of the experiment stay as they were)."""
        queues = queues or {}
        resources = tuple(
            ResourceResult(resource=r, original=exp.original.get(r, UNLIMITED), previous=previous.get(r, UNLIMITED),
                           requested=exp.desired[r], in_force=in_force[r] if in_force is not None else UNLIMITED,
                           method=exp.methods.get(r, Method.NETLINK if r in BANDWIDTH else Method.AUTO),
                           unknown="" if in_force is not None else "dry run: nothing was changed",
                           queue=queues.get(r))
            for r in sorted(changed, key=lambda r: r.value))
        return ApplyResult(experiment_id=exp.experiment_id, target=exp.target, resources=resources,
                           expires_at=exp.expires_at, dry_run=dry_run, created=created,
                           steps_total=exp.steps_total, step=exp.step,
                           next_step_at=exp.steps[0].at if exp.steps else None,
                           next_step=dict(exp.steps[0].values) if exp.steps else {})

    def _revert_results(self, exp: Experiment, previous: dict[Resource, int], prev_unknown: dict[Resource, str],
                        after: dict[Resource, int] | None, after_unknown: dict[Resource, str]) -> tuple[ResourceResult, ...]:
        out = []
        for r in sorted(exp.desired, key=lambda r: r.value):
            orig = exp.original.get(r, UNLIMITED)
            if after is None:
                why = "dry run: nothing was changed"
            else:
                why = after_unknown.get(r, "" if r in after else "not read back")
            out.append(ResourceResult(resource=r, original=orig, previous=previous.get(r, UNLIMITED), requested=orig,
                                      in_force=(after or {}).get(r, UNLIMITED), method=exp.methods.get(r, Method.AUTO),
                                      unknown=why))
        return tuple(out)

    # -- damaged records --

    def _add_damaged(self, path: pathlib.Path, reason: str, key: str) -> None:
        log.error("state record %s is damaged (%s); listed in status until --reset%s", path, reason,
                  f" {key}" if key else "")
        with self._guard:
            self._damaged[str(path)] = DamagedRecord(file=str(path), reason=reason, key=key)

    def _damaged_for(self, target: Target) -> DamagedRecord | None:
        with self._guard:
            bad = list(self._damaged.values())
        if target.container:
            key = f"{target.namespace}/{target.pod}/{target.container}"
            stem = state_mod.record_name(key)
            return next((d for d in bad if d.key == key or pathlib.Path(d.file).stem == stem), None)
        return next((d for d in bad if d.key.startswith(f"{target.namespace}/{target.pod}/")), None)

    def _match_damaged(self) -> None:
        """Find the containers of damaged records (by the record's key or its file name, a hash of the key)
        and remove what is recognisably ours on their pods' network: our IFB, filter and root qdisc."""
        from cri_api import convert
        from cri_api import errors as cri_errors

        with self._guard:
            todo = {pathlib.Path(d.file).stem: d for d in self._damaged.values() if not d.cleaned}
        if not todo:
            return
        try:
            containers = self.cri.list_containers(running_only=True)
        except cri_errors.CRIError:
            return  # the next drift pass tries again
        for c in containers:
            key = "/".join((c.labels.get(convert.LABEL_POD_NAMESPACE, ""), c.labels.get(convert.LABEL_POD_NAME, ""),
                            c.labels.get(convert.LABEL_CONTAINER_NAME, "") or c.metadata.name))
            bad = todo.get(state_mod.record_name(key))
            if bad is None:
                bad = next((d for d in todo.values() if d.key == key), None)
            if bad is None:
                continue
            cleaned = self._clean_damaged_net(c, key)
            with self._guard:
                if bad.file in self._damaged:
                    self._damaged[bad.file] = dataclasses.replace(bad, key=key, cleaned=cleaned)

    def _clean_damaged_net(self, container: Any, key: str) -> tuple[str, ...]:
        try:
            info = self.cri.container_info(container.id)
            host = self.net.find_host_veth(info.pid)
            ingress, egress = self.net.read_rates(host, container.pod_sandbox_id)
            self.net.unshape(host, container.pod_sandbox_id, None)
        except EngineError as e:
            log.error("removing our shaping of %s (damaged record) failed: %s", key, e)
            return ()
        except Exception as e:  # hostNetwork pods, a veth gone meanwhile: nothing of ours to remove
            log.info("no shaping of ours to remove for %s: %s", key, e)
            return ("no shaping of ours found on the pod's network",)
        shaped = [f"{d} {fmt(Resource.INGRESS, v)}" for d, v in (("into the pod", ingress), ("out of the pod", egress))
                  if v != UNLIMITED]
        if shaped:
            log.warning("removed our shaping of %s (damaged record): %s", key, ", ".join(shaped))
            return (f"removed our bandwidth shaping ({', '.join(shaped)})",)
        return ("no shaping of ours found on the pod's network",)

    def _reset_damaged(self, bad: DamagedRecord, dry_run: bool) -> RevertResult:
        """A reset of a container whose record is damaged: remove what is ours, say what cannot be put back."""
        from cri_api import errors as cri_errors

        namespace, pod, container = (bad.key.split("/", 2) + ["", "", ""])[:3] if bad.key else ("", "", "")
        target = ResolvedTarget(namespace=namespace, pod=pod, container=container, container_id="",
                                node_name=self.node_name)
        not_restored = [f"the state record {bad.file} is damaged ({bad.reason})"]
        try:
            info = self.cri.find_container(namespace, pod, container)
            target = self._resolved(info)
            if not dry_run and not bad.cleaned:
                containers = [c for c in self.cri.list_containers(running_only=True) if c.id == info.id]
                if containers:
                    bad = dataclasses.replace(bad, cleaned=self._clean_damaged_net(containers[0], bad.key))
            cg = self.cgroups.locate(pid=info.pid, cgroups_path=info.cgroups_path)
            now = self.cgroups.read(cg)
            not_restored.append(
                f"cpu and memory originals were in that record: now in force cpu"
                f" {fmt(Resource.CPU, millicpu_of(now.cpu_quota_us, now.cpu_period_us))}, memory"
                f" {fmt(Resource.MEMORY, now.memory_limit_bytes)} (read from the kernel); the pod spec's limits are the"
                f" originals: re-create the container (kubectl delete pod {pod} -n {namespace}) to get them back")
        except (cri_errors.CRIError, EngineError) as e:
            not_restored.append(f"the container cannot be read ({e})")
        not_restored.extend(bad.cleaned)
        if not dry_run:
            self.store.delete_file(pathlib.Path(bad.file))
            with self._guard:
                self._damaged.pop(bad.file, None)
            log.warning("reset of damaged record %s: %s", bad.file, "; ".join(not_restored))
        return RevertResult(target=target, resources=(), was_active=True, dry_run=dry_run,
                            not_restored=tuple(not_restored))

    # -- recovery, the supervisor's work --

    def recover(self) -> None:
        """Finish what the state directory says was under way when the agent last stopped."""
        legacy = self._legacy_owners()
        migrated = 0
        for loaded in self.store.load_all():
            if loaded.error:
                self._add_damaged(loaded.path, loaded.error, "")
                continue
            try:
                exp = decode(loaded.data, legacy_owners=legacy)
                if self.store.path_for(exp.key) != loaded.path:
                    raise RecordError(f"its file name does not belong to its key {exp.key}")
            except RecordError as e:
                self._add_damaged(loaded.path, str(e), key_of(loaded.data))
                continue
            if isinstance(loaded.data, dict) and loaded.data.get("schema") != encode(exp)["schema"]:
                self._save(exp, durable=True)  # one record, one file: the owner now lives in it
                migrated += 1
            self._set(exp)
        if legacy is not None:
            log.info("migrated %d record(s) of schema 1; %s is no longer used", migrated, self._legacy_path())
            try:
                self._legacy_path().rename(self._legacy_path().with_suffix(".json.migrated"))
            except OSError as e:
                log.error("cannot set %s aside: %s", self._legacy_path(), e)
        with self._guard:
            keys = list(self._records)
            ifb_keys = {e.net.ifb_key for e in self._records.values() if e.net is not None}
        for key in keys:
            exp = self._records[key]
            if exp.phase is Phase.ACTIVE and (exp.expires_at is None or exp.expires_at > self.clock()):
                log.info("recovering %s: still running; re-armed", key)
                self._schedule_next(exp)
            else:
                log.warning("recovering %s (%s): %s", key, exp.phase.value,
                            "expired while the agent was down; reverting" if exp.phase is Phase.ACTIVE
                            else "finishing the restore")
                self._on_due(key)
        if self.sweep_orphan_ifbs:
            # IFBs of pods that went away while no record knew of them (state lost with a node disk, say).
            try:
                for name in self.net.sweep_orphans(ifb_keys):
                    log.warning("removed orphaned IFB device %s (no experiment owns it, nothing redirects to it)", name)
            except Exception as e:
                log.error("sweeping orphaned IFB devices failed: %s", e)
        self._match_damaged()
        self.check_drift()

    def _legacy_path(self) -> pathlib.Path:
        return self.store.root.parent / "cluster" / "owners.json"

    def _legacy_owners(self) -> dict[str, Any] | None:
        """Schema 1's owners of ResourceChaos experiments (a file of their own then); None when there is none."""
        import json

        try:
            data = json.loads(self._legacy_path().read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.error("%s unreadable (%s): its experiments are taken as node-local", self._legacy_path(), e)
            return {}
        return data if isinstance(data, dict) else {}

    def _on_due(self, key: str) -> None:
        """The supervisor's call: an end time has come, or a failed restore is to be tried again."""
        with self._locked(pod_key(key)):
            exp = self._records.get(key)
            if exp is None:
                return
            if exp.phase is Phase.ACTIVE:
                now = self.clock()
                if exp.expires_at is None or exp.expires_at > now:
                    due = [i for i, st in enumerate(exp.steps) if st.at <= now]
                    if due:
                        self._run_step(exp, due[-1])
                    else:
                        self._schedule_next(exp)
                    return
                reason = END_EXPIRED
            else:
                reason = exp.end_reason or (END_RECOVERED if exp.phase is Phase.APPLYING else END_REQUESTED)
            try:
                self._revert_locked(exp, reason=reason)
            except RevertIncomplete:
                pass  # logged, scheduled and announced by _failed
            except Exception as e:
                self._failed(exp if exp.phase is not Phase.ACTIVE else exp.replace(phase=Phase.REVERT_FAILING,
                                                                                   end_reason=reason), str(e))

    def _run_step(self, exp: Experiment, index: int) -> None:
        """Put the profile's step ``index`` of those to come in force (skipping the ones missed while the
        agent was down). A step the kernel refuses (memory below what the container holds) is held,
        reported and tried again with backoff; it is never forced."""
        step = exp.steps[index]
        t = exp.target
        method = Method.CGROUP if _cpu_mem_method(exp) is Method.CGROUP else Method.AUTO
        req = ApplyRequest(target=Target(t.namespace, t.pod, t.container), method=method, owner=exp.owner,
                           changes=Changes(cpu_millicpu=step.values.get(Resource.CPU),
                                           memory_bytes=step.values.get(Resource.MEMORY),
                                           ingress_bps=step.values.get(Resource.INGRESS),
                                           egress_bps=step.values.get(Resource.EGRESS)))
        try:
            self._apply_locked(req, advance=index + 1)
            self._step_tries.pop(exp.key, None)
            log.info("profile of %s: step %d of %d in force", exp.key, exp.steps_total - len(exp.steps) + index + 1,
                     exp.steps_total)
        except EngineError as e:
            tries = self._step_tries.get(exp.key, 0) + 1
            self._step_tries[exp.key] = tries
            delay = self.supervisor.backoff(tries)
            held = exp.replace(step_note=f"step {exp.steps_total - len(exp.steps) + index + 1} held: {e}")
            self._save_quiet(held)
            self._set(held)
            self.supervisor.schedule(exp.key, self.clock() + delay)
            log.warning("profile of %s: %s; trying again in %.1fs", exp.key, held.step_note, delay)

    # Names the tests and the agent used before the supervisor existed.
    def expire_due(self) -> None:
        self.supervisor.run_due()

    retry_recovery = expire_due

    def check_drift(self) -> None:
        """Re-apply active experiments whose limits something reset; end those whose pod is gone, replaced or
        stopped, and those an in-place resize has superseded. Never touches a record that is not active."""
        with self._guard:
            keys = [k for k, e in self._records.items() if e.phase is Phase.ACTIVE]
        for key in keys:
            with self._locked(pod_key(key), blocking=False) as got:
                if not got:
                    continue  # a request is working on the pod right now
                exp = self._records.get(key)
                if exp is None or exp.phase is not Phase.ACTIVE:
                    continue
                try:
                    self._check_one(exp)
                except Exception as e:
                    log.error("drift check on %s failed: %s", key, e)
                    self.metrics.failures.labels("drift", type(e).__name__).inc()
        if self._damaged:
            self._match_damaged()

    def _runtime_unreachable(self, err: Exception) -> None:
        if str(err) != self._runtime_down:
            log.warning("drift check: the runtime does not answer (%s); trying again every pass", err)
            self._runtime_down = str(err)

    def _check_one(self, exp: Experiment) -> None:
        from cri_api import errors as cri_errors

        fresh = None
        old_id = exp.target.container_id
        try:
            info = self._known.get(old_id)
            if info is not None and self._alive(info):
                fresh = self._with_fresh_resources(info)
            if fresh is None:
                fresh = self.cri.find_container(exp.target.namespace, exp.target.pod, exp.target.container)
        except (cri_errors.NotFound, cri_errors.NotRunning) as e:
            try:
                gone = self._why_no_container(exp, e)
            except cri_errors.CRIError as err:
                self._runtime_unreachable(err)
                return
            if gone:  # else the next attempt is on its way: look again next pass
                self._end(exp, gone, self._gone_location(exp, gone))
            return
        except cri_errors.CRIError as e:
            self._runtime_unreachable(e)
            return
        self._runtime_down = ""
        if exp.target.pod_uid and fresh.pod_uid and fresh.pod_uid != exp.target.pod_uid:
            self._end(exp, END_POD_REPLACED, Location(None, None, gone=END_POD_REPLACED))
            return
        cg = self.cgroups.locate(pid=fresh.pid, cgroups_path=fresh.cgroups_path)
        view = view_of(fresh.resources)
        if fresh.id != exp.target.container_id:
            # Re-created in the same pod: its values come from the pod spec. The originals again means the
            # spec is unchanged: follow it. Anything else is a resize that restarted the container.
            if view is not None and view_of(exp.cri_original) not in (None, view):
                self._end(exp, END_SUPERSEDED, Location(fresh, cg), keep_cpu_memory=True)
                return
            cause = "container-restarted"
            exp = self._adopt(exp, fresh, cg)
            if exp.net is not None:
                host = self.net.find_host_veth(fresh.pid, pod=exp.pod_key)
                exp = exp.replace(net=dataclasses.replace(exp.net, host_ifname=host))
            stale = set(exp.desired)
        else:
            ours = view_of(exp.cri_sent) if exp.cri_sent is not None else view_of(exp.cri_original)
            if view is not None and ours is not None and view not in (ours, view_of(exp.cri_original)):
                # Neither what we sent nor the originals: the kubelet resized the container in place.
                self._end(exp, END_SUPERSEDED, Location(fresh, cg), keep_cpu_memory=True)
                return
            readings = self.cgroups.read(cg) if set(exp.desired) & set(CPU_MEM) else None
            now = _values(readings, self._rates(exp) if exp.net is not None else {}, exp)
            stale = {r for r, v in exp.desired.items() if not same_quantity(r, v, now[r])}
            if exp.net is not None and set(exp.desired) & set(BANDWIDTH):
                # A queue someone replaced or resized is drift like a changed rate.
                stale |= stale_queues(self.net.read_queues(exp.net.host_ifname, exp.net.ifb_key), exp.desired,
                                      exp.net.latency_s)
            if view is not None and view == view_of(exp.cri_original) and ours not in (None, view) \
                    and set(exp.desired) & set(CPU_MEM):
                stale |= set(exp.desired) & set(CPU_MEM)  # the runtime was set back: tell it again
            cause = "limit-reset"
        with self._guard:
            if old_id != fresh.id:
                self._known.pop(old_id, None)
                self._view_at.pop(old_id, None)
            self._known[fresh.id] = fresh
            self._view_at[fresh.id] = time.monotonic()
        if not stale:
            return
        log.warning("drift on %s (%s): %s no longer in force; applying again", exp.key, cause,
                    ", ".join(sorted(r.value for r in stale)))
        method = _cpu_mem_method(exp)
        made = self._enforce(exp, fresh, cg, changes=stale, method=method, force=True)
        if made.cri_sent is not exp.cri_sent and made.cri_sent is not None:
            from cri_api.types import LinuxResources

            with self._guard:
                self._known[fresh.id] = dataclasses.replace(fresh, resources=LinuxResources.from_dict(made.cri_sent))
        self._verify(made, cg, stale)
        made = made.replace(drift_corrections=exp.drift_corrections + 1)
        self._save_quiet(made)
        self._set(made)
        self.metrics.drift_corrections.labels(cause).inc()


def _values(readings: Readings | None, rates: dict[Resource, int], exp: Experiment) -> dict[Resource, int]:
    values: dict[Resource, int] = {}
    if readings is not None:
        values[Resource.CPU] = millicpu_of(readings.cpu_quota_us, readings.cpu_period_us)
        values[Resource.MEMORY] = readings.memory_limit_bytes
    for r in BANDWIDTH:
        values[r] = rates.get(r, exp.original.get(r, UNLIMITED))
    return values


def _as_made(exp: Experiment, changes: dict[Resource, int], method: Method,
             payload_dict: dict[str, Any] | None) -> Experiment:
    """The record as it will be once ``changes`` are made by ``method`` (the runtime for auto)."""
    methods = dict(exp.methods)
    for r in changes:
        methods[r] = Method.NETLINK if r in BANDWIDTH else Method.CGROUP if method is Method.CGROUP else Method.CRI
    cri_sent = payload_dict if payload_dict is not None and method is not Method.CGROUP else exp.cri_sent
    return exp.replace(phase=Phase.ACTIVE, cri_intent=(), methods=methods, cri_sent=cri_sent)


def _cpu_mem_method(exp: Experiment) -> Method:
    """How the record's CPU and memory were last changed (cri or cgroup); auto when neither was."""
    return exp.methods.get(Resource.CPU) or exp.methods.get(Resource.MEMORY) or Method.AUTO


@dataclasses.dataclass
class _Progress:
    """What one enforcement has done so far that a rollback needs to know: the resources the runtime got."""

    cri_sent: dict[str, Any] | None = None


class _KeyLock:
    """A pod's lock and how many requests hold or wait for it (the lock is dropped at zero)."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


__all__ = ["Engine", "NODE_LOCAL", "quota_for", "millicpu_of", "same_quantity"]
