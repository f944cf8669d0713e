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
