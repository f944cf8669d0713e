"""cgroupctl's pure parsers: /proc/PID/cgroup, mountinfo, systemd slices, runtime cgroups paths, values."""

from __future__ import annotations

import json
import pickle

import pytest

from cgroupctl import UNLIMITED, Limits, OutOfRange
from cgroupctl.parse import (
    cgroups_path_to_cgroup,
    check_cpu,
    container_id_of,
    expand_slice,
    parse_cpu_max,
    parse_flat_keyed,
    parse_mountinfo,
    parse_proc_cgroup,
    parse_v1_memory,
    parse_v1_quota,
    parse_v2_limit,
    pod_uid_of,
    relative_to,
    split_cgroup_path,
)

CID = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"
UID = "5f0e1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b"


def test_proc_cgroup_v1_lines_give_each_controller_its_path_and_v2_line_the_empty_key():
    text = ("12:pids:/kubepods/x\n4:memory:/process_api/abc\n3:cpu,cpuacct:/kubepods/y\n"
            "1:name=systemd:/init.scope\n0::/unified/z\n")
    table = parse_proc_cgroup(text)
    assert table == {"pids": "/kubepods/x", "memory": "/process_api/abc", "cpu": "/kubepods/y",
                     "cpuacct": "/kubepods/y", "name=systemd": "/init.scope", "": "/unified/z"}


def test_mountinfo_keeps_cgroup_mounts_with_root_and_controllers_and_unescapes_paths():
    text = (
        "25 30 0:23 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755\n"
        "30 25 0:28 /docker/abc /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:14 - cgroup cgroup rw,cpu,cpuacct\n"
        "41 31 0:38 /../../.. /host\\040dir/cgroup rw master:3 - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    mounts = parse_mountinfo(text)
    assert [(m.root, m.mount_point, m.fstype) for m in mounts] == [
        ("/docker/abc", "/sys/fs/cgroup/cpu,cpuacct", "cgroup"),
        ("/../../..", "/host dir/cgroup", "cgroup2"),
    ]
    assert "cpu" in mounts[0].super_options and "cpuacct" in mounts[0].super_options


@pytest.mark.parametrize("path, parts", [
    ("/", ()),
    ("/kubepods/burstable/pod1/c", ("kubepods", "burstable", "pod1", "c")),
    ("/../../kubepods/./pod1/../pod2", ("..", "..", "kubepods", "pod2")),
    ("//a///b/", ("a", "b")),
])
def test_split_cgroup_path_keeps_leading_dotdot_only(path, parts):
    assert split_cgroup_path(path) == parts


def test_relative_to_refuses_paths_outside_the_root():
    assert relative_to(("docker", "n", "kubelet", "x"), ("docker", "n")) == ("kubelet", "x")
    assert relative_to(("..", "x"), ()) is None
    assert relative_to(("docker", "m", "x"), ("docker", "n")) is None


@pytest.mark.parametrize("slice_name, path", [
    ("-.slice", "/"),
    ("system.slice", "/system.slice"),
    ("kubepods-burstable-pod1.slice", "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice"),
    ("kubelet-kubepods-besteffort.slice",
     "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice"),
])
def test_expand_slice_nests_every_dash_prefix(slice_name, path):
    assert expand_slice(slice_name) == path


@pytest.mark.parametrize("bad", ["kubepods", "a--b.slice", "-a.slice", "a-.slice", "a/b.slice"])
def test_expand_slice_refuses_malformed_names(bad):
    with pytest.raises(Exception, match="slice"):
        expand_slice(bad)


@pytest.mark.parametrize("cgroups_path, path", [
    # cgroupfs driver, containerd and CRI-O
    (f"/kubepods/burstable/pod{UID}/{CID}", f"/kubepods/burstable/pod{UID}/{CID}"),
    (f"/kubepods/besteffort/pod{UID}/crio-{CID}", f"/kubepods/besteffort/pod{UID}/crio-{CID}"),
    # systemd driver: slice:prefix:name
    (f"kubepods-burstable-pod{UID.replace('-', '_')}.slice:cri-containerd:{CID}",
     f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice"
     f"/cri-containerd-{CID}.scope"),
    (f"kubepods-pod{UID.replace('-', '_')}.slice:crio:{CID}",
     f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{CID}.scope"),
    # kind's kubelet (cgroup root /kubelet)
    ("kubelet-kubepods-besteffort-podX.slice:cri-containerd:abc",
     "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-podX.slice"
     "/cri-containerd-abc.scope"),
    (":docker:abc", "/system.slice/docker-abc.scope"),
])
def test_cgroups_path_forms(cgroups_path, path):
    assert cgroups_path_to_cgroup(cgroups_path) == path


@pytest.mark.parametrize("name, cid", [
    (CID, CID), (f"cri-containerd-{CID}.scope", CID), (f"crio-{CID}.scope", CID), (f"crio-{CID}", CID),
    (f"docker-{CID}.scope", CID), ("container", None), (f"crio-conmon-{CID}.scope", None),
])
def test_container_id_of_directory_names(name, cid):
    assert container_id_of(name) == cid


def test_pod_uid_of_cgroupfs_and_systemd_names():
    assert pod_uid_of(f"pod{UID}") == UID
    assert pod_uid_of(f"kubepods-burstable-pod{UID.replace('-', '_')}.slice") == UID
    assert pod_uid_of("pod") is None


def test_values_unlimited_forms():
    assert parse_v1_quota("-1") is UNLIMITED and parse_v1_quota("50000") == 50000
    assert parse_v1_memory("9223372036854771712") is UNLIMITED
    assert parse_v1_memory("9223372036854710272") is UNLIMITED  # 64 KiB pages
    assert parse_v1_memory("134217728") == 134217728
    assert parse_v2_limit("max") is UNLIMITED and parse_v2_limit("4096") == 4096
    assert parse_cpu_max("max 100000") == (UNLIMITED, 100000)
    assert parse_cpu_max("50000 20000") == (50000, 20000)
    assert parse_flat_keyed("nr_periods 3\nbogus\nthrottled_usec 9\n") == {"nr_periods": 3, "throttled_usec": 9}


@pytest.mark.parametrize("quota, period, fragment", [
    (999, 100000, "below the kernel's minimum 1000 us"),
    (500, 100000, "10m CPU"),
    (2**44, 100000, "above the kernel's maximum"),
    (50000, 999, "outside the kernel's range 1000..1000000"),
    (50000, 1_000_001, "outside the kernel's range"),
])
def test_cpu_bounds_are_the_kernels_and_messages_say_what_is_accepted(quota, period, fragment):
    with pytest.raises(OutOfRange, match=fragment):
        check_cpu(quota, period)


def test_unlimited_is_one_value_through_json_and_pickle():
    limits = Limits(cpu_quota_us=UNLIMITED, cpu_period_us=100000, memory_limit_bytes=64 << 20)
    data = json.loads(json.dumps(limits.to_dict()))
    assert data["cpu_quota_us"] == "unlimited"
    assert Limits.from_dict(data) == limits
    assert pickle.loads(pickle.dumps(UNLIMITED)) is UNLIMITED
    assert limits.cpu_millicpu is UNLIMITED
    assert Limits(cpu_quota_us=50000, cpu_period_us=100000).cpu_millicpu == 500
