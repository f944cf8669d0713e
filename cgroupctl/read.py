"""Read limits and usage from cgroup files."""

from __future__ import annotations

import dataclasses
import os

from cgroupctl.errors import NotFound
from cgroupctl.model import UNLIMITED, CgroupDirs, ContainerCgroups, Limits, State, Usage
from cgroupctl.parse import (
    parse_cpu_max,
    parse_flat_keyed,
    parse_int,
    parse_v1_memory,
    parse_v1_quota,
    parse_v2_limit,
)

# The files a plan may write, per controller and version. Snapshots cover exactly these.
V1_CPU_FILES = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
V1_MEMORY_FILES = ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
V2_CPU_FILES = ("cpu.max",)
V2_MEMORY_FILES = ("memory.max", "memory.high", "memory.swap.max")


def read_text(path: str) -> str | None:
    """A cgroup file's content, stripped; None when the file does not exist."""
    # os.open/os.read rather than open(): without the buffered text layer a file costs a fifth of
    # the time (about 3 us against 14 here), and the agent reads some twenty on every apply.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode().strip()


def is_v2(cg: ContainerCgroups, controller: str = "memory") -> bool:
    """Whether ``controller``'s v2 files are used (all on V2; per controller on a hybrid host)."""
    return cg.uses_v2(controller)


def limit_paths(cg: ContainerCgroups, dirs: CgroupDirs) -> list[str]:
    """The limit files of one cgroup (container or pod) that cgroupctl may write."""
    cpu_files = V2_CPU_FILES if cg.uses_v2("cpu") else V1_CPU_FILES
    memory_files = V2_MEMORY_FILES if cg.uses_v2("memory") else V1_MEMORY_FILES
    paths: list[str] = []
    if dirs.cpu:
        paths += [os.path.join(dirs.cpu, f) for f in cpu_files]
    if dirs.memory:
        paths += [os.path.join(dirs.memory, f) for f in memory_files]
    return paths


def all_limit_paths(cg: ContainerCgroups) -> list[str]:
    """Limit files of the container (both its levels, see ``ContainerCgroups.inner``) and of its pod."""
    paths = [p for dirs in cg.levels for p in limit_paths(cg, dirs)]
    return paths + (limit_paths(cg, cg.pod) if cg.pod else [])


def read_files(paths: list[str]) -> dict[str, str]:
    """{path: stripped content} for the paths that exist."""
    out: dict[str, str] = {}
    for path in paths:
        text = read_text(path)
        if text is not None:
            out[path] = text
    return out


def read_usage_of(cg: ContainerCgroups, dirs: CgroupDirs) -> Usage:
    """Usage of one cgroup level (the container's or the pod's)."""
    cpu_usage_ns = nr_periods = nr_throttled = throttled_ns = None
    memory_usage = unreclaimable = None
    if dirs.cpu:
        stat = parse_flat_keyed(read_text(os.path.join(dirs.cpu, "cpu.stat")) or "")
        nr_periods, nr_throttled = stat.get("nr_periods"), stat.get("nr_throttled")
        if cg.uses_v2("cpu"):
            throttled_ns = stat["throttled_usec"] * 1000 if "throttled_usec" in stat else None
            cpu_usage_ns = stat["usage_usec"] * 1000 if "usage_usec" in stat else None
        else:
            throttled_ns = stat.get("throttled_time")
    if cpu_usage_ns is None and dirs.cpuacct:
        if cg.uses_v2("cpuacct"):
            stat = parse_flat_keyed(read_text(os.path.join(dirs.cpuacct, "cpu.stat")) or "")
            cpu_usage_ns = stat["usage_usec"] * 1000 if "usage_usec" in stat else None
        else:
            text = read_text(os.path.join(dirs.cpuacct, "cpuacct.usage"))
            cpu_usage_ns = parse_int(text, "cpuacct.usage") if text is not None else None
    if cg.uses_v2("memory"):
        usage_file, inactive_key = "memory.current", "inactive_file"
    else:
        # total_* counts the whole subtree, as usage_in_bytes does.
        usage_file, inactive_key = "memory.usage_in_bytes", "total_inactive_file"
    if dirs.memory:
        text = read_text(os.path.join(dirs.memory, usage_file))
        if text is not None:
            memory_usage = parse_int(text, usage_file)
            stat = parse_flat_keyed(read_text(os.path.join(dirs.memory, "memory.stat")) or "")
            # "Cannot be reclaimed" is the kubelet's working set: usage minus inactive file pages.
            # Inactive page cache is dropped first and without cost; active file pages can be
            # reclaimed too, but only after being deactivated and maybe at the price of thrashing,
            # and anonymous memory only with swap, which containerd turns off (memsw = limit). So a
            # limit at or above the working set is one the kernel can meet without an OOM kill;
            # below it we refuse unless forced.
            unreclaimable = max(0, memory_usage - stat.get(inactive_key, 0))
    return Usage(cpu_usage_ns=cpu_usage_ns, nr_periods=nr_periods, nr_throttled=nr_throttled,
                 throttled_ns=throttled_ns, memory_usage_bytes=memory_usage,
                 memory_unreclaimable_bytes=unreclaimable)


def read_usage(cg: ContainerCgroups) -> Usage:
    """The container's CPU time (ns), throttling counters and memory usage split into what can and
    cannot be reclaimed."""
    return read_usage_of(cg, cg.container)


def read_state(cg: ContainerCgroups, *, require_container: bool = True) -> State:
    """The exact content of every limit file of the container and the pod, and their usage: the
    input of ``plan``. With ``require_container=False`` a container whose cgroup is gone is no
    error (``restore`` still puts the pod back)."""
    files = read_files(all_limit_paths(cg))
    if require_container and not any(p.startswith(d + "/") for p in files for d in (cg.container.cpu, cg.container.memory) if d):
        raise NotFound(f"no limit file found in the container cgroups {cg.container.to_dict()}:"
                       " has the container exited?")
    return State(cgroups=cg, files=files, container_usage=read_usage_of(cg, cg.container),
                 pod_usage=read_usage_of(cg, cg.pod) if cg.pod else None, pod_children=read_pod_children(cg))


def read_pod_children(cg: ContainerCgroups) -> dict[str, str]:
    """The v1 CPU quota files of the pod's child cgroups other than the container ({} on v2, where
    a parent below a child is accepted and caps it)."""
    if cg.pod is None or not cg.pod.cpu or cg.uses_v2("cpu"):
        return {}
    try:
        children = [e.path for e in os.scandir(cg.pod.cpu) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return {}
    own = os.path.normpath(cg.container.cpu) if cg.container.cpu else None
    return read_files([os.path.join(d, f) for d in sorted(children) if os.path.normpath(d) != own
                       for f in V1_CPU_FILES])


def limits_from_files(cg: ContainerCgroups, dirs: CgroupDirs, files: dict[str, str]) -> Limits:
    """Parse the limits of one cgroup level out of a ``{path: text}`` mapping."""

    def get(d: str | None, name: str) -> str | None:
        return files.get(os.path.join(d, name)) if d else None

    values: dict[str, object] = {}
    if cg.uses_v2("cpu"):
        text = get(dirs.cpu, "cpu.max")
        if text is not None:
            values["cpu_quota_us"], values["cpu_period_us"] = parse_cpu_max(text)
        weight = get(dirs.cpu, "cpu.weight")
        if weight is not None:
            values["cpu_weight"] = parse_int(weight, "cpu.weight")
    else:
        quota, period = get(dirs.cpu, "cpu.cfs_quota_us"), get(dirs.cpu, "cpu.cfs_period_us")
        if quota is not None:
            values["cpu_quota_us"] = parse_v1_quota(quota)
        if period is not None:
            values["cpu_period_us"] = parse_int(period, "cpu.cfs_period_us")
        shares = get(dirs.cpu, "cpu.shares")
        if shares is not None:
            values["cpu_shares"] = parse_int(shares, "cpu.shares")
    if cg.uses_v2("memory"):
        for name, key in (("memory.max", "memory_limit_bytes"), ("memory.high", "memory_high_bytes")):
            text = get(dirs.memory, name)
            if text is not None:
                values[key] = parse_v2_limit(text)
        swap = get(dirs.memory, "memory.swap.max")
        memory = values.get("memory_limit_bytes")
        if swap is not None and memory is not None:
            swap_value = parse_v2_limit(swap)
            # Report the CRI meaning (memory + swap), as v1's memsw does.
            if swap_value == 0:
                values["memory_swap_limit_bytes"] = memory
            elif isinstance(swap_value, int) and isinstance(memory, int):
                values["memory_swap_limit_bytes"] = memory + swap_value
            else:
                values["memory_swap_limit_bytes"] = UNLIMITED
    else:
        for name, key in (("memory.limit_in_bytes", "memory_limit_bytes"),
                          ("memory.memsw.limit_in_bytes", "memory_swap_limit_bytes")):
            text = get(dirs.memory, name)
            if text is not None:
                values[key] = parse_v1_memory(text)
    return Limits(**values)  # type: ignore[arg-type]


def _read_level(cg: ContainerCgroups, dirs: CgroupDirs) -> Limits:
    extra = []
    if dirs.cpu:
        extra.append(os.path.join(dirs.cpu, "cpu.weight" if cg.uses_v2("cpu") else "cpu.shares"))
    files = read_files(limit_paths(cg, dirs) + extra)
    if not files:
        raise NotFound(f"no limit file found in {dirs.to_dict()}: has the container exited?")
    return limits_from_files(cg, dirs, files)


def tighter(outer: Limits, inner: Limits) -> Limits:
    """The limits a process under both cgroups gets: the lower CPU quota/period ratio and the lower
    memory limit of the two (swap, weight, shares and memory.high as ``outer`` has them)."""
    out = outer
    if inner.cpu_quota_us is not None and inner.cpu_period_us and inner.cpu_quota_us is not UNLIMITED:
        if (outer.cpu_quota_us is None or outer.cpu_quota_us is UNLIMITED or not outer.cpu_period_us
                or inner.cpu_quota_us * outer.cpu_period_us < outer.cpu_quota_us * inner.cpu_period_us):
            out = dataclasses.replace(out, cpu_quota_us=inner.cpu_quota_us, cpu_period_us=inner.cpu_period_us)
    if inner.memory_limit_bytes is not None and inner.memory_limit_bytes is not UNLIMITED:
        if (outer.memory_limit_bytes is None or outer.memory_limit_bytes is UNLIMITED
                or inner.memory_limit_bytes < outer.memory_limit_bytes):
            out = dataclasses.replace(out, memory_limit_bytes=inner.memory_limit_bytes)
    return out


def read_limits(cg: ContainerCgroups, *, pod: bool = False) -> Limits:
    """The container's limits (or, with ``pod=True``, the pod's). Where the container has two levels
    (crun: the scope and its ``container/`` child, see ``ContainerCgroups.inner``) its processes get
    the tighter of the two, and that is what is returned."""
    dirs = cg.pod if pod else cg.container
    if dirs is None:
        raise NotFound("the container has no pod cgroup (it sits at the top of the hierarchy)")
    limits = _read_level(cg, dirs)
    if not pod and cg.inner is not None:
        try:
            limits = tighter(limits, _read_level(cg, cg.inner))
        except NotFound:
            pass  # the child is gone with the processes: the container's own level is what is left
    return limits


def effective_from_files(cg: ContainerCgroups, files: dict[str, str]) -> Limits:
    """``effective_limits`` out of a ``{path: text}`` mapping (``State.files``) instead of the files."""
    limits = limits_from_files(cg, cg.container, files)
    if cg.inner is not None:
        limits = tighter(limits, limits_from_files(cg, cg.inner, files))
    if cg.pod is not None and (cg.uses_v2("cpu") or cg.uses_v2("memory")):
        pod = limits_from_files(cg, cg.pod, files)
        if not cg.uses_v2("cpu"):
            pod = dataclasses.replace(pod, cpu_quota_us=None)
        if not cg.uses_v2("memory"):
            pod = dataclasses.replace(pod, memory_limit_bytes=None)
        limits = tighter(limits, pod)
    return limits


def effective_limits(cg: ContainerCgroups) -> Limits:
    """The limits the container's processes actually get: ``read_limits`` and, where the cpu or
    memory files are v2, the pod's too (v2 takes a container limit above its pod's and silently
    caps it at the pod's; v1 refuses it, so there the container's own limit is the one in force)."""
    limits = read_limits(cg)
    if cg.pod is None or not (cg.uses_v2("cpu") or cg.uses_v2("memory")):
        return limits
    try:
        pod = _read_level(cg, cg.pod)
    except NotFound:
        return limits
    if not cg.uses_v2("cpu"):
        pod = dataclasses.replace(pod, cpu_quota_us=None)
    if not cg.uses_v2("memory"):
        pod = dataclasses.replace(pod, memory_limit_bytes=None)
    return tighter(limits, pod)
