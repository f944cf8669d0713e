"""`kubectl chaos top` and the per-experiment metrics against the real agent on the real node: the
figures are compared with what the test measures itself (cpuacct, iperf3)."""

from __future__ import annotations

import json
import threading

from tests.node.test_agent import BUSY, MiB, agent, cpu_files, iperf_bps  # noqa: F401 (fixture)
from tests.node.test_agent_cli import chaos
from tests.support.node import ContainerSpec


def test_top_reports_what_the_kernel_measures(agent, pods):  # noqa: F811
    pod = pods.run("top", containers=[ContainerSpec("app", argv=BUSY, cpu_millicpu=1000, memory_bytes=64 * MiB)])
    agent.apply("default", "top", cpu_millicpu=300, egress_bps=20_000_000, duration_s=600)
    assert cpu_files(pod)[0] == "30000"
    measured = {}
    traffic = threading.Thread(target=lambda: measured.update(bps=iperf_bps(pod, into_pod=False, seconds=5)))
    traffic.start()
    res = chaos(agent.address, "top", "-A", "--interval", "3s", "-o", "json")
    traffic.join()
    assert res.returncode == 0, res.stderr
    [row] = [json.loads(line) for line in res.stdout.splitlines()]
    assert (row["namespace"], row["pod"], row["container"]) == ("default", "top", "app")
    assert abs(row["cpu"]["usedCores"] - 0.3) < 0.03 and row["cpu"]["throttledShare"] > 0.5
    assert row["cpu"]["limitMillicpu"] == 300 and row["cpu"]["originalMillicpu"] == 1000
    assert 0 < row["memory"]["workingSetBytes"] < row["memory"]["limitBytes"] == 64 * MiB
    assert row["memory"]["oomKillsSinceStart"] == 0
    # Our IFB's root qdisc counts the pod's traffic out; iperf3 counts goodput (headers excluded).
    assert 0.8 * 20e6 < row["egress"]["bitsPerSecond"] < 1.05 * 20e6, row
    assert measured["bps"] < row["egress"]["bitsPerSecond"] * 1.02
    assert row["ingress"]["bitsPerSecond"] is None and row["expiresAt"]
    text = chaos(agent.address, "top", "-A", "--interval", "1s")
    assert text.returncode == 0 and "CPU USED/LIMIT" in text.stdout and "/300m" in text.stdout, text.stdout
    metrics = agent.metrics()
    assert 'chaos_experiment_cpu_seconds_total{container="app",namespace="default",pod="top"}' in metrics
    assert 'chaos_experiment_limit{container="app",namespace="default",pod="top",resource="cpu"} 300.0' in metrics
    assert 'chaos_experiment_shaped_bytes_total{container="app",direction="egress",namespace="default",pod="top"}' \
        in metrics
    agent.revert("default", "top")
    assert "chaos_experiment_cpu_seconds_total{" not in agent.metrics()


def test_top_bad_input_and_no_experiments(agent, pods):  # noqa: F811
    res = chaos(agent.address, "top", "--interval", "0s")
    assert res.returncode == 2 and "0.2s to 60s" in res.stderr and "Traceback" not in res.stderr
    res = chaos(agent.address, "top", "-A")
    assert res.returncode == 0 and "No chaos experiments in any namespace" in res.stdout
