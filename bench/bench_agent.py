"""chaos-agent figures on a throwaway containerd node (root), all measured in one run:

1. Apply latency through the agent, CPU via CRI and CPU via cgroup (p50, p99), beside a bare CRI
   UpdateContainerResources call and a bare cgroup write. Goals: the CRI path's own share (its p50
   minus the bare call's p50) at most 1.0 ms, about 1.2x at today's runtime speed; cgroup path p50
   under 3 ms.
2. kubectl-chaos end to end in node-local mode, process start to exit. Goal: p50 under 500 ms.
3. 100 containers changed at once (100 concurrent Apply calls). Goal: all applied within 5 s.
4. Agent memory (RSS) idle and with 100 active experiments. Goal: under 80 MiB.

Beside (1), not a goal: the floor under the own share. A stand-in for the agent (a Python gRPC
server of its own, the agent's API and server shape, whose Apply makes the runtime call and
nothing else: no engine, no record, no read-back) is timed the same way against the bare call, in
the same run: its own share is what Python gRPC on both ends costs before the agent does any work.

    .venv/bin/python bench/bench_agent.py [--samples 200] [--json out.json]
    .venv/bin/python bench/bench_agent.py --node v2 [--runtime runc|crun|both] [--samples 100]

``--node v1`` (default): the host node (cgroup v1, containerd 1.6, runc). ``--node v2``: the cgroup
v2 worker node VM (tests/support/v2node.py: systemd, containerd 2.x, runc and crun under QEMU
TCG); the agent runs inside it and the series (1) are timed there, each beside the bare CRI call
and the bare cpu.max write on the same node in the same run, then the stand-in beside the bare
call, plus the agent's idle RSS. (2) and (3) run on the host node only: 100 pods take minutes to
start under TCG and a process start measures TCG. Under TCG every time is several times the
host's, so the ratios and the own share are what compare; the goals are the same and a miss is
reported as one.

Exits 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from cri_api import merge_resources  # noqa: E402
from daemonset.api.gen import agent_pb2, agent_pb2_grpc  # noqa: E402

if TYPE_CHECKING:
    from tests.support.node import TestNode

MiB = 2**20
# Series names, the same on both nodes.
BARE_CRI = "bare CRI UpdateContainerResources"
AGENT_CRI = "agent Apply, CPU via CRI"
AGENT_CRI_RUNTIME = "  its runtime calls, as the agent timed them (mean)"
BARE_CGROUP = "bare cgroup write"
AGENT_CGROUP = "agent Apply, CPU via cgroup"
BARE_CRI_BESIDE_ENGINE = "bare CRI call (beside the engine)"
ENGINE_CRI = "Engine.apply in this process, CPU via CRI"
BARE_CRI_BESIDE_STAND_IN = "bare CRI call (beside the stand-in)"
STAND_IN_CRI = "stand-in Apply: runtime call only, no engine"
# The two quotas alternated (millicpu) on a 500m container: never above it, so no pod-level raise.
VALUES_MILLICPU = (200, 300)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def summary(name: str, values_s: list[float]) -> dict:
    ms = [v * 1000 for v in values_s]
    return {"name": name, "n": len(ms), "p50_ms": round(pct(ms, 50), 3), "p99_ms": round(pct(ms, 99), 3),
            "mean_ms": round(statistics.fmean(ms), 3)}


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class AgentClient:
    """The agent's gRPC API at ``address``, as a client on the same node sees it."""

    def __init__(self, address: str):
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.stub = agent_pb2_grpc.AgentStub(self.channel)

    def apply(self, pod: str, millicpu: int, method: int) -> None:
        self.stub.Apply(agent_pb2.ApplyRequest(target=agent_pb2.Target(namespace="bench", pod=pod),
                                               changes=agent_pb2.Changes(cpu_millicpu=millicpu), method=method),
                        timeout=60)

    def revert(self, pod: str) -> None:
        self.stub.Revert(agent_pb2.RevertRequest(target=agent_pb2.Target(namespace="bench", pod=pod)), timeout=60)

    def close(self) -> None:
        self.channel.close()


class AgentProcess(AgentClient):
    def __init__(self, node: TestNode, workdir: pathlib.Path, extra_args: tuple[str, ...] = ()):
        self.sock = workdir / "agent.sock"
        self.log = open(workdir / "agent.log", "wb")  # noqa: SIM115
        address = f"unix://{self.sock}"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.metrics_port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemonset.agent", "--cri-endpoint", str(node.socket), "--listen", address,
             "--state-dir", str(workdir / "state"), "--log-level", "WARNING",
             "--metrics-address", f"127.0.0.1:{self.metrics_port}", *extra_args],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        super().__init__(address)
        deadline = time.monotonic() + 30
        while True:
            try:
                health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit("chaos-agent did not start") from None
                time.sleep(0.05)

    def runtime_update_s(self) -> tuple[float, float]:
        """The agent's own timing of its UpdateContainerResources calls: (seconds in all, calls)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {"sum": 0.0, "count": 0.0}
        for line in text.splitlines():
            if line.startswith("chaos_agent_runtime_call_seconds_") and 'method="UpdateContainerResources"' in line:
                kind = line.split("{")[0].rsplit("_", 1)[1]
                if kind in out:
                    out[kind] = float(line.rsplit(" ", 1)[1])
        return out["sum"], out["count"]

    def stop(self) -> None:
        self.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class _StandInService(agent_pb2_grpc.AgentServicer):
    """The agent's Apply with nothing behind it but the runtime call (see the module docstring)."""

    def __init__(self, cri_endpoint: str, container_id: str):
        from cri_api import RuntimeClient

        self.client = RuntimeClient(cri_endpoint, timeout_s=30.0)
        self.container_id = container_id
        self.current = self.client.container_info(container_id).resources

    def Apply(self, request, context):  # noqa: N802
        self.client.update_container_resources(
            self.container_id, merge_resources(self.current, cpu_quota_us=request.changes.cpu_millicpu * 100))
        return agent_pb2.ApplyResponse()


def serve_stand_in(socket_path: str, cri_endpoint: str, container_id: str) -> None:
    """The stand-in's process: the agent's server shape (grpc.server, a thread pool of 32) on a unix
    socket; prints "ready" once it listens, serves until killed."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=32))
    agent_pb2_grpc.add_AgentServicer_to_server(_StandInService(cri_endpoint, container_id), server)
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


class StandIn(AgentClient):
    """The stand-in in a process of its own (as the agent is) on ``socket_path``, changing
    ``container_id`` through the runtime at ``cri_endpoint``."""

    def __init__(self, cri_endpoint: str, socket_path: pathlib.Path, container_id: str):
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-stand-in", str(socket_path), "--cri-endpoint",
                                      cri_endpoint, "--container-id", container_id],
                                     cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
        if self.proc.stdout is None or self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise SystemExit("bench_agent: the stand-in server did not start")
        super().__init__(f"unix://{socket_path}")

    def change(self, i: int) -> None:
        """The i-th change of a series (its pod name is not looked at: the stand-in knows its container)."""
        self.apply("standin", VALUES_MILLICPU[i % 2] + 50, agent_pb2.METHOD_CRI)

    def stop(self) -> None:
        self.close()
        self.proc.kill()
        self.proc.wait()


def write_quota(quota_file: str, quota_us: int) -> None:
    """The bare cgroup write: one write of the CPU quota (cpu.cfs_quota_us on v1, cpu.max on v2)."""
    value = f"{quota_us} 100000" if quota_file.endswith("cpu.max") else str(quota_us)
    fd = os.open(quota_file, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def interleaved(samples: int, bare: tuple[str, Callable[[int], object]],
                ours: tuple[str, Callable[[int], object]]) -> dict[str, list[float]]:
    """Seconds per call of ``bare`` and ``ours`` (name, call(sample index)), alternated call by call so
    both see the same machine."""
    out: dict[str, list[float]] = {bare[0]: [], ours[0]: []}
    for i in range(samples):
        for name, call in (bare, ours):
            t0 = time.perf_counter()
            call(i)
            out[name].append(time.perf_counter() - t0)
    return out


def beside_bare_cri(samples: int, client, bare_container_id: str, bare_name: str,
                    ours: tuple[str, Callable[[int], object]]) -> dict[str, list[float]]:
    """``ours`` interleaved with the bare CRI call (``client``, a cri_api.RuntimeClient) on the bare
    container ``bare_container_id``: the same code on the host node and inside the v2 VM."""
    current = client.container_info(bare_container_id).resources

    def bare_cri(i: int) -> None:
        client.update_container_resources(bare_container_id,
                                          merge_resources(current, cpu_quota_us=VALUES_MILLICPU[i % 2] * 100))

    return interleaved(samples, (bare_name, bare_cri), ours)


def latency_series(samples: int, client, bare_container_id: str, quota_file: str, agent: AgentClient,
                   pod: str, around_cri: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """The four series of (1) on one node, in seconds: ``client`` (cri_api.RuntimeClient) updates the
    bare container ``bare_container_id`` (whose CPU quota file is ``quota_file``); ``agent`` changes
    pod ``pod`` (namespace bench). The same code on the host node and inside the v2 VM."""
    # The two pairs run one after the other: right after a CRI call the runtime's runc processes are
    # still winding down, which would land on whatever is measured next.
    # ``around_cri`` is called before and after the CRI pair (the host node reads the agent's metrics).
    if around_cri is not None:
        around_cri()
    out = beside_bare_cri(samples, client, bare_container_id, BARE_CRI,
                          (AGENT_CRI, lambda i: agent.apply(pod, VALUES_MILLICPU[i % 2] + 50, agent_pb2.METHOD_CRI)))
    if around_cri is not None:
        around_cri()
    out |= interleaved(samples, (BARE_CGROUP, lambda i: write_quota(quota_file, VALUES_MILLICPU[i % 2] * 100 + 1000)),
                       (AGENT_CGROUP, lambda i: agent.apply(pod, VALUES_MILLICPU[i % 2] + 20, agent_pb2.METHOD_CGROUP)))
    agent.revert(pod)
    return out


def beside_a_bare_call(node: TestNode, samples: int, pod_name: str, names: tuple[str, str],
                       start: Callable[[object], tuple[Callable[[int], object], Callable[[], None]]]) -> list[dict]:
    """Not a goal, the split of the own share: ``start(pod)`` -> (call(i), stop()) changes pod
    ``pod_name``'s CPU limit, timed against the bare CRI call on a container of its own, interleaved
    as above; ``names`` = (the bare series', ours)."""
    from tests.support.node import ContainerSpec

    pod = node.run_pod(pod_name, "bench", [ContainerSpec("app", cpu_millicpu=500, memory_bytes=64 * MiB)])
    bare = node.run_pod(f"{pod_name}-bare", "bench", [ContainerSpec("app", cpu_millicpu=500, memory_bytes=64 * MiB)])
    stop = None
    try:
        call, stop = start(pod)
        series = beside_bare_cri(samples, node.client, bare.container_id(), names[0], (names[1], call))
    finally:
        if stop is not None:
            stop()
        node.delete_pod(pod)
        node.delete_pod(bare)
    return [summary(k, v) for k, v in series.items()]


def engine_series(node: TestNode, samples: int) -> list[dict]:
    """The engine without the gRPC server and its threads: ``Engine.apply`` called in this process."""
    from daemonset.engine import Engine
    from daemonset.metrics import Metrics
    from daemonset.types import ApplyRequest, Changes, Method, RevertRequest, Target

    def start(pod: object) -> tuple[Callable[[int], object], Callable[[], None]]:
        state = tempfile.mkdtemp(prefix="kcx-bench-engine-", dir="/tmp")
        engine = Engine(node.client, state_dir=state, metrics=Metrics(), sweep_orphan_ifbs=False)
        engine.start()
        target = Target(namespace="bench", pod="eng")

        def stop() -> None:
            try:
                engine.revert(RevertRequest(target=target))
            finally:
                engine.close()
                shutil.rmtree(state, ignore_errors=True)

        return (lambda i: engine.apply(ApplyRequest(target=target, method=Method.CRI, changes=Changes(
            cpu_millicpu=VALUES_MILLICPU[i % 2] + 50)))), stop

    return beside_a_bare_call(node, samples, "eng", (BARE_CRI_BESIDE_ENGINE, ENGINE_CRI), start)


def stand_in_series(node: TestNode, workdir: pathlib.Path, samples: int) -> list[dict]:
    """The floor under the own share: the stand-in's Apply (see the module docstring)."""

    def start(pod) -> tuple[Callable[[int], object], Callable[[], None]]:
        stand_in = StandIn(str(node.socket), workdir / "stand-in.sock", pod.container_id())
        return stand_in.change, stand_in.stop

    return beside_a_bare_call(node, samples, "standin", (BARE_CRI_BESIDE_STAND_IN, STAND_IN_CRI), start)


def latency(node: TestNode, agent: AgentProcess, samples: int) -> list[dict]:
    from tests.support.node import ContainerSpec

    # The bare calls get a container of their own: on the agent's container they would count as
    # drift, and the agent would correct them in the middle of the measurement.
    pod = node.run_pod("lat", "bench", [ContainerSpec("app", cpu_millicpu=500, memory_bytes=64 * MiB)])
    bare = node.run_pod("bare", "bench", [ContainerSpec("app", cpu_millicpu=500, memory_bytes=64 * MiB)])
    readings: list[tuple[float, float]] = []
    series = latency_series(samples, node.client, bare.container_id(),
                            str(bare.container_cgroup_dir("cpu") / "cpu.cfs_quota_us"), agent, "lat",
                            around_cri=lambda: readings.append(agent.runtime_update_s()))
    node.delete_pod(pod)
    node.delete_pod(bare)
    rows = [summary(k, v) for k, v in series.items()]
    # The runtime's time inside the agent's own applies, as the agent timed each call
    # (chaos_agent_runtime_call_seconds): the same calls, not the bare ones beside them.
    (sum0, count0), (sum1, count1) = readings
    if count1 > count0:
        mean_ms = round((sum1 - sum0) / (count1 - count0) * 1000, 3)
        rows.append({"name": AGENT_CRI_RUNTIME, "n": int(count1 - count0), "p50_ms": mean_ms, "p99_ms": float("nan"),
                     "mean_ms": mean_ms})
    return rows


def own_share_ms(rows: list[dict], ours: str, bare: str) -> float:
    """Series ``ours``'s p50 minus series ``bare``'s (both in ``rows``), ms."""
    by = {r["name"]: r for r in rows}
    return by[ours]["p50_ms"] - by[bare]["p50_ms"]


STAND_IN_FLOOR = "the floor, the stand-in's own share (Python gRPC both ends, no engine)"


def latency_goals(lat: list[dict]) -> list[tuple[str, bool, str]]:
    by = {r["name"]: r for r in lat}
    ratio = by[AGENT_CRI]["p50_ms"] / by[BARE_CRI]["p50_ms"]
    # The agent's own share: its Apply (as a client sees it, gRPC included) minus the runtime's
    # call, both p50 of the same interleaved run.
    own_ms = own_share_ms(lat, AGENT_CRI, BARE_CRI)
    cg_ratio = by[AGENT_CGROUP]["p50_ms"] / by[BARE_CGROUP]["p50_ms"]
    same = ""
    if AGENT_CRI_RUNTIME in by:
        # The same applies' own runtime calls instead of the bare ones beside them (means: the agent's
        # histogram has sums, not single calls).
        same = (f"; against the runtime's time inside the same applies, means:"
                f" {by[AGENT_CRI]['mean_ms'] - by[AGENT_CRI_RUNTIME]['mean_ms']:.2f} ms")
    return [
        ("CRI path: the agent's own share p50 <= 1.0 ms", own_ms <= 1.0,
         f"{own_ms:.2f} ms ({ratio:.2f}x the bare call){same}"),
        ("cgroup path p50 < 3 ms", by[AGENT_CGROUP]["p50_ms"] < 3.0,
         f"{by[AGENT_CGROUP]['p50_ms']:.2f} ms ({cg_ratio:.0f}x the bare write)"),
    ]


def plugin_e2e(node: TestNode, agent: AgentProcess, samples: int) -> dict:
    from tests.support.node import ContainerSpec

    pod = node.run_pod("cli", "bench", [ContainerSpec("app", cpu_millicpu=500)])
    exe = shutil.which("kubectl-chaos") or str(REPO / ".venv/bin/kubectl-chaos")
    times = []
    for i in range(samples):
        t0 = time.perf_counter()
        res = subprocess.run([exe, "--agent-address", agent.address, "-n", "bench", "cli", f"--set-cpu={200 + i % 2 * 100}m"],
                             capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if res.returncode != 0:
            raise SystemExit(f"kubectl-chaos failed: {res.stderr}")
    agent.revert("cli")
    node.delete_pod(pod)
    return summary("kubectl-chaos --agent-address (process start to exit)", times)


def fan_out(node: TestNode, agent: AgentProcess, count: int) -> dict:
    from tests.support.node import ContainerSpec

    t0 = time.perf_counter()
    pods = [node.run_pod(f"p{i:03d}", "bench", [ContainerSpec("app", cpu_millicpu=500)]) for i in range(count)]
    started_s = time.perf_counter() - t0
    idle = rss_mib(agent.proc.pid)
    per_call: list[float] = []

    def one(i: int) -> None:
        t = time.perf_counter()
        agent.apply(f"p{i:03d}", 200, agent_pb2.METHOD_AUTO)
        per_call.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        list(pool.map(one, range(count)))
    wall_s = time.perf_counter() - t0
    wrong = [p.name for p in pods if (p.container_cgroup_dir("cpu") / "cpu.cfs_quota_us").read_text().strip() != "20000"]
    active = len(agent.stub.List(agent_pb2.ListRequest(), timeout=30).experiments)
    busy = rss_mib(agent.proc.pid)
    time.sleep(4)  # one drift round over 100 experiments
    after_drift = rss_mib(agent.proc.pid)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: agent.revert(f"p{i:03d}"), range(count)))
    for p in pods:
        node.delete_pod(p)
    return {"containers": count, "pods_started_s": round(started_s, 1), "all_applied_s": round(wall_s, 3),
            "per_call": summary(f"Apply under {count}-way fan-out", per_call), "not_applied": wrong, "active": active,
            "rss_idle_mib": round(idle, 1), "rss_100_active_mib": round(max(busy, after_drift), 1)}


def print_series(rows: list[dict]) -> None:
    print(f"{'series':<58} {'n':>5} {'p50 ms':>9} {'p99 ms':>9}")
    for r in rows:
        print(f"{r['name']:<58} {r['n']:>5} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f}")


def run_v1(args: argparse.Namespace) -> tuple[dict, list[tuple[str, bool, str]]]:
    """The host node: cgroup v1, containerd 1.6, runc; all four parts."""
    from tests.support.node import TestNode

    os.environ["PATH"] = f"{REPO / '.venv/bin'}:{os.environ['PATH']}"
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="kcx-bench-", dir="/tmp"))
    node = TestNode(workdir / "node").start()
    agent = None
    try:
        agent = AgentProcess(node, workdir)
        lat = latency(node, agent, args.samples)
        split = engine_series(node, args.samples)
        floor = stand_in_series(node, workdir, args.samples)
        cli = plugin_e2e(node, agent, args.cli_samples)
        fan = fan_out(node, agent, args.containers)
    finally:
        if agent is not None:
            agent.stop()
        node.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    goals = [
        *latency_goals(lat),
        ("plugin end to end p50 < 500 ms", cli["p50_ms"] < 500, f"{cli['p50_ms']:.0f} ms"),
        (f"{fan['containers']} containers applied within 5 s", fan["all_applied_s"] < 5 and not fan["not_applied"],
         f"{fan['all_applied_s']:.2f} s"),
        ("agent RSS < 80 MiB idle and with 100 active", max(fan["rss_idle_mib"], fan["rss_100_active_mib"]) < 80,
         f"{fan['rss_idle_mib']:.0f} / {fan['rss_100_active_mib']:.0f} MiB"),
    ]
    print_series([*lat, *split, *floor, cli, fan["per_call"]])
    print(f"(the split, not a goal: the engine's own share without gRPC, in this process:"
          f" {own_share_ms(split, ENGINE_CRI, BARE_CRI_BESIDE_ENGINE):.2f} ms;"
          f" {STAND_IN_FLOOR}: {own_share_ms(floor, STAND_IN_CRI, BARE_CRI_BESIDE_STAND_IN):.2f} ms)")
    return {"node": "v1", "latency": lat, "engine": split, "stand_in": floor, "plugin": cli, "fan_out": fan}, goals


def run_v2(args: argparse.Namespace) -> tuple[dict, list[tuple[str, bool, str]]]:
    """The cgroup v2 node VM: the latency series timed inside it, per runtime, and the agent's idle RSS."""
    from tests.support.v2node import V2Node

    runtimes = ["runc", "crun"] if args.runtime == "both" else [args.runtime]
    node = V2Node()
    t0 = time.monotonic()
    node.boot()
    try:
        # The agent as deployed: default drift interval, warnings only (the host bench's flags).
        started = node.call("agent_start", wait_s=240, timeout_s=180, drift_interval_s=3.0, log_level="WARNING")
        print(f"v2 node (QEMU TCG, {node.cpus} vCPUs): {'; '.join(node.versions)}")
        print(f"boot {node.timings_s['boot']:.0f} s, agent start {started['start_s']:.1f} s\n")
        out: dict = {"node": "v2", "versions": node.versions, "tcg": True, "runtimes": {}}
        goals: list[tuple[str, bool, str]] = []
        for runtime in runtimes:
            raw = node.call("bench_agent_latency", wait_s=120 + args.samples * 4, samples=args.samples,
                            runtime="" if runtime == "runc" else runtime)
            lat = [summary(k, v) for k, v in raw.items()]
            print(f"-- {runtime}")
            print_series(lat)
            print(f"(not a goal: {STAND_IN_FLOOR}: {own_share_ms(lat, STAND_IN_CRI, BARE_CRI_BESIDE_STAND_IN):.2f} ms)")
            out["runtimes"][runtime] = lat
            goals += [(f"[{runtime}] {name}", ok, figure) for name, ok, figure in latency_goals(lat)]
        rss = node.call("agent_rss")["rss_mib"]
        out["rss_idle_mib"] = round(rss, 1)
        goals.append(("agent RSS idle < 80 MiB", rss < 80, f"{rss:.0f} MiB"))
    finally:
        node.close()
    out["session_s"] = round(time.monotonic() - t0, 1)
    print(f"\n(v2 session {out['session_s']:.0f} s; plugin end to end and the 100-container fan-out: host node only)")
    return out, goals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--node", choices=("v1", "v2"), default="v1",
                   help="v1: the host node (default); v2: the cgroup v2 worker node VM")
    p.add_argument("--runtime", choices=("runc", "crun", "both"), default="both", help="v2 only: the runtime handler(s)")
    p.add_argument("--samples", type=int, default=None, help="per series (default 200 on v1, 100 on v2)")
    p.add_argument("--cli-samples", type=int, default=30)
    p.add_argument("--containers", type=int, default=100)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--serve-stand-in", metavar="SOCKET", help=argparse.SUPPRESS)
    p.add_argument("--cri-endpoint", help=argparse.SUPPRESS)
    p.add_argument("--container-id", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_stand_in:
        serve_stand_in(args.serve_stand_in, args.cri_endpoint, args.container_id)
        return 0
    if args.samples is None:
        args.samples = 200 if args.node == "v1" else 100
    if os.geteuid() != 0:
        print("bench_agent: needs root (a containerd node, cgroups)", file=sys.stderr)
        return 2
    result, goals = run_v1(args) if args.node == "v1" else run_v2(args)
    print()
    for name, ok, figure in goals:
        print(f"{'PASS' if ok else 'MISS'}  {name}: {figure}")
    if args.json:
        result["goals"] = [{"goal": g, "met": ok, "figure": f} for g, ok, f in goals]
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if all(ok for _, ok, _ in goals) else 1


if __name__ == "__main__":
    raise SystemExit(main())
