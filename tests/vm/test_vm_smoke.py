"""The VM harness itself: a pure cgroup2 guest, and cpu.max enforced there (written by hand)."""

from __future__ import annotations

import pathlib

import pytest

from tests.support.vm import Vm, VmError, run_in_vm

# TCG and a host shared with other work make guest timing noisy; these bounds still tell a 0.3
# CPU quota from 0.7 and from none.
REL_TOLERANCE = 0.2


def test_guest_has_a_pure_cgroup2_with_cpu_memory_pids(vm):
    result = vm.run(
        "stat -f -c %t /sys/fs/cgroup; cat /sys/fs/cgroup/cgroup.controllers;"
        " cat /sys/fs/cgroup/cgroup.subtree_control; grep -c cgroup /proc/mounts",
        timeout_s=30,
    )
    assert result.exit_code == 0, result.stderr
    fstype, controllers, subtree, mounts = result.stdout.split("\n")[:4]
    assert fstype == "63677270", "CGROUP2_SUPER_MAGIC: /sys/fs/cgroup is cgroup2"
    assert {"cpu", "memory", "pids"} <= set(controllers.split())
    assert set(subtree.split()) == {"cpu", "memory", "pids"}
    assert mounts == "1", "only the cgroup2 mount, no v1 hierarchy"


def test_exit_code_and_stderr_come_back(vm):
    result = vm.run("echo out; echo err >&2; exit 7", timeout_s=30)
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 7)


def test_a_script_past_its_timeout_is_killed_and_the_vm_stays_usable(vm):
    result = vm.run("echo started; sleep 60; echo never", timeout_s=1)
    assert (result.timed_out, result.exit_code, result.stdout) == (True, -9, "started\n")
    assert vm.run("echo alive", timeout_s=30).stdout == "alive\n"


def test_run_in_vm_ships_files_directories_and_modules(vm_prerequisites):
    guest_dir = pathlib.Path(__file__).parent / "guest"
    result = run_in_vm(
        "cat /opt/t/data.txt; grep -c '^veth ' /proc/modules; ls /opt/t/tree; /opt/t/tool.sh",
        files={"/opt/t/data.txt": b"hello\n", "/opt/t/tool.sh": b"#!/bin/sh\nexit 3\n", "/opt/t/tree": guest_dir},
        timeout_s=30,
        modules=["veth"],
    )
    shipped = sorted(p.name for p in guest_dir.iterdir() if p.suffix == ".py")
    assert result.exit_code == 3, result.stderr
    lines = result.stdout.split("\n")
    assert lines[:2] == ["hello", "1"], "file content, then the veth module loaded"
    assert sorted(lines[2:-1]) == shipped, "no __pycache__, every .py file"


def test_a_guest_that_cannot_start_fails_with_the_console_tail(vm_prerequisites):
    with pytest.raises(VmError, match="Kernel panic") as failure:
        Vm(append="rdinit=/no-such-init", boot_timeout_s=60).boot()
    assert "console.log" in str(failure.value)


def test_cpu_max_written_by_hand_is_enforced(run_driver, figures):
    report = run_driver("smoke-cpu")
    figures["smoke cpu.max 30000/100000 -> cpus"] = round(report["q30"]["cpus"], 3)
    figures["smoke cpu.max 70000/100000 -> cpus"] = round(report["q70"]["cpus"], 3)
    figures["smoke cpu.max max -> cpus"] = round(report["max"]["cpus"], 3)
    assert report["q30"]["cpu_max"] == "30000 100000\n"
    assert report["q70"]["cpu_max"] == "70000 100000\n"
    assert report["max"]["cpu_max"] == "max 100000\n"
    assert abs(report["q30"]["cpus"] - 0.3) <= 0.3 * REL_TOLERANCE, report
    assert abs(report["q70"]["cpus"] - 0.7) <= 0.7 * REL_TOLERANCE, report
    # One vCPU: unlimited means nearly all of it, well above the 0.7 quota.
    assert report["max"]["cpus"] > 0.85, report
