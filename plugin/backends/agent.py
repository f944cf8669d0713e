"""Node-local backend: talk to one node's chaos-agent over its gRPC API (``--agent-address``).

grpc and the generated stubs are imported in ``connect`` only, so ``kubectl-chaos --help`` does not
pay for them; nothing here imports ``kubernetes``.

For a TCP address the agent requires TLS with a client certificate: give the files in
``KUBECTL_CHAOS_TLS_CA``, ``KUBECTL_CHAOS_TLS_CERT`` and ``KUBECTL_CHAOS_TLS_KEY``.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from plugin.backends import (
    RESOURCE_BANDWIDTH_EGRESS,
    RESOURCE_BANDWIDTH_INGRESS,
    RESOURCE_CPU,
    RESOURCE_MEMORY,
    ApplyResult,
    ChaosRequest,
    Connection,
    QueueReading,
    ResetResult,
    ResourceChange,
    TargetResult,
)
from plugin.errors import BackendError, UsageError, one_line

if TYPE_CHECKING:
    from plugin.backends.reports import ExperimentStatus, TopRow

# What gRPC says when nothing answers at the address (as opposed to an agent answering UNAVAILABLE
# because the container runtime does not).
_TRANSPORT_FAILURES = ("failed to connect", "Connection refused", "No such file", "Socket closed", "connection reset",
                       "Permission denied", "DNS resolution failed")
# ... and what it says when the agent went away in the middle of a call.
_CUT_OFF = ("Stream removed", "Broken pipe", "EOF")
_TOP_FIGURES = ("cpu_cores", "cpu_throttled_share", "memory_working_set_bytes", "memory_limit_bytes", "oom_kills",
                "ingress_bps", "ingress_drops", "ingress_backlog_bytes", "egress_bps", "egress_drops",
                "egress_backlog_bytes")
_TLS_ENV = ("KUBECTL_CHAOS_TLS_CA", "KUBECTL_CHAOS_TLS_CERT", "KUBECTL_CHAOS_TLS_KEY")


def connect(conn: Connection) -> AgentBackend:
    return AgentBackend(conn)


def _queue(r: Any) -> QueueReading | None:
    if not r.HasField("queue"):
        return None
    q = r.queue
    return QueueReading(budget_s=q.budget_s, unknown=q.unknown,
                        **{n: getattr(q, n) if q.HasField(n) else None
                           for n in ("limit_bytes", "limit_packets", "latency_s")})


def _when(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


class AgentBackend:
    """The plugin's Backend over the agent's Apply / Revert / List."""

    def __init__(self, conn: Connection):
        import grpc

        from daemonset.api.gen import agent_pb2, agent_pb2_grpc

        assert conn.agent_address is not None
        self._grpc = grpc
        self._pb = agent_pb2
        self.address = conn.agent_address
        self.timeout_s = conn.timeout_s
        target = self.address.grpc_target
        if self.address.scheme == "unix":
            self._channel = grpc.insecure_channel(target)
        else:
            missing = [v for v in _TLS_ENV if not os.environ.get(v)]
            if missing:
                raise UsageError(
                    f"the agent at {target} is reached over TCP, which needs TLS with a client certificate: "
                    f"set {', '.join(missing)} (or use a unix:// address on the node)"
                )
            try:
                ca, cert, key = (pathlib.Path(os.environ[v]).read_bytes() for v in _TLS_ENV)
            except OSError as e:
                raise UsageError(f"cannot read a TLS file for the agent at {target}: {e}") from None
            creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
            self._channel = grpc.secure_channel(target, creds)
        self._stub = agent_pb2_grpc.AgentStub(self._channel)
        self._resource_names = {
            agent_pb2.RESOURCE_CPU: RESOURCE_CPU,
            agent_pb2.RESOURCE_MEMORY: RESOURCE_MEMORY,
            agent_pb2.RESOURCE_INGRESS: RESOURCE_BANDWIDTH_INGRESS,
            agent_pb2.RESOURCE_EGRESS: RESOURCE_BANDWIDTH_EGRESS,
        }
        self._method_names = {
            agent_pb2.METHOD_AUTO: "auto",
            agent_pb2.METHOD_CRI: "cri",
            agent_pb2.METHOD_CGROUP: "cgroup",
            agent_pb2.METHOD_NETLINK: "tc",
        }

    # -- plumbing --

    def _call(self, method: Any, request: Any, what: str) -> Any:
        grpc = self._grpc
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            details = one_line((err.details() if hasattr(err, "details") else "") or str(code))
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise BackendError(f"the chaos-agent at {self.address} did not answer {what} within "
                                   f"{self.timeout_s:g}s") from None
            if code == grpc.StatusCode.UNAVAILABLE and any(m in details for m in _TRANSPORT_FAILURES + _CUT_OFF):
                hint = ""
                if what in ("apply", "reset"):
                    # The connection broke: the agent may have made the change before it went away.
                    hint = (f"; if the agent got the request the {what} may have taken effect: check"
                            f" `kubectl chaos status --agent-address {self.address}`")
                raise BackendError(f"cannot reach the chaos-agent at {self.address}: {details}{hint}") from None
            raise BackendError(f"{what} failed: {details}") from None

    def _value(self, q: Any) -> int | None:
        return None if q.unlimited else q.value

    def _change(self, r: Any, *, expires_at: datetime | None, dry_run: bool) -> ResourceChange:
        return ResourceChange(
            resource=self._resource_names.get(r.resource, str(r.resource)),
            previous=self._value(r.previous),
            requested=self._value(r.requested),
            read_back=None if dry_run or r.in_force.unknown else self._value(r.in_force),
            method=self._method_names.get(r.method, "auto"),
            expires_at=expires_at,
            unknown="" if dry_run else r.in_force.unknown,
            queue=None if dry_run else _queue(r),
        )

    def _target(self, req: ChaosRequest) -> Any:
        if req.selector is not None:
            raise UsageError("-l/--selector needs cluster mode; with --agent-address name one pod")
        return self._pb.Target(namespace=req.namespace or "default", pod=req.pod or "", container=req.container or "")

    # -- Backend --

    def default_namespace(self) -> str:
        return "default"

    def apply(self, req: ChaosRequest) -> ApplyResult:
        pb = self._pb
        changes = pb.Changes()
        if req.cpu_millicpu is not None:
            changes.cpu_millicpu = req.cpu_millicpu
        if req.memory_bytes is not None:
            changes.memory_bytes = req.memory_bytes
        if req.ingress_bps is not None:
            changes.ingress_bps = req.ingress_bps
        if req.egress_bps is not None:
            changes.egress_bps = req.egress_bps
        request = pb.ApplyRequest(
            target=self._target(req),
            changes=changes,
            method={"auto": pb.METHOD_AUTO, "cri": pb.METHOD_CRI, "cgroup": pb.METHOD_CGROUP}[req.method],
            force=req.force,
            dry_run=req.dry_run,
        )
        if req.duration_s is not None:
            request.duration_s = req.duration_s
        if req.latency_s is not None:
            request.latency_s = req.latency_s
        for step in req.steps:
            c = pb.Changes()
            if step.cpu_millicpu is not None:
                c.cpu_millicpu = step.cpu_millicpu
            if step.memory_bytes is not None:
                c.memory_bytes = step.memory_bytes
            if step.bandwidth_bps is not None:
                if req.direction in ("ingress", "both"):
                    c.ingress_bps = step.bandwidth_bps
                if req.direction in ("egress", "both"):
                    c.egress_bps = step.bandwidth_bps
            request.steps.add(offset_s=step.offset_s, changes=c)
        resp = self._call(self._stub.Apply, request, "apply")
        expires = _when(resp.expires_at_unix_s) if resp.HasField("expires_at_unix_s") else None
        t = resp.target
        return ApplyResult(
            targets=(TargetResult(
                namespace=t.namespace, pod=t.pod, container=t.container, node=t.node_name or None,
                experiment_id=resp.experiment_id or None,
                changes=tuple(self._change(r, expires_at=expires, dry_run=resp.dry_run)
                              for r in resp.resources),
                created=resp.created,
            ),),
            dry_run=resp.dry_run,
        )

    def reset(self, req: ChaosRequest) -> ResetResult:
        resp = self._call(self._stub.Revert, self._pb.RevertRequest(target=self._target(req), dry_run=req.dry_run,
                                                                     force=req.force), "reset")
        t = resp.target
        return ResetResult(
            targets=(TargetResult(
                namespace=t.namespace or req.namespace or "default", pod=t.pod or req.pod or "",
                container=t.container, node=t.node_name or None,
                changes=tuple(self._change(r, expires_at=None, dry_run=resp.dry_run)
                              for r in resp.resources),
                error="not restored: " + "; ".join(resp.not_restored) if resp.not_restored else None,
            ),),
            dry_run=resp.dry_run,
        )

    def top(self, namespace: str | None, interval_s: float, count: int) -> Iterator[list[TopRow]]:
        """The agent's Observe stream: one list of rows per interval (``count`` of them; 0 = forever)."""
        from plugin.backends.reports import TopRow

        grpc = self._grpc
        request = self._pb.ObserveRequest(namespace=namespace or "", interval_s=interval_s, count=count)
        stream = self._stub.Observe(request, timeout=None if count == 0 else self.timeout_s + interval_s * count)
        try:
            for resp in stream:
                rows = []
                for o in resp.rows:
                    [status] = self._statuses([o.experiment])
                    figures = {name: getattr(o, name) if o.HasField(name) else None for name in _TOP_FIGURES}
                    rows.append(TopRow(status=status, interval_s=o.interval_s, errors=tuple(o.errors), **figures))
                yield rows
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED:
                return
            raise BackendError(f"top failed: {one_line(err.details() or str(err.code()))}") from None
        finally:
            stream.cancel()

    def status(self, namespace: str | None) -> Sequence[ExperimentStatus]:
        from plugin.backends.reports import ExperimentStatus

        resp = self._call(self._stub.List, self._pb.ListRequest(namespace=namespace or ""), "status")
        out = self._statuses(resp.experiments)
        for d in resp.damaged:
            namespace, pod, container = (d.key.split("/", 2) if d.key else ["?", "?", "?"])
            cleaned = f"; removed: {', '.join(d.cleaned)}" if d.cleaned else ""
            out.append(ExperimentStatus(
                namespace=namespace, pod=pod, container=container, state="damaged",
                message=f"state record {d.file} is damaged ({d.reason}); what it held may still be in force;"
                        f" --reset the container to clean up{cleaned}",
            ))
        return out

    def _statuses(self, experiments: Any) -> list[ExperimentStatus]:
        from plugin.backends.reports import ExperimentStatus

        out = []
        for e in experiments:
            expires = _when(e.expires_at_unix_s) if e.HasField("expires_at_unix_s") else None
            changes = tuple(
                ResourceChange(
                    resource=self._resource_names.get(r.resource, str(r.resource)),
                    previous=self._value(r.original),
                    requested=self._value(r.requested),
                    read_back=None if r.in_force.unknown else self._value(r.in_force),
                    method=self._method_names.get(r.method, "auto"),
                    expires_at=expires,
                    unknown=r.in_force.unknown,
                    queue=_queue(r),
                )
                for r in e.resources
            )
            t = e.target
            notes = []
            if e.failure:
                retry = (f"; next try {_when(e.next_retry_at_unix_s):%H:%M:%SZ}"
                         if e.HasField("next_retry_at_unix_s") else "")
                notes.append(f"{e.failure} (try {e.attempts}{retry})")
            if e.drift_corrections:
                notes.append(f"{e.drift_corrections} drift correction(s)")
            if e.owner and e.owner != "node-local":
                notes.append(f"owned by {e.owner}")
            if e.steps_total:
                step = f"step {e.step}/{e.steps_total}"
                if e.HasField("next_step_at_unix_s"):
                    from plugin.units import format_bandwidth, format_cpu, format_memory

                    nc = e.next_step
                    parts = [f"cpu {format_cpu(nc.cpu_millicpu)}" if nc.HasField("cpu_millicpu") else "",
                             f"memory {format_memory(nc.memory_bytes)}" if nc.HasField("memory_bytes") else "",
                             f"bandwidth {format_bandwidth(nc.ingress_bps or nc.egress_bps)}"
                             if nc.HasField("ingress_bps") or nc.HasField("egress_bps") else ""]
                    nxt = ", ".join(p for p in parts if p)
                    step += f", next {nxt} at {_when(e.next_step_at_unix_s):%H:%M:%SZ}"
                if e.step_note:
                    step += f"; {e.step_note}"
                notes.append(step)
            out.append(ExperimentStatus(
                namespace=t.namespace, pod=t.pod, container=t.container, changes=changes, node=t.node_name or None,
                experiment_id=e.experiment_id, started_at=_when(e.started_at_unix_s),
                state=e.phase or "active", message="; ".join(notes),
            ))
        return out

    def close(self) -> None:
        self._channel.close()
