"""A private containerd CRI node for tests, with pods run through our own CRI client.

``TestNode`` starts containerd 1.6 with its own root, state, socket and CNI configuration in a
temp dir, imports busybox/pause images built by tests/support/images.py, and runs pods the way a
kubelet would: kubelet labels, a pod cgroup (under this process's own cgroup) with pod-level
limits, containers with CFS quota and memory limits. ``stop()`` removes everything it made:
pods, containerd and its shims, mounts, network namespaces, the CNI bridge, cgroups, files.

Several nodes may run at once (other test sessions): each claims its own subnet 10.88.<n>.0/24
and bridge ``kccni<n>`` through a lock file that the kernel releases if the process dies.

A killed test process (SIGKILL, a CI timeout) runs no teardown. Each node therefore holds a lock
on ``<workdir>/owner.lock`` for its lifetime and records what it made in ``<workdir>/node.json``;
the next node to start (or :func:`reap_stale_nodes`) removes every node whose lock is free.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from cri_api import RuntimeClient
from cri_api.v1 import api_pb2
from tests.support import images

CGROUP_ROOT = pathlib.Path("/sys/fs/cgroup")
CNI_BIN_DIR = "/usr/lib/cni"
LOCK_DIR = pathlib.Path("/run/kubectl-chaos-test/subnets")
CFS_PERIOD_US = 100_000
CPU_SHARES_PER_CPU = 1024
SUBNET_PREFIX = "10.88"
BRIDGE_PREFIX = "kccni"

WORKDIR_PARENT = pathlib.Path("/tmp")
WORKDIR_PREFIX = "kcx-node-"
OWNER_LOCK = "owner.lock"
STATE_FILE = "node.json"
CGROUP_BASE_MARK = "/kubectl-chaos-test-"

LABEL_POD_NAME = "io.kubernetes.pod.name"
LABEL_POD_NAMESPACE = "io.kubernetes.pod.namespace"
LABEL_POD_UID = "io.kubernetes.pod.uid"
LABEL_CONTAINER_NAME = "io.kubernetes.container.name"

_NODE_SEQ = 0


class NodeError(RuntimeError):
    """The test node could not start, run a pod or clean up; carries containerd's log tail."""


# ---------------------------------------------------------------- pure helpers


@dataclasses.dataclass(frozen=True)
class ContainerSpec:
    """One container of a test pod. Limits as a kubelet would get them from the pod spec."""

    name: str = "app"
    argv: Sequence[str] = ("sleep", "3600")
    cpu_millicpu: int | None = None
    memory_bytes: int | None = None
    image: str = images.BUSYBOX_IMAGE
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)


def cpu_quota_us(millicpu: int, period_us: int = CFS_PERIOD_US) -> int:
    """The CFS quota a kubelet derives from a CPU limit (at least the kernel's 1 ms)."""
    return max(1_000, millicpu * period_us // 1000)


def cpu_shares(millicpu: int) -> int:
    return max(2, millicpu * CPU_SHARES_PER_CPU // 1000)


def container_resources(spec: ContainerSpec) -> api_pb2.LinuxContainerResources:
    """LinuxContainerResources as a kubelet sends them (requests = limits, no swap)."""
    res = api_pb2.LinuxContainerResources(cpu_period=CFS_PERIOD_US, cpu_shares=2)
    if spec.cpu_millicpu is not None:
        res.cpu_quota = cpu_quota_us(spec.cpu_millicpu)
        res.cpu_shares = cpu_shares(spec.cpu_millicpu)
    if spec.memory_bytes is not None:
        res.memory_limit_in_bytes = spec.memory_bytes
        res.memory_swap_limit_in_bytes = spec.memory_bytes
    return res


def pod_limits(specs: Iterable[ContainerSpec]) -> dict[str, int]:
    """Pod cgroup limits a kubelet sets: sums, only when every container has the limit."""
    specs = list(specs)
    limits: dict[str, int] = {}
    if specs and all(s.cpu_millicpu is not None for s in specs):
        limits["cpu.cfs_period_us"] = CFS_PERIOD_US
        limits["cpu.cfs_quota_us"] = sum(cpu_quota_us(s.cpu_millicpu or 0) for s in specs)
    if specs and all(s.memory_bytes is not None for s in specs):
        total = sum(s.memory_bytes or 0 for s in specs)
        limits["memory.limit_in_bytes"] = total
        limits["memory.memsw.limit_in_bytes"] = total
    return limits


def deepest_own_cgroup(proc_self_cgroup: str) -> str:
    """The longest cgroup path of this process among the v1 hierarchies ('/' if all at root).

    On this kind of machine the memory controller puts each worker at /process_api/<id> while
    cpu and the others stay at /; a cgroup_parent below the deepest path stays inside our own
    memory cgroup, and runc creates the same relative path in every other hierarchy.
    """
    best = "/"
    for line in proc_self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or parts[0] == "0":
            continue
        if len(parts[2]) > len(best):
            best = parts[2]
    return best


def containerd_config(workdir: pathlib.Path, *, snapshotter: str) -> str:
    root, state = workdir / "root", workdir / "state"
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{workdir / 'containerd.sock'}"
[ttrpc]
  address = "{workdir / 'containerd.sock.ttrpc'}"
[debug]
  address = ""
  level = "info"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{workdir / 'opt'}"

[{cri}]
  sandbox_image = "{images.PAUSE_IMAGE}"
  # The sandbox's oom_score_adj of -998 needs CAP_SYS_RESOURCE, which this machine lacks:
  # without this runc fails with "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  enable_selinux = false
  [{cri}.containerd]
    snapshotter = "{snapshotter}"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{workdir / 'runc'}"
  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{workdir / 'cni'}"
    max_conf_num = 1
"""


def cni_conflist(network: str, bridge: str, subnet_index: int, ipam_dir: pathlib.Path) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": network,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": f"{SUBNET_PREFIX}.{subnet_index}.0/24"}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(ipam_dir),
                },
            }
        ],
    }


# ---------------------------------------------------------------- values


@dataclasses.dataclass
class Pod:
    """A pod running on a TestNode."""

    sandbox_id: str
    name: str
    namespace: str
    uid: str
    ip: str | None
    netns_path: str | None
    containers: dict[str, str]  # container name -> id of the current attempt
    attempts: dict[str, int]
    specs: dict[str, ContainerSpec]
    cgroup_parent: str  # relative cgroupfs path, e.g. /process_api/<id>/kubectl-chaos-test-<pid>/kubepods/pod<uid>
    cgroup_dirs: dict[str, pathlib.Path]  # controller -> pod cgroup directory
    host_network: bool = False
    sandbox_config: api_pb2.PodSandboxConfig = dataclasses.field(repr=False, default=None)  # type: ignore[assignment]
    node: TestNode = dataclasses.field(repr=False, default=None)  # type: ignore[assignment]

    def container_id(self, name: str | None = None) -> str:
        if name is None:
            if len(self.containers) != 1:
                raise KeyError(f"pod {self.name} has containers {sorted(self.containers)}: name one")
            return next(iter(self.containers.values()))
        return self.containers[name]

    def container_cgroup_dir(self, controller: str, name: str | None = None) -> pathlib.Path:
        """The container's cgroup directory (cgroupfs driver: <pod cgroup>/<container id>)."""
        return self.cgroup_dirs[controller] / self.container_id(name)

    def restart_container(self, name: str | None = None, *, gap_s: float = 0.0) -> str:
        return self.node.restart_container(self, name, gap_s=gap_s)

    def delete(self) -> None:
        self.node.delete_pod(self)


# ---------------------------------------------------------------- the node


class TestNode:
    """A private containerd with the CRI plugin. Use as a context manager or start()/stop()."""

    __test__ = False  # not a pytest test class

    def __init__(self, workdir: str | os.PathLike[str] | None = None, *, start_timeout_s: float = 30.0):
        global _NODE_SEQ
        self.workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir=WORKDIR_PARENT))
        self.socket = self.workdir / "containerd.sock"
        self.log_path = self.workdir / "containerd.log"
        self.start_timeout_s = start_timeout_s
        self.snapshotter = "overlayfs"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: RuntimeClient | None = None
        self.subnet_index: int | None = None
        self.bridge: str | None = None
        self._lock_fd: int | None = None
        self._owner_fd: int | None = None
        self.reaped: list[str] = []  # stale nodes of dead processes removed at start
        self.pods: dict[str, Pod] = {}
        self.timings_s: dict[str, float] = {}  # start-up phases
        self.pod_start_s: list[float] = []  # run_pod durations (cgroup, sandbox, containers)
        suffix = "" if _NODE_SEQ == 0 else f"-{_NODE_SEQ}"
        _NODE_SEQ += 1
        own = deepest_own_cgroup(pathlib.Path("/proc/self/cgroup").read_text())
        self.cgroup_base = f"{own.rstrip('/')}/kubectl-chaos-test-{os.getpid()}{suffix}"
        self._created_cgroup_ancestors: dict[str, list[pathlib.Path]] = {}

    # ---- lifecycle

    def __enter__(self) -> TestNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> TestNode:
        t0 = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.timings_s["start"] = time.monotonic() - t0
        return self

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._take_owner_lock()
        t0 = time.monotonic()
        self.reaped = reap_stale_nodes(WORKDIR_PARENT)
        self.timings_s["reap"] = time.monotonic() - t0
        for sub in ("root", "state", "cni", "opt", "runc", "logs", "ipam"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self._claim_subnet()
        assert self.subnet_index is not None and self.bridge is not None
        state = {"pid": os.getpid(), "socket": str(self.socket), "bridge": self.bridge,
                 "subnet_index": self.subnet_index, "cgroup_base": self.cgroup_base}  # fmt: skip
        (self.workdir / STATE_FILE).write_text(json.dumps(state))
        network = f"kcx-test-{self.subnet_index}"
        conflist = cni_conflist(network, self.bridge, self.subnet_index, self.workdir / "ipam")
        (self.workdir / "cni" / "10-kcx.conflist").write_text(json.dumps(conflist, indent=2))
        self.snapshotter = "overlayfs" if _overlay_works(self.workdir) else "native"
        config = self.workdir / "config.toml"
        config.write_text(containerd_config(self.workdir, snapshotter=self.snapshotter))
        self._record_cgroup_ancestors()
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.client = RuntimeClient(str(self.socket), timeout_s=30.0)
        self._wait_ready()
        self.timings_s["containerd"] = time.monotonic() - t0
        t0 = time.monotonic()
        tarball = images.build_default(self.workdir)
        self.timings_s["build_images"] = time.monotonic() - t0
        t0 = time.monotonic()
        self._ctr("images", "import", "--snapshotter", self.snapshotter, "--all-platforms", str(tarball))
        self.timings_s["import_images"] = time.monotonic() - t0

    def _take_owner_lock(self) -> None:
        """Lock ``owner.lock`` for the node's lifetime; the kernel drops it when this process dies.

        The lock is taken on a private name and then renamed into place, so a reaper never sees an
        owner lock that is not yet held.
        """
        private = self.workdir / f".{OWNER_LOCK}.{os.getpid()}"
        fd = os.open(private, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(private, self.workdir / OWNER_LOCK)
        self._owner_fd = fd

    def _wait_ready(self) -> None:
        assert self.client is not None and self.proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.error(f"containerd exited with status {self.proc.returncode} during start-up")
            if self.socket.exists():
                try:
                    conditions = {c.type: c for c in self.client.status(timeout_s=2.0).status.conditions}
                    if all(conditions.get(t) and conditions[t].status for t in ("RuntimeReady", "NetworkReady")):
                        return
                    last = "; ".join(f"{t}={c.status} {c.reason} {c.message}" for t, c in conditions.items())
                except Exception as err:  # noqa: BLE001 - keep polling until the deadline
                    last = str(err)
            time.sleep(0.05)
        raise self.error(f"containerd not ready within {self.start_timeout_s} s: {last}")

    def _ctr(self, *args: str) -> str:
        cmd = ["ctr", "--address", str(self.socket), "-n", "k8s.io", *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise self.error(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no containerd log)"

    def error(self, message: str) -> NodeError:
        return NodeError(f"{message}\n--- containerd log ({self.log_path}), last lines ---\n{self.log_tail()}")

    # ---- pods

    def run_pod(
        self,
        name: str,
        namespace: str = "default",
        containers: Sequence[ContainerSpec | Mapping[str, Any]] | None = None,
        *,
        host_network: bool = False,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> Pod:
        """Run a pod like a kubelet: pod cgroup with limits, sandbox, then each container."""
        assert self.client is not None, "node not started"
        specs = [c if isinstance(c, ContainerSpec) else ContainerSpec(**c) for c in (containers or [ContainerSpec()])]
        if len({s.name for s in specs}) != len(specs):
            raise ValueError(f"duplicate container names in {[s.name for s in specs]}")
        t0 = time.monotonic()
        uid = str(uuid.uuid4())
        cgroup_parent = f"{self.cgroup_base}/kubepods/pod{uid}"
        cgroup_dirs = self._make_pod_cgroup(cgroup_parent, pod_limits(specs))
        pod_labels = {LABEL_POD_NAME: name, LABEL_POD_NAMESPACE: namespace, LABEL_POD_UID: uid, **(labels or {})}
        log_dir = self.workdir / "logs" / f"{namespace}_{name}_{uid}"
        log_dir.mkdir(parents=True, exist_ok=True)
        mode = api_pb2.NODE if host_network else api_pb2.POD
        sandbox_config = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
            hostname="" if host_network else name,
            log_directory=str(log_dir),
            labels=pod_labels,
            annotations={"kubernetes.io/config.source": "api", **(annotations or {})},
            linux=api_pb2.LinuxPodSandboxConfig(
                cgroup_parent=cgroup_parent,
                security_context=api_pb2.LinuxSandboxSecurityContext(
                    namespace_options=api_pb2.NamespaceOption(network=mode, pid=api_pb2.CONTAINER)
                ),
            ),
        )
        try:
            sandbox_id = self.client.run_pod_sandbox(sandbox_config)
        except Exception as err:
            self._remove_cgroup_tree(cgroup_parent)
            raise self.error(f"RunPodSandbox {namespace}/{name} failed: {err}") from err
        pod = Pod(
            sandbox_id=sandbox_id,
            name=name,
            namespace=namespace,
            uid=uid,
            ip=None,
            netns_path=None,
            containers={},
            attempts={},
            specs={s.name: s for s in specs},
            cgroup_parent=cgroup_parent,
            cgroup_dirs=cgroup_dirs,
            host_network=host_network,
            sandbox_config=sandbox_config,
            node=self,
        )
        self.pods[sandbox_id] = pod
        try:
            status = self.client.pod_sandbox_status(sandbox_id, verbose=True)
            pod.ip = status.status.network.ip or None
            pod.netns_path = _netns_from_info(status.info)
            for spec in specs:
                pod.containers[spec.name] = self._create_and_start(pod, spec, attempt=0)
                pod.attempts[spec.name] = 0
        except Exception as err:
            self.delete_pod(pod)
            raise self.error(f"starting pod {namespace}/{name} failed: {err}") from err
        self.pod_start_s.append(time.monotonic() - t0)
        return pod

    def _create_and_start(self, pod: Pod, spec: ContainerSpec, attempt: int) -> str:
        assert self.client is not None
        mode = api_pb2.NODE if pod.host_network else api_pb2.POD
        config = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name=spec.name, attempt=attempt),
            image=api_pb2.ImageSpec(image=spec.image),
            command=list(spec.argv),
            envs=[api_pb2.KeyValue(key=k, value=v) for k, v in spec.env.items()],
            labels={
                LABEL_POD_NAME: pod.name,
                LABEL_POD_NAMESPACE: pod.namespace,
                LABEL_POD_UID: pod.uid,
                LABEL_CONTAINER_NAME: spec.name,
            },
            annotations={
                "io.kubernetes.container.restartCount": str(attempt),
                "io.kubernetes.container.terminationMessagePath": "/dev/termination-log",
            },
            log_path=f"{spec.name}/{attempt}.log",
            linux=api_pb2.LinuxContainerConfig(
                resources=container_resources(spec),
                security_context=api_pb2.LinuxContainerSecurityContext(
                    namespace_options=api_pb2.NamespaceOption(network=mode, pid=api_pb2.CONTAINER)
                ),
            ),
        )
        container_id = self.client.create_container(pod.sandbox_id, config, pod.sandbox_config)
        self.client.start_container(container_id)
        return container_id

    def restart_container(self, pod: Pod, name: str | None = None, *, gap_s: float = 0.0) -> str:
        """Stop and remove the container, then create attempt + 1 from the same spec (as a kubelet);
        ``gap_s`` is how long the pod runs with no container of that name in between."""
        assert self.client is not None
        if name is None:
            if len(pod.containers) != 1:
                raise KeyError(f"pod {pod.name} has containers {sorted(pod.containers)}: name one")
            name = next(iter(pod.containers))
        old = pod.containers[name]
        self.client.stop_container(old, grace_s=0)
        self.client.remove_container(old)
        time.sleep(gap_s)
        attempt = pod.attempts[name] + 1
        pod.containers[name] = self._create_and_start(pod, pod.specs[name], attempt)
        pod.attempts[name] = attempt
        return pod.containers[name]

    def delete_pod(self, pod: Pod) -> None:
        """Stop and remove the sandbox (and its containers), then the pod cgroup."""
        errors = []
        if self.client is not None and self._alive():
            for call in (self.client.stop_pod_sandbox, self.client.remove_pod_sandbox):
                try:
                    call(pod.sandbox_id, timeout_s=30.0)
                except Exception as err:  # noqa: BLE001 - collect, go on cleaning up
                    errors.append(f"{call.__name__}: {err}")
        self.pods.pop(pod.sandbox_id, None)
        errors += self._remove_cgroup_tree(pod.cgroup_parent)
        if errors:
            raise self.error(f"deleting pod {pod.namespace}/{pod.name} left errors: {'; '.join(errors)}")

    # ---- cgroups

    def _controllers(self) -> list[pathlib.Path]:
        return _controllers()

    def _record_cgroup_ancestors(self) -> None:
        """Remember which ancestors of our cgroup base do not exist yet, to remove them at stop.

        A top-level directory (e.g. cpu/process_api) is shared with other workers' nodes and is
        left alone: removing it could race with their mkdir below it.
        """
        parts = [p for p in self.cgroup_base.split("/") if p]
        for hierarchy in self._controllers():
            missing = []
            path = hierarchy / parts[0] if parts else hierarchy
            for part in parts[1:-1]:
                path = path / part
                if not path.exists():
                    missing.append(path)
            self._created_cgroup_ancestors[hierarchy.name] = missing

    def _make_pod_cgroup(self, cgroup_parent: str, limits: Mapping[str, int]) -> dict[str, pathlib.Path]:
        dirs = {}
        for controller in ("cpu", "cpuacct", "memory", "pids"):
            path = CGROUP_ROOT / controller / cgroup_parent.lstrip("/")
            path.mkdir(parents=True, exist_ok=True)
            dirs[controller] = path
        # v1 memory: the limit must stay <= memsw, so on a fresh (unlimited) cgroup write the
        # limit first, then memsw; CFS period before quota.
        order = ("cpu.cfs_period_us", "cpu.cfs_quota_us", "memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
        for name in order:
            if name in limits:
                _write_cgroup(dirs[name.split(".", 1)[0]] / name, limits[name])
        return dirs

    def _remove_cgroup_tree(self, relative: str) -> list[str]:
        return _remove_cgroup_tree(relative)

    # ---- network

    def _claim_subnet(self) -> None:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        in_use = _routed_10_88_subnets()
        start = os.getpid() % 200
        for offset in range(200):
            index = 20 + (start + offset) % 200  # 10.88.20.0 .. 10.88.219.0
            fd = os.open(LOCK_DIR / f"{index}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            bridge = f"{BRIDGE_PREFIX}{index}"
            if pathlib.Path(f"/sys/class/net/{bridge}").exists():
                # We hold the lock, so its previous owner is dead: the bridge is stale.
                _ip("link", "del", bridge, check=False)
                in_use = _routed_10_88_subnets()
            if index in in_use:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                continue
            self._lock_fd, self.subnet_index, self.bridge = fd, index, bridge
            return
        raise NodeError(f"no free subnet {SUBNET_PREFIX}.20-219.0/24 (lock files in {LOCK_DIR})")

    def gateway_ip(self) -> str:
        return f"{SUBNET_PREFIX}.{self.subnet_index}.1"

    # ---- teardown

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> list[str]:
        """Remove everything the node made. Returns (and tolerates) what could not be removed."""
        problems: list[str] = []
        if self.client is not None and self._alive():
            try:
                sandboxes = self.client.list_pod_sandboxes(timeout_s=10.0)
            except Exception as err:  # noqa: BLE001
                sandboxes = []
                problems.append(f"ListPodSandbox: {err}")
            for sandbox in sandboxes:
                for call in (self.client.stop_pod_sandbox, self.client.remove_pod_sandbox):
                    try:
                        call(sandbox.id, timeout_s=30.0)
                    except Exception as err:  # noqa: BLE001
                        problems.append(f"{call.__name__} {sandbox.id[:13]}: {err}")
        if self.client is not None:
            self.client.close()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        self._kill_shims()
        problems += self._remove_cgroup_tree(self.cgroup_base)
        for missing in self._created_cgroup_ancestors.values():
            for path in reversed(missing):
                with contextlib.suppress(OSError):  # busy if another node of ours still uses it
                    path.rmdir()
        problems += _unmount_under(self.workdir)
        if self.bridge and pathlib.Path(f"/sys/class/net/{self.bridge}").exists():
            _ip("link", "del", self.bridge, check=False)
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        if not problems:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._owner_fd is not None:
            # Released last: with problems left, the next node's reaper tries again.
            os.close(self._owner_fd)
            self._owner_fd = None
        self.pods.clear()
        return problems

    def _kill_shims(self) -> None:
        """containerd-shim-runc-v2 processes outlive containerd; ours name our socket."""
        _kill_processes(lambda cmdline: b"containerd-shim" in cmdline and str(self.socket).encode() in cmdline)


# ---------------------------------------------------------------- stale nodes


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While active, SIGTERM (what a CI timeout or ``timeout(1)`` sends first) raises KeyboardInterrupt,
    so pytest tears the node down as it does on Ctrl-C. Only where SIGTERM still has its default."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    owner = os.getpid()

    def interrupt(signum: int, frame: object) -> None:
        # A child forked from pytest (pyroute2's and the netns helpers' namespace workers) inherits
        # this handler; raising there would run a second copy of the session teardown and stop the
        # shared node under the parent. A child just ends as SIGTERM would have ended it.
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def reap_stale_nodes(parent: pathlib.Path = WORKDIR_PARENT) -> list[str]:
    """Remove the nodes under ``parent`` whose owner process is gone; returns what was removed.

    A node is stale when nobody holds its ``owner.lock`` (the kernel released it when its process
    died). A directory without that file is left alone: a node still starting, or someone else's.
    """
    reaped = []
    for workdir in sorted(pathlib.Path(parent).glob(WORKDIR_PREFIX + "*")):
        lock = workdir / OWNER_LOCK
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its owner is alive
            if not lock.exists():
                continue  # another reaper finished it while we waited for the lock
            problems = _reap(workdir)
            reaped.append(str(workdir) + (f" (left: {'; '.join(problems)})" if problems else ""))
        finally:
            os.close(fd)
    return reaped


def _reap(workdir: pathlib.Path) -> list[str]:
    try:
        state = json.loads((workdir / STATE_FILE).read_text())
    except (OSError, ValueError):
        state = {}
    # containerd and its shims name the work dir (config, socket); the pods' processes die with
    # their cgroups.
    _kill_processes(lambda cmdline: str(workdir).encode() + b"/" in cmdline)
    problems = []
    base = state.get("cgroup_base")
    if isinstance(base, str) and CGROUP_BASE_MARK in base:
        problems += _remove_cgroup_tree(base)
    problems += _unmount_under(workdir)
    index = state.get("subnet_index")
    if isinstance(index, int) and state.get("bridge") == f"{BRIDGE_PREFIX}{index}":
        # The bridge goes only if its subnet is still free: a live node may have claimed it since.
        with contextlib.suppress(OSError):
            fd = os.open(LOCK_DIR / f"{index}.lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if pathlib.Path(f"/sys/class/net/{state['bridge']}").exists():
                    _ip("link", "del", state["bridge"], check=False)
            finally:
                os.close(fd)
    if not problems:
        shutil.rmtree(workdir, ignore_errors=True)
    return problems


# ---------------------------------------------------------------- small system helpers


def _controllers() -> list[pathlib.Path]:
    return sorted(p for p in CGROUP_ROOT.iterdir() if p.is_dir() and not p.is_symlink())


def _remove_cgroup_tree(relative: str) -> list[str]:
    """rmdir a cgroup subtree in every hierarchy, killing leftover processes in it first."""
    errors = []
    rel = relative.lstrip("/")
    for hierarchy in _controllers():
        top = hierarchy / rel
        if not top.is_dir():
            continue
        for attempt in range(50):
            leftovers = _cgroup_pids(top)
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
            failed = None
            for d in [*dirs, top]:
                try:
                    d.rmdir()
                except FileNotFoundError:
                    pass
                except OSError as err:
                    failed = f"rmdir {d}: {os.strerror(err.errno or 0)}"
            if failed is None:
                break
            time.sleep(0.02 * (attempt + 1))
        else:
            errors.append(failed or f"rmdir {top}")
    return errors



def _kill_processes(matches: Callable[[bytes], bool]) -> list[int]:
    """SIGKILL every process (but this one) whose command line ``matches``; returns their pids."""
    killed = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline and matches(cmdline):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


def _write_cgroup(path: pathlib.Path, value: int | str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def _cgroup_pids(top: pathlib.Path) -> list[int]:
    pids = []
    for procs in top.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids += [int(x) for x in procs.read_text().split()]
    return pids


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _routed_10_88_subnets() -> set[int]:
    """Third octets of 10.88.x.0/24 routes present on the host (/proc/net/route is little-endian hex)."""
    used = set()
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/net/route").read_text().splitlines()[1:]:
            fields = line.split()
            dest = bytes.fromhex(fields[1])[::-1]
            if dest[0] == 10 and dest[1] == 88:
                used.add(dest[2])
    return used


def _netns_from_info(info: Mapping[str, str]) -> str | None:
    try:
        doc = json.loads(info.get("info", "") or "{}")
    except ValueError:
        return None
    for ns in ((doc.get("runtimeSpec") or {}).get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "network" and ns.get("path"):
            return ns["path"]
    return None


def _mounts_under(prefix: pathlib.Path) -> list[str]:
    prefix_s = str(prefix).rstrip("/") + "/"
    points = []
    for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].replace("\\040", " ")
        if mount_point.startswith(prefix_s):
            points.append(mount_point)
    return points


def _unmount_under(prefix: pathlib.Path) -> list[str]:
    """Lazily unmount everything below ``prefix``, deepest first (rootfs, shm, netns pins)."""
    problems = []
    for _ in range(3):
        points = sorted(set(_mounts_under(prefix)), key=lambda p: p.count("/"), reverse=True)
        if not points:
            return []
        for point in points:
            res = subprocess.run(["umount", "-l", point], capture_output=True, text=True)
            if res.returncode != 0 and "not mounted" not in res.stderr:
                problems.append(f"umount {point}: {res.stderr.strip()}")
    left = _mounts_under(prefix)
    return problems + [f"still mounted: {p}" for p in left] if left else []


_OVERLAY_RESULT: dict[str, bool] = {}


def _overlay_works(workdir: pathlib.Path) -> bool:
    """Whether overlayfs mounts on the filesystem holding ``workdir`` (not on overlay/tmpfs-less hosts)."""
    key = str(os.stat(workdir).st_dev)
    if key in _OVERLAY_RESULT:
        return _OVERLAY_RESULT[key]
    probe = pathlib.Path(tempfile.mkdtemp(prefix="ovl-probe-", dir=workdir))
    try:
        for sub in ("lower", "upper", "work", "merged"):
            (probe / sub).mkdir()
        opts = f"lowerdir={probe / 'lower'},upperdir={probe / 'upper'},workdir={probe / 'work'}"
        res = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(probe / "merged")], capture_output=True
        )
        ok = res.returncode == 0
        if ok:
            subprocess.run(["umount", str(probe / "merged")], capture_output=True)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    _OVERLAY_RESULT[key] = ok
    return ok


# Pods a PodFactory starts or deletes at once (the machine has two cores; containerd and runc do the work).
_PARALLEL_PODS = 4


class PodFactory:
    """The ``pods`` fixture: ``pods.run(name, namespace="default", containers=[...])``; cleans up."""

    def __init__(self, node: TestNode):
        self.node = node
        self.made: list[Pod] = []

    def run(
        self,
        name: str,
        namespace: str = "default",
        containers: Sequence[ContainerSpec | Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> Pod:
        pod = self.node.run_pod(name, namespace, containers, **kwargs)
        self.made.append(pod)
        return pod

    def run_many(self, names: Sequence[str], namespace: str = "default",
                 containers: Sequence[ContainerSpec | Mapping[str, Any]] | None = None) -> list[Pod]:
        """Pods of the same spec, started a few at a time (containerd takes concurrent sandboxes; 100 pods
        one after the other cost ~12 s of a scale test); in the order of ``names``."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=_PARALLEL_PODS) as pool:
            return list(pool.map(lambda name: self.run(name, namespace, containers), names))

    def cleanup(self) -> None:
        errors = []

        def delete(pod: Pod) -> None:
            if pod.sandbox_id in self.node.pods:
                try:
                    self.node.delete_pod(pod)
                except NodeError as err:
                    errors.append(str(err))

        if len(self.made) > _PARALLEL_PODS:  # a scale test's pods: each deletion is its own
            with concurrent.futures.ThreadPoolExecutor(max_workers=_PARALLEL_PODS) as pool:
                list(pool.map(delete, self.made))
        else:
            for pod in reversed(self.made):
                delete(pod)
        self.made.clear()
        if errors:
            raise NodeError("pods fixture clean-up failed:\n" + "\n".join(errors))
