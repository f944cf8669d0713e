"""RuntimeClient: a thin, typed client for the CRI runtime.v1 RuntimeService.

grpc and the generated modules are imported when a client is created, not when cri_api is
imported: the kubectl plugin imports cri_api types on paths that never open a channel.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from cri_api import endpoint as _endpoint
from cri_api.errors import (
    CallFailed,
    CRIError,
    InvalidRequest,
    NotFound,
    NotRunning,
    RuntimeUnreachable,
    Unimplemented,
)
from cri_api.merge import merge_resources
from cri_api.types import ContainerInfo, ExecResult, LinuxResources, VersionInfo

if TYPE_CHECKING:
    from cri_api.v1 import api_pb2

_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# gRPC reconnects a channel whose connection failed with an exponential backoff of 1 s x 1.6 per
# failure up to 120 s, and fails calls at once while it waits: after a 30 s runtime outage (a
# containerd restart or upgrade) the runtime was seen again only 15 s after it was back, after a few
# minutes' outage it would be up to two minutes. The runtime is a local socket, where a connect
# attempt costs a system call: at most this long between attempts.
_RECONNECT_BACKOFF_MAX_MS = 1000
_RECONNECT_BACKOFF_INITIAL_MS = 200
_LISTED_MAX = 20  # how many existing names an error message lists
_CREATING_METHODS = ("RunPodSandbox", "CreateContainer")


def _listing(names: Iterable[str]) -> str:
    names = sorted(set(names))
    if not names:
        return "none"
    shown = ", ".join(names[:_LISTED_MAX])
    return shown + (f" (and {len(names) - _LISTED_MAX} more)" if len(names) > _LISTED_MAX else "")


def _check_timeout(timeout_s: object) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
        raise InvalidRequest(f"timeout_s={timeout_s!r} is not accepted: give a number of seconds > 0")
    return float(timeout_s)


class RuntimeClient:
    """Talks CRI runtime.v1 to containerd, CRI-O or any CRI runtime over its unix socket.

    ``endpoint``: a socket path or "unix://" URL; default $CONTAINER_RUNTIME_ENDPOINT, then the
    first socket of ``cri_api.endpoint.DEFAULT_SOCKETS`` under ``host_root`` that serves CRI
    runtime.v1 (when several exist, each is asked for its Version in turn).
    ``timeout_s``: the deadline of each call unless a call is given its own.
    """

    def __init__(self, endpoint: str | None = None, timeout_s: float = 10.0, *, host_root: str = "/"):
        import grpc

        from cri_api import convert
        from cri_api.v1 import api_pb2, api_pb2_grpc

        self._grpc = grpc
        # Called with (CRI method, seconds) after every call, answered or not: the agent's metrics.
        self.observe_call: Callable[[str, float], None] | None = None
        self._pb = api_pb2
        self._convert = convert
        self._stubs = api_pb2_grpc
        self.timeout_s = _check_timeout(timeout_s)
        target, self.tried = _endpoint.resolve(endpoint, host_root=host_root)
        self._open(target)
        present = [path for path in self.tried if _endpoint.is_socket(path)]
        if len(present) > 1:
            # A Docker node has Docker's containerd (no CRI plugin) at the containerd path and
            # cri-dockerd beside it: take the first socket that answers runtime.v1.
            self._pick_serving(present)

    def _open(self, target: str) -> None:
        self.endpoint: str = target
        self._channel = self._grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.initial_reconnect_backoff_ms", _RECONNECT_BACKOFF_INITIAL_MS),
                ("grpc.max_reconnect_backoff_ms", _RECONNECT_BACKOFF_MAX_MS),
            ],
        )
        self._runtime = self._stubs.RuntimeServiceStub(self._channel)
        self._images = self._stubs.ImageServiceStub(self._channel)
        self._runtime_name: str | None = None

    def _pick_serving(self, sockets: list[str]) -> None:
        for path in sockets:
            target = _endpoint.to_target(path)
            if target != self.endpoint:
                self._channel.close()
                self._open(target)
            try:
                self.version(timeout_s=min(self.timeout_s, 2.0))
                return
            except CRIError:
                continue
        # None serves CRI: stay on the first, whose calls then say what is wrong with it.
        self._channel.close()
        self._open(_endpoint.to_target(sockets[0]))

    # ---- plumbing ----

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RuntimeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RuntimeClient(endpoint={self.endpoint!r}, timeout_s={self.timeout_s})"

    def _call(self, stub: Any, method: str, request: Any, timeout_s: float | None = None, what: str = "") -> Any:
        timeout = self.timeout_s if timeout_s is None else _check_timeout(timeout_s)
        observe = self.observe_call
        started = time.perf_counter()
        try:
            return getattr(stub, method)(request, timeout=timeout)
        except self._grpc.RpcError as err:
            raise self._translate(err, method, timeout, what) from None
        finally:
            if observe is not None:
                observe(method, time.perf_counter() - started)

    def _translate(self, err: Any, method: str, timeout_s: float, what: str) -> CRIError:
        codes = self._grpc.StatusCode
        code = err.code() if hasattr(err, "code") else None
        details = (err.details() if hasattr(err, "details") else "") or str(err)
        if code == codes.UNAVAILABLE:
            path = _endpoint.socket_path(self.endpoint)
            tried = f"; probed: {', '.join(self.tried)}" if self.tried else ""
            return RuntimeUnreachable(
                f"container runtime at {self.endpoint} is unreachable during {method}: {details}"
                + (f" ({_endpoint.diagnose(path)})" if path else "")
                + tried,
                endpoint=self.endpoint,
                tried=self.tried,
            )
        if code == codes.UNIMPLEMENTED:
            if "unknown service" in details:
                # containerd without its CRI plugin (disabled, or it failed to load) or a runtime that
                # speaks only the old v1alpha2 API answers every runtime.v1 call like this.
                service = details.rsplit(" ", 1)[-1]
                message = (
                    f"the runtime at {self.endpoint} answers but does not serve the CRI service {service} "
                    f"(UNIMPLEMENTED: {details} during {method}): containerd needs its CRI plugin "
                    "io.containerd.grpc.v1.cri enabled and loaded (see 'ctr plugins ls'); CRI runtime.v1 "
                    "needs containerd >= 1.6 or CRI-O >= 1.23"
                )
            else:
                message = f"the runtime at {self.endpoint} does not implement {method} (UNIMPLEMENTED: {details})"
            return Unimplemented(message, method=method, code="UNIMPLEMENTED", details=details)
        if code == codes.NOT_FOUND:
            if method in _CREATING_METHODS:
                # What is missing is something the new object needs (its image, its sandbox), not it.
                return NotFound(f"{method} ({what}) failed at {self.endpoint}: NOT_FOUND: {details}", wanted=what)
            return NotFound(f"{method}: {what or 'object'} not found at {self.endpoint}: {details}", wanted=what)
        name = code.name if code is not None else "UNKNOWN"
        if code == codes.DEADLINE_EXCEEDED:
            details = f"no answer within {timeout_s:g} s ({details})"
        return CallFailed(
            f"{method}{f' ({what})' if what else ''} failed at {self.endpoint}: {name}: {details}",
            method=method,
            code=name,
            details=details,
        )

    # ---- runtime ----

    def version(self, timeout_s: float | None = None) -> VersionInfo:
        resp = self._call(self._runtime, "Version", self._pb.VersionRequest(version="v1"), timeout_s)
        self._runtime_name = resp.runtime_name
        return VersionInfo(resp.runtime_name, resp.runtime_version, resp.runtime_api_version)

    def status(self, verbose: bool = False, timeout_s: float | None = None) -> api_pb2.StatusResponse:
        return self._call(self._runtime, "Status", self._pb.StatusRequest(verbose=verbose), timeout_s)

    def _name(self) -> str:
        if self._runtime_name is None:
            try:
                self.version()
            except CRIError:
                self._runtime_name = ""
        return self._runtime_name or ""

    # ---- pod sandboxes (raw) ----

    def run_pod_sandbox(
        self, config: api_pb2.PodSandboxConfig, runtime_handler: str = "", timeout_s: float | None = None
    ) -> str:
        req = self._pb.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
        what = f"pod {config.metadata.namespace}/{config.metadata.name}"
        return self._call(self._runtime, "RunPodSandbox", req, timeout_s, what).pod_sandbox_id

    def stop_pod_sandbox(self, sandbox_id: str, timeout_s: float | None = None) -> None:
        req = self._pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id)
        self._call(self._runtime, "StopPodSandbox", req, timeout_s, f"sandbox {sandbox_id}")

    def remove_pod_sandbox(self, sandbox_id: str, timeout_s: float | None = None) -> None:
        req = self._pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id)
        self._call(self._runtime, "RemovePodSandbox", req, timeout_s, f"sandbox {sandbox_id}")

    def pod_sandbox_status(
        self, sandbox_id: str, verbose: bool = False, timeout_s: float | None = None
    ) -> api_pb2.PodSandboxStatusResponse:
        req = self._pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=verbose)
        return self._call(self._runtime, "PodSandboxStatus", req, timeout_s, f"sandbox {sandbox_id}")

    def list_pod_sandboxes(
        self, labels: Mapping[str, str] | None = None, *, ready_only: bool = False, timeout_s: float | None = None
    ) -> list[api_pb2.PodSandbox]:
        flt = self._pb.PodSandboxFilter(label_selector=dict(labels or {}))
        if ready_only:
            flt.state.state = self._pb.SANDBOX_READY
        resp = self._call(self._runtime, "ListPodSandbox", self._pb.ListPodSandboxRequest(filter=flt), timeout_s)
        return list(resp.items)

    # ---- containers (raw) ----

    def create_container(
        self,
        sandbox_id: str,
        config: api_pb2.ContainerConfig,
        sandbox_config: api_pb2.PodSandboxConfig,
        timeout_s: float | None = None,
    ) -> str:
        req = self._pb.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=config, sandbox_config=sandbox_config)
        what = f"container {config.metadata.name} in sandbox {sandbox_id}"
        return self._call(self._runtime, "CreateContainer", req, timeout_s, what).container_id

    def start_container(self, container_id: str, timeout_s: float | None = None) -> None:
        req = self._pb.StartContainerRequest(container_id=container_id)
        self._call(self._runtime, "StartContainer", req, timeout_s, f"container {container_id}")

    def stop_container(self, container_id: str, grace_s: int = 0, timeout_s: float | None = None) -> None:
        """Stop with SIGTERM, then SIGKILL after ``grace_s`` seconds (0: SIGKILL at once)."""
        req = self._pb.StopContainerRequest(container_id=container_id, timeout=int(grace_s))
        wait = None if timeout_s is None and grace_s == 0 else (timeout_s or self.timeout_s) + grace_s
        self._call(self._runtime, "StopContainer", req, wait, f"container {container_id}")

    def remove_container(self, container_id: str, timeout_s: float | None = None) -> None:
        req = self._pb.RemoveContainerRequest(container_id=container_id)
        self._call(self._runtime, "RemoveContainer", req, timeout_s, f"container {container_id}")

    def list_containers(
        self,
        labels: Mapping[str, str] | None = None,
        *,
        sandbox_id: str = "",
        running_only: bool = False,
        timeout_s: float | None = None,
    ) -> list[api_pb2.Container]:
        flt = self._pb.ContainerFilter(label_selector=dict(labels or {}), pod_sandbox_id=sandbox_id)
        if running_only:
            flt.state.state = self._pb.CONTAINER_RUNNING
        resp = self._call(self._runtime, "ListContainers", self._pb.ListContainersRequest(filter=flt), timeout_s)
        return list(resp.containers)

    def container_status(
        self, container_id: str, verbose: bool = True, timeout_s: float | None = None
    ) -> api_pb2.ContainerStatusResponse:
        req = self._pb.ContainerStatusRequest(container_id=container_id, verbose=verbose)
        return self._call(self._runtime, "ContainerStatus", req, timeout_s, f"container {container_id}")

    def update_container_resources(
        self, container_id: str, resources: LinuxResources, timeout_s: float | None = None
    ) -> None:
        """Send ``resources`` as they are (replace semantics; see update_resources for merging)."""
        req = self._pb.UpdateContainerResourcesRequest(
            container_id=container_id, linux=self._convert.resources_to_proto(resources)
        )
        self._call(self._runtime, "UpdateContainerResources", req, timeout_s, f"container {container_id}")

    def list_images(self, timeout_s: float | None = None) -> list[api_pb2.Image]:
        resp = self._call(self._images, "ListImages", self._pb.ListImagesRequest(), timeout_s)
        return list(resp.images)

    # ---- the operations kubectl-chaos uses ----

    def container_info(self, container_id: str, timeout_s: float | None = None) -> ContainerInfo:
        resp = self.container_status(container_id, verbose=True, timeout_s=timeout_s)
        return self._convert.container_info_from_status(resp, runtime_name=self._name())

    def find_container(
        self, namespace: str, pod: str, container: str | None = None, timeout_s: float | None = None
    ) -> ContainerInfo:
        """The running container of a pod, found through the labels a kubelet sets.

        ``container=None`` picks the pod's only container. Among restarts the highest running
        attempt wins. Errors list the pods or containers that exist instead.
        """
        cv = self._convert
        selector = {cv.LABEL_POD_NAMESPACE: namespace, cv.LABEL_POD_NAME: pod}
        found = self.list_containers(selector, timeout_s=timeout_s)
        pod_ref = f"{namespace}/{pod}"
        if not found:
            raise self._pod_not_found(namespace, pod, timeout_s)
        names = {c.metadata.name or c.labels.get(cv.LABEL_CONTAINER_NAME, "") for c in found}
        if container is None:
            if len(names) != 1:
                raise NotFound(
                    f"pod {pod_ref} has {len(names)} containers ({_listing(names)}): name the one to change",
                    wanted=pod_ref,
                    existing=tuple(sorted(names)),
                )
            container = next(iter(names))
        mine = [c for c in found if (c.metadata.name or c.labels.get(cv.LABEL_CONTAINER_NAME)) == container]
        if not mine:
            raise NotFound(
                f"pod {pod_ref} has no container {container!r}; its containers: {_listing(names)}",
                wanted=f"{pod_ref}/{container}",
                existing=tuple(sorted(names)),
            )
        running = [c for c in mine if c.state == self._pb.CONTAINER_RUNNING]
        if not running:
            latest = max(mine, key=lambda c: (c.metadata.attempt, c.created_at))
            state = cv.state_name(latest.state)
            raise NotRunning(
                f"container {container!r} of pod {pod_ref} is not running (attempt {latest.metadata.attempt} "
                f"is {state}, id {latest.id[:13]})",
                container_id=latest.id,
                state=state,
            )
        best = max(running, key=lambda c: (c.metadata.attempt, c.created_at))
        resp = self.container_status(best.id, verbose=True, timeout_s=timeout_s)
        return cv.container_info_from_status(resp, sandbox_id=best.pod_sandbox_id, runtime_name=self._name())

    def _pod_not_found(self, namespace: str, pod: str, timeout_s: float | None) -> NotFound:
        cv = self._convert
        sandboxes = self.list_pod_sandboxes(timeout_s=timeout_s)
        pod_ref = f"{namespace}/{pod}"
        pods = {
            f"{s.metadata.namespace or s.labels.get(cv.LABEL_POD_NAMESPACE, '')}/"
            f"{s.metadata.name or s.labels.get(cv.LABEL_POD_NAME, '')}"
            for s in sandboxes
        }
        if pod_ref in pods:
            return NotFound(f"pod {pod_ref} has a sandbox but no containers", wanted=pod_ref, existing=(pod_ref,))
        same_ns = {p for p in pods if p.startswith(namespace + "/")}
        where = f"in namespace {namespace}" if same_ns else "on this node (none in that namespace)"
        return NotFound(
            f"no pod {pod_ref} on the runtime at {self.endpoint}; pods {where}: {_listing(same_ns or pods)}",
            wanted=pod_ref,
            existing=tuple(sorted(same_ns or pods)),
        )

    def update_resources(
        self,
        container_id: str,
        *,
        cpu_quota_us: int | None = None,
        cpu_period_us: int | None = None,
        memory_limit_bytes: int | None = None,
        memory_swap_limit_bytes: int | None = None,
        cpu_shares: int | None = None,
        timeout_s: float | None = None,
    ) -> LinuxResources:
        """Change only the given fields; every other field is sent as the runtime reports it now.

        Returns the resources sent. Values are validated first (no zeros: CRI reads 0 as "unset").
        """
        current = self.container_info(container_id, timeout_s=timeout_s)
        if not current.running:
            raise NotRunning(
                f"container {container_id} ({current.pod_namespace}/{current.pod_name}/{current.name}) "
                f"is {current.state}; only a running container's resources can be updated",
                container_id=container_id,
                state=current.state,
            )
        merged = merge_resources(
            current.resources,
            cpu_quota_us=cpu_quota_us,
            cpu_period_us=cpu_period_us,
            memory_limit_bytes=memory_limit_bytes,
            memory_swap_limit_bytes=memory_swap_limit_bytes,
            cpu_shares=cpu_shares,
        )
        self.update_container_resources(container_id, merged, timeout_s=timeout_s)
        return merged

    def exec_sync(
        self, container_id: str, argv: list[str] | tuple[str, ...], timeout_s: float = 10.0
    ) -> ExecResult:
        """Run ``argv`` in the container and wait for it (at most ``timeout_s`` seconds)."""
        if not argv:
            raise ValueError("exec_sync needs a non-empty argv")
        seconds = max(1, int(-(-timeout_s // 1)))  # CRI takes whole seconds; 0 would mean forever
        req = self._pb.ExecSyncRequest(container_id=container_id, cmd=list(argv), timeout=seconds)
        resp = self._call(self._runtime, "ExecSync", req, seconds + self.timeout_s, f"container {container_id}")
        return ExecResult(int(resp.exit_code), bytes(resp.stdout), bytes(resp.stderr))
