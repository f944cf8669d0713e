"""The side effects: write plans into cgroup files (checked, read back, rolled back), snapshots."""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from cgroupctl.errors import BelowUsage, CgroupError, NotFound, WriteFailed
from cgroupctl.model import Applied, Check, ContainerCgroups, Done, Limits, Plan, Snapshot, Write
from cgroupctl.parse import parse_cpu_max, parse_int, parse_v1_memory, parse_v1_quota, parse_v2_limit
from cgroupctl.planner import plan as make_plan
from cgroupctl.planner import plan_restore
from cgroupctl.read import all_limit_paths, limit_paths, read_files, read_limits, read_state, read_text

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_V1_MEMORY = ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
_V2_MEMORY = ("memory.max", "memory.high", "memory.swap.max")


def _meaning(path: str, err: int) -> str:
    """What an errno means for this cgroup file, in words."""
    name = os.path.basename(path)
    if err == errno_mod.ENOENT:
        return "the cgroup or file is gone (has the container exited?)"
    if err in (errno_mod.EACCES, errno_mod.EPERM, errno_mod.EROFS):
        return "not permitted: needs root and a writable cgroup mount"
    if err == errno_mod.EBUSY and name in _V1_MEMORY:
        return "cannot reclaim: the cgroup uses more than the new limit and the kernel could not free enough"
    if err == errno_mod.EINVAL:
        if name in ("cpu.cfs_quota_us", "cpu.cfs_period_us", "cpu.max"):
            return ("out of range, or ordering: the quota/period ratio would exceed the parent's or fall"
                    " below a child's")
        if name == "memory.limit_in_bytes":
            return "ordering: above memory.memsw.limit_in_bytes (or not a valid size)"
        if name == "memory.memsw.limit_in_bytes":
            return "ordering: below memory.limit_in_bytes (or not a valid size)"
        return "out of range: the kernel refused the value"
    return os.strerror(err)


def write_file(path: str, value: str) -> None:
    """One checked write: os.write reports the kernel's errno (a buffered file object can lose it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)  # O_TRUNC as echo does; kernfs ignores it
    except OSError as e:
        meaning = _meaning(path, e.errno or 0)
        raise WriteFailed(f"cannot open {path} to write {value!r}: {meaning}", path=path, value=value,
                          errno=e.errno, meaning=meaning) from None
    data = value.encode()
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise WriteFailed(f"short write to {path}: {written} of {len(data)} bytes of {value!r}", path=path,
                              value=value, meaning="short write")
    except OSError as e:
        meaning = _meaning(path, e.errno or 0)
        raise WriteFailed(f"writing {value!r} to {path} failed with {errno_mod.errorcode.get(e.errno or 0, e.errno)}:"
                          f" {meaning}", path=path, value=value, errno=e.errno, meaning=meaning) from None
    finally:
        os.close(fd)


def _comparable(name: str, text: str) -> object:
    """A file value as the kernel stores it, so a write and its read-back compare (memory sizes are
    rounded down to whole pages; -1 and 9223372036854771712 both mean unlimited)."""
    if name in _V1_MEMORY or name in _V2_MEMORY:
        value = parse_v1_memory(text) if name in _V1_MEMORY else parse_v2_limit(text)
        return value if not isinstance(value, int) else value // _PAGE_SIZE * _PAGE_SIZE
    if name == "cpu.max":
        return parse_cpu_max(text)
    if name == "cpu.cfs_quota_us":
        return parse_v1_quota(text)
    try:
        return int(text)
    except ValueError:
        return text.strip()


Writer = Callable[[str, str], None]


def _write_and_verify(path: str, value: str, write: Writer = write_file) -> str:
    write(path, value)
    read_back = read_text(path)
    if read_back is None:
        raise WriteFailed(f"{path} vanished right after writing {value!r}", path=path, value=value,
                          errno=errno_mod.ENOENT, meaning=_meaning(path, errno_mod.ENOENT))
    name = os.path.basename(path)
    if _comparable(name, read_back) != _comparable(name, value):
        raise WriteFailed(f"wrote {value!r} to {path} but it reads back {read_back!r}", path=path, value=value,
                          meaning="read-back differs")
    return read_back


def _rollback(done: list[Write], write: Writer = write_file) -> list[str]:
    """Put back the previous contents in reverse order (each earlier state was accepted, so the way
    back is too); returns the failures."""
    failures = []
    for w in reversed(done):
        if w.previous is None:
            continue
        try:
            write(w.path, w.previous)
        except CgroupError as e:
            failures.append(str(e))
    return failures


def apply(plan: Plan, *, write: Writer = write_file) -> Applied:
    """Run the plan's steps in order: each write checked and read back, each usage check done. When a
    step fails, the writes already made are undone in reverse order, so the plan applies whole or
    not at all; the error says what failed and whether the rollback held.

    ``write(path, value)`` makes one write (default ``write_file``); the agent passes one that also
    tells systemd about units it manages, so that a daemon-reload keeps the change."""
    started = time.perf_counter()
    done: list[Done] = []
    written: list[Write] = []
    for step in plan.steps:
        try:
            if isinstance(step, Check):
                text = read_text(step.path)
                if text is None:
                    raise NotFound(f"{step.path} does not exist (has the container exited?)")
                used = parse_int(text, step.path)
                if used > step.max_bytes:
                    raise BelowUsage(
                        f"{step.path} is {used} bytes, still above the new limit {step.max_bytes} bytes after"
                        " reclaim through memory.high: memory.max not written (it would OOM-kill)",
                        path=step.path, limit_bytes=step.max_bytes, unreclaimable_bytes=used)
                continue
            read_back = _write_and_verify(step.path, step.value, write)
            written.append(step)
            done.append(Done(path=step.path, value=step.value, read_back=read_back))
        except (CgroupError, OSError) as raised:
            e = raised if isinstance(raised, CgroupError) else WriteFailed(
                f"{step.path}: {raised.strerror or raised}", path=step.path,
                value=getattr(step, "value", ""), errno=raised.errno,
                meaning=_meaning(step.path, raised.errno or 0))
            if isinstance(e, WriteFailed) and e.meaning == "read-back differs":
                written.append(step)  # the kernel took something: put the old value back too
            failures = _rollback(written, write)
            note = (f"; rolled back {len(written)} earlier write(s)" if not failures
                    else f"; ROLLBACK FAILED, cgroup left changed: {'; '.join(failures)}")
            e.args = (f"{e.args[0] if e.args else e}{note if written else ''}",)
            if e is raised:
                raise
            raise e from raised
    return Applied(done=tuple(done), elapsed_s=time.perf_counter() - started)


def snapshot(cg: ContainerCgroups, paths: list[str] | tuple[str, ...] | None = None) -> Snapshot:
    """The exact content of ``paths`` (default: every limit file of the container and pod cgroups
    that cgroupctl may write). JSON-serializable through ``to_dict()``."""
    return Snapshot(cgroups=cg, files=read_files(list(paths) if paths is not None else all_limit_paths(cg)))


def restore(snapshot: Snapshot, force: bool = False, *, write: Writer = write_file) -> Applied:
    """Put back exactly the snapshot's contents, in an order the kernel accepts, then check that
    every file reads exactly as saved. Idempotent; files whose cgroup is gone are reported in
    ``skipped`` (nothing left to restore). A memory limit now below what the container cannot give
    back is refused (BelowUsage) unless forced."""
    state = read_state(snapshot.cgroups, require_container=False)
    applied = apply(plan_restore(state, snapshot, force=force), write=write)
    now = read_files(list(snapshot.files))
    wrong = {p: (t, now[p]) for p, t in snapshot.files.items() if p in now and now[p] != t}
    if wrong:
        shown = "; ".join(f"{p}: saved {t!r}, now {n!r}" for p, (t, n) in wrong.items())
        raise WriteFailed(f"restore did not put back the exact contents: {shown}", meaning="not exact")
    return dataclasses.replace(applied, skipped=tuple(p for p in snapshot.files if p not in now))


def set_limits(cg: ContainerCgroups, limits: Limits, force: bool = False, *, write: Writer = write_file) -> Applied:
    """Snapshot, plan, apply and read back in one call: the container (and its pod, ordered around
    it) get ``limits``. The result carries the snapshot for ``restore`` and the limits read back."""
    state = read_state(cg)
    saved = Snapshot(cgroups=cg, files=dict(state.files))
    applied = apply(make_plan(state, limits, force=force), write=write)
    return dataclasses.replace(applied, snapshot=saved, limits=read_limits(cg))


@dataclass
class PodChange:
    """The pod half of a change whose container half someone else makes (the agent's ``auto``
    method asks the runtime, CRI UpdateContainerResources, to change the container itself).

    ``prepare_pod`` has already applied ``before`` (pod raised where the container will need it);
    after the runtime changed the container, call ``finish()``; if the runtime failed, call
    ``abort()`` (pod put back as it was).
    """

    plan: Plan
    snapshot: Snapshot
    before: Applied
    write: Writer = write_file

    def finish(self) -> Applied:
        """The plan's pod-after stage (empty: a change never lowers the pod) and, on v2, the
        container's memory.high moved with memory.max: a runtime's update (runc) sets memory.max
        and leaves the kubelet's memory.high where it was, which would keep a raised container
        throttled at its old size."""
        return apply(Plan(self.plan.pod_after.steps + _memory_high_moves(self.plan.container)), write=self.write)

    def abort(self) -> Applied:
        """The pod put back as it was (the runtime refused the container change)."""
        return restore(self.snapshot, write=self.write)


def _memory_high_moves(container: Plan) -> tuple[Write, ...]:
    """The net memory.high write of each level of a container stage (a temporary staging value left out)."""
    by_path: dict[str, list[Write]] = {}
    for w in container.writes:
        if os.path.basename(w.path) == "memory.high":
            by_path.setdefault(w.path, []).append(w)
    return tuple(dataclasses.replace(writes[-1], previous=writes[0].previous,
                                     why="memory.high after the runtime moved memory.max: runtimes leave it")
                 for writes in by_path.values() if writes[-1].value != writes[0].previous)


def prepare_pod(cg: ContainerCgroups, limits: Limits, force: bool = False, *, write: Writer = write_file) -> PodChange:
    """Plan the whole change (with the container's current values, so the memory-safety check and
    the pod's new values are computed as for ``set_limits``) and apply only its pod-before stage."""
    state = read_state(cg)
    full = make_plan(state, limits, force=force)
    pod_paths = limit_paths(cg, cg.pod) if cg.pod else []
    saved = Snapshot(cgroups=cg, files={p: t for p, t in state.files.items() if p in pod_paths})
    return PodChange(plan=full, snapshot=saved, before=apply(full.pod_before, write=write), write=write)
