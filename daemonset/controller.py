"""The agent's Kubernetes front door: a node-local controller for ResourceChaos objects.

It watches ResourceChaos objects in every namespace and the pods of its own node (field selector
``spec.nodeName``), and drives the same :class:`daemonset.engine.Engine` the gRPC server uses:

- an object whose target pods run here: add this node's finalizer, ``Engine.apply``, write one
  ``status.targets`` entry per pod (originals, values read back, expiry), emit an Event on the pod;
- a changed spec (a second ``kubectl chaos`` on the same container): apply the new values on top;
  without ``durationSeconds`` the end time already in force stays; every command carries a new
  ``requestId``, so an identical spec sent again is answered afresh (a Failed target is retried);
- expiry, deletion, a pod that no longer matches: ``Engine.revert``, status ``Reverted`` with the
  restored values, an Event, and the finalizer dropped so the API server can remove the object;
- restart: the engine recovers its own state; the controller re-lists, reverts what it applied for
  objects that are gone (it remembers which in ``STATE_DIR/cluster/owners.json``) and re-applies
  what the API still asks for but the node no longer has.

It talks to the API with in-cluster credentials (or a kubeconfig); without an API the agent runs
in node-local mode alone. The ``kubernetes`` package is imported only here.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import random
import threading
import time
import uuid
from typing import Any

from daemonset import crd
from daemonset.types import (
    UNLIMITED,
    ApplyRequest,
    Changes,
    EngineError,
    Method,
    RevertRequest,
    RuntimeUnavailable,
    Target,
    TargetNotFound,
)

log = logging.getLogger("chaos-agent.controller")

RESOURCE_NAMES = {"cpu": "cpu", "memory": "memory", "ingress": "bandwidth-ingress", "egress": "bandwidth-egress"}
WATCH_TIMEOUT_S = 240
RESYNC_S = 60.0
RETRY_S = 2.0  # after a transient failure (the runtime not answering)


class ControllerError(Exception):
    """The controller cannot start: no API credentials, or the API refuses the first list."""


def api_client(kubeconfig: str | None = None, context: str | None = None) -> Any | None:
    """An ApiClient from ``kubeconfig``, else in-cluster credentials, else None (node-local mode)."""
    from kubernetes import client, config

    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    return None


def add_arguments(parser: Any) -> None:
    """The agent's flags for cluster mode (argparse)."""
    parser.add_argument("--kubernetes", choices=("auto", "on", "off"), default="auto",
                        help="watch ResourceChaos objects: auto = when in a pod or given --kubeconfig")
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig for cluster mode (default: in-cluster)")


def start_from_args(engine: Any, args: Any) -> Controller | None:
    """Start the controller as the agent's flags ask; None when cluster mode is off or unavailable."""
    mode = getattr(args, "kubernetes", "auto")
    if mode == "off":
        return None
    client = api_client(getattr(args, "kubeconfig", None))
    if client is None:
        if mode == "on":
            raise ControllerError("--kubernetes=on but no API credentials: not in a pod and no --kubeconfig")
        log.info("no Kubernetes API credentials: node-local mode only")
        return None
    node = args.node_name or engine.node_name
    if not node:
        raise ControllerError("cluster mode needs the node name: set --node-name or $NODE_NAME")
    controller = Controller(engine, client, node, state_dir=args.state_dir)
    controller.start()
    return controller


class _Owners:
    """Which container this node changed for which ResourceChaos; survives agent restarts."""

    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, "cluster", "owners.json")
        self._lock = threading.Lock()
        try:
            with open(self.path) as f:
                self.entries: dict[str, dict] = json.load(f)
        except FileNotFoundError:
            self.entries = {}
        except (OSError, ValueError) as e:
            log.error("%s unreadable (%s); starting without it", self.path, e)
            self.entries = {}

    def set(self, container_key: str, entry: dict | None) -> None:
        with self._lock:
            if entry is None:
                if self.entries.pop(container_key, None) is None:
                    return
            else:
                self.entries[container_key] = entry
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{uuid.uuid4().hex[:6]}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.entries, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def get(self, container_key: str) -> dict | None:
        with self._lock:
            entry = self.entries.get(container_key)
            return dict(entry) if entry else None

    def of_object(self, namespace: str, name: str) -> dict[str, dict]:
        with self._lock:
            return {k: dict(v) for k, v in self.entries.items()
                    if v["namespace"] == namespace and v["name"] == name}


class Controller:
    """Watches, queues and reconciles; one worker thread does every engine call and API write."""

    def __init__(self, engine: Any, client: Any, node_name: str, *, state_dir: str, resync_s: float = RESYNC_S,
                 watch_timeout_s: int = WATCH_TIMEOUT_S, clock=time.time):
        from kubernetes import client as k8s

        self.engine = engine
        self.node = node_name
        self.finalizer = crd.finalizer_for(node_name)
        self.core = k8s.CoreV1Api(client)
        self.custom = k8s.CustomObjectsApi(client)
        self.client = client
        self.owners = _Owners(state_dir)
        self.resync_s = resync_s
        self.watch_timeout_s = watch_timeout_s
        self.clock = clock
        self._rcs: dict[tuple[str, str], dict] = {}
        self._pods: dict[tuple[str, str], dict] = {}
        self._cache_lock = threading.Lock()
        self._queue: list[tuple[str, str]] = []
        self._queued: set[tuple[str, str]] = set()
        self._timers: list[tuple[float, tuple[str, str]]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._responses: list[Any] = []
        self._synced = {"rc": threading.Event(), "pods": threading.Event()}
        self._revert_failures: set[str] = set()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """List pods and ResourceChaos (errors raise ControllerError), then watch and reconcile."""
        from kubernetes.client.exceptions import ApiException

        try:
            pods_rv = self._relist_pods()
            rcs_rv = self._relist_rcs()
        except ApiException as e:
            raise ControllerError(f"the Kubernetes API refused the first list: {e.status} {e.reason}") from e
        except Exception as e:
            raise ControllerError(f"the Kubernetes API does not answer: {e}") from e
        # Owned experiments whose object is gone (deleted while the agent was down): revert.
        for entry in list(self.owners.entries.values()):
            self._enqueue((entry["namespace"], entry["name"]))
        for name, target, rv in (("pods", self._watch_pods, pods_rv), ("rc", self._watch_rcs, rcs_rv),
                                 ("worker", self._work, None)):
            args = (rv,) if rv is not None else ()
            t = threading.Thread(target=target, args=args, name=f"controller-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("cluster mode: watching ResourceChaos and the pods of node %s", self.node)

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for resp in list(self._responses):
            try:
                resp.shutdown() if hasattr(resp, "shutdown") else resp.close()
            except Exception:
                pass
        for t in self._threads:
            t.join(timeout=5)

    def idle(self, timeout_s: float = 10.0) -> bool:
        """Wait until the queue is empty (for tests); True if it emptied in time."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    _busy = False

    # -- caches and watches ------------------------------------------------------------------------

    def _list(self, fn, *args, **kwargs) -> dict:
        resp = fn(*args, _preload_content=False, **kwargs)
        _check(resp)
        return json.loads(resp.data)

    def _relist_pods(self) -> str:
        listing = self._list(self.core.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={self.node}")
        with self._cache_lock:
            old = set(self._pods)
            self._pods = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in listing["items"]}
            changed = old | set(self._pods)
        for key in changed:
            self._pod_changed(key)
        self._synced["pods"].set()
        return listing["metadata"]["resourceVersion"]

    def _relist_rcs(self) -> str:
        listing = self._list(self.custom.list_cluster_custom_object, crd.GROUP, crd.VERSION, crd.PLURAL)
        with self._cache_lock:
            old = set(self._rcs)
            self._rcs = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in listing["items"]}
            changed = old | set(self._rcs)
        for key in changed:
            self._enqueue(key)
        self._synced["rc"].set()
        return listing["metadata"]["resourceVersion"]

    def _watch_pods(self, rv: str) -> None:
        self._watch_loop(self.core.list_pod_for_all_namespaces, (), {"field_selector": f"spec.nodeName={self.node}"},
                         rv, self._on_pod_event, self._relist_pods)

    def _watch_rcs(self, rv: str) -> None:
        self._watch_loop(self.custom.list_cluster_custom_object, (crd.GROUP, crd.VERSION, crd.PLURAL), {},
                         rv, self._on_rc_event, self._relist_rcs)

    def _watch_loop(self, fn, args, kwargs, rv: str | None, on_event, relist) -> None:
        """List-then-watch forever: resume from the last resource version, list again on 410 or errors."""
        from kubernetes.client.exceptions import ApiException
        from kubernetes.watch.watch import iter_resp_lines

        backoff_s = 0.2
        while not self._stop.is_set():
            resp = None
            try:
                if rv is None:
                    rv = relist()
                resp = fn(*args, watch=True, resource_version=rv, timeout_seconds=self.watch_timeout_s,
                          allow_watch_bookmarks=True, _preload_content=False, **kwargs)
                _check(resp)
                self._responses.append(resp)
                for line in iter_resp_lines(resp):
                    if self._stop.is_set():
                        return
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        raise ApiException(status=obj.get("code", 500), reason=obj.get("message", "watch error"))
                    rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                        on_event(event["type"], obj)
                backoff_s = 0.2
            except ApiException as e:
                if e.status == 410:
                    log.info("watch expired (410 Gone); listing again")
                else:
                    log.warning("watch failed: %s %s; listing again in %.1fs", e.status, e.reason, backoff_s)
                    self._stop.wait(backoff_s)
                    backoff_s = min(backoff_s * 2, 10.0)
                rv = None
            except Exception as e:
                if self._stop.is_set():
                    return
                log.warning("watch broke: %s; listing again in %.1fs", e, backoff_s)
                self._stop.wait(backoff_s + random.uniform(0, backoff_s / 2))
                backoff_s = min(backoff_s * 2, 10.0)
                rv = None
            finally:
                if resp is not None:
                    if resp in self._responses:
                        self._responses.remove(resp)
                    resp.release_conn()

    def _on_rc_event(self, type_: str, obj: dict) -> None:
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        with self._cache_lock:
            if type_ == "DELETED":
                self._rcs.pop(key, None)
            else:
                self._rcs[key] = obj
        self._enqueue(key)

    def _on_pod_event(self, type_: str, pod: dict) -> None:
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        with self._cache_lock:
            if type_ == "DELETED":
                self._pods.pop(key, None)
            else:
                self._pods[key] = pod
        self._pod_changed(key)

    def _pod_changed(self, pod_key: tuple[str, str]) -> None:
        namespace, name = pod_key
        with self._cache_lock:
            pod = self._pods.get(pod_key)
            rcs = [(k, o) for k, o in self._rcs.items() if k[0] == namespace]
        for key, obj in rcs:
            target = (obj.get("spec") or {}).get("target") or {}
            if target.get("pod") == name or (target.get("selector") is not None and (
                    pod is None or crd.selector_matches(target["selector"], pod["metadata"].get("labels")))):
                self._enqueue(key)
        for entry in list(self.owners.entries.values()):
            if entry["namespace"] == namespace and entry["pod"] == name:
                self._enqueue((entry["namespace"], entry["name"]))

    # -- the work queue ----------------------------------------------------------------------------

    def _enqueue(self, key: tuple[str, str]) -> None:
        with self._cond:
            if key not in self._queued:
                self._queued.add(key)
                self._queue.append(key)
                self._cond.notify_all()

    def _schedule(self, at_s: float, key: tuple[str, str]) -> None:
        with self._cond:
            heapq.heappush(self._timers, (at_s, key))
            self._cond.notify_all()

    def _work(self) -> None:
        next_resync = time.monotonic() + self.resync_s
        while not self._stop.is_set():
            with self._cond:
                while self._timers and self._timers[0][0] <= self.clock():
                    _, key = heapq.heappop(self._timers)
                    if key not in self._queued:
                        self._queued.add(key)
                        self._queue.append(key)
                if not self._queue:
                    wait = next_resync - time.monotonic()
                    if self._timers:
                        wait = min(wait, self._timers[0][0] - self.clock())
                    self._cond.wait(max(0.01, min(wait, 1.0)))
                    if time.monotonic() >= next_resync:
                        next_resync = time.monotonic() + self.resync_s
                        with self._cache_lock:
                            keys = list(self._rcs)
                        for key in keys:
                            if key not in self._queued:
                                self._queued.add(key)
                                self._queue.append(key)
                    continue
                key = self._queue.pop(0)
                self._queued.discard(key)
                self._busy = True
            try:
                self.reconcile(key)
            except Exception as e:
                log.exception("reconciling %s/%s failed: %s; retrying in 2s", key[0], key[1], e)
                self._schedule(self.clock() + 2.0, key)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    # -- reconcile ---------------------------------------------------------------------------------

    def reconcile(self, key: tuple[str, str]) -> None:
        """Bring one object and this node's containers in line; Events go out after the status."""
        self._events_out: list[tuple[dict, str, str, bool]] = []
        try:
            self._reconcile(key)
        finally:
            events, self._events_out = self._events_out, []
            for pod, reason, message, warning in events:
                self._post_event(pod, reason, message, warning=warning)

    def _reconcile(self, key: tuple[str, str]) -> None:
        namespace, name = key
        with self._cache_lock:
            obj = self._rcs.get(key)
            pods = {k: p for k, p in self._pods.items() if k[0] == namespace}
        owned = self.owners.of_object(namespace, name)
        uid = obj["metadata"]["uid"] if obj else None
        # What this node applied for an object that is gone, or for an older object of that name.
        for ckey, entry in owned.items():
            if entry["uid"] != uid:
                self._revert(ckey, entry, reason="its ResourceChaos was deleted")
        if obj is None:
            return
        owned = {k: v for k, v in owned.items() if v["uid"] == uid}
        status = obj.get("status") or {}
        if crd.is_deleting(obj):
            entries = [self._revert(ckey, entry, reason="deleted", status=status) for ckey, entry in owned.items()]
            self._write_status(key, [e for e in entries if e])
            if not self.owners.of_object(namespace, name):  # a failed revert keeps holding the object
                self._set_finalizer(key, present=False)
            return
        try:
            spec = crd.spec_of(obj)
        except crd.SpecError as e:
            log.error("ResourceChaos %s/%s: %s", namespace, name, e)
            return
        generation = obj["metadata"].get("generation", 1)
        matching = [p for (ns, pod_name), p in sorted(pods.items())
                    if (spec.pod is not None and pod_name == spec.pod)
                    or (spec.selector is not None and crd.selector_matches(spec.selector, p["metadata"].get("labels")))]
        entries: list[dict] = []
        wanted: set[str] = set()
        for pod in matching:
            pod_name = pod["metadata"]["name"]
            previous = crd.target_entry(status, pod_name)
            try:
                container = crd.choose_container(pod, spec.container)
            except crd.SpecError as e:
                if not previous or previous.get("phase") != crd.FAILED or previous.get("observedGeneration") != generation:
                    entries.append(self._entry(pod, spec.container or "", crd.FAILED, generation, message=str(e)))
                    self._event(pod, "Failed", f"ResourceChaos {name}: {e}", warning=True)
                continue
            ckey = f"{namespace}/{pod_name}/{container}"
            wanted.add(ckey)
            entry = self._ensure(obj, spec, pod, container, ckey, previous, owned.get(ckey))
            if entry is not None:
                entries.append(entry)
        for ckey, entry in owned.items():
            if ckey not in wanted:
                gone = (namespace, entry["pod"]) not in pods
                reverted = self._revert(ckey, entry, reason="pod deleted" if gone else "pod no longer matches",
                                        status=status)
                if reverted:
                    entries.append(reverted)
        if entries:
            self._write_status(key, entries)
        with self._cache_lock:
            latest = self._rcs.get(key, obj)  # _set_finalizer may have stored a newer copy
        if not self.owners.of_object(namespace, name) and self.finalizer in (latest["metadata"].get("finalizers") or []):
            self._set_finalizer(key, present=False)

    def _ensure(self, obj: dict, spec: crd.ChaosSpec, pod: dict, container: str, ckey: str,
                previous: dict | None, owner: dict | None) -> dict | None:
        """Make the container match the object; return a new status entry, or None if nothing changed."""
        namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        generation = obj["metadata"].get("generation", 1)
        pod_name = pod["metadata"]["name"]
        phase = (previous or {}).get("phase")
        current = previous is not None and previous.get("observedGeneration") == generation
        if current and phase in (crd.FAILED, crd.REVERTED):
            return None  # answered; a new spec (generation) asks again
        if (pod.get("status") or {}).get("phase") != "Running":
            if current and phase == crd.PENDING:
                return None
            return self._entry(pod, container, crd.PENDING, generation, message="waiting for the pod to run")
        active = {e.target.key: e for e in self.engine.list(namespace)}.get(ckey)
        other = self.owners.get(ckey)
        if other and other["uid"] != obj["metadata"]["uid"]:
            message = (f"container {container} is already changed by ResourceChaos {other['namespace']}/{other['name']};"
                       " reset that one first")
            return self._failed(pod, container, generation, message, previous)
        if active is not None and owner is None:
            message = (f"container {container} is already under a node-local experiment ({active.experiment_id});"
                       " reset it with kubectl-chaos --agent-address first")
            return self._failed(pod, container, generation, message, previous)
        duration_s = spec.duration_s
        if phase == crd.APPLIED and (current or spec.duration_s is None):
            # The end time in force stays: same generation, or a further change that sets no
            # duration of its own (the engine keeps an experiment's expiry when given none).
            expires = crd.parse_rfc3339(previous.get("expiresAt"))
            if expires is not None and expires.timestamp() <= self.clock():
                entry = self._revert(ckey, owner or {"pod": pod_name, "container": container}, reason="expired",
                                     status=obj.get("status"))
                if entry is not None:
                    entry["observedGeneration"] = generation  # the answer to this generation too
                return entry
            if current and active is not None:
                if expires is not None:
                    self._schedule(expires.timestamp(), (namespace, name))
                return None  # in force; the engine corrects drift itself
            # The node lost it (state lost, or the engine ended it): apply again for the time left.
            if active is None and expires is not None:
                duration_s = max(0.001, expires.timestamp() - self.clock())
        if not self._set_finalizer((namespace, name), present=True):
            return None  # being deleted meanwhile: the next event reverts
        request = ApplyRequest(
            target=Target(namespace, pod_name, container),
            changes=Changes(cpu_millicpu=spec.cpu_millicpu, memory_bytes=spec.memory_bytes,
                            ingress_bps=spec.ingress_bps, egress_bps=spec.egress_bps),
            duration_s=duration_s, method=Method(spec.method), force=spec.force)
        try:
            result = self.engine.apply(request)
        except RuntimeUnavailable as e:
            # Transient (the runtime restarting, say): not an answer. Pending, and ask again soon.
            log.warning("ResourceChaos %s/%s on %s: %s; retrying in %.0fs", namespace, name, ckey, e, RETRY_S)
            self._schedule(self.clock() + RETRY_S, (namespace, name))
            if current and phase == crd.PENDING:
                return None
            return self._entry(pod, container, crd.PENDING, generation,
                               message=f"the container runtime does not answer ({e}); retrying every {RETRY_S:g}s")
        except EngineError as e:
            log.warning("ResourceChaos %s/%s on %s: %s", namespace, name, ckey, e)
            return self._failed(pod, container, generation, str(e), previous)
        self.owners.set(ckey, {"namespace": namespace, "name": name, "uid": obj["metadata"]["uid"],
                               "pod": pod_name, "container": container, "experimentId": result.experiment_id})
        changes = [{"resource": RESOURCE_NAMES[r.resource.value], "unit": crd.UNITS[RESOURCE_NAMES[r.resource.value]],
                    "original": _value(r.original), "applied": _value(r.in_force), "method": r.method.value}
                   for r in result.resources]
        entry = self._entry(pod, container, crd.APPLIED, generation, changes=changes,
                            method=_methods(result.resources), expires_at=crd.rfc3339(result.expires_at),
                            experiment_id=result.experiment_id)
        if result.expires_at is not None:
            self._schedule(result.expires_at, (namespace, name))
        self._event(pod, "Applied", f"ResourceChaos {name}: " + ", ".join(
            f"{c['resource']} {_show(c['original'])} -> {_show(c['applied'])}" for c in changes)
            + (f", until {entry['expiresAt']}" if result.expires_at else ""))
        log.info("applied ResourceChaos %s/%s to %s: %s", namespace, name, ckey, changes)
        return entry

    def _failed(self, pod: dict, container: str, generation: int, message: str, previous: dict | None) -> dict | None:
        if previous and previous.get("phase") == crd.FAILED and previous.get("message") == message \
                and previous.get("observedGeneration") == generation:
            return None
        self._event(pod, "Failed", message, warning=True)
        return self._entry(pod, container, crd.FAILED, generation, message=message)

    def _revert(self, ckey: str, owner: dict, *, reason: str, status: dict | None = None) -> dict | None:
        """Revert one container; the status entry to write (None when the object is gone)."""
        namespace, pod_name, container = ckey.split("/", 2)
        message = f"reverted: {reason}"
        restored: dict[str, int | None] = {}
        try:
            result = self.engine.revert(RevertRequest(Target(namespace, pod_name, container)))
            restored = {RESOURCE_NAMES[r.resource.value]: _value(r.in_force) for r in result.resources}
        except TargetNotFound:
            message = f"reverted: {reason} (the container is gone)"
        except EngineError as e:
            log.error("reverting %s failed: %s; will retry", ckey, e)
            self._schedule(self.clock() + 2.0, (owner.get("namespace", namespace), owner.get("name", "")))
            with self._cache_lock:
                pod = self._pods.get((namespace, pod_name))
            if pod and ckey not in self._revert_failures:  # one Event per failing container, not one per retry
                self._event(pod, "Failed", f"revert failed: {e}; retrying", warning=True)
            self._revert_failures.add(ckey)
            return None
        self._revert_failures.discard(ckey)
        self.owners.set(ckey, None)
        with self._cache_lock:
            pod = self._pods.get((namespace, pod_name))
        log.info("reverted %s (%s): %s", ckey, reason, restored)
        previous = crd.target_entry(status, pod_name) or {}
        changes = [dict(c, restored=restored.get(c["resource"], c.get("original"))) for c in previous.get("changes") or []]
        if pod is not None:
            self._event(pod, "Reverted", f"{message}; " + ", ".join(
                f"{c['resource']} back to {_show(c['restored'])}" for c in changes))
        if status is None:
            return None
        entry = dict(previous, pod=pod_name, container=container, node=self.node, phase=crd.REVERTED,
                     message=message, changes=changes, lastTransitionTime=crd.now_rfc3339())
        entry.pop("expiresAt", None)
        return entry

    def _entry(self, pod: dict, container: str, phase: str, generation: int, *, message: str = "",
               changes: list | None = None, method: str = "", expires_at: str | None = None,
               experiment_id: str = "") -> dict:
        entry = {"pod": pod["metadata"]["name"], "uid": pod["metadata"].get("uid", ""), "node": self.node,
                 "container": container, "phase": phase, "observedGeneration": generation, "message": message,
                 "lastTransitionTime": crd.now_rfc3339()}
        if changes is not None:
            entry["changes"] = changes
        if method:
            entry["method"] = method
        if expires_at:
            entry["expiresAt"] = expires_at
        if experiment_id:
            entry["experimentId"] = experiment_id
        return entry

    # -- API writes --------------------------------------------------------------------------------

    def _write_status(self, key: tuple[str, str], entries: list[dict]) -> None:
        from kubernetes.client.exceptions import ApiException

        if not entries:
            return
        for _ in range(10):
            try:
                fresh = self.custom.get_namespaced_custom_object(crd.GROUP, crd.VERSION, key[0], crd.PLURAL, key[1])
                fresh["status"] = crd.with_targets(fresh, entries)
                stored = self.custom.replace_namespaced_custom_object_status(
                    crd.GROUP, crd.VERSION, key[0], crd.PLURAL, key[1], fresh)
                with self._cache_lock:
                    if key in self._rcs:
                        self._rcs[key] = stored
                return
            except ApiException as e:
                if e.status == 404:
                    return
                if e.status != 409:
                    raise
        raise RuntimeError(f"status of {key[0]}/{key[1]}: still conflicting after 10 tries")

    def _set_finalizer(self, key: tuple[str, str], *, present: bool) -> bool:
        """Add or drop this node's finalizer; False if the object is gone (or deleting, for an add)."""
        from kubernetes.client.exceptions import ApiException

        with self._cache_lock:
            cached = self._rcs.get(key)
        for attempt in range(10):
            if attempt == 0 and cached is not None:
                fresh = cached  # usually current: saves a round trip; a 409 sends us to the API
            else:
                try:
                    fresh = self.custom.get_namespaced_custom_object(crd.GROUP, crd.VERSION, key[0], crd.PLURAL,
                                                                     key[1])
                except ApiException as e:
                    if e.status == 404:
                        return False
                    raise
            finalizers = list(fresh["metadata"].get("finalizers") or [])
            if (self.finalizer in finalizers) == present:
                return True
            if present and crd.is_deleting(fresh):
                return False
            finalizers = finalizers + [self.finalizer] if present else [f for f in finalizers if f != self.finalizer]
            patch = {"metadata": {"finalizers": finalizers, "resourceVersion": fresh["metadata"]["resourceVersion"]}}
            try:
                stored = self.custom.patch_namespaced_custom_object(crd.GROUP, crd.VERSION, key[0], crd.PLURAL, key[1],
                                                                   patch)
                with self._cache_lock:
                    if key in self._rcs and stored.get("metadata"):
                        self._rcs[key] = stored
                return True
            except ApiException as e:
                if e.status == 404:
                    return False
                if e.status == 422 and present:
                    return False
                if e.status != 409:
                    raise
        raise RuntimeError(f"finalizer of {key[0]}/{key[1]}: still conflicting after 10 tries")

    def _event(self, pod: dict, reason: str, message: str, *, warning: bool = False) -> None:
        pending = getattr(self, "_events_out", None)
        if pending is not None:
            pending.append((pod, reason, message, warning))
        else:
            self._post_event(pod, reason, message, warning=warning)

    def _post_event(self, pod: dict, reason: str, message: str, *, warning: bool = False) -> None:
        meta = pod["metadata"]
        now = crd.now_rfc3339()
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "namespace": meta["namespace"],
                               "uid": meta.get("uid", "")},
            "reason": reason, "message": message[:1024], "type": "Warning" if warning else "Normal",
            "source": {"component": crd.EVENT_COMPONENT, "host": self.node},
            "reportingComponent": f"{crd.GROUP}/{crd.EVENT_COMPONENT}", "reportingInstance": self.node,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], body)
        except Exception as e:  # an event is a courtesy: never fail the change for it
            log.warning("event %s on %s/%s not recorded: %s", reason, meta["namespace"], meta["name"], e)


def _check(resp: Any) -> None:
    """Raise ApiException for an error answer (raw responses are not checked by the client)."""
    from kubernetes.client.exceptions import ApiException

    if not 200 <= resp.status <= 299:
        body = resp.data.decode(errors="replace")
        try:
            reason = json.loads(body).get("message", body)
        except ValueError:
            reason = body
        raise ApiException(status=resp.status, reason=reason)


def _value(value: int) -> int | None:
    return None if value == UNLIMITED else value


def _methods(resources) -> str:
    return ",".join(sorted({r.method.value for r in resources}))


def _show(value: int | None) -> str:
    return "unlimited" if value is None else str(value)
