"""Stepped profiles on the real node: the agent runs the steps (measured CPU use per step), survives a
kill -9 in the middle of a ramp, and a reset in the middle restores the originals exactly."""

from __future__ import annotations

import time

from daemonset.api.gen import agent_pb2
from tests.node.test_agent import BUSY, cpu_files, cpu_used, wait_until
from tests.node.test_agent_cli import chaos
from tests.node.test_lifecycle import agent, diff, make_agent, state_of  # noqa: F401 (fixtures)
from tests.support.node import ContainerSpec


def ramp(agent, pod: str, values: list[int], every_s: float) -> agent_pb2.ApplyResponse:  # noqa: F811
    req = agent_pb2.ApplyRequest(target=agent_pb2.Target(namespace="default", pod=pod),
                                 changes=agent_pb2.Changes(cpu_millicpu=values[0]))
    for i, v in enumerate(values[1:], 1):
        req.steps.add(offset_s=i * every_s, changes=agent_pb2.Changes(cpu_millicpu=v))
    return agent.stub.Apply(req, timeout=30)


def step_of(agent) -> int:  # noqa: F811
    [exp] = agent.list()
    return exp.step


def test_cpu_ramp_measured_step_by_step(agent, pods, node):  # noqa: F811 (fixture)
    pod = pods.run("ramp", containers=[ContainerSpec("app", argv=BUSY, cpu_millicpu=1000, memory_bytes=64 * 2**20)])
    original = state_of(pod, node)
    values = [800, 600, 400, 200]
    ramp(agent, "ramp", values, every_s=3.0)
    measured = []
    for i, want in enumerate(values, 1):
        assert wait_until(lambda i=i: step_of(agent) == i, 5), agent.log_tail()
        assert cpu_files(pod)[0] == str(want * 100)
        used = cpu_used(pod, seconds=2.0)
        measured.append(round(used, 3))
        assert abs(used - want / 1000) <= 0.05 * want / 1000 + 0.005, (want, used)
    print("ramp 800m..200m in 4 steps, measured cores:", measured)
    [exp] = agent.list()
    assert exp.next_step_at_unix_s == 0 and not exp.HasField("next_step_at_unix_s")
    agent.revert("default", "ramp")
    assert diff(original, state_of(pod, node)) == {}


def test_kill9_mid_ramp_then_the_remaining_steps_on_time(agent, pods, node):  # noqa: F811 (fixture)
    pod = pods.run("ramp9", containers=[ContainerSpec("app", cpu_millicpu=1000)])
    original = state_of(pod, node)
    started = time.monotonic()
    ramp(agent, "ramp9", [800, 600, 400, 300, 200], every_s=2.0)
    assert wait_until(lambda: step_of(agent) == 2, 4)
    agent.kill9()
    time.sleep(2.5)  # down across the third step's time (4 s)
    assert cpu_files(pod)[0] == "60000"
    agent.start()
    # The step due now is made at once; the rest follow on their own times.
    assert wait_until(lambda: cpu_files(pod)[0] in ("40000", "30000"), 2), agent.log_tail()
    assert wait_until(lambda: cpu_files(pod)[0] == "20000", 6)
    late = time.monotonic() - started - 8.0
    print(f"last step after kill -9 mid-ramp: {late:+.2f} s from its time")
    assert late < 1.0
    agent.revert("default", "ramp9")
    assert diff(original, state_of(pod, node)) == {}


def test_reset_mid_ramp_is_exact_and_no_step_comes_after(agent, pods, node):  # noqa: F811 (fixture)
    pod = pods.run("ramprst", containers=[ContainerSpec("app", cpu_millicpu=1000, memory_bytes=128 * 2**20)])
    original = state_of(pod, node)
    ramp(agent, "ramprst", [900, 700, 500], every_s=1.5)
    assert wait_until(lambda: step_of(agent) == 2, 3)
    agent.revert("default", "ramprst")
    assert diff(original, state_of(pod, node)) == {}
    time.sleep(2.5)
    assert diff(original, state_of(pod, node)) == {} and agent.list() == [] and agent.records() == []


def test_cli_ramp_and_status(agent, pods):  # noqa: F811 (fixture)
    pod = pods.run("ramp-cli", containers=[ContainerSpec("app", cpu_millicpu=1000)])
    res = chaos(agent.address, "ramp-cli", "--set-cpu", "900m..300m", "--over", "20s", "--steps", "3")
    assert res.returncode == 0, res.stderr
    assert "in 3 steps over 20s" in res.stdout and cpu_files(pod)[0] == "90000"
    res = chaos(agent.address, "status", "-A")
    assert "step 1/3, next cpu 600m at" in res.stdout, res.stdout
    res = chaos(agent.address, "ramp-cli", "--reset")
    assert res.returncode == 0 and cpu_files(pod)[0] == "100000"
