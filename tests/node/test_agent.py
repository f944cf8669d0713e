"""chaos-agent end to end on the real test node: a real agent process, real containerd, real cgroups,
real qdiscs, real traffic. Everything is checked by what can be observed: cgroup files, measured
CPU use, iperf3 throughput, gRPC status codes, the state directory, network devices.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daemonset.api.gen import agent_pb2, agent_pb2_grpc
from netshape import ifb_name
from tests.support.netns import pod_goodput_bps
from tests.support.node import ContainerSpec
from tests.support.wait import wait_until

MiB = 2**20
REPO = pathlib.Path(__file__).resolve().parents[2]
BUSY = ("sh", "-c", "while :; do :; done")


# ---------------------------------------------------------------- the agent process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    """``chaos-agent`` as a child process on the test node; ``kill9()`` and ``start()`` again at will."""

    def __init__(self, node, workdir: pathlib.Path, *, drift_interval_s: float = 0.5, cri_endpoint: str | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.node = node
        self.cri_endpoint = cri_endpoint or str(node.socket)
        self.extra_args = extra_args
        self.workdir = workdir
        self.socket = workdir / "agent.sock"
        self.address = f"unix://{self.socket}"
        self.state_dir = workdir / "state"
        self.log = workdir / "agent.log"
        self.metrics_port = free_port()
        self.drift_interval_s = drift_interval_s
        self.proc: subprocess.Popen | None = None
        self._channel: grpc.Channel | None = None

    def command(self) -> list[str]:
        """The agent's command line (subclasses run it otherwise: under setpriv, say)."""
        return [
            sys.executable, "-m", "daemonset.agent",
            "--cri-endpoint", self.cri_endpoint,
            "--listen", self.address,
            "--state-dir", str(self.state_dir),
            "--node-name", "test-node",
            "--drift-interval", str(self.drift_interval_s),
            "--metrics-address", f"127.0.0.1:{self.metrics_port}",
            "--log-format", "json",
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout_s: float = 20.0) -> Agent:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chaos-agent exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.socket.exists() and self.serving():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"chaos-agent not serving within {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return self._channel

    @property
    def stub(self) -> agent_pb2_grpc.AgentStub:
        return agent_pb2_grpc.AgentStub(self.channel)

    def serving(self) -> bool:
        try:
            resp = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            # A refused connect (the killed agent's socket file is still there) puts the channel in
            # gRPC's reconnect backoff, 1 s at first: the next look gets a fresh channel, so a restart
            # is seen when it serves, not a second later.
            self._drop_channel()
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._drop_channel()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drop_channel()

    def _drop_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def records(self) -> list[dict]:
        d = self.state_dir / "experiments"
        return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.exists() else []

    # -- requests --

    def apply(self, ns: str, pod: str, container: str = "", *, duration_s: float | None = None,
              method: int = agent_pb2.METHOD_AUTO, force: bool = False, dry_run: bool = False,
              **changes: int) -> agent_pb2.ApplyResponse:
        req = agent_pb2.ApplyRequest(target=agent_pb2.Target(namespace=ns, pod=pod, container=container),
                                     changes=agent_pb2.Changes(**changes), method=method, force=force, dry_run=dry_run)
        if duration_s is not None:
            req.duration_s = duration_s
        return self.stub.Apply(req, timeout=30)

    def revert(self, ns: str, pod: str, container: str = "", *, force: bool = False) -> agent_pb2.RevertResponse:
        return self.stub.Revert(agent_pb2.RevertRequest(target=agent_pb2.Target(namespace=ns, pod=pod, container=container),
                                                        force=force), timeout=30)

    def list_response(self) -> agent_pb2.ListResponse:
        return self.stub.List(agent_pb2.ListRequest(), timeout=10)

    def list(self) -> list[agent_pb2.Experiment]:
        return list(self.stub.List(agent_pb2.ListRequest(), timeout=10).experiments)


@pytest.fixture
def agent(node):
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="kcx-agent-", dir="/tmp"))  # short: unix socket paths <= 107
    a = Agent(node, workdir).start()
    try:
        yield a
    finally:
        a.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------- observing the kernel


def read(path: pathlib.Path) -> str:
    return path.read_text().strip()


def cpu_files(pod, name=None) -> tuple[str, str]:
    return read(pod.container_cgroup_dir("cpu", name) / "cpu.cfs_quota_us"), read(pod.cgroup_dirs["cpu"] / "cpu.cfs_quota_us")


def mem_files(pod, name=None) -> tuple[str, str, str]:
    d = pod.container_cgroup_dir("memory", name)
    return read(d / "memory.limit_in_bytes"), read(d / "memory.memsw.limit_in_bytes"), \
        read(pod.cgroup_dirs["memory"] / "memory.limit_in_bytes")


def cpu_used(pod, seconds: float = 2.0, name=None) -> float:
    """CPUs the container used over ``seconds`` (cpuacct.usage)."""
    f = pod.container_cgroup_dir("cpuacct", name) / "cpuacct.usage"
    t0, u0 = time.monotonic(), int(read(f))
    time.sleep(seconds)
    return (int(read(f)) - u0) / 1e9 / (time.monotonic() - t0)


def iperf_bps(pod, *, into_pod: bool, seconds: float = 2.0) -> float:
    """Measured TCP goodput host -> pod (``into_pod``) or pod -> host over ``seconds`` after half a
    second of slow start, from the receiver's TCP byte count (tests/support/netns.py)."""
    return pod_goodput_bps(pod.netns_path, pod.ip, into_pod=into_pod, duration_s=seconds, omit_s=0.5)


def ifb_exists(pod) -> bool:
    """Our IFB device for the pod (netshape names it after the sandbox id)."""
    return os.path.exists(f"/sys/class/net/{ifb_name(pod.sandbox_id)}")


def values(resp) -> dict[int, tuple]:
    def q(x):
        return None if x.unlimited else x.value

    return {r.resource: (q(r.previous), q(r.requested), q(r.in_force), r.method) for r in resp.resources}


# ---------------------------------------------------------------- CPU, memory, bandwidth
# Changed, measured and reset on both nodes: tests/node/test_limits_both_nodes.py.


def test_runtime_view_follows_the_cri_method_only_and_no_ratchet(agent, pods):
    """Host only: on cgroup v1 the cgroup method writes the kernel's files behind containerd's back,
    so containerd's store (what a later runc update re-applies and a re-created container starts
    from: machine.md) keeps the pod spec's values, while the CRI method moves both. On the v2 node
    both methods go through systemd, whose view the both-nodes tests compare after every reset. The
    no-ratchet rule (changes under the pod's quota leave the pod's level alone) is cgroupctl's pod
    rule, the same code on both nodes; its ten applies cost nothing here and CI time under TCG."""
    pod = pods.run("cpucg", containers=[ContainerSpec("app", argv=BUSY, cpu_millicpu=500)])

    def runtime_quota() -> int | None:
        return agent.node.client.container_info(pod.container_id()).resources.cpu_quota_us

    resp = agent.apply("default", "cpucg", cpu_millicpu=1200, method=agent_pb2.METHOD_CGROUP)
    assert values(resp)[agent_pb2.RESOURCE_CPU] == (500, 1200, 1200, agent_pb2.METHOD_CGROUP)
    assert cpu_files(pod)[0] == "120000" and int(cpu_files(pod)[1]) >= 120000
    assert runtime_quota() == 50000
    resp = agent.apply("default", "cpucg", cpu_millicpu=1500, method=agent_pb2.METHOD_CRI)
    assert values(resp)[agent_pb2.RESOURCE_CPU] == (1200, 1500, 1500, agent_pb2.METHOD_CRI)
    assert cpu_files(pod)[0] == "150000" and runtime_quota() == 150000
    agent.revert("default", "cpucg")
    assert cpu_files(pod) == ("50000", "50000") and runtime_quota() == 50000
    # Changes that stay under the pod's quota leave the pod alone, however many (no ratchet).
    for m in (200, 300, 200, 300, 400):
        agent.apply("default", "cpucg", cpu_millicpu=m, method=agent_pb2.METHOD_CGROUP)
        agent.apply("default", "cpucg", cpu_millicpu=m + 50, method=agent_pb2.METHOD_CRI)
    assert cpu_files(pod) == ("45000", "50000")
    agent.revert("default", "cpucg")
    assert cpu_files(pod) == ("50000", "50000") and runtime_quota() == 50000


# ---------------------------------------------------------------- partial failure


def test_part_failing_rolls_back_the_rest(agent, pods):
    """A second change whose shaping fails (our IFB name taken by a foreign device): the memory it
    had already changed goes back to the original, the CPU back to the experiment's value."""
    pod = pods.run("partial", containers=[ContainerSpec("app", cpu_millicpu=500, memory_bytes=64 * MiB)])
    agent.apply("default", "partial", cpu_millicpu=200)
    squatter = ifb_name(pod.sandbox_id)
    subprocess.run(["ip", "link", "add", squatter, "type", "veth", "peer", "name", squatter[:-1] + "p"], check=True)
    try:
        with pytest.raises(grpc.RpcError) as err:
            agent.apply("default", "partial", cpu_millicpu=300, memory_bytes=32 * MiB, egress_bps=10_000_000)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "not an ifb" in err.value.details() and "rolled back" in err.value.details()
        assert cpu_files(pod)[0] == "20000" and mem_files(pod) == (str(64 * MiB),) * 3
        [exp] = agent.list()
        assert [(r.resource, r.requested.value) for r in exp.resources] == [(agent_pb2.RESOURCE_CPU, 200)]
    finally:
        subprocess.run(["ip", "link", "del", squatter], check=False)
    agent.revert("default", "partial")
    assert cpu_files(pod) == ("50000", "50000")


# ---------------------------------------------------------------- durations and crashes


def test_kill9_at_random_moments_leaves_all_or_nothing(agent, pods):
    """kill -9 while an Apply is under way, at random moments: after a restart the container has
    either the whole experiment in force or exactly its originals, and a revert always gets back
    to the originals with nothing left behind."""
    pod = pods.run("anytime", containers=[ContainerSpec("app", cpu_millicpu=500, memory_bytes=64 * MiB)])
    original = (cpu_files(pod), mem_files(pod))
    rng = random.Random(20261122)
    outcomes = []
    for _ in range(8):
        def fire():
            try:
                agent.apply("default", "anytime", cpu_millicpu=200, memory_bytes=48 * MiB, ingress_bps=10_000_000,
                            duration_s=600)
            except grpc.RpcError:
                pass

        thread = threading.Thread(target=fire)
        thread.start()
        time.sleep(rng.uniform(0.0, 0.2))
        agent.kill9()
        thread.join()
        agent.start()
        experiments = agent.list()
        if experiments:
            assert cpu_files(pod)[0] == "20000" and mem_files(pod)[0] == str(48 * MiB)
            agent.revert("default", "anytime")
        outcomes.append(bool(experiments))
        assert (cpu_files(pod), mem_files(pod)) == original
        assert agent.records() == [] and not ifb_exists(pod)
    print("experiment in force after the crash:", outcomes)


def test_half_made_change_cleaned_up_on_start(agent, pods):
    pod = pods.run("half", containers=[ContainerSpec("app", cpu_millicpu=500)])
    agent.apply("default", "half", cpu_millicpu=200, ingress_bps=10_000_000)
    agent.kill9()
    # As if killed between the intent record and the change being complete.
    [path] = (agent.state_dir / "experiments").glob("*.json")
    record = json.loads(path.read_text())
    record["phase"] = "applying"
    path.write_text(json.dumps(record))
    agent.start()
    assert cpu_files(pod)[0] == "50000"
    assert agent.list() == [] and agent.records() == []
    assert not ifb_exists(pod)


def test_crash_during_runtime_call_restores_the_runtime_view_too(agent, pods, node):
    """Killed after UpdateContainerResources went out, before its answer: the runtime holds the new
    values (its store, and the kernel once it finishes); recovery puts both back to the originals."""
    pod = pods.run("midcall", containers=[ContainerSpec("app", cpu_millicpu=500, memory_bytes=64 * MiB)])
    cid = pod.container_id()

    def runtime_view() -> tuple[int, int]:
        linux = node.client.container_status(cid, verbose=False).status.resources.linux
        return linux.cpu_quota, linux.memory_limit_in_bytes

    original = runtime_view()
    agent.apply("default", "midcall", cpu_millicpu=200, memory_bytes=48 * MiB, method=agent_pb2.METHOD_CRI)
    assert runtime_view() == (20000, 48 * MiB)
    agent.kill9()
    # The record as written before the call: intent only, nothing known to have reached the runtime.
    [path] = (agent.state_dir / "experiments").glob("*.json")
    record = json.loads(path.read_text())
    record.update(phase="applying", methods={}, cri_used=False, cri_intent=["cpu", "memory"])
    path.write_text(json.dumps(record))
    agent.start()
    assert runtime_view() == original == (50000, 64 * MiB)
    assert cpu_files(pod)[0] == "50000" and mem_files(pod)[0] == str(64 * MiB)
    assert agent.list() == [] and agent.records() == []


def test_crash_before_first_shaping_returned_leaves_no_ingress_qdisc(agent, pods):
    """Killed inside the first shaping: the record has no netshape snapshot yet, but says the veth
    had no ingress qdisc before; recovery removes the one the shaping had added, and the IFB."""
    pod = pods.run("midshape", containers=[ContainerSpec("app", cpu_millicpu=500)])
    agent.apply("default", "midshape", egress_bps=10_000_000)
    agent.kill9()
    [path] = (agent.state_dir / "experiments").glob("*.json")
    record = json.loads(path.read_text())
    veth = record["net"]["host_ifname"]

    def ingress_qdiscs() -> str:
        return subprocess.run(["tc", "qdisc", "show", "dev", veth, "ingress"], capture_output=True, text=True,
                              check=True).stdout.strip()

    assert ingress_qdiscs() and ifb_exists(pod)
    assert record["net"]["ingress_hook_before"] is False
    record.update(phase="applying", methods={})
    record["net"]["snapshot"] = None  # as written before the shaping
    path.write_text(json.dumps(record))
    agent.start()
    assert ingress_qdiscs() == "" and not ifb_exists(pod)
    assert agent.list() == [] and agent.records() == []


def test_start_removes_orphaned_ifbs_keeps_active_ones(agent, pods):
    pod = pods.run("ifbs", containers=[ContainerSpec("app", cpu_millicpu=500)])
    agent.apply("default", "ifbs", egress_bps=10_000_000)
    orphan = ifb_name(f"gone-pod-{os.getpid()}")  # what a pod deleted while its state was lost leaves
    subprocess.run(["ip", "link", "add", orphan, "type", "ifb"], check=True)
    try:
        agent.kill9()
        agent.start()
        assert not os.path.exists(f"/sys/class/net/{orphan}")
        assert ifb_exists(pod) and agent.list()
    finally:
        subprocess.run(["ip", "link", "del", orphan], check=False, capture_output=True)
    agent.revert("default", "ifbs")
    assert not ifb_exists(pod)


# ---------------------------------------------------------------- drift, restarts, deleted pods


def test_container_removed_before_its_next_attempt_keeps_the_experiment(agent, pods):
    """Drift passes while the pod runs with no container of that name (removed, the next attempt not
    yet created) neither end the experiment nor leave the raised pod cgroup behind: the next attempt
    gets the experiment, and the reset puts every level back."""
    pod = pods.run("gap", containers=[ContainerSpec("app", cpu_millicpu=500, memory_bytes=64 * MiB)])
    agent.apply("default", "gap", cpu_millicpu=800, memory_bytes=96 * MiB)  # above the pod's: raised first
    pod_quota = pod.cgroup_dirs["cpu"] / "cpu.cfs_quota_us"
    assert read(pod_quota) == "80000"
    new_id = pod.restart_container(gap_s=4 * agent.drift_interval_s)
    assert wait_until(lambda: cpu_files(pod)[0] == "80000", 5)
    assert read(pod_quota) == "80000" and mem_files(pod)[0] == str(96 * MiB)
    [exp] = agent.list()
    assert exp.target.container_id == new_id
    agent.revert("default", "gap")
    assert cpu_files(pod) == ("50000", "50000") and mem_files(pod)[0] == str(64 * MiB)


def test_reset_while_the_container_is_between_attempts_is_exact(agent, pods):
    """A reset that comes while the pod has no container of that name (the old one removed, the next
    not yet created): the pod cgroup goes back at once, the experiment ends, and the next attempt
    starts with the pod's own limits."""
    pod = pods.run("between", containers=[ContainerSpec("app", cpu_millicpu=500, memory_bytes=64 * MiB)])
    agent.apply("default", "between", cpu_millicpu=800)
    pod_quota = pod.cgroup_dirs["cpu"] / "cpu.cfs_quota_us"
    assert read(pod_quota) == "80000"
    restart = threading.Thread(target=pod.restart_container, kwargs={"gap_s": 3.0})
    restart.start()
    try:
        assert wait_until(lambda: not pod.container_cgroup_dir("cpu").exists(), 5)
        resp = agent.revert("default", "between")
        assert read(pod_quota) == "50000", "the pod cgroup was left raised"
        assert agent.list() == [] and agent.records() == [], resp
    finally:
        restart.join()
    assert cpu_files(pod) == ("50000", "50000") and mem_files(pod)[0] == str(64 * MiB)
    time.sleep(3 * agent.drift_interval_s)  # drift passes find nothing to re-apply
    assert cpu_files(pod) == ("50000", "50000") and agent.list() == []


# ---------------------------------------------------------------- concurrency


def test_two_clients_on_one_container(agent, pods):
    pod = pods.run("race", containers=[ContainerSpec("app", cpu_millicpu=500)])
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda m: agent.apply("default", "race", cpu_millicpu=m), [200, 300, 400, 250]))
    finals = {values(r)[agent_pb2.RESOURCE_CPU][2] for r in results}
    assert finals == {200, 300, 400, 250}
    assert cpu_files(pod)[0] in {"20000", "30000", "40000", "25000"}
    [exp] = agent.list()
    assert exp.resources[0].original.value == 500  # every change kept the first snapshot
    agent.revert("default", "race")
    assert cpu_files(pod) == ("50000", "50000")


# ---------------------------------------------------------------- bad input over the raw API


@pytest.mark.parametrize(
    ("kwargs", "code", "words"),
    [
        ({"cpu_millicpu": 0}, grpc.StatusCode.INVALID_ARGUMENT, "cpu_millicpu 0 is out of range"),
        ({"cpu_millicpu": -5}, grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
        ({"cpu_millicpu": 2**62}, grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
        ({"cpu_millicpu": 5}, grpc.StatusCode.INVALID_ARGUMENT, "CFS quota"),
        ({"memory_bytes": 1}, grpc.StatusCode.INVALID_ARGUMENT, "memory_bytes 1 is out of range"),
        ({"ingress_bps": 10}, grpc.StatusCode.INVALID_ARGUMENT, "ingress_bps 10 is out of range"),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "no change asked for"),
        ({"pod": "nope", "cpu_millicpu": 100}, grpc.StatusCode.NOT_FOUND, "no pod default/nope"),
        ({"container": "zz", "cpu_millicpu": 100}, grpc.StatusCode.NOT_FOUND, "no container 'zz'"),
        ({"ns": "kube-system", "cpu_millicpu": 100}, grpc.StatusCode.PERMISSION_DENIED, "denied"),
        ({"pod": "../etc", "cpu_millicpu": 100}, grpc.StatusCode.INVALID_ARGUMENT, "not a valid name"),
        ({"method": 7, "cpu_millicpu": 100}, grpc.StatusCode.INVALID_ARGUMENT, "method 7 is not accepted"),
        ({"duration_s": -1.0, "cpu_millicpu": 100}, grpc.StatusCode.INVALID_ARGUMENT, "positive number of seconds"),
        ({"duration_s": float("inf"), "cpu_millicpu": 100}, grpc.StatusCode.INVALID_ARGUMENT, "positive number"),
    ],
)
def test_bad_requests_rejected_nothing_changed(agent, pods, kwargs, code, words):
    pod = pods.run("bad", containers=[ContainerSpec("app", cpu_millicpu=500, memory_bytes=64 * MiB)])
    before = (cpu_files(pod), mem_files(pod))
    ns, name, container = kwargs.pop("ns", "default"), kwargs.pop("pod", "bad"), kwargs.pop("container", "")
    with pytest.raises(grpc.RpcError) as err:
        agent.apply(ns, name, container, **kwargs)
    assert err.value.code() == code, err.value.details()
    assert words in err.value.details()
    assert (cpu_files(pod), mem_files(pod)) == before
    assert agent.records() == [] and agent.serving()


def test_garbage_bytes_and_missing_target(agent, pods):
    pods.run("junk", containers=[ContainerSpec("app", cpu_millicpu=500)])
    raw = agent.channel.unary_unary("/kubectl_chaos.agent.v1.Agent/Apply", request_serializer=None,
                                    response_deserializer=None)
    for junk in (b"\xff\xff\xff\xff", b"\x0a\x05\x0a\x03", b"\x12\x02\x08"):  # bad tags, truncated, wrong wire type
        with pytest.raises(grpc.RpcError) as err:
            raw(junk, timeout=5)
        assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(grpc.RpcError) as err:
        agent.stub.Apply(agent_pb2.ApplyRequest(changes=agent_pb2.Changes(cpu_millicpu=100)), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "target is missing" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        agent.stub.Revert(agent_pb2.RevertRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert agent.serving() and agent.records() == []


def test_dry_run_changes_nothing(agent, pods):
    pod = pods.run("dry", containers=[ContainerSpec("app", cpu_millicpu=500)])
    resp = agent.apply("default", "dry", cpu_millicpu=200, dry_run=True)
    assert resp.dry_run and values(resp)[agent_pb2.RESOURCE_CPU][:2] == (500, 200)
    assert cpu_files(pod) == ("50000", "50000") and agent.records() == []


# ---------------------------------------------------------------- the process itself


def test_socket_mode_stale_socket_and_tcp_without_tls(agent, node):
    assert stat.S_IMODE(os.stat(agent.socket).st_mode) == 0o600
    agent.kill9()  # leaves the socket file behind
    assert agent.socket.exists()
    agent.start()  # starts over it
    assert agent.serving()
    res = subprocess.run([sys.executable, "-m", "daemonset.agent", "--listen", "127.0.0.1:7777"], cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "needs --tls-cert" in res.stderr
    # A second agent on the same socket is refused, the first keeps serving.
    second = subprocess.run([sys.executable, "-m", "daemonset.agent", "--cri-endpoint", str(node.socket), "--listen",
                             agent.address, "--state-dir", str(agent.workdir / "state2")], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 1 and "another process is serving" in second.stderr
    # ... and one on the same state directory would undo the first one's experiments: refused too.
    third = subprocess.run([sys.executable, "-m", "daemonset.agent", "--cri-endpoint", str(node.socket), "--listen",
                            f"unix://{agent.workdir}/third.sock", "--state-dir", str(agent.state_dir)], cwd=REPO,
                           capture_output=True, text=True, timeout=30)
    assert third.returncode == 1 and "another chaos-agent is using the state directory" in third.stderr
    assert agent.serving()


def test_metrics_exposed(agent, pods):
    pod = pods.run("met", containers=[ContainerSpec("app", cpu_millicpu=500)])
    agent.apply("default", "met", cpu_millicpu=200)
    text = agent.metrics()
    assert "chaos_agent_active_experiments 1.0" in text
    assert 'chaos_agent_applies_total{method="cri",resource="cpu"} 1.0' in text
    assert "chaos_agent_apply_latency_seconds_bucket" in text
    # The runtime's own time, per CRI method: the one UpdateContainerResources of this apply, answered
    # in more than 0 and less than the whole apply took.
    calls = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
             if line.startswith("chaos_agent_runtime_call_seconds_") and 'method="UpdateContainerResources"' in line}
    assert calls['chaos_agent_runtime_call_seconds_count{method="UpdateContainerResources"}'] == 1.0, calls
    update_s = calls['chaos_agent_runtime_call_seconds_sum{method="UpdateContainerResources"}']
    apply_s = float(next(line.split(" ")[1] for line in text.splitlines()
                         if line.startswith("chaos_agent_apply_latency_seconds_sum")))
    assert 0 < update_s < apply_s, (update_s, apply_s)
    agent.revert("default", "met")
    assert "chaos_agent_active_experiments 0.0" in agent.metrics()
    agent.apply("default", "met", cpu_millicpu=200, duration_s=0.3)
    assert wait_until(lambda: 'chaos_agent_reverts_total{reason="expired"} 1.0' in agent.metrics(), 3)
    # A limit set back by someone else and corrected (tests/node/test_limits_both_nodes.py) is counted.
    agent.apply("default", "met", cpu_millicpu=300, method=agent_pb2.METHOD_CGROUP)
    (pod.container_cgroup_dir("cpu") / "cpu.cfs_quota_us").write_text("50000")
    assert wait_until(lambda: "chaos_agent_drift_corrections_total{" in agent.metrics(), 5)
