"""Scenario driver run inside the VM: ``python3 -m guest.driver NAME``, prints one JSON line.

Each scenario performs its steps on real cgroup v2 files (by hand or through cgroupctl) and reports
what it read and measured; the host-side tests in tests/vm assert on that report.
"""

from __future__ import annotations

import sys
import time
import traceback

from guest import kcxguest as g

SCENARIOS = {}
WINDOW_S = 1.5
MIB = 2**20


def scenario(fn):
    SCENARIOS[fn.__name__.replace("_", "-")] = fn
    return fn


def _steps(plan) -> list[dict]:
    return [s.to_dict() for s in plan.steps]


@scenario
def smoke_cpu():
    """cpu.max written by hand: read back and enforced on a busy loop, then lifted."""
    cg = g.make_cgroup("kcx-smoke")
    busy = None
    try:
        report = {}
        busy = g.start_busy(cg)
        for label, value in (("q30", "30000 100000"), ("q70", "70000 100000"), ("max", "max 100000")):
            g.write(cg / "cpu.max", value)
            report[label] = {"cpu_max": g.read(cg / "cpu.max"), "cpus": g.measure_cpu(cg, WINDOW_S)}
        return report
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
        g.remove_cgroup(cg)


@scenario
def mode_locate():
    """detect_mode and locate on a kubelet-style (systemd driver) v2 layout."""
    import cgroupctl

    with g.FakePod({"cpu.max": "max 100000"}, {"cpu.max": "50000 100000", "memory.max": str(64 * MIB)}) as pod:
        proc = pod.busy()
        cg = cgroupctl.locate(pid=proc.pid)
        limits = cgroupctl.read_limits(cg)
        return {
            "mode": cgroupctl.detect_mode().value,
            "container": cg.container.to_dict(),
            "pod": cg.pod.to_dict() if cg.pod else None,
            "container_id": cg.container_id,
            "pod_uid": cg.pod_uid,
            "expected_container": str(pod.container),
            "expected_pod": str(pod.pod),
            "expected_container_id": g.CONTAINER_ID,
            "expected_pod_uid": g.POD_UID,
            "limits": limits.to_dict(),
        }


@scenario
def cpu_max():
    """Raise a container's quota through cgroupctl, measure, restore, measure again."""
    import cgroupctl

    with g.FakePod({"cpu.max": "max 100000"}, {"cpu.max": "20000 100000"}) as pod:
        proc = pod.busy()
        cg = cgroupctl.locate(pid=proc.pid)
        paths = cgroupctl.read.all_limit_paths(cg)
        before = g.raw_files(paths)
        cpus_before = g.measure_cpu(pod.container, WINDOW_S)
        applied = cgroupctl.set_limits(cg, cgroupctl.Limits(cpu_quota_us=60000))
        cpu_max_set = g.read(pod.container / "cpu.max")
        cpus_set = g.measure_cpu(pod.container, WINDOW_S)
        cgroupctl.restore(cgroupctl.Snapshot.from_dict(applied.snapshot.to_dict()))
        after = g.raw_files(paths)
        cpus_restored = g.measure_cpu(pod.container, WINDOW_S)
        return {
            "done": [d.to_dict() for d in applied.done],
            "limits": applied.limits.to_dict(),
            "cpu_max_set": cpu_max_set,
            "cpus_before": cpus_before,
            "cpus_set": cpus_set,
            "cpus_restored": cpus_restored,
            "files_before": before,
            "files_after": after,
        }


@scenario
def parent_caps_child():
    """On v2 a child's cpu.max above its parent's is accepted but capped; cgroupctl raises the pod
    first, so the container really gets the new quota."""
    import cgroupctl

    with g.FakePod({"cpu.max": "30000 100000"}, {"cpu.max": "30000 100000"}) as pod:
        proc = pod.busy()
        cg = cgroupctl.locate(pid=proc.pid)
        paths = cgroupctl.read.all_limit_paths(cg)
        before = g.raw_files(paths)
        # By hand, container only: the write succeeds, the parent caps.
        g.write(pod.container / "cpu.max", "80000 100000")
        by_hand = {"container_cpu_max": g.read(pod.container / "cpu.max"),
                   "pod_cpu_max": g.read(pod.pod / "cpu.max"),
                   "cpus": g.measure_cpu(pod.container, WINDOW_S)}
        g.write(pod.container / "cpu.max", "30000 100000")
        # Through cgroupctl.
        state = cgroupctl.read_state(cg)
        saved = cgroupctl.Snapshot(cgroups=cg, files=dict(state.files))
        plan = cgroupctl.plan(state, cgroupctl.Limits(cpu_quota_us=80000))
        cgroupctl.apply(plan)
        via_cgroupctl = {"container_cpu_max": g.read(pod.container / "cpu.max"),
                         "pod_cpu_max": g.read(pod.pod / "cpu.max"),
                         "cpus": g.measure_cpu(pod.container, WINDOW_S)}
        restore_plan = cgroupctl.plan_restore(cgroupctl.read_state(cg), saved)
        cgroupctl.restore(saved)
        return {
            "by_hand": by_hand,
            "via_cgroupctl": via_cgroupctl,
            "plan": _steps(plan),
            "restore_plan": _steps(restore_plan),
            "files_before": before,
            "files_after": g.raw_files(paths),
        }


@scenario
def pod_change():
    """The agent's runtime path: prepare_pod changes the pod around a container change someone
    else (the runtime, here a plain write) makes; raise then lower (which leaves the pod raised)."""
    import cgroupctl

    with g.FakePod({"cpu.max": "30000 100000"}, {"cpu.max": "30000 100000"}) as pod:
        proc = pod.busy()
        cg = cgroupctl.locate(pid=proc.pid)
        report = {}
        for label, quota in (("raise", 80000), ("lower", 10000)):
            change = cgroupctl.prepare_pod(cg, cgroupctl.Limits(cpu_quota_us=quota))
            pod_before_runtime = g.read(pod.pod / "cpu.max")
            g.write(pod.container / "cpu.max", f"{quota} 100000")
            finished = change.finish()
            report[label] = {
                "pod_before_runtime": pod_before_runtime,
                "before_done": [d.to_dict() for d in change.before.done],
                "finish_done": [d.to_dict() for d in finished.done],
                "pod_after": g.read(pod.pod / "cpu.max"),
                "container_after": g.read(pod.container / "cpu.max"),
            }
        return report


@scenario
def memory_max():
    """Raise and lower memory.max under a process holding 32 MiB, stepping through the lowering
    plan to observe memory.high staged before memory.max."""
    import cgroupctl

    with g.FakePod({"memory.max": str(128 * MIB)}, {"memory.max": str(128 * MIB)}) as pod:
        holder = pod.hold(32 * MIB)
        cg = cgroupctl.locate(pid=holder.pid)
        paths = cgroupctl.read.all_limit_paths(cg)
        before = g.raw_files(paths)
        saved = cgroupctl.snapshot(cg)
        usage = cgroupctl.read_usage(cg)

        raise_plan = cgroupctl.plan(cgroupctl.read_state(cg), cgroupctl.Limits(memory_limit_bytes=192 * MIB))
        cgroupctl.apply(raise_plan)
        raised = g.raw_files(paths)

        lower_plan = cgroupctl.plan(cgroupctl.read_state(cg), cgroupctl.Limits(memory_limit_bytes=64 * MIB))
        observed = []
        for step in lower_plan.steps:
            cgroupctl.apply(cgroupctl.Plan((step,)))
            observed.append({
                "step": step.to_dict(),
                "container": {n: g.read(pod.container / n) for n in ("memory.high", "memory.max")},
                "pod": {n: g.read(pod.pod / n) for n in ("memory.high", "memory.max")},
            })
        lowered = g.raw_files(paths)
        events = g.memory_events(pod.container)
        holder_alive = holder.poll() is None
        cgroupctl.restore(saved)
        return {
            "usage": usage.to_dict(),
            "raise_plan": _steps(raise_plan),
            "raised": raised,
            "lower_plan": _steps(lower_plan),
            "observed": observed,
            "lowered": lowered,
            "memory_events": events,
            "holder_alive": holder_alive,
            "files_before": before,
            "files_after": g.raw_files(paths),
        }


@scenario
def memory_high_follows():
    """MemoryQoS-style memory.high (0.9 x memory.max) on container and pod: a raise through
    cgroupctl moves memory.high with memory.max, so the container really can use the new room
    (no memory.high throttling); restore puts every file back byte for byte."""
    import cgroupctl

    high = int(0.9 * 128 * MIB) // 4096 * 4096
    pod_high = int(0.9 * 192 * MIB) // 4096 * 4096
    with g.FakePod({"memory.max": str(192 * MIB), "memory.high": str(pod_high)},
                   {"memory.max": str(128 * MIB), "memory.high": str(high)}) as pod:
        first = pod.hold(80 * MIB)
        cg = cgroupctl.locate(pid=first.pid)
        paths = cgroupctl.read.all_limit_paths(cg)
        before = g.raw_files(paths)
        events_before = g.memory_events(pod.container)
        applied = cgroupctl.set_limits(cg, cgroupctl.Limits(memory_limit_bytes=256 * MIB))
        raised = g.raw_files(paths)
        # 70 MiB more: far above the old memory.high, well under the moved one.
        started = time.monotonic()
        second = pod.hold(70 * MIB)
        second_s = time.monotonic() - started
        usage_raised = cgroupctl.read_usage(cg)
        events_raised = g.memory_events(pod.container)
        second.kill()
        second.wait()
        restored = cgroupctl.restore(cgroupctl.Snapshot.from_dict(applied.snapshot.to_dict()))
        return {
            "high": high,
            "pod_high": pod_high,
            "plan_done": [d.to_dict() for d in applied.done],
            "raised": raised,
            "second_s": second_s,
            "usage_raised": usage_raised.to_dict(),
            "events_before": events_before,
            "events_raised": events_raised,
            "restore_done": [d.to_dict() for d in restored.done],
            "files_before": before,
            "files_after": g.raw_files(paths),
            "first_alive": first.poll() is None,
        }


@scenario
def memory_below_usage():
    """Lowering memory.max below what a process holds: refused without force (nothing written);
    with force the kernel reclaims, fails, and OOM-kills it."""
    import cgroupctl

    with g.FakePod({"memory.max": "max"}, {"memory.max": str(128 * MIB)}) as pod:
        holder = pod.hold(48 * MIB)
        cg = cgroupctl.locate(pid=holder.pid)
        paths = cgroupctl.read.all_limit_paths(cg)
        before = g.raw_files(paths)
        usage = cgroupctl.read_usage(cg)
        refused = None
        try:
            cgroupctl.set_limits(cg, cgroupctl.Limits(memory_limit_bytes=16 * MIB))
        except cgroupctl.BelowUsage as e:
            refused = {"type": type(e).__name__, "message": str(e), "limit_bytes": e.limit_bytes,
                       "unreclaimable_bytes": e.unreclaimable_bytes}
        after_refusal = g.raw_files(paths)
        holder_alive_after_refusal = holder.poll() is None
        forced = cgroupctl.set_limits(cg, cgroupctl.Limits(memory_limit_bytes=16 * MIB), force=True)
        holder_status = holder.wait(timeout=10)
        events = g.memory_events(pod.container)
        memory_max_forced = g.read(pod.container / "memory.max")
        cgroupctl.restore(forced.snapshot)
        return {
            "usage": usage.to_dict(),
            "refused": refused,
            "after_refusal": after_refusal,
            "holder_alive_after_refusal": holder_alive_after_refusal,
            "forced_steps": [d.to_dict() for d in forced.done],
            "memory_max_forced": memory_max_forced,
            "holder_status": holder_status,
            "memory_events": events,
            "files_before": before,
            "files_after": g.raw_files(paths),
        }


@scenario
def restore_exact():
    """Odd starting values on every file cgroupctl may write (container and pod), two changes on
    top of each other, one restore: every file reads back byte for byte."""
    import cgroupctl

    pod_files = {"cpu.max": "150000 50000", "memory.max": str(300 * MIB), "memory.high": str(280 * MIB)}
    ctr_files = {"cpu.max": "12345 50000", "memory.max": str(100 * MIB + 7 * 4096),
                 "memory.high": str(90 * MIB), "memory.swap.max": "0"}
    with g.FakePod(pod_files, ctr_files) as pod:
        holder = pod.hold(8 * MIB)
        cg = cgroupctl.locate(pid=holder.pid)
        paths = cgroupctl.read.all_limit_paths(cg)
        before = g.raw_files(paths)
        first = cgroupctl.set_limits(cg, cgroupctl.Limits(cpu_quota_us=200000, memory_limit_bytes=400 * MIB))
        middle = g.raw_files(paths)
        cgroupctl.set_limits(cg, cgroupctl.Limits(cpu_quota_us=5000, cpu_period_us=10000,
                                                  memory_limit_bytes=40 * MIB))
        changed = g.raw_files(paths)
        restored = cgroupctl.restore(cgroupctl.Snapshot.from_dict(first.snapshot.to_dict()))
        return {
            "paths": paths,
            "files_before": before,
            "files_middle": middle,
            "files_changed": changed,
            "restore_done": [d.to_dict() for d in restored.done],
            "files_after": g.raw_files(paths),
        }


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in SCENARIOS:
        print(f"usage: python3 -m guest.driver {{{','.join(sorted(SCENARIOS))}}}", file=sys.stderr)
        return 2
    try:
        g.emit({"ok": True, "result": SCENARIOS[argv[0]]()})
    except Exception as e:
        traceback.print_exc()
        g.emit({"ok": False, "error": f"{type(e).__name__}: {e}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
