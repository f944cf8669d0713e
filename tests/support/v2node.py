"""A cgroup v2 worker node as a test fixture: Debian forky under QEMU (TCG), booted from a cached image.

``V2Node().boot()`` builds (or finds) the disk image of scripts/build-v2-image.sh (systemd, containerd
2.x with CRI config version 3 and the systemd cgroup driver, runc and crun, the CNI bridge), makes a
second small disk with the project's code, its wheels for the guest's Python and the busybox test
images, and boots both with the root disk as a throwaway snapshot. systemd in the guest starts the
test driver (tests/support/v2guest.py); QEMU's user network (restricted: the guest reaches nothing)
forwards three loopback ports of the host to it: the driver, containerd's CRI socket and the agent's.

``call(op, **args)`` runs one driver operation (see v2guest's ``op_*``); ``run_pod`` makes a pod as a
systemd-driver kubelet would; ``agent_address`` is the gRPC target of the agent in the VM.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

from tests.support import images

REPO = pathlib.Path(__file__).resolve().parents[2]
V2_DIR = pathlib.Path(os.environ.get("KUBECTL_CHAOS_V2_DIR", "/var/cache/kubectl-chaos/v2"))
QEMU = "qemu-system-x86_64"
BUILD_SCRIPT = REPO / "scripts" / "build-v2-image.sh"
# The guest's Python (forky): wheels are fetched for it.
GUEST_PYTHON = "3.14"
# What the agent imports in node-local mode, at the versions the host's venv runs.
GUEST_PACKAGES = ("grpcio", "grpcio-health-checking", "protobuf", "pyroute2", "psutil", "prometheus-client",
                  "click", "PyYAML", "jeepney")
PROJECT_PACKAGES = ("cri_api", "cgroupctl", "daemonset", "netshape", "plugin")
GUEST_PORTS = {"driver": 7000, "cri": 7001, "agent": 7002}


class V2NodeError(RuntimeError):
    """The VM could not be built, booted or driven; the message ends with the console tail."""


def missing_prerequisites() -> list[str]:
    missing = []
    for tool, package in ((QEMU, "qemu-system-x86"), ("mmdebstrap", "mmdebstrap"), ("mke2fs", "e2fsprogs"),
                          ("cpio", "cpio")):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            missing.append(f"{tool} (Debian package {package})")
    if not os.path.exists("/bin/busybox"):
        missing.append("/bin/busybox (busybox-static)")
    if os.geteuid() != 0:
        missing.append("root (mmdebstrap, mke2fs -d of a root file system)")
    return missing


def image_dir() -> pathlib.Path:
    """The built image's directory (scripts/build-v2-image.sh; a cached build returns at once)."""
    res = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "KUBECTL_CHAOS_V2_DIR": str(V2_DIR)})
    if res.returncode != 0:
        raise V2NodeError(f"building the v2 node image failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return pathlib.Path(res.stdout.strip().splitlines()[-1])


def guest_site() -> pathlib.Path:
    """The agent's dependencies unpacked for the guest's Python (wheels from PyPI, cached by their list)."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in GUEST_PACKAGES]
    digest = hashlib.sha256(f"{GUEST_PYTHON} {' '.join(pins)}".encode()).hexdigest()[:16]
    site = V2_DIR / f"site-{digest}"
    if (site / ".complete").exists():
        return site
    work = pathlib.Path(tempfile.mkdtemp(prefix=".site-", dir=V2_DIR))
    try:
        wheels = work / "wheels"
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", GUEST_PYTHON,
               "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
               "--platform", "manylinux2014_x86_64", "--platform", "manylinux2010_x86_64", "-d", str(wheels), *pins]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise V2NodeError(f"pip download for the guest failed:\n{res.stderr[-3000:]}")
        out = work / "site"
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(out)  # purelib and platlib both go to the top of a wheel
        (out / ".complete").touch()
        shutil.rmtree(site, ignore_errors=True)
        os.replace(out, site)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return site


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _project_disk(path: pathlib.Path, site: pathlib.Path) -> None:
    """ext4 image with the project's code (as in the working tree now), its wheels and the test images."""
    with tempfile.TemporaryDirectory(prefix="kcx-v2disk-") as tmp:
        root = pathlib.Path(tmp)
        src = root / "src"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for pkg in PROJECT_PACKAGES:
            shutil.copytree(REPO / pkg, src / pkg, ignore=ignore)
        (src / "tests" / "support").mkdir(parents=True)
        (src / "bench").mkdir()
        # netns.py and bench_agent.py: the benchmarks' measurements, run inside the VM (their --node v2).
        for name in ("tests/__init__.py", "tests/support/__init__.py", "tests/support/v2guest.py",
                     "tests/support/images.py", "tests/support/netns.py", "bench/bench_agent.py"):
            shutil.copy2(REPO / name, src / name)
        shutil.copytree(site, root / "site", ignore=ignore)
        (root / "images").mkdir()
        shutil.copy2(images.build_default(root / "images"), root / "images" / "images.tar")
        size_mib = 64 + sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) // 2**20 * 2
        res = subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(root), str(path), f"{size_mib}M"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise V2NodeError(f"mke2fs -d of the project disk failed: {res.stderr}")


class V2Node:
    """The booted VM. ``boot()`` ... ``close()`` (or a ``with`` block)."""

    def __init__(self, *, cpus: int = 2, memory_mib: int = 2048, boot_timeout_s: float = 240.0):
        self.cpus = cpus
        self.memory_mib = memory_mib
        self.boot_timeout_s = boot_timeout_s
        self.ports = {name: _free_port() for name in GUEST_PORTS}
        self.timings_s: dict[str, float] = {}
        self.versions: list[str] = []
        self.image: pathlib.Path | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._file = None

    @property
    def agent_address(self) -> str:
        return f"127.0.0.1:{self.ports['agent']}"

    @property
    def cri_address(self) -> str:
        return f"127.0.0.1:{self.ports['cri']}"

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = (pathlib.Path(self._tmp.name) / "console.log").read_text(errors="replace")  # type: ignore[union-attr]
        except (OSError, AttributeError):
            return "(no console output)"
        return "--- console (last lines) ---\n" + "\n".join(text.splitlines()[-lines:])

    def boot(self) -> V2Node:
        missing = missing_prerequisites()
        if missing:
            raise V2NodeError("cannot boot the v2 node, missing: " + "; ".join(missing))
        t0 = time.monotonic()
        self.image = image_dir()
        site = guest_site()
        self.timings_s["image"] = time.monotonic() - t0
        self._tmp = tempfile.TemporaryDirectory(prefix="kcx-v2-")
        tmp = pathlib.Path(self._tmp.name)
        t0 = time.monotonic()
        _project_disk(tmp / "project.img", site)
        self.timings_s["project_disk"] = time.monotonic() - t0
        fwd = ",".join(f"hostfwd=tcp:127.0.0.1:{self.ports[n]}-:{p}" for n, p in GUEST_PORTS.items())
        argv = [
            QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", str(self.cpus), "-m", str(self.memory_mib),
            "-kernel", str(self.image / "vmlinuz"), "-initrd", str(self.image / "initrd.cpio"),
            "-append", "console=ttyS0 quiet panic=-1 systemd.show_status=0 net.ifnames=0",
            "-drive", f"file={self.image / 'rootfs.img'},if=virtio,format=raw,snapshot=on",
            "-drive", f"file={tmp / 'project.img'},if=virtio,format=raw,readonly=on",
            "-netdev", f"user,id=n0,restrict=on,{fwd}", "-device", "virtio-net-pci,netdev=n0",
            "-serial", f"file:{tmp / 'console.log'}",
        ]  # fmt: skip
        t0 = time.monotonic()
        with open(tmp / "qemu.stderr", "wb") as err:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                          start_new_session=True)
        try:
            self._connect(t0 + self.boot_timeout_s)
            self.timings_s["boot"] = time.monotonic() - t0
            t0 = time.monotonic()
            setup = self.call("setup", wait_s=180)
            self.timings_s["setup"] = time.monotonic() - t0
            self.versions = setup["versions"]
        except BaseException:
            self.close(timeout_s=0)
            raise
        return self

    def _connect(self, deadline: float) -> None:
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise V2NodeError(f"qemu exited with status {self._proc.returncode} during boot\n{self.console_tail()}")
            try:
                sock = socket.create_connection(("127.0.0.1", self.ports["driver"]), timeout=2)
                sock.settimeout(10)
                f = sock.makefile("rwb")
                f.write(b'{"op": "ping"}\n')
                f.flush()
                line = f.readline()  # QEMU accepts before the guest listens: an empty answer means not yet
                if line:
                    sock.settimeout(None)
                    self._sock, self._file = sock, f
                    return
                sock.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise V2NodeError(f"the v2 node's driver did not answer within {self.boot_timeout_s} s\n{self.console_tail()}")
            time.sleep(0.5)

    def call(self, op: str, wait_s: float = 120.0, **args):
        """One driver operation; raises V2NodeError with the guest's traceback when it fails."""
        if self._file is None or self._sock is None:
            raise V2NodeError("the v2 node is not booted")
        self._sock.settimeout(wait_s)
        try:
            self._file.write(json.dumps({"op": op, **args}).encode() + b"\n")
            self._file.flush()
            line = self._file.readline()
        except OSError as e:
            raise V2NodeError(f"driver call {op} failed: {e}\n{self.console_tail()}") from None
        if not line:
            raise V2NodeError(f"the driver closed the connection during {op}\n{self.console_tail()}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise V2NodeError(f"{op} failed in the VM: {reply['error']}\n{reply.get('traceback', '')}")
        return reply["result"]

    def sh(self, script: str, timeout_s: float = 60.0, check: bool = True) -> str:
        res = self.call("sh", wait_s=timeout_s + 30, script=script, timeout_s=timeout_s)
        if check and res["rc"] != 0:
            raise V2NodeError(f"`{script}` exited {res['rc']}: {res['stderr']}")
        return res["stdout"]

    def read(self, *paths: str) -> dict[str, str | None]:
        return self.call("read", paths=list(paths))

    def close(self, timeout_s: float = 20.0) -> None:
        if self._proc is not None and self._proc.poll() is None and self._file is not None:
            with contextlib.suppress(Exception):
                self.call("poweroff", wait_s=5)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = self._file = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def died(self, wait_s: float = 2.0) -> str:
        """"" while QEMU runs (after waiting up to ``wait_s`` for it to end: a test can see the guest's
        connection drop a moment before QEMU is gone); else why it stopped: the guest's panic line from
        the console (the kernel boots with panic=-1 and QEMU with -no-reboot, so a guest panic ends
        QEMU), or its exit status."""
        if self._proc is None:
            return ""
        try:
            self._proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return ""
        text = self.console_tail(200)
        panic = [line.strip() for line in text.splitlines() if "Kernel panic" in line or "Fatal exception" in line]
        return panic[-1] if panic else f"qemu exited with status {self._proc.returncode}"

    def reboot(self) -> dict:
        """A fresh guest in place of a dead one (same ports, a new throwaway snapshot of the root disk),
        its agent started; returns ``agent_start``'s result."""
        self.close(timeout_s=0)
        self.boot()
        return self.call("agent_start", wait_s=120)

    def __enter__(self) -> V2Node:
        return self.boot()

    def __exit__(self, *exc) -> None:
        self.close()


class EarlyBoot:
    """Boots the v2 node, and starts its agent, in a thread while other tests run, and hands the result
    to the ``v2node`` fixture. The session starts it with its unit tests (tests/conftest.py): they
    measure no CPU share, no throughput and no time, so the emulated CPUs beside them change nothing
    they assert, and the minute the boot takes under TCG comes off the session's wall time. The
    tests that do measure (host node, kernel, the small VM's) never run beside it."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._node: V2Node | None = None
        self._agent: dict | None = None
        self._error: BaseException | None = None
        self._booting: V2Node | None = None
        self.started_at: float | None = None

    @property
    def started(self) -> bool:
        return self.started_at is not None

    def start(self) -> None:
        if self.started_at is not None:
            return
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="v2node-early-boot", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        node = self._booting = V2Node()
        try:
            node.boot()  # closes the VM itself when it fails
            try:
                self._agent = node.call("agent_start", wait_s=120)
            except BaseException:
                node.close(timeout_s=0)
                raise
            self._node = node
        except BaseException as e:  # handed to the fixture, which raises it in the first v2 test
            self._error = e
        finally:
            self._booting = None

    def take(self, timeout_s: float = 600.0) -> tuple[V2Node, dict] | None:
        """The booted node and its ``agent_start`` result, once the thread is done; None when no early
        boot was started or it was taken already; raises what the boot raised."""
        if self._thread is None:
            return None
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise V2NodeError(f"the v2 node's early boot did not finish within {timeout_s:g} s")
        self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        assert self._node is not None and self._agent is not None
        taken = (self._node, self._agent)
        self._node = self._agent = None
        return taken

    def discard(self) -> None:
        """At the end of the session: close a node that no test took (a run stopped before them). A
        boot still under way is stopped, not waited for: its QEMU is killed and the thread, a daemon,
        fails on its own."""
        booting = self._booting
        if self._thread is not None and self._thread.is_alive() and booting is not None:
            with contextlib.suppress(Exception):
                booting.close(timeout_s=0)
            return
        with contextlib.suppress(BaseException):
            taken = self.take(timeout_s=5)
            if taken is not None:
                taken[0].close()


# The session's one early boot (tests/conftest.py starts it, tests/vm/conftest.py takes it).
EARLY_BOOT = EarlyBoot()
