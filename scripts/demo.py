"""The demo (``make demo``, as root): a throwaway containerd node, a demo pod, a chaos-agent, and
kubectl-chaos lowering CPU, lowering memory, limiting bandwidth both ways and resetting, with the
measured CPU use, the limits in force and the measured throughput before and after each step.

Everything it starts is torn down at the end (also on Ctrl-C): pods, containerd, the agent, the
network devices and cgroups it made.

``--node v1`` (``make demo``, the default): the node is a private containerd on this machine
(cgroup v1, runc), ready in seconds. ``--node v2`` (``make demo-v2``): the cgroup v2 worker node VM
of the tests (tests/support/v2node.py: systemd, containerd 2.x, runc or crun, QEMU TCG; about a
minute to boot); the agent runs inside it, kubectl-chaos runs here and reaches it through a unix
socket relayed to the VM's agent socket, and the pod's figures are measured inside the VM.
"""

from __future__ import annotations

import argparse
import contextlib
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

REPO = pathlib.Path(__file__).resolve().parents[1]
NAMESPACE = "demo"
POD = "shop"
CONTAINER = "app"
MiB = 2**20
MEASURE_S = 2
# One busy thread, 1 CPU and 128Mi allowed, 48Mi of it in use (tmpfs, not reclaimable).
POD_ARGV = ("sh", "-c", "head -c 50331648 /dev/zero > /dev/shm/ballast; while :; do :; done")
POD_MILLICPU = 1000
POD_MEMORY_BYTES = 128 * MiB


def say(text: str = "") -> None:
    print(text, flush=True)


def step(title: str) -> None:
    say()
    say(f"== {title}")


def read(path: pathlib.Path) -> str:
    return path.read_text().strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iperf3_bps(server_prefix: list[str], ip: str, into_pod: bool) -> float:
    """iperf3's received rate, node -> pod (``into_pod``) or pod -> node (``-R``), server in the pod."""
    port = free_port()
    server = subprocess.Popen([*server_prefix, "iperf3", "-s", "-1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        argv = ["iperf3", "-c", ip, "-p", str(port), "-t", str(MEASURE_S), "-J"] + ([] if into_pod else ["-R"])
        for _ in range(25):
            res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            try:
                received = json.loads(res.stdout).get("end", {}).get("sum_received")
            except ValueError:
                received = None
            if res.returncode == 0 and received:
                return received["bits_per_second"]
            time.sleep(0.2)
        return float("nan")
    finally:
        server.kill()
        server.wait()


class HostNode:
    """A private containerd on this machine (cgroup v1, runc) with the agent as a local process."""

    def __init__(self) -> None:
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="kcx-demo-", dir="/tmp"))
        self.node = None
        self.pod = None
        self.agent: subprocess.Popen | None = None
        self.address = f"unix://{self.workdir}/agent.sock"

    def start(self) -> None:
        from tests.support.node import ContainerSpec, TestNode

        step("Starting a throwaway containerd node and a demo pod")
        self.node = TestNode(self.workdir / "node").start()
        self.pod = self.node.run_pod(POD, NAMESPACE, [ContainerSpec(CONTAINER, argv=POD_ARGV, cpu_millicpu=POD_MILLICPU,
                                                                    memory_bytes=POD_MEMORY_BYTES)])
        say(f"pod {NAMESPACE}/{POD} (container {CONTAINER}) runs at {self.pod.ip}; limits cpu 1000m, memory 128Mi")

        step("Starting chaos-agent")
        log = open(self.workdir / "agent.log", "wb")  # noqa: SIM115 - lives as long as the agent
        self.agent = subprocess.Popen(
            [sys.executable, "-m", "daemonset.agent", "--cri-endpoint", str(self.node.socket), "--listen", self.address,
             "--state-dir", str(self.workdir / "state"), "--node-name", "demo-node"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        sock = self.workdir / "agent.sock"
        deadline = time.monotonic() + 20
        while not sock.exists():
            if self.agent.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"chaos-agent did not start; its log:\n{(self.workdir / 'agent.log').read_text()}")
            time.sleep(0.05)
        say(f"chaos-agent serves {self.address}")

    def stop(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            try:
                self.agent.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.agent.kill()
        if self.node is not None:
            problems = self.node.stop()
            if problems:
                say(f"clean-up left: {problems}")
        shutil.rmtree(self.workdir, ignore_errors=True)

    def cpu_used(self) -> float:
        f = self.pod.container_cgroup_dir("cpuacct") / "cpuacct.usage"
        t0, u0 = time.monotonic(), int(read(f))
        time.sleep(MEASURE_S)
        return (int(read(f)) - u0) / 1e9 / (time.monotonic() - t0)

    def limits(self) -> str:
        cpu = self.pod.container_cgroup_dir("cpu")
        quota, period = int(read(cpu / "cpu.cfs_quota_us")), int(read(cpu / "cpu.cfs_period_us"))
        mem = self.pod.container_cgroup_dir("memory")
        limit, usage = int(read(mem / "memory.limit_in_bytes")), int(read(mem / "memory.usage_in_bytes"))
        cpu_text = "unlimited" if quota < 0 else f"{quota * 1000 // period}m (cfs_quota_us={quota})"
        return f"limit in force: cpu {cpu_text}, memory {limit / MiB:.0f}Mi (using {usage / MiB:.0f}Mi)"

    def throughput_bps(self, into_pod: bool) -> float:
        return iperf3_bps(["nsenter", f"--net={self.pod.netns_path}"], self.pod.ip, into_pod)


class UnixRelay:
    """A unix socket here (0600) whose connections are relayed to ``host:port`` (the VM's agent socket)."""

    def __init__(self, path: pathlib.Path, host: str, port: int):
        self.path, self.target = path, (host, port)
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        os.chmod(path, 0o600)
        self.server.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                conn.close()
                continue
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()


class V2VmNode:
    """The cgroup v2 worker node VM (systemd, containerd 2.x), the agent inside, reached through a relay."""

    def __init__(self, runtime: str = "runc") -> None:
        self.runtime = runtime
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="kcx-demo-v2-", dir="/tmp"))
        self.address = f"unix://{self.workdir}/agent.sock"
        self.vm = None
        self.pod: dict = {}
        self.relay: UnixRelay | None = None

    def start(self) -> None:
        from tests.support.v2node import V2Node

        step("Booting the cgroup v2 worker node VM (QEMU TCG: about a minute)")
        self.vm = V2Node()
        self.vm.boot()
        say("node: " + "; ".join(self.vm.versions))
        self.pod = self.vm.call("run_pod", name=POD, namespace=NAMESPACE, runtime="" if self.runtime == "runc" else self.runtime,
                                containers=[{"name": CONTAINER, "argv": list(POD_ARGV), "cpu_millicpu": POD_MILLICPU,
                                             "memory_bytes": POD_MEMORY_BYTES}])
        say(f"pod {NAMESPACE}/{POD} (container {CONTAINER}, {self.runtime}) runs at {self.pod['ip']}; "
            f"limits cpu 1000m, memory 128Mi; pod slice {self.pod['slice']}")

        step("Starting chaos-agent on the node")
        started = self.vm.call("agent_start", wait_s=240, timeout_s=180, drift_interval_s=3.0)
        host, port = self.vm.agent_address.rsplit(":", 1)
        self.relay = UnixRelay(self.workdir / "agent.sock", host, int(port))
        say(f"chaos-agent serves unix:///run/kcx/agent.sock in the VM (started in {started['start_s']:.0f} s); "
            f"relayed here as {self.address}")

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.close()
        if self.vm is not None:
            with contextlib.suppress(Exception):
                self.vm.call("delete_all")
            self.vm.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def _scope(self) -> str:
        return self.pod["cgroups"][CONTAINER]["container"]

    def cpu_used(self) -> float:
        return self.vm.call("cpu_used", cgroup_dir=self._scope, seconds=MEASURE_S)["cpus"]

    def limits(self) -> str:
        names = ("cpu.max", "memory.max", "memory.current")
        got = self.vm.read(*(f"{self._scope}/{n}" for n in names))
        cpu_max, limit, usage = (got[f"{self._scope}/{n}"] for n in names)
        quota, period = cpu_max.split()
        cpu_text = "unlimited" if quota == "max" else f"{int(quota) * 1000 // int(period)}m (cpu.max={cpu_max})"
        mem_text = "unlimited" if limit == "max" else f"{int(limit) / MiB:.0f}Mi"
        return f"limit in force: cpu {cpu_text}, memory {mem_text} (using {int(usage) / MiB:.0f}Mi)"

    def throughput_bps(self, into_pod: bool) -> float:
        return self.vm.call("iperf", netns=self.pod["netns"], ip=self.pod["ip"], into_pod=into_pod,
                            seconds=MEASURE_S)["bps"]


class Demo:
    def __init__(self, node: HostNode | V2VmNode) -> None:
        self.node = node
        self.address = node.address

    def measure(self, *, cpu: bool = True, net: bool = False) -> None:
        parts = []
        if cpu:
            parts.append(f"measured CPU use {self.node.cpu_used():.2f} CPU")
        say("   " + "; ".join(parts + [self.node.limits()]))
        if net:
            into, out = self.node.throughput_bps(True), self.node.throughput_bps(False)
            say(f"   measured throughput: into the pod {into / 1e6:.1f} Mbit/s, out of the pod {out / 1e6:.1f} Mbit/s")

    # -- acting --

    def chaos(self, *args: str, refused: bool = False) -> None:
        exe = shutil.which("kubectl-chaos")
        argv = [exe] if exe else [sys.executable, "-m", "plugin.cli"]
        argv += ["--agent-address", self.address, "-n", NAMESPACE, POD, "-c", CONTAINER, *args]
        say("$ kubectl-chaos " + " ".join(argv[argv.index("--agent-address"):]))
        res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
        for line in (res.stdout + res.stderr).splitlines():
            say("   " + line)
        if (res.returncode != 0) != refused:
            raise SystemExit(f"kubectl-chaos exited with {res.returncode}")
        if refused:
            say(f"   (exit status {res.returncode}: refused, as it should be)")

    def run(self) -> None:
        step("Before: the pod as the kubelet set it up")
        self.measure(net=True)
        step("1. Lower CPU to 250m")
        self.chaos("--set-cpu=250m")
        self.measure()
        step("2. Lower memory to 64Mi (above the 48Mi in use; below that the agent refuses)")
        self.chaos("--set-memory=64Mi")
        self.measure(cpu=False)
        step("2b. Memory below the 48Mi in use: refused, nothing changes")
        self.chaos("--set-memory=32Mi", refused=True)
        self.measure(cpu=False)
        step("3. Limit bandwidth to 20Mbit/s both ways")
        self.chaos("--set-bandwidth=20Mbit", "--direction=both")
        self.measure(cpu=False, net=True)
        step("4. Reset: every original back")
        self.chaos("--reset")
        self.measure(net=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", choices=("v1", "v2"), default="v1",
                        help="v1: a containerd node on this machine (default); v2: the cgroup v2 worker node VM")
    parser.add_argument("--runtime", choices=("runc", "crun"), default="runc", help="v2 only: the pod's runtime handler")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        say("the demo runs containerd, cgroups and network namespaces: run it as root (sudo make demo)")
        return 1
    for binary in ("containerd", "runc", "iperf3", "nsenter") if args.node == "v1" else ():
        if shutil.which(binary) is None:
            say(f"{binary} is missing: run `make setup` first (make demo does)")
            return 1
    sys.path.insert(0, str(REPO))  # tests.support provides the throwaway nodes
    if args.node == "v2":
        from tests.support.v2node import missing_prerequisites

        missing = missing_prerequisites()
        if missing:
            say(f"missing for the v2 node: {'; '.join(missing)}: run `make setup` first (make demo-v2 does)")
            return 1
    node = HostNode() if args.node == "v1" else V2VmNode(args.runtime)
    demo = Demo(node)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        node.start()
        demo.run()
        say()
        say("Done. Cleaning up.")
        return 0
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        node.stop()


if __name__ == "__main__":
    raise SystemExit(main())
