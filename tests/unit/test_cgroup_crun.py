"""crun's two levels (the scope and its container/ child, both holding the limits) and v2's pod cap,
on a copy of the fixture tree v2-systemd-crun-containerd (plain files: the mechanics; the VM tests
measure the effect on a real crun container)."""

from __future__ import annotations

import pathlib
import shutil

import pytest

from cgroupctl import Limits, locate, plan, read_limits, read_state, restore, set_limits, snapshot
from cgroupctl.model import ContainerCgroups
from cgroupctl.read import effective_limits

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "cgroup"
MiB = 1 << 20


@pytest.fixture
def crun(tmp_path) -> ContainerCgroups:
    shutil.copytree(FIXTURES / "v2-systemd-crun-containerd", tmp_path / "t")
    base = tmp_path / "t"
    return locate(pid=4242, proc_root=str(base / "proc"), cgroup_root=str(base / "sys" / "fs" / "cgroup"))


def text(path: str) -> str:
    return pathlib.Path(path).read_text().strip()


def test_locate_finds_the_scope_and_its_container_child(crun):
    assert crun.container.cpu.endswith(".scope")
    assert crun.inner is not None and crun.inner.cpu == crun.container.cpu + "/container"
    assert ContainerCgroups.from_dict(crun.to_dict()) == crun
    # Records written before the child was known still load.
    old = crun.to_dict()
    old.pop("inner")
    assert ContainerCgroups.from_dict(old).inner is None


def test_locate_by_cgroups_path_finds_the_child_too(crun, tmp_path):
    base = tmp_path / "t"
    by_path = locate(cgroups_path="kubepods-burstable-pod" + crun.pod_uid.replace("-", "_")
                     + f".slice:cri-containerd:{crun.container_id}", cgroup_root=str(base / "sys" / "fs" / "cgroup"))
    assert by_path.inner == crun.inner


def test_a_raise_writes_both_levels_scope_first_and_reads_back_the_raise(crun):
    applied = set_limits(crun, Limits(cpu_quota_us=150000, memory_limit_bytes=512 * MiB))
    order = [(d.path.replace(crun.pod.cpu, "pod"), d.value) for d in applied.done]
    scope, inner = "pod/" + pathlib.Path(crun.container.cpu).name, "pod/" + pathlib.Path(crun.container.cpu).name + "/container"
    assert order == [
        ("pod/cpu.max", "150000 100000"), ("pod/memory.max", str(512 * MiB)),
        (f"{scope}/cpu.max", "150000 100000"), (f"{inner}/cpu.max", "150000 100000"),
        (f"{scope}/memory.max", str(512 * MiB)), (f"{inner}/memory.max", str(512 * MiB)),
    ]
    assert (applied.limits.cpu_quota_us, applied.limits.memory_limit_bytes) == (150000, 512 * MiB)


def test_a_lowering_writes_the_child_first(crun):
    p = plan(read_state(crun), Limits(cpu_quota_us=20000, memory_limit_bytes=64 * MiB))
    writes = [(w.path, w.value) for w in p.writes]
    cpu = [path for path, _ in writes if path.endswith("cpu.max")]
    assert cpu == [crun.inner.cpu + "/cpu.max", crun.container.cpu + "/cpu.max"]
    memory_max = [path for path, _ in writes if path.endswith("memory.max")]
    assert memory_max == [crun.inner.memory + "/memory.max", crun.container.memory + "/memory.max"]


def test_the_read_back_is_the_tighter_level(crun):
    """The bug this fixes: the scope read 512Mi while the processes in container/ stayed at 128Mi."""
    pathlib.Path(crun.container.memory, "memory.max").write_text(str(512 * MiB))
    pathlib.Path(crun.container.cpu, "cpu.max").write_text("150000 100000")
    limits = read_limits(crun)
    assert (limits.cpu_quota_us, limits.memory_limit_bytes) == (50000, 128 * MiB)


def test_restore_is_exact_on_both_levels_and_the_pod(crun):
    saved = snapshot(crun)
    assert {p for p in saved.files if "/container/" in p}, "the child's files are in the snapshot"
    before = {p: text(p) for p in saved.files}
    set_limits(crun, Limits(cpu_quota_us=150000, memory_limit_bytes=512 * MiB))
    set_limits(crun, Limits(cpu_quota_us=20000, memory_limit_bytes=64 * MiB))
    restore(saved)
    assert {p: text(p) for p in saved.files} == before


def test_v2_effective_limits_include_the_pod_and_a_raise_raises_a_pod_set_back(crun):
    set_limits(crun, Limits(cpu_quota_us=150000))
    # Someone (a daemon-reload before the fix) puts the pod slice back under the raised container.
    pathlib.Path(crun.pod.cpu, "cpu.max").write_text("50000 100000")
    assert read_limits(crun).cpu_quota_us == 150000, "the container's own levels"
    assert effective_limits(crun).cpu_quota_us == 50000, "what its processes get"
    again = plan(read_state(crun), Limits(cpu_quota_us=150000))
    assert [(w.stage, w.path, w.value) for w in again.writes] == [("pod-before", crun.pod.cpu + "/cpu.max",
                                                                    "150000 100000")]
