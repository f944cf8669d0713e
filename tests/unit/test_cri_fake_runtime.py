"""RuntimeClient against an in-process runtime.v1 server: selection, merging on the wire, errors.

The server is a small in-memory RuntimeService (like crictl's fake runtime); the real containerd
is exercised in tests/node/test_cri_client.py.
"""

from __future__ import annotations

import json
from concurrent import futures

import grpc
import pytest

from cri_api import (
    CallFailed,
    InvalidRequest,
    LinuxResources,
    NotFound,
    NotRunning,
    RuntimeClient,
    RuntimeUnreachable,
    Unimplemented,
)
from cri_api.v1 import api_pb2, api_pb2_grpc

RUNNING, EXITED = api_pb2.CONTAINER_RUNNING, api_pb2.CONTAINER_EXITED


def _container(cid: str, pod: str, name: str, attempt: int, state: int, ns: str = "default") -> api_pb2.Container:
    return api_pb2.Container(
        id=cid,
        pod_sandbox_id=f"sb-{pod}",
        metadata=api_pb2.ContainerMetadata(name=name, attempt=attempt),
        state=state,
        created_at=attempt + 1,
        labels={
            "io.kubernetes.pod.namespace": ns,
            "io.kubernetes.pod.name": pod,
            "io.kubernetes.pod.uid": f"uid-{pod}",
            "io.kubernetes.container.name": name,
        },
    )


class FakeRuntime(api_pb2_grpc.RuntimeServiceServicer):
    def __init__(self):
        self.containers = [
            _container("web-0", "web", "app", 0, EXITED),
            _container("web-2", "web", "app", 2, RUNNING),
            _container("web-1", "web", "app", 1, EXITED),
            _container("db-0", "db", "main", 0, RUNNING),
            _container("db-s", "db", "sidecar", 0, RUNNING),
            _container("job-0", "job", "run", 0, EXITED),
        ]
        self.sandboxes = [("web", "default"), ("db", "default"), ("job", "default"), ("api", "prod")]
        self.resources = api_pb2.LinuxContainerResources(
            cpu_period=100000,
            cpu_quota=50000,
            cpu_shares=512,
            memory_limit_in_bytes=64 << 20,
            memory_swap_limit_in_bytes=64 << 20,
            cpuset_cpus="0",
            hugepage_limits=[api_pb2.HugepageLimit(page_size="2MB", limit=0)],
            unified={"memory.high": "max"},
        )
        self.updates: list[bytes] = []

    def ListContainers(self, request, context):
        sel = dict(request.filter.label_selector)
        found = [c for c in self.containers if all(c.labels.get(k) == v for k, v in sel.items())]
        return api_pb2.ListContainersResponse(containers=found)

    def ListPodSandbox(self, request, context):
        items = [
            api_pb2.PodSandbox(id=f"sb-{n}", metadata=api_pb2.PodSandboxMetadata(name=n, namespace=ns))
            for n, ns in self.sandboxes
        ]
        return api_pb2.ListPodSandboxResponse(items=items)

    def ContainerStatus(self, request, context):
        match = [c for c in self.containers if c.id == request.container_id]
        if not match:
            context.abort(grpc.StatusCode.NOT_FOUND, f'container "{request.container_id}" not found')
        c = match[0]
        status = api_pb2.ContainerStatus(id=c.id, metadata=c.metadata, state=c.state, labels=c.labels)
        status.resources.linux.CopyFrom(self.resources)
        info = {"sandboxID": c.pod_sandbox_id, "pid": 100, "runtimeSpec": {"linux": {"cgroupsPath": f"/pod/{c.id}"}}}
        return api_pb2.ContainerStatusResponse(status=status, info={"info": json.dumps(info)})

    def UpdateContainerResources(self, request, context):
        self.updates.append(request.linux.SerializeToString())
        self.resources = request.linux
        return api_pb2.UpdateContainerResourcesResponse()

    def Version(self, request, context):
        return api_pb2.VersionResponse(runtime_name="fake", runtime_version="1.0", runtime_api_version="v1")

    def ExecSync(self, request, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "exec not allowed here")


@pytest.fixture
def runtime(tmp_path):
    fake = FakeRuntime()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    api_pb2_grpc.add_RuntimeServiceServicer_to_server(fake, server)
    sock = tmp_path / "cri.sock"
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    client = RuntimeClient(str(sock), timeout_s=5)
    yield fake, client
    client.close()
    server.stop(None)


def test_find_picks_the_highest_running_attempt(runtime):
    _, client = runtime
    info = client.find_container("default", "web")
    assert (info.id, info.attempt, info.pid, info.cgroups_path, info.runtime_name) == ("web-2", 2, 100, "/pod/web-2", "fake")
    assert info.sandbox_id == "sb-web"


def test_find_names_existing_pods_in_the_namespace(runtime):
    _, client = runtime
    with pytest.raises(NotFound, match=r"no pod default/nope .*; pods in namespace default: default/db, default/job, default/web") as err:
        client.find_container("default", "nope")
    assert err.value.existing == ("default/db", "default/job", "default/web")


def test_find_in_an_unknown_namespace_lists_all_pods(runtime):
    _, client = runtime
    with pytest.raises(NotFound, match=r"pods on this node \(none in that namespace\): default/db, default/job, default/web, prod/api"):
        client.find_container("staging", "web")


def test_find_needs_a_container_name_when_the_pod_has_several(runtime):
    _, client = runtime
    with pytest.raises(NotFound, match=r"pod default/db has 2 containers \(main, sidecar\): name the one to change"):
        client.find_container("default", "db")
    assert client.find_container("default", "db", "sidecar").id == "db-s"


def test_find_lists_containers_when_the_name_is_wrong(runtime):
    _, client = runtime
    with pytest.raises(NotFound, match=r"pod default/db has no container 'x'; its containers: main, sidecar"):
        client.find_container("default", "db", "x")


def test_find_reports_a_stopped_container_as_not_running(runtime):
    _, client = runtime
    with pytest.raises(NotRunning, match=r"container 'run' of pod default/job is not running \(attempt 0 is exited"):
        client.find_container("default", "job")


def test_update_sends_every_current_field_with_only_the_asked_one_changed(runtime):
    fake, client = runtime
    before = api_pb2.LinuxContainerResources.FromString(fake.resources.SerializeToString())
    sent = client.update_resources("web-2", cpu_quota_us=20000)
    assert sent.cpu_quota_us == 20000
    on_wire = api_pb2.LinuxContainerResources.FromString(fake.updates[-1])
    before.cpu_quota = 20000
    assert on_wire == before


def test_update_validates_before_calling_the_runtime(runtime):
    fake, client = runtime
    with pytest.raises(InvalidRequest, match="memory_limit_bytes=0 is not accepted"):
        client.update_resources("web-2", memory_limit_bytes=0)
    assert fake.updates == []


def test_update_of_a_stopped_container_is_refused(runtime):
    fake, client = runtime
    with pytest.raises(NotRunning, match="container web-0 .* is exited"):
        client.update_resources("web-0", cpu_quota_us=20000)
    assert fake.updates == []


def test_grpc_codes_map_to_errors(runtime):
    _, client = runtime
    with pytest.raises(NotFound, match=r"ContainerStatus: container gone not found at unix://.*: container \"gone\" not found"):
        client.container_info("gone")
    with pytest.raises(CallFailed, match=r"ExecSync \(container web-2\) failed at .*: PERMISSION_DENIED: exec not allowed here") as err:
        client.exec_sync("web-2", ["true"])
    assert (err.value.code, err.value.method) == ("PERMISSION_DENIED", "ExecSync")


def test_an_unimplemented_call_is_a_call_failure(runtime):
    _, client = runtime
    with pytest.raises(CallFailed, match="UNIMPLEMENTED"):
        client.list_images()


def test_unreachable_socket_names_the_endpoint(tmp_path):
    with RuntimeClient(str(tmp_path / "none.sock"), timeout_s=2) as client:
        with pytest.raises(RuntimeUnreachable, match=rf"container runtime at unix://{tmp_path}/none.sock is unreachable during Version"):
            client.version()


def test_a_method_the_runtime_lacks_is_named(runtime):
    # (A Go runtime without the whole service says "unknown service ...": tests/node has that case.)
    _, client = runtime
    with pytest.raises(Unimplemented, match=rf"^the runtime at {client.endpoint} does not implement Status \(UNIMPLEMENTED: ") as err:
        client.status()
    assert (err.value.method, err.value.code) == ("Status", "UNIMPLEMENTED")
    with pytest.raises(Unimplemented, match=r"does not implement ListImages \(UNIMPLEMENTED: "):
        client.list_images()  # this server has no ImageService at all


def test_a_zero_limit_is_never_sent_even_through_the_raw_update(runtime):
    fake, client = runtime
    with pytest.raises(InvalidRequest, match=r"^cpu_quota_us=0, memory_limit_bytes=0 cannot be sent: CRI reads 0 as 'not specified'"):
        client.update_container_resources("web-2", LinuxResources(cpu_quota_us=0, memory_limit_bytes=0))
    assert fake.updates == []


@pytest.mark.parametrize("timeout_s", [0, -1, float("nan"), float("inf"), "5", True])
def test_a_timeout_must_be_positive_seconds(runtime, tmp_path, timeout_s):
    _, client = runtime
    with pytest.raises(InvalidRequest, match=rf"^timeout_s={timeout_s!r} is not accepted: give a number of seconds > 0$"):
        RuntimeClient(str(tmp_path / "x.sock"), timeout_s=timeout_s)
    with pytest.raises(InvalidRequest, match=r"^timeout_s="):
        client.version(timeout_s=timeout_s)


def test_a_runtime_that_never_answers_times_out_after_the_deadline(tmp_path):
    import socket
    import time

    path = tmp_path / "silent.sock"
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(path))
    silent.listen(8)  # accepts connections, never speaks HTTP/2
    try:
        with RuntimeClient(str(path), timeout_s=0.3) as client:
            t0 = time.monotonic()
            with pytest.raises(CallFailed, match=r"Version failed at unix://.*silent.sock: DEADLINE_EXCEEDED: no answer within 0.3 s") as err:
                client.version()
            assert time.monotonic() - t0 < 3
            assert err.value.code == "DEADLINE_EXCEEDED"
    finally:
        silent.close()


def test_unreachable_says_whether_the_socket_is_missing_or_not_a_socket(tmp_path):
    not_socket = tmp_path / "file.sock"
    not_socket.write_text("")
    with RuntimeClient(str(not_socket), timeout_s=2) as client:
        with pytest.raises(RuntimeUnreachable, match=rf"\(is a runtime listening on {not_socket}\? it is not a socket\)$"):
            client.version()
    with RuntimeClient(str(tmp_path / "none.sock"), timeout_s=2) as client:
        with pytest.raises(RuntimeUnreachable, match=r"\? it does not exist\)$"):
            client.version()


def test_every_call_is_timed_for_whoever_observes_it(runtime, tmp_path):
    _, client = runtime
    seen = []
    client.observe_call = lambda method, seconds: seen.append((method, seconds))
    client.version()
    with pytest.raises(NotFound):
        client.container_status("no-such-container")
    assert [m for m, _ in seen] == ["Version", "ContainerStatus"]
    assert all(0 < s < 5 for _, s in seen)
    with RuntimeClient(str(tmp_path / "none.sock"), timeout_s=2) as down:
        down.observe_call = lambda method, seconds: seen.append((method, seconds))
        with pytest.raises(RuntimeUnreachable):
            down.version()
    assert seen[-1][0] == "Version"  # a call that failed is timed too


def test_a_runtime_back_after_an_outage_is_seen_within_a_second(tmp_path):
    """gRPC's own reconnect backoff (1 s x 1.6 per failed attempt, up to 120 s) would leave a client
    blind for seconds to minutes after a runtime restart: after 20 s down, about 6 s by default."""
    import time

    sock = tmp_path / "run" / "cri.sock"
    server = _serve(sock, FakeRuntime())
    with RuntimeClient(str(sock), timeout_s=2) as client:
        client.version()
        server.stop(None)
        sock.unlink(missing_ok=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20:  # what the agent does meanwhile: a call now and then
            with pytest.raises(RuntimeUnreachable):
                client.version()
            time.sleep(0.5)
        sock.parent.rmdir()
        server = _serve(sock, FakeRuntime())
        back = time.monotonic()
        try:
            while True:
                try:
                    client.version()
                    break
                except RuntimeUnreachable:
                    time.sleep(0.05)
            seen_s = time.monotonic() - back
        finally:
            server.stop(None)
    print(f"runtime seen again {seen_s:.2f} s after it came back from 20 s down")
    assert seen_s < 1.5


def _serve(path, runtime=None):
    path.parent.mkdir(parents=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    if runtime is not None:
        api_pb2_grpc.add_RuntimeServiceServicer_to_server(runtime, server)
    server.add_insecure_port(f"unix://{path}")
    server.start()
    return server


@pytest.mark.parametrize("crio_serves_cri", [True, False])
def test_detection_takes_the_first_socket_that_serves_cri(tmp_path, monkeypatch, crio_serves_cri):
    # As on a Docker node: Docker's containerd (no CRI plugin) at the containerd path, a CRI
    # runtime beside it. With none serving CRI the first stays, and its calls say what is wrong.
    monkeypatch.delenv("CONTAINER_RUNTIME_ENDPOINT", raising=False)
    bare, crio = tmp_path / "run/containerd/containerd.sock", tmp_path / "var/run/crio/crio.sock"
    servers = [_serve(bare), _serve(crio, FakeRuntime() if crio_serves_cri else None)]
    try:
        with RuntimeClient(timeout_s=5, host_root=str(tmp_path)) as client:
            if crio_serves_cri:
                assert client.endpoint == f"unix://{crio}"
                assert client.version().runtime_name == "fake"
            else:
                assert client.endpoint == f"unix://{bare}"
                with pytest.raises(Unimplemented, match=rf"^the runtime at unix://{bare} does not implement Version"):
                    client.version()
    finally:
        for server in servers:
            server.stop(None)
