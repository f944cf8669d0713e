"""Pure parsers and formatters: the text of /proc and cgroup files in, values out (and back).

Nothing here touches the file system, so tests feed it strings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from cgroupctl.errors import CgroupError, NotFound, OutOfRange
from cgroupctl.model import UNLIMITED, LimitValue

# v1 shows "no memory limit" as PAGE_COUNTER_MAX pages in bytes (9223372036854771712 with 4 KiB
# pages, another number with 64 KiB pages); anything from 2**62 bytes up means unlimited.
V1_MEMORY_UNLIMITED_FROM = 2**62

# CFS bandwidth bounds (kernel/sched/core.c): quota and period at least 1 ms, period at most 1 s,
# quota at most MAX_BW (2**44 - 1) microseconds.
CPU_PERIOD_MIN_US = 1_000
CPU_PERIOD_MAX_US = 1_000_000
CPU_QUOTA_MIN_US = 1_000
CPU_QUOTA_MAX_US = 2**44 - 1
DEFAULT_CPU_PERIOD_US = 100_000
# The largest byte count a page counter holds (LONG_MAX rounded down to a page by the kernel).
MEMORY_MAX_BYTES = 2**63 - 1


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/PID/cgroup -> {controller: path}; the v2 line ("0::/path") is under the key "".

    v1 lines name their controllers ("4:memory:/x", "1:cpu,cpuacct:/x", "9:name=systemd:/x"); each
    controller gets its own key. Paths may begin with "/.." when the reader is in another cgroup
    namespace.
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        parts = line.split(":", 2)
        if len(parts) != 3:
            raise CgroupError(f"/proc/PID/cgroup line {line!r}: expected 'ID:CONTROLLERS:PATH'")
        _, controllers, path = parts
        if parts[0] == "0" and controllers == "":
            out[""] = path
            continue
        for controller in controllers.split(","):
            out[controller] = path
    return out


@dataclass(frozen=True)
class MountEntry:
    """One cgroup line of /proc/PID/mountinfo: the mount's root inside its hierarchy, where it is
    mounted, cgroup or cgroup2, and the super options (the controllers, for v1)."""

    root: str
    mount_point: str
    fstype: str
    super_options: tuple[str, ...]


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """The cgroup and cgroup2 mounts of a mountinfo text (proc(5) format)."""
    mounts: list[MountEntry] = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if len(fields) < sep + 3 or sep < 5:
            continue
        fstype = fields[sep + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        mounts.append(MountEntry(
            root=_unescape_mountinfo(fields[3]),
            mount_point=_unescape_mountinfo(fields[4]),
            fstype=fstype,
            super_options=tuple(fields[sep + 3].split(",")),
        ))
    return mounts


def split_cgroup_path(path: str) -> tuple[str, ...]:
    """Normalize a cgroup path into components, keeping leading ".." (a path outside the reader's
    cgroup namespace); "." and empty parts drop, an inner ".." removes its parent.

    >>> split_cgroup_path("/../../kubepods/./pod1/../pod2")
    ('..', '..', 'kubepods', 'pod2')
    """
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == ".." and parts and parts[-1] != "..":
            parts.pop()
        else:
            parts.append(part)
    return tuple(parts)


def relative_to(path: tuple[str, ...], root: tuple[str, ...]) -> tuple[str, ...] | None:
    """``path`` inside ``root`` (both from ``split_cgroup_path``), or None when it is outside."""
    if path[: len(root)] != root:
        return None
    rest = path[len(root):]
    if ".." in rest:
        return None
    return rest


_SLICE_RE = re.compile(r"^[A-Za-z0-9_:.\\-]+\.slice$")


def expand_slice(slice_name: str) -> str:
    """A systemd slice unit -> its cgroup path: every dash-separated prefix is a parent slice.

    >>> expand_slice("kubepods-burstable-pod1.slice")
    '/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice'
    """
    if slice_name == "-.slice":
        return "/"
    if not _SLICE_RE.match(slice_name) or "/" in slice_name:
        raise NotFound(f"systemd slice {slice_name!r}: expected a name like 'kubepods-burstable.slice'")
    stem = slice_name[: -len(".slice")]
    if stem.startswith("-") or stem.endswith("-") or "--" in stem:
        raise NotFound(f"systemd slice {slice_name!r}: no leading, trailing or double dashes allowed")
    path = ""
    prefix = ""
    for part in stem.split("-"):
        prefix = f"{prefix}-{part}" if prefix else part
        path += f"/{prefix}.slice"
    return path


def cgroups_path_to_cgroup(cgroups_path: str) -> str:
    """The runtime's cgroups path (OCI linux.cgroupsPath) -> a path inside each hierarchy.

    cgroupfs driver: the path itself (``/kubepods/burstable/pod<uid>/<id>``). systemd driver:
    ``slice:prefix:name`` -> the slice expanded, then ``prefix-name.scope``
    (``kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`` ->
    ``/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope``).
    """
    text = cgroups_path.strip()
    if not text:
        raise NotFound("empty cgroups path: expected '/kubepods/...' or 'slice:prefix:name'")
    if not text.startswith("/") and text.count(":") == 2:
        slice_name, prefix, name = text.split(":")
        parent = expand_slice(slice_name or "system.slice")
        if name.endswith(".slice"):
            unit = name
        else:
            unit = f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
        return parent.rstrip("/") + "/" + unit
    return "/" + "/".join(split_cgroup_path(text)) if text != "/" else "/"


_CONTAINER_RE = re.compile(r"^(?:cri-containerd-|crio-|docker-|libpod-)?([0-9a-f]{64})(?:\.scope)?$")
_POD_RE = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?$")


def container_id_of(dirname: str) -> str | None:
    """The 64-hex container id in a cgroup directory name (``<id>``, ``cri-containerd-<id>.scope``,
    ``crio-<id>.scope``, ``crio-<id>``, ``docker-<id>.scope``), or None."""
    m = _CONTAINER_RE.match(dirname)
    return m.group(1) if m else None


def pod_uid_of(dirname: str) -> str | None:
    """The pod UID in a pod cgroup directory name (``pod<uid>``, ``...-pod<uid_with_underscores>.slice``)."""
    m = _POD_RE.search(dirname)
    return m.group(1).replace("_", "-") if m else None


def parse_int(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise CgroupError(f"{what}: {text.strip()!r} is not an integer") from None


def parse_v1_quota(text: str) -> LimitValue:
    """cpu.cfs_quota_us: -1 (or any negative) = unlimited."""
    value = parse_int(text, "cpu.cfs_quota_us")
    return UNLIMITED if value < 0 else value


def parse_v1_memory(text: str) -> LimitValue:
    """memory.limit_in_bytes / memory.memsw.limit_in_bytes."""
    value = parse_int(text, "v1 memory limit")
    return UNLIMITED if value < 0 or value >= V1_MEMORY_UNLIMITED_FROM else value


def parse_v2_limit(text: str) -> LimitValue:
    """memory.max, memory.high, memory.swap.max: "max" or bytes."""
    text = text.strip()
    return UNLIMITED if text == "max" else parse_int(text, "v2 limit")


def parse_cpu_max(text: str) -> tuple[LimitValue, int]:
    """cpu.max: "QUOTA PERIOD" or "max PERIOD" (the period may be missing: then the default)."""
    parts = text.split()
    if not parts or len(parts) > 2:
        raise CgroupError(f"cpu.max {text.strip()!r}: expected 'QUOTA PERIOD' or 'max PERIOD'")
    quota: LimitValue = UNLIMITED if parts[0] == "max" else parse_int(parts[0], "cpu.max quota")
    period = parse_int(parts[1], "cpu.max period") if len(parts) == 2 else DEFAULT_CPU_PERIOD_US
    return quota, period


def format_v1(value: LimitValue) -> str:
    return "-1" if value is UNLIMITED else str(value)


def format_v2(value: LimitValue) -> str:
    return "max" if value is UNLIMITED else str(value)


def format_cpu_max(quota: LimitValue, period_us: int) -> str:
    return f"{format_v2(quota)} {period_us}"


def parse_flat_keyed(text: str) -> dict[str, int]:
    """memory.stat / cpu.stat: "key value" lines -> {key: value} (non-integer lines skipped)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def check_cpu(quota: LimitValue | None, period_us: int | None) -> None:
    """Refuse a quota or period the kernel would refuse, saying the accepted range."""
    if period_us is not None and not (CPU_PERIOD_MIN_US <= period_us <= CPU_PERIOD_MAX_US):
        raise OutOfRange(
            f"CPU period {period_us} us is outside the kernel's range "
            f"{CPU_PERIOD_MIN_US}..{CPU_PERIOD_MAX_US} us (1 ms .. 1 s)")
    if quota is None or quota is UNLIMITED:
        return
    if not isinstance(quota, int) or isinstance(quota, bool):
        raise OutOfRange(f"CPU quota {quota!r}: expected an integer of microseconds or UNLIMITED")
    if quota < CPU_QUOTA_MIN_US:
        hint = ""
        if period_us:
            hint = (f" (at period {period_us} us that is {CPU_QUOTA_MIN_US * 1000 // period_us}m CPU"
                    f" or more)")
        raise OutOfRange(f"CPU quota {quota} us is below the kernel's minimum {CPU_QUOTA_MIN_US} us{hint}")
    if quota > CPU_QUOTA_MAX_US:
        raise OutOfRange(f"CPU quota {quota} us is above the kernel's maximum {CPU_QUOTA_MAX_US} us")


def check_memory(value: LimitValue | None, what: str) -> None:
    if value is None or value is UNLIMITED:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise OutOfRange(f"{what} {value!r}: expected an integer of bytes or UNLIMITED")
    if value <= 0 or value > MEMORY_MAX_BYTES:
        raise OutOfRange(f"{what} {value} bytes is outside 1..{MEMORY_MAX_BYTES} bytes"
                         " (use UNLIMITED for no limit)")


def join_nonempty(parts: Iterable[str]) -> str:
    return ", ".join(p for p in parts if p)
