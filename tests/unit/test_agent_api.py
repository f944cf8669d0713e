"""The agent's gRPC surface and its state store, without a runtime: conversions, status codes,
socket handling, flags, atomic records."""

from __future__ import annotations

import os
import socket
import stat

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daemonset import agent as agent_main
from daemonset.api.gen import agent_pb2, agent_pb2_grpc
from daemonset.server import ListenError, apply_request_from_pb, clear_stale_socket, serve, unix_path
from daemonset.state import StateStore
from daemonset.types import (
    UNLIMITED,
    ApplyResult,
    Conflict,
    Denied,
    ExperimentInfo,
    InvalidRequest,
    Method,
    Refused,
    ResolvedTarget,
    Resource,
    ResourceResult,
    RevertResult,
    RuntimeUnavailable,
    TargetNotFound,
)

TARGET = ResolvedTarget("default", "web", "app", "c" * 64, "uid", "n1")


class ScriptedEngine:
    """Answers with a fixed result or raises a given engine error; records what it was asked."""

    def __init__(self):
        self.raise_error: Exception | None = None
        self.seen = []

    def apply(self, req):
        self.seen.append(req)
        if self.raise_error:
            raise self.raise_error
        return ApplyResult("e1", TARGET, (ResourceResult(Resource.CPU, 500, 500, 200, 200, Method.CRI),), 1.5e9)

    def revert(self, req):
        self.seen.append(req)
        if self.raise_error:
            raise self.raise_error
        return RevertResult(TARGET, (ResourceResult(Resource.INGRESS, UNLIMITED, 8000, UNLIMITED, UNLIMITED,
                                                    Method.NETLINK),), True)

    def list(self, namespace=None):
        self.seen.append(namespace)
        return [ExperimentInfo("e1", TARGET, (), 1.0, None, 2)]

    def list_damaged(self, namespace=None):
        return []


@pytest.fixture
def served(tmp_path):
    engine = ScriptedEngine()
    sock = tmp_path / "a.sock"
    server = serve(engine, f"unix://{sock}", max_workers=4)
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        yield engine, agent_pb2_grpc.AgentStub(channel), channel, sock
    finally:
        channel.close()
        server.stop(0)


def test_apply_round_trip(served):
    engine, stub, _, _ = served
    req = agent_pb2.ApplyRequest(target=agent_pb2.Target(namespace="default", pod="web"),
                                 changes=agent_pb2.Changes(cpu_millicpu=200, egress_bps=8000), duration_s=30,
                                 method=agent_pb2.METHOD_CGROUP, dry_run=True)
    resp = stub.Apply(req, timeout=5)
    seen = engine.seen[0]
    assert seen.target.container is None and seen.changes.cpu_millicpu == 200 and seen.changes.memory_bytes is None
    assert seen.changes.egress_bps == 8000 and seen.duration_s == 30 and seen.method is Method.CGROUP and seen.dry_run
    assert resp.experiment_id == "e1" and resp.target.container == "app" and resp.expires_at_unix_s == 1.5e9
    [r] = resp.resources
    assert (r.resource, r.previous.value, r.in_force.value, r.method) == (
        agent_pb2.RESOURCE_CPU, 500, 200, agent_pb2.METHOD_CRI)


def test_revert_and_list_round_trip(served):
    engine, stub, _, _ = served
    resp = stub.Revert(agent_pb2.RevertRequest(target=agent_pb2.Target(namespace="default", pod="web")), timeout=5)
    assert resp.was_active and resp.resources[0].in_force.unlimited and resp.resources[0].previous.value == 8000
    listed = stub.List(agent_pb2.ListRequest(namespace="default"), timeout=5)
    assert listed.experiments[0].drift_corrections == 2 and not listed.experiments[0].HasField("expires_at_unix_s")
    assert engine.seen[-1] == "default"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequest("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (TargetNotFound("no pod"), grpc.StatusCode.NOT_FOUND),
        (Denied("denied"), grpc.StatusCode.PERMISSION_DENIED),
        (Refused("below usage"), grpc.StatusCode.FAILED_PRECONDITION),
        (Conflict("shaped elsewhere"), grpc.StatusCode.ABORTED),
        (RuntimeUnavailable("no runtime"), grpc.StatusCode.UNAVAILABLE),
        (RuntimeError("boom"), grpc.StatusCode.INTERNAL),
    ],
)
def test_errors_become_status_codes_and_server_keeps_serving(served, error, code):
    engine, stub, channel, _ = served
    engine.raise_error = error
    with pytest.raises(grpc.RpcError) as err:
        stub.Apply(agent_pb2.ApplyRequest(target=agent_pb2.Target(namespace="default", pod="web")), timeout=5)
    assert err.value.code() == code and str(error) in err.value.details()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="kubectl_chaos.agent.v1.Agent"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_socket_is_0600(served):
    *_, sock = served
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600


def test_request_conversion_rejects_missing_target_and_unknown_method():
    with pytest.raises(InvalidRequest, match="target is missing"):
        apply_request_from_pb(agent_pb2.ApplyRequest())
    with pytest.raises(InvalidRequest, match="method 9"):
        apply_request_from_pb(agent_pb2.ApplyRequest(target=agent_pb2.Target(namespace="a", pod="b"), method=9))
    with pytest.raises(InvalidRequest, match="METHOD_NETLINK|accepted"):
        apply_request_from_pb(agent_pb2.ApplyRequest(target=agent_pb2.Target(namespace="a", pod="b"),
                                                     method=agent_pb2.METHOD_NETLINK))


def test_stale_socket_removed_live_one_refused(tmp_path):
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # bound, never listening: what a killed agent leaves
    clear_stale_socket(str(stale))
    assert not stale.exists()
    live = tmp_path / "live.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(live))
    server.listen(1)
    try:
        with pytest.raises(ListenError, match="another process is serving"):
            clear_stale_socket(str(live))
    finally:
        server.close()
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(ListenError, match="not a socket"):
        clear_stale_socket(str(regular))


def test_tcp_needs_tls():
    with pytest.raises(ListenError, match="needs TLS"):
        serve(ScriptedEngine(), "127.0.0.1:0")
    with pytest.raises(SystemExit):
        agent_main.parse_args(["--listen", "127.0.0.1:9999"])


def test_flags_and_defaults(monkeypatch):
    monkeypatch.setenv("NODE_NAME", "n7")
    monkeypatch.setenv("POD_NAMESPACE", "chaos-system")
    args = agent_main.parse_args([])
    assert args.listen == "unix:///run/kubectl-chaos/agent.sock" and args.state_dir == "/var/lib/kubectl-chaos"
    assert args.node_name == "n7" and args.deny_namespaces == "kube-system,chaos-system"
    assert unix_path("unix:///run/x.sock") == "/run/x.sock" and unix_path("unix:rel.sock") == "rel.sock"
    assert unix_path("10.0.0.1:5") is None


def test_state_store_atomic_and_keeps_damaged_files(tmp_path):
    store = StateStore(tmp_path)
    store.save("default/web/app", {"key": "default/web/app", "n": 1})
    store.save("default/web/app", {"key": "default/web/app", "n": 2})
    [rec] = list(store.load_all())
    assert rec.data["n"] == 2 and rec.data["key"] == "default/web/app" and not rec.error
    files = os.listdir(store.root)
    assert len(files) == 1 and stat.S_IMODE(os.stat(store.root / files[0]).st_mode) == 0o600
    # A write interrupted before its rename is dropped (the old record holds); a torn or empty record
    # is handed over with the reason, never moved aside: it is the only trace of what may be in force.
    (store.root / ".tmp-abc.json.123").write_text("{partial")
    (store.root / "broken.json").write_text("{not json")
    (store.root / "empty.json").write_text("")
    loaded = {r.path.name: r for r in store.load_all()}
    assert loaded[files[0]].data["n"] == 2
    assert loaded["broken.json"].data is None and "not JSON" in loaded["broken.json"].error
    assert loaded["empty.json"].error == "empty (0 bytes)"
    assert not (store.root / ".tmp-abc.json.123").exists() and (store.root / "broken.json").exists()
    store.delete("default/web/app")
    store.delete("default/web/app")  # idempotent
    store.delete_file(store.root / "broken.json")
    assert [r.path.name for r in store.load_all()] == ["empty.json"]


def test_state_store_deferred_writes_are_visible_at_once_and_flushed(tmp_path):
    store = StateStore(tmp_path, flush_interval_s=0.01)
    store.save("a/b/c", {"phase": "active"}, durable=False)
    assert [r.data["phase"] for r in store.load_all()] == ["active"]  # a new reader (a restarted agent) sees it
    store.flush()
    assert not store._dirty
    store.delete("a/b/c")
    store.close()
    assert list(store.load_all()) == []


def _openssl(*args: str, cwd) -> None:
    import subprocess

    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def certs(tmp_path):
    from tests.support.require import require_binary

    require_binary("openssl")
    d = tmp_path
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=test-ca", cwd=d)
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", "san.cnf", cwd=d)
    return d


def test_tcp_with_client_certificates(certs, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    read = lambda name: (certs / name).read_bytes()  # noqa: E731
    server = serve(ScriptedEngine(), f"127.0.0.1:{port}", tls=(read("server.pem"), read("server.key"), read("ca.pem")))
    try:
        good = grpc.ssl_channel_credentials(root_certificates=read("ca.pem"), private_key=read("client.key"),
                                            certificate_chain=read("client.pem"))
        with grpc.secure_channel(f"127.0.0.1:{port}", good) as ch:
            assert agent_pb2_grpc.AgentStub(ch).List(agent_pb2.ListRequest(), timeout=5).experiments[0].experiment_id == "e1"
        no_cert = grpc.ssl_channel_credentials(root_certificates=read("ca.pem"))
        with grpc.secure_channel(f"127.0.0.1:{port}", no_cert) as ch, pytest.raises(grpc.RpcError):
            agent_pb2_grpc.AgentStub(ch).List(agent_pb2.ListRequest(), timeout=5)
        # the plugin's node-local backend over TCP takes its certificates from the environment
        from plugin.backends import AgentAddress, Connection
        from plugin.backends.agent import connect
        from plugin.errors import UsageError

        conn = Connection(agent_address=AgentAddress(scheme="tcp", host="127.0.0.1", port=port), timeout_s=5)
        with pytest.raises(UsageError, match="KUBECTL_CHAOS_TLS_CA"):
            connect(conn)
        monkeypatch.setenv("KUBECTL_CHAOS_TLS_CA", str(certs / "ca.pem"))
        monkeypatch.setenv("KUBECTL_CHAOS_TLS_CERT", str(certs / "client.pem"))
        monkeypatch.setenv("KUBECTL_CHAOS_TLS_KEY", str(certs / "client.key"))
        backend = connect(conn)
        try:
            [status] = backend.status(None)
            assert status.experiment_id == "e1" and status.message == "2 drift correction(s)"
        finally:
            backend.close()
    finally:
        server.stop(0)
