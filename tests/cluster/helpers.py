"""Helpers of the cluster tests: the agent on the test node (a real ``chaos-agent`` process, or its
engine and controller inside the test process), pods mirrored into the fake API server, and what to
read back."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import yaml

from daemonset import crd
from tests.cluster.conftest import MANIFESTS

NODE = "test-node"
KUBECTL_CHAOS = os.path.join(os.path.dirname(sys.executable), "kubectl-chaos")
REPO = pathlib.Path(__file__).resolve().parents[2]
AGENT_USER = "system:serviceaccount:kubectl-chaos:chaos-agent"


def role(file: str, name: str) -> dict:
    return next(d for d in yaml.safe_load_all((MANIFESTS / file).read_text())
                if d and d["kind"] == "ClusterRole" and d["metadata"]["name"] == name)


def agent_kubeconfig(fakeapi, workdir: pathlib.Path) -> str:
    """A kubeconfig for the agent's service account, bound to the manifests' own ClusterRole."""
    return fakeapi.write_kubeconfig(workdir / "agent-kubeconfig", [(AGENT_USER, agent_token(fakeapi))])


def agent_token(fakeapi) -> str:
    token = fakeapi.add_user(AGENT_USER)
    fakeapi.bind(AGENT_USER, role("rbac.yaml", "kubectl-chaos-agent"))
    return token


# What a pod's service account mount gives the agent: the kubernetes client reads these two files
# from this fixed path. The agent runs in a mount namespace of its own with a tmpfs over /run
# (/var/run is /run), so the files are only visible to it.
_SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
_IN_CLUSTER_WRAPPER = (
    'set -e; mount -t tmpfs -o size=1m,mode=0755 kcx-sa /run; mkdir -p "$SA_DIR"; '
    'cp "$SA_SRC/token" "$SA_SRC/ca.crt" "$SA_DIR/"; exec "$@"'
)


class AgentProcess:
    """``chaos-agent`` as a child process (the real program, as the DaemonSet runs it), with
    ``--kubeconfig`` pointing at the fake API server; ``kill9()`` and ``start()`` again at will.

    ``start()`` returns once the agent logged that its controller watches (after its first lists).
    """

    def __init__(self, node, fakeapi, workdir: pathlib.Path, *, in_cluster: bool = False,
                 cri_endpoint: str | None = None):
        """``in_cluster``: no --kubeconfig; the in-cluster environment variables and service account
        files instead, as the DaemonSet's pod has them."""
        self.node = node
        self.fakeapi = fakeapi
        self.in_cluster = in_cluster
        self.cri_endpoint = cri_endpoint or str(node.socket)
        self.workdir = workdir
        self.kubeconfig = agent_kubeconfig(fakeapi, workdir)
        # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer.
        self.rundir = pathlib.Path(tempfile.mkdtemp(prefix="kcx-cl-", dir="/tmp"))
        self.socket = self.rundir / "agent.sock"
        self.state_dir = workdir / "state"
        self.log = workdir / "agent.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout_s: float = 30.0) -> AgentProcess:
        argv = [
            sys.executable, "-m", "daemonset.agent",
            "--cri-endpoint", self.cri_endpoint,
            "--listen", f"unix://{self.socket}",
            "--state-dir", str(self.state_dir),
            "--node-name", NODE,
            "--drift-interval", "1",
            "--no-sweep-orphans",  # other test sessions on this machine may be shaping right now
            "--log-format", "json",
        ]  # fmt: skip
        env = dict(os.environ)
        if self.in_cluster:
            host, port = self.fakeapi.url.removeprefix("https://").rsplit(":", 1)
            source = self.workdir / "serviceaccount"
            source.mkdir(exist_ok=True)
            (source / "token").write_text(agent_token(self.fakeapi))
            (source / "ca.crt").write_bytes(self.fakeapi.ca_pem)
            env.update(KUBERNETES_SERVICE_HOST=host, KUBERNETES_SERVICE_PORT=port, SA_SRC=str(source),
                       SA_DIR=_SERVICE_ACCOUNT_DIR)
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _IN_CLUSTER_WRAPPER, "sh", *argv]
        else:
            env.pop("KUBERNETES_SERVICE_HOST", None)
            argv += ["--kubeconfig", self.kubeconfig]
        seen = self._ready_lines()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chaos-agent exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._ready_lines() > seen:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"chaos-agent's controller not watching within {timeout_s}s:\n{self.log_tail()}")

    def _ready_lines(self) -> int:
        if not self.log.exists():
            return 0
        return sum(1 for line in self.log.read_text(errors="replace").splitlines()
                   if "cluster mode: watching" in line)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def kill9(self) -> None:
        """SIGKILL the agent and whatever helpers it forked (its own session)."""
        assert self.proc is not None and self.proc.poll() is None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.rundir, ignore_errors=True)

    def experiments(self, namespace: str = "") -> list:
        """The agent's own list of experiments in force (its gRPC List), as its node-local API reports it."""
        import grpc

        from daemonset.api.gen import agent_pb2, agent_pb2_grpc

        with grpc.insecure_channel(f"unix://{self.socket}") as channel:
            reply = agent_pb2_grpc.AgentStub(channel).List(agent_pb2.ListRequest(namespace=namespace), timeout=10)
        return list(reply.experiments)

    def node_local(self, method: str, namespace: str, pod: str, container: str, **changes: int) -> object:
        """A node-local request (``Apply`` or ``Revert``) on the agent's own gRPC socket."""
        import grpc

        from daemonset.api.gen import agent_pb2, agent_pb2_grpc

        target = agent_pb2.Target(namespace=namespace, pod=pod, container=container)
        with grpc.insecure_channel(f"unix://{self.socket}") as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            if method == "Apply":
                return stub.Apply(agent_pb2.ApplyRequest(target=target, changes=agent_pb2.Changes(**changes)),
                                  timeout=30)
            return stub.Revert(agent_pb2.RevertRequest(target=target), timeout=30)

    def records(self) -> list[dict]:
        """The experiment records in the agent's state directory."""
        d = self.state_dir / "experiments"
        return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.exists() else []


class Agent:
    """The agent's two halves in this process: the engine on the real node and the controller."""

    def __init__(self, node, fakeapi, workdir: pathlib.Path):
        from kubernetes import config

        self.node = node
        self.state_dir = workdir / "state"
        path = agent_kubeconfig(fakeapi, workdir)
        self.client = config.new_client_from_config(config_file=path)
        self.engine = None
        self.controller = None
        self.watch_timeout_s = 30

    def start(self) -> Agent:
        from cri_api import RuntimeClient
        from daemonset.controller import Controller
        from daemonset.engine import Engine

        self.engine = Engine(RuntimeClient(str(self.node.socket)), state_dir=str(self.state_dir), node_name=NODE,
                             drift_interval_s=1.0)
        self.engine.start()
        self.controller = Controller(self.engine, self.client, NODE, state_dir=str(self.state_dir), resync_s=5.0,
                                     watch_timeout_s=self.watch_timeout_s)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def close(self) -> None:
        self.stop()


def pod_spec_containers(pod) -> list[dict]:
    """The pod spec's containers a real test-node pod was made from: the limits its containers got
    from the "kubelet" (tests/support/node.py) are the spec's limits (and requests)."""
    out = []
    for name, spec in pod.specs.items():
        container: dict = {"name": name, "image": "busybox"}
        limits = {}
        if spec.cpu_millicpu is not None:
            limits["cpu"] = f"{spec.cpu_millicpu}m"
        if spec.memory_bytes is not None:
            limits["memory"] = str(spec.memory_bytes)
        if limits:
            container["resources"] = {"limits": limits, "requests": dict(limits)}
        out.append(container)
    return out


def mirror(fakeapi, pod, *, node: str = NODE, labels: dict | None = None, annotations: dict | None = None) -> dict:
    """Put a real test-node pod into the fake API, as a kubelet-registered pod would be."""
    return fakeapi.create({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid, "labels": labels or {},
                     "annotations": annotations or {}},
        "spec": {"nodeName": node, "containers": pod_spec_containers(pod)},
        "status": {"phase": "Running"},
    }, keep_uid=True)


def quota_us(pod, container: str = "app") -> int:
    return int((pod.container_cgroup_dir("cpu", container) / "cpu.cfs_quota_us").read_text())


def memory_limit(pod, container: str = "app") -> int:
    return int((pod.container_cgroup_dir("memory", container) / "memory.limit_in_bytes").read_text())


def chaos_objects(fakeapi, namespace: str = "shop") -> list[dict]:
    return fakeapi.list(fakeapi.resource_type(crd.GROUP, crd.PLURAL), namespace)[0]


def events(fakeapi, pod_name: str, namespace: str = "shop") -> list[tuple[str, str]]:
    items = fakeapi.list(fakeapi.resource_type("", "events"), namespace)[0]
    items.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
    return [(e["reason"], e["message"]) for e in items if e["involvedObject"]["name"] == pod_name]


def wait_for(condition, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def settle(fakeapi, namespace: str = "shop") -> None:
    """Return once the agent has worked off everything queued before this call.

    Its controller reconciles one object at a time, in order: a ResourceChaos created now for a
    pod of this node that is not running yet is answered ("Pending") only after the work before it.
    """
    rtype = fakeapi.resource_type(crd.GROUP, crd.PLURAL)
    pods_type = fakeapi.resource_type("", "pods")
    name = f"settle-{time.monotonic_ns()}"
    fakeapi.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
                    "spec": {"nodeName": NODE, "containers": [{"name": "app"}]}, "status": {"phase": "Pending"}})
    fakeapi.create(crd.build(namespace, crd.ChaosSpec(pod=name, container="app", cpu_millicpu=100), name=name))
    wait_for(lambda: crd.target_entry(fakeapi.get(rtype, namespace, name).get("status"), name),
             timeout_s=15, what="the agent to answer the settle object")
    fakeapi.delete(rtype, namespace, name)
    fakeapi.delete(pods_type, namespace, name)
    wait_for(lambda: not any(o["metadata"]["name"] == name for o in chaos_objects(fakeapi, namespace)),
             what="the settle object to go")


class SocketRelay:
    """A unix socket that relays byte streams to another one (the node's containerd socket), and can
    be cut: ``cut()`` closes every relayed connection and stops listening, as a runtime that is
    restarting looks to its clients; ``restore()`` listens again."""

    def __init__(self, upstream: str, path: pathlib.Path):
        self.upstream = upstream
        self.path = path
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def restore(self) -> SocketRelay:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
            self.path.unlink(missing_ok=True)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(self.upstream)
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
