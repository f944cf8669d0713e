"""The agent's Kubernetes front door: a node-local controller for ResourceChaos objects.

It watches ResourceChaos objects in every namespace and the pods of its own node (field selector
``spec.nodeName``), and drives the same :class:`daemonset.engine.Engine` the gRPC server uses.
Three parts, by job:

- :mod:`daemonset.informer`: list + watch with resource versions (410 Gone -> list again, other
  errors -> capped backoff with jitter) into caches, and a work queue of object keys with at most
  one pending retry per key;
- :func:`daemonset.reconcile.reconcile`: pure; from the object, this node's pods, the engine's
  experiments and the engine events not yet answered, the actions to take;
- here: the wiring, and the executor that runs those actions against the engine and the API
  (status, this node's finalizer, Events on the pods).

Ownership is the engine's record: every apply carries ``Owner(ResourceChaos, namespace, name,
uid)``, and what this controller owns is read back from ``engine.list()`` at start, on every
reconcile and on every resync. The controller keeps no state file.

Time is the engine's too: it ends experiments when their duration runs out, retries refused
reverts with backoff, and reports through ``engine.subscribe``; the controller turns those events
into status and Events. The only delayed work here is the queue's rate-limited retry after a
transient failure (the runtime not answering, API conflicts and server errors) and the periodic
resync, which re-adds keys without growing anything.

It talks to the API with in-cluster credentials (or a kubeconfig); without an API the agent runs
in node-local mode alone. The ``kubernetes`` package is imported only here.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from daemonset import crd, observe, watch
from daemonset import reconcile as rc
from daemonset.informer import Informer, WatchExpired, WatchFailed, WorkQueue
from daemonset.policy import DEFAULT_AGENT_NAMESPACE, Policy
from daemonset.types import (
    Conflict,
    EngineError,
    EngineEvent,
    EventKind,
    OwnerKind,
    RevertIncomplete,
    RevertRequest,
    RuntimeUnavailable,
    TargetNotFound,
)

log = logging.getLogger("chaos-agent.controller")

WATCH_TIMEOUT_S = 240
RESYNC_S = 60.0
STATUS_TRIES = 3  # finalizer patch conflicts answered by reading the object again; then the key is retried
FIELD_MANAGER = "chaos-agent/{node}"  # each node's agent owns its own status entries (server-side apply)
APPLY_PATCH = "application/apply-patch+yaml"
RUNTIME_DOWN = "the container runtime does not answer"

Key = tuple[str, str]


class ControllerError(Exception):
    """The controller cannot start: no API credentials, or the API refuses the first list."""


class Transient(Exception):
    """A step that may succeed later (the runtime or the API not answering, a write conflict)."""


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
    controller = Controller(engine, client, node,
                            agent_namespace=os.environ.get("POD_NAMESPACE") or DEFAULT_AGENT_NAMESPACE)
    controller.start()
    return controller


class Controller:
    """Watches, queues and reconciles; one worker thread makes every engine call and API write.

    ``engine`` needs ``apply``, ``revert``, ``list``, ``supersede`` and ``subscribe`` (see
    daemonset.types). ``clock`` drives the queue's retries and the resync (monotonic seconds),
    ``wall`` the timestamps written (epoch seconds).
    """

    def __init__(self, engine: Any, client: Any, node_name: str, *, state_dir: str | None = None,
                 agent_namespace: str = DEFAULT_AGENT_NAMESPACE,
                 resync_s: float = RESYNC_S, watch_timeout_s: int = WATCH_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random, observe_interval_s: float = watch.OBSERVE_INTERVAL_S,
                 prune_after_s: float = rc.PRUNE_AFTER_S):
        from kubernetes import client as k8s

        del state_dir  # accepted for older callers: ownership lives in the engine's records now
        self.engine = engine
        self.node = node_name
        self.agent_namespace = agent_namespace
        self.finalizer = crd.finalizer_for(node_name)
        self.core = k8s.CoreV1Api(client)
        self.custom = k8s.CustomObjectsApi(client)
        self.client = client
        self.resync_s = resync_s
        self.clock = clock
        self.wall = wall
        self.queue = WorkQueue(clock=clock, rand=rand)
        self.rcs = Informer("ResourceChaos", self._list_rcs, self._watch_rcs, _key, self._on_rc_change,
                            watch_timeout_s=watch_timeout_s, rand=rand)
        self.pods = Informer("pods", self._list_pods, self._watch_pods, _key, self._on_pod_change,
                             watch_timeout_s=watch_timeout_s, rand=rand)
        # The policy's inputs: namespaces (the opt-in label, the raise grants) and this node (its allocatable).
        self.namespaces = Informer("namespaces", self._list_namespaces, self._watch_namespaces, _key,
                                   self._on_namespace_change, watch_timeout_s=watch_timeout_s, rand=rand)
        self.nodes = Informer("node", self._list_node, self._watch_node, _key, self._on_node_change,
                              watch_timeout_s=watch_timeout_s, rand=rand)
        self._lock = threading.Lock()  # guards the three maps below (the engine's thread writes _ended)
        self._ended: dict[Key, dict[str, EngineEvent]] = {}  # ENDED events not yet answered, by experiment
        self._unwritten: dict[Key, dict[str, dict]] = {}  # status entries a failed write still owes
        # What this node last applied to each object's status: (object uid, its entries by pod). Each
        # apply sends all of them (an entry left out is removed), so they come from here, never from
        # a cache that may be behind our own last write.
        self._mine: dict[Key, tuple[str, dict[str, dict]]] = {}
        self.field_manager = FIELD_MANAGER.format(node=node_name)[:128]
        self.status_writes = 0  # server-side applies of the status sent
        self.status_conflicts = 0  # of them answered 409 (another manager owned a field) and sent again forced
        self.status_pruned = 0  # entries of gone pods this node stopped writing
        self._baselines: dict[Key, rc.Baselines] = {}  # spec resources when applied, for in-place resize
        # kubectl chaos top: the objects someone watches (daemonset.watch), the last counters of each
        # experiment sampled for them, and the objects this node has published figures on.
        self.prune_after_s = prune_after_s
        self.observe_interval_s = observe_interval_s
        self._observe_lock = threading.Lock()  # observe_once: the loop's thread, or a test's
        self.observe_manager = watch.OBSERVE_MANAGER.format(node=node_name)[:128]
        self._watches: dict[Key, watch.Watch] = {}
        self._samples: dict[str, tuple[Key, observe.Counters]] = {}  # by experiment id
        self._observed: dict[Key, float] = {}  # key -> when its next sample is due (epoch seconds)
        self.observe_writes = 0  # status.observed applies sent
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._next_resync = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, *, threads: bool = True) -> None:
        """List pods and ResourceChaos (errors raise ControllerError), subscribe to the engine, queue
        every object and every experiment this node holds for one, then watch and reconcile."""
        from kubernetes.client.exceptions import ApiException

        try:
            ns_rv = self.namespaces.relist()
            node_rv = self.nodes.relist()
            pods_rv = self.pods.relist()
            rcs_rv = self.rcs.relist()
        except (ApiException, WatchFailed) as e:
            status = getattr(e, "status", "?")
            raise ControllerError(f"the Kubernetes API refused the first list: {status} {e.reason}") from e
        except Exception as e:
            raise ControllerError(f"the Kubernetes API does not answer: {e}") from e
        self.engine.subscribe(self._on_engine_event)
        self.resync()
        self._next_resync = self.clock() + self.resync_s
        if not threads:
            return
        for name, target, args in (("namespaces", self.namespaces.run, (ns_rv,)), ("node", self.nodes.run, (node_rv,)),
                                   ("pods", self.pods.run, (pods_rv,)), ("rc", self.rcs.run, (rcs_rv,)),
                                   ("worker", self._work, ()), ("observe", self._observe_loop, ())):
            t = threading.Thread(target=target, args=args, name=f"controller-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("cluster mode: watching ResourceChaos and the pods of node %s", self.node)

    def stop(self) -> None:
        self._stop.set()
        for informer in (self.rcs, self.pods, self.namespaces, self.nodes):
            informer.stop()
        self.queue.close()
        for t in self._threads:
            t.join(timeout=5)

    def idle(self, timeout_s: float = 10.0) -> bool:
        """Wait until no key is ready or being worked on (for tests); True if so in time."""
        return self.queue.wait_idle(timeout_s)

    def resync(self) -> None:
        """Queue every object in the cache and every object the engine holds an experiment for
        (deleted ones too: their experiments are reverted), except those waiting for a retry. Adds
        keys to the ready set (at most once each); schedules nothing."""
        keys = set(self.rcs.keys())
        try:
            keys |= {(e.owner.namespace, e.owner.name) for e in self.engine.list()
                     if e.owner.kind == OwnerKind.RESOURCE_CHAOS}
        except Exception as e:
            log.warning("resync: the engine's list failed: %s", e)
        for key in sorted(keys):
            if self.queue.next_due_s(key) is None:  # one in backoff keeps its turn: no retry before it is due
                self.queue.add(key)

    def _work(self) -> None:
        while not self._stop.is_set():
            wait = max(0.0, min(1.0, self._next_resync - self.clock()))
            key = self.queue.get(timeout_s=wait)
            if self.clock() >= self._next_resync:
                self._next_resync = self.clock() + self.resync_s
                self.resync()
            if key is None:
                continue
            try:
                self.process(key)
            finally:
                self.queue.done(key)

    def work_ready(self) -> int:
        """Process every key that is ready now, in this thread (tests; the worker does this all the time)."""
        count = 0
        while (key := self.queue.get(timeout_s=0)) is not None:
            try:
                self.process(key)
            finally:
                self.queue.done(key)
            count += 1
        return count

    # -- caches and watches ------------------------------------------------------------------------

    def _list_pods(self) -> tuple[list[dict], str]:
        return _listing(self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.node}",
                                                              _preload_content=False))

    def _watch_pods(self, rv: str, timeout_s: int) -> _Stream:
        return _Stream(self.core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.node}", watch=True, resource_version=rv, timeout_seconds=timeout_s,
            allow_watch_bookmarks=True, _preload_content=False))

    def _list_namespaces(self) -> tuple[list[dict], str]:
        return _listing(self.core.list_namespace(_preload_content=False))

    def _watch_namespaces(self, rv: str, timeout_s: int) -> _Stream:
        return _Stream(self.core.list_namespace(watch=True, resource_version=rv, timeout_seconds=timeout_s,
                                                allow_watch_bookmarks=True, _preload_content=False))

    def _list_node(self) -> tuple[list[dict], str]:
        return _listing(self.core.list_node(field_selector=f"metadata.name={self.node}", _preload_content=False))

    def _watch_node(self, rv: str, timeout_s: int) -> _Stream:
        return _Stream(self.core.list_node(field_selector=f"metadata.name={self.node}", watch=True, resource_version=rv,
                                           timeout_seconds=timeout_s, allow_watch_bookmarks=True,
                                           _preload_content=False))

    def _list_rcs(self) -> tuple[list[dict], str]:
        return _listing(self.custom.list_cluster_custom_object(crd.GROUP, crd.VERSION, crd.PLURAL,
                                                               _preload_content=False))

    def _watch_rcs(self, rv: str, timeout_s: int) -> _Stream:
        return _Stream(self.custom.list_cluster_custom_object(
            crd.GROUP, crd.VERSION, crd.PLURAL, watch=True, resource_version=rv, timeout_seconds=timeout_s,
            allow_watch_bookmarks=True, _preload_content=False))

    def _on_rc_change(self, key: Key, old: dict | None, new: dict | None) -> None:
        self.queue.add(key)

    # -- kubectl chaos top: figures in status while someone watches ---------------------------------

    def _observe_loop(self) -> None:
        while not self._stop.wait(min(0.5, self.observe_interval_s / 4)):
            try:
                self.observe_once()
            except Exception as e:  # figures are a courtesy: never stop the loop for them
                log.warning("publishing figures for top failed: %s", e)

    def observe_once(self) -> int:
        """Sample and publish the figures of every watched object that is due; one last empty apply
        for an object whose watch has ended. Returns the number of status writes made."""
        if not hasattr(self.engine, "sample"):
            return 0
        with self._observe_lock:
            return self._observe_once()

    def _observe_once(self) -> int:
        now = self.wall()
        # From the cache each time (a mark may arrive in an object our own write stored, whose watch
        # event is then skipped): a few dict lookups per object.
        watches = {}
        for key, obj in self.rcs.items():
            seen = watch.watch_of(self._watches.get(key), obj, now)
            if seen is not None:
                watches[key] = seen
        self._watches = watches
        writes = 0
        for key in sorted(set(watches) | set(self._observed)):
            seen = watches.get(key)
            obj = self.rcs.get(key)
            if seen is None or seen.until <= now or obj is None:
                if self._observed.pop(key, None) is not None and obj is not None:
                    writes += self._publish(key, obj, [])  # the watch ended: our entries go
                continue
            if now < self._observed.get(key, 0.0):
                continue
            self._observed[key] = now + self.observe_interval_s
            uid = obj["metadata"].get("uid")
            entries = []
            ours = set()
            try:
                sampled = self.engine.sample(key[0])
            except Exception as e:
                log.warning("sampling for top of ResourceChaos %s/%s failed: %s", key[0], key[1], e)
                continue
            for info, counters, oom_kills_at_start in sampled:
                if not rc.owned_by(info, key) or info.owner.uid != uid or info.phase not in rc.LIVE:
                    continue
                ours.add(info.experiment_id)
                before = self._samples.get(info.experiment_id, (key, None))[1]
                self._samples[info.experiment_id] = (key, counters)
                if before is not None:
                    figures = observe.figures(before, counters, oom_kills_at_start=oom_kills_at_start)
                    entry = watch.observed_entry(info.target.pod, info.target.container, self.node, now, seen.mark,
                                                 figures)
                    if entry.get("errors"):
                        entry["errors"] = [self._scrub(e, key[0]) for e in entry["errors"]]
                    entries.append(entry)
            for experiment_id in [i for i, (k, _) in self._samples.items() if k == key and i not in ours]:
                del self._samples[experiment_id]  # ended
            if entries:
                writes += self._publish(key, obj, entries)
        for experiment_id in [i for i, (k, _) in self._samples.items() if k not in self._observed]:
            del self._samples[experiment_id]  # its object is no longer watched (or the experiment ended)
        return writes

    def _publish(self, key: Key, obj: dict, entries: list[dict]) -> int:
        """Server-side apply of this node's ``status.observed`` entries (all of them: one left out is
        removed), as its own field manager, so the target entries' writes never touch them."""
        from kubernetes.client.exceptions import ApiException

        body = {"apiVersion": crd.API_VERSION, "kind": crd.KIND,
                "metadata": {"name": key[1], "namespace": key[0]},
                "status": {"observed": sorted(entries, key=lambda e: e["pod"])}}
        self.observe_writes += 1
        try:
            stored = self.custom.patch_namespaced_custom_object_status(
                crd.GROUP, crd.VERSION, key[0], crd.PLURAL, key[1], body, field_manager=self.observe_manager,
                force=True, _content_type=APPLY_PATCH)
        except ApiException as e:
            if e.status != 404:
                log.warning("ResourceChaos %s/%s: figures for top not written: %s %s", key[0], key[1], e.status,
                            e.reason)
            return 1
        if (stored.get("metadata") or {}).get("uid") == obj["metadata"].get("uid"):
            self.rcs.store(stored)
        return 1

    def _on_pod_change(self, pod_key: Key, old: dict | None, new: dict | None) -> None:
        """Queue the objects that target this pod, before or after the change (labels move pods in
        and out of selectors)."""
        namespace, name = pod_key
        labels = [p["metadata"].get("labels") for p in (old, new) if p is not None]
        for key, obj in self.rcs.items():
            if key[0] != namespace:
                continue
            target = (obj.get("spec") or {}).get("target") or {}
            if target.get("pod") == name or (target.get("selector") is not None and any(
                    crd.selector_matches(target["selector"], lab) for lab in labels)):
                self.queue.add(key)

    def _on_namespace_change(self, ns_key: Key, old: dict | None, new: dict | None) -> None:
        """Queue the objects of a namespace whose opt-in or grants changed."""
        if _policy_view(old) == _policy_view(new):
            return
        name = ns_key[1]
        for key in self.rcs.keys():
            if key[0] == name:
                self.queue.add(key)

    def _on_node_change(self, node_key: Key, old: dict | None, new: dict | None) -> None:
        """This node's allocatable bounds raises and lowerings of containers without limits: look again."""
        allocatable = [((o or {}).get("status") or {}).get("allocatable") for o in (old, new)]
        if allocatable[0] != allocatable[1]:
            for key in self.rcs.keys():
                self.queue.add(key)

    def _scrub(self, message: str, namespace: str) -> str:
        """A message for a tenant of ``namespace``: no object of any other namespace named."""
        return rc.scrub(message, namespace, (name for _, name in self.namespaces.keys()))

    def policy(self, namespace: str) -> Policy:
        return Policy(self.namespaces.get(("", namespace)), self.nodes.get(("", self.node)), self.agent_namespace)

    def _on_engine_event(self, event: EngineEvent) -> None:
        """Called on the engine's thread: remember an ending, queue its object; nothing more."""
        if event.owner.kind != OwnerKind.RESOURCE_CHAOS:
            return
        key = (event.owner.namespace, event.owner.name)
        if event.kind == EventKind.ENDED:
            with self._lock:
                self._ended.setdefault(key, {})[event.experiment_id] = event
        self.queue.add(key)

    # -- one key -----------------------------------------------------------------------------------

    def process(self, key: Key) -> None:
        """Reconcile one object; on a transient failure retry it with backoff, else reset its backoff."""
        from kubernetes.client.exceptions import ApiException

        try:
            transient = self._process(key)
        except (Transient, RuntimeUnavailable) as e:
            log.warning("ResourceChaos %s/%s: %s; retrying in %.1fs", key[0], key[1], e,
                        self.queue.add_rate_limited(key))
            return
        except ApiException as e:
            log.warning("ResourceChaos %s/%s: the API answered %s %s; retrying in %.1fs", key[0], key[1], e.status,
                        e.reason, self.queue.add_rate_limited(key))
            return
        except Exception as e:
            log.exception("reconciling ResourceChaos %s/%s failed: %s; retrying in %.1fs", key[0], key[1], e,
                          self.queue.add_rate_limited(key))
            return
        if transient:
            self.queue.add_rate_limited(key)
        else:
            self.queue.forget(key)

    def _process(self, key: Key) -> bool:
        namespace = key[0]
        obj = self.rcs.get(key)
        pods = {name: pod for (ns, name), pod in self.pods.items() if ns == namespace}
        with self._lock:
            ended = list(self._ended.get(key, {}).values())
            unwritten = dict(self._unwritten.get(key, {}))
            baselines = self._baselines.get(key, {})
            uid, mine = self._mine.get(key, ("", {}))
        experiments = self.engine.list(namespace)
        if obj is not None and uid == obj["metadata"].get("uid") and mine:
            unwritten = {**mine, **unwritten}  # our own entries as we last wrote them: the cache may lag
        if obj is not None and unwritten:
            obj = dict(obj, status=crd.with_targets(obj, list(unwritten.values())))
        actions = rc.reconcile(key, obj, pods, experiments, self.node, ended=ended, baselines=baselines,
                               now=self.wall(), policy=self.policy(namespace), prune_after_s=self.prune_after_s)
        try:
            transient = self._execute(key, obj, actions)
        finally:
            if obj is None:
                with self._lock:
                    self._baselines.pop(key, None)
                    self._unwritten.pop(key, None)
                    self._mine.pop(key, None)
        with self._lock:  # answered (or nothing left to answer them on)
            seen = self._ended.get(key, {})
            for event in ended:
                seen.pop(event.experiment_id, None)
            if not seen:
                self._ended.pop(key, None)
        return transient

    # -- the executor ------------------------------------------------------------------------------

    def _execute(self, key: Key, obj: dict | None, actions: list[rc.Action]) -> bool:
        """Run the actions in order: engine calls first, then one status write, the finalizer's
        release, and the Events (posted even when the status write failed). True if a step must be
        retried later."""
        run = _Run(key, self.wall())
        may_apply = True
        release = False
        try:
            for action in actions:
                if isinstance(action, rc.Revert):
                    self._revert(run, action)
                elif isinstance(action, rc.Supersede):
                    self._supersede(run, action)
                elif isinstance(action, rc.SetFinalizer):
                    if action.present:
                        may_apply = self._set_finalizer(key, present=True)
                    else:
                        release = True
                elif isinstance(action, rc.Apply):
                    if may_apply:
                        self._apply(run, action)
                elif isinstance(action, rc.WriteStatus):
                    for entry in action.entries:
                        run.entries.setdefault(entry["pod"], entry)  # an engine result of this run wins
                    if action.node is not None:
                        run.node_entry = action.node
                    run.drops.update(action.drop)
                elif isinstance(action, rc.Remember):
                    with self._lock:
                        if action.baselines:
                            self._baselines[key] = dict(action.baselines)
                        else:
                            self._baselines.pop(key, None)
                elif isinstance(action, rc.Event):
                    run.events.append(action)
            status = {e["pod"]: e for e in ((obj or {}).get("status") or {}).get("targets") or []}
            for pod in [p for p, e in run.entries.items() if p in status and rc.same_entry(status[p], e)]:
                del run.entries[pod]  # already says so (the same Pending answer on every retry, say)
            with self._lock:
                owed = bool(self._unwritten.get(key))
            run.drops -= set(run.entries)
            if obj is not None and (run.entries or owed or run.node_entry is not None or run.drops):
                self._write_status(key, obj, run.entries, run.node_entry, drop=run.drops)
            if release and obj is not None and not run.transient:  # kept while an apply is being retried
                self._release_finalizer(key, obj)
        finally:
            for event in run.events:
                self._post_event(event.pod, event.reason, self._scrub(event.message, key[0]), warning=event.warning)
        return run.transient

    def _apply(self, run: _Run, action: rc.Apply) -> None:
        target = action.request.target
        pod, container = action.pod, target.container or ""
        if (target.pod, target.container) in run.blocked:
            run.entries[target.pod] = rc.new_entry(
                pod, container, crd.PENDING, action.generation, self.node, run.now,
                message="waiting for the previous experiment on this container to be reverted")
            return
        try:
            result = self.engine.apply(action.request)
        except RuntimeUnavailable as e:
            # Not an answer (containerd restarting, say): Pending with the reason, tried again with backoff.
            run.transient = True
            log.warning("ResourceChaos %s/%s on %s: %s", run.key[0], run.key[1], target.describe(), e)
            run.entries[target.pod] = rc.new_entry(
                pod, container, crd.PENDING, action.generation, self.node, run.now,
                message=self._scrub(f"{RUNTIME_DOWN} ({e}); the agent tries again with backoff", run.key[0]))
            return
        except EngineError as e:
            log.warning("ResourceChaos %s/%s on %s: %s", run.key[0], run.key[1], target.describe(), e)
            message = self._scrub(str(e), run.key[0])
            previous = action.previous
            if previous and previous.get("phase") == crd.FAILED and previous.get("message") == message \
                    and previous.get("observedGeneration") == action.generation:
                return
            run.entries[target.pod] = rc.new_entry(pod, container, crd.FAILED, action.generation, self.node,
                                                   run.now, message=message)
            run.events.append(rc.Event(pod, "Failed", message, warning=True))
            return
        entry = rc.applied_entry(pod, container, action.generation, self.node, run.now, result.resources,
                                 result.expires_at, result.experiment_id,
                                 profile=rc.profile_status(getattr(result, "steps_total", 0), getattr(result, "step", 0),
                                                           getattr(result, "next_step_at", None),
                                                           getattr(result, "next_step", {})))
        run.entries[target.pod] = entry
        run.events.append(rc.Event(pod, "Applied", rc.applied_text(run.key[1], entry)))
        log.info("applied ResourceChaos %s/%s to %s: %s", run.key[0], run.key[1], target.describe(),
                 entry.get("changes"))

    def _revert(self, run: _Run, action: rc.Revert) -> None:
        target = action.target
        message = f"reverted: {action.reason}"
        resources: tuple = ()
        not_restored: tuple[str, ...] = ()
        try:
            result = self.engine.revert(RevertRequest(target, owner=action.owner))
            resources, not_restored = result.resources, result.not_restored
        except TargetNotFound:
            message += " (the container is gone)"
        except Conflict as e:
            log.info("%s is no longer %s's: %s", target.describe(), action.owner.describe(), e)
            return
        except RevertIncomplete as e:
            # The engine keeps it (phase revert-failing) and retries by itself; its events bring us back.
            run.blocked.add((target.pod, target.container))
            log.warning("reverting %s (%s): %s", target.describe(), action.reason, e)
            if not action.write_status and action.pod is None:
                return
            text = self._scrub(f"putting the originals back failed: {e}", run.key[0])
            if e.next_retry_at is not None and "next try" not in text:
                text += f"; next try at {crd.rfc3339(e.next_retry_at)}"
            previous = action.previous
            if action.write_status:
                base = dict(previous) if previous else rc.new_entry(
                    action.pod or {"metadata": {"name": target.pod}}, target.container or "", crd.REVERTING, 1,
                    self.node, run.now)
                entry = dict(base, phase=crd.REVERTING, message=text, experimentId=action.experiment_id,
                             lastTransitionTime=crd.rfc3339(run.now))
                entry.pop("expiresAt", None)
                run.entries[target.pod] = entry
            episode = previous is not None and previous.get("phase") == crd.REVERTING \
                and previous.get("experimentId") == action.experiment_id
            if action.pod is not None and not episode:
                run.events.append(rc.Event(action.pod, "RevertFailing", f"ResourceChaos {run.key[1]}: {text}",
                                           warning=True))
            return
        except EngineError as e:  # the runtime down, or something the engine could not do now: later
            run.blocked.add((target.pod, target.container))
            raise Transient(f"reverting {target.describe()} ({action.reason}): {e}") from e
        log.info("reverted %s (%s)", target.describe(), action.reason)
        entry = rc.reverted_entry(action.previous, action.pod, target.pod, target.container or "", self.node,
                                  run.now, message, resources, not_restored=not_restored)
        if action.write_status:
            run.entries[target.pod] = entry
        if action.pod is not None:
            run.events.append(rc.Event(action.pod, "Reverted", rc.reverted_text(run.key[1], entry)))

    def _supersede(self, run: _Run, action: rc.Supersede) -> None:
        target = action.target
        try:
            ended = self.engine.supersede(target, action.reason)
        except EngineError as e:
            raise Transient(f"ending {target.describe()} ({action.reason}): {e}") from e
        if not ended:
            return  # it had ended meanwhile: its ENDED event says how
        log.info("%s: %s", target.describe(), action.reason)
        entry = rc.reverted_entry(action.previous, action.pod, target.pod, target.container or "", self.node,
                                  run.now, rc.ended_message(action.reason))
        run.entries[target.pod] = entry
        run.events.append(rc.Event(action.pod, "Superseded", f"ResourceChaos {run.key[1]}: {entry['message']}"))

    # -- API writes --------------------------------------------------------------------------------

    def _write_status(self, key: Key, obj: dict, entries: dict[str, dict], node_entry: dict | None = None, *,
                      drop: set[str] | frozenset[str] = frozenset()) -> None:
        """Server-side apply of this node's part of the status: all its ``status.targets`` entries
        (``entries`` put in place by pod), its ``status.nodes`` entry (``node_entry`` when it refuses
        the object as a whole, else a summary of its targets) and the target summary, as field
        manager ``chaos-agent/NODE``. No read-modify-write: nodes write their own entries side by
        side without conflicts. What a failed write owes is kept and shown to the next reconcile
        as if written."""
        from kubernetes.client.exceptions import ApiException

        namespace = key[0]
        entries = {pod: dict(e, message=self._scrub(e.get("message", ""), namespace)) for pod, e in entries.items()}
        uid = obj["metadata"].get("uid", "")
        with self._lock:
            owed = {**self._unwritten.get(key, {}), **entries}
            known_uid, mine = self._mine.get(key, ("", None))
        cached = self.rcs.get(key) or obj
        if cached["metadata"].get("uid") != uid:
            with self._lock:
                self._unwritten.pop(key, None)
            return  # another object of this name now: not ours to write
        if mine is None or known_uid != uid:  # first write since start: what the API holds of ours
            mine = {e["pod"]: e for e in (cached.get("status") or {}).get("targets") or []
                    if e.get("node") == self.node}
        targets = {pod: e for pod, e in {**mine, **owed}.items() if pod not in drop}
        if drop:
            self.status_pruned += len(drop & set(mine))
        ordered = [targets[pod] for pod in sorted(targets)]
        node = dict(node_entry, message=self._scrub(node_entry.get("message", ""), namespace)) \
            if node_entry is not None else crd.node_summary(cached, self.node, ordered)
        body = {"apiVersion": crd.API_VERSION, "kind": crd.KIND,
                "metadata": {"name": key[1], "namespace": namespace},
                "status": {"targetSummary": crd.target_summary(cached), "targets": ordered, "nodes": [node]}}
        written = False
        try:
            for force in (False, True):
                self.status_writes += 1
                try:
                    stored = self.custom.patch_namespaced_custom_object_status(
                        crd.GROUP, crd.VERSION, namespace, crd.PLURAL, key[1], body, field_manager=self.field_manager,
                        force=force, _content_type=APPLY_PATCH)
                except ApiException as e:
                    if e.status == 409 and not force:
                        # Another manager holds a field with another value: a pod of this name that was
                        # on another node, or a target summary from an older spec. Ours is current.
                        self.status_conflicts += 1
                        log.info("ResourceChaos %s/%s: status conflict (%s); applying it forced", namespace,
                                 key[1], _status_text(e))
                        continue
                    raise
                if (stored.get("metadata") or {}).get("uid") != uid:
                    return
                self.rcs.store(stored)
                written = True
                return
        except ApiException as e:
            if e.status == 404:
                owed = {}
                return
            raise
        finally:
            with self._lock:
                if written:
                    self._mine[key] = (uid, targets)
                    self._unwritten.pop(key, None)
                elif owed:
                    self._unwritten[key] = owed
                else:
                    self._unwritten.pop(key, None)

    def _release_finalizer(self, key: Key, obj: dict) -> None:
        """Drop this node's finalizer once the engine holds no experiment of this object."""
        uid = obj["metadata"].get("uid")
        held = [e for e in self.engine.list(key[0]) if rc.owned_by(e, key) and e.owner.uid == uid]
        if not held:
            self._set_finalizer(key, present=False)

    def _set_finalizer(self, key: Key, *, present: bool) -> bool:
        """Add or drop this node's finalizer; False if the object is gone (or being deleted, for an add)."""
        from kubernetes.client.exceptions import ApiException

        cached = self.rcs.get(key)
        uid = cached["metadata"].get("uid") if cached else None
        for attempt in range(STATUS_TRIES):
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
                if uid is not None and fresh["metadata"].get("uid") != uid:
                    return False  # a new object of this name: its own reconcile decides
            finalizers = list(fresh["metadata"].get("finalizers") or [])
            if (self.finalizer in finalizers) == present:
                return True
            if present and crd.is_deleting(fresh):
                return False
            finalizers = finalizers + [self.finalizer] if present else [f for f in finalizers if f != self.finalizer]
            patch = {"metadata": {"finalizers": finalizers, "resourceVersion": fresh["metadata"]["resourceVersion"]}}
            try:
                stored = self.custom.patch_namespaced_custom_object(crd.GROUP, crd.VERSION, key[0], crd.PLURAL, key[1],
                                                                   patch, field_manager=self.field_manager)
            except ApiException as e:
                if e.status == 404:
                    return False
                if e.status == 422 and present:
                    return False  # being deleted: no new finalizers
                if e.status != 409:
                    raise
                continue
            if stored.get("metadata"):
                self.rcs.store(stored)
            return True
        raise Transient(f"the finalizer patch still conflicts after {STATUS_TRIES} tries")

    def _post_event(self, pod: dict, reason: str, message: str, *, warning: bool = False) -> None:
        meta = pod["metadata"]
        now = crd.rfc3339(self.wall())
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


class _Run:
    """What one execution of a plan has gathered so far."""

    def __init__(self, key: Key, now: float):
        self.key = key
        self.now = now
        self.entries: dict[str, dict] = {}
        self.events: list[rc.Event] = []
        self.blocked: set[tuple[str, str | None]] = set()  # (pod, container) whose revert has not finished
        self.transient = False
        self.node_entry: dict | None = None  # this node's status.nodes entry, when it refuses the object
        self.drops: set[str] = set()  # pods whose entries this node stops writing


class _Stream:
    """A watch response as an iterator of events; ``close()`` returns the connection, ``abort()``
    (from another thread) breaks a read that is waiting."""

    def __init__(self, resp: Any):
        if not 200 <= resp.status <= 299:
            try:
                _check(resp)
            finally:
                resp.release_conn()
        self.resp = resp
        self.ended = False  # the server ended the watch: the response was read to its end

    def __iter__(self) -> Iterator[dict]:
        from kubernetes.watch.watch import iter_resp_lines

        for line in iter_resp_lines(self.resp):
            if line.strip():
                yield json.loads(line)
        self.ended = True

    def close(self) -> None:
        # urllib3's release_conn() puts the connection back in the pool as it is: one left in the
        # middle of a watch would hand the next request the rest of that watch to read (a list then
        # waited for the watch's timeout). Such a connection is closed first; the pool opens another.
        if not self.ended:
            self.resp.close()
        self.resp.release_conn()

    def abort(self) -> None:
        try:
            self.resp.shutdown() if hasattr(self.resp, "shutdown") else self.resp.close()
        except Exception:
            pass


def _status_text(e: Any) -> str:
    try:
        return json.loads(e.body).get("message", "")
    except (TypeError, ValueError):
        return str(e.reason)


def _key(obj: dict) -> Key:
    return obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def _policy_view(namespace: dict | None) -> tuple:
    """What of a Namespace the policy reads: its labels and annotations."""
    meta = (namespace or {}).get("metadata") or {}
    return namespace is None, meta.get("labels"), meta.get("annotations")


def _listing(resp: Any) -> tuple[list[dict], str]:
    _check(resp)
    data = json.loads(resp.data)
    return data.get("items") or [], data["metadata"]["resourceVersion"]


def _check(resp: Any) -> None:
    """Raise for an error answer (raw responses are not checked by the client): WatchExpired for
    410 Gone, WatchFailed for the rest."""
    if 200 <= resp.status <= 299:
        return
    body = resp.data.decode(errors="replace")
    try:
        reason = json.loads(body).get("message", body)
    except ValueError:
        reason = body
    if resp.status == 410:
        raise WatchExpired(reason)
    raise WatchFailed(resp.status, reason)
