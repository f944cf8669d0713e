"""Cluster mode: requests travel as ResourceChaos objects through the Kubernetes API.

No route to the nodes is needed: the plugin creates (or updates) a ResourceChaos, the chaos-agent
of the target pod's node applies it and writes its status, and the plugin waits for that status
and prints it. ``--reset`` deletes the object and waits until the agent has reverted and let the
API server remove it. Everything is authorized by the cluster's RBAC.

The API is spoken through :mod:`plugin.backends.kubeclient` (standard library only): the
``kubernetes`` package costs 0.2-0.3 s to import and load a kubeconfig with, twice everything else
this command does. It is imported only for a kubeconfig the small client does not support (an
``auth-provider``, a ``proxy-url``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from daemonset import crd
from plugin.backends import (
    ApplyResult,
    BackendError,
    ChaosRequest,
    Connection,
    QueueReading,
    ResetResult,
    ResourceChange,
    TargetResult,
    kubeclient,
)

if TYPE_CHECKING:
    from plugin.backends.reports import ExperimentStatus, TopRow

AGENT_NAMESPACE = "kubectl-chaos"
AGENT_SELECTOR = "app.kubernetes.io/component=chaos-agent"


def connect(conn: Connection) -> ClusterBackend:
    return ClusterBackend(conn)


class ClusterBackend:
    """The Backend protocol over the Kubernetes API (see plugin.backends)."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.timeout_s = conn.timeout_s
        try:
            try:
                config = kubeclient.KubeConfig(conn.kubeconfig, conn.context)
                self.api: Any = kubeclient.Client(config)
                self._namespace = config.namespace
            except kubeclient.Unsupported:
                self.api = _Kube.from_kubeconfig(conn)
                self._namespace = _kubeconfig_namespace(conn)
        except (kubeclient.ConfigError, ValueError) as e:
            raise BackendError(f"cannot use the kubeconfig ({conn.kubeconfig or 'KUBECONFIG or ~/.kube/config'}"
                               f"{', context ' + conn.context if conn.context else ''}): {e}") from None

    def default_namespace(self) -> str:
        return self._namespace

    def close(self) -> None:
        self.api.close()

    # -- the Backend protocol ----------------------------------------------------------------------

    def apply(self, req: ChaosRequest) -> ApplyResult:
        namespace = req.namespace or self._namespace
        with _api_errors(self):
            pods = self._target_pods(namespace, req)
            containers: dict[str, str] = {}
            failed: list[TargetResult] = []
            for pod in pods:
                try:
                    containers[pod["metadata"]["name"]] = crd.choose_container(pod, req.container)
                except crd.SpecError as e:
                    if req.pod is not None:
                        raise BackendError(str(e)) from None
                    failed.append(TargetResult(namespace, pod["metadata"]["name"], req.container or "",
                                               node=_node(pod), error=str(e)))
            pods = [p for p in pods if p["metadata"]["name"] in containers]
            if not pods:
                raise BackendError(f"no pod matching -l {req.selector} in {namespace} has the container: "
                                   + "; ".join(t.error or "" for t in failed))
            if len(pods) > crd.MAX_TARGETS:
                raise BackendError(f"-l {req.selector} matches {len(pods)} pods in {namespace}; one ResourceChaos "
                                   f"changes at most {crd.MAX_TARGETS}: narrow the selector or split it")
            spec = crd.ChaosSpec(
                pod=req.pod, selector=crd.parse_selector(req.selector) if req.selector else None,
                container=containers[req.pod] if req.pod else req.container,
                cpu_millicpu=req.cpu_millicpu, memory_bytes=req.memory_bytes, bandwidth_bps=req.bandwidth_bps,
                direction=req.direction, duration_s=req.duration_s, method=req.method, force=req.force,
                request_id=os.urandom(8).hex(), profile=_profile(req), latency_s=req.latency_s)
            try:
                crd.ChaosSpec.from_dict(spec.to_dict())  # the agents' own checks, before anything is sent
            except crd.SpecError as e:
                raise BackendError(str(e)) from None
            existing = self._find(namespace, req, spec.container)
            if existing is not None and crd.is_deleting(existing):
                raise BackendError(f"ResourceChaos {namespace}/{existing['metadata']['name']} is being reset; "
                                   "try again when it is gone")
            if req.dry_run:
                return self._dry_run(namespace, req, spec, pods, containers, existing, failed)
            created = existing is None
            if created:
                body = crd.build(namespace, spec, name=crd.object_name(req.pod, spec.container) if req.pod else None,
                                 owners=_owners(req, pods), selector_text=req.selector)
                obj = self.api.request("POST", _chaos_path(namespace), body=body)
            else:
                obj = self.api.request("PATCH", _chaos_path(namespace, existing["metadata"]["name"]),
                                       body={"metadata": {"resourceVersion": existing["metadata"]["resourceVersion"]},
                                             "spec": _spec_patch(spec)},
                                       content_type="application/merge-patch+json")
            name = obj["metadata"]["name"]
            generation = obj["metadata"].get("generation", 1)
            expected = {p["metadata"]["name"]: p for p in pods}

            def answered(o: dict) -> bool:
                return all(_answered(crd.target_entry(o.get("status"), name), generation)
                           or _refused(o.get("status"), pod, generation) for name, pod in expected.items())

            final, timed_out = self._wait(namespace, name, obj, answered)
            status = (final or {}).get("status") or {}
            results = list(failed)
            missing = []
            for pod_name, pod in expected.items():
                entry = crd.target_entry(status, pod_name)
                refused = _refused(status, pod, generation)
                if refused and not _answered(entry, generation):
                    results.append(TargetResult(namespace, pod_name, containers[pod_name], node=_node(pod),
                                                experiment_id=f"{namespace}/{name}", error=refused))
                    continue
                if not _answered(entry, generation):
                    missing.append(pod)
                    results.append(TargetResult(namespace, pod_name, containers[pod_name], node=_node(pod),
                                                experiment_id=f"{namespace}/{name}",
                                                error=_no_answer(pod, entry, self.timeout_s)))
                    continue
                before = crd.target_entry((existing or {}).get("status"), pod_name) if existing else None
                result = _target_result(namespace, name, entry, crd.spec_of(final or obj), before)
                # Changed one in force: this pod's entry showed the same experiment of the engine in force.
                changed = before is not None and before.get("phase") in (crd.APPLIED, crd.REVERTING) \
                    and before.get("experimentId") == entry.get("experimentId") and not created
                results.append(dataclasses.replace(result, created=None if result.error else not changed))
            if req.pod is not None:
                result = results[0]
                if result.error:
                    if created:
                        self._delete_quietly(namespace, name)
                        suffix = "; removed the ResourceChaos again" if missing else ""
                    else:
                        suffix = ""
                    raise BackendError(result.error + suffix)
            return ApplyResult(targets=tuple(results))

    def reset(self, req: ChaosRequest) -> ResetResult:
        namespace = req.namespace or self._namespace
        with _api_errors(self):
            found = self._experiments(namespace, req)
            if not found:
                what = f"pod {namespace}/{req.pod}" + (f" container {req.container}" if req.container else "") \
                    if req.pod else f"-l {req.selector} in {namespace}"
                raise BackendError(f"no experiment on {what} to reset (kubectl chaos status -n {namespace} lists them)")
            results: list[TargetResult] = []
            for obj in found:
                name = obj["metadata"]["name"]
                if req.dry_run:
                    results.extend(_reset_results(namespace, obj, obj, dry_run=True))
                    continue
                self.api.request("DELETE", _chaos_path(namespace, name))
                last, timed_out = self._wait(namespace, name, obj, lambda o: False, until_deleted=True)
                if timed_out:
                    nodes = sorted({e.get("node", "?") for e in (last.get("status") or {}).get("targets") or []})
                    raise BackendError(
                        f"ResourceChaos {namespace}/{name} is marked for deletion, but the chaos-agent on node "
                        f"{', '.join(nodes) or '?'} did not revert within {self.timeout_s:g}s; it reverts when that "
                        f"agent runs again ({_agent_hint(nodes[0] if nodes else '')})")
                results.extend(_reset_results(namespace, obj, last, dry_run=False))
            return ResetResult(targets=tuple(results), dry_run=req.dry_run)

    def status(self, namespace: str | None) -> Sequence[ExperimentStatus]:
        from plugin.backends.reports import ExperimentStatus

        with _api_errors(self):
            listing = self.api.request("GET", _chaos_path(namespace))
        out = []
        for obj in listing["items"]:
            ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
            try:
                spec = crd.spec_of(obj)
            except crd.SpecError:
                continue
            requested = spec.requested()
            started = _parse_time(obj["metadata"].get("creationTimestamp"))
            entries = (obj.get("status") or {}).get("targets") or []
            target = spec.pod or f"-l {crd.selector_text(spec.selector or {})}"
            for refusal in (obj.get("status") or {}).get("nodes") or []:
                if refusal.get("phase") == crd.FAILED and not refusal.get("targets"):
                    out.append(ExperimentStatus(ns, target, spec.container or "", node=refusal.get("node"),
                                                experiment_id=f"{ns}/{name}", started_at=started, state="failed",
                                                message=refusal.get("message", "")))
            if not entries:
                if not (obj.get("status") or {}).get("nodes"):
                    out.append(ExperimentStatus(ns, target, spec.container or "", experiment_id=f"{ns}/{name}",
                                                started_at=started, state="pending",
                                                message="no chaos-agent has answered yet"))
                continue
            for entry in entries:
                out.append(_entry_status(obj, entry, requested))
        return out

    def top(self, namespace: str | None, interval_s: float, count: int) -> Iterator[list[TopRow]]:
        """``kubectl chaos top`` through the API: mark the objects shown as watched (the
        kubectl-chaos.io/watch-until annotation, refreshed while this runs), and read the figures
        their agents publish into ``status.observed`` until that time (daemonset.watch). One list of
        rows per ``interval_s`` (``count`` of them; 0 = until interrupted); the mark is taken off at
        the end, so the agents stop writing at once."""
        marks: dict[tuple[str, str], str] = {}  # the marks this command wrote, by object
        try:
            shown = 0
            while True:
                with _api_errors(self):
                    objects = self._mark_active(namespace, marks)
                    if shown == 0 and objects:
                        # The agents need two samples for a rate: wait for their first figures.
                        wait_s = self.timeout_s if count == 1 else min(self.timeout_s, 10.0)
                        objects = self._wait_figures(namespace, objects, marks, wait_s)
                yield [row for obj in objects for row in _top_rows(obj, marks.get(_key(obj), ""))]
                shown += 1
                if count and shown >= count:
                    return
                time.sleep(interval_s)
        finally:
            self._unmark(marks)

    def _mark_active(self, namespace: str | None, marks: dict[tuple[str, str], str]) -> list[dict]:
        """The objects with a target in force, each marked watched for the next WATCH_WINDOW_S (a
        mark with more than half its window left is kept: one patch per object every ~15 s)."""
        from daemonset import watch

        now = time.time()
        objects = []
        for obj in self.api.request("GET", _chaos_path(namespace))["items"]:
            if not any(e.get("phase") in (crd.APPLIED, crd.REVERTING) for e in
                       (obj.get("status") or {}).get("targets") or []) or crd.is_deleting(obj):
                continue
            mark = watch.mark_of(obj)
            until = watch.mark_until(mark) if mark else None
            if until is None or until < now + WATCH_WINDOW_S / 2:
                mark = crd.rfc3339(now + WATCH_WINDOW_S)
                meta = obj["metadata"]
                # Noted before the patch goes out: an interrupt while its answer is read must still
                # take off a mark the server has already written.
                marks.setdefault(_key(obj), mark)
                try:
                    obj = self.api.request("PATCH", _chaos_path(meta["namespace"], meta["name"]),
                                           body={"metadata": {"annotations": {watch.WATCH_ANNOTATION: mark}}},
                                           content_type="application/merge-patch+json")
                except ApiError as e:
                    if e.status == 404:
                        continue
                    raise
            marks.setdefault(_key(obj), mark)  # the first mark: figures answering it or a later one count
            objects.append(obj)
        return objects

    def _wait_figures(self, namespace: str | None, objects: list[dict], marks: dict[tuple[str, str], str],
                      wait_s: float) -> list[dict]:
        deadline = time.monotonic() + wait_s
        while True:
            if all(row.errors == () or not row.errors[0].startswith(_NO_FIGURES)
                   for obj in objects for row in _top_rows(obj, marks.get(_key(obj), ""))):
                return objects
            if time.monotonic() >= deadline:
                return objects
            time.sleep(0.5)
            fresh = {_key(o): o for o in self.api.request("GET", _chaos_path(namespace))["items"]}
            objects = [fresh[_key(o)] for o in objects if _key(o) in fresh]

    def _unmark(self, marks: dict[tuple[str, str], str]) -> None:
        """Take our marks off (unless someone else's newer one replaced it); best effort."""
        from daemonset import watch

        for (namespace, name), _ in marks.items():
            try:
                obj = self.api.request("GET", _chaos_path(namespace, name))
                if watch.mark_until(watch.mark_of(obj)) is None or \
                        watch.mark_of(obj) > crd.rfc3339(time.time() + WATCH_WINDOW_S):
                    continue  # someone else's mark, further ahead than any of ours
                self.api.request("PATCH", _chaos_path(namespace, name), body={"metadata": {
                    "resourceVersion": obj["metadata"]["resourceVersion"],
                    "annotations": {watch.WATCH_ANNOTATION: None}}}, content_type="application/merge-patch+json")
            except Exception:  # noqa: BLE001 - the mark runs out by itself within WATCH_WINDOW_S
                pass

    # -- helpers -----------------------------------------------------------------------------------

    def _target_pods(self, namespace: str, req: ChaosRequest) -> list[dict]:
        if req.pod is not None:
            try:
                pod = self.api.request("GET", f"/api/v1/namespaces/{namespace}/pods/{req.pod}")
            except ApiError as e:
                if e.status != 404:
                    raise
                raise BackendError(f"pod {namespace}/{req.pod} not found; {self._pods_hint(namespace)}") from None
            _check_running(pod)
            return [pod]
        try:
            crd.parse_selector(req.selector or "")
        except crd.SpecError as e:
            raise BackendError(str(e)) from None
        listing = self.api.request("GET", f"/api/v1/namespaces/{namespace}/pods", query={"labelSelector": req.selector})
        pods = [p for p in listing["items"] if not p["metadata"].get("deletionTimestamp")]
        if not pods:
            raise BackendError(f"no pod in {namespace} matches -l {req.selector}; {self._pods_hint(namespace)}")
        unscheduled = [p["metadata"]["name"] for p in pods if not (p.get("spec") or {}).get("nodeName")]
        if len(unscheduled) == len(pods):
            raise BackendError(f"no pod matching -l {req.selector} is on a node yet: {', '.join(unscheduled)}")
        return [p for p in pods if (p.get("spec") or {}).get("nodeName")]

    def _pods_hint(self, namespace: str) -> str:
        try:
            names = sorted(p["metadata"]["name"] for p in
                           self.api.request("GET", f"/api/v1/namespaces/{namespace}/pods")["items"])
        except Exception:
            return f"(cannot list the pods of {namespace})"
        if not names:
            return f"namespace {namespace} has no pods"
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        return f"pods in {namespace}: {shown}"

    def _list_experiments(self, namespace: str) -> list[dict]:
        return self.api.request("GET", _chaos_path(namespace))["items"]

    def _find(self, namespace: str, req: ChaosRequest, container: str | None) -> dict | None:
        """The ResourceChaos this request continues: same pod and container, or the same selector."""
        if req.pod is not None:
            try:
                return self.api.request("GET", _chaos_path(namespace, crd.object_name(req.pod, container)))
            except ApiError as e:
                if e.status == 404:
                    return None
                raise
        found = self._experiments(namespace, req)
        return found[0] if found else None

    def _experiments(self, namespace: str, req: ChaosRequest) -> list[dict]:
        out = []
        wanted = crd.selector_text(crd.parse_selector(req.selector)) if req.selector else None
        for obj in self._list_experiments(namespace):
            target = (obj.get("spec") or {}).get("target") or {}
            if req.pod is not None:
                if target.get("pod") == req.pod and (
                        req.container is None or (obj.get("spec") or {}).get("container") == req.container):
                    out.append(obj)
            elif target.get("selector") is not None and crd.selector_text(target["selector"]) == wanted:
                out.append(obj)
        return out

    def _wait(self, namespace: str, name: str, obj: dict, done, *, until_deleted: bool = False) -> tuple[dict, bool]:
        """Watch the object until ``done(obj)`` (or it is deleted); (last object seen, timed out?)."""
        deadline = time.monotonic() + self.timeout_s
        last = obj
        rv = obj["metadata"]["resourceVersion"]
        if not until_deleted and done(obj):
            return obj, False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return last, True
            expired = False
            resp = self.api.request("GET", _chaos_path(namespace), stream=True, timeout_s=left + 10, query={
                "fieldSelector": f"metadata.name={name}", "watch": "true", "resourceVersion": rv,
                "timeoutSeconds": str(max(1, math.ceil(left)))})
            try:
                for line in resp.lines():
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    current = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        if current.get("code") != 410:
                            raise ApiError(current.get("code", 500), current.get("message", "watch failed"))
                        expired = True  # our resource version is too old: read the object afresh
                        break
                    rv = current["metadata"].get("resourceVersion", rv)
                    if event["type"] == "DELETED":
                        return (current if current.get("status") else last), False
                    last = current
                    if not until_deleted and done(current):
                        return current, False
            finally:
                resp.close()
            if expired:
                try:
                    last = self.api.request("GET", _chaos_path(namespace, name))
                except ApiError as e:
                    if e.status == 404 and until_deleted:
                        return last, False
                    raise
                rv = last["metadata"]["resourceVersion"]
                if not until_deleted and done(last):
                    return last, False

    def _dry_run(self, namespace: str, req: ChaosRequest, spec: crd.ChaosSpec, pods: list[dict],
                 containers: dict[str, str], existing: dict | None, failed: list[TargetResult]) -> ApplyResult:
        if existing is None:
            body = crd.build(namespace, spec, name=crd.object_name(req.pod, spec.container) if req.pod else None,
                             owners=_owners(req, pods), selector_text=req.selector)
            self.api.request("POST", _chaos_path(namespace), body=body, query={"dryRun": "All"})
        results = list(failed)
        for pod in pods:
            pod_name = pod["metadata"]["name"]
            changes = tuple(ResourceChange(resource, None, value, None, req.method,
                                           message="dry run: the API server accepted it; no agent was asked")
                            for resource, value in spec.requested().items())
            results.append(TargetResult(namespace, pod_name, containers[pod_name], changes=changes, node=_node(pod)))
        return ApplyResult(targets=tuple(results), dry_run=True)

    def _delete_quietly(self, namespace: str, name: str) -> None:
        try:
            self.api.request("DELETE", _chaos_path(namespace, name))
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------
# HTTP


ApiError = kubeclient.ApiError


class _Kube:
    """The same requests through the ``kubernetes`` package's ApiClient, for kubeconfigs the small
    client does not support (its auth providers and proxies). Only its transport is used:
    ``CoreV1Api`` alone takes about 0.6 s to import (it builds hundreds of models)."""

    def __init__(self, client: Any):
        self.client = client
        self.host = client.configuration.host

    @classmethod
    def from_kubeconfig(cls, conn: Connection) -> _Kube:
        from kubernetes import config

        try:
            client = config.new_client_from_config(config_file=conn.kubeconfig, context=conn.context)
        except config.ConfigException as e:
            raise kubeclient.ConfigError(str(e)) from None
        client.configuration.retries = 1  # fail fast on an unreachable API server
        return cls(client)

    def request(self, method: str, path: str, *, query: dict[str, str] | None = None, body: Any = None,
                content_type: str = "application/json", stream: bool = False, timeout_s: float | None = None) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, body, _ = self.client.param_serialize(
            method, path, query_params=list((query or {}).items()) or None, header_params=headers, body=body,
            auth_settings=["BearerToken"])
        resp = self.client.call_api(method, url, headers, body,
                                    _request_timeout=(10, timeout_s) if timeout_s else (10, 60))
        if not 200 <= resp.status <= 299:
            raise ApiError(resp.status, kubeclient.status_message(resp.read()))
        if stream:
            return _Urllib3Stream(resp.response)
        return json.loads(resp.read())

    def close(self) -> None:
        self.client.close()


class _Urllib3Stream:
    """A watch response of the ``kubernetes`` package's transport, as a kubeclient.Stream."""

    def __init__(self, resp: Any):
        self.resp = resp

    def lines(self):
        from plugin.backends.kubeclient import split_lines

        return split_lines(self.resp.stream(amt=None, decode_content=False))

    def close(self) -> None:
        self.resp.release_conn()


# How far ahead top marks what it shows as watched; refreshed when half of it is left.
WATCH_WINDOW_S = 30.0
_NO_FIGURES = "no figures yet"


def _key(obj: dict) -> tuple[str, str]:
    return obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def _step_text(entry: dict) -> str:
    """A target's profile progress as node-local status says it: ``step 3/10, next cpu 700m at 12:00:30Z``."""
    profile = entry.get("profile") or {}
    if not profile.get("steps"):
        return ""
    text = f"step {profile.get('step', '?')}/{profile['steps']}"
    if profile.get("nextStepAt"):
        when = _parse_time(profile["nextStepAt"])
        values = ", ".join(f"{resource} {_plain(resource, value)}" for resource, value in
                           (profile.get("next") or {}).items())
        text += f", next {values} at {when:%H:%M:%SZ}" if when else ""
    if profile.get("note"):
        text += f"; {profile['note']}"
    return text


def _plain(resource: str, value: int | None) -> str:
    if value is None:
        return "unlimited"
    return f"{value}m" if resource == "cpu" else str(value)


def _queue(status: Any) -> QueueReading | None:
    """A status change's ``queue`` (written by the agent from the kernel's reading); None without one."""
    if not isinstance(status, dict) or not isinstance(status.get("budgetSeconds"), int | float):
        return None
    return QueueReading(budget_s=status["budgetSeconds"], limit_bytes=status.get("limitBytes"),
                        limit_packets=status.get("limitPackets"), latency_s=status.get("latencySeconds"),
                        unknown=status.get("unknown") or "")


def _entry_status(obj: dict, entry: dict, requested: dict[str, int]) -> ExperimentStatus:
    from plugin.backends.reports import ExperimentStatus

    ns, name = _key(obj)
    changes = tuple(
        ResourceChange(c["resource"], c.get("original"), requested.get(c["resource"]), c.get("applied"),
                       c.get("method", ""), _parse_time(entry.get("expiresAt")), queue=_queue(c.get("queue")))
        for c in entry.get("changes") or [])
    state = entry["phase"].lower()
    if crd.is_deleting(obj) and state == "applied":
        state = "reverting"
    message = "; ".join(m for m in (_step_text(entry), entry.get("message", "")) if m)
    return ExperimentStatus(ns, entry["pod"], entry.get("container", ""), changes=changes, node=entry.get("node"),
                            experiment_id=f"{ns}/{name}",
                            started_at=_parse_time(obj["metadata"].get("creationTimestamp")), state=state,
                            message=message)


def _top_rows(obj: dict, mark: str) -> list[TopRow]:
    """One row per target in force, with the figures its agent published for a mark at least as
    late as ``mark`` (earlier ones are an older watch's)."""
    from plugin.backends.reports import TopRow

    try:
        requested = crd.spec_of(obj).requested()
    except crd.SpecError:
        return []
    status = obj.get("status") or {}
    observed = {e.get("pod"): e for e in status.get("observed") or []}
    rows = []
    for entry in status.get("targets") or []:
        if entry.get("phase") not in (crd.APPLIED, crd.REVERTING):
            continue
        figures = observed.get(entry["pod"])
        if figures is None or (figures.get("watchUntil") or "") < mark:
            rows.append(TopRow(status=_entry_status(obj, entry, requested), interval_s=0.0,
                               errors=(f"{_NO_FIGURES} from the chaos-agent on node {entry.get('node', '?')}",)))
            continue
        rows.append(TopRow(
            status=_entry_status(obj, entry, requested), interval_s=figures.get("intervalSeconds") or 0.0,
            cpu_cores=figures.get("cpuCores"), cpu_throttled_share=figures.get("cpuThrottledShare"),
            memory_working_set_bytes=figures.get("memoryWorkingSetBytes"),
            memory_limit_bytes=figures.get("memoryLimitBytes"), oom_kills=figures.get("oomKills"),
            ingress_bps=figures.get("ingressBitsPerSecond"), ingress_drops=figures.get("ingressDrops"),
            ingress_backlog_bytes=figures.get("ingressBacklogBytes"),
            egress_bps=figures.get("egressBitsPerSecond"), egress_drops=figures.get("egressDrops"),
            egress_backlog_bytes=figures.get("egressBacklogBytes"), errors=tuple(figures.get("errors") or ())))
    return rows


def _chaos_path(namespace: str | None, name: str | None = None) -> str:
    base = f"/apis/{crd.GROUP}/{crd.VERSION}"
    path = f"{base}/namespaces/{namespace}/{crd.PLURAL}" if namespace else f"{base}/{crd.PLURAL}"
    return f"{path}/{name}" if name else path


# ---------------------------------------------------------------------------------------------
# Pure helpers


def _kubeconfig_namespace(conn: Connection) -> str:
    from kubernetes import config

    contexts, active = config.list_kube_config_contexts(config_file=conn.kubeconfig)
    if conn.context:
        chosen = next((c for c in contexts if c["name"] == conn.context), None)
        if chosen is None:
            raise config.ConfigException(f"context {conn.context!r} not found; contexts: "
                                         + ", ".join(c["name"] for c in contexts))
    else:
        chosen = active
    return ((chosen or {}).get("context") or {}).get("namespace") or "default"


def _owners(req: ChaosRequest, pods: list[dict]) -> list[dict]:
    """The pods that own a new ResourceChaos: the target pod, so deleting it deletes its experiment.

    A selector experiment has no owner: it applies to every pod that matches, also pods that come
    later (a rollout's new pods), until --reset or its duration. Owned by the pods matching when it
    was created, the garbage collector would delete it once those were all replaced, and revert
    the newer pods with it.
    """
    return pods if req.pod is not None else []


def _spec_patch(spec: crd.ChaosSpec) -> dict:
    """A merge patch that sets what this request asks and keeps the rest of the running experiment.

    Without --duration it removes ``durationSeconds``: the agent then keeps the end time already in
    force (as node-local mode does) instead of counting the old duration again from now. Its new
    ``requestId`` makes even an identical request a new generation, which the agents answer afresh.
    """
    patch = spec.to_dict()
    patch.pop("target", None)
    if spec.duration_s is None:
        patch["durationSeconds"] = None
    if not spec.profile:
        patch["profile"] = None  # a change without a range ends the profile in force
    return patch


def _profile(req: ChaosRequest) -> tuple[crd.ProfileRow, ...]:
    """The request's later steps as ``spec.profile`` rows (offsets rounded to milliseconds)."""
    return tuple(crd.ProfileRow(after_s=round(step.offset_s, 3), cpu_millicpu=step.cpu_millicpu,
                                memory_bytes=step.memory_bytes, bandwidth_bps=step.bandwidth_bps)
                 for step in req.steps)


def _answered(entry: dict | None, generation: int) -> bool:
    return bool(entry) and entry.get("observedGeneration", 0) >= generation and entry.get("phase") in crd.TERMINAL


def _refused(status: dict | None, pod: dict, generation: int) -> str:
    """The message of the pod's node when its agent refused the object as a whole ("" if it did not)."""
    entry = crd.node_entry(status, _node(pod) or "")
    if entry and entry.get("phase") == crd.FAILED and entry.get("observedGeneration", 0) >= generation:
        return entry.get("message") or "refused by the chaos-agent"
    return ""


def _node(pod: dict) -> str | None:
    return (pod.get("spec") or {}).get("nodeName")


def _check_running(pod: dict) -> None:
    name = f"{pod['metadata'].get('namespace')}/{pod['metadata']['name']}"
    if not _node(pod):
        raise BackendError(f"pod {name} is not scheduled on a node yet")
    phase = (pod.get("status") or {}).get("phase")
    if phase != "Running":
        raise BackendError(f"pod {name} is {phase or 'not running'}; its containers must be running to change them")


def _agent_hint(node: str) -> str:
    selector = f" --field-selector spec.nodeName={node}" if node else ""
    return f"kubectl -n {AGENT_NAMESPACE} get pods -l {AGENT_SELECTOR} -o wide{selector}"


def _no_answer(pod: dict, entry: dict | None, timeout_s: float) -> str:
    node = _node(pod) or "?"
    if entry and entry.get("phase") == crd.PENDING:
        return f"the chaos-agent on node {node} is waiting: {entry.get('message', '')} (after {timeout_s:g}s)"
    return (f"no answer from the chaos-agent on node {node} within {timeout_s:g}s; is it running there? "
            f"({_agent_hint(node)})")


def _parse_time(text: str | None) -> datetime.datetime | None:
    try:
        return crd.parse_rfc3339(text)
    except ValueError:
        return None


def _target_result(namespace: str, name: str, entry: dict, spec: crd.ChaosSpec, before: dict | None) -> TargetResult:
    """One pod's answer; ``before`` is its status entry before this request (a change on top of another)."""
    requested = spec.requested()
    expires = _parse_time(entry.get("expiresAt"))
    was = {c["resource"]: c.get("applied") for c in (before or {}).get("changes") or []
           if (before or {}).get("phase") == crd.APPLIED}
    changes = tuple(ResourceChange(c["resource"], was.get(c["resource"], c.get("original")),
                                   requested.get(c["resource"]), c.get("applied"), c.get("method", ""), expires,
                                   queue=_queue(c.get("queue")))
                    for c in entry.get("changes") or [])
    # Reverted as the answer to this request: the experiment had ended (expired) before it arrived.
    error = (entry.get("message") or entry["phase"].lower()) if entry["phase"] in (crd.FAILED, crd.REVERTED) \
        else None
    return TargetResult(namespace, entry["pod"], entry.get("container", ""), changes=changes, node=entry.get("node"),
                        experiment_id=f"{namespace}/{name}", error=error)


def _reset_results(namespace: str, before: dict, last: dict, *, dry_run: bool) -> list[TargetResult]:
    name = before["metadata"]["name"]
    final = {e["pod"]: e for e in (last.get("status") or {}).get("targets") or []}
    results = []
    for entry in (before.get("status") or {}).get("targets") or []:
        after = final.get(entry["pod"], entry)
        changes = tuple(ResourceChange(c["resource"], c.get("applied"), c.get("original"),
                                       None if dry_run else c.get("restored", c.get("original")), c.get("method", ""))
                        for c in after.get("changes") or entry.get("changes") or [])
        error = None
        if not dry_run and after.get("phase") not in (crd.REVERTED, crd.FAILED):
            error = f"no revert reported by the chaos-agent on node {after.get('node', '?')}"
        results.append(TargetResult(namespace, entry["pod"], entry.get("container", ""), changes=changes,
                                    node=entry.get("node"), experiment_id=f"{namespace}/{name}", error=error))
    return results


class _api_errors:
    """Turn Kubernetes client errors into one-line BackendErrors."""

    def __init__(self, backend: ClusterBackend):
        self.backend = backend

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, BackendError):
            return False
        import sys

        host = self.backend.api.host
        network: tuple[type[BaseException], ...] = (OSError,)  # ssl.SSLError and kubeclient's are OSErrors
        if "urllib3.exceptions" in sys.modules:  # the kubernetes package's transport is in use
            network += (sys.modules["urllib3.exceptions"].HTTPError,)
        if isinstance(exc, ApiError):
            message = exc.message
            if exc.status == 401:
                raise BackendError(f"the API server at {host} does not accept these credentials (401): {message}") \
                    from None
            if exc.status == 403:
                raise BackendError(f"not allowed: {message}") from None
            if exc.status == 404 and "could not find the requested resource" in str(message):
                raise BackendError(f"{message}; is kubectl-chaos installed on this cluster? "
                                   "(kubectl apply -k daemonset/manifests)") from None
            raise BackendError(f"the API server at {host} answered {exc.status}: {message}") from None
        if isinstance(exc, network):
            raise BackendError(f"cannot reach the Kubernetes API at {host}: {exc}") from None
        return False
