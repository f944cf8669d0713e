"""kubectl-chaos in node-local mode (``--agent-address``) against a real agent on the test node:
exit status, the one-line errors, text/json/yaml output, and what the kernel holds afterwards."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import pytest
import yaml

from tests.node.test_agent import MiB, agent, cpu_files, iperf_bps, mem_files, wait_until  # noqa: F401 (fixture)
from tests.support.node import ContainerSpec

REPO = pathlib.Path(__file__).resolve().parents[2]


def chaos(agent_address: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [args[0]] if args and args[0] in ("status", "top") else []  # a subcommand goes first
    rest = args[len(command):]
    return subprocess.run([sys.executable, "-m", "plugin.cli", *command, "--agent-address", agent_address, *rest],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in res.stderr.splitlines() if line.strip().startswith("error:")]
    assert len(errors) == 1, res.stderr
    return errors[0]


@pytest.fixture
def web(pods):
    return pods.run("web", containers=[ContainerSpec("app", cpu_millicpu=500, memory_bytes=64 * MiB)])


def test_set_cpu_text_output_then_reset(agent, web):  # noqa: F811
    res = chaos(agent.address, "--set-cpu=200m", "-n", "default", "web", "-c", "app")
    assert res.returncode == 0, res.stderr
    assert "cpu: 500m -> 200m (read back 200m) via cri" in res.stdout
    assert cpu_files(web)[0] == "20000"

    res = chaos(agent.address, "--set-memory=32Mi", "--duration=10m", "--method=cgroup", "web")
    assert res.returncode == 0, res.stderr
    assert "memory: 64Mi -> 32Mi (read back 32Mi) via cgroup, expires" in res.stdout
    assert mem_files(web)[0] == str(32 * MiB)

    res = chaos(agent.address, "status")
    assert res.returncode == 0 and "web" in res.stdout and "200m" in res.stdout, res.stdout + res.stderr

    res = chaos(agent.address, "--reset", "web")
    assert res.returncode == 0, res.stderr
    assert "cpu: 200m -> 500m (read back 500m)" in res.stdout and "restored" in res.stdout
    assert cpu_files(web) == ("50000", "50000") and mem_files(web)[0] == str(64 * MiB)
    assert agent.list() == []


def test_json_and_yaml_output(agent, web):  # noqa: F811
    res = chaos(agent.address, "--set-cpu=300m", "web", "-o", "json")
    assert res.returncode == 0, res.stderr
    [target] = json.loads(res.stdout)["targets"]
    [cpu] = target["changes"]
    assert (cpu["resource"], cpu["previous"], cpu["readBack"], cpu["method"]) == ("cpu", 500, 300, "cri")
    res = chaos(agent.address, "status", "-o", "yaml")
    assert res.returncode == 0, res.stderr
    assert "web" in json.dumps(yaml.safe_load(res.stdout))
    chaos(agent.address, "--reset", "web")


def test_dry_run_changes_nothing(agent, web):  # noqa: F811
    res = chaos(agent.address, "--dry-run", "--set-cpu=100m", "--set-memory=48Mi", "web")
    assert res.returncode == 0, res.stderr
    assert "dry run" in res.stdout and "500m -> 100m" in res.stdout
    assert cpu_files(web) == ("50000", "50000") and mem_files(web)[0] == str(64 * MiB)
    assert agent.list() == []


def test_bandwidth_in_bytes_per_second_is_honoured(agent, web):  # noqa: F811
    res = chaos(agent.address, "--set-bandwidth=2MBps", "--direction=ingress", "web")
    assert res.returncode == 0, res.stderr
    assert "read back 16Mbit/s" in res.stdout or "16,000,000" in res.stdout or "16Mbit" in res.stdout, res.stdout
    measured = iperf_bps(web, into_pod=True)
    assert 0.7 * 16e6 < measured < 1.1 * 16e6, measured
    chaos(agent.address, "--reset", "web")


def test_refused_and_unknown_are_one_line_and_exit_1(agent, web):  # noqa: F811
    res = chaos(agent.address, "--set-cpu=100m", "nope")
    assert res.returncode == 1
    line = one_error_line(res)
    assert "no pod default/nope" in line and "default/web" in line
    res = chaos(agent.address, "--set-cpu=100m", "web", "-c", "zz")
    assert res.returncode == 1 and "no container 'zz'" in one_error_line(res)
    res = chaos(agent.address, "--set-cpu=100m", "-n", "kube-system", "web")
    assert res.returncode == 1 and "denied" in one_error_line(res)
    assert cpu_files(web) == ("50000", "50000")


def test_unreachable_agent_is_one_line_and_exit_1(tmp_path):
    res = chaos(f"unix://{tmp_path}/none.sock", "--set-cpu=100m", "web")
    assert res.returncode == 1
    assert "cannot reach the chaos-agent at unix://" in one_error_line(res)


@pytest.mark.parametrize(
    "args",
    [
        ["--set-cpu=abc"], ["--set-cpu=-1"], ["--set-cpu=0"], ["--set-memory=1Mi"], ["--set-memory=lots"],
        ["--set-bandwidth=fast"], ["--set-bandwidth=0"], ["--set-cpu=100m", "--duration=-5s"],
        ["--set-cpu=100m", "--method=magic"], ["--set-cpu=100m", "--direction=sideways"],
    ],
)  # fmt: skip
def test_bad_flags_exit_2_nothing_sent(agent, web, args):  # noqa: F811
    res = chaos(agent.address, *args, "web")
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.strip().count("\n") == 0 or one_error_line(res)
    assert cpu_files(web) == ("50000", "50000") and agent.list() == [] and agent.serving()


def test_node_local_path_is_light_and_quick(agent, web):  # noqa: F811
    code = (
        "import sys\n"
        "from plugin import cli\n"
        "try:\n"
        f"    cli.main(['--agent-address', {agent.address!r}, '--set-cpu=250m', 'web'])\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "print('KUBERNETES' if 'kubernetes' in sys.modules else 'NO-KUBERNETES', rc)\n"
    )
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert res.stdout.strip().endswith("NO-KUBERNETES 0"), res.stdout + res.stderr
    assert cpu_files(web)[0] == "25000"
    assert elapsed < 3.0  # generous on a shared machine; bench/bench_agent.py measures p50
    chaos(agent.address, "--reset", "web")


# --- the queue budget (--latency) and pods netshape refuses --------------------------------------


def _host_veth(agent, pod) -> tuple[str, str]:  # noqa: F811 - the fixture's name
    import netshape

    pid = agent.node.client.container_info(pod.container_id()).pid
    return netshape.find_host_veth(pid).ifname, netshape.ifb_name(pod.sandbox_id)


def _leaf(dev: str) -> str:
    """The queue under our HTB class (parent 6b63:1) as pyroute2 decodes the kernel's dump, not
    netshape: ``tbf 6b64: limit 6056`` (tc prints a TBF's limit as a latency at its own rate, 0us
    for our splitter), ``pfifo`` for another kind, '' when there is none."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        [index] = ipr.link_lookup(ifname=dev)
        for q in ipr.get_qdiscs(index):
            if q["parent"] == 0x6B630001:
                kind = q.get_attr("TCA_KIND")
                if kind != "tbf":
                    return kind
                limit = q.get_attr("TCA_OPTIONS").get_attr("TCA_TBF_PARMS")["limit"]
                return f"tbf {q['handle'] >> 16:x}: limit {limit}"
    return ""


def test_latency_is_applied_read_back_kept_by_drift_and_reset(agent, web):  # noqa: F811
    veth, ifb = _host_veth(agent, web)
    res = chaos(agent.address, "--set-bandwidth=2Mbps", "--latency", "20ms", "web", "-o", "json")
    assert res.returncode == 0, res.stderr
    [target] = json.loads(res.stdout)["targets"]
    # 20 ms of 2 Mbit/s is 5,000 bytes, under the floor of four full frames (4 x 1,514): the floor.
    for change in target["changes"]:
        q = change["queue"]
        assert (q["budgetSeconds"], q["limitBytes"], q["unknown"]) == (0.02, 6056, None), change
        assert q["latencySeconds"] == pytest.approx(6056 * 8 / 2_000_000)
    for dev in (veth, ifb):  # into the pod on the veth, out of it on our IFB: tc agrees
        assert _leaf(dev) == "tbf 6b64: limit 6056", dev

    res = chaos(agent.address, "--set-bandwidth=20Mbps", "web")  # a later change keeps the budget
    assert res.returncode == 0, res.stderr
    assert "queue 20ms = 50,000 B (budget 20ms)" in res.stdout, res.stdout
    res = chaos(agent.address, "status")
    assert res.returncode == 0 and "QUEUE" in res.stdout and "20ms/50000B" in res.stdout, res.stdout

    # Someone puts the kernel's default queue back under our class: drift shapes it again.
    subprocess.run(["tc", "qdisc", "replace", "dev", veth, "parent", "6b63:1", "handle", "6b65:", "pfifo",
                    "limit", "1000"], check=True)
    assert _leaf(veth) == "pfifo"
    assert wait_until(lambda: _leaf(veth) == "tbf 6b64: limit 50000", 5), _leaf(veth)
    # (The count is written after the kernel is fixed: wait for it too.)
    assert wait_until(lambda: agent.list()[0].drift_corrections >= 1, 5)

    res = chaos(agent.address, "--reset", "web")
    assert res.returncode == 0 and "restored" in res.stdout, res.stdout + res.stderr
    assert _leaf(veth) == "" and not pathlib.Path("/sys/class/net", ifb).exists() and agent.list() == []


@pytest.mark.parametrize("args, message", [
    (["--set-cpu=100m", "--latency=20ms"], "give it with --set-bandwidth"),
    (["--set-bandwidth=2Mbps", "--latency=0.5ms"], '"0.5ms" is shorter than 1ms; accepted: 1ms to 10s'),
    (["--set-bandwidth=2Mbps", "--latency=20"], '"20" has no unit'),
])  # fmt: skip
def test_bad_latency_exits_2_nothing_changed(agent, web, args, message):  # noqa: F811
    res = chaos(agent.address, *args, "web")
    assert res.returncode == 2 and message in one_error_line(res), res.stderr
    veth, ifb = _host_veth(agent, web)
    assert _leaf(veth) == "" and not pathlib.Path("/sys/class/net", ifb).exists() and agent.list() == []


def test_pod_with_two_veths_is_refused_before_anything_changes(agent, pods):  # noqa: F811
    pod = pods.run("multi", containers=[ContainerSpec("app", cpu_millicpu=500)])
    # A second network as Multus would attach it: another veth pair into the pod's namespace.
    second = f"kcxm{pod.sandbox_id[:8]}"
    subprocess.run(["ip", "link", "add", second, "type", "veth", "peer", "name", "net1", "netns", pod.netns_path],
                   check=True)
    try:
        before = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True, check=True).stdout
        res = chaos(agent.address, "--set-bandwidth=2Mbps", "multi")
        assert res.returncode == 1, res.stdout + res.stderr
        line = one_error_line(res)
        assert "pod default/multi" in line and "has 2 veth interfaces: eth0 (host side veth" in line, line
        assert f"net1 (host side {second})" in line and "nothing was changed" in line, line
        assert "EPERM" not in line and "Traceback" not in res.stderr
        assert subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout == before
        assert agent.list() == []
    finally:
        subprocess.run(["ip", "link", "del", second], check=False)
