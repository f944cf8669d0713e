"""Conversions between runtime.v1 messages, OCI runtime specs and cri_api values."""

from __future__ import annotations

import dataclasses
import json

from cri_api import HugepageLimit, LinuxResources
from cri_api.convert import (
    container_info_from_status,
    parse_status_info,
    resources_from_proto,
    resources_from_runtime_spec,
    resources_to_proto,
)
from cri_api.v1 import api_pb2

FULL = LinuxResources(
    cpu_period_us=100_000,
    cpu_quota_us=50_000,
    cpu_shares=512,
    memory_limit_bytes=64 << 20,
    memory_swap_limit_bytes=64 << 20,
    oom_score_adj=937,
    cpuset_cpus="0-1",
    cpuset_mems="0",
    hugepage_limits=(HugepageLimit("2MB", 4 << 20),),
    unified={"memory.high": "60000000"},
)

# Shapes of info["info"] as containerd 1.6 and CRI-O (server/container_status.go) produce them.
RUNTIME_SPEC = {
    "process": {"oomScoreAdj": 937},
    "linux": {
        "cgroupsPath": "/kubepods/burstable/pod1234/abcd",
        "resources": {
            "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0"},
            "memory": {"limit": 67108864, "swap": 67108864},
            "hugepageLimits": [{"pageSize": "2MB", "limit": 4194304}],
            "unified": {"memory.high": "60000000"},
        },
    },
}
CONTAINERD_INFO = {"sandboxID": "sb1", "pid": 4242, "snapshotter": "overlayfs", "runtimeSpec": RUNTIME_SPEC}
CRIO_INFO = {
    "sandboxID": "sb2",
    "pid": 777,
    "privileged": False,
    "runtimeSpec": {"linux": {"cgroupsPath": "kubepods-burstable-pod1234.slice:crio:abcd", "resources": {}}},
}


def _status(info: dict | None, with_resources: bool, state=api_pb2.CONTAINER_RUNNING) -> api_pb2.ContainerStatusResponse:
    status = api_pb2.ContainerStatus(
        id="abcd",
        metadata=api_pb2.ContainerMetadata(name="app", attempt=2),
        state=state,
        labels={
            "io.kubernetes.pod.name": "web",
            "io.kubernetes.pod.namespace": "shop",
            "io.kubernetes.pod.uid": "uid-1",
            "io.kubernetes.container.name": "app",
        },
        annotations={"a": "b"},
    )
    if with_resources:
        status.resources.linux.CopyFrom(api_pb2.LinuxContainerResources(cpu_quota=20000, cpu_period=100000))
    return api_pb2.ContainerStatusResponse(status=status, info={"info": json.dumps(info)} if info else {})


def test_proto_round_trip_keeps_every_field():
    msg = resources_to_proto(FULL)
    assert msg.memory_swap_limit_in_bytes == 64 << 20
    assert [(h.page_size, h.limit) for h in msg.hugepage_limits] == [("2MB", 4 << 20)]
    assert dict(msg.unified) == {"memory.high": "60000000"}
    assert resources_from_proto(msg) == FULL
    assert resources_from_proto(api_pb2.LinuxContainerResources.FromString(msg.SerializeToString())) == FULL


def test_unset_is_none_on_our_side_and_zero_on_the_wire():
    assert resources_from_proto(api_pb2.LinuxContainerResources()) == LinuxResources()
    assert resources_to_proto(LinuxResources()).SerializeToString() == b""


def test_resources_from_oci_runtime_spec():
    assert resources_from_runtime_spec(RUNTIME_SPEC) == FULL
    assert resources_from_runtime_spec({}) == LinuxResources()


def test_containerd_info_gives_pid_cgroups_path_and_spec_resources_as_fallback():
    info = container_info_from_status(_status(CONTAINERD_INFO, with_resources=False), runtime_name="containerd")
    assert (info.pid, info.cgroups_path, info.sandbox_id) == (4242, "/kubepods/burstable/pod1234/abcd", "sb1")
    assert info.resources == FULL
    assert (info.name, info.pod_name, info.pod_namespace, info.pod_uid, info.attempt) == ("app", "web", "shop", "uid-1", 2)
    assert info.state == "running" and info.running and info.runtime_name == "containerd"


def test_status_resources_win_over_the_spec():
    info = container_info_from_status(_status(CONTAINERD_INFO, with_resources=True))
    assert info.resources == LinuxResources(cpu_period_us=100_000, cpu_quota_us=20_000)


def test_crio_info_layout():
    info = container_info_from_status(_status(CRIO_INFO, with_resources=True))
    assert (info.pid, info.cgroups_path, info.sandbox_id) == (777, "kubepods-burstable-pod1234.slice:crio:abcd", "sb2")


def test_missing_or_broken_info_gives_none_not_an_exception():
    assert container_info_from_status(_status(None, with_resources=False)).pid is None
    assert parse_status_info({"info": "{not json"}) == {}
    assert parse_status_info({"info": "[1, 2]"}) == {}
    exited = container_info_from_status(_status({"pid": 0}, with_resources=False, state=api_pb2.CONTAINER_EXITED))
    assert (exited.pid, exited.state, exited.running) == (None, "exited", False)


def test_linux_resources_to_dict_covers_every_field_and_round_trips():
    # to_dict is written out field by field (asdict is slow on the agent's hot path): a new field
    # must not be dropped silently.
    res = LinuxResources(cpu_period_us=100000, cpu_quota_us=50000, cpu_shares=512, memory_limit_bytes=2**27,
                         memory_swap_limit_bytes=2**27, oom_score_adj=-997, cpuset_cpus="0-1", cpuset_mems="0",
                         hugepage_limits=(HugepageLimit("2MB", 2**21),), unified={"memory.high": "max"})
    out = res.to_dict()
    assert set(out) == {f.name for f in dataclasses.fields(LinuxResources)}
    assert LinuxResources.from_dict(out) == res
