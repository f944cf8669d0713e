"""cgroupctl.apply / set_limits / snapshot / restore on copies of the fixture trees (plain files).

Plain files accept every write, so these tests cover the mechanics: order, read-back, rollback,
exact restore, JSON. What the kernel refuses is covered in tests/kernel (v1) and tests/vm (v2).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from cgroupctl import (
    BelowUsage,
    Limits,
    Plan,
    Snapshot,
    Write,
    WriteFailed,
    apply,
    locate,
    plan,
    prepare_pod,
    read_limits,
    read_state,
    restore,
    set_limits,
    snapshot,
)

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "cgroup"
MiB = 1 << 20


@pytest.fixture(params=["v1-cgroupfs-containerd", "v2-systemd-crio", "hybrid-v2memory-systemd-containerd",
                        "hybrid-v2cpu-cgroupfs-containerd"])
def tree(request, tmp_path):
    shutil.copytree(FIXTURES / request.param, tmp_path / request.param, symlinks=True)
    base = tmp_path / request.param
    return locate(pid=4242, proc_root=str(base / "proc"), cgroup_root=str(base / "sys" / "fs" / "cgroup"))


def _contents(paths) -> dict[str, str]:
    """Stripped, as the kernel shows every value with a newline and cgroupctl compares without."""
    return {p: pathlib.Path(p).read_text().strip() for p in paths}


def test_set_limits_writes_reads_back_and_restore_puts_back_exact_bytes(tree):
    original = snapshot(tree)
    raw_before = _contents(original.files)
    applied = set_limits(tree, Limits(cpu_quota_us=150000, memory_limit_bytes=256 * MiB))
    assert applied.limits.cpu_quota_us == 150000 and applied.limits.memory_limit_bytes == 256 * MiB
    assert read_limits(tree, pod=True).cpu_quota_us == 150000
    assert all(d.read_back == d.value for d in applied.done)
    # The snapshot travels as JSON (the agent persists it) and restores exactly.
    saved = Snapshot.from_dict(json.loads(json.dumps(applied.snapshot.to_dict())))
    assert saved == original
    restore(saved)
    assert _contents(original.files) == raw_before
    # Restoring again changes nothing.
    assert restore(saved).done == ()


def test_a_failed_write_rolls_back_the_earlier_ones(tree):
    state = read_state(tree)
    good = plan(state, Limits(cpu_quota_us=150000))
    assert len(good.writes) == 2
    before = _contents(good.paths)
    broken = Plan(good.steps + (Write(path=str(pathlib.Path(tree.container.cpu) / "gone" / "cpu.max"), value="1"),))
    with pytest.raises(WriteFailed, match="gone.*rolled back 2 earlier write"):
        apply(broken)
    assert _contents(good.paths) == before


def test_v2_usage_check_stops_before_memory_max_and_undoes_memory_high(tmp_path):
    shutil.copytree(FIXTURES / "v2-cgroupfs-containerd", tmp_path / "t", symlinks=True)
    base = tmp_path / "t"
    cg = locate(pid=4242, proc_root=str(base / "proc"), cgroup_root=str(base / "sys" / "fs" / "cgroup"))
    ctr = pathlib.Path(cg.container.memory)
    # 36 MiB in use, 30 MiB of it unreclaimable by the stat: 32 MiB passes the plan's check, but a
    # kernel that could not reclaim (a plain file here) leaves memory.current above it.
    before = _contents([ctr / "memory.high", ctr / "memory.max"])
    with pytest.raises(BelowUsage, match="memory.max not written.*rolled back 1"):
        set_limits(cg, Limits(memory_limit_bytes=32 * MiB))
    assert _contents([ctr / "memory.high", ctr / "memory.max"]) == before


def test_prepare_pod_raises_the_pod_only_and_finish_never_lowers_it(tree):
    pod_cpu = pathlib.Path(tree.pod.cpu)
    ctr_before = read_limits(tree)
    change = prepare_pod(tree, Limits(cpu_quota_us=150000, memory_limit_bytes=64 * MiB))
    # Raised CPU at the pod; the memory lowering leaves the pod; the container untouched.
    assert read_limits(tree, pod=True).cpu_quota_us == 150000
    assert read_limits(tree, pod=True).memory_limit_bytes == 128 * MiB
    assert read_limits(tree) == ctr_before
    change.finish()
    assert read_limits(tree, pod=True).memory_limit_bytes == 128 * MiB
    assert read_limits(tree, pod=True).cpu_quota_us == 150000
    assert pod_cpu.exists()


def test_prepare_pod_abort_puts_the_pod_back(tree):
    before = read_limits(tree, pod=True)
    change = prepare_pod(tree, Limits(cpu_quota_us=150000))
    assert read_limits(tree, pod=True) != before
    change.abort()
    assert read_limits(tree, pod=True) == before


def test_restore_when_the_container_is_gone_still_restores_the_pod(tree):
    applied = set_limits(tree, Limits(cpu_quota_us=150000))
    for d in {tree.container.cpu, tree.container.memory}:
        shutil.rmtree(d)
    result = restore(applied.snapshot)
    assert read_limits(tree, pod=True).cpu_quota_us == 50000
    assert result.skipped and all(p.startswith(tree.container.cpu) or p.startswith(tree.container.memory)
                                  for p in result.skipped)


def test_finish_moves_the_containers_memory_high_that_a_runtime_leaves(tmp_path):
    name = "hybrid-v2memory-systemd-containerd"
    shutil.copytree(FIXTURES / name, tmp_path / name, symlinks=True)
    base = tmp_path / name
    cg = locate(pid=4242, proc_root=str(base / "proc"), cgroup_root=str(base / "sys" / "fs" / "cgroup"))
    ctr = pathlib.Path(cg.container.memory)
    high = int((ctr / "memory.high").read_text())
    change = prepare_pod(cg, Limits(memory_limit_bytes=256 * MiB))
    assert int((ctr / "memory.high").read_text()) == high  # the container is the runtime's to change
    (ctr / "memory.max").write_text(f"{256 * MiB}\n")       # what runc's update writes
    done = change.finish()
    assert [(pathlib.Path(d.path).name, d.value) for d in done.done] == [("memory.high", str(2 * high))]
    assert int((ctr / "memory.high").read_text()) == 2 * high
    # A CPU-only change (or v1) has nothing to move.
    assert prepare_pod(cg, Limits(cpu_quota_us=150000)).finish().done == ()
