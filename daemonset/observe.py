"""What an experiment does to its container, read from the kernel: the figures behind ``top``.

``sample`` reads raw counters (CPU time, CFS periods and throttled periods, the memory working set
and limit, OOM kills, and for each shaped direction the bytes our root qdisc sent, its drops and
backlog); ``figures`` turns two samples into rates. Reading is separate from arithmetic so the
arithmetic is tested with plain numbers, and a counter that cannot be read is None with the reason
in ``Counters.errors``: never a guess.

Traffic into the pod is shaped at the root of the pod's host veth, traffic out of it at the root of
our IFB: those two qdiscs' counters are the pod's shaped traffic in each direction.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

_TC_H_ROOT = 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class QdiscCounters:
    bytes_sent: int
    drops: int
    backlog_bytes: int


@dataclasses.dataclass(frozen=True)
class Counters:
    """Raw kernel counters of one container at one moment (``at_s``: monotonic seconds)."""

    at_s: float
    cpu_usage_ns: int | None = None
    nr_periods: int | None = None
    nr_throttled: int | None = None
    memory_working_set_bytes: int | None = None
    memory_limit_bytes: int | None = None  # None also for "no limit"
    oom_kills: int | None = None
    ingress: QdiscCounters | None = None
    egress: QdiscCounters | None = None
    errors: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Figures:
    """Over the interval between two samples; None where a counter could not be read (see ``errors``)."""

    interval_s: float
    cpu_cores: float | None
    throttled_share: float | None  # of the CFS periods in the interval, how many hit the quota
    memory_working_set_bytes: int | None
    memory_limit_bytes: int | None
    memory_share: float | None  # working set / limit
    oom_kills: int | None  # since the experiment started
    ingress_bps: float | None
    ingress_drops: int | None  # in the interval
    ingress_backlog_bytes: int | None
    egress_bps: float | None
    egress_drops: int | None
    egress_backlog_bytes: int | None
    errors: tuple[str, ...] = ()


def _delta(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else max(0, b - a)


def figures(before: Counters, after: Counters, *, oom_kills_at_start: int | None) -> Figures:
    """Rates between two samples of the same container (pure)."""
    dt = max(1e-9, after.at_s - before.at_s)
    used = _delta(before.cpu_usage_ns, after.cpu_usage_ns)
    periods = _delta(before.nr_periods, after.nr_periods)
    throttled = _delta(before.nr_throttled, after.nr_throttled)
    ws, limit = after.memory_working_set_bytes, after.memory_limit_bytes

    def direction(a: QdiscCounters | None, b: QdiscCounters | None) -> tuple[float | None, int | None, int | None]:
        if a is None or b is None:
            return None, None, None
        return max(0, b.bytes_sent - a.bytes_sent) * 8 / dt, max(0, b.drops - a.drops), b.backlog_bytes

    ingress = direction(before.ingress, after.ingress)
    egress = direction(before.egress, after.egress)
    return Figures(
        interval_s=dt,
        cpu_cores=None if used is None else used / 1e9 / dt,
        throttled_share=None if not periods or throttled is None else throttled / periods,
        memory_working_set_bytes=ws,
        memory_limit_bytes=limit,
        memory_share=None if ws is None or not limit else ws / limit,
        oom_kills=None if after.oom_kills is None else after.oom_kills - (oom_kills_at_start or 0),
        ingress_bps=ingress[0], ingress_drops=ingress[1], ingress_backlog_bytes=ingress[2],
        egress_bps=egress[0], egress_drops=egress[1], egress_backlog_bytes=egress[2],
        errors=tuple(dict.fromkeys(before.errors + after.errors)),
    )


def oom_kills(cg: Any) -> int | None:
    """OOM kills the kernel counted in the container's memory cgroup (v2 memory.events, v1 memory.oom_control)."""
    container = getattr(cg, "container", None)  # None also for the engine's in-memory stand-ins in tests
    d = getattr(container, "memory", None)
    if not d:
        return None
    name = "memory.events" if cg.uses_v2("memory") else "memory.oom_control"
    try:
        with open(os.path.join(d, name)) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        return None
    return None


def sample(cg: Any, *, host_ifname: str | None, ifb_name: str | None, directions: tuple[str, ...]) -> Counters:
    """Read the counters of a container (``cg``: its cgroups) and of our qdiscs for ``directions``."""
    import cgroupctl
    from cgroupctl import UNLIMITED

    errors: list[str] = []
    now = time.monotonic()
    usage = None
    limit = None
    try:
        usage = cgroupctl.read_usage(cg)
        lim = cgroupctl.read_limits(cg).memory_limit_bytes
        limit = None if lim is None or lim is UNLIMITED else int(lim)
    except Exception as e:
        errors.append(f"cgroup: {e}")
    counters = {"ingress": None, "egress": None}
    if directions:
        try:
            counters.update(_qdisc_counters(host_ifname, ifb_name, directions))
        except Exception as e:
            errors.append(f"qdiscs: {e}")
    return Counters(
        at_s=now,
        cpu_usage_ns=usage.cpu_usage_ns if usage else None,
        nr_periods=usage.nr_periods if usage else None,
        nr_throttled=usage.nr_throttled if usage else None,
        memory_working_set_bytes=usage.memory_unreclaimable_bytes if usage else None,
        memory_limit_bytes=limit,
        oom_kills=oom_kills(cg),
        ingress=counters["ingress"],
        egress=counters["egress"],
        errors=tuple(errors),
    )


def _qdisc_counters(host_ifname: str | None, ifb_name: str | None, directions: tuple[str, ...]) -> dict[str, Any]:
    from pyroute2 import IPRoute

    out: dict[str, Any] = {}
    with IPRoute() as ipr:
        for direction, ifname in (("ingress", host_ifname), ("egress", ifb_name)):
            if direction not in directions or not ifname:
                continue
            index = ipr.link_lookup(ifname=ifname)
            if not index:
                raise LookupError(f"{ifname} is gone")
            root = next((q for q in ipr.get_qdiscs(index[0]) if q["parent"] == _TC_H_ROOT), None)
            stats = root.get_attr("TCA_STATS") if root is not None else None
            if stats is None:
                raise LookupError(f"no root qdisc statistics on {ifname}")
            out[direction] = QdiscCounters(bytes_sent=stats["bytes"], drops=stats["drop"], backlog_bytes=stats["backlog"])
    return out
