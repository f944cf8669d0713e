"""The seam between the command line and the backends that carry a request out.

The CLI turns flags into a :class:`ChaosRequest` (pure, validated, units in the field names) and
hands it to a :class:`Backend`:

- node-local (``--agent-address``): ``plugin.backends.agent`` talks to one node's chaos-agent;
- cluster (default): ``plugin.backends.cluster`` goes through the Kubernetes API.

A backend module exposes ``connect(conn: Connection) -> Backend``. It is imported only when it is
used (:func:`open_backend`): importing ``kubernetes`` costs about 0.45 s and ``grpc`` about
0.15 s, and ``kubectl-chaos --help`` or a node-local apply must not pay for the other one.

Values: CPU in millicpu, memory in bytes, bandwidth in bit/s, times in seconds or UTC datetimes.
``None`` as a limit means "no limit" (unlimited); ``None`` in a request field means "leave alone".
Backends report failures by raising :class:`BackendError` with a one-line message (printed as is,
exit status 1); a failure of one target among many (``--selector``) goes into
``TargetResult.error`` instead, and the CLI exits 1 after printing the rest.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from plugin.errors import BackendError

if TYPE_CHECKING:
    from plugin.backends.reports import ExperimentStatus, TopRow

__all__ = [
    "DIRECTIONS",
    "METHODS",
    "RESOURCES",
    "UNIT_BY_RESOURCE",
    "AgentAddress",
    "ApplyResult",
    "Backend",
    "BackendError",
    "ChaosRequest",
    "Connection",
    "ExperimentStatus",
    "ProfileStep",
    "QueueReading",
    "TopRow",
    "ResetResult",
    "ResourceChange",
    "TargetResult",
    "open_backend",
]

Direction = Literal["egress", "ingress", "both"]
Method = Literal["auto", "cri", "cgroup"]

# ingress = traffic into the pod, egress = traffic out of it (as the Kubernetes bandwidth
# annotations); both = the same rate each way.
DIRECTIONS: tuple[str, ...] = ("egress", "ingress", "both")
# auto: the backend picks (CRI UpdateContainerResources, falling back to cgroup files);
# cri / cgroup force one. Bandwidth is always shaped with qdiscs, whatever the method.
METHODS: tuple[str, ...] = ("auto", "cri", "cgroup")

RESOURCE_CPU = "cpu"
RESOURCE_MEMORY = "memory"
RESOURCE_BANDWIDTH_INGRESS = "bandwidth-ingress"
RESOURCE_BANDWIDTH_EGRESS = "bandwidth-egress"
RESOURCES: tuple[str, ...] = (
    RESOURCE_CPU,
    RESOURCE_MEMORY,
    RESOURCE_BANDWIDTH_INGRESS,
    RESOURCE_BANDWIDTH_EGRESS,
)
UNIT_BY_RESOURCE: dict[str, str] = {
    RESOURCE_CPU: "millicpu",
    RESOURCE_MEMORY: "bytes",
    RESOURCE_BANDWIDTH_INGRESS: "bps",
    RESOURCE_BANDWIDTH_EGRESS: "bps",
}


@dataclasses.dataclass(frozen=True)
class ProfileStep:
    """A later step of a stepped profile (``--set-cpu 1000m..100m --over 5m --steps 10``): these values
    go in force ``offset_s`` after the request; None leaves a resource at the step before."""

    offset_s: float
    cpu_millicpu: int | None = None
    memory_bytes: int | None = None
    bandwidth_bps: int | None = None


@dataclasses.dataclass(frozen=True)
class ChaosRequest:
    """One validated request. Exactly one of ``pod`` and ``selector`` is set.

    ``namespace`` is resolved by the CLI before the backend sees it (``-n``, else
    ``Backend.default_namespace()``). ``container`` None = the pod's only container. With
    ``reset`` all ``*_bps``/``*_bytes``/``*_millicpu`` fields are None and ``duration_s`` is None:
    a reset restores every original the experiment changed.
    """

    namespace: str | None
    pod: str | None = None
    container: str | None = None
    selector: str | None = None
    cpu_millicpu: int | None = None
    memory_bytes: int | None = None
    bandwidth_bps: int | None = None
    direction: Direction = "both"
    duration_s: float | None = None
    method: Method = "auto"
    force: bool = False
    dry_run: bool = False
    reset: bool = False
    # A stepped profile: the fields above are its first step; these follow (the agent runs them).
    steps: tuple[ProfileStep, ...] = ()
    # The queue budget of the shaped directions (only with bandwidth); None: the experiment's, 50 ms
    # for a new shaping.
    latency_s: float | None = None

    @property
    def ingress_bps(self) -> int | None:
        """Rate for traffic into the pod, or None to leave ingress alone."""
        return self.bandwidth_bps if self.direction in ("ingress", "both") else None

    @property
    def egress_bps(self) -> int | None:
        """Rate for traffic out of the pod, or None to leave egress alone."""
        return self.bandwidth_bps if self.direction in ("egress", "both") else None

    @property
    def target(self) -> str:
        """The target as people write it: ``ns/pod[/container]`` or ``ns -l selector``."""
        ns = self.namespace or "(default namespace)"
        if self.selector is not None:
            return f"{ns} -l {self.selector}"
        return f"{ns}/{self.pod}" + (f"/{self.container}" if self.container else "")


@dataclasses.dataclass(frozen=True)
class QueueReading:
    """A shaped direction's queue as the kernel holds it: ``limit_bytes`` (``limit_packets`` for the
    kernel's default leaf), ``latency_s`` = how long the full queue takes to drain at the rate in force
    (the budget, or more where four full frames are longer), ``budget_s`` what was asked. ``unknown``:
    why it could not be read."""

    budget_s: float
    limit_bytes: int | None = None
    limit_packets: int | None = None
    latency_s: float | None = None
    unknown: str = ""


@dataclasses.dataclass(frozen=True)
class ResourceChange:
    """One resource of one container, before and after.

    In the unit of ``UNIT_BY_RESOURCE[resource]``; None = no limit. ``previous`` is the value before
    this operation (for a reset: the chaos value; in a status: the original), ``requested`` what
    was asked (for a reset: the original), ``read_back`` what the runtime or kernel reports
    afterwards (None in a dry run: nothing was changed, nothing to read). ``method`` is "cri",
    "cgroup" or "tc". ``expires_at`` is an aware UTC datetime or None (no expiry).
    """

    resource: str
    previous: int | None
    requested: int | None
    read_back: int | None
    method: str
    expires_at: datetime | None = None
    message: str = ""
    # Why ``read_back`` could not be read from the kernel (then None is no reading, not "unlimited").
    unknown: str = ""
    queue: QueueReading | None = None  # bandwidth: the direction's queue, read back

    @property
    def unit(self) -> str:
        return UNIT_BY_RESOURCE.get(self.resource, "")


@dataclasses.dataclass(frozen=True)
class TargetResult:
    """What happened to one container. ``error`` (one line) is set if this target failed."""

    namespace: str
    pod: str
    container: str
    changes: tuple[ResourceChange, ...] = ()
    node: str | None = None
    experiment_id: str | None = None
    error: str | None = None
    # True: this request started the experiment; False: it changed one in force; None: not known.
    created: bool | None = None


@dataclasses.dataclass(frozen=True)
class _PerTarget:
    targets: tuple[TargetResult, ...]
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return all(t.error is None for t in self.targets)


class ApplyResult(_PerTarget):
    """The result of ``Backend.apply``: one entry per container changed (many with --selector)."""


class ResetResult(_PerTarget):
    """The result of ``Backend.reset``: ``previous`` = chaos value, ``read_back`` = the original back."""


@dataclasses.dataclass(frozen=True)
class AgentAddress:
    """Where the node-local agent listens: a unix socket path or a TCP host and port."""

    scheme: Literal["unix", "tcp"]
    path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def grpc_target(self) -> str:
        """The address in gRPC's target syntax: ``unix:///path`` or ``host:port`` (``[v6]:port``)."""
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return self.grpc_target


@dataclasses.dataclass(frozen=True)
class Connection:
    """How to reach the backend: the agent address (node-local) or kubeconfig and context (cluster)."""

    agent_address: AgentAddress | None = None
    kubeconfig: str | None = None
    context: str | None = None
    timeout_s: float = 30.0

    @property
    def mode(self) -> Literal["agent", "cluster"]:
        return "agent" if self.agent_address is not None else "cluster"


@runtime_checkable
class Backend(Protocol):
    """What the CLI needs from a backend. Failures raise :class:`BackendError` (one line)."""

    def default_namespace(self) -> str:
        """The namespace used without ``-n``: the kubeconfig context's, else "default"."""
        ...

    def apply(self, req: ChaosRequest) -> ApplyResult:
        """Change the limits (or only plan them when ``req.dry_run``) and read them back."""
        ...

    def reset(self, req: ChaosRequest) -> ResetResult:
        """Restore the originals of the target's experiment exactly (``req.reset`` is True)."""
        ...

    def status(self, namespace: str | None) -> Sequence[ExperimentStatus]:
        """The active experiments in ``namespace``; None = all namespaces."""
        ...

    def close(self) -> None:
        """Release connections; called once, also after an error."""
        ...


# What status and top report lives in plugin.backends.reports, loaded on first use: an apply never
# makes one, and generating their dataclass methods took 1.6 ms of every start.
_REPORTS = ("ExperimentStatus", "TopRow")


def __getattr__(name: str):
    if name in _REPORTS:
        from plugin.backends import reports

        return getattr(reports, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MISSING_BACKEND = {
    "agent": (
        "node-local mode needs a running chaos-agent and its client module plugin.backends.agent, "
        "which this build of kubectl-chaos does not include"
    ),
    "cluster": (
        "cluster mode needs the Kubernetes backend plugin.backends.cluster, which this build of "
        "kubectl-chaos does not include; use --agent-address to talk to a node's chaos-agent"
    ),
}


def open_backend(conn: Connection, package: str = __name__) -> Backend:
    """Import the backend ``conn`` asks for (only that one, ``package.agent`` or ``package.cluster``)
    and connect it."""
    module_name = f"{package}.{conn.mode}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise BackendError(_MISSING_BACKEND[conn.mode]) from None
    return module.connect(conn)
