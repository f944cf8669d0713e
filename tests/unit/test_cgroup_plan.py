"""cgroupctl.plan: the ordering tables (pure, no files): pod around container, memsw around memory,
v2 memory.high before memory.max, kernel bounds, memory safety."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cgroupctl import (
    CONTAINER,
    POD_AFTER,
    POD_BEFORE,
    UNLIMITED,
    BelowUsage,
    CgroupDirs,
    Check,
    ContainerCgroups,
    Limits,
    Mode,
    OrderingError,
    OutOfRange,
    Plan,
    Snapshot,
    State,
    Usage,
    plan,
    plan_restore,
)

MiB = 1 << 20
V1_UNLIMITED = "9223372036854771712"
DIRS = {"ctr": "/cg/pod/ctr", "pod": "/cg/pod"}


def _text(value) -> str:
    """A v1 memory file's content (the kernel shows no limit as PAGE_COUNTER_MAX in bytes)."""
    return V1_UNLIMITED if value is UNLIMITED else str(value)


def v1_state(*, ctr_q=50000, ctr_p=100000, pod_q=50000, pod_p=100000, ctr_mem=128 * MiB, ctr_memsw="same",
             pod_mem=128 * MiB, pod_memsw=UNLIMITED, ctr_floor=30 * MiB, pod_floor=40 * MiB) -> State:
    cpu = {"ctr": "/cg/cpu/pod/ctr", "pod": "/cg/cpu/pod"}
    mem = {"ctr": "/cg/memory/pod/ctr", "pod": "/cg/memory/pod"}
    if ctr_memsw == "same":
        ctr_memsw = ctr_mem
    files = {
        f"{cpu['ctr']}/cpu.cfs_quota_us": "-1" if ctr_q is UNLIMITED else str(ctr_q),
        f"{cpu['ctr']}/cpu.cfs_period_us": str(ctr_p),
        f"{cpu['pod']}/cpu.cfs_quota_us": "-1" if pod_q is UNLIMITED else str(pod_q),
        f"{cpu['pod']}/cpu.cfs_period_us": str(pod_p),
        f"{mem['ctr']}/memory.limit_in_bytes": _text(ctr_mem),
        f"{mem['ctr']}/memory.memsw.limit_in_bytes": _text(ctr_memsw),
        f"{mem['pod']}/memory.limit_in_bytes": _text(pod_mem),
        f"{mem['pod']}/memory.memsw.limit_in_bytes": _text(pod_memsw),
    }
    cg = ContainerCgroups(mode=Mode.HYBRID, container=CgroupDirs(cpu=cpu["ctr"], cpuacct=cpu["ctr"], memory=mem["ctr"]),
                          pod=CgroupDirs(cpu=cpu["pod"], cpuacct=cpu["pod"], memory=mem["pod"]))
    return State(cgroups=cg, files=files,
                 container_usage=Usage(memory_usage_bytes=ctr_floor + 6 * MiB, memory_unreclaimable_bytes=ctr_floor),
                 pod_usage=Usage(memory_usage_bytes=pod_floor + 8 * MiB, memory_unreclaimable_bytes=pod_floor))


def v2_state(*, ctr_cpu="50000 100000", pod_cpu="50000 100000", ctr_max=str(128 * MiB), ctr_high="max",
             ctr_swap="0", pod_max=str(128 * MiB), pod_high="max", ctr_floor=30 * MiB, pod_floor=40 * MiB) -> State:
    files = {
        f"{DIRS['ctr']}/cpu.max": ctr_cpu, f"{DIRS['pod']}/cpu.max": pod_cpu,
        f"{DIRS['ctr']}/memory.max": ctr_max, f"{DIRS['ctr']}/memory.high": ctr_high,
        f"{DIRS['ctr']}/memory.swap.max": ctr_swap,
        f"{DIRS['pod']}/memory.max": pod_max, f"{DIRS['pod']}/memory.high": pod_high,
        f"{DIRS['pod']}/memory.swap.max": "max",
    }
    d = {k: CgroupDirs(cpu=v, cpuacct=v, memory=v) for k, v in DIRS.items()}
    return State(cgroups=ContainerCgroups(mode=Mode.V2, container=d["ctr"], pod=d["pod"]), files=files,
                 container_usage=Usage(memory_usage_bytes=ctr_floor + 6 * MiB, memory_unreclaimable_bytes=ctr_floor),
                 pod_usage=Usage(memory_usage_bytes=pod_floor + 8 * MiB, memory_unreclaimable_bytes=pod_floor))


def table(p: Plan) -> list[tuple]:
    """(stage, level, file, value) per write; ("check", level, file, max) per check."""
    rows = []
    for s in p.steps:
        level = "ctr" if "/ctr/" in s.path else "pod"
        name = s.path.rsplit("/", 1)[1]
        rows.append((s.stage, level, name, s.max_bytes) if isinstance(s, Check) else (s.stage, level, name, s.value))
    return rows


# ---- v1 CPU ------------------------------------------------------------------------------------


def test_v1_cpu_raise_goes_pod_first():
    p = plan(v1_state(), Limits(cpu_quota_us=150000))
    assert table(p) == [(POD_BEFORE, "pod", "cpu.cfs_quota_us", "150000"),
                        (CONTAINER, "ctr", "cpu.cfs_quota_us", "150000")]


def test_v1_cpu_lower_leaves_the_pod_as_it_is():
    # A lowering never lowers the pod: a container re-created from its spec must still fit under it.
    p = plan(v1_state(ctr_q=150000, pod_q=250000), Limits(cpu_quota_us=50000))
    assert table(p) == [(CONTAINER, "ctr", "cpu.cfs_quota_us", "50000")]


def test_v1_cpu_raise_keeps_the_pods_other_part():
    # Pod 250000 = this container 150000 + another 100000: the pod grows by what this one gains.
    p = plan(v1_state(ctr_q=150000, pod_q=250000), Limits(cpu_quota_us=300000))
    assert table(p) == [(POD_BEFORE, "pod", "cpu.cfs_quota_us", "400000"),
                        (CONTAINER, "ctr", "cpu.cfs_quota_us", "300000")]


def test_v1_cpu_raise_within_the_pod_leaves_it_alone_so_cycles_do_not_ratchet_it():
    # Raised to 150000 (pod too), lowered to 50000 (pod kept), raised back: the pod has the room.
    assert table(plan(v1_state(ctr_q=50000, pod_q=150000), Limits(cpu_quota_us=150000))) == [
        (CONTAINER, "ctr", "cpu.cfs_quota_us", "150000")]
    # Past the pod's value it grows by what the container gains beyond its current limit.
    assert table(plan(v1_state(ctr_q=50000, pod_q=150000), Limits(cpu_quota_us=200000))) == [
        (POD_BEFORE, "pod", "cpu.cfs_quota_us", "300000"), (CONTAINER, "ctr", "cpu.cfs_quota_us", "200000")]


def test_v1_cpu_unlimited_pod_is_left_alone():
    assert table(plan(v1_state(pod_q=UNLIMITED), Limits(cpu_quota_us=300000))) == [
        (CONTAINER, "ctr", "cpu.cfs_quota_us", "300000")]


def test_v1_cpu_unlimited_container_makes_the_pod_unlimited_first():
    assert table(plan(v1_state(), Limits(cpu_quota_us=UNLIMITED))) == [
        (POD_BEFORE, "pod", "cpu.cfs_quota_us", "-1"), (CONTAINER, "ctr", "cpu.cfs_quota_us", "-1")]


def test_v1_cpu_from_unlimited_container_raises_pod_only_if_needed():
    assert table(plan(v1_state(ctr_q=UNLIMITED, pod_q=100000), Limits(cpu_quota_us=50000))) == [
        (CONTAINER, "ctr", "cpu.cfs_quota_us", "50000")]
    assert table(plan(v1_state(ctr_q=UNLIMITED, pod_q=100000), Limits(cpu_quota_us=200000)))[0] == (
        POD_BEFORE, "pod", "cpu.cfs_quota_us", "200000")


def test_v1_cpu_keeps_the_containers_period_and_compares_ratios_in_the_pods_period():
    # Container at 25000/50000 (0.5 CPU) -> 50000/50000 (1 CPU): the pod (period 100000) needs +50000.
    p = plan(v1_state(ctr_q=25000, ctr_p=50000, pod_q=50000), Limits(cpu_quota_us=50000))
    assert table(p) == [(POD_BEFORE, "pod", "cpu.cfs_quota_us", "100000"),
                        (CONTAINER, "ctr", "cpu.cfs_quota_us", "50000")]


@pytest.mark.parametrize("new_q, new_p, first", [
    (20000, 10000, "cpu.cfs_quota_us"),   # 0.5 -> 2 CPU: (20000/100000) is the lower intermediate
    (200000, 400000, "cpu.cfs_period_us"),  # 0.5 -> 0.5 CPU at a longer period: (50000/400000) lower
])
def test_v1_quota_and_period_both_change_through_the_lower_intermediate_ratio(new_q, new_p, first):
    p = plan(v1_state(pod_q=UNLIMITED), Limits(cpu_quota_us=new_q, cpu_period_us=new_p))
    assert [row[2] for row in table(p)][0] == first
    assert {row[2]: row[3] for row in table(p)} == {"cpu.cfs_quota_us": str(new_q), "cpu.cfs_period_us": str(new_p)}


@pytest.mark.parametrize("request_, fragment", [
    (Limits(cpu_quota_us=500), "below the kernel's minimum 1000 us"),
    (Limits(cpu_period_us=2_000_000), "outside the kernel's range"),
    (Limits(cpu_shares=1024), "cpu_shares cannot be set"),
    (Limits(memory_limit_bytes=0), "outside 1.."),
    (Limits(memory_limit_bytes=-5), "outside 1.."),
])
def test_out_of_range_requests_are_refused_with_the_accepted_range(request_, fragment):
    with pytest.raises(OutOfRange, match=fragment):
        plan(v1_state(), request_)


# ---- v1 memory ---------------------------------------------------------------------------------


def test_v1_memory_raise_writes_pod_then_memsw_then_limit():
    p = plan(v1_state(), Limits(memory_limit_bytes=256 * MiB))
    assert table(p) == [(POD_BEFORE, "pod", "memory.limit_in_bytes", str(256 * MiB)),
                        (CONTAINER, "ctr", "memory.memsw.limit_in_bytes", str(256 * MiB)),
                        (CONTAINER, "ctr", "memory.limit_in_bytes", str(256 * MiB))]


def test_v1_memory_lower_writes_limit_then_memsw_and_leaves_the_pod():
    p = plan(v1_state(), Limits(memory_limit_bytes=64 * MiB))
    assert table(p) == [(CONTAINER, "ctr", "memory.limit_in_bytes", str(64 * MiB)),
                        (CONTAINER, "ctr", "memory.memsw.limit_in_bytes", str(64 * MiB))]


def test_v1_memory_keeps_the_swap_allowance_and_a_limited_pod_memsw():
    p = plan(v1_state(ctr_memsw=192 * MiB, pod_memsw=192 * MiB), Limits(memory_limit_bytes=256 * MiB))
    assert table(p) == [(POD_BEFORE, "pod", "memory.memsw.limit_in_bytes", str(320 * MiB)),
                        (POD_BEFORE, "pod", "memory.limit_in_bytes", str(256 * MiB)),
                        (CONTAINER, "ctr", "memory.memsw.limit_in_bytes", str(320 * MiB)),
                        (CONTAINER, "ctr", "memory.limit_in_bytes", str(256 * MiB))]


def test_v1_memory_unlimited_lifts_memsw_first():
    p = plan(v1_state(pod_mem=UNLIMITED), Limits(memory_limit_bytes=UNLIMITED))
    assert table(p) == [(CONTAINER, "ctr", "memory.memsw.limit_in_bytes", "-1"),
                        (CONTAINER, "ctr", "memory.limit_in_bytes", "-1")]


def test_v1_memory_swap_below_memory_is_an_ordering_error():
    with pytest.raises(OrderingError, match="below the memory limit"):
        plan(v1_state(), Limits(memory_limit_bytes=128 * MiB, memory_swap_limit_bytes=64 * MiB))


def test_memory_below_unreclaimable_usage_is_refused_with_the_usage_unless_forced():
    with pytest.raises(BelowUsage) as info:
        plan(v1_state(ctr_floor=100 * MiB), Limits(memory_limit_bytes=64 * MiB))
    message = str(info.value)
    assert str(100 * MiB) in message and "(100.0 MiB)" in message and str(64 * MiB) in message
    assert info.value.unreclaimable_bytes == 100 * MiB
    assert plan(v1_state(ctr_floor=100 * MiB), Limits(memory_limit_bytes=64 * MiB), force=True)


def test_a_lowering_is_not_refused_for_a_siblings_usage():
    # The container fits; the pod (this container + a sibling using 90 MiB) is not lowered, so the
    # sibling's usage cannot refuse the change and nothing in the pod is squeezed.
    p = plan(v1_state(ctr_floor=10 * MiB, pod_floor=100 * MiB), Limits(memory_limit_bytes=32 * MiB))
    assert [w[1] for w in table(p)] == ["ctr", "ctr"]


# ---- v2 ----------------------------------------------------------------------------------------


def test_v2_cpu_is_one_write_pod_first_on_raise():
    p = plan(v2_state(), Limits(cpu_quota_us=150000))
    assert table(p) == [(POD_BEFORE, "pod", "cpu.max", "150000 100000"), (CONTAINER, "ctr", "cpu.max", "150000 100000")]


def test_v2_memory_lower_goes_through_memory_high_and_a_usage_check():
    p = plan(v2_state(), Limits(memory_limit_bytes=64 * MiB))
    v = str(64 * MiB)
    assert table(p) == [
        (CONTAINER, "ctr", "memory.high", v), ("container", "ctr", "memory.current", 64 * MiB),
        (CONTAINER, "ctr", "memory.max", v), (CONTAINER, "ctr", "memory.high", "max")]


def test_v2_memory_lower_moves_a_finite_high_first_keeping_its_proportion():
    # memory.high 32 of 128 MiB (1/4) -> 16 of 64 MiB, written first: it reclaims, it never OOM-kills.
    p = plan(v2_state(ctr_high=str(32 * MiB), pod_max="max"), Limits(memory_limit_bytes=64 * MiB))
    assert table(p) == [(CONTAINER, "ctr", "memory.high", str(16 * MiB)),
                        ("container", "ctr", "memory.current", 64 * MiB), (CONTAINER, "ctr", "memory.max", str(64 * MiB))]


def test_v2_memory_raise_moves_the_kubelets_memory_high_with_it():
    # MemoryQoS: memory.high = 0.9 x memory.max. Raising memory.max alone would leave the container
    # throttled at the old 115 MiB; memory.high follows at the same proportion, after memory.max.
    high = int(0.9 * 128 * MiB) // 4096 * 4096
    p = plan(v2_state(ctr_high=str(high), pod_max="max"), Limits(memory_limit_bytes=2048 * MiB))
    assert table(p) == [(CONTAINER, "ctr", "memory.max", str(2048 * MiB)), (CONTAINER, "ctr", "memory.high", str(high * 16))]


def test_v2_memory_raise_moves_a_raised_pods_finite_high_too():
    p = plan(v2_state(pod_max=str(256 * MiB), pod_high=str(192 * MiB), ctr_high=str(96 * MiB)),
             Limits(memory_limit_bytes=320 * MiB))
    assert table(p) == [(POD_BEFORE, "pod", "memory.max", str(448 * MiB)), (POD_BEFORE, "pod", "memory.high", str(336 * MiB)),
                        (CONTAINER, "ctr", "memory.max", str(320 * MiB)), (CONTAINER, "ctr", "memory.high", str(240 * MiB))]


def test_v2_memory_high_page_aligned_lifted_with_the_limit_and_inert_one_left():
    odd = plan(v2_state(ctr_high=str(100 * MiB + 12345), pod_max="max"), Limits(memory_limit_bytes=200 * MiB))
    high = int(table(odd)[-1][3])
    assert high % 4096 == 0 and 0 <= (100 * MiB + 12345) * 200 / 128 - high < 4096
    lifted = plan(v2_state(ctr_high=str(96 * MiB), pod_max="max"), Limits(memory_limit_bytes=UNLIMITED))
    assert table(lifted) == [(CONTAINER, "ctr", "memory.max", "max"), (CONTAINER, "ctr", "memory.high", "max")]
    # memory.high at memory.max does nothing today; it is not made to do something.
    inert = plan(v2_state(ctr_high=str(128 * MiB), pod_max="max"), Limits(memory_limit_bytes=256 * MiB))
    assert table(inert) == [(CONTAINER, "ctr", "memory.max", str(256 * MiB))]


def test_restore_after_a_raise_puts_memory_high_back_first_and_exactly():
    before = v2_state(ctr_high=str(115 * MiB + 4096 * 3), pod_max="max")
    raised = plan(before, Limits(memory_limit_bytes=1024 * MiB))
    after = v2_state(ctr_max=str(1024 * MiB), ctr_high=table(raised)[-1][3], pod_max="max")
    p = plan_restore(after, Snapshot(cgroups=before.cgroups, files=dict(before.files)))
    assert table(p) == [(CONTAINER, "ctr", "memory.high", str(115 * MiB + 4096 * 3)),
                        (CONTAINER, "ctr", "memory.current", 128 * MiB), (CONTAINER, "ctr", "memory.max", str(128 * MiB))]


def test_v2_forced_lower_writes_memory_max_alone():
    p = plan(v2_state(pod_max="max"), Limits(memory_limit_bytes=16 * MiB), force=True)
    assert table(p) == [(CONTAINER, "ctr", "memory.max", str(16 * MiB))]


def test_v2_memory_raise_and_swap():
    p = plan(v2_state(pod_max="max"), Limits(memory_limit_bytes=256 * MiB, memory_swap_limit_bytes=320 * MiB))
    assert table(p) == [(CONTAINER, "ctr", "memory.max", str(256 * MiB)),
                        (CONTAINER, "ctr", "memory.swap.max", str(64 * MiB))]


def test_nothing_to_change_is_an_empty_plan():
    assert not plan(v1_state(), Limits(cpu_quota_us=50000, memory_limit_bytes=128 * MiB))
    assert not plan(v2_state(), Limits())


def test_plan_json_round_trip_and_stages():
    p = plan(v2_state(), Limits(cpu_quota_us=150000, memory_limit_bytes=64 * MiB))
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert [s.stage for s in p.pod_before.steps] == [POD_BEFORE]
    assert len(p.pod_after) == 0  # the memory lowering leaves the pod alone
    assert p.container.paths == (f"{DIRS['ctr']}/cpu.max", f"{DIRS['ctr']}/memory.high", f"{DIRS['ctr']}/memory.max")


# ---- restore -----------------------------------------------------------------------------------


def test_restore_puts_back_exact_texts_in_safe_order_v1():
    before = v1_state()
    after = v1_state(ctr_q=150000, pod_q=150000, ctr_mem=256 * MiB, pod_mem=256 * MiB)
    p = plan_restore(after, Snapshot(cgroups=before.cgroups, files=dict(before.files)))
    assert table(p) == [
        (CONTAINER, "ctr", "cpu.cfs_quota_us", "50000"),
        (CONTAINER, "ctr", "memory.limit_in_bytes", str(128 * MiB)),
        (CONTAINER, "ctr", "memory.memsw.limit_in_bytes", str(128 * MiB)),
        (POD_AFTER, "pod", "cpu.cfs_quota_us", "50000"),
        (POD_AFTER, "pod", "memory.limit_in_bytes", str(128 * MiB)),
    ]


def test_restore_writes_saved_texts_verbatim_and_raises_pod_first():
    before = v1_state(ctr_mem=UNLIMITED, pod_mem=UNLIMITED)
    after = v1_state(ctr_mem=64 * MiB, pod_mem=64 * MiB, ctr_floor=1 * MiB, pod_floor=1 * MiB)
    p = plan_restore(after, Snapshot(cgroups=before.cgroups, files=dict(before.files)))
    assert table(p) == [
        (POD_BEFORE, "pod", "memory.limit_in_bytes", V1_UNLIMITED),
        (CONTAINER, "ctr", "memory.memsw.limit_in_bytes", V1_UNLIMITED),
        (CONTAINER, "ctr", "memory.limit_in_bytes", V1_UNLIMITED),
    ]


def test_restore_v2_lowering_uses_memory_high_and_puts_saved_high_back():
    before = v2_state(ctr_high=str(100 * MiB), pod_max="max")
    after = v2_state(ctr_max=str(256 * MiB), ctr_high="max", pod_max="max")
    p = plan_restore(after, Snapshot(cgroups=before.cgroups, files=dict(before.files)))
    # The saved memory.high is under the restored memory.max: it goes first, as the saved text.
    assert table(p) == [
        (CONTAINER, "ctr", "memory.high", str(100 * MiB)), (CONTAINER, "ctr", "memory.current", 128 * MiB),
        (CONTAINER, "ctr", "memory.max", str(128 * MiB))]


def test_restore_with_memory_high_above_the_saved_max_stages_it_temporarily():
    before = v2_state(ctr_high="max", pod_max="max")
    after = v2_state(ctr_max=str(256 * MiB), ctr_high="max", pod_max="max")
    p = plan_restore(after, Snapshot(cgroups=before.cgroups, files=dict(before.files)))
    assert table(p) == [
        (CONTAINER, "ctr", "memory.high", str(128 * MiB)), (CONTAINER, "ctr", "memory.current", 128 * MiB),
        (CONTAINER, "ctr", "memory.max", str(128 * MiB)), (CONTAINER, "ctr", "memory.high", "max")]


def _with_sibling(state: State, quota: str, period: str = "100000") -> State:
    sib = "/cg/cpu/pod/sibling"
    return dataclasses.replace(state, pod_children={f"{sib}/cpu.cfs_quota_us": quota, f"{sib}/cpu.cfs_period_us": period})


def test_restore_refuses_to_lower_the_pod_under_a_raised_sibling_naming_it():
    # Two containers of one pod raised in turn: restoring the first would put the pod back under the
    # second one's raised quota, which v1 refuses with EINVAL. Refused up front, nothing written.
    before = v1_state(ctr_q=50000, pod_q=100000)
    after = _with_sibling(v1_state(ctr_q=150000, pod_q=350000), "200000")
    with pytest.raises(OrderingError) as e:
        plan_restore(after, Snapshot(cgroups=before.cgroups, files=dict(before.files)))
    assert "/cg/cpu/pod/sibling (200000/100000 us)" in str(e.value) and "100000/100000 us" in str(e.value)
    assert "Nothing was changed" in str(e.value) and "EINVAL" in str(e.value)
    # A sibling at or under the restored pod quota (or unlimited: it inherits the pod's) is no obstacle.
    for quota in ("100000", "-1"):
        assert plan_restore(_with_sibling(v1_state(ctr_q=150000, pod_q=350000), quota),
                            Snapshot(cgroups=before.cgroups, files=dict(before.files)))


def test_restore_below_usage_is_refused_unless_forced():
    before = v1_state()
    after = v1_state(ctr_mem=256 * MiB, pod_mem=256 * MiB, ctr_floor=200 * MiB)
    snap = Snapshot(cgroups=before.cgroups, files=dict(before.files))
    with pytest.raises(BelowUsage):
        plan_restore(after, snap)
    assert plan_restore(after, snap, force=True)


def test_a_first_memory_limit_comes_without_swap_as_containerd_sets_it():
    p = plan(v1_state(ctr_mem=UNLIMITED, ctr_memsw=UNLIMITED, pod_mem=UNLIMITED), Limits(memory_limit_bytes=64 * MiB))
    assert table(p) == [(CONTAINER, "ctr", "memory.limit_in_bytes", str(64 * MiB)),
                        (CONTAINER, "ctr", "memory.memsw.limit_in_bytes", str(64 * MiB))]
    p = plan(v2_state(ctr_max="max", ctr_swap="max", pod_max="max"), Limits(memory_limit_bytes=64 * MiB))
    assert table(p) == [(CONTAINER, "ctr", "memory.high", str(64 * MiB)), ("container", "ctr", "memory.current", 64 * MiB),
                        (CONTAINER, "ctr", "memory.max", str(64 * MiB)), (CONTAINER, "ctr", "memory.high", "max"),
                        (CONTAINER, "ctr", "memory.swap.max", "0")]
    # An explicitly unlimited swap beside a finite limit is left as it is.
    p = plan(v1_state(ctr_memsw=UNLIMITED, pod_mem=UNLIMITED), Limits(memory_limit_bytes=64 * MiB))
    assert table(p) == [(CONTAINER, "ctr", "memory.limit_in_bytes", str(64 * MiB))]


def test_changing_only_the_period_of_an_unlimited_container_leaves_the_pod_alone():
    assert table(plan(v1_state(ctr_q=UNLIMITED), Limits(cpu_period_us=50000))) == [
        (CONTAINER, "ctr", "cpu.cfs_period_us", "50000")]


def test_the_pod_is_raised_only_where_the_container_would_exceed_it():
    # Pod 0.5 CPU and 64 MiB, container 0.5 CPU and 32 MiB: which requests touch the pod, per controller.
    def pod_files(limits, **state):
        st = v1_state(**{"pod_q": 50000, "pod_mem": 64 * MiB, "ctr_mem": 32 * MiB, "ctr_floor": 1 * MiB,
                         "pod_floor": 1 * MiB, **state})
        return sorted({name for stage, level, name, _ in table(plan(st, limits)) if level == "pod"})

    assert pod_files(Limits(cpu_quota_us=30_000, memory_limit_bytes=16 * MiB)) == []
    assert pod_files(Limits(cpu_quota_us=150_000)) == ["cpu.cfs_quota_us"]
    assert pod_files(Limits(memory_limit_bytes=65 * MiB)) == ["memory.limit_in_bytes"]
    # A container period of 50 ms: 30000 us per 50 ms is 0.6 CPU, above the pod's 0.5.
    assert pod_files(Limits(cpu_quota_us=30_000), ctr_p=50_000) == ["cpu.cfs_quota_us"]
    assert pod_files(Limits(cpu_quota_us=10**7, memory_limit_bytes=2**40), pod_q=UNLIMITED, pod_mem=UNLIMITED) == []
    assert pod_files(Limits(cpu_quota_us=UNLIMITED, memory_limit_bytes=UNLIMITED)) == [
        "cpu.cfs_quota_us", "memory.limit_in_bytes"]
