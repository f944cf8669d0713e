"""Conversions between runtime.v1 messages and the plain values of cri_api.types (pure)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cri_api.errors import InvalidRequest
from cri_api.types import ContainerInfo, HugepageLimit, LinuxResources
from cri_api.v1 import api_pb2

# Kubelet labels on every container (and sandbox) it creates.
LABEL_POD_NAME = "io.kubernetes.pod.name"
LABEL_POD_NAMESPACE = "io.kubernetes.pod.namespace"
LABEL_POD_UID = "io.kubernetes.pod.uid"
LABEL_CONTAINER_NAME = "io.kubernetes.container.name"

_STATE_NAMES = {
    api_pb2.CONTAINER_CREATED: "created",
    api_pb2.CONTAINER_RUNNING: "running",
    api_pb2.CONTAINER_EXITED: "exited",
    api_pb2.CONTAINER_UNKNOWN: "unknown",
}


def state_name(state: int) -> str:
    return _STATE_NAMES.get(state, "unknown")


def _unset_if_zero(value: int) -> int | None:
    return None if value == 0 else int(value)


def _zero_if_unset(value: int | None) -> int:
    return 0 if value is None else int(value)


def resources_from_proto(msg: api_pb2.LinuxContainerResources) -> LinuxResources:
    return LinuxResources(
        cpu_period_us=_unset_if_zero(msg.cpu_period),
        cpu_quota_us=_unset_if_zero(msg.cpu_quota),
        cpu_shares=_unset_if_zero(msg.cpu_shares),
        memory_limit_bytes=_unset_if_zero(msg.memory_limit_in_bytes),
        memory_swap_limit_bytes=_unset_if_zero(msg.memory_swap_limit_in_bytes),
        oom_score_adj=_unset_if_zero(msg.oom_score_adj),
        cpuset_cpus=msg.cpuset_cpus or None,
        cpuset_mems=msg.cpuset_mems or None,
        hugepage_limits=tuple(HugepageLimit(h.page_size, int(h.limit)) for h in msg.hugepage_limits),
        unified=dict(msg.unified),
    )


# Limits where CRI reads 0 as "not specified": a 0 here would silently mean "unset", never "zero".
_NO_ZERO_FIELDS = ("cpu_period_us", "cpu_quota_us", "cpu_shares", "memory_limit_bytes", "memory_swap_limit_bytes")


def resources_to_proto(res: LinuxResources) -> api_pb2.LinuxContainerResources:
    """The message for ``res``; None becomes CRI's 0 ("not specified"), and a 0 of ours is refused."""
    zeros = [name for name in _NO_ZERO_FIELDS if getattr(res, name) == 0]
    if zeros:
        raise InvalidRequest(
            f"{', '.join(f'{name}=0' for name in zeros)} cannot be sent: CRI reads 0 as 'not specified'; "
            "use None to leave a field unset, or a value >= 1 (cri_api.UNLIMITED for no limit)"
        )
    return api_pb2.LinuxContainerResources(
        cpu_period=_zero_if_unset(res.cpu_period_us),
        cpu_quota=_zero_if_unset(res.cpu_quota_us),
        cpu_shares=_zero_if_unset(res.cpu_shares),
        memory_limit_in_bytes=_zero_if_unset(res.memory_limit_bytes),
        memory_swap_limit_in_bytes=_zero_if_unset(res.memory_swap_limit_bytes),
        oom_score_adj=_zero_if_unset(res.oom_score_adj),
        cpuset_cpus=res.cpuset_cpus or "",
        cpuset_mems=res.cpuset_mems or "",
        hugepage_limits=[
            api_pb2.HugepageLimit(page_size=h.page_size, limit=h.limit_bytes) for h in res.hugepage_limits
        ],
        unified=dict(res.unified),
    )


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value == 0:
        return None
    return value


def resources_from_runtime_spec(spec: Mapping[str, Any]) -> LinuxResources:
    """Resources from an OCI runtime spec (``runtimeSpec`` in the verbose status info)."""
    linux = spec.get("linux") or {}
    res = linux.get("resources") or {}
    cpu = res.get("cpu") or {}
    memory = res.get("memory") or {}
    return LinuxResources(
        cpu_period_us=_int_or_none(cpu.get("period")),
        cpu_quota_us=_int_or_none(cpu.get("quota")),
        cpu_shares=_int_or_none(cpu.get("shares")),
        memory_limit_bytes=_int_or_none(memory.get("limit")),
        memory_swap_limit_bytes=_int_or_none(memory.get("swap")),
        oom_score_adj=_int_or_none((spec.get("process") or {}).get("oomScoreAdj")),
        cpuset_cpus=cpu.get("cpus") or None,
        cpuset_mems=cpu.get("mems") or None,
        hugepage_limits=tuple(
            HugepageLimit(h.get("pageSize", ""), int(h.get("limit", 0))) for h in res.get("hugepageLimits") or ()
        ),
        unified=dict(res.get("unified") or {}),
    )


def parse_status_info(info: Mapping[str, str]) -> dict[str, Any]:
    """The JSON under ``info["info"]`` of a verbose ContainerStatus, or {} if absent or not JSON.

    containerd and CRI-O both put ``pid``, ``sandboxID`` and ``runtimeSpec`` (the OCI spec, with
    ``linux.cgroupsPath`` and ``linux.resources``) there; CRI-O adds ``privileged``.
    """
    raw = info.get("info")
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def container_info_from_status(
    resp: api_pb2.ContainerStatusResponse, sandbox_id: str = "", runtime_name: str = ""
) -> ContainerInfo:
    status = resp.status
    doc = parse_status_info(resp.info)
    spec = doc.get("runtimeSpec") or {}
    # Resources in the status reflect updates on runtimes that report them (containerd >= 1.6.?,
    # CRI-O); the runtime spec is the fallback, and containerd rewrites it on update as well.
    if status.HasField("resources") and status.resources.HasField("linux"):
        resources = resources_from_proto(status.resources.linux)
    else:
        resources = resources_from_runtime_spec(spec)
    pid = doc.get("pid")
    cgroups_path = (spec.get("linux") or {}).get("cgroupsPath") or None
    labels = dict(status.labels)
    return ContainerInfo(
        id=status.id,
        sandbox_id=sandbox_id or doc.get("sandboxID", "") or "",
        name=status.metadata.name or labels.get(LABEL_CONTAINER_NAME, ""),
        pod_name=labels.get(LABEL_POD_NAME, ""),
        pod_namespace=labels.get(LABEL_POD_NAMESPACE, ""),
        pod_uid=labels.get(LABEL_POD_UID, ""),
        attempt=int(status.metadata.attempt),
        state=state_name(status.state),
        pid=pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None,
        cgroups_path=cgroups_path,
        resources=resources,
        labels=labels,
        annotations=dict(status.annotations),
        runtime_name=runtime_name,
    )
