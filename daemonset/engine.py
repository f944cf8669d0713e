"""The experiment engine: resolve, snapshot, apply, verify, roll back, expire, correct drift.

One ``Engine`` per node serves every front door (the agent's gRPC server, cluster mode). It is
thread-safe: changes to one container are serialized by a per-container lock, different containers
proceed in parallel. Its dependencies come in through the constructor: the CRI client, the cgroup
and proc roots (``/host/sys/fs/cgroup`` and ``/host/proc`` in a pod), the bandwidth shaper and the
clock.

The state directory holds one record per container under experiment (see ``daemonset.state``),
written before anything is touched and after every change, so a restart finishes what a crash
interrupted: it reverts what expired, re-arms what still runs and undoes half-made changes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from cri_api.merge import merge_resources
from daemonset import state as state_mod
from daemonset.cgroups import CgroupOps, Readings
from daemonset.metrics import Metrics
from daemonset.net import NetOps
from daemonset.types import (
    UNLIMITED,
    ApplyFailed,
    ApplyRequest,
    ApplyResult,
    Conflict,
    Denied,
    EngineError,
    ExperimentInfo,
    InvalidRequest,
    Method,
    Refused,
    ResolvedTarget,
    Resource,
    ResourceResult,
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

CPU_MEM = (Resource.CPU, Resource.MEMORY)
BANDWIDTH = (Resource.INGRESS, Resource.EGRESS)


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
        self.drift_interval_s = drift_interval_s
        self.sweep_orphan_ifbs = sweep_orphan_ifbs
        self.store = state_mod.StateStore(state_dir)
        self._records: dict[str, dict[str, Any]] = {}
        self._known: dict[str, Any] = {}  # container id -> ContainerInfo of containers under experiment
        self._unrecovered: dict[str, dict[str, Any]] = {}  # records recovery could not finish yet
        self._recovery_errors: dict[str, str] = {}  # and why, by key
        self._locks: dict[str, _KeyLock] = {}
        self._guard = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Runtime calls and state writes that overlap other work of the same request.
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="chaos-io")

    # -- lifecycle --

    def start(self, *, background: bool = True) -> None:
        """Recover from the state directory, then expire and check drift in a background thread."""
        try:
            self.store.lock()
        except state_mod.StateError as e:
            raise EngineError(str(e)) from e
        self.recover()
        if background and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="chaos-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the background thread; experiments stay in force and on disk for the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._io.shutdown(wait=True)
        self.store.close()

    @contextlib.contextmanager
    def _locked(self, key: str, *, blocking: bool = True) -> Iterator[bool]:
        # A lock lives while someone holds or waits for it, so the table stays as small as the
        # number of containers being worked on (not every container ever changed).
        with self._guard:
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = _KeyLock()
            lock.users += 1
        got = lock.acquire(blocking)
        try:
            yield got
        finally:
            if got:
                lock.release()
            with self._guard:
                lock.users -= 1
                if lock.users == 0:
                    del self._locks[key]

    # -- resolution --

    def _resolve(self, target: Target) -> Any:
        """The running container asked for, through CRI; errors name what was asked and what exists."""
        if target.namespace in self.deny_namespaces:
            raise Denied(
                f"namespace {target.namespace} is denied on this agent (denied: {', '.join(sorted(self.deny_namespaces))})"
            )
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

    def _resolve_known(self, target: Target, needs_runtime_view: bool) -> tuple[Any, Any] | None:
        """A container under experiment, without listing the runtime's containers; None to look it up.

        The container found when the experiment started still runs while its process lives in a
        cgroup named after it (a restart makes a new container id and process). When the change
        goes through CRI the merge needs the runtime's current view of its resources: that status
        call is started here and runs while the cgroups are read; ``(info, pending)`` where
        ``pending`` is a future of the fresh info (None there when the change needs no runtime view).
        """
        if target.namespace in self.deny_namespaces:
            return None
        with self._guard:
            if target.container:
                rec = self._records.get(f"{target.namespace}/{target.pod}/{target.container}")
            else:
                recs = [r for r in self._records.values() if r["target"]["namespace"] == target.namespace
                        and r["target"]["pod"] == target.pod and r.get("only_container")]
                rec = recs[0] if len(recs) == 1 else None
            info = self._known.get(rec["target"]["container_id"]) if rec else None
        if info is None:
            return None
        pending = self._io.submit(self._with_fresh_resources, info) if needs_runtime_view else None
        if not self._alive(info):
            return None
        return info, pending

    @staticmethod
    def _await_fresh(pending: Any) -> Any:
        """The fresh info a ``_resolve_known`` status call returns; raises _Stale when it is not running."""
        try:
            fresh = pending.result()
        except Exception as e:
            raise _Stale(str(e)) from e
        if fresh is None:
            raise _Stale("not running")
        return fresh

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
        try:
            with open(f"{self.proc_root}/{info.pid}/cgroup") as f:
                return info.id in f.read()
        except (OSError, TypeError):
            return False

    def _resolved(self, info: Any) -> ResolvedTarget:
        return ResolvedTarget(
            namespace=info.pod_namespace,
            pod=info.pod_name,
            container=info.name,
            container_id=info.id,
            pod_uid=info.pod_uid or "",
            node_name=self.node_name,
        )

    # -- apply --

    def apply(self, req: ApplyRequest) -> ApplyResult:
        """Change the limits of one container; all or nothing. See the module docstring."""
        started = time.perf_counter()
        try:
            req.validate()
            self._refuse_while_unrecovered(req.target)
            needs_runtime_view = req.method is not Method.CGROUP and (
                req.changes.cpu_millicpu is not None or req.changes.memory_bytes is not None)
            known = self._resolve_known(req.target, needs_runtime_view)
            try:
                if known is None:
                    raise _Stale("not under experiment")
                info, pending = known
                with self._locked(self._resolved(info).key):
                    result = self._apply_locked(req, info, self._resolved(info), pending=pending)
            except _Stale:
                # Nothing was changed yet: look the container up through the runtime.
                info = self._resolve(req.target)
                target = self._resolved(info)
                with self._locked(target.key):
                    result = self._apply_locked(req, info, target)
        except EngineError as e:
            self.metrics.failures.labels("apply", type(e).__name__).inc()
            raise
        if not req.dry_run:
            methods = {r.method.value for r in result.resources if r.resource in CPU_MEM}
            self.metrics.apply_latency.labels(methods.pop() if len(methods) == 1 else "netlink" if not methods else "mixed").observe(
                time.perf_counter() - started
            )
        return result

    def _apply_locked(self, req: ApplyRequest, info: Any, target: ResolvedTarget, *, pending: Any = None) -> ApplyResult:
        """``pending``: the runtime's fresh view of a known container, still on its way (see _resolve_known)."""
        existing = self._records.get(target.key)
        changes = req.changes.as_map()
        cg = self.cgroups.locate(pid=info.pid, cgroups_path=info.cgroups_path)
        # Usage matters only to a memory limit (below-usage refusal); its files are 8 more reads.
        before, cg_state = self.cgroups.read_for_plan(cg, memory_usage=Resource.MEMORY in changes)
        if pending is not None:
            info = self._await_fresh(pending)  # raises _Stale before anything is changed
        new_snapshot = existing is None
        if existing is not None and existing["target"]["container_id"] != target.container_id:
            # The container was re-created since the experiment started: its own values are the originals
            # again. Adopted on a copy: the live record changes only when this request succeeds.
            existing = _deep_copy(existing)
            self._adopt_new_container(existing, info, cg)
            new_snapshot = True

        if existing is None:
            record = self._new_record(req, info, target, cg, before, changes)
        else:
            record = self._merged_record(existing, req, info, target, changes)
        net_before = self._read_rates(record) if any(r in changes for r in BANDWIDTH) else {}
        previous = self._current_values(before, net_before, record)

        # Pure checks first, so a refused request changes nothing.
        cpu_quota = self._cpu_quota(record, before)
        mem = record["desired"].get(Resource.MEMORY.value)
        self._check_cpu_quota(cpu_quota, before, changes)
        plan = self.cgroups.check(cg, cpu_quota_us=cpu_quota if Resource.CPU in changes else None,
                                  memory_limit_bytes=mem if Resource.MEMORY in changes else None, force=req.force,
                                  state=cg_state)
        if any(r in changes for r in BANDWIDTH):
            self._check_bandwidth_owner(record)

        if req.dry_run:
            return self._result(record, set(changes), previous_values=previous, in_force=None, dry_run=True)

        saving = early = None
        if new_snapshot or (record.get("net") and not existing.get("net")):
            # A new snapshot of originals: on disk before anything changes.
            record["phase"] = "applying"
            if req.method is not Method.CGROUP and new_snapshot:
                # Which resources may reach the runtime: a crash after the call went out leaves the
                # runtime holding the new values (and it may still write them after we are gone),
                # so recovery puts the runtime's view back too, after any update still in flight.
                record["cri_intent"] = sorted(r.value for r in changes if r in CPU_MEM)
            self.store.save(target.key, record, durable=True)
        else:
            # A further change on the same container needs no intent record: it is written while
            # the change is made. A crash meanwhile leaves either the old or the new active record,
            # and drift enforces its values after the restart: the change is then wholly undone or
            # wholly made. A failure rolls back and rewrites the old record after this write.
            early = _as_made(record, changes, req.method)
            saving = self._io.submit(self.store.save, target.key, early, durable=False)
        try:
            self._enforce(record, info, cg, changes=set(changes), method=req.method, force=req.force, before=before,
                          plan=plan)
            record.pop("cri_intent", None)  # what reached the runtime is now in cri_used and methods
            record["phase"] = "active"
            if early is None or any(early.get(k) != record.get(k) for k in ("methods", "cri_used", "net")):
                # (Also when the runtime refused and cgroup writes did it.) Written while the kernel
                # is read back; a read-back that disagrees rolls back and rewrites (or deletes) it.
                if saving is not None:
                    concurrent.futures.wait([saving])
                saving = self._io.submit(self.store.save, target.key, _deep_copy(record), durable=False)
            in_force = self._verify(record, cg, set(changes))
            saving.result()
        except Exception as e:
            if saving is not None:
                concurrent.futures.wait([saving])  # the rollback's own write must land after it
            self._roll_back(existing, record, info, cg, e)
            undone = "what this request had changed was rolled back"
            if isinstance(e, EngineError):
                raise type(e)(f"{e}; {undone}") from e
            raise ApplyFailed(f"applying to {target.describe()} failed: {e}; {undone}") from e
        with self._guard:
            self._records[target.key] = record
            self._known[info.id] = info
            self.metrics.active.set(len(self._records))
        if record.get("expires_at") is not None:
            self._wake.set()  # the background loop sleeps until the earliest expiry
        for r in changes:
            self.metrics.applies.labels(r.value, record["methods"][r.value]).inc()
            log.info(
                "applied %s on %s: %s -> %s (read back) via %s%s",
                r.value, target.describe(), _fmt(r, previous[r]), _fmt(r, in_force[r]), record["methods"][r.value],
                f", expires at {_iso(record['expires_at'])}" if record.get("expires_at") else "",
            )
        return self._result(record, set(changes), previous_values=previous, in_force=in_force, dry_run=False)

    def _new_record(self, req: ApplyRequest, info: Any, target: ResolvedTarget, cg: Any, before: Readings,
                    changes: dict[Resource, int]) -> dict[str, Any]:
        now = self.clock()
        net = None
        original_rates: dict[str, int] = {}
        if any(r in changes for r in BANDWIDTH):
            host = self.net.find_host_veth(info.pid)
            net = {"host_ifname": host, "ifb_key": info.sandbox_id, "snapshot": None,
                   "ingress_hook_before": self.net.has_ingress_hook(host)}
            rates = self.net.read_rates(host, info.sandbox_id)
            original_rates = {Resource.INGRESS.value: rates[0], Resource.EGRESS.value: rates[1]}
        original = {
            Resource.CPU.value: millicpu_of(before.cpu_quota_us, before.cpu_period_us),
            Resource.MEMORY.value: before.memory_limit_bytes,
            **original_rates,
        }
        return {
            "experiment_id": uuid.uuid4().hex[:12],
            "phase": "new",
            "target": target.to_dict(),
            "sandbox_id": info.sandbox_id,
            "started_at": now,
            "expires_at": now + req.duration_s if req.duration_s else None,
            "original": original,
            "desired": {r.value: v for r, v in changes.items()},
            "methods": {},
            "cri_original": info.resources.to_dict() if info.resources is not None else None,
            "cri_used": False,
            "cgroup_snapshot": self.cgroups.snapshot(cg),
            "net": net,
            "drift_corrections": 0,
            # Resolved without naming the container: the pod had just this one.
            "only_container": req.target.container is None,
        }

    def _merged_record(self, existing: dict[str, Any], req: ApplyRequest, info: Any, target: ResolvedTarget,
                       changes: dict[Resource, int]) -> dict[str, Any]:
        """A second change on the same container keeps the first snapshot, so a reset returns to the true original."""
        record = _deep_copy(existing)
        record["desired"].update({r.value: v for r, v in changes.items()})
        if req.duration_s:
            record["expires_at"] = self.clock() + req.duration_s
        if any(r in changes for r in BANDWIDTH) and record.get("net") is None:
            host = self.net.find_host_veth(info.pid)
            record["net"] = {"host_ifname": host, "ifb_key": info.sandbox_id, "snapshot": None,
                             "ingress_hook_before": self.net.has_ingress_hook(host)}
            rates = self.net.read_rates(host, info.sandbox_id)
            record["original"][Resource.INGRESS.value] = rates[0]
            record["original"][Resource.EGRESS.value] = rates[1]
        return record

    def _adopt_new_container(self, record: dict[str, Any], info: Any, cg: Any) -> None:
        record["target"]["container_id"] = info.id
        record["cgroup_snapshot"] = self.cgroups.refresh_container_snapshot(record["cgroup_snapshot"], cg)
        record["cri_original"] = info.resources.to_dict() if info.resources is not None else None
        record["cri_used"] = False

    def _cpu_quota(self, record: dict[str, Any], before: Readings) -> int | None:
        millicpu = record["desired"].get(Resource.CPU.value)
        return None if millicpu is None else quota_for(millicpu, before.cpu_period_us)

    def _check_cpu_quota(self, quota_us: int | None, before: Readings, changes: dict[Resource, int]) -> None:
        if quota_us is None or Resource.CPU not in changes:
            return
        if quota_us < 1000:
            m = changes[Resource.CPU]
            raise InvalidRequest(
                f"cpu {m}m gives a CFS quota of {quota_us}us at the container's period of {before.cpu_period_us}us;"
                f" the kernel accepts >= 1000us (>= {-(-1000 * 1000 // before.cpu_period_us)}m at this period)"
            )

    def _check_bandwidth_owner(self, record: dict[str, Any]) -> None:
        own_key = ResolvedTarget.from_dict(record["target"]).key
        with self._guard:
            for key, other in self._records.items():
                if key != own_key and other.get("net") and other.get("sandbox_id") == record["sandbox_id"]:
                    raise Conflict(
                        f"the bandwidth of pod {record['target']['namespace']}/{record['target']['pod']} is already"
                        f" shaped by the experiment on container {other['target']['container']}; change it there"
                    )

    # -- doing it --

    def _enforce(self, record: dict[str, Any], info: Any, cg: Any, *, changes: set[Resource], method: Method,
                 force: bool, before: Readings | None = None, plan: Any = None) -> None:
        """Put the record's desired values in force for ``changes``; raises on the first failure.

        ``before`` and ``plan`` are the readings and cgroup plan the caller already made under the
        same lock (the apply path); without them they are made here.
        """
        desired = record["desired"]
        before = before if before is not None else self.cgroups.read(cg)
        cpu_quota = quota_for(desired[Resource.CPU.value], before.cpu_period_us) if Resource.CPU in changes else None
        mem = desired[Resource.MEMORY.value] if Resource.MEMORY in changes else None
        if cpu_quota is not None or mem is not None:
            used = self._set_cpu_memory(record, info, cg, cpu_quota, mem, method, force, plan)
            for r, v in ((Resource.CPU, cpu_quota), (Resource.MEMORY, mem)):
                if v is not None:
                    record["methods"][r.value] = used.value
        if changes & set(BANDWIDTH):
            net = record["net"]
            ingress = desired.get(Resource.INGRESS.value)
            egress = desired.get(Resource.EGRESS.value)
            # The first shaping's snapshot saw the veth as it was; later calls extend it, never replace it.
            net["snapshot"] = self.net.shape(net["host_ifname"], net["ifb_key"], ingress_bps=ingress,
                                             egress_bps=egress, snapshot=net.get("snapshot"))
            for r in BANDWIDTH:
                if desired.get(r.value) is not None:
                    record["methods"][r.value] = Method.NETLINK.value

    def _set_cpu_memory(self, record: dict[str, Any], info: Any, cg: Any, cpu_quota: int | None, mem: int | None,
                        method: Method, force: bool, plan: Any = None) -> Method:
        from cri_api import errors as cri_errors

        if method in (Method.AUTO, Method.CRI):
            def runtime_call() -> None:
                # ``info`` was read just now: merge into it rather than ask the runtime again. memsw
                # follows the memory limit in the merge (containerd keeps them equal: no swap).
                merged = merge_resources(info.resources, cpu_quota_us=cpu_quota, memory_limit_bytes=mem)
                self.cri.update_container_resources(info.id, merged)

            try:
                self.cgroups.set_through(cg, cpu_quota_us=cpu_quota, memory_limit_bytes=mem, force=force,
                                         runtime_call=runtime_call, plan=plan)
                record["cri_used"] = True
                return Method.CRI
            except cri_errors.CRIError as e:
                if method is Method.CRI:
                    raise Refused(f"the runtime refused UpdateContainerResources for {info.id[:12]}: {e}") from e
                log.warning("runtime refused UpdateContainerResources for %s (%s); falling back to cgroup writes",
                            info.id[:12], e)
        self.cgroups.set_container(cg, cpu_quota_us=cpu_quota, memory_limit_bytes=mem, force=force, plan=plan)
        return Method.CGROUP

    def _verify(self, record: dict[str, Any], cg: Any, changes: set[Resource]) -> dict[Resource, int]:
        """Read the kernel back; raise if what is in force is not what was asked."""
        after = self.cgroups.read(cg)
        in_force = self._current_values(after, self._read_rates(record) if changes & set(BANDWIDTH) else {}, record)
        for r in changes:
            want = record["desired"][r.value]
            if not same_quantity(r, want, in_force[r]):
                raise ApplyFailed(
                    f"{r.value} reads back as {_fmt(r, in_force[r])} after setting {_fmt(r, want)}"
                )
        return in_force

    def _read_rates(self, record: dict[str, Any]) -> dict[Resource, int]:
        net = record.get("net")
        if not net:
            return {}
        ingress, egress = self.net.read_rates(net["host_ifname"], net["ifb_key"])
        return {Resource.INGRESS: ingress, Resource.EGRESS: egress}

    def _current_values(self, readings: Readings, rates: dict[Resource, int], record: dict[str, Any]) -> dict[Resource, int]:
        values = {
            Resource.CPU: millicpu_of(readings.cpu_quota_us, readings.cpu_period_us),
            Resource.MEMORY: readings.memory_limit_bytes,
        }
        for r in BANDWIDTH:
            values[r] = rates.get(r, record["original"].get(r.value, UNLIMITED))
        return values

    def _roll_back(self, existing: dict[str, Any] | None, record: dict[str, Any], info: Any, cg: Any, cause: BaseException) -> None:
        """Undo a failed apply: back to the originals (first change) or to the experiment as it was."""
        key = ResolvedTarget.from_dict(record["target"]).key
        record.pop("cri_intent", None)  # here cri_used and methods say exactly what reached the runtime
        log.warning("apply on %s failed (%s); rolling back", key, cause)
        try:
            if existing is None:
                self._restore(record, info, cg)
                self.store.delete(key)
                return
            kept = {Resource(r) for r in existing["desired"]}
            added = {Resource(r) for r in record["desired"]} - kept
            # Resources this request added go back to their originals, exactly.
            self._restore_resources(record, info, cg, added & set(CPU_MEM))
            if kept & set(CPU_MEM):
                self._enforce(existing, info, cg, changes=kept & set(CPU_MEM), method=_cpu_mem_method(existing), force=True)
            if record.get("net"):
                # Our shaping off entirely (the veth as first saved), then the experiment's rates again.
                self._unshape(record)
                if existing.get("net"):
                    existing["net"]["snapshot"] = None
                    self._enforce(existing, info, cg, changes=kept & set(BANDWIDTH), method=Method.AUTO, force=True)
            self.store.save(key, existing, durable=True)
        except Exception as e:  # the original error is what the caller needs; this one goes to the log
            log.error("rollback on %s incomplete: %s", key, e)

    def _restore_resources(self, record: dict[str, Any], info: Any, cg: Any, resources: set[Resource]) -> None:
        """Put the originals of some of CPU and memory back: their saved files, then the runtime's view."""
        if not resources:
            return
        prefixes = tuple(f"{r.value}." for r in resources)  # cpu.cfs_* / memory.* files
        snap = record["cgroup_snapshot"]
        subset = {**snap, "files": {p: v for p, v in snap["files"].items()
                                    if p.rsplit("/", 1)[-1].startswith(prefixes)}}
        self.cgroups.restore(subset)
        orig = record.get("cri_original") or {}
        fields: dict[str, int] = {}
        if Resource.CPU in resources and record["methods"].get("cpu") == Method.CRI.value:
            fields["cpu_quota_us"] = orig.get("cpu_quota_us") or UNLIMITED
        if Resource.MEMORY in resources and record["methods"].get("memory") == Method.CRI.value:
            fields["memory_limit_bytes"] = orig.get("memory_limit_bytes") or UNLIMITED
            fields["memory_swap_limit_bytes"] = orig.get("memory_swap_limit_bytes") or fields["memory_limit_bytes"]
        if fields and info is not None:
            self.cri.update_resources(info.id, **fields)

    def _restore(self, record: dict[str, Any], info: Any | None, cg: Any | None) -> None:
        """Put the originals back: the exact cgroup files first (cgroupctl orders pod and container
        writes so the kernel accepts them), then the runtime's view, so containerd's store matches
        and a later ``runc update`` re-applies the originals rather than the experiment."""
        errors: list[str] = []
        if record.get("cgroup_snapshot") is not None:
            try:
                self.cgroups.restore(record["cgroup_snapshot"], container_alive=info is not None)
            except Exception as e:
                errors.append(f"cgroup restore: {e}")
        intent = set(record.get("cri_intent") or ())
        if info is not None and (record.get("cri_used") or intent) and record.get("cri_original"):
            orig = record["cri_original"]
            via_cri = {name for name, m in record["methods"].items() if m == Method.CRI.value} | intent
            fields = {}
            if Resource.CPU.value in via_cri:
                fields["cpu_quota_us"] = orig.get("cpu_quota_us") or UNLIMITED
            if Resource.MEMORY.value in via_cri:
                fields["memory_limit_bytes"] = orig.get("memory_limit_bytes") or UNLIMITED
                fields["memory_swap_limit_bytes"] = orig.get("memory_swap_limit_bytes") or fields["memory_limit_bytes"]
            try:
                if fields:
                    self.cri.update_resources(info.id, **fields)
            except Exception as e:
                errors.append(f"runtime restore: {e}")
        if record.get("net"):
            try:
                self._unshape(record)
            except Exception as e:
                errors.append(f"bandwidth restore: {e}")
        if errors:
            raise ApplyFailed("; ".join(errors))

    def _unshape(self, record: dict[str, Any]) -> None:
        net = record["net"]
        # No snapshot: the crash came before the first shaping returned one; an ingress qdisc
        # the veth did not have when the record was written can only be that shaping's.
        self.net.unshape(net["host_ifname"], net["ifb_key"], net.get("snapshot"),
                         ingress_hook_ours=net.get("ingress_hook_before") is False)

    # -- revert --

    def revert(self, req: RevertRequest) -> RevertResult:
        """Restore the originals of one container; ``was_active`` is false when nothing was under experiment."""
        try:
            req.validate()
            self._refuse_while_unrecovered(req.target)
            key = self._find_record_key(req.target)
            if key is None:
                info = self._resolve(req.target)
                return RevertResult(target=self._resolved(info), resources=(), was_active=False, dry_run=req.dry_run)
            with self._locked(key):
                record = self._records.get(key)
                if record is None:  # reverted meanwhile
                    return RevertResult(target=ResolvedTarget.from_dict({"namespace": req.target.namespace,
                                                                        "pod": req.target.pod,
                                                                        "container": req.target.container or ""}),
                                        resources=(), was_active=False, dry_run=req.dry_run)
                return self._revert_locked(key, record, reason="requested", dry_run=req.dry_run)
        except EngineError as e:
            self.metrics.failures.labels("revert", type(e).__name__).inc()
            raise

    def _refuse_while_unrecovered(self, target: Target) -> None:
        """A record that recovery has not finished holds the true originals: a revert now would find
        nothing to revert (and report success), and an apply would snapshot the experiment's values as
        the originals. Both wait, as a runtime outage, until the background loop has recovered it."""
        prefix = f"{target.namespace}/{target.pod}/"
        with self._guard:
            keys = [k for k in self._unrecovered
                    if (k == prefix + target.container if target.container else k.startswith(prefix))]
            if keys:
                key = keys[0]
                raise RuntimeUnavailable(
                    f"the experiment on {key} is not recovered yet after the agent's restart "
                    f"({self._recovery_errors.get(key, 'retrying')}); nothing was changed, try again shortly")

    def _find_record_key(self, target: Target) -> str | None:
        with self._guard:
            if target.container:
                key = f"{target.namespace}/{target.pod}/{target.container}"
                return key if key in self._records else None
            keys = [k for k, r in self._records.items()
                    if r["target"]["namespace"] == target.namespace and r["target"]["pod"] == target.pod]
        if len(keys) > 1:
            names = ", ".join(sorted(k.rsplit("/", 1)[1] for k in keys))
            raise InvalidRequest(f"pod {target.namespace}/{target.pod} has experiments on several containers ({names}); name one")
        return keys[0] if keys else None

    def _revert_locked(self, key: str, record: dict[str, Any], *, reason: str, dry_run: bool = False) -> RevertResult:
        target = ResolvedTarget.from_dict(record["target"])
        info, cg = self._locate_current(record)
        before = self.cgroups.read(cg) if cg is not None else None
        previous = self._current_values(before, self._safe_rates(record), record) if before else {}
        if dry_run:
            return RevertResult(target=target, resources=self._revert_results(record, previous, None), was_active=True,
                                dry_run=True)
        record["phase"] = "reverting"
        self.store.save(key, record, durable=False)
        self._restore(record, info, cg)
        after = self.cgroups.read(cg) if cg is not None else None
        in_force = self._current_values(after, self._safe_rates(record), record) if after else None
        self.store.delete(key)
        with self._guard:
            self._records.pop(key, None)
            self._known.pop(record["target"]["container_id"], None)
            self.metrics.active.set(len(self._records))
        self.metrics.reverts.labels(reason).inc()
        for r in (Resource(k) for k in record["desired"]):
            log.info("reverted %s on %s (%s): %s -> %s (read back)", r.value, target.describe(), reason,
                     _fmt(r, previous.get(r, UNLIMITED)) if previous else "?",
                     _fmt(r, in_force[r]) if in_force else "container gone")
        return RevertResult(target=target, resources=self._revert_results(record, previous, in_force),
                            was_active=True)

    def _safe_rates(self, record: dict[str, Any]) -> dict[Resource, int]:
        try:
            return self._read_rates(record)
        except Exception:
            return {}

    def _revert_results(self, record: dict[str, Any], previous: dict[Resource, int],
                        in_force: dict[Resource, int] | None) -> tuple[ResourceResult, ...]:
        out = []
        for name in record["desired"]:
            r = Resource(name)
            orig = record["original"].get(name, UNLIMITED)
            out.append(ResourceResult(
                resource=r, original=orig, previous=previous.get(r, UNLIMITED), requested=orig,
                in_force=(in_force or {}).get(r, orig),
                method=Method(record["methods"].get(name, Method.AUTO.value)),
            ))
        return tuple(out)

    def _locate_current(self, record: dict[str, Any]) -> tuple[Any | None, Any | None]:
        """The container of ``record`` as it runs now, and its cgroups; (None, None) when it is gone."""
        from cri_api import errors as cri_errors

        t = record["target"]
        try:
            info = self.cri.find_container(t["namespace"], t["pod"], t["container"])
        except (cri_errors.NotFound, cri_errors.NotRunning):
            return None, None
        if info.id != t["container_id"]:
            self._adopt_new_container(record, info, self.cgroups.locate(pid=info.pid, cgroups_path=info.cgroups_path))
        return info, self.cgroups.locate(pid=info.pid, cgroups_path=info.cgroups_path)

    # -- list --

    def list(self, namespace: str | None = None) -> list[ExperimentInfo]:
        with self._guard:
            records = [_deep_copy(r) for r in self._records.values()]
        out = []
        for rec in records:
            t = ResolvedTarget.from_dict(rec["target"])
            if namespace and t.namespace != namespace:
                continue
            now = self._in_force_now(rec)
            resources = tuple(
                ResourceResult(resource=Resource(n), original=rec["original"].get(n, UNLIMITED),
                               previous=rec["original"].get(n, UNLIMITED), requested=v,
                               in_force=now.get(Resource(n), v),
                               method=Method(rec["methods"].get(n, Method.AUTO.value)))
                for n, v in rec["desired"].items()
            )
            out.append(ExperimentInfo(experiment_id=rec["experiment_id"], target=t, resources=resources,
                                      started_at=rec["started_at"], expires_at=rec.get("expires_at"),
                                      drift_corrections=rec.get("drift_corrections", 0)))
        return sorted(out, key=lambda e: e.target.key)

    def _in_force_now(self, rec: dict[str, Any]) -> dict[Resource, int]:
        """What the kernel holds now for an experiment (no runtime call); empty where it cannot be read."""
        out: dict[Resource, int] = {}
        try:
            cg = self.cgroups.from_snapshot(rec["cgroup_snapshot"])
            readings = self.cgroups.read(cg)
            out[Resource.CPU] = millicpu_of(readings.cpu_quota_us, readings.cpu_period_us)
            out[Resource.MEMORY] = readings.memory_limit_bytes
        except Exception:
            pass
        out.update(self._safe_rates(rec))
        return out

    def _result(self, record: dict[str, Any], changed: set[Resource], *, previous_values: dict[Resource, int],
                in_force: dict[Resource, int] | None, dry_run: bool) -> ApplyResult:
        """The resources this request changed (others of the experiment stay as they were)."""
        resources = []
        for name, want in record["desired"].items():
            r = Resource(name)
            if r not in changed:
                continue
            resources.append(ResourceResult(
                resource=r,
                original=record["original"].get(name, UNLIMITED),
                previous=previous_values.get(r, UNLIMITED),
                requested=want,
                in_force=in_force[r] if in_force is not None else want,
                method=Method(record["methods"].get(name, Method.NETLINK.value if r in BANDWIDTH else Method.AUTO.value)),
            ))
        return ApplyResult(
            experiment_id=record["experiment_id"],
            target=ResolvedTarget.from_dict(record["target"]),
            resources=tuple(resources),
            expires_at=record.get("expires_at"),
            dry_run=dry_run,
        )

    # -- recovery, expiry, drift --

    def recover(self) -> None:
        """Finish what the state directory says was under way when the agent last stopped."""
        for record in self.store.load_all():
            self._recover_one(record)
        with self._guard:
            self.metrics.active.set(len(self._records))
            keys = {r["net"]["ifb_key"] for r in [*self._records.values(), *self._unrecovered.values()] if r.get("net")}
        if self.sweep_orphan_ifbs:
            # IFBs of pods that went away while no record knew of them (state lost with a node disk, say).
            try:
                for name in self.net.sweep_orphans(keys):
                    log.warning("removed orphaned IFB device %s (no experiment owns it, nothing redirects to it)", name)
            except Exception as e:
                log.error("sweeping orphaned IFB devices failed: %s", e)
        self.check_drift()

    def _recover_one(self, record: dict[str, Any]) -> None:
        key = record["key"]
        phase = record.get("phase")
        try:
            with self._locked(key):
                if phase in ("new", "applying"):
                    log.warning("recovering %s: half-made change; restoring the originals", key)
                    info, cg = self._locate_current(record)
                    self._restore(record, info, cg)
                    self.store.delete(key)
                elif phase == "reverting":
                    log.warning("recovering %s: interrupted revert; finishing it", key)
                    self._revert_locked(key, record, reason="recovered")
                elif record.get("expires_at") is not None and record["expires_at"] <= self.clock():
                    log.info("recovering %s: expired while the agent was down; reverting", key)
                    self._revert_locked(key, record, reason="expired")
                else:
                    log.info("recovering %s: still running; re-armed", key)
                    with self._guard:
                        self._records[key] = record
            with self._guard:
                self._unrecovered.pop(key, None)
                self._recovery_errors.pop(key, None)
        except Exception as e:
            # Typically the runtime not answering yet: the background loop tries again.
            log.error("recovering %s failed: %s; will retry", key, e)
            self.metrics.failures.labels("recover", type(e).__name__).inc()
            with self._guard:
                self._unrecovered[key] = record
                self._recovery_errors[key] = str(e)

    def retry_recovery(self) -> None:
        with self._guard:
            pending = list(self._unrecovered.values())
        for record in pending:
            self._recover_one(record)

    def expire_due(self) -> None:
        now = self.clock()
        with self._guard:
            due = [k for k, r in self._records.items() if r.get("expires_at") is not None and r["expires_at"] <= now]
        for key in due:
            with self._locked(key):
                record = self._records.get(key)
                if record is None or record.get("expires_at") is None or record["expires_at"] > self.clock():
                    continue
                try:
                    self._revert_locked(key, record, reason="expired")
                except Exception as e:
                    log.error("reverting expired %s failed: %s; will retry", key, e)
                    self.metrics.failures.labels("expire", type(e).__name__).inc()

    def check_drift(self) -> None:
        """Re-apply experiments whose limits something reset; end those whose pod is gone."""
        from cri_api import errors as cri_errors

        with self._guard:
            keys = list(self._records)
        for key in keys:
            with self._locked(key, blocking=False) as got:
                if not got:
                    continue  # a request is working on it right now
                record = self._records.get(key)
                if record is None:
                    continue
                t = record["target"]
                info = self._known.get(t["container_id"])
                if info is None or not self._alive(info):
                    # Gone, restarted or not seen since the agent started: ask the runtime.
                    try:
                        info = self.cri.find_container(t["namespace"], t["pod"], t["container"])
                    except cri_errors.NotFound:
                        self._end_gone(key, record)
                        continue
                    except (cri_errors.NotRunning, cri_errors.CRIError):
                        continue  # restarting, or the runtime is busy: look again next round
                try:
                    self._correct(key, record, info)
                except Exception as e:
                    log.error("drift check on %s failed: %s", key, e)
                    self.metrics.failures.labels("drift", type(e).__name__).inc()

    def _correct(self, key: str, record: dict[str, Any], info: Any) -> None:
        cause = None
        old_id = record["target"]["container_id"]
        if info.id != old_id:
            cause = "container-restarted"
            cg = self.cgroups.locate(pid=info.pid, cgroups_path=info.cgroups_path)
            self._adopt_new_container(record, info, cg)
            if record.get("net"):
                record["net"]["host_ifname"] = self.net.find_host_veth(info.pid)
            stale = {Resource(n) for n in record["desired"]}
        else:
            cg = self.cgroups.locate(pid=info.pid, cgroups_path=info.cgroups_path)
            now = self._current_values(self.cgroups.read(cg), self._safe_rates(record), record)
            stale = {Resource(n) for n, v in record["desired"].items() if not same_quantity(Resource(n), v, now[Resource(n)])}
            if stale:
                cause = "limit-reset"
        with self._guard:
            if old_id != info.id:
                self._known.pop(old_id, None)
            self._known[info.id] = info
        if not stale:
            return
        log.warning("drift on %s (%s): %s no longer in force; applying again", key, cause,
                    ", ".join(sorted(r.value for r in stale)))
        method = _cpu_mem_method(record)
        if method is not Method.CGROUP and stale & set(CPU_MEM):
            info = self.cri.container_info(info.id)  # the merge needs the runtime's current view
        self._enforce(record, info, cg, changes=stale, method=method, force=True)
        self._verify(record, cg, stale)
        record["drift_corrections"] = record.get("drift_corrections", 0) + 1
        self.store.save(key, record, durable=False)
        self.metrics.drift_corrections.labels(cause).inc()

    def _end_gone(self, key: str, record: dict[str, Any]) -> None:
        log.info("pod of %s is gone; ending its experiment", key)
        if record.get("net"):
            try:
                self._unshape(record)  # removes the IFB device; the veth went with the pod
            except Exception as e:
                log.error("removing the shaping of gone %s failed: %s", key, e)
                return
        self.store.delete(key)
        with self._guard:
            self._records.pop(key, None)
            self._known.pop(record["target"]["container_id"], None)
            self.metrics.active.set(len(self._records))
        self.metrics.reverts.labels("pod-deleted").inc()

    def _loop(self) -> None:
        next_drift = time.monotonic() + self.drift_interval_s
        while not self._stop.is_set():
            now = self.clock()
            with self._guard:
                expiries = [r["expires_at"] for r in self._records.values() if r.get("expires_at") is not None]
            wait = max(0.0, next_drift - time.monotonic())
            if expiries:
                wait = min(wait, max(0.0, min(expiries) - now))
            self._wake.wait(timeout=wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.expire_due()
                if time.monotonic() >= next_drift:
                    self.retry_recovery()
                    self.check_drift()
                    next_drift = time.monotonic() + self.drift_interval_s
            except Exception as e:  # the loop must outlive any one bad record
                log.error("background check failed: %s", e)


def _as_made(record: dict[str, Any], changes: dict[Resource, int], method: Method) -> dict[str, Any]:
    """The record as it will be once ``changes`` are made by ``method`` (the runtime for auto)."""
    out = _deep_copy(record)
    out["phase"] = "active"
    out.pop("cri_intent", None)
    for r in changes:
        out["methods"][r.value] = (Method.NETLINK if r in BANDWIDTH else Method.CGROUP if method is Method.CGROUP
                                   else Method.CRI).value
    if method is not Method.CGROUP and any(r in CPU_MEM for r in changes):
        out["cri_used"] = True
    return out


class _KeyLock:
    """A container's lock and how many requests hold or wait for it (the lock is dropped at zero)."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0

    def acquire(self, blocking: bool) -> bool:
        return self.lock.acquire(blocking)

    def release(self) -> None:
        self.lock.release()


class _Stale(Exception):
    """The container found without the runtime no longer runs: resolve it through the runtime."""


def _cpu_mem_method(record: dict[str, Any]) -> Method:
    """How the record's CPU and memory were last changed (cri or cgroup); auto when neither was."""
    methods = record["methods"]
    return Method(methods.get("cpu") or methods.get("memory") or Method.AUTO.value)


def _deep_copy(record: dict[str, Any]) -> dict[str, Any]:
    """A copy of a record whose parts the engine changes may be changed freely (snapshots are replaced, never edited)."""
    out = dict(record)
    for part in ("target", "original", "desired", "methods"):
        out[part] = dict(record[part])
    if record.get("net"):
        out["net"] = dict(record["net"])
    return out


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _fmt(resource: Resource, value: int) -> str:
    if value == UNLIMITED:
        return "unlimited"
    if resource is Resource.CPU:
        return f"{value}m"
    if resource is Resource.MEMORY:
        return f"{value / 2**20:.1f}Mi" if value % 2**20 else f"{value // 2**20}Mi"
    return f"{value / 1e6:g}Mbit/s"
