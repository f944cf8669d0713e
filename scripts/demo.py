"""The demo (``make demo``, as root): a throwaway containerd node, a demo pod, a chaos-agent, and
kubectl-chaos lowering CPU, lowering memory, limiting bandwidth both ways and resetting, with the
measured CPU use, the limits in force and the measured throughput before and after each step.

Everything it starts is torn down at the end (also on Ctrl-C): pods, containerd, the agent, the
network devices and cgroups it made.
"""

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
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
NAMESPACE = "demo"
POD = "shop"
CONTAINER = "app"
MiB = 2**20
MEASURE_S = 2


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


class Demo:
    def __init__(self) -> None:
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="kcx-demo-", dir="/tmp"))
        self.node = None
        self.pod = None
        self.agent: subprocess.Popen | None = None
        self.address = f"unix://{self.workdir}/agent.sock"

    # -- set-up --

    def start(self) -> None:
        from tests.support.node import ContainerSpec, TestNode

        step("Starting a throwaway containerd node and a demo pod")
        self.node = TestNode(self.workdir / "node").start()
        # One busy thread, 1 CPU and 128Mi allowed, 48Mi of it in use (tmpfs, not reclaimable).
        argv = ("sh", "-c", "head -c 50331648 /dev/zero > /dev/shm/ballast; while :; do :; done")
        self.pod = self.node.run_pod(POD, NAMESPACE, [ContainerSpec(CONTAINER, argv=argv, cpu_millicpu=1000,
                                                                    memory_bytes=128 * MiB)])
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

    # -- observing --

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
        port = free_port()
        server = subprocess.Popen(["nsenter", f"--net={self.pod.netns_path}", "iperf3", "-s", "-1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            argv = ["iperf3", "-c", self.pod.ip, "-p", str(port), "-t", str(MEASURE_S), "-J"] + ([] if into_pod else ["-R"])
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

    def measure(self, *, cpu: bool = True, net: bool = False) -> None:
        parts = []
        if cpu:
            parts.append(f"measured CPU use {self.cpu_used():.2f} CPU")
        say("   " + "; ".join(parts + [self.limits()]))
        if net:
            into, out = self.throughput_bps(True), self.throughput_bps(False)
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


def main() -> int:
    if os.geteuid() != 0:
        say("the demo runs containerd, cgroups and network namespaces: run it as root (sudo make demo)")
        return 1
    for binary in ("containerd", "runc", "iperf3", "nsenter"):
        if shutil.which(binary) is None:
            say(f"{binary} is missing: run `make setup` first (make demo does)")
            return 1
    sys.path.insert(0, str(REPO))  # tests.support.node provides the throwaway node
    demo = Demo()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        demo.start()
        demo.run()
        say()
        say("Done. Cleaning up.")
        return 0
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        demo.stop()


if __name__ == "__main__":
    raise SystemExit(main())
