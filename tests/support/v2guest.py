"""The test driver inside the cgroup v2 node VM (tests/support/v2node.py boots it; systemd starts it).

It plays the kubelet and the node's shell for the tests on the host: one JSON object per line in,
one per line out, over TCP port 7000 (QEMU forwards a loopback port of the host to it). Pods are
made as a kubelet with ``--cgroup-driver=systemd`` makes them: a transient
``kubepods-burstable-pod<uid>.slice`` started over D-Bus with CPUQuota and MemoryMax the sums of
the containers' limits, then RunPodSandbox with that slice as cgroup parent and containers with
kubelet labels and the resources a 1.30+ kubelet sends on cgroup v2 (swap off: memory.swap.max 0).

It also relays containerd's socket (port 7001) and the agent's (7002) with socat, runs the agent
(``python3 -m daemonset.agent``) and measures CPU use and traffic where the pods are.

Runs on the guest's Python with the project and its wheels on PYTHONPATH (the project disk).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid

CONTAINERD_SOCK = "/run/containerd/containerd.sock"
AGENT_DIR = pathlib.Path("/run/kcx")
AGENT_SOCK = AGENT_DIR / "agent.sock"
AGENT_STATE = pathlib.Path("/var/lib/kcx/agent")
AGENT_LOG = pathlib.Path("/var/log/kcx-agent.log")
IMAGES_TAR = "/opt/kcx/images/images.tar"
CGROUP = pathlib.Path("/sys/fs/cgroup")
PERIOD_US = 100_000

LABEL_POD_NAME = "io.kubernetes.pod.name"
LABEL_POD_NAMESPACE = "io.kubernetes.pod.namespace"
LABEL_POD_UID = "io.kubernetes.pod.uid"
LABEL_CONTAINER_NAME = "io.kubernetes.container.name"

_pods: dict[str, dict] = {}
_agent: dict[str, subprocess.Popen] = {}
_relays: list[subprocess.Popen] = []
_lock = threading.Lock()
_client = None
_systemd = None


def cri():
    global _client
    if _client is None:
        from cri_api import RuntimeClient

        _client = RuntimeClient(CONTAINERD_SOCK, timeout_s=30.0)
    return _client


def systemd():
    global _systemd
    if _systemd is None:
        from daemonset.systemd import Systemd

        _systemd = Systemd()
    return _systemd


def sh(script: str, timeout_s: float = 60.0) -> dict:
    try:
        p = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=timeout_s)
        return {"stdout": p.stdout, "stderr": p.stderr, "rc": p.returncode}
    except subprocess.TimeoutExpired as e:
        return {"stdout": e.stdout or "", "stderr": (e.stderr or "") + "\ntimed out", "rc": -9}


# ---- kubelet arithmetic (pkg/kubelet/cm, runc's systemd driver) ----------------------------------


def quota_us(millicpu: int) -> int:
    return max(1000, millicpu * PERIOD_US // 1000)


def shares(millicpu: int) -> int:
    return max(2, millicpu * 1024 // 1000)


def weight_of_shares(cpu_shares: int) -> int:
    """CPUWeight a kubelet gives a slice (pkg/kubelet/cm CpuSharesToCPUWeight, the old linear formula)."""
    return 1 + ((cpu_shares - 2) * 9999) // 262142


def slice_name(uid: str) -> str:
    return f"kubepods-burstable-pod{uid.replace('-', '_')}.slice"


def slice_dir(uid: str) -> pathlib.Path:
    return CGROUP / "kubepods.slice" / "kubepods-burstable.slice" / slice_name(uid)


# ---- operations -----------------------------------------------------------------------------------


def op_ping() -> dict:
    return {"pid": os.getpid(), "python": sys.version.split()[0]}


def op_setup() -> dict:
    """Import the test images, relay containerd's and the agent's sockets, report the versions."""
    t0 = time.monotonic()
    deadline = time.monotonic() + 60
    while not os.path.exists(CONTAINERD_SOCK) and time.monotonic() < deadline:
        time.sleep(0.05)
    res = sh(f"ctr -n k8s.io images import --all-platforms {IMAGES_TAR}", 120)
    if res["rc"] != 0:
        raise RuntimeError(f"image import failed: {res['stderr']}")
    AGENT_DIR.mkdir(parents=True, exist_ok=True)
    for port, target in ((7001, CONTAINERD_SOCK), (7002, str(AGENT_SOCK))):
        _relays.append(subprocess.Popen(["socat", f"TCP-LISTEN:{port},fork,reuseaddr", f"UNIX-CONNECT:{target}"],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 60
    while True:
        try:
            ready = {c.type: c.status for c in cri().status(timeout_s=2.0).status.conditions}
            if ready.get("RuntimeReady") and ready.get("NetworkReady"):
                break
        except Exception:  # noqa: BLE001 - polled until the deadline
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)
    versions = sh("uname -r; systemctl --version | head -1; containerd --version; runc --version | head -1;"
                  " crun --version | head -1; python3 --version")["stdout"].splitlines()
    return {"versions": versions, "setup_s": time.monotonic() - t0,
            "cri": cri().version().runtime_version}


def _container_config(pod: dict, spec: dict, attempt: int):
    from cri_api.v1 import api_pb2

    res = api_pb2.LinuxContainerResources(cpu_period=PERIOD_US, cpu_shares=2, oom_score_adj=1000,
                                          unified={"memory.swap.max": "0"})
    if spec.get("cpu_millicpu") is not None:
        res.cpu_quota = quota_us(spec["cpu_millicpu"])
        res.cpu_shares = shares(spec["cpu_millicpu"])
        res.oom_score_adj = 999
    if spec.get("memory_bytes") is not None:
        res.memory_limit_in_bytes = spec["memory_bytes"]
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=spec["name"], attempt=attempt),
        image=api_pb2.ImageSpec(image=spec.get("image") or "localhost/kubectl-chaos/busybox:test"),
        command=list(spec.get("argv") or ["sleep", "3600"]),
        labels={LABEL_POD_NAME: pod["name"], LABEL_POD_NAMESPACE: pod["namespace"], LABEL_POD_UID: pod["uid"],
                LABEL_CONTAINER_NAME: spec["name"]},
        annotations={"io.kubernetes.container.restartCount": str(attempt)},
        log_path=f"{spec['name']}/{attempt}.log",
        linux=api_pb2.LinuxContainerConfig(
            resources=res,
            security_context=api_pb2.LinuxContainerSecurityContext(
                namespace_options=api_pb2.NamespaceOption(network=api_pb2.POD, pid=api_pb2.CONTAINER))),
    )


def _start_slice(uid: str, specs: list[dict]) -> str:
    """The pod slice as the kubelet's systemd driver starts it (StartTransientUnit over D-Bus)."""
    name = slice_name(uid)
    props = [("Description", ("s", f"libcontainer container {name}")),
             ("Wants", ("as", ["kubepods-burstable.slice"])),
             ("DefaultDependencies", ("b", False)),
             ("MemoryAccounting", ("b", True)), ("CPUAccounting", ("b", True)),
             ("IOAccounting", ("b", True)), ("TasksAccounting", ("b", True))]
    if all(s.get("cpu_millicpu") is not None for s in specs):
        total = sum(quota_us(s["cpu_millicpu"]) for s in specs)
        props.append(("CPUQuotaPerSecUSec", ("t", total * 1_000_000 // PERIOD_US)))
        props.append(("CPUWeight", ("t", weight_of_shares(sum(shares(s["cpu_millicpu"]) for s in specs)))))
    if all(s.get("memory_bytes") is not None for s in specs):
        props.append(("MemoryMax", ("t", sum(s["memory_bytes"] for s in specs))))
    systemd().call_manager("StartTransientUnit", "ssa(sv)a(sa(sv))", (name, "replace", props, []))
    deadline = time.monotonic() + 10
    while not slice_dir(uid).is_dir():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the slice {name} did not appear")
        time.sleep(0.02)
    return name


def op_run_pod(name: str, namespace: str = "default", containers: list[dict] | None = None,
               runtime: str = "", uid: str | None = None) -> dict:
    from cri_api.v1 import api_pb2

    t0 = time.monotonic()
    specs = containers or [{"name": "app"}]
    uid = uid or str(uuid.uuid4())
    parent = _start_slice(uid, specs)
    log_dir = f"/var/log/pods/{namespace}_{name}_{uid}"
    os.makedirs(log_dir, exist_ok=True)
    sandbox_config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
        hostname=name, log_directory=log_dir,
        labels={LABEL_POD_NAME: name, LABEL_POD_NAMESPACE: namespace, LABEL_POD_UID: uid},
        annotations={"kubernetes.io/config.source": "api"},
        linux=api_pb2.LinuxPodSandboxConfig(
            cgroup_parent=parent,
            security_context=api_pb2.LinuxSandboxSecurityContext(
                namespace_options=api_pb2.NamespaceOption(network=api_pb2.POD, pid=api_pb2.CONTAINER))),
    )
    sandbox_id = cri().run_pod_sandbox(sandbox_config, runtime_handler=runtime)
    pod = {"sandbox_id": sandbox_id, "name": name, "namespace": namespace, "uid": uid, "runtime": runtime,
           "slice": parent, "slice_dir": str(slice_dir(uid)), "specs": {s["name"]: s for s in specs},
           "containers": {}, "attempts": {}}
    _pods[sandbox_id] = pod
    pod["_config"] = sandbox_config
    status = cri().pod_sandbox_status(sandbox_id, verbose=True)
    pod["ip"] = status.status.network.ip
    info = json.loads(status.info.get("info", "{}") or "{}")
    pod["netns"] = next((n.get("path") for n in ((info.get("runtimeSpec") or {}).get("linux") or {}).get("namespaces", [])
                         if n.get("type") == "network"), None)
    for spec in specs:
        cid = cri().create_container(sandbox_id, _container_config(pod, spec, 0), sandbox_config)
        cri().start_container(cid)
        pod["containers"][spec["name"]] = cid
        pod["attempts"][spec["name"]] = 0
    pod["start_s"] = time.monotonic() - t0
    return _public(pod)


def _public(pod: dict) -> dict:
    out = {k: v for k, v in pod.items() if not k.startswith("_")}
    out["cgroups"] = {n: _cgroups(cid) for n, cid in pod["containers"].items()}
    return out


def _cgroups(container_id: str) -> dict:
    """The container's cgroup directories: scope, crun's container/ child (or None), pod slice."""
    import cgroupctl

    info = cri().container_info(container_id)
    cg = cgroupctl.locate(pid=info.pid, cgroups_path=info.cgroups_path)
    return {"container": cg.container.cpu, "inner": cg.inner.cpu if cg.inner else None,
            "pod": cg.pod.cpu if cg.pod else None, "pid": info.pid, "cgroups_path": info.cgroups_path}


def op_pod(sandbox_id: str) -> dict:
    return _public(_pods[sandbox_id])


def op_restart_container(sandbox_id: str, name: str) -> dict:
    pod = _pods[sandbox_id]
    old = pod["containers"][name]
    cri().stop_container(old, grace_s=0)
    cri().remove_container(old)
    attempt = pod["attempts"][name] + 1
    cid = cri().create_container(sandbox_id, _container_config(pod, pod["specs"][name], attempt), pod["_config"])
    cri().start_container(cid)
    pod["containers"][name], pod["attempts"][name] = cid, attempt
    return _public(pod)


def op_delete_pod(sandbox_id: str) -> dict:
    pod = _pods.pop(sandbox_id, None)
    errors = []
    for call in (cri().stop_pod_sandbox, cri().remove_pod_sandbox):
        try:
            call(sandbox_id, timeout_s=30.0)
        except Exception as e:  # noqa: BLE001 - collected
            errors.append(f"{call.__name__}: {e}")
    if pod is not None:
        try:
            systemd().call_manager("StopUnit", "ss", (pod["slice"], "replace"))
        except Exception as e:  # noqa: BLE001
            errors.append(f"StopUnit {pod['slice']}: {e}")
        deadline = time.monotonic() + 10
        while pathlib.Path(pod["slice_dir"]).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    return {"errors": errors}


def op_delete_all() -> dict:
    errors = []
    for sandbox_id in list(_pods):
        errors += op_delete_pod(sandbox_id)["errors"]
    return {"errors": errors}


def op_read(paths: list[str]) -> dict:
    out = {}
    for p in paths:
        try:
            out[p] = pathlib.Path(p).read_text().strip()
        except OSError:
            out[p] = None
    return out


def op_write(path: str, value: str) -> dict:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
    return {}


def _usage_us(cgroup_dir: str) -> int:
    for line in pathlib.Path(cgroup_dir, "cpu.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value)
    raise RuntimeError(f"no usage_usec in {cgroup_dir}/cpu.stat")


def op_cpu_used(cgroup_dir: str, seconds: float = 3.0) -> dict:
    """CPUs the cgroup used over ``seconds`` (cpu.stat usage_usec over the guest's monotonic clock)."""
    t0, u0 = time.monotonic(), _usage_us(cgroup_dir)
    time.sleep(seconds)
    return {"cpus": (_usage_us(cgroup_dir) - u0) / 1e6 / (time.monotonic() - t0)}


def op_agent_start(drift_interval_s: float = 0.5, timeout_s: float = 60.0, log_level: str | None = None) -> dict:
    """Start ``chaos-agent`` (the project as on the project disk) and wait for its socket."""
    t0 = time.monotonic()
    AGENT_STATE.mkdir(parents=True, exist_ok=True)
    AGENT_DIR.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "daemonset.agent", "--cri-endpoint", CONTAINERD_SOCK,
            "--listen", f"unix://{AGENT_SOCK}", "--state-dir", str(AGENT_STATE), "--node-name", "kcx-v2",
            "--drift-interval", str(drift_interval_s), "--log-format", "json"]
    if log_level is not None:
        argv += ["--log-level", log_level]
    with open(AGENT_LOG, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    _agent["proc"] = proc
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chaos-agent exited with {proc.returncode}: {op_agent_log()['tail']}")
        if AGENT_SOCK.exists():
            try:
                with grpc.insecure_channel(f"unix://{AGENT_SOCK}") as ch:
                    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return {"pid": proc.pid, "start_s": time.monotonic() - t0}
            except grpc.RpcError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"chaos-agent not serving within {timeout_s}s: {op_agent_log()['tail']}")


def op_agent_kill9() -> dict:
    proc = _agent.pop("proc", None)
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    return {}


def op_agent_stop(wipe: bool = False) -> dict:
    proc = _agent.pop("proc", None)
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if wipe:
        sh(f"rm -rf {AGENT_STATE}")
    return {}


def op_agent_log(lines: int = 40) -> dict:
    try:
        text = AGENT_LOG.read_text(errors="replace")
    except OSError:
        text = ""
    return {"tail": "\n".join(text.splitlines()[-lines:])}


def op_agent_rss() -> dict:
    """The running agent's resident memory (VmRSS), MiB."""
    proc = _agent["proc"]
    for line in pathlib.Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return {"rss_mib": int(line.split()[1]) / 1024}
    raise RuntimeError(f"no VmRSS for the agent (pid {proc.pid})")


def op_bench_agent_latency(samples: int, runtime: str = "") -> dict:
    """bench/bench_agent.py's latency series on this node: the agent's Apply (CRI and cgroup method)
    through its unix socket, each interleaved with the bare CRI call and the bare cpu.max write on a
    pod of its own, then the stand-in's Apply (the floor: the runtime call behind Python gRPC, no
    engine) beside the bare call; seconds per call, by series name."""
    from bench import bench_agent

    spec = {"name": "app", "cpu_millicpu": 500, "memory_bytes": 64 * 2**20}
    pod = op_run_pod("lat", "bench", [spec], runtime)
    bare = op_run_pod("bare", "bench", [spec], runtime)
    agent = bench_agent.AgentClient(f"unix://{AGENT_SOCK}")
    try:
        out = bench_agent.latency_series(samples, cri(), bare["containers"]["app"],
                                         f"{bare['cgroups']['app']['container']}/cpu.max", agent, "lat")
    finally:
        agent.close()
        op_delete_pod(pod["sandbox_id"])
    stand_in_pod = op_run_pod("standin", "bench", [spec], runtime)
    try:
        with tempfile.TemporaryDirectory(prefix="kcx-stand-in-") as work:
            stand_in = bench_agent.StandIn(CONTAINERD_SOCK, pathlib.Path(work) / "stand-in.sock",
                                           stand_in_pod["containers"]["app"])
            try:
                out |= bench_agent.beside_bare_cri(samples, cri(), bare["containers"]["app"],
                                                   bench_agent.BARE_CRI_BESIDE_STAND_IN,
                                                   (bench_agent.STAND_IN_CRI, stand_in.change))
            finally:
                stand_in.stop()
    finally:
        op_delete_pod(stand_in_pod["sandbox_id"])
        op_delete_pod(bare["sandbox_id"])
    return out


def op_goodput(netns: str, pod_ip: str, into_pod: bool, duration_s: float = 3.0, omit_s: float = 1.0) -> dict:
    """TCP goodput node -> pod (``into_pod``) or pod -> node in bit/s, as the host node's tests and
    bench_bandwidth measure it (tests/support/netns.py)."""
    from tests.support.netns import pod_goodput_bps

    return {"bps": pod_goodput_bps(netns, pod_ip, into_pod=into_pod, duration_s=duration_s, omit_s=omit_s)}


def op_records() -> dict:
    d = AGENT_STATE / "experiments"
    return {"records": [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.exists() else []}


def op_exec(container_id: str, argv: list[str], timeout_s: float = 30.0) -> dict:
    res = cri().exec_sync(container_id, argv, timeout_s)
    return {"rc": res.exit_code, "stdout": res.stdout.decode(errors="replace"), "stderr": res.stderr.decode(errors="replace")}


def op_container_state(container_id: str) -> dict:
    status = cri().container_status(container_id, verbose=False).status
    from cri_api.v1 import api_pb2

    return {"state": api_pb2.ContainerState.Name(status.state), "exit_code": status.exit_code,
            "reason": status.reason, "restart_count": status.metadata.attempt}


def op_sh(script: str, timeout_s: float = 60.0) -> dict:
    return sh(script, timeout_s)


def op_poweroff() -> dict:
    op_agent_stop()
    threading.Timer(0.2, lambda: subprocess.run(["systemctl", "poweroff", "--no-block"])).start()
    return {}


OPS = {name[3:]: fn for name, fn in globals().items() if name.startswith("op_")}


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
                fn = OPS[req.pop("op")]
                serial = req.pop("serial", True)
                if serial:
                    with _lock:
                        result = fn(**req)
                else:
                    result = fn(**req)
                reply = {"ok": True, "result": result}
            except Exception as e:  # noqa: BLE001 - every failure goes back to the host
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            self.wfile.write(json.dumps(reply).encode() + b"\n")
            self.wfile.flush()


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="0.0.0.0:7000")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    with _Server((host, int(port)), _Handler) as server:
        print(f"kcx-driver: listening on {args.listen}", flush=True)
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
