"""cri_api.RuntimeClient against a real containerd (the session's TestNode), read back from cgroups."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from cri_api import (
    UNLIMITED,
    CallFailed,
    InvalidRequest,
    LinuxResources,
    NotFound,
    NotRunning,
    RuntimeClient,
    RuntimeUnreachable,
    Unimplemented,
)
from tests.support.node import CGROUP_ROOT, ContainerSpec, TestNode

MiB = 1 << 20


def _read(controller: str, cgroups_path: str, name: str) -> str:
    return (CGROUP_ROOT / controller / cgroups_path.lstrip("/") / name).read_text().strip()


def _gone(pid: int | str) -> bool:
    """Exited (a zombie counts: init here reaps orphans such as shims with some delay)."""
    try:
        return "\nState:\tZ" in pathlib.Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def _limits(cgroups_path: str) -> tuple[int, int, int, int]:
    return (
        int(_read("cpu", cgroups_path, "cpu.cfs_period_us")),
        int(_read("cpu", cgroups_path, "cpu.cfs_quota_us")),
        int(_read("memory", cgroups_path, "memory.limit_in_bytes")),
        int(_read("memory", cgroups_path, "memory.memsw.limit_in_bytes")),
    )


@pytest.fixture
def limited(pods):
    """One container with 500m CPU and 64 MiB, in its own namespace."""
    return pods.run("limited", "t-update", [ContainerSpec("app", cpu_millicpu=500, memory_bytes=64 * MiB)])


def test_version(node):
    version = node.client.version()
    assert (version.runtime_name, version.runtime_api_version) == ("containerd", "v1")
    assert version.runtime_version.startswith("1.")


def test_pod_has_kubelet_style_pod_cgroup_limits(pods):
    pod = pods.run("sums", "t-pod", [ContainerSpec("a", cpu_millicpu=300, memory_bytes=32 * MiB),
                                     ContainerSpec("b", cpu_millicpu=200, memory_bytes=16 * MiB)])  # fmt: skip
    assert (pod.cgroup_dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "50000"
    assert (pod.cgroup_dirs["memory"] / "memory.limit_in_bytes").read_text().strip() == str(48 * MiB)
    assert (pod.cgroup_dirs["memory"] / "memory.memsw.limit_in_bytes").read_text().strip() == str(48 * MiB)
    assert (pod.container_cgroup_dir("cpu", "a") / "cpu.cfs_quota_us").read_text().strip() == "30000"


def test_find_by_labels_follows_a_restart(node, pods):
    pod = pods.run("restarts", "t-find")
    first = node.client.find_container("t-find", "restarts")
    assert (first.id, first.attempt, first.name, first.pod_uid) == (pod.container_id(), 0, "app", pod.uid)
    new_id = pod.restart_container()
    second = node.client.find_container("t-find", "restarts", "app")
    assert (second.id, second.attempt, second.state) == (new_id, 1, "running")
    assert second.id != first.id


def test_find_errors_list_what_exists(node, pods):
    pods.run("two", "t-errors", [ContainerSpec("main"), ContainerSpec("sidecar")])
    client = node.client
    with pytest.raises(NotFound, match=r"no pod t-errors/nope on the runtime at unix://.*; pods in namespace t-errors: t-errors/two"):
        client.find_container("t-errors", "nope")
    with pytest.raises(NotFound, match=r"pod t-errors/two has 2 containers \(main, sidecar\): name the one to change"):
        client.find_container("t-errors", "two")
    with pytest.raises(NotFound, match=r"pod t-errors/two has no container 'web'; its containers: main, sidecar"):
        client.find_container("t-errors", "two", "web")
    with pytest.raises(NotFound, match=r"ContainerStatus: container 0123abc not found"):
        client.container_info("0123abc")


def test_an_exited_container_is_not_running(node, pods):
    pod = pods.run("done", "t-exited", [ContainerSpec("job", argv=("true",))])
    deadline = time.monotonic() + 10
    while node.client.container_info(pod.container_id()).state != "exited":
        assert time.monotonic() < deadline, "the container did not exit"
        time.sleep(0.05)
    with pytest.raises(NotRunning, match=r"container 'job' of pod t-exited/done is not running \(attempt 0 is exited"):
        node.client.find_container("t-exited", "done")
    with pytest.raises(NotRunning, match="is exited; only a running container's resources can be updated"):
        node.client.update_resources(pod.container_id(), cpu_quota_us=10_000)


def test_inspect_gives_pid_cgroups_path_and_resources(node, limited):
    info = node.client.container_info(limited.container_id())
    assert info.pid and pathlib.Path(f"/proc/{info.pid}/cmdline").read_bytes().split(b"\0")[0] == b"sleep"
    assert info.cgroups_path == f"{limited.cgroup_parent}/{info.id}"
    own = pathlib.Path(f"/proc/{info.pid}/cgroup").read_text()
    assert f"memory:{info.cgroups_path}\n" in own and f"cpu:{info.cgroups_path}\n" in own
    assert info.resources == LinuxResources(
        cpu_period_us=100_000, cpu_quota_us=50_000, cpu_shares=512,
        memory_limit_bytes=64 * MiB, memory_swap_limit_bytes=64 * MiB,
    )  # fmt: skip
    assert (info.pod_name, info.pod_namespace, info.sandbox_id) == ("limited", "t-update", limited.sandbox_id)


def test_update_changes_only_what_is_asked(node, limited):
    client, cid = node.client, limited.container_id()
    path = client.container_info(cid).cgroups_path
    assert _limits(path) == (100_000, 50_000, 64 * MiB, 64 * MiB)

    sent = client.update_resources(cid, cpu_quota_us=20_000)
    assert (sent.cpu_quota_us, sent.memory_limit_bytes, sent.cpu_shares) == (20_000, 64 * MiB, 512)
    assert _limits(path) == (100_000, 20_000, 64 * MiB, 64 * MiB)

    client.update_resources(cid, memory_limit_bytes=48 * MiB)  # memsw follows: they were equal
    assert _limits(path) == (100_000, 20_000, 48 * MiB, 48 * MiB)
    assert _read("cpu", path, "cpu.shares") == "512"

    after = client.container_info(cid).resources
    assert (after.cpu_quota_us, after.memory_limit_bytes, after.memory_swap_limit_bytes) == (20_000, 48 * MiB, 48 * MiB)

    client.update_resources(cid, cpu_quota_us=50_000, memory_limit_bytes=64 * MiB)  # back to the spec
    assert _limits(path) == (100_000, 50_000, 64 * MiB, 64 * MiB)


def test_unlimited_cpu_quota(node, limited):
    cid = limited.container_id()
    node.client.update_resources(cid, cpu_quota_us=UNLIMITED)
    path = node.client.container_info(cid).cgroups_path
    assert _read("cpu", path, "cpu.cfs_quota_us") == "-1"
    assert _read("memory", path, "memory.limit_in_bytes") == str(64 * MiB)


def test_zero_is_refused_and_nothing_changes(node, limited):
    cid = limited.container_id()
    path = node.client.container_info(cid).cgroups_path
    with pytest.raises(InvalidRequest, match=r"cpu_quota_us=0 is not accepted"):
        node.client.update_resources(cid, cpu_quota_us=0)
    with pytest.raises(InvalidRequest, match=r"memory_limit_bytes=0 is not accepted"):
        node.client.update_resources(cid, memory_limit_bytes=0)
    assert _limits(path) == (100_000, 50_000, 64 * MiB, 64 * MiB)


def test_quota_above_the_pod_cgroup_fails_with_the_runtime_message(node, limited):
    # v1: a child's cfs_quota_us above its parent's is EINVAL; the pod cgroup holds 50000.
    cid = limited.container_id()
    path = node.client.container_info(cid).cgroups_path
    with pytest.raises(CallFailed, match=r"UpdateContainerResources .* failed at .*cpu.cfs_quota_us: invalid argument") as err:
        node.client.update_resources(cid, cpu_quota_us=80_000)
    assert err.value.code == "UNKNOWN"
    assert _limits(path) == (100_000, 50_000, 64 * MiB, 64 * MiB)


def test_exec_sync_returns_exit_code_and_output(node, pods):
    pod = pods.run("exec", "t-exec")
    result = node.client.exec_sync(pod.container_id(), ["sh", "-c", "echo out; echo err >&2; exit 7"], timeout_s=10)
    assert (result.exit_code, result.stdout, result.stderr) == (7, b"out\n", b"err\n")


def test_unreachable_endpoint_names_the_socket(node):
    missing = node.workdir / "no-such.sock"
    with RuntimeClient(str(missing), timeout_s=2) as client:
        with pytest.raises(RuntimeUnreachable, match=rf"container runtime at unix://{missing} is unreachable during Version.*is a runtime listening on {missing}\?"):
            client.version()


def test_pod_ip_is_reachable_from_the_host(pods):
    pod = pods.run("web", "t-net", [ContainerSpec("httpd", argv=("httpd", "-f", "-p", "8080", "-h", "/etc"))])
    assert pod.ip and pod.ip.startswith("10.88.") and pod.netns_path and os.path.exists(pod.netns_path)
    deadline, last = time.monotonic() + 10, None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{pod.ip}:8080/passwd", timeout=2) as resp:
                assert b"root:x:0:0" in resp.read()
                return
        except OSError as err:
            last = err
            time.sleep(0.1)
    pytest.fail(f"http://{pod.ip}:8080/passwd not reachable from the host: {last}")


def test_host_network_pod_shares_the_host_netns(node, pods):
    pod = pods.run("hostnet", "t-net", host_network=True)
    pid = node.client.container_info(pod.container_id()).pid
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino


def test_teardown_leaves_nothing_behind():
    with TestNode() as extra:
        pod = extra.run_pod("leftover", containers=[ContainerSpec(cpu_millicpu=100, memory_bytes=16 * MiB)])
        pid = extra.client.container_info(pod.container_id()).pid
        workdir, bridge, base = extra.workdir, extra.bridge, extra.cgroup_base
        assert pod.netns_path and os.path.exists(pod.netns_path)
        assert pathlib.Path(f"/sys/class/net/{bridge}").exists()
        shims = subprocess.run(["pgrep", "-f", f"containerd-shim.*{extra.socket}"], capture_output=True, text=True)
        assert shims.stdout.split(), "expected a running shim for the pod"
    assert not workdir.exists()
    assert not pathlib.Path(f"/sys/class/net/{bridge}").exists()
    assert str(workdir) not in pathlib.Path("/proc/self/mountinfo").read_text()
    assert not [h.name for h in CGROUP_ROOT.iterdir() if (h / base.lstrip("/")).exists()]
    assert _gone(pid)
    assert all(_gone(shim) for shim in shims.stdout.split()), f"shims {shims.stdout.split()} outlived the node"


@pytest.fixture
def containerd_without_cri(node, tmp_path):
    """A second, real containerd with io.containerd.grpc.v1.cri disabled; yields its socket."""
    sock = tmp_path / "c.sock"
    config = tmp_path / "config.toml"
    config.write_text(
        f'version = 2\nroot = "{tmp_path / "root"}"\nstate = "{tmp_path / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{sock}"\n[ttrpc]\n  address = "{sock}.ttrpc"\n'
        '[debug]\n  address = ""\n[metrics]\n  address = ""\n'
    )
    with open(tmp_path / "containerd.log", "wb") as log:
        proc = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "containerd.log").read_text()[-2000:]
            time.sleep(0.05)
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_containerd_without_its_cri_plugin_is_named_as_such(containerd_without_cri):
    # The runtime is up and answers gRPC, but with io.containerd.grpc.v1.cri disabled it has no
    # runtime.v1 service: the error says so instead of a bare UNIMPLEMENTED.
    sock = containerd_without_cri
    with RuntimeClient(str(sock), timeout_s=5) as client:
        with pytest.raises(Unimplemented) as err:
            client.version()
    assert str(err.value) == (
        f"the runtime at unix://{sock} answers but does not serve the CRI service runtime.v1.RuntimeService "
        "(UNIMPLEMENTED: unknown service runtime.v1.RuntimeService during Version): containerd needs its CRI "
        "plugin io.containerd.grpc.v1.cri enabled and loaded (see 'ctr plugins ls'); CRI runtime.v1 needs "
        "containerd >= 1.6 or CRI-O >= 1.23"
    )
    assert isinstance(err.value, CallFailed) and err.value.code == "UNIMPLEMENTED"


def test_detection_passes_over_a_containerd_without_cri(node, containerd_without_cri, tmp_path, monkeypatch):
    # A Docker node: Docker's containerd (no CRI) at /run/containerd/containerd.sock, the CRI
    # runtime at another usual path. Symlinks put both real sockets under a host root.
    monkeypatch.delenv("CONTAINER_RUNTIME_ENDPOINT", raising=False)
    host = tmp_path / "host"
    (host / "run/containerd").mkdir(parents=True)
    (host / "run/containerd/containerd.sock").symlink_to(containerd_without_cri)
    (host / "var/run").mkdir(parents=True)
    (host / "var/run/cri-dockerd.sock").symlink_to(node.socket)
    with RuntimeClient(timeout_s=5, host_root=str(host)) as client:
        assert client.endpoint == f"unix://{host}/var/run/cri-dockerd.sock"
        assert client.version().runtime_name == "containerd"


_KILLED_NODE = """
import json, sys
from tests.support.node import ContainerSpec, TestNode
node = TestNode().start()
pod = node.run_pod("orphan", containers=[ContainerSpec(cpu_millicpu=100, memory_bytes=16 << 20)])
info = node.client.container_info(pod.container_id())
print(json.dumps({"workdir": str(node.workdir), "bridge": node.bridge, "cgroup_base": node.cgroup_base,
                  "containerd": node.proc.pid, "container": info.pid, "netns": pod.netns_path}), flush=True)
sys.stdin.read()  # until killed
"""


def test_a_killed_test_process_leaves_nothing_after_the_next_start(node):
    # SIGKILL runs no teardown: containerd, shims, pods, mounts, bridge and cgroups stay behind until
    # the next node starts and reaps every node whose owner lock is free. The live session node is
    # left alone.
    import json

    from tests.support.node import reap_stale_nodes

    repo = pathlib.Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, "-c", _KILLED_NODE], cwd=repo, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        made = json.loads(child.stdout.readline())
    finally:
        child.kill()
        child.wait(timeout=10)
    workdir = pathlib.Path(made["workdir"])
    shims = subprocess.run(["pgrep", "-f", f"containerd-shim.*{workdir}"], capture_output=True, text=True).stdout.split()
    assert shims and not _gone(made["containerd"]) and not _gone(made["container"])  # all orphaned, still running
    assert str(workdir) in pathlib.Path("/proc/self/mountinfo").read_text()

    reaped = reap_stale_nodes()
    assert str(workdir) in reaped
    assert not workdir.exists()
    assert all(_gone(pid) for pid in (made["containerd"], made["container"], *shims))
    assert str(workdir) not in pathlib.Path("/proc/self/mountinfo").read_text()
    assert not pathlib.Path(f"/sys/class/net/{made['bridge']}").exists()
    assert not [h.name for h in CGROUP_ROOT.iterdir() if (h / made["cgroup_base"].lstrip("/")).exists()]
    assert node.workdir.exists() and node.client.version().runtime_name == "containerd"
    assert str(node.workdir) not in "".join(reap_stale_nodes())


def test_a_pod_that_fails_to_start_leaves_no_sandbox_or_cgroup(node, pods):
    from tests.support.node import NodeError

    before = {s.id for s in node.client.list_pod_sandboxes()}
    with pytest.raises(NodeError, match=r"starting pod t-broken/broken failed: CreateContainer \(container bad in sandbox "
                       r"[0-9a-f]+\) failed at unix://.*: NOT_FOUND: failed to resolve image \"localhost/no-such-image:1\""):
        pods.run("broken", "t-broken", [ContainerSpec("ok"), ContainerSpec("bad", image="localhost/no-such-image:1")])
    assert {s.id for s in node.client.list_pod_sandboxes()} == before
    assert not node.client.list_containers({"io.kubernetes.pod.namespace": "t-broken"})
    kubepods = CGROUP_ROOT / "memory" / node.cgroup_base.lstrip("/") / "kubepods"
    assert not [d.name for d in kubepods.glob("pod*") if d.is_dir() and d.name[3:] not in {p.uid for p in node.pods.values()}]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_test_run_still_tears_the_node_down(node, tmp_path, signum):
    # Ctrl-C (SIGINT) and a CI timeout (SIGTERM) interrupt pytest, which then runs the fixtures'
    # teardown: no containerd, pod, mount or work dir is left.
    repo = pathlib.Path(__file__).resolve().parents[2]
    out = tmp_path / "workdir"
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/node/signal_probe.py"],
        cwd=repo, env={**os.environ, "KCX_SIGNAL_PROBE_OUT": str(out)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not out.exists():
            assert child.poll() is None and time.monotonic() < deadline, child.stdout.read() if child.poll() else "no pod"
            time.sleep(0.05)
        workdir = pathlib.Path(out.read_text())
        containerd = subprocess.run(["pgrep", "-f", f"containerd --config {workdir}/"], capture_output=True,
                                    text=True).stdout.split()
        assert containerd and workdir.exists()
        child.send_signal(signum)
        output, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 2, output  # pytest's "interrupted"
    assert "KeyboardInterrupt" in output
    assert not workdir.exists(), output
    assert all(_gone(pid) for pid in containerd)
    assert str(workdir) not in pathlib.Path("/proc/self/mountinfo").read_text()
