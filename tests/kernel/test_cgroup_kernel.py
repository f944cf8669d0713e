"""cgroupctl on this machine's real cgroup v1 files, in test cgroups nested under our own.

Layout per test: <own path>/cgtest-<pid>-<n>/pod/ctr in the cpu, cpuacct and memory hierarchies
(this worker's memory cgroup is /process_api/<id>, cpu and cpuacct are at /). A child process is
moved into ctr by writing its pid to cgroup.procs; this process never moves.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import subprocess
import sys
import time

import pytest

import cgroupctl
from cgroupctl import (
    UNLIMITED,
    BelowUsage,
    Limits,
    Mode,
    WriteFailed,
    detect_mode,
    locate,
    read_limits,
    read_usage,
    restore,
    set_limits,
    snapshot,
    write_file,
)
from tests.support.cpumeter import measure_cpus, wait_burning
from tests.support.require import in_ci, require, require_root

ROOT = pathlib.Path("/sys/fs/cgroup")
CONTROLLERS = ("cpu", "cpuacct", "memory")
MiB = 1 << 20
_SEQ = itertools.count()

CHILD = r"""
import sys, time
sys.stdin.readline()                       # wait until moved into the test cgroup
mode, n = sys.argv[1], int(sys.argv[2])
if mode == "alloc":
    block = bytearray(n)
    for i in range(0, n, 4096):            # touch every page: charged to the memory cgroup now
        block[i] = 1
    print("ready", flush=True)
    sys.stdin.readline()
else:
    print("ready", flush=True)
    while True:
        pass
"""


def _own_paths() -> dict[str, str]:
    out = {}
    for line in pathlib.Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            out[c] = path
    return out


class Tree:
    """cgtest-<pid>-<n>/pod/ctr in each controller; a child process inside ctr."""

    def __init__(self) -> None:
        own = _own_paths()
        name = f"cgtest-{os.getpid()}-{next(_SEQ)}"
        self.top = {c: ROOT / c / own[c].lstrip("/") / name for c in CONTROLLERS}
        self.pod = {c: p / "pod" for c, p in self.top.items()}
        self.ctr = {c: p / "ctr" for c, p in self.pod.items()}
        self.children: list[subprocess.Popen] = []
        for c in CONTROLLERS:
            for d in (self.top[c], self.pod[c], self.ctr[c]):
                d.mkdir()

    def set(self, level: str, name: str, value: int | str) -> None:
        directory = (self.pod if level == "pod" else self.ctr)["memory" if name.startswith("memory") else "cpu"]
        write_file(str(directory / name), str(value))

    def read(self, level: str, name: str) -> str:
        directory = (self.pod if level == "pod" else self.ctr)["memory" if name.startswith("memory") else "cpu"]
        return (directory / name).read_text().strip()

    def start(self, mode: str, n: int = 0) -> subprocess.Popen:
        child = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(n)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        self.children.append(child)
        for c in CONTROLLERS:
            write_file(str(self.ctr[c] / "cgroup.procs"), str(child.pid))
            assert str(child.pid) in (self.ctr[c] / "cgroup.procs").read_text().split()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "ready"
        return child

    def close(self) -> None:
        for child in self.children:
            child.kill()
            child.wait(timeout=10)
        for c in CONTROLLERS:
            for d in (self.ctr[c], self.pod[c], self.top[c]):
                for _ in range(50):
                    try:
                        d.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.05)  # the killed child leaves the cgroup a moment later


@pytest.fixture
def tree():
    require_root()
    require(detect_mode(str(ROOT)) in (Mode.V1, Mode.HYBRID), "cgroup v1 cpu and memory controllers (this machine)")
    t = Tree()
    try:
        # As a kubelet and containerd set them: pod = sum of its containers, memsw = memory.
        t.set("pod", "cpu.cfs_quota_us", 50000)
        t.set("ctr", "cpu.cfs_quota_us", 50000)
        t.set("pod", "memory.limit_in_bytes", 128 * MiB)
        t.set("ctr", "memory.limit_in_bytes", 128 * MiB)
        t.set("ctr", "memory.memsw.limit_in_bytes", 128 * MiB)
        yield t
    finally:
        t.close()


def _all_files(cg) -> dict[str, str]:
    return dict(snapshot(cg).files)


def test_locate_by_pid_finds_the_nested_cgroups(tree):
    child = tree.start("alloc", 8 * MiB)
    cg = locate(pid=child.pid)
    assert cg.mode is detect_mode()
    for c in CONTROLLERS:
        assert os.path.samefile(getattr(cg.container, c), tree.ctr[c])
        assert os.path.samefile(getattr(cg.pod, c), tree.pod[c])
    usage = read_usage(cg)
    assert usage.memory_unreclaimable_bytes >= 8 * MiB
    assert usage.cpu_usage_ns > 0


def test_raise_memory_above_memsw(tree):
    child = tree.start("alloc", 8 * MiB)
    cg = locate(pid=child.pid)
    # The kernel's rule, seen directly: the limit may not exceed memsw.
    with pytest.raises(WriteFailed, match="EINVAL.*ordering: above memory.memsw") as info:
        write_file(str(tree.ctr["memory"] / "memory.limit_in_bytes"), str(256 * MiB))
    assert info.value.errno == 22
    applied = set_limits(cg, Limits(memory_limit_bytes=256 * MiB))
    assert tree.read("ctr", "memory.limit_in_bytes") == str(256 * MiB)
    assert tree.read("ctr", "memory.memsw.limit_in_bytes") == str(256 * MiB)
    assert tree.read("pod", "memory.limit_in_bytes") == str(256 * MiB)
    assert applied.limits.memory_limit_bytes == 256 * MiB


def test_raise_cpu_above_the_pod_quota(tree):
    child = tree.start("alloc", 1 * MiB)
    cg = locate(pid=child.pid)
    with pytest.raises(WriteFailed, match="EINVAL.*exceed the parent"):
        write_file(str(tree.ctr["cpu"] / "cpu.cfs_quota_us"), "150000")
    set_limits(cg, Limits(cpu_quota_us=150000))
    assert (tree.read("pod", "cpu.cfs_quota_us"), tree.read("ctr", "cpu.cfs_quota_us")) == ("150000", "150000")
    # Back down: the container only; the pod keeps room for a container re-created from its spec.
    applied = set_limits(cg, Limits(cpu_quota_us=20000))
    assert (tree.read("pod", "cpu.cfs_quota_us"), tree.read("ctr", "cpu.cfs_quota_us")) == ("150000", "20000")
    # Restore of that second change: container back to 150000 (the pod never went below it).
    restore(applied.snapshot)
    assert (tree.read("pod", "cpu.cfs_quota_us"), tree.read("ctr", "cpu.cfs_quota_us")) == ("150000", "150000")


def test_period_and_quota_change_together_under_a_limited_pod(tree):
    child = tree.start("alloc", 1 * MiB)
    cg = locate(pid=child.pid)
    set_limits(cg, Limits(cpu_quota_us=5000, cpu_period_us=10000))  # 0.5 CPU at a 10 ms period
    assert (tree.read("ctr", "cpu.cfs_quota_us"), tree.read("ctr", "cpu.cfs_period_us")) == ("5000", "10000")
    assert tree.read("pod", "cpu.cfs_quota_us") == "50000"


def test_lower_memory_below_usage_is_refused_and_nothing_changes(tree):
    child = tree.start("alloc", 48 * MiB)
    cg = locate(pid=child.pid)
    before = _all_files(cg)
    with pytest.raises(BelowUsage) as info:
        set_limits(cg, Limits(memory_limit_bytes=16 * MiB, cpu_quota_us=150000))
    assert info.value.unreclaimable_bytes >= 48 * MiB
    assert f"{info.value.unreclaimable_bytes} bytes" in str(info.value)
    assert _all_files(cg) == before
    # Forced, the v1 kernel itself refuses (EBUSY after reclaim): the CPU raise already written is
    # rolled back, nothing is killed.
    with pytest.raises(WriteFailed, match="EBUSY.*cannot reclaim.*rolled back 2") as info:
        set_limits(cg, Limits(memory_limit_bytes=16 * MiB, cpu_quota_us=150000), force=True)
    assert _all_files(cg) == before
    assert child.poll() is None, "the container's process must survive"
    assert "oom_kill 0" in (tree.ctr["memory"] / "memory.oom_control").read_text()


def test_exact_restore_after_several_changes(tree):
    child = tree.start("alloc", 4 * MiB)
    cg = locate(pid=child.pid)
    original = snapshot(cg)
    assert original.files[str(tree.pod["memory"] / "memory.memsw.limit_in_bytes")] == "9223372036854771712"
    set_limits(cg, Limits(cpu_quota_us=UNLIMITED, memory_limit_bytes=UNLIMITED))
    assert read_limits(cg).memory_limit_bytes is UNLIMITED and read_limits(cg, pod=True).cpu_quota_us is UNLIMITED
    set_limits(cg, Limits(cpu_quota_us=30000, cpu_period_us=50000, memory_limit_bytes=100 * MiB + 123))
    assert tree.read("ctr", "memory.limit_in_bytes") == str(100 * MiB)  # rounded down to a page
    restore(cgroupctl.Snapshot.from_dict(original.to_dict()))
    assert _all_files(cg) == original.files


@pytest.mark.parametrize("millicpu", [200, 500])
def test_cpu_use_tracks_the_new_quota(tree, millicpu):
    child = tree.start("burn")
    cg = locate(pid=child.pid)
    set_limits(cg, Limits(cpu_quota_us=millicpu * 100))
    usage_file = tree.ctr["cpuacct"] / "cpuacct.usage"
    wait_burning(lambda: int(usage_file.read_text()))
    # The cgroup's own counter over whole periods (the throttled burner runs in bursts).
    used = measure_cpus(lambda: int(usage_file.read_text()), 100000, window_s=2.5)
    quota = millicpu / 1000
    # The quota caps use; a loaded machine (locally) may give less. CI runs alone: 5% of the quota.
    low = 0.05 if in_ci() else 0.5
    assert quota * (1 - low) <= used <= quota * 1.05, f"used {used:.3f} CPU with a quota of {quota} CPU"


def test_restore_puts_back_unlimited_exactly_as_the_kernel_showed_it(tree):
    child = tree.start("alloc", 4 * MiB)
    # A container without a memory limit: memsw first, then the limit (the kernel's order).
    tree.set("ctr", "memory.memsw.limit_in_bytes", -1)
    tree.set("ctr", "memory.limit_in_bytes", -1)
    tree.set("ctr", "cpu.cfs_quota_us", -1)
    cg = locate(pid=child.pid)
    original = snapshot(cg)
    assert read_limits(cg).memory_limit_bytes is UNLIMITED and read_limits(cg).cpu_quota_us is UNLIMITED
    set_limits(cg, Limits(cpu_quota_us=20000, memory_limit_bytes=64 * MiB))
    assert tree.read("ctr", "memory.memsw.limit_in_bytes") == str(64 * MiB)
    restore(original)
    assert _all_files(cg) == original.files
    assert tree.read("ctr", "memory.limit_in_bytes") == original.files[str(tree.ctr["memory"] / "memory.limit_in_bytes")]


def test_restore_under_a_raised_sibling_is_refused_naming_it_and_changes_nothing(tree):
    child = tree.start("alloc", 1 * MiB)
    sibling = tree.pod["cpu"] / "sibling"
    sibling.mkdir()
    try:
        tree.set("pod", "cpu.cfs_quota_us", 100000)  # pod = this container 50000 + the sibling 50000
        write_file(str(sibling / "cpu.cfs_quota_us"), "50000")
        cg = locate(pid=child.pid)
        applied = set_limits(cg, Limits(cpu_quota_us=150000))
        assert tree.read("pod", "cpu.cfs_quota_us") == "200000"
        # The sibling is raised next (its own change): the pod can no longer go back to 100000.
        write_file(str(sibling / "cpu.cfs_quota_us"), "180000")
        with pytest.raises(WriteFailed, match="EINVAL"):
            write_file(str(tree.pod["cpu"] / "cpu.cfs_quota_us"), "100000")
        before = _all_files(cg)
        with pytest.raises(cgroupctl.OrderingError) as info:
            restore(applied.snapshot)
        assert f"{sibling} (180000/100000 us)" in str(info.value) and "100000/100000 us" in str(info.value)
        assert _all_files(cg) == before, "a refused restore wrote something"
        # The sibling's change undone first, this restore goes through, exactly.
        write_file(str(sibling / "cpu.cfs_quota_us"), "50000")
        restore(applied.snapshot)
        assert _all_files(cg) == applied.snapshot.files
    finally:
        sibling.rmdir()
