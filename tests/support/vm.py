"""Boot Debian's cloud kernel in QEMU (TCG) and run scripts in it: real cgroup v2 on any host.

The guest is an initramfs only (no disk): busybox-static, the host's CPython (the interpreter
pytest runs on, with its shared libraries and a trimmed stdlib), a small agent, and the files a
test asks for. The base part (busybox + Python) is built once and cached by content hash; the
per-boot part (init, agent, test files, kernel modules) is a second cpio archive appended to it,
which the kernel unpacks on top.

Two serial ports: ttyS0 is the console (kernel messages, init's output; kept in a log whose tail
goes into every error), ttyS1 a clean control channel to the agent over a unix socket. The host
sends one JSON line per script; the agent runs it with ``sh`` and answers between markers::

    @@KCX-BEGIN <id>@@
    <base64 of a JSON object: stdout, stderr, exit_code, timed_out, duration_s>
    @@KCX-END <id> exit=<code>@@

Usage::

    with Vm(files={"/opt/kcx/cgroupctl": "cgroupctl"}) as vm:
        result = vm.run("cat /sys/fs/cgroup/cgroup.controllers", timeout_s=30)

or ``run_in_vm(script, files, timeout_s)`` for a single boot. The kernel comes from
scripts/setup-vm.sh (``$KUBECTL_CHAOS_VM_DIR``, default /var/cache/kubectl-chaos/vm).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping

VM_DIR = pathlib.Path(os.environ.get("KUBECTL_CHAOS_VM_DIR", "/var/cache/kubectl-chaos/vm"))
QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
# Bump when the layout of the base image changes, so cached images are rebuilt.
_BASE_LAYOUT_VERSION = "1"

_BEGIN = re.compile(rb"@@KCX-BEGIN (\d+)@@\n")
_END = re.compile(rb"@@KCX-END (\d+) exit=(-?\d+)@@\n")
_READY = b"@@KCX-READY@@\n"

# Parts of the stdlib a cgroup test never imports. The image is about 35 MiB (57 MiB where binutils'
# strip is missing: libpython and the extension modules ship with debug info).
_STDLIB_SKIP_DIRS = {
    "test", "tests", "idle_test", "site-packages", "idlelib", "tkinter", "turtledemo", "ensurepip",
    "lib2to3", "pydoc_data", "distutils", "venv",
}
_STDLIB_SKIP_PREFIX = ("config-",)
# Extension modules left out: test-only ones, and those pulling in big libraries (OpenSSL, sqlite,
# ncurses, tk); hashlib falls back to its built-in digests without _hashlib.
_DYNLOAD_SKIP = re.compile(
    r"^(_test|_ctypes_test|_tkinter|xx|_curses|readline|nis|spwd|ossaudiodev|_ssl|_hashlib|_sqlite3|_dbm|_gdbm)"
)


class VmError(RuntimeError):
    """The VM could not be booted or did not answer; the message ends with the console tail."""


@dataclasses.dataclass(frozen=True)
class VmResult:
    stdout: str
    exit_code: int
    stderr: str = ""
    timed_out: bool = False
    duration_s: float = 0.0


def kernel_dir() -> pathlib.Path:
    return VM_DIR / "current"


def kernel_path() -> pathlib.Path:
    return kernel_dir() / "vmlinuz"


def missing_prerequisites() -> list[str]:
    """What the VM needs and this host lacks (empty when a VM can boot)."""
    missing = []
    if shutil.which(QEMU) is None:
        missing.append(f"{QEMU} (Debian package qemu-system-x86)")
    if not kernel_path().is_file():
        missing.append(f"the cloud kernel at {kernel_path()} (run scripts/setup-vm.sh)")
    if not os.path.isfile(BUSYBOX):
        missing.append(f"{BUSYBOX} (Debian package busybox-static)")
    if shutil.which("ldd") is None:
        missing.append("ldd (Debian package libc-bin)")
    return missing


# -- cpio (newc) writer -------------------------------------------------------------------------


class _Cpio:
    """Writes a newc cpio archive, the format the kernel unpacks as an initramfs."""

    def __init__(self, out):
        self._out = out
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", mtime: int = 0, nlink: int = 1) -> None:
        name_b = name.encode() + b"\0"
        fields = [self._ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, 0, 0, len(name_b), 0]
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + name_b)
        self._out.write(b"\0" * (-(len(header) + len(name_b)) % 4))
        self._out.write(data)
        self._out.write(b"\0" * (-len(data) % 4))

    def dir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        if not path or path in self._dirs:
            return
        parent = os.path.dirname(path)
        if parent:
            self.dir(parent)
        self._dirs.add(path)
        self._entry(path, stat.S_IFDIR | mode, nlink=2)

    def file(self, path: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> None:
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        self._entry(path, stat.S_IFREG | (mode & 0o7777), data, mtime)

    def copy(self, path: str, src: str | os.PathLike, content_from: str | os.PathLike | None = None) -> None:
        """Add a host file (content, mode and mtime: Python checks .pyc files against mtimes)."""
        st = os.stat(src)
        with open(content_from or src, "rb") as f:
            self.file(path, f.read(), st.st_mode, int(st.st_mtime))

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


# -- the base image: busybox + the host's Python ------------------------------------------------


def _python_paths() -> tuple[str, pathlib.Path, pathlib.Path]:
    """The real interpreter binary, its prefix, and its stdlib directory."""
    exe = os.path.realpath(sys.executable)
    prefix = pathlib.Path(sys.base_prefix)
    stdlib = prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return exe, prefix, stdlib


def _stdlib_files(stdlib: pathlib.Path) -> Iterable[pathlib.Path]:
    pyc_tag = f".{sys.implementation.cache_tag}.pyc"
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(_STDLIB_SKIP_PREFIX)
        )
        rel = pathlib.Path(dirpath).relative_to(stdlib)
        in_dynload = rel.parts[:1] == ("lib-dynload",)
        for name in sorted(filenames):
            if in_dynload and _DYNLOAD_SKIP.match(name):
                continue
            if name.endswith(".pyc") and not name.endswith(pyc_tag):
                continue  # optimized (-O/-OO) variants
            if name.endswith(".py") and rel.parts[:1] == () and name in ("turtle.py", "pydoc.py"):
                continue
            yield pathlib.Path(dirpath) / name


def _shared_libraries(binaries: list[str]) -> list[str]:
    """The shared libraries (as ldd names them) that ``binaries`` load, the dynamic loader included."""
    proc = subprocess.run(["ldd", *binaries], capture_output=True, text=True, check=False)
    libs: set[str] = set()
    for line in proc.stdout.splitlines():
        line = line.strip()
        m = re.match(r"\S+ => (/\S+) \(0x", line) or re.match(r"(/\S+) \(0x", line)
        if m:
            libs.add(m.group(1))
    return sorted(libs)


def _base_inputs() -> list[tuple[str, str]]:
    """(guest path, host path) of every file in the base image."""
    exe, _, stdlib = _python_paths()
    inputs = [(BUSYBOX, BUSYBOX), (exe, exe)]
    stdlib_files = list(_stdlib_files(stdlib))
    inputs += [(str(p), str(p)) for p in stdlib_files]
    dynload = [str(p) for p in stdlib_files if p.suffix == ".so"]
    for lib in _shared_libraries([exe, *dynload]):
        inputs.append((lib, os.path.realpath(lib)))
    return sorted(set(inputs))


def _stripped(strip: str | None, path: str, scratch: str) -> str:
    """A copy of ``path`` without debug symbols if it is an ELF file and binutils is here."""
    if strip is None or path == BUSYBOX:
        return path
    with open(path, "rb") as f:
        if f.read(4) != b"\x7fELF":
            return path
    out = os.path.join(scratch, "stripped")
    proc = subprocess.run([strip, "--strip-debug", "-o", out, path], capture_output=True, check=False)
    return out if proc.returncode == 0 else path


def base_image(cache_dir: pathlib.Path | None = None) -> pathlib.Path:
    """The cached busybox + Python cpio archive, built if missing (a few seconds, once)."""
    cache_dir = cache_dir or VM_DIR / "initramfs"
    inputs = _base_inputs()
    strip = shutil.which("strip")
    digest = hashlib.sha256(f"{_BASE_LAYOUT_VERSION} strip={bool(strip)}".encode())
    for guest, host in inputs:
        st = os.stat(host)
        digest.update(f"{guest}\0{host}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_mode}\n".encode())
    path = cache_dir / f"base-{digest.hexdigest()[:16]}.cpio"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    exe, _, _ = _python_paths()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as out:
        cpio = _Cpio(out)
        for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "root", "etc", "run"):
            cpio.dir(d)
        with tempfile.TemporaryDirectory(prefix="kcx-strip-") as scratch:
            for guest, host in inputs:
                cpio.copy(guest, host, _stripped(strip, host, scratch))
        applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout
        for applet in applets.split():
            if applet != "busybox":
                cpio.symlink(f"bin/{applet}", "/bin/busybox")
        cpio.symlink("bin/python3", exe)
        cpio.close()
    os.replace(tmp, path)
    for stale in cache_dir.glob("base-*.cpio"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return path


# -- the per-boot part: init, agent, files ------------------------------------------------------

_INIT = r"""#!/bin/sh
export PATH=/bin:/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "+cpu +memory +pids" > /sys/fs/cgroup/cgroup.subtree_control
for m in $(cat /kcx/modules/order 2>/dev/null); do
    insmod "/kcx/modules/$m.ko" || echo "kcx-init: insmod $m failed"
done
echo "kcx-init: controllers: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
python3 /kcx/agent.py
echo "kcx-init: agent exited with status $?"
poweroff -f
echo o > /proc/sysrq-trigger
"""

_AGENT = r'''
import base64, json, os, signal, subprocess, sys, time, tty

fd = os.open("/dev/ttyS1", os.O_RDWR | os.O_NOCTTY)
tty.setraw(fd)  # no echo, no CR/LF translation: the channel carries bytes as they are


def send(data):
    while data:
        data = data[os.write(fd, data):]


def lines():
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        if line.strip():
            yield line


def run(req):
    path = "/tmp/kcx-script-%d.sh" % req["id"]
    with open(path, "w") as f:
        f.write(req["script"])
    start = time.monotonic()
    proc = subprocess.Popen(["/bin/sh", path], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, cwd="/root")
    timed_out = False
    try:
        out, err = proc.communicate(timeout=req["timeout_s"])
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return {"stdout": out.decode(errors="replace"), "stderr": err.decode(errors="replace"),
            "exit_code": proc.returncode, "timed_out": timed_out,
            "duration_s": time.monotonic() - start}


send(b"\n@@KCX-READY@@\n")
for line in lines():
    req = json.loads(line)
    if req["op"] == "poweroff":
        break
    result = run(req)
    payload = base64.encodebytes(json.dumps(result).encode())
    send(b"@@KCX-BEGIN %d@@\n" % req["id"] + payload
         + b"@@KCX-END %d exit=%d@@\n" % (req["id"], result["exit_code"]))
'''


def _add_tree(cpio: _Cpio, dest: str, src: pathlib.Path) -> None:
    if src.is_dir():
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            rel = pathlib.Path(dirpath).relative_to(src)
            cpio.dir(str(pathlib.PurePosixPath(dest) / rel))
            for name in sorted(filenames):
                if not name.endswith(".pyc"):
                    cpio.copy(str(pathlib.PurePosixPath(dest) / rel / name), pathlib.Path(dirpath) / name)
    else:
        cpio.copy(dest, src)


def _overlay(out, files: Mapping[str, str | os.PathLike | bytes], modules: Iterable[str]) -> None:
    cpio = _Cpio(out)
    cpio.file("init", _INIT.encode(), 0o755)
    cpio.file("kcx/agent.py", _AGENT.encode())
    modules = list(modules)
    for name in modules:
        cpio.copy(f"kcx/modules/{name}.ko", kernel_dir() / "modules" / f"{name}.ko")
    cpio.file("kcx/modules/order", "".join(f"{m}\n" for m in modules).encode())
    for dest, src in files.items():
        if isinstance(src, bytes):
            cpio.file(dest, src, 0o755 if src.startswith(b"#!") else 0o644)
        else:
            _add_tree(cpio, dest, pathlib.Path(src))
    cpio.close()


def _module_closure(names: Iterable[str]) -> list[str]:
    """``names`` with their dependencies, in the load order setup-vm.sh recorded."""
    order = (kernel_dir() / "modules" / "order").read_text().split()
    wanted = set(names)
    unknown = wanted - set(order)
    if unknown:
        raise VmError(f"kernel modules {sorted(unknown)} not prepared by setup-vm.sh; have {order}")
    # order lists dependencies first; keep everything up to the last wanted module (simple and safe).
    last = max(order.index(n) for n in wanted) if wanted else -1
    return order[: last + 1]


# -- the VM ------------------------------------------------------------------------------------


class Vm:
    """One booted VM; ``run`` executes shell scripts in it one after another."""

    def __init__(
        self,
        files: Mapping[str, str | os.PathLike | bytes] | None = None,
        *,
        memory_mib: int = 512,
        cpus: int = 1,
        modules: Iterable[str] = (),
        boot_timeout_s: float = 180.0,
        append: str = "",
    ):
        self.files = dict(files or {})
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.modules = list(modules)
        self.boot_timeout_s = boot_timeout_s
        self.append = append
        self.boot_s: float | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 1
        self._broken: str | None = None

    # paths inside the temporary directory
    @property
    def console_log(self) -> pathlib.Path:
        return pathlib.Path(self._tmp.name) / "console.log"

    def console_tail(self, lines: int = 40) -> str:
        parts = []
        for name in ("console.log", "qemu.stderr"):
            try:
                text = (pathlib.Path(self._tmp.name) / name).read_text(errors="replace")
            except (OSError, AttributeError):
                continue
            if text.strip():
                parts.append(f"--- {name} (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts) or "(no console output)"

    def _fail(self, what: str) -> VmError:
        return VmError(f"{what}\n{self.console_tail()}")

    def boot(self) -> Vm:
        missing = missing_prerequisites()
        if missing:
            raise VmError("cannot boot the VM, missing: " + "; ".join(missing))
        self._tmp = tempfile.TemporaryDirectory(prefix="kcx-vm-")
        tmp = pathlib.Path(self._tmp.name)
        initrd = tmp / "initrd.cpio"
        with open(initrd, "wb") as out:
            with open(base_image(), "rb") as base:
                shutil.copyfileobj(base, out)
            _overlay(out, self.files, _module_closure(self.modules))
        ctl_path = tmp / "ctl.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(ctl_path))
        listener.listen(1)
        cmdline = f"console=ttyS0 quiet panic=-1 {self.append}".strip()
        argv = [
            QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", str(self.cpus), "-m", str(self.memory_mib),
            "-kernel", str(kernel_path()), "-initrd", str(initrd), "-append", cmdline,
            "-chardev", f"file,id=con,path={tmp / 'console.log'}", "-serial", "chardev:con",
            "-chardev", f"socket,id=ctl,path={ctl_path}", "-serial", "chardev:ctl",
        ]  # fmt: skip
        start = time.monotonic()
        with open(tmp / "qemu.stderr", "wb") as err:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        try:
            listener.settimeout(0.2)
            while self._sock is None:
                try:
                    self._sock, _ = listener.accept()
                except TimeoutError:
                    if self._proc.poll() is not None:
                        raise self._fail(f"qemu exited with status {self._proc.returncode} before connecting") from None
                    if time.monotonic() - start > 30:
                        raise self._fail("qemu did not connect its control serial port within 30 s") from None
            self._await(_READY, start + self.boot_timeout_s, "the guest agent to start")
        except BaseException:
            self.close(timeout_s=0)
            raise
        finally:
            listener.close()
        self.boot_s = time.monotonic() - start
        return self

    def _await(self, pattern: bytes | re.Pattern, deadline: float, what: str) -> re.Match | int:
        while True:
            if isinstance(pattern, bytes):
                idx = self._buf.find(pattern)
                if idx >= 0:
                    self._buf = self._buf[idx + len(pattern) :]
                    return idx
            else:
                m = pattern.search(self._buf)
                if m:
                    return m
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"timed out waiting for {what}")
            ready, _, _ = select.select([self._sock], [], [], min(remaining, 1.0))
            if ready:
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise self._fail(f"the VM closed its control channel while waiting for {what}")
                self._buf += chunk
            elif self._proc.poll() is not None:
                raise self._fail(f"qemu exited with status {self._proc.returncode} while waiting for {what}")

    def run(self, script: str, timeout_s: float = 60.0) -> VmResult:
        """Run ``script`` with /bin/sh in the guest (cwd /root, PATH /bin) and return its result.

        A script that outlives ``timeout_s`` is killed in the guest (``timed_out``, exit -9) and the
        VM stays usable. When the VM itself stops answering, it is shut down and VmError raised
        (with the console tail); later calls fail at once instead of waiting again.
        """
        if self._sock is None:
            raise VmError(self._broken or "the VM is not booted")
        req_id = self._next_id
        self._next_id += 1
        request = {"op": "run", "id": req_id, "script": script, "timeout_s": timeout_s}
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
            # The guest kills the script at timeout_s; the slack covers answering over the serial line.
            deadline = time.monotonic() + timeout_s + 30
            begin = self._await(_BEGIN, deadline, f"script {req_id} to start answering")
            end = self._await(_END, deadline, f"script {req_id} to finish answering")
            if int(begin.group(1)) != req_id or int(end.group(1)) != req_id:
                raise self._fail(f"answer for script {begin.group(1)} while waiting for {req_id}")
            payload = self._buf[begin.end() : end.start()]
            self._buf = self._buf[end.end() :]
            result = json.loads(base64.decodebytes(payload))
        except (OSError, ValueError, VmError) as e:
            error = e if isinstance(e, VmError) else self._fail(f"control channel failed: {e!r}")
            self._broken = f"the VM was shut down after an earlier failure: {str(error).splitlines()[0]}"
            self.close(timeout_s=0)
            raise error from None
        return VmResult(
            stdout=result["stdout"],
            exit_code=result["exit_code"],
            stderr=result["stderr"],
            timed_out=result["timed_out"],
            duration_s=result["duration_s"],
        )

    def close(self, timeout_s: float = 20.0) -> None:
        """Power the guest off (the agent exits, init runs ``poweroff -f``); kill qemu if it hangs."""
        if self._proc is not None:
            if self._sock is not None and self._proc.poll() is None:
                try:
                    self._sock.sendall(b'{"op": "poweroff"}\n')
                except OSError:
                    pass
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self._proc = None

    def __enter__(self) -> Vm:
        return self.boot()

    def __exit__(self, *exc) -> None:
        self.close()


def run_in_vm(
    script: str,
    files: Mapping[str, str | os.PathLike | bytes] | None = None,
    timeout_s: float = 60.0,
    **vm_options,
) -> VmResult:
    """Boot a VM, run one script in it, power it off."""
    with Vm(files, **vm_options) as vm:
        return vm.run(script, timeout_s)
