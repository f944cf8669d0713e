"""Merge a resource change into a container's current LinuxContainerResources (pure).

UpdateContainerResources replaces the container's resources with what is sent, and CRI reads 0
as "not specified". So an update must carry every field as it currently is, with only the asked
fields changed, and an asked value can never be 0.
"""

from __future__ import annotations

import dataclasses

from cri_api.errors import InvalidRequest
from cri_api.types import (
    MAX_CFS_PERIOD_US,
    MAX_CPU_SHARES,
    MIN_CFS_US,
    MIN_CPU_SHARES,
    UNLIMITED,
    LinuxResources,
)


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name}={value!r} is not an integer")
    return value


def _check_limit(name: str, value: object, minimum: int) -> int:
    """A limit is >= ``minimum`` or UNLIMITED (-1); never 0, which CRI reads as "unset"."""
    number = _check_int(name, value)
    if number == UNLIMITED or number >= minimum:
        return number
    raise InvalidRequest(
        f"{name}={number} is not accepted: give a value >= {minimum} or cri_api.UNLIMITED ({UNLIMITED})"
        + (" (0 would mean 'not specified' to the runtime and change nothing)" if number == 0 else "")
    )


def _above(limit: int, other: int) -> bool:
    """``limit`` > ``other`` where UNLIMITED is larger than any number."""
    if limit == UNLIMITED:
        return other != UNLIMITED
    return other != UNLIMITED and limit > other


def merge_resources(
    current: LinuxResources,
    *,
    cpu_quota_us: int | None = None,
    cpu_period_us: int | None = None,
    memory_limit_bytes: int | None = None,
    memory_swap_limit_bytes: int | None = None,
    cpu_shares: int | None = None,
) -> LinuxResources:
    """Return ``current`` with the given fields changed; ``None`` leaves a field as it is.

    If the memory limit changes and the swap limit is not given, the swap limit (memory+swap,
    as in cgroup v1 memory.memsw) follows it when it was equal to the memory limit (a kubelet on
    a node without swap sets them equal); a swap limit that would end up below the memory limit
    is refused, since the kernel refuses memory.limit_in_bytes > memory.memsw.limit_in_bytes.
    """
    changes: dict[str, int] = {}
    if cpu_quota_us is not None:
        changes["cpu_quota_us"] = _check_limit("cpu_quota_us", cpu_quota_us, MIN_CFS_US)
    if cpu_period_us is not None:
        period = _check_int("cpu_period_us", cpu_period_us)
        if not MIN_CFS_US <= period <= MAX_CFS_PERIOD_US:
            raise InvalidRequest(
                f"cpu_period_us={period} is not accepted: give {MIN_CFS_US}..{MAX_CFS_PERIOD_US} us"
            )
        changes["cpu_period_us"] = period
    if cpu_shares is not None:
        shares = _check_int("cpu_shares", cpu_shares)
        if not MIN_CPU_SHARES <= shares <= MAX_CPU_SHARES:
            raise InvalidRequest(f"cpu_shares={shares} is not accepted: give {MIN_CPU_SHARES}..{MAX_CPU_SHARES}")
        changes["cpu_shares"] = shares
    if memory_limit_bytes is not None:
        changes["memory_limit_bytes"] = _check_limit("memory_limit_bytes", memory_limit_bytes, 1)
    if memory_swap_limit_bytes is not None:
        changes["memory_swap_limit_bytes"] = _check_limit("memory_swap_limit_bytes", memory_swap_limit_bytes, 1)

    memory = changes.get("memory_limit_bytes", current.memory_limit_bytes)
    if "memory_limit_bytes" in changes and "memory_swap_limit_bytes" not in changes:
        old_swap = current.memory_swap_limit_bytes
        if old_swap is not None and old_swap == current.memory_limit_bytes:
            changes["memory_swap_limit_bytes"] = changes["memory_limit_bytes"]
    swap = changes.get("memory_swap_limit_bytes", current.memory_swap_limit_bytes)
    if memory is not None and swap is not None and _above(memory, swap):
        raise InvalidRequest(
            f"memory_limit_bytes={memory} is above memory_swap_limit_bytes={swap} (memory+swap); "
            "give memory_swap_limit_bytes >= memory_limit_bytes too"
        )
    return dataclasses.replace(current, **changes)
