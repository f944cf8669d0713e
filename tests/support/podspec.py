"""Run a DaemonSet's pod on the test node the way a kubelet would: manifest -> CRI requests.

``read_daemonset`` parses the pod template of a DaemonSet manifest into typed records, refusing
what it cannot honour (a volume kind, a field that would change what the container gets) rather
than ignoring it. ``plan_pod`` turns that template into the kubelet's CRI requests
(RunPodSandbox, CreateContainer) plus the host preparations (directories, a tmpfs) without
touching anything; ``RunningPod`` carries them out on a ``TestNode`` and restarts the container as
the kubelet does (a new attempt in the same sandbox).

What differs from the manifest is explicit, in one place each:
- the image: the locally imported one (``image`` argument);
- host paths: every hostPath the manifest mounts must appear in the ``host_paths`` mapping given
  to ``plan_pod`` (see ``host_paths_on_test_node``); an unmapped one is an error;
- args: ``ARG_OVERRIDES`` (and nothing else).

What the kubelet adds that is not here: the service-account token and /etc/hosts mounts, the
KUBERNETES_SERVICE_* environment (with it the agent's ``--kubernetes=auto`` would start the
controller, and the test node has no API server), DNS config, probes run on a timer (a test runs
a probe's command itself with ``exec_probe``), oom_score_adj.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import stat
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from cri_api.v1 import api_pb2

REPO = pathlib.Path(__file__).resolve().parents[2]
DAEMONSET_MANIFEST = REPO / "daemonset" / "manifests" / "daemonset.yaml"
NODE_NAME = "test-node"

# The manifest's args are the cluster install's; the test talks to the agent's node-local gRPC API
# (the cluster install serves grpc health only there: requests come through the Kubernetes API,
# which the test node does not have). Replaced flag by flag, each listed here.
ARG_OVERRIDES: Mapping[str, str] = {"--node-local-api": "on"}

# What a kubelet sends for a container that is not privileged (procMount: Default): the runtime
# masks these (k8s.io/kubernetes pkg/securitycontext: defaultMaskedPaths, defaultReadonlyPaths).
DEFAULT_MASKED_PATHS = (
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
)  # fmt: skip
DEFAULT_READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

CFS_PERIOD_US = 100_000
_MIN_CPU_SHARES = 2
_FIELD_REFS = ("spec.nodeName", "metadata.namespace", "metadata.name", "metadata.uid")
_HOST_PATH_TYPES = ("", "Directory", "DirectoryOrCreate", "Socket", "File")


class PodSpecError(ValueError):
    """The manifest asks for something this translation does not (or must not silently) honour."""


# ---------------------------------------------------------------- the manifest, as typed records


@dataclasses.dataclass(frozen=True)
class HostPathVolume:
    name: str
    path: str
    type: str  # "" (no check), Directory, DirectoryOrCreate, Socket, File


@dataclasses.dataclass(frozen=True)
class MemoryVolume:
    """emptyDir with medium Memory: a tmpfs of at most ``size_limit_bytes``."""

    name: str
    size_limit_bytes: int | None


@dataclasses.dataclass(frozen=True)
class VolumeMount:
    name: str
    mount_path: str
    read_only: bool = False


@dataclasses.dataclass(frozen=True)
class EnvVar:
    name: str
    value: str | None = None
    field_path: str | None = None  # valueFrom.fieldRef


@dataclasses.dataclass(frozen=True)
class ExecProbe:
    kind: str  # startup, liveness, readiness
    command: tuple[str, ...]
    period_s: int
    timeout_s: int
    failure_threshold: int


@dataclasses.dataclass(frozen=True)
class SecurityContext:
    run_as_user: int | None
    privileged: bool
    allow_privilege_escalation: bool
    read_only_root_fs: bool
    capabilities_add: tuple[str, ...]
    capabilities_drop: tuple[str, ...]
    seccomp_type: str  # RuntimeDefault, Unconfined, Localhost, or "" (the kubelet's default: Unconfined)


@dataclasses.dataclass(frozen=True)
class ContainerTemplate:
    name: str
    image: str
    command: tuple[str, ...]
    args: tuple[str, ...]
    env: tuple[EnvVar, ...]
    mounts: tuple[VolumeMount, ...]
    security: SecurityContext
    cpu_request_millicpu: int | None
    cpu_limit_millicpu: int | None
    memory_limit_bytes: int | None
    probes: tuple[ExecProbe, ...]


@dataclasses.dataclass(frozen=True)
class PodTemplate:
    name: str  # the DaemonSet's
    namespace: str
    labels: Mapping[str, str]
    host_pid: bool
    host_network: bool
    volumes: tuple[HostPathVolume | MemoryVolume, ...]
    containers: tuple[ContainerTemplate, ...]


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)$")
_SUFFIX = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity_bytes(text: str | int) -> int:
    m = _QUANTITY.match(str(text))
    if not m or m.group(2) not in _SUFFIX:
        raise PodSpecError(f"memory quantity {text!r}: expected a number with one of {sorted(_SUFFIX)}")
    return int(float(m.group(1)) * _SUFFIX[m.group(2)])


def quantity_millicpu(text: str | int) -> int:
    s = str(text)
    if s.endswith("m"):
        return int(s[:-1])
    return int(float(s) * 1000)


def _known(doc: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(doc) - allowed
    if unknown:
        raise PodSpecError(f"{where}: {sorted(unknown)} not translated (known: {sorted(allowed)})")


def read_daemonset(text: str) -> PodTemplate:
    """The pod template of the DaemonSet in ``text`` (YAML)."""
    docs = [d for d in yaml.safe_load_all(text) if d]
    (ds,) = [d for d in docs if d.get("kind") == "DaemonSet"]
    spec = ds["spec"]["template"]["spec"]
    # Fields that change what the container gets must be translated; scheduling-only ones may pass.
    _known(spec, {"serviceAccountName", "hostPID", "hostNetwork", "dnsPolicy", "nodeSelector", "tolerations",
                  "terminationGracePeriodSeconds", "containers", "volumes", "priorityClassName"}, "pod spec")  # fmt: skip
    volumes: list[HostPathVolume | MemoryVolume] = []
    for v in spec.get("volumes", []):
        if "hostPath" in v:
            kind = v["hostPath"].get("type", "")
            if kind not in _HOST_PATH_TYPES:
                raise PodSpecError(f"volume {v['name']}: hostPath type {kind!r} not translated")
            volumes.append(HostPathVolume(v["name"], v["hostPath"]["path"], kind))
        elif "emptyDir" in v and v["emptyDir"].get("medium") == "Memory":
            limit = v["emptyDir"].get("sizeLimit")
            volumes.append(MemoryVolume(v["name"], None if limit is None else quantity_bytes(limit)))
        else:
            raise PodSpecError(f"volume {v['name']}: only hostPath and emptyDir (medium Memory) are translated")
    containers = tuple(_container(c) for c in spec["containers"])
    return PodTemplate(
        name=ds["metadata"]["name"],
        namespace=ds["metadata"].get("namespace", "default"),
        labels=dict(ds["spec"]["template"].get("metadata", {}).get("labels", {})),
        host_pid=bool(spec.get("hostPID")),
        host_network=bool(spec.get("hostNetwork")),
        volumes=tuple(volumes),
        containers=containers,
    )


def _container(c: Mapping[str, Any]) -> ContainerTemplate:
    where = f"container {c['name']}"
    _known(c, {"name", "image", "imagePullPolicy", "command", "args", "env", "resources", "startupProbe",
               "livenessProbe", "readinessProbe", "securityContext", "volumeMounts"}, where)  # fmt: skip
    env = []
    for e in c.get("env", []):
        if "valueFrom" in e:
            ref = e["valueFrom"].get("fieldRef", {}).get("fieldPath")
            if ref not in _FIELD_REFS:
                raise PodSpecError(f"{where}: env {e['name']} valueFrom {e['valueFrom']} not translated")
            env.append(EnvVar(e["name"], field_path=ref))
        else:
            env.append(EnvVar(e["name"], value=str(e.get("value", ""))))
    sc = c.get("securityContext", {})
    _known(sc, {"runAsUser", "runAsNonRoot", "privileged", "allowPrivilegeEscalation", "readOnlyRootFilesystem",
                "capabilities", "seccompProfile"}, f"{where} securityContext")  # fmt: skip
    if sc.get("runAsNonRoot") and sc.get("runAsUser", 1) == 0:
        raise PodSpecError(f"{where}: runAsNonRoot with runAsUser 0 (the kubelet refuses to start it)")
    security = SecurityContext(
        run_as_user=sc.get("runAsUser"),
        privileged=bool(sc.get("privileged", False)),
        # Unset means allowed (the API's default for a container that is not privileged either).
        allow_privilege_escalation=bool(sc.get("allowPrivilegeEscalation", True)),
        read_only_root_fs=bool(sc.get("readOnlyRootFilesystem", False)),
        capabilities_add=tuple(sc.get("capabilities", {}).get("add", ())),
        capabilities_drop=tuple(sc.get("capabilities", {}).get("drop", ())),
        seccomp_type=sc.get("seccompProfile", {}).get("type", ""),
    )
    resources = c.get("resources", {})
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    probes = []
    for kind in ("startup", "liveness", "readiness"):
        p = c.get(f"{kind}Probe")
        if p is None:
            continue
        if "exec" not in p:
            raise PodSpecError(f"{where}: {kind}Probe is not exec (only exec probes are run here)")
        probes.append(ExecProbe(kind, tuple(p["exec"]["command"]), int(p.get("periodSeconds", 10)),
                                int(p.get("timeoutSeconds", 1)), int(p.get("failureThreshold", 3))))  # fmt: skip
    cpu_limit = limits.get("cpu")
    cpu_request = requests.get("cpu", cpu_limit)  # the API server defaults a request to the limit
    return ContainerTemplate(
        name=c["name"],
        image=c["image"],
        command=tuple(c.get("command", ())),
        args=tuple(c.get("args", ())),
        env=tuple(env),
        mounts=tuple(VolumeMount(m["name"], m["mountPath"], bool(m.get("readOnly", False)))
                     for m in c.get("volumeMounts", [])),  # fmt: skip
        security=security,
        cpu_request_millicpu=None if cpu_request is None else quantity_millicpu(cpu_request),
        cpu_limit_millicpu=None if cpu_limit is None else quantity_millicpu(cpu_limit),
        memory_limit_bytes=None if "memory" not in limits else quantity_bytes(limits["memory"]),
        probes=tuple(probes),
    )


# ---------------------------------------------------------------- the plan: CRI requests + host preparations


@dataclasses.dataclass(frozen=True)
class PodIdentity:
    """What the API server and the node would give the pod."""

    name: str
    namespace: str
    uid: str
    node_name: str
    cgroup_parent: str  # cgroupfs path of the pod cgroup, relative to each hierarchy
    log_directory: str


@dataclasses.dataclass(frozen=True)
class MakeDirectory:
    """DirectoryOrCreate: the kubelet makes a missing directory, mode 0755."""

    path: str


@dataclasses.dataclass(frozen=True)
class CheckHostPath:
    """Directory / Socket / File: the kubelet refuses to start the pod when the path is not one."""

    path: str
    type: str


@dataclasses.dataclass(frozen=True)
class MountTmpfs:
    """emptyDir medium Memory: the kubelet mounts a tmpfs under its pod directory and binds it in."""

    path: str
    size_bytes: int | None


@dataclasses.dataclass(frozen=True)
class PodPlan:
    identity: PodIdentity
    host_steps: tuple[MakeDirectory | CheckHostPath | MountTmpfs, ...]
    pod_cgroup_limits: Mapping[str, int]  # cgroup v1 file -> value, as the kubelet sets the pod cgroup
    sandbox: api_pb2.PodSandboxConfig
    containers: tuple[ContainerTemplate, ...]
    volumes: tuple[HostPathVolume | MemoryVolume, ...]
    image: str
    host_paths: Mapping[str, str]
    volume_dir: str  # where emptyDir volumes live on the host

    def container_config(self, name: str, attempt: int) -> api_pb2.ContainerConfig:
        (template,) = [c for c in self.containers if c.name == name]
        return container_config(template, self, attempt)


def override_args(args: Sequence[str], overrides: Mapping[str, str]) -> tuple[str, ...]:
    """``args`` with each ``--flag=value`` / ``--flag value`` named in ``overrides`` given the new value."""
    out: list[str] = []
    seen: set[str] = set()
    skip_next = False
    for i, arg in enumerate(args):
        if skip_next:
            skip_next = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in overrides:
            out.append(f"{flag}={overrides[flag]}")
            seen.add(flag)
            skip_next = "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("-")
        else:
            out.append(arg)
    missing = set(overrides) - seen
    if missing:
        raise PodSpecError(f"args override {sorted(missing)}: not among the manifest's args {list(args)}")
    return tuple(out)


def cpu_shares(millicpu: int | None) -> int:
    """The kubelet's cpu.shares for a CPU request (2 when none)."""
    return _MIN_CPU_SHARES if millicpu is None else max(_MIN_CPU_SHARES, millicpu * 1024 // 1000)


def container_resources(c: ContainerTemplate) -> api_pb2.LinuxContainerResources:
    res = api_pb2.LinuxContainerResources(cpu_period=CFS_PERIOD_US, cpu_shares=cpu_shares(c.cpu_request_millicpu))
    if c.cpu_limit_millicpu is not None:
        res.cpu_quota = max(1000, c.cpu_limit_millicpu * CFS_PERIOD_US // 1000)
    if c.memory_limit_bytes is not None:
        res.memory_limit_in_bytes = c.memory_limit_bytes
        # No swap on the node: a kubelet gives v1 memsw the memory limit.
        res.memory_swap_limit_in_bytes = c.memory_limit_bytes
    return res


def pod_cgroup_limits(containers: Sequence[ContainerTemplate]) -> dict[str, int]:
    """The kubelet's pod cgroup: a limit only when every container has one (the sum)."""
    limits: dict[str, int] = {}
    if containers and all(c.memory_limit_bytes is not None for c in containers):
        total = sum(c.memory_limit_bytes or 0 for c in containers)
        limits["memory.limit_in_bytes"] = total
        limits["memory.memsw.limit_in_bytes"] = total
    if containers and all(c.cpu_limit_millicpu is not None for c in containers):
        limits["cpu.cfs_period_us"] = CFS_PERIOD_US
        limits["cpu.cfs_quota_us"] = sum(max(1000, (c.cpu_limit_millicpu or 0) * CFS_PERIOD_US // 1000)
                                         for c in containers)  # fmt: skip
    return limits


def _namespaces(pod: PodTemplate) -> api_pb2.NamespaceOption:
    return api_pb2.NamespaceOption(
        network=api_pb2.NODE if pod.host_network else api_pb2.POD,
        pid=api_pb2.NODE if pod.host_pid else api_pb2.CONTAINER,
        ipc=api_pb2.POD,
    )


def plan_pod(
    pod: PodTemplate,
    identity: PodIdentity,
    *,
    image: str,
    host_paths: Mapping[str, str],
    volume_dir: str,
) -> PodPlan:
    """The kubelet's requests for ``pod`` on this node; no side effect.

    ``host_paths`` maps every hostPath of the manifest to the path used on this node (the same path
    when nothing differs); ``volume_dir`` is where emptyDir volumes go (the kubelet's pod directory).
    """
    unmapped = sorted(v.path for v in pod.volumes if isinstance(v, HostPathVolume) and v.path not in host_paths)
    if unmapped:
        raise PodSpecError(f"hostPath {unmapped} not in the host path mapping {sorted(host_paths)}")
    steps: list[MakeDirectory | CheckHostPath | MountTmpfs] = []
    for v in pod.volumes:
        if isinstance(v, HostPathVolume):
            target = host_paths[v.path]
            if v.type == "DirectoryOrCreate":
                steps.append(MakeDirectory(target))
            elif v.type in ("Directory", "Socket", "File"):
                steps.append(CheckHostPath(target, v.type))
        else:
            steps.append(MountTmpfs(f"{volume_dir}/{v.name}", v.size_limit_bytes))
    ns = _namespaces(pod)
    sandbox = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=identity.name, uid=identity.uid, namespace=identity.namespace,
                                            attempt=0),  # fmt: skip
        # hostNetwork: the node's own UTS namespace and hostname.
        hostname="" if pod.host_network else identity.name,
        log_directory=identity.log_directory,
        labels={**pod.labels, "io.kubernetes.pod.name": identity.name,
                "io.kubernetes.pod.namespace": identity.namespace, "io.kubernetes.pod.uid": identity.uid},  # fmt: skip
        annotations={"kubernetes.io/config.source": "api"},
        linux=api_pb2.LinuxPodSandboxConfig(
            cgroup_parent=identity.cgroup_parent,
            security_context=api_pb2.LinuxSandboxSecurityContext(namespace_options=ns),
        ),
    )
    return PodPlan(identity=identity, host_steps=tuple(steps), pod_cgroup_limits=pod_cgroup_limits(pod.containers),
                   sandbox=sandbox, containers=pod.containers, volumes=pod.volumes, image=image,
                   host_paths=dict(host_paths),
                   volume_dir=volume_dir)  # fmt: skip


def _env_value(e: EnvVar, identity: PodIdentity) -> str:
    if e.field_path is None:
        return e.value or ""
    return {"spec.nodeName": identity.node_name, "metadata.namespace": identity.namespace,
            "metadata.name": identity.name, "metadata.uid": identity.uid}[e.field_path]  # fmt: skip


def container_config(c: ContainerTemplate, plan: PodPlan, attempt: int) -> api_pb2.ContainerConfig:
    """CreateContainer's config for attempt ``attempt`` (a restart is a new container, attempt + 1)."""
    identity = plan.identity
    volumes = {v.name: v for v in plan.volumes}
    mounts = []
    for m in c.mounts:
        if m.name not in volumes:
            raise PodSpecError(f"container {c.name}: volumeMount {m.name} names no volume")
        v = volumes[m.name]
        host = plan.host_paths[v.path] if isinstance(v, HostPathVolume) else f"{plan.volume_dir}/{v.name}"
        mounts.append(api_pb2.Mount(container_path=m.mount_path, host_path=host, readonly=m.read_only))
    sc = c.security
    security = api_pb2.LinuxContainerSecurityContext(
        capabilities=api_pb2.Capability(add_capabilities=list(sc.capabilities_add),
                                        drop_capabilities=list(sc.capabilities_drop)),  # fmt: skip
        privileged=sc.privileged,
        namespace_options=plan.sandbox.linux.security_context.namespace_options,
        readonly_rootfs=sc.read_only_root_fs,
        # allowPrivilegeEscalation: false is no_new_privs (the kubelet's AddNoNewPrivileges).
        no_new_privs=not sc.allow_privilege_escalation,
        masked_paths=[] if sc.privileged else list(DEFAULT_MASKED_PATHS),
        readonly_paths=[] if sc.privileged else list(DEFAULT_READONLY_PATHS),
        seccomp=_seccomp(sc.seccomp_type),
    )
    if sc.run_as_user is not None:
        security.run_as_user.value = sc.run_as_user
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=c.name, attempt=attempt),
        image=api_pb2.ImageSpec(image=plan.image),
        command=list(c.command),
        args=list(override_args(c.args, ARG_OVERRIDES)),
        envs=[api_pb2.KeyValue(key=e.name, value=_env_value(e, identity)) for e in c.env],
        mounts=mounts,
        labels={"io.kubernetes.pod.name": identity.name, "io.kubernetes.pod.namespace": identity.namespace,
                "io.kubernetes.pod.uid": identity.uid, "io.kubernetes.container.name": c.name},  # fmt: skip
        annotations={"io.kubernetes.container.restartCount": str(attempt)},
        log_path=f"{c.name}/{attempt}.log",
        linux=api_pb2.LinuxContainerConfig(resources=container_resources(c), security_context=security),
    )


def _seccomp(kind: str) -> api_pb2.SecurityProfile:
    types = {"RuntimeDefault": api_pb2.SecurityProfile.RuntimeDefault,
             "": api_pb2.SecurityProfile.Unconfined,  # the kubelet's default when none is given
             "Unconfined": api_pb2.SecurityProfile.Unconfined}  # fmt: skip
    if kind not in types:
        raise PodSpecError(f"seccompProfile type {kind!r} not translated (known: {sorted(t for t in types if t)})")
    return api_pb2.SecurityProfile(profile_type=types[kind])



# ---------------------------------------------------------------- the test node's differences


def host_paths_on_test_node(containerd_socket: str, pod_dir: str) -> dict[str, str]:
    """Every hostPath of daemonset.yaml, mapped to the path this test node uses, and why.

    The manifest's paths are a real node's; the test node shares the host with other sessions and
    engineers, so what is the node's own (its runtime, the agent's state and socket) is private.
    """
    return {
        # The private containerd of tests/support/node.py, not the host's (there may be none, or another's).
        "/run/containerd/containerd.sock": containerd_socket,
        # The agent's experiments survive its restarts here: per test pod, never a real agent's state.
        "/var/lib/kubectl-chaos": f"{pod_dir}/state",
        # Its gRPC socket: the test connects to <pod_dir>/run/agent.sock; the host's /run/kubectl-chaos
        # may belong to a real agent (make demo).
        "/run/kubectl-chaos": f"{pod_dir}/run",
        # The same cgroupfs: the test pods' cgroups are nested under this session's own cgroup
        # (TestNode.cgroup_base), which the agent finds through /proc/PID/cgroup like any other.
        "/sys/fs/cgroup": "/sys/fs/cgroup",
        # The system bus: the test node's containerd uses the cgroupfs driver (no systemd units to
        # change), and a test agent must never reach the host's systemd: an empty directory of the
        # pod's, like a node without dbus (the manifest's DirectoryOrCreate makes it).
        "/run/dbus": f"{pod_dir}/dbus",
    }


# ---------------------------------------------------------------- carrying the plan out on a TestNode


class RunningPod:
    """The planned pod on a TestNode: ``start()``, ``restart(name)`` as the kubelet restarts, ``delete()``."""

    def __init__(self, node: Any, plan: PodPlan):
        self.node = node
        self.plan = plan
        self.sandbox_id: str | None = None
        self.containers: dict[str, str] = {}  # name -> id of the current attempt
        self.attempts: dict[str, int] = {}
        self._tmpfs: list[str] = []

    @property
    def client(self) -> Any:
        return self.node.client

    def start(self) -> RunningPod:
        try:
            self._prepare_host()
            self.node._make_pod_cgroup(self.plan.identity.cgroup_parent, self.plan.pod_cgroup_limits)
            self.sandbox_id = self.client.run_pod_sandbox(self.plan.sandbox)
            for c in self.plan.containers:
                self._create_and_start(c.name, 0)
        except BaseException:
            self.delete()
            raise
        return self

    def _prepare_host(self) -> None:
        pathlib.Path(self.plan.identity.log_directory).mkdir(parents=True, exist_ok=True)
        for step in self.plan.host_steps:
            if isinstance(step, MakeDirectory):
                os.makedirs(step.path, mode=0o755, exist_ok=True)
            elif isinstance(step, CheckHostPath):
                checks = {"Directory": os.path.isdir, "File": os.path.isfile,
                          "Socket": lambda p: os.path.exists(p) and stat_is_socket(p)}  # fmt: skip
                if not checks[step.type](step.path):
                    raise PodSpecError(f"hostPath {step.path} is not a {step.type} (the kubelet would not start the pod)")
            elif isinstance(step, MountTmpfs):
                os.makedirs(step.path, exist_ok=True)
                opts = "mode=0777" + (f",size={step.size_bytes}" if step.size_bytes else "")
                subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", step.path], check=True,
                               capture_output=True)  # fmt: skip
                self._tmpfs.append(step.path)

    def _create_and_start(self, name: str, attempt: int) -> str:
        config = self.plan.container_config(name, attempt)
        container_id = self.client.create_container(self.sandbox_id, config, self.plan.sandbox)
        self.containers[name], self.attempts[name] = container_id, attempt
        self.client.start_container(container_id)
        return container_id

    def container_id(self, name: str | None = None) -> str:
        return self.containers[name or self.plan.containers[0].name]

    def pid(self, name: str | None = None) -> int:
        return self.client.container_info(self.container_id(name)).pid

    def state(self, name: str | None = None) -> int:
        return self.client.container_status(self.container_id(name), verbose=False).status.state

    def wait_exited(self, name: str | None = None, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.state(name) != api_pb2.CONTAINER_EXITED:
            if time.monotonic() > deadline:
                raise TimeoutError(f"container {name} still not exited after {timeout_s} s")
            time.sleep(0.05)

    def restart(self, name: str | None = None) -> str:
        """What the kubelet does once the container has exited: remove it, create attempt + 1, start it."""
        name = name or self.plan.containers[0].name
        old = self.containers[name]
        if self.client.container_status(old, verbose=False).status.state != api_pb2.CONTAINER_EXITED:
            raise PodSpecError(f"container {name} has not exited: the kubelet restarts only exited containers")
        self.client.remove_container(old)
        return self._create_and_start(name, self.attempts[name] + 1)

    def exec_probe(self, probe: ExecProbe, name: str | None = None) -> Any:
        """Run the probe's command in the container as the kubelet does (CRI ExecSync, its timeout)."""
        return self.client.exec_sync(self.container_id(name), list(probe.command), timeout_s=probe.timeout_s)

    def log_tail(self, name: str | None = None, lines: int = 30) -> str:
        name = name or self.plan.containers[0].name
        path = pathlib.Path(self.plan.identity.log_directory) / name / f"{self.attempts.get(name, 0)}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"(no log at {path})"

    def delete(self, grace_s: int = 10) -> list[str]:
        """Stop (SIGTERM, then SIGKILL after ``grace_s``), remove, unmount; returns what failed."""
        problems = []
        for container_id in self.containers.values():
            try:
                self.client.stop_container(container_id, grace_s=grace_s)
            except Exception as err:  # noqa: BLE001 - go on removing the rest
                problems.append(f"StopContainer {container_id[:13]}: {err}")
        if self.sandbox_id is not None:
            for call in (self.client.stop_pod_sandbox, self.client.remove_pod_sandbox):
                try:
                    call(self.sandbox_id, timeout_s=30.0)
                except Exception as err:  # noqa: BLE001
                    problems.append(f"{call.__name__}: {err}")
            self.sandbox_id = None
        self.containers.clear()
        problems += self.node._remove_cgroup_tree(self.plan.identity.cgroup_parent)
        for path in reversed(self._tmpfs):
            res = subprocess.run(["umount", path], capture_output=True, text=True)
            if res.returncode != 0:
                problems.append(f"umount {path}: {res.stderr.strip()}")
        self._tmpfs.clear()
        return problems


def stat_is_socket(path: str) -> bool:
    return stat.S_ISSOCK(os.stat(path).st_mode)


def new_identity(node: Any, template: PodTemplate, pod_dir: str) -> PodIdentity:
    """The pod the DaemonSet controller would create on this node (name <ds>-<suffix>, a fresh UID)."""
    uid = str(uuid.uuid4())
    return PodIdentity(
        name=f"{template.name}-{uid[:5]}",
        namespace=template.namespace,
        uid=uid,
        node_name=NODE_NAME,
        cgroup_parent=f"{node.cgroup_base}/kubepods/burstable/pod{uid}",
        log_directory=f"{pod_dir}/pods/{uid}/logs",  # per pod, as the kubelet's /var/log/pods/<ns>_<name>_<uid>
    )
