"""Guest-side helpers: make cgroups, burn CPU or hold memory inside them, measure, report JSON.

Runs inside the VM as root on a pure cgroup2 mount at /sys/fs/cgroup (set up by vm.py's init).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

CGROUP_ROOT = pathlib.Path("/sys/fs/cgroup")


def read(path: str | os.PathLike) -> str:
    return pathlib.Path(path).read_text()


def write(path: str | os.PathLike, value: str) -> None:
    # os.write reports the kernel's EINVAL/EBUSY; a buffered write can lose it at close.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def make_cgroup(rel: str, subtree: str = "+cpu +memory +pids") -> pathlib.Path:
    """Create CGROUP_ROOT/rel (and parents), enabling ``subtree`` in every ancestor on the way."""
    path = CGROUP_ROOT
    for part in pathlib.PurePosixPath(rel).parts:
        if subtree:
            write(path / "cgroup.subtree_control", subtree)
        path = path / part
        path.mkdir(exist_ok=True)
    return path


def remove_cgroup(path: pathlib.Path) -> None:
    """Kill what runs in ``path`` and below, then remove the directories bottom-up."""
    if not path.exists():
        return
    if (path / "cgroup.kill").exists():
        write(path / "cgroup.kill", "1")
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _rmdir(child)
    _rmdir(path)


def _rmdir(path: pathlib.Path) -> None:
    deadline = time.monotonic() + 5
    while True:
        try:
            path.rmdir()
            return
        except OSError:
            # EBUSY until the killed tasks have exited.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def start_busy(cg: pathlib.Path) -> subprocess.Popen:
    """A shell busy loop, moved into ``cg`` before this returns."""
    proc = subprocess.Popen(["/bin/sh", "-c", "while :; do :; done"])
    write(cg / "cgroup.procs", str(proc.pid))
    return proc


def cpu_usage_usec(cg: pathlib.Path) -> int:
    for line in read(cg / "cpu.stat").splitlines():
        key, value = line.split()
        if key == "usage_usec":
            return int(value)
    raise KeyError(f"usage_usec missing in {cg}/cpu.stat")


def measure_cpu(cg: pathlib.Path, window_s: float = 1.5) -> float:
    """CPUs used by ``cg`` over ``window_s`` (1.0 = one CPU busy the whole time)."""
    usage0, t0 = cpu_usage_usec(cg), time.monotonic()
    time.sleep(window_s)
    usage1, t1 = cpu_usage_usec(cg), time.monotonic()
    return (usage1 - usage0) / 1e6 / (t1 - t0)


def hold_memory(cg: pathlib.Path, size_bytes: int) -> subprocess.Popen:
    """A Python child in ``cg`` that touches ``size_bytes`` of anonymous memory and keeps it."""
    code = (
        "import os, sys, time\n"
        f"with open('{cg}/cgroup.procs', 'w') as f: f.write(str(os.getpid()))\n"
        f"buf = bytearray({size_bytes})\n"
        "for i in range(0, len(buf), 4096): buf[i] = 1\n"
        "print('ready', flush=True)\n"
        "time.sleep(3600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"memory holder exited with {proc.wait()} before touching {size_bytes} bytes")
    return proc


def raw_files(paths: list[str]) -> dict[str, str]:
    """Exact contents (trailing newline included) of the files that exist."""
    return {p: read(p) for p in paths if os.path.exists(p)}


def memory_events(cg: pathlib.Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in read(cg / "memory.events").splitlines())}


def emit(obj: object) -> None:
    """The driver's one result line; the host test parses the last stdout line."""
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


# A pod and container laid out as a kubelet with the systemd cgroup driver does on cgroup v2.
POD_UID = "3f1c2b8e-5d4a-4e6f-9a7b-1c2d3e4f5a6b"
CONTAINER_ID = "c0ffee" + "0123456789abcdef" * 3 + "0a1b2c3d4e"
POD_REL = (
    "kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{POD_UID.replace('-', '_')}.slice"
)
CONTAINER_REL = f"{POD_REL}/cri-containerd-{CONTAINER_ID}.scope"


class FakePod:
    """The pod and container cgroups with given initial files, processes in the container, and
    everything killed and removed on exit."""

    def __init__(self, pod_files: dict[str, str], container_files: dict[str, str]):
        self.pod = make_cgroup(POD_REL)
        self.container = make_cgroup(CONTAINER_REL)
        self.procs: list[subprocess.Popen] = []
        for name, value in pod_files.items():
            write(self.pod / name, value)
        for name, value in container_files.items():
            write(self.container / name, value)

    def busy(self) -> subprocess.Popen:
        proc = start_busy(self.container)
        self.procs.append(proc)
        return proc

    def hold(self, size_bytes: int) -> subprocess.Popen:
        proc = hold_memory(self.container, size_bytes)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> FakePod:
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        remove_cgroup(CGROUP_ROOT / "kubepods.slice")
