"""cgroupctl on a real cgroup v2 kernel (in the VM): mode, cpu.max, memory.max, parent capping,
exact restore. The steps run in the guest (tests/vm/guest/driver.py); these tests assert on what
the guest read and measured there. The guest has one vCPU: 1.0 = that CPU busy all the time."""

from __future__ import annotations

MIB = 2**20
# Measured CPU use tracks the quota within a few percent over 1.5 s windows; the tolerance allows for
# TCG on a shared host and still tells 0.2 from 0.3, 0.6 and 0.8 apart.
CPU_REL_TOLERANCE = 0.2


def assert_cpus(measured: float, quota_cpus: float, what: str) -> None:
    assert abs(measured - quota_cpus) <= quota_cpus * CPU_REL_TOLERANCE, (
        f"{what}: measured {measured:.3f} CPUs, quota {quota_cpus} (tolerance {CPU_REL_TOLERANCE:.0%})"
    )


def short(path: str) -> str:
    """The file name with its cgroup level, for readable assertion messages."""
    parts = path.split("/")
    return "container/" + parts[-1] if parts[-2].startswith("cri-containerd-") else "pod/" + parts[-1]


def changes(before: dict, after: dict) -> dict:
    return {short(p): (before.get(p), after.get(p)) for p in before.keys() | after.keys() if before.get(p) != after.get(p)}


def test_mode_is_v2_and_locate_finds_a_kubelet_systemd_layout(run_driver):
    r = run_driver("mode-locate")
    assert r["mode"] == "v2"
    assert r["container"] == dict.fromkeys(("cpu", "cpuacct", "memory"), r["expected_container"])
    assert r["pod"] == dict.fromkeys(("cpu", "cpuacct", "memory"), r["expected_pod"])
    assert (r["container_id"], r["pod_uid"]) == (r["expected_container_id"], r["expected_pod_uid"])
    limits = r["limits"]
    assert (limits["cpu_quota_us"], limits["cpu_period_us"], limits["memory_limit_bytes"]) == (50000, 100000, 64 * MIB)


def test_cpu_max_set_read_back_enforced_and_restored(run_driver, figures):
    r = run_driver("cpu-max")
    figures["cgroupctl cpu 20000/100000 -> 60000 -> restored: cpus"] = (
        f"{r['cpus_before']:.3f} -> {r['cpus_set']:.3f} -> {r['cpus_restored']:.3f}"
    )
    assert [(short(d["path"]), d["value"], d["read_back"]) for d in r["done"]] == [
        ("container/cpu.max", "60000 100000", "60000 100000")
    ]
    assert r["cpu_max_set"] == "60000 100000\n"
    assert (r["limits"]["cpu_quota_us"], r["limits"]["cpu_period_us"]) == (60000, 100000)
    assert_cpus(r["cpus_before"], 0.2, "before, cpu.max 20000 100000")
    assert_cpus(r["cpus_set"], 0.6, "after set_limits to 60000 us")
    assert_cpus(r["cpus_restored"], 0.2, "after restore")
    assert r["files_after"] == r["files_before"], changes(r["files_before"], r["files_after"])


def test_parent_caps_child_so_cgroupctl_raises_the_pod_first(run_driver, figures):
    r = run_driver("parent-caps-child")
    hand, ctl = r["by_hand"], r["via_cgroupctl"]
    figures["parent 0.3 caps child cpu.max 0.8 (by hand): cpus"] = round(hand["cpus"], 3)
    figures["pod raised first by cgroupctl, child 0.8: cpus"] = round(ctl["cpus"], 3)
    # v2 takes the child's write (v1 would refuse it with EINVAL) but the parent's quota still rules.
    assert (hand["container_cpu_max"], hand["pod_cpu_max"]) == ("80000 100000\n", "30000 100000\n")
    assert_cpus(hand["cpus"], 0.3, "child 0.8 under a 0.3 parent")
    assert [(s["stage"], short(s["path"]), s["value"]) for s in r["plan"]] == [
        ("pod-before", "pod/cpu.max", "80000 100000"),
        ("container", "container/cpu.max", "80000 100000"),
    ]
    assert (ctl["container_cpu_max"], ctl["pod_cpu_max"]) == ("80000 100000\n", "80000 100000\n")
    assert_cpus(ctl["cpus"], 0.8, "child 0.8 after the pod was raised")
    # Restore lowers the container before the pod.
    assert [(s["stage"], short(s["path"]), s["value"]) for s in r["restore_plan"]] == [
        ("container", "container/cpu.max", "30000 100000"),
        ("pod-after", "pod/cpu.max", "30000 100000"),
    ]
    assert r["files_after"] == r["files_before"], changes(r["files_before"], r["files_after"])


def test_prepare_pod_raises_before_and_never_lowers_around_a_runtime_change(run_driver):
    r = run_driver("pod-change")
    up, down = r["raise"], r["lower"]
    # Raise 0.3 -> 0.8: the pod is raised before the runtime touches the container, nothing after.
    assert up["pod_before_runtime"] == "80000 100000\n"
    assert [(short(d["path"]), d["value"]) for d in up["before_done"]] == [("pod/cpu.max", "80000 100000")]
    assert up["finish_done"] == []
    # Lower 0.8 -> 0.1: the pod keeps its quota, so a container re-created from its spec fits.
    assert down["pod_before_runtime"] == "80000 100000\n"
    assert down["before_done"] == []
    assert down["finish_done"] == []
    assert (down["pod_after"], down["container_after"]) == ("80000 100000\n", "10000 100000\n")


def test_memory_max_raise_then_lower_stages_memory_high_first(run_driver, figures):
    r = run_driver("memory-max")
    figures["memory holder usage (32 MiB held): bytes"] = r["usage"]["memory_usage_bytes"]
    assert r["usage"]["memory_usage_bytes"] >= 32 * MIB
    # Raise 128 -> 192 MiB, past the pod's 128 MiB: the pod first, by the same 64 MiB.
    assert [(s["stage"], short(s["path"]), s["value"]) for s in r["raise_plan"]] == [
        ("pod-before", "pod/memory.max", str(192 * MIB)),
        ("container", "container/memory.max", str(192 * MIB)),
    ]
    assert {short(p): v for p, v in r["raised"].items() if p.endswith("memory.max")} == {
        "pod/memory.max": f"{192 * MIB}\n", "container/memory.max": f"{192 * MIB}\n",
    }
    # Lower 192 -> 64 MiB, one step at a time, reading the files after each.
    seen = [
        (o["step"]["op"], o["step"]["stage"], short(o["step"]["path"]), o["step"].get("value"),
         o["container"]["memory.high"], o["container"]["memory.max"], o["pod"]["memory.max"])
        for o in r["observed"]
    ]
    c64, c192 = f"{64 * MIB}", f"{192 * MIB}"
    # The pod is not lowered: a container re-created from its spec must still fit under it.
    assert seen == [
        ("write", "container", "container/memory.high", c64, c64 + "\n", c192 + "\n", c192 + "\n"),
        ("check", "container", "container/memory.current", None, c64 + "\n", c192 + "\n", c192 + "\n"),
        ("write", "container", "container/memory.max", c64, c64 + "\n", c64 + "\n", c192 + "\n"),
        ("write", "container", "container/memory.high", "max", "max\n", c64 + "\n", c192 + "\n"),
    ]
    assert r["observed"][-1]["pod"]["memory.high"] == "max\n"
    # Nothing was killed or even throttled: the holder fits in 64 MiB.
    assert r["holder_alive"]
    assert (r["memory_events"]["oom_kill"], r["memory_events"]["max"]) == (0, 0), r["memory_events"]
    assert r["files_after"] == r["files_before"], changes(r["files_before"], r["files_after"])


def test_memory_below_usage_is_refused_without_force_and_oom_kills_with_it(run_driver):
    r = run_driver("memory-below-usage")
    held = r["usage"]["memory_unreclaimable_bytes"]
    assert held >= 48 * MIB
    refused = r["refused"]
    assert refused is not None, "set_limits to 16 MiB under a 48 MiB holder was not refused"
    assert refused["type"] == "BelowUsage"
    assert (refused["limit_bytes"], refused["unreclaimable_bytes"]) == (16 * MIB, held)
    assert str(16 * MIB) in refused["message"] and "force" in refused["message"]
    assert r["after_refusal"] == r["files_before"], "a refused change wrote something"
    assert r["holder_alive_after_refusal"]
    # Forced: memory.max is written directly and v2 OOM-kills the holder (what the refusal prevents).
    assert [(short(d["path"]), d["read_back"]) for d in r["forced_steps"]] == [("container/memory.max", str(16 * MIB))]
    assert r["memory_max_forced"] == f"{16 * MIB}\n"
    assert r["holder_status"] == -9
    assert r["memory_events"]["oom_kill"] >= 1
    assert r["files_after"] == r["files_before"], changes(r["files_before"], r["files_after"])


def test_restore_is_byte_exact_after_stacked_changes(run_driver):
    r = run_driver("restore-exact")
    assert sorted(short(p) for p in r["paths"]) == sorted(
        f"{level}/{name}" for level in ("container", "pod")
        for name in ("cpu.max", "memory.max", "memory.high", "memory.swap.max")
    )
    assert set(r["files_before"]) == set(r["paths"]), "every limit file exists on v2"
    changed = changes(r["files_before"], r["files_changed"])
    assert {"container/cpu.max", "pod/cpu.max", "container/memory.max", "pod/memory.max"} <= changed.keys()
    assert r["files_after"] == r["files_before"], changes(r["files_before"], r["files_after"])


def test_memory_high_follows_a_raise_so_the_container_can_use_it_and_restores_exactly(run_driver, figures):
    r = run_driver("memory-high-follows")
    high, pod_high = r["high"], r["pod_high"]
    figures["memory.high moved with memory.max 128 -> 256 MiB: 70 MiB more allocated in s"] = round(r["second_s"], 2)
    # Past the pod's 192 MiB: pod raised first by the container's gain (memory.max, then its
    # memory.high in proportion), then the container.
    moved_pod_high = pod_high * 320 // 192 // 4096 * 4096
    assert [(short(d["path"]), d["value"]) for d in r["plan_done"]] == [
        ("pod/memory.max", str(320 * MIB)), ("pod/memory.high", str(moved_pod_high)),
        ("container/memory.max", str(256 * MIB)), ("container/memory.high", str(high * 2)),
    ]
    assert {short(p): v for p, v in r["raised"].items() if "memory.high" in p} == {
        "container/memory.high": f"{high * 2}\n", "pod/memory.high": f"{moved_pod_high}\n"}
    # The container now holds well over its old memory.high, and the kernel never had to hold it back.
    assert r["usage_raised"]["memory_usage_bytes"] > high + 16 * MIB
    assert r["events_raised"]["high"] == r["events_before"]["high"], (r["events_before"], r["events_raised"])
    assert (r["events_raised"]["max"], r["events_raised"]["oom_kill"]) == (0, 0)
    # Restore: memory.high back first (under the usage it is at), then memory.max; byte for byte.
    assert [short(d["path"]) for d in r["restore_done"]] == [
        "container/memory.high", "container/memory.max", "pod/memory.high", "pod/memory.max"]
    assert r["first_alive"]
    assert r["files_after"] == r["files_before"], changes(r["files_before"], r["files_after"])
