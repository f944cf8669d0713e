"""The agent's gRPC front door: the ``Agent`` service (Apply, Revert, List) and grpc health, over the engine.

Requests are checked and turned into the engine's plain values here; engine errors become gRPC
status codes with the engine's one-line message as the details.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from daemonset.api.gen import agent_pb2, agent_pb2_grpc
from daemonset.types import (
    UNLIMITED,
    ApplyFailed,
    ApplyRequest,
    ApplyResult,
    Changes,
    Conflict,
    DamagedRecord,
    Denied,
    EngineError,
    ExperimentInfo,
    InvalidRequest,
    Method,
    QueueResult,
    Refused,
    ResolvedTarget,
    Resource,
    ResourceResult,
    RevertIncomplete,
    RevertRequest,
    RevertResult,
    RuntimeUnavailable,
    StepSpec,
    Target,
    TargetNotFound,
    TargetNotRunning,
)

log = logging.getLogger("chaos-agent.server")

SERVICE_NAME = "kubectl_chaos.agent.v1.Agent"

_CODE_BY_ERROR: dict[type[EngineError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    TargetNotFound: grpc.StatusCode.NOT_FOUND,
    TargetNotRunning: grpc.StatusCode.FAILED_PRECONDITION,
    Denied: grpc.StatusCode.PERMISSION_DENIED,
    Refused: grpc.StatusCode.FAILED_PRECONDITION,
    Conflict: grpc.StatusCode.ABORTED,
    ApplyFailed: grpc.StatusCode.INTERNAL,
    RuntimeUnavailable: grpc.StatusCode.UNAVAILABLE,
    RevertIncomplete: grpc.StatusCode.FAILED_PRECONDITION,
}

_METHOD_TO_PB = {
    Method.AUTO: agent_pb2.METHOD_AUTO,
    Method.CRI: agent_pb2.METHOD_CRI,
    Method.CGROUP: agent_pb2.METHOD_CGROUP,
    Method.NETLINK: agent_pb2.METHOD_NETLINK,
}
_METHOD_FROM_PB = {v: k for k, v in _METHOD_TO_PB.items()}
_RESOURCE_TO_PB = {
    Resource.CPU: agent_pb2.RESOURCE_CPU,
    Resource.MEMORY: agent_pb2.RESOURCE_MEMORY,
    Resource.INGRESS: agent_pb2.RESOURCE_INGRESS,
    Resource.EGRESS: agent_pb2.RESOURCE_EGRESS,
}


# --- conversions (pure) ------------------------------------------------------------------------

def target_from_pb(t: agent_pb2.Target) -> Target:
    return Target(namespace=t.namespace, pod=t.pod, container=t.container or None)


def apply_request_from_pb(req: agent_pb2.ApplyRequest) -> ApplyRequest:
    if not req.HasField("target"):
        raise InvalidRequest("target is missing; give namespace, pod and (if the pod has several) container")
    if req.method not in _METHOD_FROM_PB or req.method == agent_pb2.METHOD_NETLINK:
        raise InvalidRequest(f"method {req.method} is not accepted; accepted: METHOD_AUTO, METHOD_CRI, METHOD_CGROUP")
    return ApplyRequest(
        target=target_from_pb(req.target),
        changes=changes_from_pb(req.changes),
        steps=tuple(StepSpec(offset_s=s.offset_s, changes=changes_from_pb(s.changes)) for s in req.steps),
        duration_s=req.duration_s if req.HasField("duration_s") else None,
        method=_METHOD_FROM_PB[req.method],
        force=req.force,
        dry_run=req.dry_run,
        latency_s=req.latency_s if req.HasField("latency_s") else None,
    )


def changes_from_pb(c: agent_pb2.Changes) -> Changes:
    return Changes(
        cpu_millicpu=c.cpu_millicpu if c.HasField("cpu_millicpu") else None,
        memory_bytes=c.memory_bytes if c.HasField("memory_bytes") else None,
        ingress_bps=c.ingress_bps if c.HasField("ingress_bps") else None,
        egress_bps=c.egress_bps if c.HasField("egress_bps") else None,
    )


_CHANGE_FIELDS = {Resource.CPU: "cpu_millicpu", Resource.MEMORY: "memory_bytes", Resource.INGRESS: "ingress_bps",
                  Resource.EGRESS: "egress_bps"}


def changes_pb(values: dict[Resource, int]) -> agent_pb2.Changes:
    return agent_pb2.Changes(**{_CHANGE_FIELDS[r]: v for r, v in values.items()})


def quantity_pb(value: int, unknown: str = "") -> agent_pb2.Quantity:
    if unknown:
        return agent_pb2.Quantity(unknown=unknown)
    return agent_pb2.Quantity(unlimited=True) if value == UNLIMITED else agent_pb2.Quantity(value=value)


def resolved_pb(t: ResolvedTarget) -> agent_pb2.ResolvedTarget:
    return agent_pb2.ResolvedTarget(namespace=t.namespace, pod=t.pod, container=t.container,
                                    container_id=t.container_id, pod_uid=t.pod_uid, node_name=t.node_name)


def queue_pb(q: QueueResult) -> agent_pb2.Queue:
    out = agent_pb2.Queue(budget_s=q.budget_s, unknown=q.unknown)
    for name in ("limit_bytes", "limit_packets", "latency_s"):
        if getattr(q, name) is not None:
            setattr(out, name, getattr(q, name))
    return out


def resource_pb(r: ResourceResult) -> agent_pb2.ResourceResult:
    out = agent_pb2.ResourceResult(
        resource=_RESOURCE_TO_PB[r.resource], original=quantity_pb(r.original), previous=quantity_pb(r.previous),
        requested=quantity_pb(r.requested), in_force=quantity_pb(r.in_force, r.unknown), method=_METHOD_TO_PB[r.method],
    )
    if r.queue is not None:
        out.queue.CopyFrom(queue_pb(r.queue))
    return out


def apply_response_pb(res: ApplyResult) -> agent_pb2.ApplyResponse:
    out = agent_pb2.ApplyResponse(experiment_id=res.experiment_id, target=resolved_pb(res.target),
                                  resources=[resource_pb(r) for r in res.resources], dry_run=res.dry_run,
                                  created=res.created)
    if res.expires_at is not None:
        out.expires_at_unix_s = res.expires_at
    return out


def revert_response_pb(res: RevertResult) -> agent_pb2.RevertResponse:
    return agent_pb2.RevertResponse(target=resolved_pb(res.target), resources=[resource_pb(r) for r in res.resources],
                                    was_active=res.was_active, dry_run=res.dry_run, not_restored=list(res.not_restored))


def experiment_pb(e: ExperimentInfo) -> agent_pb2.Experiment:
    out = agent_pb2.Experiment(experiment_id=e.experiment_id, target=resolved_pb(e.target),
                               resources=[resource_pb(r) for r in e.resources], started_at_unix_s=e.started_at,
                               drift_corrections=e.drift_corrections, phase=e.phase.value,
                               owner="node-local" if e.owner.kind.value == "node-local" else e.owner.describe())
    if e.expires_at is not None:
        out.expires_at_unix_s = e.expires_at
    if e.steps_total:
        out.steps_total, out.step, out.step_note = e.steps_total, e.step, e.step_note
        if e.next_step_at is not None:
            out.next_step_at_unix_s = e.next_step_at
            out.next_step.CopyFrom(changes_pb(e.next_step))
    if e.failure is not None:
        out.failure = e.failure.reason
        out.attempts = e.failure.attempts
        if e.failure.next_retry_at is not None:
            out.next_retry_at_unix_s = e.failure.next_retry_at
    return out


def damaged_pb(d: DamagedRecord) -> agent_pb2.DamagedRecord:
    return agent_pb2.DamagedRecord(file=d.file, reason=d.reason, key=d.key, cleaned=list(d.cleaned))


# --- the service -------------------------------------------------------------------------------

class AgentService(agent_pb2_grpc.AgentServicer):
    def __init__(self, engine: Any):
        self.engine = engine

    def _fail(self, context: grpc.ServicerContext, err: Exception) -> None:
        if isinstance(err, EngineError):
            code = next((c for t, c in _CODE_BY_ERROR.items() if isinstance(err, t)), grpc.StatusCode.INTERNAL)
            context.abort(code, str(err))
        log.exception("unexpected error")
        context.abort(grpc.StatusCode.INTERNAL, f"agent error: {type(err).__name__}: {err}")

    def Apply(self, request: agent_pb2.ApplyRequest, context: grpc.ServicerContext) -> agent_pb2.ApplyResponse:  # noqa: N802
        try:
            return apply_response_pb(self.engine.apply(apply_request_from_pb(request)))
        except Exception as e:
            self._fail(context, e)
            raise  # unreachable: abort raises

    def Revert(self, request: agent_pb2.RevertRequest, context: grpc.ServicerContext) -> agent_pb2.RevertResponse:  # noqa: N802
        try:
            if not request.HasField("target"):
                raise InvalidRequest("target is missing; give namespace, pod and (if the pod has several) container")
            res = self.engine.revert(RevertRequest(target=target_from_pb(request.target), dry_run=request.dry_run,
                                                   force=request.force))
            return revert_response_pb(res)
        except Exception as e:
            self._fail(context, e)
            raise

    def List(self, request: agent_pb2.ListRequest, context: grpc.ServicerContext) -> agent_pb2.ListResponse:  # noqa: N802
        try:
            namespace = request.namespace or None
            return agent_pb2.ListResponse(experiments=[experiment_pb(e) for e in self.engine.list(namespace)],
                                          damaged=[damaged_pb(d) for d in self.engine.list_damaged(namespace)])
        except Exception as e:
            self._fail(context, e)
            raise


    def Observe(self, request: agent_pb2.ObserveRequest, context: grpc.ServicerContext):  # noqa: N802
        import time as _time

        from daemonset.observe import figures

        interval = request.interval_s or 2.0
        if not 0.2 <= interval <= 60:
            self._fail(context, InvalidRequest(f"interval_s {interval:g} is out of range; accepted: 0.2 to 60 seconds"))
        if request.count < 0:
            self._fail(context, InvalidRequest(f"count {request.count} is negative; accepted: 0 (until cancelled) or more"))
        namespace = request.namespace or None
        before = {info.experiment_id: (info, c, oom) for info, c, oom in self.engine.sample(namespace)}
        sent = 0
        while context.is_active() and (request.count == 0 or sent < request.count):
            deadline = _time.monotonic() + interval
            while context.is_active() and _time.monotonic() < deadline:
                _time.sleep(min(0.1, max(0.0, deadline - _time.monotonic())))
            if not context.is_active():
                return
            now = {info.experiment_id: (info, c, oom) for info, c, oom in self.engine.sample(namespace)}
            rows = []
            for eid, (info, after, oom0) in now.items():
                if eid not in before:
                    continue  # started during this interval: its figures come with the next one
                rows.append(observation_pb(info, figures(before[eid][1], after, oom_kills_at_start=oom0)))
            yield agent_pb2.ObserveResponse(at_unix_s=_time.time(), rows=rows)
            sent += 1
            before = now


def observation_pb(info: ExperimentInfo, f: Any) -> agent_pb2.Observation:
    out = agent_pb2.Observation(experiment=experiment_pb(info), interval_s=f.interval_s, errors=list(f.errors))
    for name, value in (("cpu_cores", f.cpu_cores), ("cpu_throttled_share", f.throttled_share),
                        ("memory_working_set_bytes", f.memory_working_set_bytes),
                        ("memory_limit_bytes", f.memory_limit_bytes), ("oom_kills", f.oom_kills),
                        ("ingress_bps", f.ingress_bps), ("ingress_drops", f.ingress_drops),
                        ("ingress_backlog_bytes", f.ingress_backlog_bytes), ("egress_bps", f.egress_bps),
                        ("egress_drops", f.egress_drops), ("egress_backlog_bytes", f.egress_backlog_bytes)):
        if value is not None:
            setattr(out, name, value)
    return out


# --- listening ---------------------------------------------------------------------------------

class ListenError(Exception):
    """The agent cannot listen where it was asked to."""


def unix_path(address: str) -> str | None:
    """The socket path of a ``unix://`` address (``unix:///run/x.sock`` or ``unix:/run/x.sock``), else None."""
    if address.startswith("unix://"):
        return address[len("unix://"):]
    if address.startswith("unix:"):
        return address[len("unix:"):]
    return None


def clear_stale_socket(path: str) -> None:
    """Remove a socket file a crashed agent left; refuse when another agent answers on it or it is no socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{path} exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: left over from a crash
            log.info("removed stale socket %s", path)
            return
    raise ListenError(f"another process is serving on {path}; stop it first")


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def serve(engine: Any, listen: str, *, tls: tuple[bytes, bytes, bytes] | None = None, max_workers: int = 32,
          node_local_api: bool = True) -> grpc.Server:
    """Start serving ``engine`` on ``listen``; returns the started server.

    A unix socket is created with mode 0600 (root only). A TCP address needs ``tls`` = (server
    certificate chain, private key, client CA): clients must present a certificate the CA signed.
    ``node_local_api=False`` serves grpc health only (cluster installs: requests come through the
    Kubernetes API and its RBAC; Apply/Revert/List answer UNIMPLEMENTED).
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="chaos-rpc"))
    if node_local_api:
        agent_pb2_grpc.add_AgentServicer_to_server(AgentService(engine), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    path = unix_path(listen)
    if path is not None:
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        clear_stale_socket(path)
        with _umask(0o177):
            port = server.add_insecure_port(f"unix://{path}")
        if port == 0:
            raise ListenError(f"cannot listen on unix socket {path}")
        os.chmod(path, 0o600)
    else:
        if tls is None:
            raise ListenError(
                f"listening on TCP ({listen}) needs TLS with client certificates (--tls-cert, --tls-key, --tls-client-ca);"
                " use a unix:// address otherwise"
            )
        cert, key, ca = tls
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
        try:
            port = server.add_secure_port(listen, creds)
        except RuntimeError as e:
            raise ListenError(f"cannot listen on {listen}: {e}") from e
        if port == 0:
            raise ListenError(f"cannot listen on {listen}")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if node_local_api:
        health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    server.health_servicer = health_servicer  # type: ignore[attr-defined]
    log.info("serving %s on %s", SERVICE_NAME if node_local_api else "grpc health only", listen)
    return server
