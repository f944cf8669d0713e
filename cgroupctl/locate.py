"""Find the cgroup mode and a container's (and its pod's) cgroup directories.

The roots are parameters: an agent in a pod sees the host's /proc and /sys/fs/cgroup under other
paths (/host/proc, /host/sys/fs/cgroup), and tests point them at fixture trees.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from cgroupctl.errors import NotFound
from cgroupctl.model import CgroupDirs, ContainerCgroups, Mode
from cgroupctl.parse import (
    MountEntry,
    cgroups_path_to_cgroup,
    container_id_of,
    parse_mountinfo,
    parse_proc_cgroup,
    pod_uid_of,
    relative_to,
    split_cgroup_path,
)

# The controllers cgroupctl uses; on v2 they all live in the one unified tree.
CONTROLLERS = ("cpu", "cpuacct", "memory")
# How far up from a process's own cgroup the container's directory may be: crun on cgroup v2 runs
# the processes in a "container" child of the crio-<id>.scope that holds the limits.
_MAX_LEVELS_UP = 2
# How deep a runtime's cgroups path may sit below the hierarchy root when the runtime itself runs
# nested (kind: the node's containerd sees /kubelet/..., the host sees /docker/<node>/kubelet/...).
_MAX_NESTING = 3


def detect_mode(cgroup_root: str = "/sys/fs/cgroup") -> Mode:
    """V2 when the root itself is a cgroup2 tree, HYBRID when v1 hierarchies sit beside a v2 tree at
    ``unified/``, V1 otherwise. Raises NotFound when no hierarchy is there."""
    if os.path.exists(os.path.join(cgroup_root, "cgroup.controllers")):
        return Mode.V2
    if not os.path.isdir(cgroup_root):
        raise NotFound(f"cgroup root {cgroup_root!r} is not a directory")
    if os.path.exists(os.path.join(cgroup_root, "unified", "cgroup.controllers")):
        return Mode.HYBRID
    if _v1_hierarchies(cgroup_root):
        return Mode.V1
    raise NotFound(f"no cgroup hierarchy under {cgroup_root!r}: expected cgroup.controllers (v2) or"
                   " controller directories such as cpu/ and memory/ (v1)")


def _v1_hierarchies(cgroup_root: str) -> dict[str, str]:
    """{controller: hierarchy dir} from the directory names (``cpu,cpuacct``, ``memory``, ...)."""
    found: dict[str, str] = {}
    try:
        names = sorted(os.listdir(cgroup_root))
    except OSError:
        return found
    # Real directories first: "cpu" is often a symlink to "cpu,cpuacct".
    names.sort(key=lambda n: os.path.islink(os.path.join(cgroup_root, n)))
    for name in names:
        if name == "unified":
            continue
        path = os.path.join(cgroup_root, name)
        if not os.path.isdir(path):
            continue
        for controller in name.split(","):
            found.setdefault(controller, path)
    return found


def _unified_controllers(cgroup_root: str) -> set[str]:
    """The controllers a hybrid host has bound to its v2 tree: the root's cgroup.controllers lists
    exactly those not bound to a v1 hierarchy (a controller lives in one hierarchy at a time)."""
    try:
        with open(os.path.join(cgroup_root, "unified", "cgroup.controllers")) as f:
            return set(f.read().split())
    except OSError:
        return set()


def layout(mode: Mode, cgroup_root: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """({controller: hierarchy directory}, the controllers whose v2 files are used) for the
    controllers cgroupctl uses. On a hybrid host each controller is taken where the kernel bound
    it: the cpu or memory controller may sit in the unified tree while the rest stays on v1."""
    if mode is Mode.V2:
        return {c: cgroup_root for c in CONTROLLERS}, CONTROLLERS
    found = _v1_hierarchies(cgroup_root)
    unified = _unified_controllers(cgroup_root) if mode is Mode.HYBRID else set()
    hiers: dict[str, str] = {}
    on_v2: list[str] = []
    for controller in CONTROLLERS:
        # cpuacct has no v2 counterpart: v2's cpu.stat (always there) carries the usage counter.
        v2_name = "cpu" if controller == "cpuacct" else controller
        if v2_name in unified and not (controller == "cpuacct" and "cpuacct" in found):
            hiers[controller] = os.path.join(cgroup_root, "unified")
            on_v2.append(controller)
        elif controller in found and not (controller == "cpu" and "cpu" in unified):
            hiers[controller] = found[controller]
    return hiers, tuple(on_v2)


def hierarchies(mode: Mode, cgroup_root: str) -> dict[str, str]:
    """{controller: hierarchy directory} for the controllers cgroupctl uses."""
    return layout(mode, cgroup_root)[0]


def _read_mounts(proc_root: str) -> list[MountEntry]:
    for path in (os.path.join(proc_root, "self", "mountinfo"), "/proc/self/mountinfo"):
        try:
            with open(path) as f:
                return parse_mountinfo(f.read())
        except OSError:
            continue
    return []


def _mount_root(controller: str, v2: bool, hier_dir: str, mounts: list[MountEntry]) -> tuple[str, ...]:
    """Where the mount at ``hier_dir`` starts inside its hierarchy, in the reader's cgroup namespace
    view ("/" normally; "/docker/<id>" in a kind node on v1; "/../.." when the host's tree is
    bind-mounted into a pod that has its own cgroup namespace)."""
    if v2:
        candidates = [m for m in mounts if m.fstype == "cgroup2"]
    else:
        candidates = [m for m in mounts if m.fstype == "cgroup" and controller in m.super_options]
    if not candidates:
        return ()
    # The mount whose mount point shares the longest tail with the directory in use: exact on the
    # real system, and still right when the tree sits under a prefix (/host, a fixture directory).
    real = split_cgroup_path(os.path.realpath(hier_dir))

    def shared_tail(m: MountEntry) -> int:
        point = split_cgroup_path(m.mount_point)
        n = 0
        while n < min(len(point), len(real)) and point[-1 - n] == real[-1 - n]:
            n += 1
        return n

    best = max(shared_tail(m) for m in candidates)
    roots = {m.root for m in candidates if shared_tail(m) == best}
    if len(roots) == 1:
        return split_cgroup_path(roots.pop())
    return ()


def _inside(path: str, top: str) -> bool:
    real, real_top = os.path.realpath(path), os.path.realpath(top)
    return real == real_top or real.startswith(real_top.rstrip("/") + "/")


def _from_pid(pid: int, on_v2: tuple[str, ...], hiers: Mapping[str, str], proc_root: str,
              mounts: list[MountEntry]) -> dict[str, tuple[str, ...]]:
    path = os.path.join(proc_root, str(pid), "cgroup")
    try:
        with open(path) as f:
            table = parse_proc_cgroup(f.read())
    except FileNotFoundError:
        raise NotFound(f"process {pid}: {path} does not exist (has the process exited? is proc_root"
                       f" {proc_root!r} the host's /proc?)") from None
    except OSError as e:
        raise NotFound(f"process {pid}: cannot read {path}: {e.strerror}") from None
    out: dict[str, tuple[str, ...]] = {}
    for controller, hier in hiers.items():
        v2 = controller in on_v2
        key = "" if v2 else controller
        if key not in table:
            continue
        comps = split_cgroup_path(table[key])
        root = _mount_root(controller, v2, hier, mounts)
        rel = relative_to(comps, root)
        if rel is None:
            rel = _across_namespace(comps, root, hier)
        if rel is None:
            raise NotFound(
                f"process {pid}: its {controller} cgroup {table[key]!r} is outside the cgroup mount at"
                f" {hier!r} (mount root {'/' + '/'.join(root)!r}): the reader is in another cgroup"
                " namespace; mount the host's cgroup tree and /proc (hostPID, host cgroup namespace)")
        out[controller] = rel
    return out


def _across_namespace(comps: tuple[str, ...], root: tuple[str, ...], hier: str) -> tuple[str, ...] | None:
    """Resolve a path shown relative to the reader's cgroup namespace ("/../../burstable/pod/ctr")
    against a mount of the host tree whose root shows as k levels up ("/../../../.."): the target
    then sits ``k - j`` (unknown) directories below the mount, followed by its own components.
    Found by looking exactly that deep; accepted only when exactly one directory matches."""
    k = len(root)
    if not root or any(part != ".." for part in root):
        return None
    j = 0
    while j < len(comps) and comps[j] == "..":
        j += 1
    rest = comps[j:]
    if j > k or not rest or ".." in rest:
        return None
    depth = k - j
    prefixes: list[tuple[str, ...]] = [()]
    for _ in range(depth):
        prefixes = [(*p, e.name) for p in prefixes for e in _subdirs(os.path.join(hier, *p))]
    matches = [(*p, *rest) for p in prefixes if os.path.isdir(os.path.join(hier, *p, *rest))]
    return matches[0] if len(matches) == 1 else None


def _subdirs(path: str) -> list[os.DirEntry]:
    try:
        return [e for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _container_level(rel: tuple[str, ...]) -> tuple[str, ...]:
    """Walk up from a process's cgroup to the directory named after the container, if one is near."""
    for up in range(0, _MAX_LEVELS_UP + 1):
        if len(rel) - up <= 0:
            break
        if container_id_of(rel[len(rel) - 1 - up]):
            return rel[: len(rel) - up]
    return rel


# The child crun makes under the container's cgroup for its processes (with CRI-O too).
INNER_NAME = "container"


def _inner_level(process_rel: tuple[str, ...] | None, container_rel: tuple[str, ...], hier: str) -> tuple[str, ...] | None:
    """The container's child cgroup its processes run in, when there is one (crun's ``container/``).

    From a process's cgroup: the level right below the container's. From a cgroups path alone: the
    ``container`` child when it exists."""
    if process_rel is not None:
        below = process_rel[len(container_rel):] if process_rel[: len(container_rel)] == container_rel else ()
        # Only crun's own child: a container running its own cgroup tree (systemd inside) is not one.
        return (*container_rel, INNER_NAME) if below[:1] == (INNER_NAME,) else None
    if os.path.isdir(os.path.join(hier, *container_rel, INNER_NAME)):
        return (*container_rel, INNER_NAME)
    return None


def _search_nested(hier: str, comps: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Prefixes (up to _MAX_NESTING levels) under which ``comps`` exists in the hierarchy."""
    found: list[tuple[str, ...]] = []
    level: list[tuple[str, ...]] = [()]
    for _ in range(_MAX_NESTING):
        next_level: list[tuple[str, ...]] = []
        for prefix in level:
            base = os.path.join(hier, *prefix)
            try:
                entries = [e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            for name in entries:
                candidate = (*prefix, name)
                if os.path.isdir(os.path.join(hier, *candidate, *comps)):
                    found.append((*candidate, *comps))
                next_level.append(candidate)
        level = next_level
        if found:
            break
    return found


def _from_cgroups_path(cgroups_path: str, hiers: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    comps = split_cgroup_path(cgroups_path_to_cgroup(cgroups_path))
    if not comps or comps[0] == "..":
        raise NotFound(f"cgroups path {cgroups_path!r} does not name a cgroup inside the hierarchy")
    out: dict[str, tuple[str, ...]] = {}
    for controller, hier in hiers.items():
        if os.path.isdir(os.path.join(hier, *comps)):
            out[controller] = comps
            continue
        matches = _search_nested(hier, comps)
        if len(matches) > 1:
            shown = ", ".join("/" + "/".join(m) for m in matches[:4])
            raise NotFound(f"cgroups path {cgroups_path!r} is ambiguous under {hier!r}: found {shown};"
                           " locate by pid instead")
        if matches:
            out[controller] = matches[0]
    if not out:
        raise NotFound(f"cgroups path {cgroups_path!r} (cgroup {'/' + '/'.join(comps)}) exists under none"
                       f" of {sorted(set(hiers.values()))} (nor nested up to {_MAX_NESTING} levels below)")
    return out


def locate(*, pid: int | None = None, cgroups_path: str | None = None, proc_root: str = "/proc",
           cgroup_root: str = "/sys/fs/cgroup", mode: Mode | None = None) -> ContainerCgroups:
    """A container's cgroup directories, and its pod's (the parent directory), per controller.

    From ``pid`` (its /proc/PID/cgroup, resolved against the cgroup mount's root so that a cgroup
    namespace is handled) or, when no pid is given, from the runtime's ``cgroups_path`` (cgroupfs
    ``/kubepods/...`` or systemd ``slice:prefix:name``; looked for directly and then nested a few
    levels down, as in kind). ``pid`` wins when both are given; the cgroups path is the fallback
    when the process cannot be read. Never returns a directory outside the
    cgroup mount. ``mode`` skips detection when the caller already knows it.
    """
    if pid is None and not cgroups_path:
        raise NotFound("locate needs a pid or a cgroups path")
    mode = mode or detect_mode(cgroup_root)
    hiers, on_v2 = layout(mode, cgroup_root)
    if not hiers:
        raise NotFound(f"none of the controllers {CONTROLLERS} is mounted under {cgroup_root!r}")
    process_rels: dict[str, tuple[str, ...]] = {}
    if pid is not None:
        try:
            process_rels = _from_pid(pid, on_v2, hiers, proc_root, _read_mounts(proc_root))
            rels = {c: _container_level(r) for c, r in process_rels.items()}
            what = f"process {pid}"
        except NotFound:
            if not cgroups_path:
                raise
            # The process may have just exited or be invisible from this /proc: the runtime's
            # path still names the cgroup.
            rels = _from_cgroups_path(cgroups_path, hiers)
            what = f"cgroups path {cgroups_path!r}"
    else:
        assert cgroups_path is not None
        rels = _from_cgroups_path(cgroups_path, hiers)
        what = f"cgroups path {cgroups_path!r}"
    container: dict[str, str] = {}
    pod: dict[str, str] = {}
    inner: dict[str, str] = {}
    for controller, rel in rels.items():
        hier = hiers[controller]
        directory = os.path.join(hier, *rel)
        if not os.path.isdir(directory):
            raise NotFound(f"{what}: {controller} cgroup directory {directory!r} does not exist")
        if not _inside(directory, hier):
            raise NotFound(f"{what}: {directory!r} resolves outside the cgroup mount {hier!r}")
        container[controller] = directory
        if len(rel) >= 2:
            pod[controller] = os.path.join(hier, *rel[:-1])
        inner_rel = _inner_level(process_rels.get(controller) if process_rels else None, rel, hier)
        if inner_rel is not None and os.path.isdir(os.path.join(hier, *inner_rel)):
            inner[controller] = os.path.join(hier, *inner_rel)
    if "cpu" not in container and "memory" not in container:
        raise NotFound(f"{what}: neither a cpu nor a memory cgroup was found under {cgroup_root!r}")
    any_rel = rels.get("memory") or rels.get("cpu") or ()
    return ContainerCgroups(
        mode=mode,
        container=CgroupDirs(**container),
        pod=CgroupDirs(**pod) if pod else None,
        container_id=container_id_of(any_rel[-1]) if any_rel else None,
        pod_uid=pod_uid_of(any_rel[-2]) if len(any_rel) >= 2 else None,
        cgroup_paths={c: "/" + "/".join(r) for c, r in rels.items()},
        v2_controllers=tuple(c for c in on_v2 if c in container) if mode is Mode.HYBRID else (),
        inner=CgroupDirs(**inner) if inner else None,
    )
