"""Pure planning: current file contents + requested limits -> the ordered writes.

The kernel's ordering rules this encodes (cgroup v1 measured on this project's machine, v2 from the
kernel's documented behaviour):

* v1 cpu: a cgroup's quota/period ratio may not exceed its parent's (EINVAL), checked on every
  write and over the whole subtree. The kubelet gives the pod cgroup the sum of its containers'
  quotas, so a raise past the pod goes pod first, container second. A change never lowers the pod
  (a container re-created from its spec must still fit); a restore lowers it last, and is refused
  up front when another child's quota is above the pod's restored one.
  v2 accepts a child above its parent but silently caps it, so the same order is used for effect.
* v1 memory: memory.limit_in_bytes <= memory.memsw.limit_in_bytes at all times (EINVAL). Raising:
  memsw first; lowering: the limit first.
* v2 memory: memory.max below usage reclaims and then OOM-kills; memory.high below usage only
  reclaims and throttles. So a lowering writes memory.high first, checks memory.current fits, and
  only then writes memory.max, then puts memory.high back. A finite memory.high (the kubelet's
  MemoryQoS puts it below memory.max) moves with memory.max in proportion: left in place it would
  throttle a raised container at its old size.
* Memory below what the cgroup cannot give back is refused up front unless forced (v1 would fail
  with EBUSY after reclaiming; v2 would OOM-kill).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from fractions import Fraction

from cgroupctl.errors import BelowUsage, NotFound, OrderingError, OutOfRange
from cgroupctl.model import (
    CONTAINER,
    POD_AFTER,
    POD_BEFORE,
    UNLIMITED,
    CgroupDirs,
    Check,
    Limits,
    LimitValue,
    Plan,
    Snapshot,
    State,
    Step,
    Usage,
    Write,
    as_number,
)
from cgroupctl.parse import (
    CPU_QUOTA_MAX_US,
    CPU_QUOTA_MIN_US,
    check_cpu,
    check_memory,
    format_cpu_max,
    format_v1,
    format_v2,
    parse_cpu_max,
    parse_int,
    parse_v1_memory,
    parse_v1_quota,
    parse_v2_limit,
)

_READ_ONLY = ("cpu_shares", "cpu_weight", "memory_high_bytes")
# memory.high is kept page aligned (the kernel counts pages; 4 KiB is the smallest page size).
_PAGE_BYTES = 4096


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _ratio(quota: LimitValue, period_us: int) -> float:
    return math.inf if quota is UNLIMITED else quota / period_us  # type: ignore[operator]


def _file(d: str | None, name: str) -> str | None:
    return os.path.join(d, name) if d else None


# ---- reading current values out of State.files ------------------------------------------------


def _cpu_values(v2: bool, d: CgroupDirs | None, files: Mapping[str, str]) -> tuple[LimitValue, int] | None:
    if d is None or not d.cpu:
        return None
    if v2:
        text = files.get(os.path.join(d.cpu, "cpu.max"))
        return parse_cpu_max(text) if text is not None else None
    quota = files.get(os.path.join(d.cpu, "cpu.cfs_quota_us"))
    period = files.get(os.path.join(d.cpu, "cpu.cfs_period_us"))
    if quota is None or period is None:
        return None
    return parse_v1_quota(quota), parse_int(period, "cpu.cfs_period_us")


def _memory_values(v2: bool, d: CgroupDirs | None, files: Mapping[str, str]) -> dict[str, LimitValue] | None:
    """{"limit": .., "swap": .. (v1 memsw total / v2 swap.max), "high": .. (v2)}; missing files absent."""
    if d is None or not d.memory:
        return None
    names = ({"limit": "memory.max", "swap": "memory.swap.max", "high": "memory.high"} if v2
             else {"limit": "memory.limit_in_bytes", "swap": "memory.memsw.limit_in_bytes"})
    parse = parse_v2_limit if v2 else parse_v1_memory
    out: dict[str, LimitValue] = {}
    for key, name in names.items():
        text = files.get(os.path.join(d.memory, name))
        if text is not None:
            out[key] = parse(text)
    return out if "limit" in out else None


# ---- emitting ordered writes for one cgroup ----------------------------------------------------


_WHY_BY_STAGE = {
    POD_BEFORE: "pod raised first: a container may not go above its pod",
    CONTAINER: "the container's new value",
    POD_AFTER: "pod lowered last: it must stay above the container",
}


class _Emitter:
    def __init__(self, files: Mapping[str, str], texts: Mapping[str, str] | None):
        self.files = files
        self.texts = texts or {}

    def write(self, path: str, value: str, stage: str, why: str) -> Write:
        why = why or _WHY_BY_STAGE[stage]
        return Write(path=path, value=self.texts.get(path, value), previous=self.files.get(path),
                     stage=stage, why=why)


def _cpu_steps(em: _Emitter, v2: bool, cpu_dir: str, cur: tuple[LimitValue, int],
               new: tuple[LimitValue, int], stage: str, has_children: bool) -> list[Step]:
    (cur_q, cur_p), (new_q, new_p) = cur, new
    if (cur_q, cur_p) == (new_q, new_p):
        return []
    if v2:
        return [em.write(os.path.join(cpu_dir, "cpu.max"), format_cpu_max(new_q, new_p), stage,
                         "cpu.max takes quota and period in one write")]
    quota_w = em.write(os.path.join(cpu_dir, "cpu.cfs_quota_us"), format_v1(new_q), stage, "")
    period_w = em.write(os.path.join(cpu_dir, "cpu.cfs_period_us"), str(new_p), stage, "")
    if cur_p == new_p:
        return [quota_w]
    if cur_q == new_q:
        return [period_w]
    # Both change: the kernel checks the ratio after each write, so pass through the intermediate
    # (new quota, old period) or (old quota, new period) that stays in bounds: the lower ratio for a
    # leaf (under its parent), the higher for a cgroup with children (above them).
    quota_first = _ratio(new_q, cur_p) <= _ratio(cur_q, new_p)
    if has_children:
        quota_first = not quota_first
    why = "ratio checked per write: intermediate step kept within parent and children"
    quota_w = em.write(quota_w.path, quota_w.value, stage, why)
    period_w = em.write(period_w.path, period_w.value, stage, why)
    return [quota_w, period_w] if quota_first else [period_w, quota_w]


def _memory_steps(em: _Emitter, v2: bool, memory_dir: str, cur: Mapping[str, LimitValue],
                  new: Mapping[str, LimitValue], stage: str, force: bool) -> list[Step]:
    steps: list[Step] = []
    if v2:
        limit_path = os.path.join(memory_dir, "memory.max")
        high_path = os.path.join(memory_dir, "memory.high")
        swap_path = os.path.join(memory_dir, "memory.swap.max")
        cur_limit, new_limit = cur["limit"], new.get("limit", cur["limit"])
        cur_high = cur.get("high")
        final_high = new.get("high", cur_high)
        high_changes = final_high is not None and final_high != cur_high
        high_written = temporary_high = False
        if new_limit != cur_limit:
            lowering = as_number(new_limit) < as_number(cur_limit)
            if lowering and not force:
                assert isinstance(new_limit, int)
                if high_changes and as_number(final_high) <= new_limit:  # type: ignore[arg-type]
                    steps.append(em.write(high_path, format_v2(final_high), stage,  # type: ignore[arg-type]
                                          "memory.high lowered first: reclaims without OOM-killing"))
                    high_written = True
                elif cur_high is not None and as_number(cur_high) > new_limit:
                    # Written as is, never replaced by a saved text: this value is temporary.
                    steps.append(Write(path=high_path, value=str(new_limit), previous=em.files.get(high_path),
                                       stage=stage, why="memory.high first: reclaims without OOM-killing"))
                    temporary_high = True
                steps.append(Check(path=os.path.join(memory_dir, "memory.current"), max_bytes=new_limit,
                                   stage=stage, why="memory.max below usage would OOM-kill"))
            steps.append(em.write(limit_path, format_v2(new_limit), stage,
                                  "after memory.high and the usage check" if lowering else "raise"))
        if temporary_high and final_high is not None:
            steps.append(Write(path=high_path, value=em.texts.get(high_path, format_v2(final_high)),
                               previous=str(new_limit), stage=stage,
                               why="memory.high back once memory.max holds"))
        elif high_changes and not high_written:
            steps.append(em.write(high_path, format_v2(final_high), stage,  # type: ignore[arg-type]
                                  "memory.high moved with memory.max, after it (it stays under memory.max)"))
        if "swap" in new and "swap" in cur and new["swap"] != cur["swap"]:
            steps.append(em.write(swap_path, format_v2(new["swap"]), stage, "swap is independent of memory.max"))
        return steps
    limit_path = os.path.join(memory_dir, "memory.limit_in_bytes")
    memsw_path = os.path.join(memory_dir, "memory.memsw.limit_in_bytes")
    cur_limit, new_limit = cur["limit"], new.get("limit", cur["limit"])
    limit_w = (em.write(limit_path, format_v1(new_limit), stage, "") if new_limit != cur_limit else None)
    memsw_w = None
    if "swap" in cur and "swap" in new and new["swap"] != cur["swap"]:
        memsw_w = em.write(memsw_path, format_v1(new["swap"]), stage, "")
    if limit_w and memsw_w:
        # memory.limit_in_bytes <= memory.memsw.limit_in_bytes after every write.
        if as_number(new["swap"]) >= as_number(cur["swap"]):
            why = "memsw raised first: the limit may not exceed memsw"
            return [em.write(memsw_path, memsw_w.value, stage, why), em.write(limit_path, limit_w.value, stage, why)]
        why = "limit lowered first: memsw may not go below the limit"
        return [em.write(limit_path, limit_w.value, stage, why), em.write(memsw_path, memsw_w.value, stage, why)]
    return [w for w in (limit_w, memsw_w) if w]


# ---- targets ------------------------------------------------------------------------------------


def _pod_target(pod_cur: LimitValue, ctr_cur: LimitValue, ctr_new: LimitValue) -> LimitValue:
    """The pod is raised only when the container needs room beyond it, and then by what the
    container gains (pod + (new - old), keeping the kubelet's sum of the other containers), never
    to less than the container's new limit. It is never lowered: the kubelet re-creates a crashed
    container with its spec's limit, and a v1 child quota above its parent's fails with EINVAL, so a
    pod lowered under the spec would keep the container from starting again; the pod returns to
    its original value on restore. Raising only past the pod's value keeps a lower-then-raise
    sequence from ratcheting the pod up by every raise. An unlimited pod stays so; an unlimited
    container makes the pod unlimited (or the pod would still cap it)."""
    if pod_cur is UNLIMITED or ctr_new == ctr_cur:
        return pod_cur
    if ctr_new is UNLIMITED:
        return UNLIMITED
    assert isinstance(pod_cur, int) and isinstance(ctr_new, int)
    if ctr_new <= pod_cur:
        return pod_cur
    if ctr_cur is UNLIMITED:
        return ctr_new
    assert isinstance(ctr_cur, int)
    return max(pod_cur + (ctr_new - ctr_cur), ctr_new)


def _pod_cpu_target(pod: tuple[LimitValue, int], cur: tuple[LimitValue, int],
                    new: tuple[LimitValue, int]) -> tuple[LimitValue, int]:
    pod_q, pod_p = pod

    def in_pod_period(quota: LimitValue, period_us: int) -> LimitValue:
        if quota is UNLIMITED:
            return UNLIMITED
        return math.ceil(Fraction(quota, period_us) * pod_p)  # type: ignore[arg-type]

    target = _pod_target(pod_q, in_pod_period(*cur), in_pod_period(*new))
    if isinstance(target, int):
        target = min(max(target, CPU_QUOTA_MIN_US), CPU_QUOTA_MAX_US)
    return target, pod_p


def _pod_stage(cur: LimitValue, new: LimitValue) -> str:
    return POD_BEFORE if as_number(new) >= as_number(cur) else POD_AFTER


def _check_below_usage(limit: LimitValue, usage: Usage | None, where: str, path: str, force: bool) -> None:
    if force or limit is UNLIMITED or usage is None or usage.memory_unreclaimable_bytes is None:
        return
    assert isinstance(limit, int)
    floor = usage.memory_unreclaimable_bytes
    if limit < floor:
        reclaimable = usage.memory_reclaimable_bytes or 0
        raise BelowUsage(
            f"memory limit {limit} bytes ({_mib(limit)}) for the {where} cgroup {path} is below the"
            f" {floor} bytes ({_mib(floor)}) it cannot give back (usage {usage.memory_usage_bytes} bytes,"
            f" of which only {reclaimable} reclaimable page cache); refused, it would end in an OOM kill"
            f" or EBUSY: accepted are {floor} bytes or more, or force",
            path=path, limit_bytes=limit, unreclaimable_bytes=floor,
            usage_bytes=usage.memory_usage_bytes or 0)


def _moved_high(cur_high: LimitValue | None, cur_limit: LimitValue, new_limit: LimitValue) -> LimitValue | None:
    """Where a v2 memory.high goes when memory.max moves (None: leave it).

    The kubelet's MemoryQoS sets memory.high below memory.max (request + 0.9 x (limit - request));
    left in place, it throttles and reclaims the container long before a raised memory.max is
    reached, so a raise would give nothing. memory.high keeps its proportion of memory.max (page
    aligned). A memory.high at or above memory.max (inert) or beside no limit is left as it is; a
    limit lifted altogether lifts memory.high with it."""
    if cur_high is None or cur_high is UNLIMITED or new_limit == cur_limit or cur_limit is UNLIMITED:
        return None
    assert isinstance(cur_high, int) and isinstance(cur_limit, int)
    if cur_high >= cur_limit:
        return None
    if new_limit is UNLIMITED:
        return UNLIMITED
    assert isinstance(new_limit, int)
    return int(Fraction(cur_high, cur_limit) * new_limit) // _PAGE_BYTES * _PAGE_BYTES


def _check_children_fit(pod_cpu_dir: str, new: tuple[LimitValue, int], children: Mapping[str, str],
                        target: Mapping[str, str]) -> None:
    """v1 refuses a pod quota below any child's (EINVAL): name the children in the way up front,
    before anything is written, instead of failing half-way through a restore."""
    new_ratio = _ratio(*new)
    above = []
    for child in sorted({os.path.dirname(p) for p in children}):
        values = _cpu_values(False, CgroupDirs(cpu=child), {**children, **target})
        # An unlimited child is no obstacle: the kernel holds it to its parent's quota.
        if values is not None and values[0] is not UNLIMITED and _ratio(*values) > new_ratio:
            above.append(f"{child} ({format_v1(values[0])}/{values[1]} us)")
    if above:
        raise OrderingError(
            f"cannot put the pod's CPU quota back to {format_v1(new[0])}/{new[1]} us in {pod_cpu_dir}: the"
            f" other container cgroup(s) {', '.join(above)} have a higher quota/period ratio, and cgroup v1"
            " refuses a parent below a child (EINVAL). Nothing was changed. Restore or lower those containers"
            " first (a change made after this one is undone first), then restore this one")


# ---- the public planners --------------------------------------------------------------------------


def _validate(request: Limits) -> None:
    for name in _READ_ONLY:
        if getattr(request, name) is not None:
            raise OutOfRange(f"{name} cannot be set: cgroupctl changes limits only (quota, period, memory,"
                             " memory+swap), never requests such as shares/weight or memory.high")
    if request.cpu_period_us is not None and not isinstance(request.cpu_period_us, int):
        raise OutOfRange(f"CPU period {request.cpu_period_us!r}: expected an integer of microseconds")
    check_cpu(request.cpu_quota_us, request.cpu_period_us)
    check_memory(request.memory_limit_bytes, "memory limit")
    check_memory(request.memory_swap_limit_bytes, "memory+swap limit")


def plan(state: State, request: Limits, force: bool = False) -> Plan:
    """The ordered steps that take the container to ``request`` (None fields are left alone), with
    the pod cgroup raised before the container and lowered after it (stages ``pod-before``,
    ``container``, ``pod-after``). Pure: reads only ``state``.

    Raises OutOfRange (a value the kernel refuses), OrderingError (memory+swap below memory),
    BelowUsage (memory below what cannot be reclaimed; ``force`` skips that check and, on v2, the
    gentle memory.high path) and NotFound (the controller is not there).
    """
    _validate(request)
    cg, files = state.cgroups, state.files
    cpu_v2, v2 = cg.uses_v2("cpu"), cg.uses_v2("memory")
    em = _Emitter(files, None)
    before: list[Step] = []
    container: list[Step] = []
    after: list[Step] = []

    if request.cpu_quota_us is not None or request.cpu_period_us is not None:
        cur = _cpu_values(cpu_v2, cg.container, files)
        if cur is None or cg.container.cpu is None:
            raise NotFound(f"the container has no CPU quota files (cpu controller dirs: {cg.container.cpu})")
        new_q = request.cpu_quota_us if request.cpu_quota_us is not None else cur[0]
        new = (new_q, request.cpu_period_us or cur[1])
        check_cpu(new[0], new[1])
        outer_steps = _cpu_steps(em, cpu_v2, cg.container.cpu, cur, new, CONTAINER, False)
        inner_steps: list[Step] = []
        inner_cur = _cpu_values(cpu_v2, cg.inner, files)
        if inner_cur is not None and cg.inner is not None and cg.inner.cpu and inner_cur[0] is not UNLIMITED:
            # crun's container/ child holds the limit too: written after the scope when raising, before it
            # when lowering, so the processes never get more than either level allows.
            inner_steps = _cpu_steps(em, cpu_v2, cg.inner.cpu, inner_cur, new, CONTAINER, False)
        raising = _ratio(*new) >= _ratio(*cur)
        container += outer_steps + inner_steps if raising else inner_steps + outer_steps
        pod_cur = _cpu_values(cpu_v2, cg.pod, files)
        if pod_cur is not None and cg.pod is not None and cg.pod.cpu:
            # On v2 a container above its pod is capped, not refused: what it gets is the lowest of its
            # levels and its pod's, and that is what a raise is measured from (a pod slice put back
            # under a raised container by someone else is raised again).
            in_force = min((v for v in (cur, inner_cur, pod_cur) if v is not None and v[0] is not UNLIMITED),
                           key=lambda v: _ratio(*v), default=cur) if cpu_v2 else cur
            pod_new = _pod_cpu_target(pod_cur, in_force, new)
            stage = _pod_stage(pod_cur[0], pod_new[0])
            (before if stage == POD_BEFORE else after).extend(
                _cpu_steps(em, cpu_v2, cg.pod.cpu, pod_cur, pod_new, stage, True))

    if request.memory_limit_bytes is not None or request.memory_swap_limit_bytes is not None:
        cur_m = _memory_values(v2, cg.container, files)
        if cur_m is None or cg.container.memory is None:
            raise NotFound(f"the container has no memory limit file (memory dir: {cg.container.memory})")
        new_limit = request.memory_limit_bytes if request.memory_limit_bytes is not None else cur_m["limit"]
        new_m = _container_memory_target(request, cur_m, new_limit, v2)
        _check_below_usage(new_limit, state.container_usage, "container", cg.container.memory, force)
        outer_steps = _memory_steps(em, v2, cg.container.memory, cur_m, new_m, CONTAINER, force)
        inner_steps = []
        inner_m = _memory_values(v2, cg.inner, files)
        if inner_m is not None and cg.inner is not None and cg.inner.memory and inner_m["limit"] is not UNLIMITED:
            inner_new = _container_memory_target(request, inner_m, new_limit, v2)
            inner_steps = _memory_steps(em, v2, cg.inner.memory, inner_m, inner_new, CONTAINER, force)
        raising = as_number(new_limit) >= as_number(cur_m["limit"])
        container += outer_steps + inner_steps if raising else inner_steps + outer_steps
        pod_m = _memory_values(v2, cg.pod, files)
        if pod_m is not None and cg.pod is not None and cg.pod.memory:
            in_force = cur_m["limit"]
            if v2:  # as for CPU: the lowest of the container's levels and its pod's is what it has
                in_force = min((m["limit"] for m in (cur_m, inner_m, pod_m) if m is not None), key=as_number)
            pod_limit = _pod_target(pod_m["limit"], in_force, new_limit)
            pod_new: dict[str, LimitValue] = {"limit": pod_limit}
            if not v2 and "swap" in pod_m and pod_m["swap"] is not UNLIMITED and pod_m["limit"] is not UNLIMITED:
                pod_new["swap"] = (UNLIMITED if pod_limit is UNLIMITED
                                   else pod_limit + (pod_m["swap"] - pod_m["limit"]))  # type: ignore[operator]
            elif not v2 and "swap" in pod_m and pod_limit is UNLIMITED:
                pod_new["swap"] = UNLIMITED
            if v2:
                moved = _moved_high(pod_m.get("high"), pod_m["limit"], pod_limit)
                if moved is not None:
                    pod_new["high"] = moved
            if pod_limit != pod_m["limit"]:
                _check_below_usage(pod_limit, state.pod_usage, "pod", cg.pod.memory, force)
            stage = _pod_stage(pod_m["limit"], pod_limit)
            (before if stage == POD_BEFORE else after).extend(
                _memory_steps(em, v2, cg.pod.memory, pod_m, pod_new, stage, force))
    return Plan(tuple(before + container + after))


def _container_memory_target(request: Limits, cur_m: Mapping[str, LimitValue], new_limit: LimitValue,
                             v2: bool) -> dict[str, LimitValue]:
    """A container level's new memory values: the limit, the swap allowance kept (or the request's),
    and on v2 a finite memory.high moved with the limit."""
    new_m: dict[str, LimitValue] = {"limit": new_limit}
    total = _swap_total(request, cur_m, new_limit, v2)
    if total is not None:
        if as_number(total) < as_number(new_limit):
            raise OrderingError(f"memory+swap limit {format_v1(total)} bytes is below the memory limit"
                                f" {format_v1(new_limit)} bytes: it must be equal (no swap) or above")
        if v2:
            if new_limit is UNLIMITED and total is not UNLIMITED:
                raise OrderingError("a finite memory+swap limit needs a finite memory limit on v2")
            new_m["swap"] = UNLIMITED if total is UNLIMITED else total - new_limit  # type: ignore[operator]
        else:
            new_m["swap"] = total
    if v2:
        moved = _moved_high(cur_m.get("high"), cur_m["limit"], new_limit)
        if moved is not None:
            new_m["high"] = moved
    return new_m


def _swap_total(request: Limits, cur: Mapping[str, LimitValue], new_limit: LimitValue,
                v2: bool) -> LimitValue | None:
    """The memory+swap total to set: the request's, or the current swap allowance kept."""
    if request.memory_swap_limit_bytes is not None:
        return request.memory_swap_limit_bytes
    if "swap" not in cur:
        return None
    cur_limit, swap = cur["limit"], cur["swap"]
    if swap is UNLIMITED:
        if cur_limit is UNLIMITED and new_limit is not UNLIMITED:
            # A container gaining its first memory limit gets no swap, as containerd sets it up
            # for a container created with a limit; else swap would blunt the new limit.
            return new_limit
        return None
    if v2:
        return None  # a finite memory.swap.max is independent of memory.max: leave it
    if new_limit is UNLIMITED:
        return UNLIMITED
    if cur_limit is UNLIMITED:
        return None
    return new_limit + (swap - cur_limit)  # type: ignore[operator]


def plan_restore(state: State, snapshot: Snapshot, force: bool = False) -> Plan:
    """The steps that put back exactly the snapshot's file contents, in an order the kernel accepts
    (pod raised first / lowered last, memsw and memory ordered, v2 memory lowered through
    memory.high). A memory limit below what the container now cannot give back is refused unless
    forced, as in ``plan``. Files the state no longer has (container gone) are left out."""
    cg, files = state.cgroups, state.files
    cpu_v2, v2 = cg.uses_v2("cpu"), cg.uses_v2("memory")
    texts = {p: t for p, t in snapshot.files.items() if p in files}
    em = _Emitter(files, texts)
    target = dict(files)
    target.update(texts)
    before: list[Step] = []
    container: list[Step] = []
    after: list[Step] = []
    # crun's container/ child before the scope: a lowering there goes where the processes are first.
    levels = (("container", cg.inner, state.container_usage), ("container", cg.container, state.container_usage),
              ("pod", cg.pod, state.pod_usage))
    for where, dirs, usage in levels:
        if dirs is None:
            continue
        is_pod = where == "pod"
        cur, new = _cpu_values(cpu_v2, dirs, files), _cpu_values(cpu_v2, dirs, target)
        if cur and new and dirs.cpu and cur != new:
            stage = _pod_stage(_ratio(*cur), _ratio(*new)) if is_pod else CONTAINER
            if stage == POD_AFTER and not cpu_v2:
                _check_children_fit(dirs.cpu, new, state.pod_children, target)
            steps = _cpu_steps(em, cpu_v2, dirs.cpu, cur, new, stage, is_pod)
            (before if stage == POD_BEFORE else after if stage == POD_AFTER else container).extend(steps)
        cur_m, new_m = _memory_values(v2, dirs, files), _memory_values(v2, dirs, target)
        if cur_m and new_m and dirs.memory and cur_m != new_m:
            if new_m["limit"] != cur_m["limit"]:
                _check_below_usage(new_m["limit"], usage, where, dirs.memory, force)
            stage = _pod_stage(cur_m["limit"], new_m["limit"]) if is_pod else CONTAINER
            steps = _memory_steps(em, v2, dirs.memory, cur_m, new_m, stage, force)
            (before if stage == POD_BEFORE else after if stage == POD_AFTER else container).extend(steps)
    return Plan(tuple(before + container + after))

