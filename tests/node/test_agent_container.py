"""The agent image, run on the real test node as a kubelet runs the DaemonSet's pod.

The image is built in the session by scripts/build-agent-image.sh (cached by its inputs) and
imported with ctr; daemonset/manifests/daemonset.yaml is translated into CRI requests by
tests/support/podspec.py (only the image, the host paths listed there and ``--node-local-api``
differ). Then, through the agent's unix socket on its hostPath directory: CPU and memory apply and
revert (the plugin CLI), a duration that ends, SIGKILL and the kubelet's restart, and bandwidth.
What the container really got is read from the outside (/proc/PID: capabilities, namespaces,
seccomp, mounts).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import time

import pytest

from daemonset.api.gen import agent_pb2
from tests.node.test_agent import Agent, MiB, cpu_files, iperf_bps, mem_files, wait_until
from tests.node.test_agent_cli import chaos
from tests.support import podspec
from tests.support.node import ContainerSpec
from tests.support.require import require_binary

REPO = pathlib.Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-agent-image.sh"
CAP_NET_ADMIN = 12


@dataclasses.dataclass(frozen=True)
class AgentImage:
    directory: pathlib.Path
    name: str
    manifest_digest: str
    config_digest: str  # the image id containerd's CRI reports as a container's image_ref
    layer_bytes: int
    rootfs_bytes: int
    build_s: float  # the script's wall time in this session (a cache hit: well under a second)
    import_s: float


def _read_env(path: pathlib.Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest.fixture(scope="session")
def agent_image(node) -> AgentImage:
    """Build (or find cached) the agent image and import it into the test node's containerd."""
    for binary in ("mmdebstrap", "chroot", "cpio"):
        require_binary(binary)
    require_binary(str(REPO / ".venv" / "bin" / "python"))
    t0 = time.monotonic()
    res = subprocess.run([str(BUILD_SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=600)
    build_s = time.monotonic() - t0
    if res.returncode != 0:
        pytest.fail(f"{BUILD_SCRIPT.name} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    directory = pathlib.Path(res.stdout.strip().splitlines()[-1])
    env = _read_env(directory / "image.env")
    t0 = time.monotonic()
    node._ctr("images", "import", "--snapshotter", node.snapshotter, "--all-platforms", str(directory / "agent.oci.tar"))
    import_s = time.monotonic() - t0
    image = AgentImage(directory, env["IMAGE_NAME"], env["MANIFEST_DIGEST"], env["CONFIG_DIGEST"],
                       int(env["LAYER_BYTES"]),
                       int(env["ROOTFS_BYTES"]), build_s, import_s)  # fmt: skip
    print(f"\nagent image {image.name} {image.manifest_digest}: build {build_s:.1f} s, import {import_s:.1f} s, "
          f"layer {image.layer_bytes / MiB:.1f} MiB, rootfs {image.rootfs_bytes / MiB:.1f} MiB")
    return image


class ContainerisedAgent:
    """The DaemonSet's pod on the test node; ``replace_pod()`` does what a rolling update does."""

    def __init__(self, node, image: AgentImage, pod_dir: pathlib.Path):
        self.node = node
        self.image = image
        self.pod_dir = pod_dir
        self.template = podspec.read_daemonset(podspec.DAEMONSET_MANIFEST.read_text())
        self.host_paths = podspec.host_paths_on_test_node(str(node.socket), str(pod_dir))
        # The gRPC helper of test_agent.py, pointed at the socket in the hostPath directory.
        self.client = Agent(node, pathlib.Path(self.host_paths["/run/kubectl-chaos"]))
        self.client.state_dir = pathlib.Path(self.host_paths["/var/lib/kubectl-chaos"])
        self.pod: podspec.RunningPod | None = None

    @property
    def address(self) -> str:
        return self.client.address

    def start_pod(self) -> float:
        """A new pod of the DaemonSet (new UID, new sandbox) on this node; seconds until it serves."""
        identity = podspec.new_identity(self.node, self.template, str(self.pod_dir))
        plan = podspec.plan_pod(self.template, identity, image=self.image.name, host_paths=self.host_paths,
                                volume_dir=f"{self.pod_dir}/pods/{identity.uid}/volumes")  # fmt: skip
        t0 = time.monotonic()
        self.pod = podspec.RunningPod(self.node, plan).start()
        self.wait_serving()
        return time.monotonic() - t0

    def delete_pod(self, grace_s: int = 30) -> None:
        """As the kubelet deletes the pod: SIGTERM, SIGKILL after the grace period; then the sandbox."""
        self.client._drop_channel()
        if self.pod is not None:
            problems = self.pod.delete(grace_s=grace_s)
            self.pod = None
            assert not problems, problems

    def wait_serving(self, timeout_s: float = 30.0) -> None:
        assert self.pod is not None
        deadline = time.monotonic() + timeout_s
        while not (self.client.socket.exists() and self.client.serving()):
            if self.pod.state() == 2:  # CONTAINER_EXITED
                raise AssertionError(f"the agent container exited:\n{self.pod.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the agent container not serving within {timeout_s} s:\n{self.pod.log_tail()}")
            time.sleep(0.05)

    def probe(self, kind: str):
        assert self.pod is not None
        (probe,) = [p for p in self.template.containers[0].probes if p.kind == kind]
        return self.pod.exec_probe(probe)


@pytest.fixture(scope="module")
def agent_pod(node, agent_image):
    # Short: the socket path below it must stay under 108 bytes.
    agent = ContainerisedAgent(node, agent_image, node.workdir / f"agentpod-{os.getpid()}")
    try:
        print(f"\nagent container serving {agent.start_pod():.2f} s after RunPodSandbox")
        yield agent
    finally:
        agent.delete_pod(grace_s=10)


@pytest.fixture
def web(pods):
    return pods.run("web", "shop", [ContainerSpec("app", cpu_millicpu=500, memory_bytes=64 * MiB)])


def _status(pid: int) -> dict[str, str]:
    lines = pathlib.Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _mounts(pid: int) -> dict[str, tuple[str, str]]:
    """Mount point -> (its per-mount options, the filesystem type), from /proc/PID/mountinfo."""
    out = {}
    for line in pathlib.Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        out[fields[4]] = (fields[5], fields[sep + 1])
    return out


def test_the_container_gets_what_the_manifest_asks_for(agent_pod, agent_image):
    pid = agent_pod.pod.pid()
    status = _status(pid)
    # capabilities: drop ALL, add NET_ADMIN -> exactly NET_ADMIN, in every set that counts
    for capset in ("CapEff", "CapPrm", "CapBnd"):
        assert int(status[capset], 16) == 1 << CAP_NET_ADMIN, (capset, status[capset])
    assert int(status["CapInh"], 16) == 0 and int(status["CapAmb"], 16) == 0
    assert status["Uid"].split()[0] == "0"  # runAsUser: 0
    assert status["NoNewPrivs"] == "1"  # allowPrivilegeEscalation: false
    assert status["Seccomp"] == "2"  # seccompProfile RuntimeDefault: a filter is in force
    # hostPID and hostNetwork: the host's namespaces (this test process is in them); its own mounts
    for ns in ("pid", "net"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") == os.readlink(f"/proc/self/ns/{ns}"), ns
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    mounts = _mounts(pid)
    assert mounts["/"][0].split(",")[0] == "ro", mounts["/"]  # readOnlyRootFilesystem
    assert mounts["/host/sys/fs/cgroup"][0].split(",")[0] == "rw"
    assert mounts["/tmp"][1] == "tmpfs"  # emptyDir medium Memory
    for path in ("/run/containerd/containerd.sock", "/var/lib/kubectl-chaos", "/run/kubectl-chaos"):
        assert mounts[path][0].split(",")[0] == "rw", (path, mounts[path])
    assert mounts["/run/dbus"][0].split(",")[0] == "ro"  # readOnly: true
    assert "/run/containerd" not in mounts and "/var/run/crio/crio.sock" not in mounts
    environ = dict(e.split("=", 1) for e in pathlib.Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if e)
    assert environ["NODE_NAME"] == podspec.NODE_NAME and environ["POD_NAMESPACE"] == "kubectl-chaos"
    argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")
    assert argv[:2] == ["/usr/bin/python3", "/usr/local/bin/chaos-agent"], argv
    manifest_args = list(agent_pod.template.containers[0].args)
    assert argv[2:] == [a if not a.startswith("--node-local-api") else "--node-local-api=on" for a in manifest_args]
    info = agent_pod.pod.client.container_status(agent_pod.pod.container_id(), verbose=False).status
    assert (info.image.image, info.image_ref) == (agent_image.name, agent_image.config_digest)
    # Inside: the root refuses writes (EROFS), /tmp takes them; the image's bytecode is all there
    # (a read-only root could not cache it: every start would compile again).
    probe = ("import errno, pathlib, sys\n"
             "try:\n open('/x', 'w')\nexcept OSError as e:\n assert e.errno == errno.EROFS, e\nelse:\n sys.exit('root fs writable')\n"
             "pathlib.Path('/tmp/x').write_text('ok')\n"
             "import daemonset.agent, importlib.util as u\n"
             "missing = [p for p in pathlib.Path('/usr/local/lib/python3.11/dist-packages').rglob('*.py')"
             " if not pathlib.Path(u.cache_from_source(str(p))).exists()]\n"
             "assert not missing, missing[:5]\n")  # fmt: skip
    res = agent_pod.pod.client.exec_sync(agent_pod.pod.container_id(), ["python3", "-c", probe], timeout_s=30)
    assert res.exit_code == 0, res.stderr.decode()
    # The manifest's probes, run as the kubelet runs them, pass against the image.
    for kind in ("startup", "liveness", "readiness"):
        res = agent_pod.probe(kind)
        assert res.exit_code == 0, (kind, res.stderr.decode()[-2000:])


def test_cpu_and_memory_apply_and_revert_through_the_plugin(agent_pod, web):
    res = chaos(agent_pod.address, "--set-cpu=200m", "--set-memory=32Mi", "-n", "shop", "web", "-c", "app")
    assert res.returncode == 0, res.stderr
    assert "cpu: 500m -> 200m (read back 200m)" in res.stdout, res.stdout
    assert cpu_files(web)[0] == "20000" and mem_files(web)[0] == str(32 * MiB)
    res = chaos(agent_pod.address, "--reset", "-n", "shop", "web")
    assert res.returncode == 0, res.stderr
    assert cpu_files(web) == ("50000", "50000") and mem_files(web) == (str(64 * MiB), str(64 * MiB), str(64 * MiB))
    assert agent_pod.client.list() == []


def test_a_duration_ends_by_itself(agent_pod, web):
    agent_pod.client.apply("shop", "web", duration_s=1.5, cpu_millicpu=250)
    assert cpu_files(web)[0] == "25000"
    assert wait_until(lambda: cpu_files(web)[0] == "50000", timeout_s=10), cpu_files(web)
    assert wait_until(lambda: agent_pod.client.list() == [], timeout_s=5)


def test_sigkill_and_the_kubelets_restart_recover_the_experiments(agent_pod, pods):
    kept = pods.run("kept", "shop", [ContainerSpec("app", cpu_millicpu=500, memory_bytes=64 * MiB)])
    ending = pods.run("ending", "shop", [ContainerSpec("app", cpu_millicpu=500, memory_bytes=64 * MiB)])
    client = agent_pod.client
    client.apply("shop", "kept", duration_s=600, cpu_millicpu=300, memory_bytes=48 * MiB)
    client.apply("shop", "ending", duration_s=2.0, memory_bytes=40 * MiB)
    ends_at = time.monotonic() + 2.0
    first = agent_pod.pod.container_id()
    os.kill(agent_pod.pod.pid(), signal.SIGKILL)  # as the OOM killer or a node problem would
    agent_pod.pod.wait_exited()
    client._drop_channel()
    time.sleep(max(0.0, ends_at - time.monotonic()) + 0.2)  # "ending" expires while no agent runs
    assert mem_files(ending)[0] == str(40 * MiB)  # nobody reverted it yet
    t0 = time.monotonic()
    second = agent_pod.pod.restart()
    agent_pod.wait_serving()
    restart_s = time.monotonic() - t0
    assert second != first and agent_pod.pod.attempts["agent"] >= 1
    # On start the agent reverts what expired while it was down and keeps the rest in force.
    assert wait_until(lambda: mem_files(ending)[0] == str(64 * MiB), timeout_s=5), mem_files(ending)
    assert cpu_files(kept)[0] == "30000" and mem_files(kept)[0] == str(48 * MiB)
    listed = {e.target.pod: e for e in client.list()}
    assert set(listed) == {"kept"}, listed
    client.revert("shop", "kept")
    assert cpu_files(kept) == ("50000", "50000") and mem_files(kept)[0] == str(64 * MiB)
    print(f"\nagent container: SIGKILL -> new attempt serving in {restart_s:.2f} s")


def test_a_rolling_update_hands_the_experiments_to_the_new_pod(agent_pod, web):
    """The old pod is deleted (SIGTERM: the agent stops, experiments stay), a new one (new UID) takes over."""
    agent_pod.client.apply("shop", "web", duration_s=600, cpu_millicpu=300)
    agent_pod.delete_pod(grace_s=30)
    assert cpu_files(web)[0] == "30000"  # stopping the agent is not a reset
    start_s = agent_pod.start_pod()
    assert [e.target.pod for e in agent_pod.client.list()] == ["web"]
    agent_pod.client.revert("shop", "web")
    assert cpu_files(web) == ("50000", "50000")
    print(f"\nrolling update: the new agent pod serving in {start_s:.2f} s")


def qdisc_kinds(ifindex: int) -> set[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index=ifindex)}


def test_bandwidth_on_the_host_veth(agent_pod, web):
    import netshape

    require_binary("iperf3")
    ingress_bps, egress_bps = 8_000_000, 4_000_000
    resp = agent_pod.client.apply("shop", "web", ingress_bps=ingress_bps, egress_bps=egress_bps)
    assert {r.method for r in resp.resources} == {agent_pb2.METHOD_NETLINK}
    pid = web.node.client.container_info(web.container_id()).pid
    veth = netshape.find_host_veth(pid)
    rates = netshape.read_rates(veth.ifname, web.sandbox_id)  # read back from the kernel over netlink
    assert (rates.ingress_bps, rates.egress_bps) == (netshape.kernel_bps(ingress_bps), netshape.kernel_bps(egress_bps))
    assert {"htb", "ingress"} <= qdisc_kinds(veth.ifindex)  # and with pyroute2 alone, as `tc qdisc show` would
    measured_bps = iperf_bps(web, into_pod=True, seconds=1)
    assert 0.5 * ingress_bps < measured_bps < 1.1 * ingress_bps, measured_bps
    agent_pod.client.revert("shop", "web")
    rates = netshape.read_rates(veth.ifname, web.sandbox_id)
    assert (rates.ingress_bps, rates.egress_bps) == (None, None)
    assert not {"htb", "ingress"} & qdisc_kinds(veth.ifindex)
    assert not os.path.exists(f"/sys/class/net/{netshape.ifb_name(web.sandbox_id)}")


def test_the_layout_is_reproducible(agent_image, tmp_path):
    """The same rootfs gives the same digests (sorted entries, one mtime, numeric owners, no gzip time)."""
    from scripts import oci_layout

    env = _read_env(agent_image.directory / "image.env")
    name, config = oci_layout.read_layout(agent_image.directory / "agent.oci.tar")
    t0 = time.monotonic()
    layout = oci_layout.write_layout(agent_image.directory / "rootfs", tmp_path / "again.oci.tar", name, config,
                                     epoch_s=int(env["SOURCE_DATE_EPOCH"]))
    print(f"\nlayout rewritten from the cached rootfs in {time.monotonic() - t0:.1f} s: {layout.manifest.digest}")
    assert layout.layer_diff_id == env["LAYER_DIFF_ID"]
    assert layout.layer.digest == env["LAYER_DIGEST"]
    assert layout.manifest.digest == agent_image.manifest_digest
